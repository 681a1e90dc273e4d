"""Which images the Errors page shows: the ranking comes from `metrics.worst_errors`, this module
only narrows it down to what the user filtered for. No streamlit import.

Kinds of cases (keys of ERROR_KINDS):
    age         the model's largest absolute age errors (years)
    gender      images the model gendered wrongly, most confident first
    both_wrong  images both models got wrong: wrong gender from both first, then by the smaller
                of the two absolute age errors (so both are at least that far off)
    disagree    the models disagree: different genders first, then by the age gap between them
    contradicted  gender labels every model contradicts with P >= metrics.LABEL_CHECK_CONFIDENCE
                (likely wrong labels), most contradicted first
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import metrics
from analysis.constants import ETHNICITIES, GENDERS

ERROR_KINDS: dict[str, str] = {
    "age": "Age: largest errors",
    "gender": "Gender: wrong answers",
    "both_wrong": "Both models wrong",
    "disagree": "Models disagree",
    "contradicted": "Contradicted labels",
}
TWO_MODEL_KINDS = ("both_wrong", "disagree")
ALL_IMAGES = "all"
# What the Errors page says when no case of a kind is left (by default: the filters' fault).
NO_CASES = {
    "gender": "No wrong gender answer of this model in this slice.",
    "contradicted": f"No gender label in this slice is contradicted by every model with P ≥ {metrics.LABEL_CHECK_CONFIDENCE:g}.",
}
NO_CASES_DEFAULT = "No case matches these filters. Lower the minimum error or pick another slice."
_ATTRIBUTE_TITLES = {"age_band": "Age band", "gender": "Gender", "ethnicity": "Ethnicity"}


def slice_options(preds: pd.DataFrame) -> dict[str, str]:
    """Filter value -> label: "all", then "age_band=20–29", "gender=female", "ethnicity=Asian", ...,
    then the intersections the Slices page shows ("age_band=50–59&gender=female" → "50–59 ×
    female", ...). Only groups present in `preds` are offered."""
    options = {ALL_IMAGES: "All images"}
    groups = {}  # attribute -> [(value, label)] present, in display order
    bands = preds["age_band"]
    categories = bands.cat.categories if isinstance(bands.dtype, pd.CategoricalDtype) else sorted(bands.unique())
    present = set(bands.astype(str))
    groups["age_band"] = [(str(band), f"Age band {band}") for band in categories if str(band) in present]
    for attribute, names in (("gender", GENDERS), ("ethnicity", ETHNICITIES)):
        groups[attribute] = [(names[int(code)], f"{_ATTRIBUTE_TITLES[attribute]}: {names[int(code)]}")
                             for code in sorted(preds[attribute].unique())]
    for attribute, values in groups.items():
        options.update({f"{attribute}={value}": label for value, label in values})
    for first, second in (("age_band", "gender"), ("age_band", "ethnicity"), ("gender", "ethnicity")):
        for a, _ in groups[first]:
            for b, _ in groups[second]:
                key = f"{first}={a}&{second}={b}"
                if slice_mask(preds, key).any():
                    options[key] = f"{a} × {b}"
    return options


def slice_mask(preds: pd.DataFrame, slice_label: str) -> np.ndarray:
    """Boolean mask (n,) of the rows in the slice named like the keys of `slice_options`
    (an intersection joins its parts with "&")."""
    if slice_label == ALL_IMAGES:
        return np.ones(len(preds), dtype=bool)
    if "&" in slice_label:
        return np.logical_and.reduce([slice_mask(preds, part) for part in slice_label.split("&")])
    attribute, _, value = slice_label.partition("=")
    if attribute == "age_band":
        return (preds["age_band"].astype(str) == value).to_numpy()
    if attribute in ("gender", "ethnicity"):
        names = GENDERS if attribute == "gender" else ETHNICITIES
        if value not in names:
            raise ValueError(f"unknown {attribute} {value!r}; use one of {names}")
        return (preds[attribute] == names.index(value)).to_numpy()
    raise ValueError(f"unknown slice {slice_label!r}; use 'all' or attribute=value (age_band, gender, ethnicity)")


def select_cases(
    preds: pd.DataFrame, *, kind: str, model: str, slice_label: str = ALL_IMAGES, min_error: float = 0.0, k: int | None = 12
) -> pd.DataFrame:
    """The k worst cases of `kind` for `model` in a slice, worst first (k=None: all of them).

    Rows are `preds` rows plus metrics.add_error_columns and `score` (the ranking key).
    `min_error` (years) drops age cases below it: the model's error for "age", the smaller of
    both models' errors for "both_wrong", the gap between the models for "disagree"; gender
    and contradicted-label cases are kept whatever their age error.
    """
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {tuple(ERROR_KINDS)}")
    models = metrics.detect_models(preds)
    if model not in models:
        raise ValueError(f"model {model!r} has no predictions; models present: {models}")
    if kind in TWO_MODEL_KINDS and len(models) < 2:
        raise ValueError(f"'{ERROR_KINDS[kind]}' compares two models; load a model B first")
    in_slice = preds[slice_mask(preds, slice_label)]
    if in_slice.empty:
        return preds.iloc[:0].assign(score=[])
    other = next((m for m in models if m != model), None)

    if kind == "age":
        ranked = metrics.worst_errors(in_slice, "age", model, k=None)
        keep = ranked[f"abs_age_err_{model}"] >= min_error
    elif kind == "gender":
        ranked = metrics.worst_errors(in_slice, "gender", model, k=None)
        keep = pd.Series(True, index=ranked.index)
    elif kind == "contradicted":
        ranked = metrics.contradicted_labels(in_slice, models)
        keep = pd.Series(True, index=ranked.index)
    elif kind == "disagree":
        ranked = metrics.worst_errors(in_slice, "disagreement", model, k=None, other=other)
        age_gap = (ranked[f"age_pred_{model}"] - ranked[f"age_pred_{other}"]).abs()
        keep = (ranked["disagreement"] == "gender") | (age_gap >= min_error)
    else:
        ranked = _both_wrong(in_slice, model, other)
        keep = ranked["both_gender_wrong"] | (ranked["score"] >= min_error)
    ranked = ranked[keep.to_numpy()].reset_index(drop=True)
    return ranked if k is None else ranked.head(k)


def _both_wrong(preds: pd.DataFrame, model: str, other: str) -> pd.DataFrame:
    """Both wrong on gender first (by `model`'s confidence), then by min(|age error| of both)."""
    table = metrics.add_error_columns(preds, (model, other)).reset_index(drop=True)
    gender_wrong = ~table[f"gender_correct_{model}"] & ~table[f"gender_correct_{other}"]
    p = table[f"p_female_{model}"]
    confidence = np.maximum(p, 1 - p)
    smaller_age_error = np.minimum(table[f"abs_age_err_{model}"], table[f"abs_age_err_{other}"])
    table["both_gender_wrong"] = gender_wrong.to_numpy()
    table["score"] = np.where(gender_wrong, confidence, smaller_age_error)
    order = np.lexsort((np.arange(len(table)), -table["score"].to_numpy(), ~gender_wrong.to_numpy()))
    return table.iloc[order]


def gender_name(code) -> str:
    return GENDERS[int(code)]


def ethnicity_name(code) -> str:
    return ETHNICITIES[int(code)]
