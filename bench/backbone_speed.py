"""Training-step and prediction time of Model B with each offline backbone (dlib's face ResNet, EfficientNet-Lite0/1/2).

Builds Model B exactly as training does (`train.build_model` with the default settings, backbone
trainable as in the fine-tuning phase), on random pixels, and times one training epoch of 4000 images
(extrapolated from `--steps` batches of 32 after a warm-up) and the prediction of 1000 images
(batch 64, warm). No weights are needed: random initialisation costs the same.

    python bench/backbone_speed.py              # each backbone at its default image size
    python bench/backbone_speed.py --size 160
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from training.models import AGE_DISTRIBUTION, age_distribution_targets, set_backbone_trainable, training_view  # noqa: E402
from training.train import build_model, compile_model, default_config  # noqa: E402

TRAIN_IMAGES, BATCH = 4000, 32


def time_model(config, steps: int) -> dict:
    """Seconds for one training epoch of 4000 images and for predicting 1000, for the model
    `config` builds (Model B's backbone trainable as in the fine-tuning phase), on random pixels."""
    model, backbone = build_model(config)
    if backbone is not None:
        set_backbone_trainable(backbone, config.fine_tune_fraction)  # the fine-tuning phase
    view = training_view(model)
    compile_model(view, config, config.learning_rate, steps_per_epoch=steps, epochs=1)
    size = config.image_size
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (BATCH * steps, size, size, 3)).astype(np.float32)
    ages = rng.integers(0, 90, len(images)).astype(np.float32)
    targets = {"age": ages, "gender": rng.integers(0, 2, len(images)).astype(np.float32)}
    if AGE_DISTRIBUTION in view.output_names:
        targets[AGE_DISTRIBUTION] = age_distribution_targets(ages, config.age_label_sigma)
    warm = {k: v[: 2 * BATCH] for k, v in targets.items()}
    view.fit(images[: 2 * BATCH], warm, batch_size=BATCH, epochs=1, verbose=0)
    start = time.perf_counter()
    view.fit(images, targets, batch_size=BATCH, epochs=1, verbose=0)
    per_step = (time.perf_counter() - start) / steps
    model.predict(images[:128], batch_size=64, verbose=0)
    start = time.perf_counter()
    model.predict(images, batch_size=64, verbose=0)
    per_image = (time.perf_counter() - start) / len(images)
    return {
        "image_size": size,
        "train_seconds_per_epoch_4000": round(per_step * TRAIN_IMAGES / BATCH, 1),
        "predict_seconds_per_1000": round(per_image * 1000, 2),
        "backbone_parameters": int(backbone.count_params()) if backbone is not None else None,
    }


def measure(backbone_name: str, size: int | None, steps: int) -> dict:
    config = default_config("B", backbone=backbone_name, image_size=size, weights="none")  # None: its default
    return {"backbone": backbone_name, **time_model(config, steps)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (default: each backbone's default)")
    parser.add_argument("--steps", type=int, default=12, help="timed training batches (default 12)")
    parser.add_argument("--backbones", nargs="+", default=["dlib_face_resnet", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    args = parser.parse_args()
    for name in args.backbones:
        print(json.dumps(measure(name, args.size, args.steps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
