"""Training and prediction time in float32 and in mixed bfloat16, for Model A and Model B.

Model A is timed as training builds it (`--precision float32|bfloat16`: only its convolutional
trunk computes in bfloat16). Model B cannot train in bfloat16 through `python -m training`
(it is slower); here it is timed under Keras' global "mixed_bfloat16" policy, the way a Keras
user would switch it on, to back that choice. Same timing as bench/backbone_speed.py (random
pixels, 4000-image epoch extrapolated from `--steps` batches of 32 after a warm-up).

    python bench/precision_speed.py
"""

from __future__ import annotations

import argparse
import json
import sys

from backbone_speed import time_model

import keras  # noqa: E402  (after backbone_speed has set up the path and TF logging)

from training.train import cpu_has_bfloat16, default_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="timed training batches (default 12)")
    parser.add_argument("--models", nargs="+", default=["A", "B"], choices=["A", "B"])
    args = parser.parse_args()
    print(json.dumps({"cpu_has_bfloat16": cpu_has_bfloat16()}), flush=True)
    for key in args.models:
        for precision in ("float32", "bfloat16"):
            if key == "A":
                config = default_config("A", precision=precision)
            else:
                config = default_config("B", weights="none")
                keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
            try:
                print(json.dumps({"model": key, "precision": precision, **time_model(config, args.steps)}), flush=True)
            finally:
                keras.mixed_precision.set_global_policy("float32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
