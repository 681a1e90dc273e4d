"""The evaluation pipeline shared by the CLI and the app: sample → models → predictions → tables.

Each step is a plain function so the app can cache them separately; `evaluate` chains them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import pandas as pd

from analysis import metrics
from analysis.constants import DEFAULT_SEED
from analysis.dataset import SampleResult, find_training_file
from analysis.models import LoadedModel, calibrate_preprocessing, check_gender_convention, load_model
from analysis.predict import PredictionRun, calibration_batch, predict_sample

CALIBRATION_IMAGES = 64


@dataclass
class ModelSpec:
    """What the user said about one model: a path plus optional overrides (None = infer)."""

    path: str
    name: str | None = None
    preprocessing: str = "auto"
    age_output: str | None = None
    gender_output: str | None = None
    female_index: int | None = None
    age_kind: str | None = None
    age_class_values: tuple[float, ...] | None = None
    input_size: tuple[int, int] | None = None
    allow_unsafe: bool = False

    def load_kwargs(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "path"}


@dataclass
class Evaluation:
    sample: SampleResult
    models: dict[str, LoadedModel]
    preprocessing_scores: dict[str, pd.DataFrame]
    run: PredictionRun
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    @property
    def predictions(self) -> pd.DataFrame:
        return self.run.predictions

    @cached_property
    def training_overlap(self) -> dict[str, dict]:
        """Per model with a split file beside it, how many of the evaluated images it was trained
        or validated on (see training_overlap)."""
        return training_overlap(self.predictions, self.models)

    @property
    def skipped(self) -> pd.DataFrame:
        """Every file left out, and why: path, reason, stage ("reading": name, header, duplicate;
        "decoding": failed when decoded in full for prediction)."""
        decoding = self.run.skipped.assign(path=self.run.skipped["path"].map(self.sample.reported_path))
        return pd.concat(
            [self.sample.skipped.assign(stage="reading"), decoding.assign(stage="decoding")],
            ignore_index=True,
        )


def prepare_model(spec: ModelSpec, sample: pd.DataFrame, *, seed: int = DEFAULT_SEED):
    """Load a model and, when its preprocessing is "auto", calibrate it on labelled sample images;
    with a given preprocessing, only check on them that an inferred female column is not inverted.

    Returns (LoadedModel, scores table or None when no calibration was needed).
    """
    loaded = load_model(spec.path, **spec.load_kwargs())
    if spec.preprocessing != "auto":
        if spec.female_index is not None:
            return loaded, None  # nothing left to infer
        try:
            images, _, genders = calibration_batch(sample, loaded.input_size, n=CALIBRATION_IMAGES, seed=seed)
        except ValueError:  # no decodable image: evaluate says so with the skipped list
            return loaded, None
        return check_gender_convention(loaded, images, genders), None
    images, ages, genders = calibration_batch(sample, loaded.input_size, n=CALIBRATION_IMAGES, seed=seed)
    return calibrate_preprocessing(loaded, images, ages, genders)


def training_overlap(predictions: pd.DataFrame, models) -> dict[str, dict]:
    """{model key: {"split_file", "n_train", "n_val", "n_evaluated"}} for each model with a
    `split_<key>.csv` beside it (``python -m training`` writes it): how many of the evaluated
    images (matched by content hash) it lists as the model's training or validation images —
    numbers on those are not held-out; zeros confirm the sample is held-out for that model.
    Training images the label check left out are not counted. Models without such a file are absent."""
    evaluated = set(predictions["image_id"])
    out = {}
    for key, loaded in models.items():
        path = find_training_file(loaded.path, "split") if getattr(loaded, "path", "") else None
        if path is None:
            continue
        try:
            split = pd.read_csv(path, dtype={"image_id": str})
            used = split[split["image_id"].isin(evaluated)]
            trained = (used["subset"] == "train") & ~used.get("left_out", pd.Series(False, index=used.index)).astype(bool)
            n_train, n_val = int(trained.sum()), int((used["subset"] == "val").sum())
        except (OSError, ValueError, KeyError, pd.errors.ParserError):
            continue  # not our split file: nothing to say
        out[key] = {"split_file": path.name, "n_train": n_train, "n_val": n_val, "n_evaluated": len(evaluated)}
    return out


def compute_tables(predictions: pd.DataFrame, model_keys, *, n_boot: int = 1000, seed: int = DEFAULT_SEED):
    """Every metric table of the report, computed from one Predictions table."""
    keys = tuple(model_keys)
    tables: dict[str, pd.DataFrame] = {}
    tables["slices"] = metrics.slice_table(predictions, keys, n_boot=n_boot, seed=seed)
    tables["gaps"] = metrics.gaps_table(tables["slices"])
    if len(keys) == 2:
        tables["comparison"] = metrics.compare_table(predictions, keys[0], keys[1], n_boot=n_boot, seed=seed)
    tables["calibration"] = pd.concat(
        [metrics.calibration_table(predictions, key).assign(model=key) for key in keys], ignore_index=True
    )
    tables["age_error_by_true_age"] = metrics.age_error_by_true_age(predictions, keys)
    for key in keys:
        tables[f"worst_age_{key}"] = metrics.worst_errors(predictions, "age", model=key, k=50)
        tables[f"worst_gender_{key}"] = metrics.worst_errors(predictions, "gender", model=key, k=50)
    tables["contradicted_labels"] = metrics.contradicted_labels(predictions, keys)
    if len(keys) == 2:
        tables["worst_disagreement"] = metrics.worst_errors(predictions, "disagreement", model=keys[0], k=50)
    return tables


def evaluate(
    sample: SampleResult,
    specs: dict[str, ModelSpec],
    *,
    n_boot: int = 1000,
    seed: int = DEFAULT_SEED,
    batch_size: int = 64,
    use_cache: bool = True,
    progress=None,
) -> Evaluation:
    """Run the whole pipeline for one or two models on a loaded sample."""
    models, scores = {}, {}
    for key, spec in specs.items():
        models[key], scores[key] = prepare_model(spec, sample.sample, seed=seed)
    run = predict_sample(sample.sample, models, batch_size=batch_size, use_cache=use_cache, progress=progress)
    if run.predictions.empty:
        raise ValueError("no image of the sample could be decoded; see the skipped list")
    tables = compute_tables(run.predictions, models.keys(), n_boot=n_boot, seed=seed)
    summary = metrics.summary(run.predictions, tuple(models), n_boot=n_boot, seed=seed, tables=tables)
    return Evaluation(sample, models, scores, run, tables, summary)
