"""Tiny demo models trained on synthetic faces, small enough to commit (each well under 1 MB).

The app and its tests use them when no real model is at hand. They are trained exactly like the
real models (same code path, same self-describing format) on images from
:func:`analysis.synthetic.make_synthetic_sample`, and measured on a separate synthetic test set
drawn with another seed. Regenerate with ``python -m training demo --out models/demo``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from analysis.constants import DEFAULT_SEED
from analysis.dataset import load_sample
from analysis.synthetic import make_synthetic_sample
from training.artifacts import artifact_paths, write_text
from training.data import load_images, read_split
from training.train import default_config, train_model, validation_metrics

DEMO_IMAGE_SIZE = 64
DEMO_TRAIN_IMAGES = 800
DEMO_TEST_IMAGES = 300

DEMO_CONFIGS = {
    # A: three conv blocks, 16-32-64 channels; float32 on every CPU, so the committed models are
    # what `python -m training demo` gives anywhere (bfloat16 here: 94% on the synthetic test, not 98%).
    "A": dict(image_size=DEMO_IMAGE_SIZE, widths=(16, 32, 64), convs_per_block=1, hidden_units=32, epochs=25, batch_size=32,
              learning_rate=3e-3, augment=0.5, patience=8, age_output="linear", clean_epochs=0, precision="float32"),
    # B: the tiny randomly initialised backbone, nested and fine-tuned in the two phases.
    "B": dict(image_size=DEMO_IMAGE_SIZE, backbone="tiny", weights="none", hidden_units=32, epochs=25,
              head_epochs=4, batch_size=32, learning_rate=3e-3, fine_tune_learning_rate=2e-3,
              fine_tune_fraction=1.0, augment=0.5, patience=8, age_output="linear", clean_epochs=0),
}


def make_demo_models(out_dir, seed: int = DEFAULT_SEED, log=print) -> dict[str, dict]:
    """Train both demo models into `out_dir`; returns the metrics written per model key.

    Each metrics_<K>.json gets a "synthetic_test" section measured on the reloaded model file.
    """
    import keras

    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="facecheck-demo-") as scratch:
        train_dir = make_synthetic_sample(Path(scratch) / "train", n=DEMO_TRAIN_IMAGES, seed=seed, size=DEMO_IMAGE_SIZE)
        test_dir = make_synthetic_sample(Path(scratch) / "test", n=DEMO_TEST_IMAGES, seed=seed + 1000, size=DEMO_IMAGE_SIZE)
        split = read_split(train_dir, 0.2, seed)
        test = load_sample(test_dir).sample
        test_images = load_images(test["path"], (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE), cache=False)
        log(f"Demo data: {DEMO_TRAIN_IMAGES} synthetic faces ({split.describe()}), {len(test)} more for testing")
        results = {}
        for key, settings in DEMO_CONFIGS.items():
            config = default_config(key, seed=seed, **settings)
            result = train_model(config, split, out, cache=False, verbose=0, log=log)
            reloaded = keras.saving.load_model(result.paths["model"], safe_mode=True, compile=False)
            metrics = dict(result.metrics)
            metrics["synthetic_test"] = validation_metrics(reloaded, test_images, test)
            metrics["synthetic_data"] = {
                "train_images": DEMO_TRAIN_IMAGES, "test_images": DEMO_TEST_IMAGES, "image_size": DEMO_IMAGE_SIZE,
                "train_seed": seed, "test_seed": seed + 1000,
            }
            metrics["file"] = result.paths["model"].name
            metrics["file_bytes"] = result.paths["model"].stat().st_size
            write_text(artifact_paths(out, key)["metrics"], json.dumps(metrics, indent=2) + "\n")
            (out / f"split_{key}.csv").unlink(missing_ok=True)  # synthetic file names: not worth keeping
            results[key] = metrics
    return results
