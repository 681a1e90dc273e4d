"""Metric tables computed from a Predictions table (wide: one row per image).

Input columns: the Sample columns (`age` years, `gender` 0 male / 1 female, `ethnicity` 0..4,
`age_band` ordered Categorical) plus, per model key m, `age_pred_<m>` (years) and `p_female_<m>`
(probability in [0, 1]). Derived per image: `gender_pred = p_female >= 0.5`,
`age_err = age_pred - age` (signed, years), `abs_age_err = |age_err|`.

Everything else is derived from one tidy table, in the spirit of fairlearn's MetricFrame:

    slice_table     overall + per slice (single attributes and pairwise intersections), long by
                    model: n, gender_acc (Wilson CI), age_mae, age_bias (bootstrap CIs)
    compare_table   paired A vs B per slice: deltas, exact McNemar, paired bootstrap CI, Wilcoxon
    gaps_table      worst minus best group of each slicing, FROM slice_table
    worst_slices    the k worst groups of one metric, FROM slice_table
    calibration_table / expected_calibration_error   P(female) against the observed female fraction
    age_error_by_true_age, worst_errors, summary
    contradicted_labels   gender labels every model contradicts with high confidence (likely
                    wrong labels: UTKFace has some), and in `summary` what they would change

Metric directions: gender_acc higher is better, age_mae lower is better, age_bias closer to 0 is
better (positive = the model guesses too old).
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Iterable, Mapping
from itertools import product

import numpy as np
import pandas as pd
from scipy import stats

from analysis.constants import DEFAULT_SEED, ETHNICITIES, GENDERS, MODEL_KEYS, SMALL_SLICE_N

SLICE_ATTRIBUTES: tuple[str, ...] = ("age_band", "gender", "ethnicity")
INTERSECTION = "×"  # joins attribute names in `slice_by` ("age_band×gender")
LABEL_JOIN = " × "  # joins group labels in `slice` ("20–29 × female")
DEFAULT_SLICES: tuple[str, ...] = (
    "overall",
    "age_band",
    "gender",
    "ethnicity",
    "age_band×gender",
    "age_band×ethnicity",
    "gender×ethnicity",
)
GAP_METRICS: tuple[str, ...] = ("gender_acc", "age_mae", "age_bias")
WORST_ERROR_KINDS: tuple[str, ...] = ("age", "gender", "disagreement", "disagreement_gender", "disagreement_age")

SLICE_ID_COLUMNS = ["slice_by", "slice", "slice_1", "slice_2"]
SLICE_TABLE_COLUMNS = SLICE_ID_COLUMNS + [
    "model", "n",
    "gender_acc", "gender_acc_lo", "gender_acc_hi",
    "age_mae", "age_mae_lo", "age_mae_hi",
    "age_bias", "age_bias_lo", "age_bias_hi",
    "small",
]  # fmt: skip
GAPS_TABLE_COLUMNS = [
    "model", "slice_by", "metric", "gap", "best_slice", "best_value", "worst_slice", "worst_value",
    "n_groups", "n_excluded", "min_n",
]  # fmt: skip
CALIBRATION_COLUMNS = ["bin", "lo", "hi", "n", "mean_p_female", "frac_female", "frac_female_lo", "frac_female_hi", "small"]
AGE_ERROR_COLUMNS = ["model", "age_lo", "age_hi", "n", "age_mae", "age_mae_lo", "age_mae_hi",
                     "age_bias", "age_bias_lo", "age_bias_hi", "small"]

# A gender label that every model contradicts at least this confidently is a candidate for a
# wrong label. On UTKFace's test/ sample all 10 labels that both of our trained models contradicted
# at 0.95 were visibly wrong (women labelled male, bearded men labelled female; BENCHMARKS.md).
LABEL_CHECK_CONFIDENCE = 0.95

# Indices in one (resamples x rows) block of the bootstrap; bounds memory (~8 MB of int32 each).
_BOOTSTRAP_BLOCK = 2_000_000


# ---------------------------------------------------------------- input checks


def detect_models(preds: pd.DataFrame) -> tuple[str, ...]:
    """Model keys with both `age_pred_<m>` and `p_female_<m>` columns; "A", "B" first."""
    ages = [str(c)[len("age_pred_"):] for c in preds.columns if str(c).startswith("age_pred_")]
    genders = [str(c)[len("p_female_"):] for c in preds.columns if str(c).startswith("p_female_")]
    half = [f"age_pred_{k}" for k in genders if k not in ages] + [f"p_female_{k}" for k in ages if k not in genders]
    if half:
        raise ValueError(
            f"missing column(s) {half}: a model needs both age_pred_<model> and p_female_<model> "
            "(drop the other column to leave that model out)"
        )
    keys = ages
    ordered = [k for k in MODEL_KEYS if k in keys] + [k for k in keys if k not in MODEL_KEYS]
    if not ordered:
        raise ValueError(
            "no model predictions found: expected columns age_pred_<model> and p_female_<model> "
            f"(e.g. age_pred_A, p_female_A); columns present: {list(preds.columns)}"
        )
    return tuple(ordered)


def check_predictions(
    preds, models=None, *, needs: Iterable[str] = ("age", "gender"), allow_empty: bool = False
) -> tuple[str, ...]:
    """Validate a Predictions table and return the model keys to use.

    `models`: None (all models present), one key, or a sequence of keys. `needs`: the Sample
    columns the caller uses. `allow_empty`: accept a table without rows (for row-wise helpers;
    a metric of no images is an error). Raises ValueError saying what is wrong and what to do.
    """
    if not isinstance(preds, pd.DataFrame):
        raise TypeError(f"predictions must be a pandas DataFrame, got {type(preds).__name__}")
    if len(preds) == 0 and not allow_empty:
        raise ValueError("the predictions table is empty: no image was predicted, so there is nothing to measure")
    models = detect_models(preds) if models is None else ((models,) if isinstance(models, str) else tuple(models))
    if not models or len(set(models)) != len(models):
        raise ValueError(f"give one or more distinct model keys, got {models}")
    needed = list(dict.fromkeys(needs))
    missing = [c for c in needed if c not in preds.columns]
    for m in models:
        missing += [c for c in (f"age_pred_{m}", f"p_female_{m}") if c not in preds.columns]
    if missing:
        raise ValueError(
            f"the predictions table lacks column(s) {missing}; it needs the Sample columns plus "
            f"age_pred_<model> and p_female_<model> per model (columns present: {list(preds.columns)})"
        )
    for column in needed:
        _check_labels(preds, column)
    for m in models:
        for column in (f"age_pred_{m}", f"p_female_{m}"):
            values = _numeric(preds, column)
            bad = ~np.isfinite(values)
            if bad.any():
                raise ValueError(
                    f"{column} has {int(bad.sum())} missing or infinite value(s) (first at {_where(preds, bad)}); "
                    "drop those images or re-run the prediction"
                )
        p = _numeric(preds, f"p_female_{m}")
        outside = (p < 0) | (p > 1)
        if outside.any():
            raise ValueError(
                f"p_female_{m} must be a probability in [0, 1]; {int(outside.sum())} value(s) are outside "
                f"(e.g. {p[outside][0]:g} at {_where(preds, outside)}); check the model's gender head mapping"
            )
    return models


def _numeric(preds: pd.DataFrame, column: str) -> np.ndarray:
    try:
        return pd.to_numeric(preds[column], errors="raise").to_numpy(dtype=float)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"column {column} must be numeric: {exc}") from exc


def _where(preds: pd.DataFrame, bad: np.ndarray) -> str:
    first = int(np.flatnonzero(bad)[0])
    if "image_id" in preds.columns:
        return f"row {first}, image_id {preds['image_id'].iloc[first]}"
    return f"row {first}"


def _check_labels(preds: pd.DataFrame, column: str) -> None:
    if column == "age_band":
        if preds[column].isna().any():
            raise ValueError(
                f"age_band is missing for {int(preds[column].isna().sum())} row(s) (first at "
                f"{_where(preds, preds[column].isna().to_numpy())}); assign bands with "
                "analysis.constants.assign_age_bands and edges that start at or below the youngest age"
            )
        return
    if column not in ("age", "gender", "ethnicity"):
        return
    values = _numeric(preds, column)
    if column == "age":
        bad = ~np.isfinite(values) | (values < 0)
        what = "true ages must be finite and non-negative (years)"
    else:
        n_codes = len(GENDERS) if column == "gender" else len(ETHNICITIES)
        bad = ~np.isin(values, np.arange(n_codes))
        what = f"{column} codes must be integers 0..{n_codes - 1}" + (
            " (0 male, 1 female)" if column == "gender" else f" ({', '.join(ETHNICITIES)})"
        )
    if bad.any():
        raise ValueError(f"{what}; {int(bad.sum())} value(s) are not (first at {_where(preds, bad)})")


def _check_positive_int(name: str, value, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")
    return int(value)


def _check_bootstrap_args(n_boot, seed, confidence) -> None:
    _check_positive_int("n_boot", n_boot, allow_zero=True)
    _check_positive_int("seed", seed, allow_zero=True)
    if not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence!r}")


# ---------------------------------------------------------------- per-image quantities


def add_error_columns(preds: pd.DataFrame, models=None) -> pd.DataFrame:
    """Copy of `preds` with, per model m: `gender_pred_<m>` (int, 1 = female when p_female >= 0.5),
    `gender_correct_<m>` (bool), `age_err_<m>` (predicted - true, years), `abs_age_err_<m>`.
    An empty table gives an empty table with these columns."""
    models = check_predictions(preds, models, allow_empty=True)
    out = preds.copy()
    age = _numeric(preds, "age")
    gender = _numeric(preds, "gender").astype(int)
    for m in models:
        gender_pred = (_numeric(preds, f"p_female_{m}") >= 0.5).astype(int)
        age_err = _numeric(preds, f"age_pred_{m}") - age
        out[f"gender_pred_{m}"] = gender_pred
        out[f"gender_correct_{m}"] = gender_pred == gender
        out[f"age_err_{m}"] = age_err
        out[f"abs_age_err_{m}"] = np.abs(age_err)
    return out


def gender_correct(p_female, genders) -> np.ndarray:
    """Per image, is the gender right: P(female) ≥ 0.5 for a woman (1), < 0.5 for a man (0); bool (n,)."""
    return (np.asarray(p_female) >= 0.5) == (np.asarray(genders) == 1)


def _per_image(preds: pd.DataFrame, m: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gender correct as 0/1 float, absolute age error, signed age error), each shape (n,)."""
    correct = gender_correct(_numeric(preds, f"p_female_{m}"), _numeric(preds, "gender")).astype(float)
    age_err = _numeric(preds, f"age_pred_{m}") - _numeric(preds, "age")
    return correct, np.abs(age_err), age_err


# ---------------------------------------------------------------- slices


def _parse_slices(slices) -> list[tuple[str, tuple[str, ...]]]:
    """[(slice_by, attributes)] from names like "overall", "gender", "age_band×gender" (or tuples)."""
    if isinstance(slices, str):
        slices = (slices,)
    parsed = []
    for spec in slices:
        attrs = tuple(spec) if isinstance(spec, (tuple, list)) else tuple(str(spec).split(INTERSECTION))
        attrs = tuple(a.strip() for a in attrs)
        if attrs == ("overall",):
            parsed.append(("overall", ()))
            continue
        if not 1 <= len(attrs) <= 2 or len(set(attrs)) != len(attrs) or not set(attrs) <= set(SLICE_ATTRIBUTES):
            raise ValueError(
                f"unknown slicing {spec!r}: use 'overall', one of {SLICE_ATTRIBUTES}, or two of them "
                f"joined by '{INTERSECTION}' (e.g. 'age_band{INTERSECTION}gender')"
            )
        parsed.append((INTERSECTION.join(attrs), attrs))
    if not parsed:
        raise ValueError(f"give at least one slicing, e.g. {DEFAULT_SLICES}")
    return parsed


def _attribute_codes(preds: pd.DataFrame, attr: str) -> tuple[np.ndarray, list[str]]:
    """Group code per row (shape (n,), 0..len(labels)-1) and the ordered group labels."""
    if attr == "gender":
        return _numeric(preds, "gender").astype(int), list(GENDERS)
    if attr == "ethnicity":
        return _numeric(preds, "ethnicity").astype(int), list(ETHNICITIES)
    column = preds["age_band"]
    if isinstance(column.dtype, pd.CategoricalDtype):
        return column.cat.codes.to_numpy().astype(int), [str(c) for c in column.cat.categories]
    # A table read back from CSV has lost the band order: restore it from the youngest age per band.
    labels = column.astype(str)
    order = pd.Series(_numeric(preds, "age")).groupby(labels.to_numpy()).min().sort_values(kind="stable").index
    return pd.Categorical(labels, categories=list(order)).codes.astype(int), [str(x) for x in order]


def _slice_groups(preds: pd.DataFrame, slices) -> list[tuple[dict, np.ndarray]]:
    """[(slice id columns, row positions)] in display order; empty groups are left out.

    Intersections are ordered by the first attribute, then the second (age band order first).
    """
    groups = []
    for slice_by, attrs in _parse_slices(slices):
        if not attrs:
            ids = {"slice_by": "overall", "slice": "all", "slice_1": "all", "slice_2": ""}
            groups.append((ids, np.arange(len(preds))))
            continue
        coded = [_attribute_codes(preds, a) for a in attrs]
        sizes = tuple(len(labels) for _, labels in coded)
        combined = np.ravel_multi_index(tuple(codes for codes, _ in coded), sizes)
        counts = np.bincount(combined, minlength=int(np.prod(sizes)))
        rows_sorted = np.argsort(combined, kind="stable")
        ends = np.cumsum(counts)
        for code, names in enumerate(product(*(labels for _, labels in coded))):
            if counts[code] == 0:
                continue
            ids = {
                "slice_by": slice_by,
                "slice": LABEL_JOIN.join(names),
                "slice_1": names[0],
                "slice_2": names[1] if len(names) > 1 else "",
            }
            groups.append((ids, rows_sorted[ends[code] - counts[code]: ends[code]]))
    return groups


# ---------------------------------------------------------------- bootstrap


def _group_rng(seed: int, ids: dict) -> np.random.Generator:
    """A generator per slice, keyed by the seed and the slice's name.

    A slice's CI therefore does not depend on which other slices or models are in the table, and
    compare_table resamples exactly the images that slice_table resamples for the same slice.
    """
    key = zlib.crc32(f"{ids['slice_by']}|{ids['slice']}".encode())
    return np.random.default_rng([seed, key])


def _bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Column means of `n_boot` resamples (rows drawn with replacement) of values (n, k) -> (n_boot, k).

    Written by hand because scipy.stats.bootstrap resamples one statistic of one slice per call:
    ~90 slices x 3 metrics x 2 models would mean 540 calls, each drawing its own resamples, and
    take several seconds. Here one block of row indices per slice serves every metric and model
    (which also makes the models' CIs paired); np.take on each column then a row sum is the
    fastest gather we measured (faster than bincount + matrix product or 2-D fancy indexing).
    Blocks of resamples bound the memory (_BOOTSTRAP_BLOCK indices at a time).
    """
    n, k = values.shape
    columns = [np.ascontiguousarray(values[:, j]) for j in range(k)]
    means = np.empty((n_boot, k))
    block = max(1, _BOOTSTRAP_BLOCK // n)
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        rows = rng.integers(0, n, size=(b, n), dtype=np.int32)  # int32: half the bytes, twice as fast
        for j, column in enumerate(columns):
            means[start:start + b, j] = np.take(column, rows).sum(axis=1) / n
    return means


def _percentile_interval(means: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CI per column of bootstrap means (n_boot, k); NaN when there are no resamples."""
    if len(means) == 0:
        nan = np.full(means.shape[1], np.nan)
        return nan, nan.copy()
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail], axis=0)
    return lo, hi


def accuracy_interval(n_correct: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of an accuracy (scipy); (NaN, NaN) without images.

    Used for gender accuracy instead of the bootstrap: a percentile bootstrap of a slice the model
    gets all right (or all wrong) is [100%, 100%] whatever its size — 1 image or 25 — where Wilson
    gives [87%, 100%] for 25 of 25; at n = 1000 the two agree.
    """
    if n == 0:
        return math.nan, math.nan
    if n_correct != int(n_correct) or not 0 <= n_correct <= n:
        raise ValueError(f"an accuracy interval needs a whole number of correct images between 0 and {n}, got {n_correct}")
    ci = stats.binomtest(int(n_correct), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


# Fewest images a bootstrap CI is given for: resampling 1–4 values gives an interval that is
# little more than their range (n = 2: exactly the two values).
MIN_BOOTSTRAP_IMAGES = 5


def _mean_interval(values: np.ndarray, n_boot: int, rng: np.random.Generator, confidence: float):
    """Percentile bootstrap CI per column of values (n, k); NaN with fewer than
    MIN_BOOTSTRAP_IMAGES rows or without resamples."""
    if len(values) < MIN_BOOTSTRAP_IMAGES:
        nan = np.full(values.shape[1], np.nan)
        return nan, nan.copy()
    return _percentile_interval(_bootstrap_means(values, n_boot, rng), confidence)


# ---------------------------------------------------------------- slice and comparison tables


def slice_table(
    preds: pd.DataFrame,
    models=None,
    *,
    n_boot: int = 1000,
    seed: int = DEFAULT_SEED,
    confidence: float = 0.95,
    slices=DEFAULT_SLICES,
) -> pd.DataFrame:
    """Gender accuracy, age MAE and age bias (years) overall and per slice, long by model.

    One row per (slice, model) with the columns of SLICE_TABLE_COLUMNS; `*_lo`/`*_hi` are CIs at
    `confidence`: for gender accuracy the Wilson score interval (accuracy_interval), for age MAE and
    bias the percentile bootstrap from `n_boot` resamples of the slice's images (NaN with n_boot=0
    or fewer than MIN_BOOTSTRAP_IMAGES images). Slices without images are left out; `small` is n < SMALL_SLICE_N.
    """
    _check_bootstrap_args(n_boot, seed, confidence)
    attrs = {a for _, names in _parse_slices(slices) for a in names}
    models = check_predictions(preds, models, needs=["age", "gender", *sorted(attrs)])
    # values: (n, 3 * n_models), per model the columns (correct, abs_age_err, age_err).
    values = np.column_stack([col for m in models for col in _per_image(preds, m)])
    rows = []
    for ids, group in _slice_groups(preds, slices):
        group_values = values[group]
        estimate = group_values.mean(axis=0)
        lo, hi = _mean_interval(group_values, n_boot, _group_rng(seed, ids), confidence)
        for i, m in enumerate(models):
            row = {**ids, "model": m, "n": len(group)}
            for j, metric in enumerate(GAP_METRICS):
                c = 3 * i + j
                if metric == "gender_acc":
                    lo[c], hi[c] = accuracy_interval(int(round(group_values[:, c].sum())), len(group), confidence)
                row.update({metric: estimate[c], f"{metric}_lo": lo[c], f"{metric}_hi": hi[c]})
            row["small"] = len(group) < SMALL_SLICE_N
            rows.append(row)
    return pd.DataFrame(rows, columns=SLICE_TABLE_COLUMNS)


def paired_accuracy_difference_interval(both: int, only_a: int, only_b: int, neither: int,
                                        confidence: float = 0.95) -> tuple[float, float]:
    """CI of accuracy(b) − accuracy(a) on the same images: Newcombe's hybrid score interval for
    paired proportions (Newcombe 1998, method 10), from the 2×2 counts of images both models get
    right, only a, only b, neither. (NaN, NaN) without images.

    By hand because neither scipy nor scikit-learn has a paired-difference interval. Chosen over
    the bootstrap because it stays honest where the bootstrap collapses: with no image that only
    one model gets right a percentile bootstrap gives [0, 0] whatever n, this interval does not;
    it is built from the two Wilson intervals (accuracy_interval) and the correlation of the pairs,
    continuity-corrected as in Newcombe's paper (and Altman's "Statistics with Confidence").
    Near p = 0.05 it can exclude 0 while the exact McNemar test, which is conservative, does not.
    """
    n = both + only_a + only_b + neither
    if n == 0:
        return math.nan, math.nan
    p_a, p_b = (both + only_a) / n, (both + only_b) / n
    lo_a, hi_a = accuracy_interval(both + only_a, n, confidence)
    lo_b, hi_b = accuracy_interval(both + only_b, n, confidence)
    # phi: correlation of the two models' right/wrong flags over the images (0 when undefined), with
    # Newcombe's continuity correction of a positive AD − BC by N/2: without it, a table where no
    # image is right for one model only gives phi = 1 and the interval [0, 0] whatever n.
    denominator = math.sqrt(float(both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither))
    cross = both * neither - only_a * only_b
    cross = max(cross - n / 2, 0.0) if cross > 0 else cross
    phi = cross / denominator if denominator > 0 else 0.0
    delta = p_b - p_a
    below = (p_b - lo_b) ** 2 - 2 * phi * (p_b - lo_b) * (hi_a - p_a) + (hi_a - p_a) ** 2
    above = (hi_b - p_b) ** 2 - 2 * phi * (hi_b - p_b) * (p_a - lo_a) + (p_a - lo_a) ** 2
    return max(-1.0, delta - math.sqrt(max(below, 0.0))), min(1.0, delta + math.sqrt(max(above, 0.0)))


def mcnemar_exact_p(only_a_correct: int, only_b_correct: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of the discordant pairs against 1/2.

    1.0 when there are no discordant pairs (no evidence of a difference).
    """
    discordant = int(only_a_correct) + int(only_b_correct)
    if discordant == 0:
        return 1.0
    return float(stats.binomtest(int(only_b_correct), discordant, 0.5).pvalue)


# Paired age-error differences smaller than this (years) count as ties: float32 rounding when the
# same weights run in two graphs differs by ~1e-5 years, consistently enough for a Wilcoxon test on
# a few hundred images to call two copies of one model "different" (p = 0.045 seen).
AGE_TIE_YEARS = 1e-3


def wilcoxon_p(differences) -> float:
    """Two-sided Wilcoxon signed-rank p-value for paired differences (years), shape (n,).

    Differences below AGE_TIE_YEARS in size are ties, and ties are dropped (scipy's default
    "wilcox"); 1.0 when every difference is a tie.
    """
    differences = np.asarray(differences, dtype=float)
    differences = np.where(np.abs(differences) < AGE_TIE_YEARS, 0.0, differences)
    if differences.size == 0 or np.all(differences == 0):
        return 1.0
    with warnings.catch_warnings():
        # scipy warns when it falls back from the exact to the normal distribution (ties, zeros).
        warnings.simplefilter("ignore", UserWarning)
        return float(stats.wilcoxon(differences).pvalue)


def compare_table(
    preds: pd.DataFrame,
    a: str = "A",
    b: str = "B",
    *,
    n_boot: int = 1000,
    seed: int = DEFAULT_SEED,
    confidence: float = 0.95,
    slices=DEFAULT_SLICES,
) -> pd.DataFrame:
    """Paired comparison of models `a` and `b` on the same images, one row per slice.

    Deltas are b - a (age_mae_delta < 0: b is better). Gender correctness: counts of images only one
    model gets right, the CI of the accuracy difference (paired_accuracy_difference_interval) and
    the exact McNemar p. Absolute age error: paired bootstrap CI of the MAE delta (the same
    resampled images for both models) and the Wilcoxon signed-rank p. Scanning many groups turns
    up small p-values by chance: `mcnemar_q` / `wilcoxon_q` are the p-values adjusted over the
    table's groups (Benjamini–Hochberg, scipy.stats.false_discovery_control), to read instead;
    the overall row, the one planned test, keeps its p.
    Columns: slice_by, slice, slice_1, slice_2, n, gender_acc_<a>, gender_acc_<b>, gender_acc_delta,
    gender_acc_delta_lo, gender_acc_delta_hi, only_<a>_correct, only_<b>_correct, mcnemar_p,
    mcnemar_q, age_mae_<a>, age_mae_<b>, age_mae_delta, age_mae_delta_lo, age_mae_delta_hi,
    wilcoxon_p, wilcoxon_q, small.
    """
    _check_bootstrap_args(n_boot, seed, confidence)
    if a == b:
        raise ValueError(f"compare two different models, got a = b = {a!r}")
    attrs = {x for _, names in _parse_slices(slices) for x in names}
    check_predictions(preds, (a, b), needs=["age", "gender", *sorted(attrs)])
    correct_a, abs_a, _ = _per_image(preds, a)
    correct_b, abs_b, _ = _per_image(preds, b)
    abs_diff = abs_b - abs_a  # (n,) years; negative where b is closer
    rows = []
    for ids, group in _slice_groups(preds, slices):
        ca, cb, d = correct_a[group] == 1, correct_b[group] == 1, abs_diff[group]
        only_a, only_b = int(np.sum(ca & ~cb)), int(np.sum(cb & ~ca))
        both, neither = int(np.sum(ca & cb)), int(np.sum(~ca & ~cb))
        acc_lo, acc_hi = paired_accuracy_difference_interval(both, only_a, only_b, neither, confidence)
        lo, hi = _mean_interval(d[:, None], n_boot, _group_rng(seed, ids), confidence)
        rows.append(
            {
                **ids,
                "n": len(group),
                f"gender_acc_{a}": ca.mean(),
                f"gender_acc_{b}": cb.mean(),
                "gender_acc_delta": cb.mean() - ca.mean(),
                "gender_acc_delta_lo": acc_lo,
                "gender_acc_delta_hi": acc_hi,
                f"only_{a}_correct": only_a,
                f"only_{b}_correct": only_b,
                "mcnemar_p": mcnemar_exact_p(only_a, only_b),
                f"age_mae_{a}": abs_a[group].mean(),
                f"age_mae_{b}": abs_b[group].mean(),
                "age_mae_delta": d.mean(),
                "age_mae_delta_lo": lo[0],
                "age_mae_delta_hi": hi[0],
                "wilcoxon_p": wilcoxon_p(d),
                "small": len(group) < SMALL_SLICE_N,
            }
        )
    table = pd.DataFrame(rows)  # never empty: check_predictions refuses an empty table
    groups = (table["slice_by"] != "overall").to_numpy()
    for test in ("mcnemar", "wilcoxon"):
        p_values = table[f"{test}_p"].to_numpy(dtype=float)
        q = p_values.copy()  # the overall row is the one planned test: its q is its p
        family = groups & np.isfinite(p_values)
        if family.any():
            q[family] = stats.false_discovery_control(p_values[family], method="bh")
        table.insert(table.columns.get_loc(f"{test}_p") + 1, f"{test}_q", q)
    return table


# ---------------------------------------------------------------- gaps and worst slices (from slice_table)


def _badness(metric: str, values: pd.Series) -> pd.Series:
    """Larger = worse: low accuracy, high MAE, bias far from zero."""
    if metric == "gender_acc":
        return -values
    if metric == "age_mae":
        return values
    if metric == "age_bias":
        return values.abs()
    raise ValueError(f"unknown metric {metric!r}; use one of {GAP_METRICS}")


def _check_slice_table(table, extra: Iterable[str] = ()) -> None:
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"expected the DataFrame returned by slice_table, got {type(table).__name__}")
    missing = [c for c in ["slice_by", "slice", "model", "n", *extra] if c not in table.columns]
    if missing:
        raise ValueError(f"not a slice table (from slice_table): missing column(s) {missing}")


def gaps_table(slices: pd.DataFrame, *, min_n: int = SMALL_SLICE_N, metrics=GAP_METRICS) -> pd.DataFrame:
    """Fairness gaps per model x slicing x metric, computed from a slice_table.

    gap = how much worse the worst group is than the best, in the metric's direction: largest
    minus smallest value for gender_acc and age_mae; for age_bias, where best/worst are the groups
    closest to / farthest from 0, the worst |bias| minus the best |bias| (so the gap is always the
    distance between the two groups named, never between two others).
    Groups with n < min_n are excluded (their estimates are too noisy to rank; `n_excluded` says
    how many, `min_n` which limit); min_n=0 keeps all. Slicings with fewer than two groups left
    have no gap and no row. Columns: GAPS_TABLE_COLUMNS.
    """
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    _check_slice_table(slices, metrics)
    min_n = _check_positive_int("min_n", min_n, allow_zero=True)
    rows = []
    table = slices[slices["slice_by"] != "overall"]
    for model in table["model"].unique():
        for slice_by in table["slice_by"].unique():
            groups = table[(table["model"] == model) & (table["slice_by"] == slice_by)]
            kept = groups[groups["n"] >= min_n]
            if len(kept) < 2:
                continue
            for metric in metrics:
                badness = _badness(metric, kept[metric])
                worst, best = kept.loc[badness.idxmax()], kept.loc[badness.idxmin()]
                rows.append(
                    {
                        "model": model,
                        "slice_by": slice_by,
                        "metric": metric,
                        "gap": badness.max() - badness.min(),
                        "best_slice": best["slice"],
                        "best_value": best[metric],
                        "worst_slice": worst["slice"],
                        "worst_value": worst[metric],
                        "n_groups": len(kept),
                        "n_excluded": len(groups) - len(kept),
                        "min_n": min_n,
                    }
                )
    return pd.DataFrame(rows, columns=GAPS_TABLE_COLUMNS)


def worst_slices(
    slices: pd.DataFrame, metric: str, k: int = 5, min_n: int = SMALL_SLICE_N, *, slice_by=None
) -> pd.DataFrame:
    """The k worst groups per model for `metric`, worst first, from a slice_table.

    Leaves out "overall" and groups with n < min_n; `slice_by` (a name or names) restricts the
    slicings. Returns slice_table rows.
    """
    _check_slice_table(slices, [metric])
    k = _check_positive_int("k", k)
    min_n = _check_positive_int("min_n", min_n, allow_zero=True)
    table = slices[(slices["slice_by"] != "overall") & (slices["n"] >= min_n)]
    if slice_by is not None:
        table = table[table["slice_by"].isin([slice_by] if isinstance(slice_by, str) else list(slice_by))]
    order = _badness(metric, table[metric]).sort_values(ascending=False, kind="stable").index
    ranked = table.loc[order]
    return ranked.groupby("model", sort=False).head(k).reset_index(drop=True)


# ---------------------------------------------------------------- calibration


def _reliability_bins(y_true: np.ndarray, p: np.ndarray, n_bins: int):
    """Equal-width bins over [0, 1]: edges (n_bins+1,), counts, mean p and observed frequency per bin.

    Same binning as sklearn.calibration.calibration_curve (bins (lo, hi], 0 in the first), so the
    two agree; calibration_curve alone is not enough because it drops empty bins and the counts
    that ECE weights by.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = _bin_index(p, n_bins)
    n = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(bins, weights=p, minlength=n_bins) / n
        frac = np.bincount(bins, weights=y_true, minlength=n_bins) / n
    return edges, n, mean_p, frac


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Each probability's equal-width bin, 0..n_bins-1 (bins (lo, hi], 0 in the first)."""
    return np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], p)


def calibration_table(preds: pd.DataFrame, model: str = "A", n_bins: int = 10, confidence: float = 0.95) -> pd.DataFrame:
    """Reliability bins for P(female) of one model: bin, lo, hi, n, mean_p_female, frac_female,
    its Wilson interval frac_female_lo/hi at `confidence`, and small (n < SMALL_SLICE_N).

    One row per bin (lo, hi], empty bins included with n = 0 and NaN means so the layout is fixed.
    A calibrated model has frac_female ≈ mean_p_female in every bin.
    """
    n_bins = _check_positive_int("n_bins", n_bins)
    _check_bootstrap_args(0, 0, confidence)
    check_predictions(preds, model, needs=["gender"])
    genders = _numeric(preds, "gender")
    edges, n, mean_p, frac = _reliability_bins(genders, _numeric(preds, f"p_female_{model}"), n_bins)
    women = np.rint(np.nan_to_num(frac) * n).astype(int)
    intervals = [accuracy_interval(w, k, confidence) for w, k in zip(women, n)]
    return pd.DataFrame(
        {
            "bin": np.arange(n_bins),
            "lo": edges[:-1],
            "hi": edges[1:],
            "n": n,
            "mean_p_female": mean_p,
            "frac_female": frac,
            "frac_female_lo": [lo for lo, _ in intervals],
            "frac_female_hi": [hi for _, hi in intervals],
            "small": n < SMALL_SLICE_N,
        },
        columns=CALIBRATION_COLUMNS,
    )


def expected_calibration_error(y_true, p, n_bins: int = 10) -> float:
    """Expected calibration error of P(female): sum over equal-width bins of
    (bin count / total) * |observed female fraction - mean p|.

    y_true: 0/1 (1 = female), shape (n,); p: probabilities in [0, 1], shape (n,). No library
    (sklearn, scipy) ships ECE, hence the few lines here.
    """
    n_bins = _check_positive_int("n_bins", n_bins)
    y_true, p = np.asarray(y_true, dtype=float).ravel(), np.asarray(p, dtype=float).ravel()
    if y_true.shape != p.shape:
        raise ValueError(f"y_true and p must have the same length, got {y_true.size} and {p.size}")
    if y_true.size == 0:
        raise ValueError("expected_calibration_error needs at least one prediction")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must be 0/1 labels (1 = female)")
    if not (np.isfinite(p) & (p >= 0) & (p <= 1)).all():
        raise ValueError("p must be probabilities in [0, 1] without NaN")
    _, n, mean_p, frac = _reliability_bins(y_true, p, n_bins)
    filled = n > 0
    return float(np.sum(n[filled] / y_true.size * np.abs(frac[filled] - mean_p[filled])))


def ece_interval(y_true, p, n_bins: int = 10, n_boot: int = 1000, seed: int = DEFAULT_SEED,
                 confidence: float = 0.95) -> tuple[float, float]:
    """A conservative `confidence` interval for the population ECE (the binned quantity
    sum_b |E[(y - p) 1{p in b}]|) that expected_calibration_error estimates.

    Why not the bootstrap: resampling inflates a calibrated model's ECE (|.| of noise is positive),
    so plain, bias-corrected and BCa bootstrap intervals held the true ECE in 0-54% of simulations
    of a calibrated model (and Kumar et al.'s debiased l2 estimate's in 74-85%). No library ships an
    honest one, hence this. With T_b = sum over bin b of (y - p) / n, so that ECE = sum_b |T_b|,
    and theta_b its expectation:
    - lower end: ECE - ECE_true = sum_b (|T_b| - |theta_b|) <= sum_b sign(T_b)(T_b - theta_b), whose
      upper quantile is bootstrapped; bins whose T_b is not clearly away from 0 (|T_b| <= sqrt(ln n)
      standard errors) enter with the absolute value of their deviation instead. Deviations are
      resampled with labels drawn from the predicted probabilities (consistency resampling) and
      their spread raised to the images' own when that is larger: a bin with few or no women
      would otherwise look noiseless to the plain bootstrap;
    - upper end: ECE_true - ECE <= sum_b sign(theta_b)(theta_b - T_b), a mean of n terms whose
      variance is at most E[(y - p)^2] / n, estimated by the Brier score (or the label noise
      mean(p(1 - p)) when larger) over n (normal quantile).
    Each end fails with probability at most (1 - confidence) / 2, up to the bootstrap and normal
    approximations: see BENCHMARKS.md for the simulated coverage. An interval starting at 0 means
    the model is compatible with perfect calibration. n_boot = 0: no lower end (NaN). Returns
    (lo, hi), clipped to [0, 1].
    """
    from scipy import stats

    ece = expected_calibration_error(y_true, p, n_bins)  # also checks the inputs
    y_true, p = np.asarray(y_true, dtype=float).ravel(), np.asarray(p, dtype=float).ravel()
    n = y_true.size
    z = stats.norm.ppf(1 - (1 - confidence) / 2)
    # the Brier score, or the label noise p(1 - p) a calibrated model would have when larger: a small
    # sample with few women has a small Brier score just when its ECE looks small
    noise = max(np.mean((y_true - p) ** 2), np.mean(p * (1 - p)))
    hi = float(min(1.0, ece + z * np.sqrt(noise / n)))
    if n < 2:
        return 0.0, hi
    if int(n_boot) == 0:  # no resamples asked for (--bootstrap 0): no lower end, as for the other CIs
        return float("nan"), hi
    n_boot = _check_positive_int("n_boot", n_boot)
    bins = _bin_index(p, n_bins)
    d = y_true - p
    t = np.bincount(bins, weights=d, minlength=n_bins) / n
    se = np.sqrt(np.maximum(np.bincount(bins, weights=d**2, minlength=n_bins) / n - t**2, 0.0) / n)
    se_null = np.sqrt(np.bincount(bins, weights=p * (1 - p), minlength=n_bins)) / n  # of sum(y* - p) / n
    # A bin with few or no women looks nearly noiseless to its own spread (a bin of 12 men: n·se 0.44
    # against 1.18 for labels drawn from p): its spread is never taken below the label noise.
    clear = np.abs(t) > np.sqrt(np.log(n)) * np.maximum(se, se_null)
    with np.errstate(divide="ignore", invalid="ignore"):
        floor = np.where(se_null > 0, np.maximum(1.0, se / se_null), np.nan)
    rng = np.random.default_rng(seed)
    excess, shortfall = [], []
    block = max(1, _BOOTSTRAP_BLOCK // n)  # resamples per chunk: bounded memory
    for start in range(0, n_boot, block):
        idx = rng.integers(0, n, size=(min(n_boot - start, block), n))
        rows = np.repeat(np.arange(len(idx)), n) * n_bins

        def per_bin(weights: np.ndarray) -> np.ndarray:  # (resamples, n_bins): each resample's bin sums / n
            return np.bincount(rows + bins[idx].ravel(), weights=weights.ravel(),
                               minlength=len(idx) * n_bins).reshape(len(idx), n_bins) / n

        plain = per_bin(d[idx]) - t  # T*_b - T_b
        drawn = per_bin((rng.random(idx.shape) < p[idx]) - p[idx])  # labels drawn from p: sum(y* - p) / n
        # labels drawn from p, spread raised to the images' own when larger; p all 0 or 1: the images' own
        spread = np.where(np.isfinite(floor), drawn * np.nan_to_num(floor), plain)
        excess.append(np.where(clear, np.sign(t) * spread, np.abs(spread)).sum(axis=1))
        shortfall.append(np.where(clear, -np.sign(t) * plain, np.abs(spread)).sum(axis=1))
    q = 1 - (1 - confidence) / 2
    lo = max(0.0, ece - float(np.quantile(np.concatenate(excess), q)))
    # the upper end also from the resampled shortfall: with rare outcomes a bin's error is skewed
    hi = float(min(1.0, max(hi, ece + float(np.quantile(np.concatenate(shortfall), q)))))
    return lo, hi


# ---------------------------------------------------------------- age error by true age


def age_error_by_true_age(
    preds: pd.DataFrame,
    models=None,
    bin_width: int = 5,
    *,
    n_boot: int = 1000,
    seed: int = DEFAULT_SEED,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Age MAE and bias (years) per bin of true age, long by model, with CIs.

    Bins are age_lo <= age < age_hi = age_lo + bin_width, starting at a multiple of bin_width;
    empty bins are left out. Columns: model, age_lo, age_hi, n, age_mae (+ _lo/_hi), age_bias
    (+ _lo/_hi), small (n < SMALL_SLICE_N). The CIs are percentile bootstraps of the bin's
    images as in slice_table (NaN with n_boot=0 or fewer than MIN_BOOTSTRAP_IMAGES images).
    """
    if isinstance(bin_width, bool) or not isinstance(bin_width, (int, float, np.number)) or not bin_width > 0:
        raise ValueError(f"bin_width must be a positive number of years, got {bin_width!r}")
    _check_bootstrap_args(n_boot, seed, confidence)
    models = check_predictions(preds, models)
    age = _numeric(preds, "age")
    bins = np.floor(age / bin_width).astype(int)
    present = np.unique(bins)
    # values: (n, 2 * n_models), per model the columns (abs_age_err, age_err).
    values = np.column_stack([col for m in models for col in _per_image(preds, m)[1:]])
    rows = []
    for b in present:
        lo_age = b * bin_width
        group = values[bins == b]
        estimate = group.mean(axis=0)
        ids = {"slice_by": f"true_age/{bin_width:g}", "slice": f"{lo_age:g}"}
        lo, hi = _mean_interval(group, n_boot, _group_rng(seed, ids), confidence)
        for i, m in enumerate(models):
            rows.append({
                "model": m, "age_lo": lo_age, "age_hi": lo_age + bin_width, "n": len(group),
                "age_mae": estimate[2 * i], "age_mae_lo": lo[2 * i], "age_mae_hi": hi[2 * i],
                "age_bias": estimate[2 * i + 1], "age_bias_lo": lo[2 * i + 1], "age_bias_hi": hi[2 * i + 1],
                "small": len(group) < SMALL_SLICE_N,
            })
    table = pd.DataFrame(rows, columns=AGE_ERROR_COLUMNS)
    return table.sort_values(["model", "age_lo"], key=lambda c: c.map(list(models).index) if c.name == "model" else c,
                             kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------- worst errors


def worst_errors(
    preds: pd.DataFrame, kind: str, model: str = "A", k: int | None = 20, *, other: str | None = None
) -> pd.DataFrame:
    """The k worst images of one kind, worst first: rows of `preds` plus the add_error_columns
    of every model and a `score` (the ranking key, larger = worse).

    kind:
      "age"                  all images by abs_age_err_<model> (years).
      "gender"               wrongly gendered images by the confidence in the wrong answer,
                             max(p, 1 - p) (same order as |p - 0.5|).
      "disagreement_gender"  images where `model` and `other` predict different genders, by |Δp_female|.
      "disagreement_age"     all images by |age_pred_<model> - age_pred_<other>| (years).
      "disagreement"         gender disagreements first (by |Δp_female|), then the other images by
                             |Δage|; column `disagreement` says which ("gender" or "age").
    `other` defaults to the other model of a two-model table. Ties keep the table order. k=None: all.
    Column `label_contradicted` marks the images whose gender label every model present contradicts
    with P >= LABEL_CHECK_CONFIDENCE (likely wrong labels, as in contradicted_labels).
    An empty table (e.g. an empty slice) gives an empty result.
    """
    if kind not in WORST_ERROR_KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {WORST_ERROR_KINDS}")
    if k is not None:
        k = _check_positive_int("k", k)
    present = check_predictions(preds, allow_empty=True)
    if model not in present:
        raise ValueError(f"model {model!r} has no predictions; models present: {present}")
    table = add_error_columns(preds, present).reset_index(drop=True)
    order = None
    if kind == "age":
        score = table[f"abs_age_err_{model}"].to_numpy()
        keep = np.ones(len(table), dtype=bool)
    elif kind == "gender":
        p = table[f"p_female_{model}"].to_numpy()
        score = np.maximum(p, 1 - p)
        keep = ~table[f"gender_correct_{model}"].to_numpy()
    else:
        if other is None:
            others = [m for m in present if m != model]
            if len(others) != 1:
                raise ValueError(
                    f"kind {kind!r} compares two models; say which with other= (models present: {present})"
                )
            other = others[0]
        if other not in present or other == model:
            raise ValueError(f"other must be a second model present in the table {present}, got {other!r}")
        gender_differs = table[f"gender_pred_{model}"].to_numpy() != table[f"gender_pred_{other}"].to_numpy()
        p_diff = np.abs(table[f"p_female_{model}"].to_numpy() - table[f"p_female_{other}"].to_numpy())
        age_diff = np.abs(table[f"age_pred_{model}"].to_numpy() - table[f"age_pred_{other}"].to_numpy())
        if kind == "disagreement_gender":
            score, keep = p_diff, gender_differs
        elif kind == "disagreement_age":
            score, keep = age_diff, np.ones(len(table), dtype=bool)
        else:
            score = np.where(gender_differs, p_diff, age_diff)
            table["disagreement"] = np.where(gender_differs, "gender", "age")
            # Stable sort on two keys, the last one primary: gender disagreements first, then by score.
            order = np.lexsort((-score, ~gender_differs))
    if order is None:
        rows = np.flatnonzero(keep)
        order = rows[np.argsort(-score[rows], kind="stable")]
    table["score"] = score
    # A worst "error" is often a wrong label: say so beside it (see contradicted_labels).
    table["label_contradicted"] = _p_other_gender(table, present) >= LABEL_CHECK_CONFIDENCE
    return table.iloc[order[:k]].reset_index(drop=True)


def _p_other_gender(preds: pd.DataFrame, models) -> np.ndarray:
    """Per image, the smallest of the models' P(the gender other than the label); shape (n,)."""
    female = _numeric(preds, "gender") == 1
    p_other = [np.where(female, 1 - p, p) for p in (_numeric(preds, f"p_female_{m}") for m in models)]
    return np.min(p_other, axis=0) if len(preds) else np.zeros(0)


def _check_confidence(confidence) -> float:
    confidence = float(confidence)
    if not 0.5 < confidence <= 1:
        raise ValueError(f"confidence must be above 0.5 and at most 1, got {confidence:g}")
    return confidence


def contradicted_labels(preds: pd.DataFrame, models=None, confidence: float = LABEL_CHECK_CONFIDENCE) -> pd.DataFrame:
    """Images whose gender label every model contradicts: P(the other gender) >= `confidence` for
    each model. Candidates for a wrong label, to check by eye — not proof: one model, or two that
    learned the same mistake, can be confidently wrong.

    Rows of `preds` plus add_error_columns and `score` = the smallest of the models' P(the other
    gender), most contradicted first (ties keep the table order). An empty table gives an empty result.
    """
    confidence = _check_confidence(confidence)
    models = check_predictions(preds, models, allow_empty=True)
    table = add_error_columns(preds, models).reset_index(drop=True)
    table["score"] = p_other = _p_other_gender(table, models)
    rows = np.flatnonzero(p_other >= confidence)
    return table.iloc[rows[np.argsort(-p_other[rows], kind="stable")]].reset_index(drop=True)


def label_check(preds: pd.DataFrame, models=None, confidence: float = LABEL_CHECK_CONFIDENCE) -> dict:
    """What the labels of contradicted_labels would change: their number and share, and each
    model's gender accuracy if they were wrong (those labels flipped), for summary.json."""
    confidence = _check_confidence(confidence)
    models = check_predictions(preds, models)
    flagged = _p_other_gender(preds, models) >= confidence
    corrected = np.where(flagged, 1 - _numeric(preds, "gender"), _numeric(preds, "gender"))
    return {
        "confidence": confidence,
        "models": list(models),
        "n_contradicted": int(flagged.sum()),
        "share": float(flagged.mean()),
        "gender_acc_if_wrong": {m: float(gender_correct(_numeric(preds, f"p_female_{m}"), corrected).mean()) for m in models},
    }


# ---------------------------------------------------------------- summary


def _plain(value):
    """JSON-friendly scalar: Python float/int/bool, NaN -> None."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return None if math.isnan(value) else value


def summary(
    preds: pd.DataFrame,
    models=None,
    *,
    n_boot: int = 1000,
    seed: int = DEFAULT_SEED,
    confidence: float = 0.95,
    tables: Mapping[str, pd.DataFrame] | None = None,
) -> dict:
    """Headline numbers for summary.json: per model overall gender_acc, age_mae, age_bias with
    [lo, hi] CIs and the gender ECE with its conservative interval (ece_interval); the label check
    (label_check); with two models also the overall paired comparison (b - a), with the ECE
    difference (no interval: see the comment below).

    Values are plain Python floats/ints (NaN -> None); the CIs equal the overall rows of
    slice_table / compare_table with the same seed. `tables` = the "slices" (and "comparison")
    tables already computed from `preds` with these n_boot, seed and confidence: their overall
    rows are read instead of bootstrapping again.
    """
    models = check_predictions(preds, models)
    if tables is not None:
        overall = tables["slices"][tables["slices"]["slice_by"] == "overall"]
    else:
        overall = slice_table(preds, models, n_boot=n_boot, seed=seed, confidence=confidence, slices=("overall",))
    out = {
        "n_images": int(len(preds)),
        "confidence": float(confidence),
        "bootstrap_resamples": int(n_boot),
        "seed": int(seed),
        "models": {},
    }
    gender = _numeric(preds, "gender")
    for row in overall.to_dict(orient="records"):
        m = row["model"]
        entry = {}
        for metric in GAP_METRICS:
            entry[metric] = _plain(row[metric])
            entry[f"{metric}_ci"] = [_plain(row[f"{metric}_lo"]), _plain(row[f"{metric}_hi"])]
        p_female = _numeric(preds, f"p_female_{m}")
        entry["gender_ece"] = expected_calibration_error(gender, p_female)
        entry["gender_ece_ci"] = [_plain(v) for v in ece_interval(gender, p_female, n_boot=n_boot, seed=seed, confidence=confidence)]
        out["models"][m] = entry
    out["label_check"] = label_check(preds, models)
    if len(models) == 2:
        a, b = models
        if tables is not None and "comparison" in tables:
            comparison = tables["comparison"][tables["comparison"]["slice_by"] == "overall"]
        else:
            comparison = compare_table(preds, a, b, n_boot=n_boot, seed=seed, confidence=confidence, slices=("overall",))
        row = comparison.iloc[0]
        out["comparison"] = {"a": a, "b": b} | {
            key: _plain(value) for key, value in row.items() if key not in SLICE_ID_COLUMNS
        }
        # No interval: bootstrap intervals of the paired difference held it in only 57-94% of
        # simulations, and an honest one built like ece_interval's (2.3-3.3 times wider) never told
        # two models apart at n <= 1000 unless their ECEs differed by well over 0.03: compare the
        # two models' own intervals instead.
        out["comparison"]["gender_ece_delta"] = out["models"][b]["gender_ece"] - out["models"][a]["gender_ece"]
    return out
