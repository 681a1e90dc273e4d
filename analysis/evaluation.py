"""The evaluation pipeline shared by the CLI and the app: sample → models → predictions → tables.

Each step is a plain function so the app can cache them separately; `evaluate` chains them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from analysis import metrics
from analysis.constants import DEFAULT_SEED
from analysis.dataset import SampleResult, find_training_file, photo_key
from analysis.mapping import AmbiguousOutputs
from analysis.models import (CLEAR_EVIDENCE, LoadedModel, clearly_better, age_scale_is_free, calibrate_preprocessing,
                             check_age_scale, check_gender_convention, load_model)
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
    age_scale: str | None = None
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
    with a given preprocessing, only check on them that an inferred female column is not inverted
    and how a regression age output gives years (unless given). When the outputs' names and
    shapes do not say which is age and which is gender, each reading that fits is tried on the
    labelled images and the clearly best one kept (see read_outputs_on_labels).

    Returns (LoadedModel, scores table or None when no calibration was needed).
    """
    try:
        loaded = load_model(spec.path, **spec.load_kwargs())
    except AmbiguousOutputs as exc:
        ambiguous = exc  # handled outside the except block: a failure then carries no context
    else:
        return _fit_to_labels(loaded, spec.preprocessing, lambda: calibration_batch(
            sample, loaded.input_size, n=CALIBRATION_IMAGES, seed=seed))
    return read_outputs_on_labels(ambiguous, spec.preprocessing, sample, seed)


def _fit_to_labels(loaded: LoadedModel, preprocessing: str, batch):
    """prepare_model's work once the model is loaded; `batch()` gives (images, ages, genders)."""
    if preprocessing != "auto":
        if "female_index" in loaded.user_settings and not age_scale_is_free(loaded):
            return loaded, None  # nothing left to infer
        try:
            images, ages, genders = batch()
        except ValueError:  # no decodable image: evaluate says so with the skipped list
            return loaded, None
        return check_gender_convention(check_age_scale(loaded, images, ages), images, genders), None
    return calibrate_preprocessing(loaded, *batch())


def read_outputs_on_labels(ambiguous: AmbiguousOutputs, preprocessing: str, sample: pd.DataFrame, seed: int = DEFAULT_SEED):
    """The reading of a model's outputs (which is age, which is gender) that labelled images
    clearly favour: each candidate reading is prepared as usual (preprocessing, age scale, gender
    convention) and kept only when it is clearly better than every other one on the same images
    (paired tests at p < 0.01, see models.clearly_better). Otherwise raises AmbiguousOutputs
    saying what each reading scored. A single reading (an unnamed output that may hold gender
    logits) is kept when its gender answers clearly go with the labels (_confirmed_on_labels).
    Returns (LoadedModel, scores table or None) like prepare_model."""
    # Failures raise a fresh exception: the given one holds every reading's Keras model, and the app
    # keeps a failure for the session.
    readings, ambiguous.candidates = ambiguous.candidates, ()
    if not readings:
        raise AmbiguousOutputs(ambiguous.listing, ambiguous.pairs)
    try:
        images, ages, genders = calibration_batch(sample, readings[0].input_size, n=CALIBRATION_IMAGES, seed=seed)
    except ValueError:  # no decodable image to decide with
        raise AmbiguousOutputs(ambiguous.listing, ambiguous.pairs) from None
    tried = []
    for reading in readings:
        loaded, scores = _fit_to_labels(reading, preprocessing, lambda: (images, ages, genders))
        age, p_female = loaded.predict_batch(images)
        tried.append((loaded, scores, (metrics.gender_correct(p_female, genders), np.abs(age - ages))))

    def words(loaded: LoadedModel) -> str:
        m = loaded.mapping
        return f"age '{m.output_names[m.age_output]}', gender '{m.output_names[m.gender_output]}'"

    def numbers(result) -> str:
        correct, abs_err = result[2]
        return f"gender accuracy {np.mean(correct):.3f}, age MAE {np.mean(abs_err):.2f} years"

    if len(tried) == 1:  # the only reading that fits: kept if its gender is clearly no guess
        return _confirmed_on_labels(ambiguous, tried[0], genders, words, numbers)
    ranked = sorted(tried, key=lambda r: (-np.mean(r[2][0]), np.mean(r[2][1])))
    best, others = ranked[0], ranked[1:]
    if not all(clearly_better(best[2], other[2]) for other in others):
        raise AmbiguousOutputs(
            ambiguous.listing, ambiguous.pairs,
            tried=f"Each way of reading them was tried on {len(images)} labelled images and none was clearly the best "
                  f"({CLEAR_EVIDENCE}): " + "; ".join(f"{words(r[0])}: {numbers(r)}" for r in ranked) + ".",
        ) from None
    loaded, scores, _ = best
    note = (f"outputs told apart on {len(images)} labelled images, their names and shapes did not say: {words(loaded)} "
            f"({numbers(best)}; the next best reading, {words(others[0][0])}: {numbers(others[0])}); if that is wrong, "
            "say which is which with age_output= / --age-output-a and gender_output= / --gender-output-a")
    return dataclasses.replace(loaded, notes=(*loaded.notes, note)), scores


# A reading no other competes with is kept when its gender predictions go with the labels at
# this level (one-sided Fisher exact test). Strict, because the same 64 images also chose the
# female column (either direction) and, under "auto", the preprocessing: a simulated output that
# knows nothing about gender is still kept about 2 times in 1000 (32 in 1000 with accuracy
# against 50% at 0.01).
CHANCE_ALPHA = 0.001


def _confirmed_on_labels(ambiguous: AmbiguousOutputs, result, genders, words, numbers):
    """read_outputs_on_labels for a single reading (see it): (LoadedModel, scores) when its gender
    predictions are clearly associated with the labels, else AmbiguousOutputs saying why.

    Fisher's exact test on predicted against true gender, not accuracy against 50%: on a sample
    of 44 women and 20 men an output calling everyone female is 69% "right" and knows nothing."""
    from scipy import stats

    loaded, scores, (correct, _) = result
    genders = np.asarray(genders, dtype=int)
    predicted = np.where(correct, genders, 1 - genders)
    table = [[int(np.sum((predicted == 1) & (genders == 1))), int(np.sum((predicted == 0) & (genders == 1)))],
             [int(np.sum((predicted == 1) & (genders == 0))), int(np.sum((predicted == 0) & (genders == 0)))]]
    n = len(genders)
    women = int(genders.sum())
    best_possible = stats.fisher_exact([[women, 0], [0, n - women]], alternative="greater").pvalue
    p_value = stats.fisher_exact(table, alternative="greater").pvalue
    if p_value < CHANCE_ALPHA:
        note = (f"outputs read as {words(loaded)} after checking on {n} labelled images ({numbers(result)}), as "
                "their names and shapes did not say; if that is wrong, say which is which with age_output= / "
                "--age-output-a and gender_output= / --gender-output-a")
        return dataclasses.replace(loaded, notes=(*loaded.notes, note)), scores
    said = f"Read as {words(loaded)} it gave {numbers(result)} on {n} labelled images ({women} women, {n - women} men)"
    if best_possible >= CHANCE_ALPHA:
        why = "too few of each gender to tell whether that output is gender, even if every answer were right"
    elif "female_index" in loaded.user_settings and stats.fisher_exact(table, alternative="less").pvalue < CHANCE_ALPHA:
        why = (f"its answers go clearly against the labels with the female_index you gave ({loaded.mapping.female_index}): "
               "if that output is gender, the female column is the other one")
    else:
        why = (f"its answers do not clearly go with the labels (Fisher's exact test p = {p_value:.2g}, below {CHANCE_ALPHA} "
               f"needed on these {n} images), so that output may not be gender; if it is gender but weak, name it")
        if "female_index" in loaded.user_settings:
            why += (f" — or the female_index you gave ({loaded.mapping.female_index}) is wrong, which also misleads the "
                    "choice of preprocessing")
    raise AmbiguousOutputs(ambiguous.listing, ambiguous.pairs, tried=f"{said}: {why}.") from None


def training_overlap(predictions: pd.DataFrame, models) -> dict[str, dict]:
    """{model key: {"split_file", "n_train", "n_val", "n_evaluated"}} for each model with our
    `split_<key>.csv` beside it (``python -m training`` writes it): how many of the evaluated
    images it lists as the model's training or validation images, matched by content hash or by
    photo (file name without extensions: UTKFace's aligned crop and in-the-wild file of one
    photo match) — numbers on those are not held-out. Zeros mean no such match, not proof that
    no face was seen (a resized copy under another name is not recognised). Training images the
    label check left out are not counted. Models without such a file, or with a CSV that is not
    ours (no 40-hex image_id, subsets other than train/val), are absent."""
    evaluated_photos = predictions["file_name"].map(photo_key) if "file_name" in predictions else None
    out = {}
    for key, loaded in models.items():
        path = find_training_file(loaded.path, "split") if getattr(loaded, "path", "") else None
        split = _read_split_file(path) if path is not None else None
        if split is None:
            continue

        def listed(part: pd.DataFrame) -> pd.Series:
            hit = predictions["image_id"].isin(set(part["image_id"]))
            if evaluated_photos is not None and "file_name" in part:
                photos = {k for k in part["file_name"].map(photo_key) if _names_one_photo(k)}
                hit |= evaluated_photos.isin(photos)
            return hit

        in_val = listed(split[split["subset"] == "val"])
        in_train = listed(split[(split["subset"] == "train") & ~split["left_out"]]) & ~in_val
        out[key] = {"split_file": path.name, "n_train": int(in_train.sum()), "n_val": int(in_val.sum()),
                    "n_evaluated": len(predictions)}
    return out


def _names_one_photo(key: str) -> bool:
    """A photo key (see photo_key) that stands for one photo: AGE_GENDER_RACE_TIMESTAMP with a
    timestamp of 12+ digits, as UTKFace's. "25_0_1" or "30_1_2_1" are only labels: many photos."""
    parts = key.split("_")
    return len(parts) >= 4 and parts[3].isdigit() and len(parts[3]) >= 12


def _read_split_file(path) -> pd.DataFrame | None:
    """The train/val rows of our split file (image_id: 40 hex digits; subset; optional file_name
    and left_out), or None for anything else (no such columns, other ids, no train/val row)."""
    try:
        split = pd.read_csv(path, dtype={"image_id": str, "file_name": str, "subset": str})
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    if not {"image_id", "subset"} <= set(split.columns) or split.empty:
        return None
    if not split["image_id"].str.fullmatch(r"[0-9a-f]{40}").all():
        return None
    split = split[split["subset"].isin(["train", "val"])]
    if split.empty:
        return None
    left_out = split["left_out"] if "left_out" in split else pd.Series(False, index=split.index)
    return split.assign(left_out=left_out.astype(str).str.lower().isin(["true", "1"]))


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
    tables["age_error_by_true_age"] = metrics.age_error_by_true_age(predictions, keys, n_boot=n_boot, seed=seed)
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
        raise ValueError(run.nothing_decoded(len(sample.sample)))
    tables = compute_tables(run.predictions, models.keys(), n_boot=n_boot, seed=seed)
    summary = metrics.summary(run.predictions, tuple(models), n_boot=n_boot, seed=seed, tables=tables)
    return Evaluation(sample, models, scores, run, tables, summary)
