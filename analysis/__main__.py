"""Command line: the whole evaluation without a browser.

    python -m analysis evaluate --model-a A.keras --model-b B.keras --data DIR_OR_ZIP --out DIR
    python -m analysis demo --out demo_report
    python -m analysis inspect MODEL.keras
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from analysis.constants import AGE_BAND_EDGES, DEFAULT_SEED  # noqa: E402

# The preset names, without importing TensorFlow just to print --help.
PRESETS = ("rgb_0_255", "rgb_0_1", "rgb_-1_1", "bgr_0_255", "bgr_0_1", "bgr_-1_1", "bgr_caffe", "rgb_torch")

REPO = Path(__file__).resolve().parents[1]
DEMO_MODELS = REPO / "models" / "demo"
DEMO_SAMPLE_SIZE = 300

EPILOG = """
Data: a folder (searched recursively) or .zip of face images named like UTKFace,
AGE_GENDER_RACE_DATETIME.jpg[.chip.jpg] (gender 0 male / 1 female; race 0-4 White, Black,
Asian, Indian, Others). Files that do not parse or decode are listed in skipped.csv.

Models: .keras or .h5 files with an age output and a gender output. Input size, colour order,
scaling and the output mapping are inferred; preprocessing "auto" tries every preset on 64
labelled images and keeps the best (scores in models.json). Override anything per model with
the -a / -b options, e.g. --preprocessing-b bgr_0_255 --gender-output-b 0 --female-index-b 0.
"""


def _add_model_options(parser: argparse.ArgumentParser, key: str, required: bool, with_path: bool = True) -> None:
    k = key.lower()
    group = parser.add_argument_group(f"model {key}" if with_path else "how to read the model (as for model A of evaluate)")
    if with_path:
        group.add_argument(f"--model-{k}", required=required, metavar="PATH", help=f"model {key} file (.keras or .h5)")
    group.add_argument(f"--name-{k}", metavar="NAME", help="display name (default: file name)")
    group.add_argument(
        f"--preprocessing-{k}",
        default="auto",
        metavar="PRESET",
        help="auto (default) or one of: " + ", ".join(PRESETS),
    )
    group.add_argument(f"--age-output-{k}", metavar="NAME|INDEX", help="which output is age")
    group.add_argument(f"--gender-output-{k}", metavar="NAME|INDEX", help="which output is gender")
    group.add_argument(
        f"--female-index-{k}", type=int, choices=(0, 1), help="gender class meaning female (default 1)"
    )
    group.add_argument(
        f"--age-classes-{k}",
        metavar="VALUES",
        help="age head is a softmax over classes with these ages: 'START:STOP' (e.g. 0:101) or a comma list",
    )
    group.add_argument(
        f"--age-scale-{k}",
        metavar="SCALE",
        help="how a 1-unit age output gives years: years, log (log-years), or a multiplier N / xN, e.g. 100 or "
             "116 when it predicts age/100 or age/116 (any N > 0: 80, x90); default: chosen on labelled images of "
             "the sample",
    )
    group.add_argument(f"--input-size-{k}", metavar="HxW", help="input size when the model does not fix it, e.g. 128 or 128x96")


def _age_band_edges(text: str) -> tuple[int, ...]:
    """--age-bands "0,20,40,60" → (0, 20, 40, 60), refused at once if not usable."""
    from analysis.constants import check_age_band_edges

    try:
        return check_age_band_edges([v.strip() for v in text.split(",")])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _at_least(minimum: int):
    """An argparse type: an integer of at least `minimum`, refused at once otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Evaluate and compare age + gender face models on a labelled UTKFace-style sample.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate one or two models and write the report folder",
        description="Evaluate model A (and optionally B) on a sample; write tables, summary.json and provenance.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_options(evaluate, "A", required=True)
    _add_model_options(evaluate, "B", required=False)
    evaluate.add_argument("--data", required=True, metavar="DIR_OR_ZIP", help="labelled sample: folder or .zip")
    _add_run_options(evaluate)

    demo = commands.add_parser(
        "demo",
        help="evaluate the built-in demo models on a generated synthetic sample",
        description="Generate a synthetic face sample and evaluate the tiny demo models on it (no data needed).",
    )
    demo.add_argument("--n", type=int, default=DEMO_SAMPLE_SIZE, help=f"synthetic images (default {DEMO_SAMPLE_SIZE})")
    _add_run_options(demo, default_out="demo_report")

    inspect = commands.add_parser(
        "inspect",
        help="show what the loader infers about a model file",
        description="Load a model safely and print its input size, preprocessing and output mapping.",
    )
    inspect.add_argument("model", metavar="PATH", help="a Keras model file (.keras or .h5)")
    inspect.add_argument("--allow-unsafe-model", action="store_true", help=argparse.SUPPRESS)
    # The evaluate options of model A, to check that an override makes a model load before a full run
    # (preprocessing and an age scale are chosen on labelled images, which inspect does not read).
    _add_model_options(inspect, "A", required=False, with_path=False)
    return parser


def _add_run_options(parser: argparse.ArgumentParser, default_out: str | None = None) -> None:
    group = parser.add_argument_group("run")
    group.add_argument(
        "--out", required=default_out is None, default=default_out, metavar="DIR",
        help="report folder to create (must be new, empty, or an earlier report with --overwrite)"
        + (f"; default ./{default_out}" if default_out else ""),
    )
    group.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    group.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples for the age CIs and the lower end of the ECE interval (default 1000; 0: none; "
                            "gender accuracy CIs are Wilson intervals)")
    group.add_argument("--seed", type=_at_least(0), default=DEFAULT_SEED, help="seed for bootstrap and calibration (default 0)")
    group.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    group.add_argument(
        "--age-bands", default=AGE_BAND_EDGES, type=_age_band_edges, metavar="EDGES",
        help=f"left edges of the age bands, starting at 0 (default {','.join(map(str, AGE_BAND_EDGES))} → 0–2, 3–9, ..., 70+)",
    )
    group.add_argument("--no-cache", action="store_true", help="do not read or write the prediction cache")
    group.add_argument("--no-gradcam", action="store_true", help="skip the Grad-CAM grids of the worst faces")
    group.add_argument("--gradcam-n", type=_at_least(1), default=8, metavar="N", help="worst faces per Grad-CAM grid (default 8)")
    group.add_argument(
        "--allow-unsafe-model", action="store_true",
        help="load models that contain Lambda layers (this RUNS CODE stored in the file: only for files you trust)",
    )
    group.add_argument("--quiet", action="store_true", help="no progress bar or summary: print only the report folder")


def _parse_size(text: str | None):
    if not text:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"input size must look like 128 or 128x96, got {text!r}") from None
    if len(numbers) == 1:
        numbers *= 2
    if len(numbers) != 2 or min(numbers) < 8:
        raise ValueError(f"input size must look like 128 or 128x96, got {text!r}")
    return tuple(numbers)


def _parse_age_classes(text: str | None):
    if not text:
        return None
    try:
        if ":" in text:
            start, stop = (int(v) for v in text.split(":"))
            return tuple(float(v) for v in range(start, stop))
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--age-classes takes 'START:STOP' or a comma list of ages, got {text!r}") from None


def _parse_output(text: str | None):
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def _spec(args, key: str, path=None):
    from analysis.evaluation import ModelSpec

    k = key.lower()
    path = getattr(args, f"model_{k}") if path is None else path
    if path is None:
        return None
    return ModelSpec(
        path=path,
        name=getattr(args, f"name_{k}"),
        preprocessing=getattr(args, f"preprocessing_{k}"),
        age_output=_parse_output(getattr(args, f"age_output_{k}")),
        gender_output=_parse_output(getattr(args, f"gender_output_{k}")),
        female_index=getattr(args, f"female_index_{k}"),
        age_class_values=_parse_age_classes(getattr(args, f"age_classes_{k}")),
        age_scale=getattr(args, f"age_scale_{k}"),
        input_size=_parse_size(getattr(args, f"input_size_{k}")),
        allow_unsafe=args.allow_unsafe_model,
    )


def demo_specs():
    """ModelSpecs for the committed demo models (trained by training/ on synthetic faces)."""
    from analysis.evaluation import ModelSpec

    paths = {key: DEMO_MODELS / f"age_gender_{key}.keras" for key in ("A", "B")}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise ValueError(f"demo models are missing: {', '.join(missing)} (regenerate: python -m training demo)")
    return {key: ModelSpec(path=str(path), name=f"demo {key}") for key, path in paths.items()}


def demo_sample_dir(n: int = DEMO_SAMPLE_SIZE) -> Path:
    """The synthetic demo sample, generated once into the cache folder."""
    from analysis.dataset import default_cache_dir
    from analysis.synthetic import make_synthetic_sample

    folder = default_cache_dir() / f"demo_sample_{n}"
    done = folder / ".complete"
    if not done.exists():
        make_synthetic_sample(folder, n=n, seed=2026, size=96)
        done.touch()
    return folder


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with the process's stderr muted, hiding its C++ start-up banner.

    TF 2.21 logs the oneDNN notice from native code before TF_CPP_MIN_LOG_LEVEL is read; only
    the import is muted, so every later warning or error still reaches the user.
    """
    try:
        saved = os.dup(2)
    except OSError:
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import_tensorflow_quietly()
    if args.command == "inspect":
        return _inspect(args)

    from analysis.dataset import SampleError, load_sample
    from analysis.evaluation import evaluate
    from analysis.report import check_output_folder, report_notes, write_bundle

    check_output_folder(args.out, overwrite=args.overwrite)
    edges = args.age_bands
    if args.command == "demo":
        data, specs = demo_sample_dir(args.n), demo_specs()
    else:
        data = args.data
        specs = {key: spec for key in ("A", "B") if (spec := _spec(args, key)) is not None}
    if args.command == "evaluate" and _inside(Path(args.out), Path(data)):
        raise SampleError(f"--out {args.out} lies inside --data {data}: the report's own images would be read as "
                          "part of the sample next time; choose a report folder outside the data")
    if len(specs) == 2 and _same_file(specs["A"].path, specs["B"].path):
        _say(args, "warning: --model-a and --model-b are the same file: every difference will be zero")
    specs = _told_apart(specs)
    for key, spec in specs.items():  # before a long scan of the sample
        if not Path(spec.path).expanduser().exists():  # a folder (e.g. a SavedModel): the loader says what to do
            raise SampleError(f"--model-{key.lower()} {spec.path}: model file not found")
    sample = load_sample(data, age_band_edges=edges)
    n = len(sample.sample)
    _say(args, f"Sample: {n} labelled image{'s' if n != 1 else ''} found in {data}"
               + (f" ({len(sample.skipped)} files skipped; see skipped.csv)" if len(sample.skipped) else ""))
    progress = None if args.quiet else _progress_bar()
    evaluation = evaluate(
        sample, specs, n_boot=args.bootstrap, seed=args.seed, batch_size=args.batch_size,
        use_cache=not args.no_cache, progress=progress,
    )
    if progress is not None:
        progress.close()
    written = write_bundle(
        evaluation, args.out, overwrite=args.overwrite, seed=args.seed, n_boot=args.bootstrap,
        gradcam=not args.no_gradcam, gradcam_n=args.gradcam_n,
    )
    if args.quiet:
        print(Path(args.out).resolve())
    else:
        print(format_summary(evaluation))
        for note in report_notes(args.out):  # e.g. a model without Grad-CAM: not only in the README
            if note.startswith("Grad-CAM") and "not requested" not in note:
                print(f"note: {note}")
        print(f"\nWrote {len(written)} files to {Path(args.out).resolve()}")
    return 0


def _told_apart(specs: dict) -> dict:
    """Two unnamed models whose files have the same name (runs/1/age_gender_B.keras against
    runs/2/age_gender_B.keras) are named with the fewest folders that tell them apart ("1/age_gender_B"),
    or by their file names when only the extension differs; else the report calls both "age_gender_B"."""
    import dataclasses

    if len(specs) != 2 or any(spec.name for spec in specs.values()):
        return specs
    paths = {key: Path(spec.path).expanduser().resolve() for key, spec in specs.items()}
    if len({p.stem for p in paths.values()}) != 1 or len(set(paths.values())) != 2:
        return specs
    if len({p.name for p in paths.values()}) == 2:  # runs/age_gender_B.keras against runs/age_gender_B.h5
        return {key: dataclasses.replace(spec, name=paths[key].name) for key, spec in specs.items()}
    for depth in range(1, max(len(p.parts) for p in paths.values())):  # the fewest folders that tell them apart
        names = {key: "/".join([*p.parent.parts[1:][-depth:], p.stem]) for key, p in paths.items()}  # not the root "/"
        if len(set(names.values())) == 2:
            return {key: dataclasses.replace(spec, name=names[key]) for key, spec in specs.items()}
    return specs


def _same_file(a, b) -> bool:
    """Byte-identical model files (hashed only when their sizes agree: the loader hashes them again)."""
    from analysis.dataset import file_digest

    try:
        a, b = Path(a), Path(b)
        return (a.is_file() and b.is_file() and a.stat().st_size == b.stat().st_size
                and file_digest(a) == file_digest(b))
    except OSError:
        return False  # the loader reports unreadable files itself


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.expanduser().resolve(), folder.expanduser().resolve()
    return folder.is_dir() and (path == folder or folder in path.parents)


def _inspect(args) -> int:
    import json

    from analysis.models import load_model
    from analysis.report import to_jsonable

    loaded = load_model(args.model, **_spec(args, "A", path=args.model).load_kwargs())
    print(json.dumps(to_jsonable(loaded.describe()), indent=2, ensure_ascii=False))
    return 0


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr)


class _progress_bar:
    """A tqdm bar driven by predict_sample's progress(done, total) callback."""

    def __init__(self):
        self._bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=total, desc="Predicting", unit="img", file=sys.stderr)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _interval(lo, hi, spec: str) -> str:
    """"(lo–hi)", or "(no CI)" where there is none (too few images for one)."""
    if not all(math.isfinite(v) for v in (lo, hi)):
        return "(no CI)"
    return f"({lo:{spec}}–{hi:{spec}})"


def format_summary(evaluation) -> str:
    """A few readable lines: headline numbers per model with CIs, B − A if two models, the gender
    labels the models contradict, the largest gaps between groups."""
    from analysis.report import (comparison_sentence, held_out_text, label_check_text, model_reading, notes_to_read,
                                 training_overlap_lines)

    slices = evaluation.tables["slices"]
    overall = slices[slices["slice_by"] == "overall"]
    n_evaluated, n_undecodable = int(overall["n"].iloc[0]), len(evaluation.run.skipped)
    lines = ["", f"Evaluated on {n_evaluated} image{'s' if n_evaluated != 1 else ''}"
             + (f" ({n_undecodable} more could not be decoded and were left out; see skipped.csv)" if n_undecodable else "") + ":",
             f"{'model':<28} {'gender accuracy (95% CI)':<28} {'age MAE, years (95% CI)':<26} age bias"]
    for row in overall.itertuples():
        name = f"{row.model}: {evaluation.models[row.model].name}"
        name = name if len(name) <= 27 else name[:26] + "…"
        acc = f"{row.gender_acc:.1%} {_interval(row.gender_acc_lo, row.gender_acc_hi, '.1%')}"
        mae = f"{row.age_mae:.2f} {_interval(row.age_mae_lo, row.age_mae_hi, '.2f')}"
        lines.append(f"{name:<28} {acc:<28} {mae:<26} {row.age_bias:+.2f}")
    comparison = comparison_sentence(evaluation)
    if comparison:
        lines.append("\n" + comparison)
    lines.append("\nHow each model was read (all of it in models.json):")
    for key, loaded in evaluation.models.items():
        lines.append(f"  {key}: {model_reading(loaded, evaluation.preprocessing_scores.get(key) is not None)}")
        lines += [f"     note: {note}" for note in notes_to_read(loaded)]
    for text in training_overlap_lines(evaluation.training_overlap):
        lines.append("\nwarning: " + text)
    held_out = held_out_text(evaluation.training_overlap)
    if held_out:
        lines.append("\n" + held_out)
    check = label_check_text(evaluation.summary["label_check"], "in tables/contradicted_labels.csv")
    if check:
        lines.append("\n" + check)
    lines += _gap_lines(evaluation)
    return "\n".join(lines)


_GAP_WORDS = {"gender_acc": ("gender accuracy", ".1%", "points"), "age_mae": ("age MAE", ".2f", "years")}


def _gap_lines(evaluation) -> list[str]:
    """Gender-accuracy and age-MAE gaps by age band, gender and ethnicity (tables/gaps.csv has
    the intersections and the bias too), saying how many small groups were left out."""
    gaps = evaluation.tables.get("gaps")
    if gaps is None or gaps.empty:
        return []
    gaps = gaps[~gaps["slice_by"].str.contains("×") & gaps["metric"].isin(list(_GAP_WORDS))]
    if gaps.empty:
        return []
    lines = [f"\nLargest gaps between groups (groups with n ≥ {int(gaps['min_n'].iloc[0])}; all in tables/gaps.csv):"]
    for row in gaps.itertuples():
        words, fmt, unit = _GAP_WORDS[row.metric]
        size = row.gap * 100 if unit == "points" else row.gap
        excluded = f"; {row.n_excluded} smaller group{'s' if row.n_excluded != 1 else ''} left out" if row.n_excluded else ""
        lines.append(
            f"  {row.model} {words} by {row.slice_by.replace('_', ' ')}: {size:.{1 if unit == 'points' else 2}f} {unit} "
            f"(worst {row.worst_slice} {row.worst_value:{fmt}}, best {row.best_slice} {row.best_value:{fmt}}{excluded})"
        )
    return lines


def main(argv=None) -> int:
    from analysis.dataset import SampleError

    try:
        return run(argv)
    except (SampleError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
