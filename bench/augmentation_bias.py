"""How much a trained model's predictions depend on its own augmentation layers.

For the training images of a model written by `python -m training` (its split_K.csv says which),
predict clean images, then images passed through one augmentation layer at a time (in training
mode), then through all of them; print gender accuracy, age MAE and mean signed age error.
A model that is only right on augmented images shows a bias on clean ones (see BENCHMARKS.md,
"What we learned"; this is why training ends with clean epochs).

    python bench/augmentation_bias.py models/age_gender_A.keras --data ../shared/utkface/train_val
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from training.data import load_images  # noqa: E402
from training.models import augmentation_layers  # noqa: E402
from training.train import validation_metrics  # noqa: E402


def scores(model, images, table) -> str:
    metrics = validation_metrics(model, images, table)
    return f"gender {metrics['gender_acc']:.3f}  MAE {metrics['age_mae']:.2f}  bias {metrics['age_bias']:+.2f}"


def augmented(layers, images, batch: int = 256) -> np.ndarray:
    out = images
    for layer in layers:
        out = np.concatenate([np.asarray(layer(out[i : i + batch], training=True)) for i in range(0, len(out), batch)])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="age_gender_K.keras written by python -m training (split_K.csv beside it)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "utkface" / "train_val", help="the folder it was trained on")
    parser.add_argument("--subset", choices=["train", "val"], default="train")
    parser.add_argument("--every", type=int, default=2, help="use every k-th image (default 2)")
    args = parser.parse_args(argv)

    import keras

    model = keras.saving.load_model(args.model, safe_mode=True, compile=False)
    key = args.model.stem.rsplit("_", 1)[-1]
    split = pd.read_csv(args.model.with_name(f"split_{key}.csv"))
    table = split[split["subset"] == args.subset].iloc[:: args.every]
    images = load_images([args.data / name for name in table["file_name"]], model.input_shape[1:3], cache=False).astype(np.float32)
    layers = augmentation_layers(model)
    print(f"{args.model.name}: {len(table)} {args.subset} images")
    print(f"  {'clean':<18} {scores(model, images, table)}")
    for layer in layers:
        print(f"  {layer.name:<18} {scores(model, augmented([layer], images), table)}")
    if layers:
        print(f"  {'all augmentation':<18} {scores(model, augmented(layers, images), table)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
