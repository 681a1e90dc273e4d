"""Grad-CAM benchmark (issue #4). Run: python bench/gradcam_benchmark.py

8 face images x 2 models, one head ("gender_female"), at each model's input size. Reports the
first call (builds and traces the gradient program) and the warm call (the cached program, what
the app's error gallery pays on every page view); target for the warm pair: <= 2 s on this CPU.

Models: models/age_gender_{A,B}.keras when trained (python -m training), else stand-ins of the
same shape built here (a 4-block CNN at 128 px and a MobileNetV2 backbone nested as one layer at
128 px, random weights); models/demo/*.keras are timed too when present.
Images: ../shared/utkface/test when present (read in place), else synthetic faces.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
UTK_TEST = REPO.parent / "shared" / "utkface" / "test"
TARGET_SECONDS = 2.0


def stand_in_models(folder: Path, size: int = 128) -> dict[str, Path]:
    import keras
    from keras import layers

    def heads(features):
        pooled = layers.GlobalAveragePooling2D()(features)
        return [layers.Dense(1, name="age")(pooled), layers.Dense(1, activation="sigmoid", name="gender")(pooled)]

    inputs = keras.Input((size, size, 3))
    x = layers.Rescaling(1 / 255)(inputs)
    for block, width in enumerate((32, 64, 128, 256)):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"block{block}_conv")(x)
        x = layers.BatchNormalization(name=f"block{block}_bn")(x)
        x = layers.ReLU(name=f"block{block}_relu")(x)
        x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
    cnn = keras.Model(inputs, heads(x))

    inputs = keras.Input((size, size, 3))
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(size, size, 3))
    nested = keras.Model(inputs, heads(backbone(layers.Rescaling(1 / 127.5, offset=-1)(inputs))))

    paths = {
        "A (4-block CNN, stand-in)": folder / "stand_in_A.keras",
        "B (nested MobileNetV2, stand-in)": folder / "stand_in_B.keras",
    }
    for model, path in zip((cnn, nested), paths.values()):
        model.save(path)
    return paths


def model_paths(folder: Path) -> dict[str, Path]:
    trained = {f"{k} (trained)": REPO / "models" / f"age_gender_{k}.keras" for k in "AB"}
    if all(p.exists() for p in trained.values()):
        return trained
    return stand_in_models(folder)


def image_paths(folder: Path, n: int) -> list[Path]:
    if UTK_TEST.is_dir():
        found = sorted(p for p in UTK_TEST.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if len(found) >= n:
            return found[:n]
    from analysis.synthetic import make_synthetic_sample

    out = make_synthetic_sample(folder / "faces", n=n, seed=0, size=128)
    return sorted(p for p in Path(out).iterdir() if p.suffix == ".jpg")[:n]


def time_model(loaded, paths: list[Path], target: str, method: str, repeats: int) -> dict:
    import numpy as np

    from analysis import gradcam
    from analysis.dataset import load_image

    images = np.stack([load_image(p, loaded.input_size) for p in paths])
    start = time.perf_counter()
    maps = gradcam.gradcam(loaded, images, target, method=method)
    first = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        again = gradcam.gradcam(loaded, images, target, method=method)
        warm.append(time.perf_counter() - start)
    if not np.array_equal(maps, again):
        raise AssertionError(f"{loaded.name}: repeated Grad-CAM calls disagree")
    return {
        "first": first,
        "warm": statistics.median(warm),
        "layer": gradcam.default_layer(loaded, target),
        "candidates": len(gradcam.candidate_layers(loaded)),
        "shape": maps.shape,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="test images per model (default 8)")
    parser.add_argument("--target", default="gender_female", help="the output the maps explain (default gender_female)")
    parser.add_argument("--repeats", type=int, default=3, help="warm calls per model (median reported)")
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    from analysis.models import load_model

    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU core(s)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = image_paths(folder, args.images)
        source = "UTKFace test" if UTK_TEST.is_dir() else "synthetic faces"
        print(f"{len(paths)} images from {source}; target {args.target}")
        groups = {"main pair": model_paths(folder)}
        demo = sorted((REPO / "models" / "demo").glob("*.keras"))
        if demo:
            groups["demo models"] = {p.stem: p for p in demo}

        failed = False
        for group, models in groups.items():
            loaded = {label: load_model(path) for label, path in models.items()}
            for method in ("gradcam", "gradcam++"):
                total_warm = 0.0
                for label, model in loaded.items():
                    result = time_model(model, paths, args.target, method, args.repeats)
                    total_warm += result["warm"]
                    print(
                        f"  [{group}] {method:9s} {label:34s} {model.input_size[0]}x{model.input_size[1]} "
                        f"layer {result['layer']} ({result['candidates']} candidates): "
                        f"first call {result['first']:.2f} s, warm {result['warm']:.3f} s"
                    )
                verdict = "ok" if total_warm <= TARGET_SECONDS else "SLOWER THAN TARGET"
                print(f"  [{group}] {method}: warm, {len(paths)} images x {len(loaded)} models = "
                      f"{total_warm:.3f} s (target <= {TARGET_SECONDS:.0f} s: {verdict})")
                failed |= group == "main pair" and method == "gradcam" and total_warm > TARGET_SECONDS
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
