"""How long the dashboard takes to redraw after a filter change, on a 5000-image sample.

    python bench/app_benchmark.py [--sample ../shared/utkface/train_val] [--repeats 5] [--json out.json]

The app runs headlessly under streamlit.testing.v1.AppTest (the same script run a browser triggers,
minus the network and the browser's own drawing). The first runs load the demo models, predict
the sample (with an empty prediction cache unless --cache-dir says otherwise) and compute every
table with 1000 bootstrap resamples; every later run must only redraw from the caches. A filter
change is timed as one full script run after setting one widget, including Streamlit's clean-up
after the run. Target: ≤ 0.3 s. Without ../shared/utkface the sample is 5000 synthetic faces.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_SAMPLE = REPO.parent / "shared" / "utkface" / "train_val"
TARGET_SECONDS = 0.3

# (page, widget kind, widget key, values cycled through) — one timed rerun per value.
FILTER_CHANGES = [
    ("views/slices.py", "button_group", "slice_by", ["gender", "ethnicity", "age_band×gender", "gender×ethnicity", "age_band×ethnicity"]),
    ("views/slices.py", "button_group", "heatmap_metric", ["gender_acc", "age_mae"]),  # enabled for intersections
    ("views/slices.py", "toggle", "hide_small", [True, False]),
    ("views/slices.py", "button_group", "slice_by", ["age_band"]),
    ("views/errors.py", "button_group", "error_kind", ["gender", "both_wrong", "disagree", "age"]),
    ("views/errors.py", "selectbox", "error_slice", ["gender=female", "ethnicity=Asian", "all"]),
    ("views/errors.py", "slider", "error_min", [10, 30, 0]),
]


def sample_folder(path: Path) -> Path:
    if path.is_dir():
        return path
    from analysis.synthetic import make_synthetic_sample

    folder = Path(tempfile.gettempdir()) / "facecheck_bench_synthetic_5000"
    if not (folder / ".complete").exists():
        print(f"{path} not found: generating 5000 synthetic faces in {folder}", file=sys.stderr)
        make_synthetic_sample(folder, n=5000, seed=11, size=96)
        (folder / ".complete").touch()
    return folder


def timed_run(at) -> float:
    start = time.perf_counter()
    at.run()
    elapsed = time.perf_counter() - start
    if at.exception:
        raise RuntimeError(at.exception[0].value)
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="folder of labelled images (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over every filter change (default 3)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--cache-dir", type=Path,
        help="facecheck cache folder (default: a fresh temporary one, so the cold numbers include predicting)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="facecheck-bench-cache-"))
    os.environ["FACECHECK_CACHE_DIR"] = str(cache_dir)

    import analysis.predict
    from streamlit.testing.v1 import AppTest

    calls = []
    real_predict = analysis.predict.predict_sample
    analysis.predict.predict_sample = lambda *a, **k: calls.append(1) or real_predict(*a, **k)

    folder = sample_folder(args.sample)
    at = AppTest.from_file(str(REPO / "app" / "streamlit_app.py"), default_timeout=1800)
    cold = {"open the demo": timed_run(at)}
    at.text_input(key="sample_path_0").input(str(folder))
    cold["load the 5000-image sample, predict, compute tables"] = timed_run(at)
    n_images = at.session_state["current"].evaluation.predictions.shape[0]
    for page in ("views/slices.py", "views/errors.py", "views/export.py"):
        at.switch_page(page)
        cold[f"first view of {page} (charts, Grad-CAM, figure list)"] = timed_run(at)
    predictions_before = len(calls)

    results: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for page, kind, key, values in FILTER_CHANGES:
            at.switch_page(page)
            timed_run(at)
            for value in values:
                getattr(at, kind)(key=key).set_value(value)
                seconds = timed_run(at)
                results.setdefault(f"{page.split('/')[1][:-3]}: {key}", []).append(seconds)
    if len(calls) != predictions_before:
        raise RuntimeError("a filter change ran a model again")

    # The first pass over the Errors filters computes Grad-CAM for cases not seen before; later
    # passes find them cached. Report both.
    every = [s for values in results.values() for s in values]
    summary = {
        "n_images": int(n_images),
        "cold_seconds": {k: round(v, 2) for k, v in cold.items()},
        "filter_change_seconds": {
            k: {"median": round(statistics.median(v), 3), "max": round(max(v), 3), "runs": len(v)} for k, v in results.items()
        },
        "all_filter_changes": {
            "median": round(statistics.median(every), 3),
            "p90": round(sorted(every)[int(0.9 * (len(every) - 1))], 3),
            "max": round(max(every), 3),
            "runs": len(every),
        },
        "target_seconds": TARGET_SECONDS,
        "models_run_during_filter_changes": len(calls) - predictions_before,
    }
    print(f"Sample: {n_images} images from {folder}")
    for name, seconds in summary["cold_seconds"].items():
        print(f"  cold  {name:<55} {seconds:8.2f} s")
    for name, stats in summary["filter_change_seconds"].items():
        print(f"  warm  {name:<55} median {stats['median']:.3f} s  max {stats['max']:.3f} s  ({stats['runs']} runs)")
    overall = summary["all_filter_changes"]
    verdict = "meets" if overall["median"] <= TARGET_SECONDS else "misses"
    print(f"Filter change → redraw: median {overall['median']:.3f} s, p90 {overall['p90']:.3f} s, max {overall['max']:.3f} s "
          f"over {overall['runs']} changes ({verdict} the {TARGET_SECONDS} s target); models run: {summary['models_run_during_filter_changes']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
