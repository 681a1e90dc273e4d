"""Benchmarks for the evaluation core (issue #2). Run: python bench/evaluate_benchmark.py

1. End-to-end prediction throughput for two models on ../shared/utkface/test, divided by the pure
   forward pass of the same models on pre-loaded tensors (target >= 0.85).
2. Against a naive script in the style users write (image loop, a float64 /255 array of every
   image, one `predict` call per model) on the 5000 images of train_val: time and peak memory,
   each measured in a fresh process (target: >= 2x faster, <= 0.3x peak memory).
3. Cache-hit re-open of the same pair and sample (target <= 1 s).

Models: models/age_gender_{A,B}.keras when trained (python -m training), else stand-ins of the
same shape built here (a 4-block CNN at 112 px and a nested MobileNetV2 at 128 px).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
UTK = REPO.parent / "shared" / "utkface"


def stand_in_models(folder: Path) -> dict[str, str]:
    import keras
    from keras import layers

    paths = {}
    inputs = keras.Input((112, 112, 3))
    x = layers.Rescaling(1 / 255)(inputs)
    for width in (32, 64, 128, 192):
        x = layers.Conv2D(width, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, [layers.Dense(1, name="age")(x), layers.Dense(1, activation="sigmoid", name="gender")(x)])
    paths["A"] = str(folder / "stand_in_A.keras")
    model.save(paths["A"])

    inputs = keras.Input((128, 128, 3))
    x = layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(128, 128, 3))
    x = layers.GlobalAveragePooling2D()(backbone(x))
    model = keras.Model(inputs, [layers.Dense(1, name="age")(x), layers.Dense(1, activation="sigmoid", name="gender")(x)])
    paths["B"] = str(folder / "stand_in_B.keras")
    model.save(paths["B"])
    return paths


def model_paths(folder: Path) -> dict[str, str]:
    trained = {k: REPO / "models" / f"age_gender_{k}.keras" for k in "AB"}
    if all(p.exists() for p in trained.values()):
        return {k: str(p) for k, p in trained.items()}
    return stand_in_models(folder)


def throughput(paths: dict[str, str], data: Path, batch: int = 64) -> dict:
    import numpy as np

    from analysis.dataset import load_image, load_sample
    from analysis.models import load_model
    from analysis.predict import predict_sample

    sample = load_sample(data).sample
    models = {k: load_model(p) for k, p in paths.items()}
    # Warm up both models (graph tracing) on one batch so neither measurement pays for it.
    predict_sample(sample.iloc[:batch], models, batch_size=batch, use_cache=False)

    forward = 0.0
    for model in models.values():
        images = np.stack([load_image(p, model.input_size) for p in sample["path"]])
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            if len(chunk) < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:], chunk.dtype)])
            t = time.perf_counter()
            model.predict_batch(chunk)
            forward += time.perf_counter() - t
    t = time.perf_counter()
    run = predict_sample(sample, models, batch_size=batch, use_cache=False)
    end_to_end = time.perf_counter() - t
    assert len(run.predictions) == len(sample)
    return {
        "images": len(sample),
        "forward_pass_s": round(forward, 2),
        "end_to_end_s": round(end_to_end, 2),
        "ratio": round(forward / end_to_end, 3),
    }


def cache_reopen(paths: dict[str, str], data: Path) -> dict:
    from analysis.dataset import load_sample
    from analysis.models import load_model
    from analysis.predict import predict_sample

    models = {k: load_model(p) for k, p in paths.items()}
    predict_sample(load_sample(data).sample, models)  # fill the cache
    t = time.perf_counter()
    sample = load_sample(data).sample
    run = predict_sample(sample, models)
    reopen = time.perf_counter() - t
    t = time.perf_counter()
    for p in paths.values():
        load_model(p)
    load = time.perf_counter() - t
    assert run.cached == {k: len(sample) for k in models}
    return {"reopen_sample_and_predictions_s": round(reopen, 3), "reload_both_model_files_s": round(load, 2)}


NAIVE = r"""
import os, sys, time, resource, numpy as np
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
from PIL import Image
import keras
paths, data = sys.argv[1].split(","), sys.argv[2]
t = time.perf_counter()
files = sorted(os.listdir(data))
results = []
for path in paths:
    model = keras.models.load_model(path)
    h, w = model.input_shape[1:3]
    X = []
    for f in files:
        img = np.array(Image.open(os.path.join(data, f)).convert("RGB").resize((w, h)))
        X.append(img / 255.0 * 255.0)  # float64 copy of every image, as in typical scripts
    X = np.array(X)
    results.append(model.predict(X, verbose=0))
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

OURS = r"""
import os, sys, time, resource
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
sys.path.insert(0, sys.argv[3])
import keras  # imported before the clock starts, as in the naive script
t = time.perf_counter()
from analysis.dataset import load_sample
from analysis.models import load_model
from analysis.predict import predict_sample
paths, data = sys.argv[1].split(","), sys.argv[2]
models = {k: load_model(p) for k, p in zip("AB", paths)}
run = predict_sample(load_sample(data).sample, models, use_cache=False)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def naive_vs_ours(paths: dict[str, str], data: Path) -> dict:
    out = {}
    for label, script in (("naive", NAIVE), ("ours", OURS)):
        result = subprocess.run(
            [sys.executable, "-c", script, ",".join(paths.values()), str(data), str(REPO)],
            capture_output=True, text=True, check=True,
        )
        seconds, rss_kb = result.stdout.strip().splitlines()[-1].split()
        out[label] = {"seconds": round(float(seconds), 1), "peak_rss_mb": round(int(rss_kb) / 1024)}
    out["speedup"] = round(out["naive"]["seconds"] / out["ours"]["seconds"], 2)
    out["memory_ratio"] = round(out["ours"]["peak_rss_mb"] / out["naive"]["peak_rss_mb"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-naive", action="store_true", help="skip the 5000-image naive comparison")
    args = parser.parse_args()
    if not UTK.is_dir():
        sys.exit(f"needs {UTK} (the UTKFace development sample)")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FACECHECK_CACHE_DIR"] = str(Path(tmp) / "cache")
        paths = model_paths(Path(tmp))
        results = {"models": paths, "throughput_test_1000": throughput(paths, UTK / "test")}
        results["cache_reopen_test_1000"] = cache_reopen(paths, UTK / "test")
        if not args.skip_naive:
            results["naive_vs_ours_train_val_5000"] = naive_vs_ours(paths, UTK / "train_val")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
