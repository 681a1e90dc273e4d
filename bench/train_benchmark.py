"""Train Model A and/or B with the default settings on ../shared/utkface/train_val and report
validation and held-out test metrics (gender accuracy, age MAE) and training time.

    python bench/train_benchmark.py                       # both models, defaults, into models/
    python bench/train_benchmark.py --model A --set image_size=96 --no-test   # an exploration run

`--set key=value` overrides any training.train.TrainConfig field (exploration). Exploration runs
should use --no-test: settings are chosen on the validation split, test/ is only for reporting.
Each run appends one JSON line to --results (default bench/train_results.jsonl).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.dataset import load_sample  # noqa: E402
from training.data import read_split  # noqa: E402
from training.train import default_config, train_model  # noqa: E402

UTKFACE = REPO.parent / "shared" / "utkface"


def parse_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # plain string such as age_output=log


def test_metrics(model_path: Path, test_dir: Path, key: str) -> dict:
    """Metrics of the saved model file on test/, loaded and run the way the analysis app does."""
    from analysis.models import load_model
    from analysis.predict import predict_sample

    loaded = load_model(model_path)
    sample = load_sample(test_dir).sample
    run = predict_sample(sample, {key: loaded}, use_cache=False)
    table = run.predictions
    errors = table[f"age_pred_{key}"] - table["age"]
    return {
        "n": int(len(table)),
        "gender_acc": float(((table[f"p_female_{key}"] >= 0.5) == (table["gender"] == 1)).mean()),
        "age_mae": float(errors.abs().mean()),
        "age_bias": float(errors.mean()),
        "loader_notes": list(loaded.notes),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["A", "B", "both"], default="both")
    parser.add_argument("--data", type=Path, default=UTKFACE / "train_val")
    parser.add_argument("--test", type=Path, default=UTKFACE / "test")
    parser.add_argument("--out", type=Path, default=REPO / "models")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    parser.add_argument("--no-test", action="store_true", help="validation only (for exploration runs)")
    parser.add_argument("--label", default="defaults", help="name of this run in the results file")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "train_results.jsonl")
    args = parser.parse_args()

    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    overrides = dict(parse_override(text) for text in args.set)
    for key in ["A", "B"] if args.model == "both" else [args.model]:
        config = default_config(key, **overrides)
        split = read_split(args.data, config.val_split, config.seed)
        print(f"Model {key} [{args.label}]: {split.describe()}", flush=True)
        started = time.perf_counter()
        result = train_model(config, split, args.out)
        minutes = (time.perf_counter() - started) / 60
        row = {
            "label": args.label, "model": key, "overrides": overrides,
            "validation": result.metrics["validation"], "training_minutes": round(minutes, 2),
            "epochs_run": result.metrics["epochs_run"], "best_epoch": result.metrics["best_epoch"],
            "seconds_per_epoch": round(float(result.history["seconds"].median()), 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
            "config": asdict(config),
        }
        if not args.no_test:
            row["test"] = test_metrics(result.paths["model"], args.test, key)
        print(json.dumps({k: row[k] for k in row if k != "config"}), flush=True)
        with open(args.results, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
