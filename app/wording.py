"""Numbers into plain words for the dashboard ("B is 1.8 years better on age, p < 0.001").

Pure formatting of values that `analysis.metrics` computed; no streamlit import, no statistics.
"""

from __future__ import annotations

import math

from analysis.report import p_text  # noqa: F401 (part of this module's vocabulary)

ALPHA = 0.05  # below this p-value a difference is called clear


def percent(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value * 100:.{digits}f}%"


def years(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f} years"


def known(lo: float | None, hi: float | None) -> bool:
    """Both ends of an interval present (not None, not NaN)."""
    return not (lo is None or hi is None or any(isinstance(v, float) and math.isnan(v) for v in (lo, hi)))


def ci_text(lo: float | None, hi: float | None, kind: str = "years") -> str:
    """ "95% CI 91.0%–94.2%" or "95% CI 5.80–6.90 years"; "" when the CI is missing."""
    if not known(lo, hi):
        return ""
    if kind == "percent":
        return f"95% CI {percent(lo)}–{percent(hi)}"
    return f"95% CI {lo:.2f}–{hi:.2f} years"


def age_comparison(comparison_row, a: str = "A", b: str = "B") -> str:
    """One sentence on the paired age comparison (overall row of metrics.compare_table).

    age_mae_delta = MAE_b − MAE_a, so a negative delta means b is better.
    """
    mae_a, mae_b = comparison_row[f"age_mae_{a}"], comparison_row[f"age_mae_{b}"]
    delta, p = comparison_row["age_mae_delta"], comparison_row["wilcoxon_p"]
    lo, hi = comparison_row.get("age_mae_delta_lo"), comparison_row.get("age_mae_delta_hi")
    better, worse = (b, a) if delta < 0 else (a, b)
    size = abs(delta)
    numbers = f"MAE {a} {mae_a:.2f}, {b} {mae_b:.2f} years"
    interval = ""
    if known(lo, hi):
        interval = f"; 95% CI of {b} − {a}: {lo:+.2f} to {hi:+.2f} years"
    if size == 0:
        return f"{a} and {b} are equally good on age ({numbers}), {p_text(p)}."
    if p < ALPHA:
        return f"**{better} is {size:.2f} years better on age** than {worse} ({numbers}{interval}), {p_text(p)} (Wilcoxon signed-rank)."
    return (
        f"No clear difference on age: {better} is {size:.2f} years better than {worse} ({numbers}{interval}), "
        f"{p_text(p)} (Wilcoxon signed-rank) — could be chance."
    )


def gender_comparison(comparison_row, a: str = "A", b: str = "B") -> str:
    """One sentence on the paired gender comparison (overall row of metrics.compare_table)."""
    acc_a, acc_b = comparison_row[f"gender_acc_{a}"], comparison_row[f"gender_acc_{b}"]
    delta, p = comparison_row["gender_acc_delta"], comparison_row["mcnemar_p"]
    only_a, only_b = comparison_row.get(f"only_{a}_correct"), comparison_row.get(f"only_{b}_correct")
    better, worse = (b, a) if delta > 0 else (a, b)
    points = abs(delta) * 100
    numbers = f"accuracy {a} {percent(acc_a)}, {b} {percent(acc_b)}"
    if only_a is not None and only_b is not None:
        numbers += f"; only {a} right on {int(only_a)} image{'' if int(only_a) == 1 else 's'}, only {b} on {int(only_b)}"
    lo, hi = comparison_row.get("gender_acc_delta_lo"), comparison_row.get("gender_acc_delta_hi")
    has_ci = known(lo, hi)
    if has_ci:
        numbers += f"; 95% CI of {b} − {a}: {lo * 100:+.1f} to {hi * 100:+.1f} points"
    if points == 0:
        return f"{a} and {b} are equally accurate on gender ({numbers}), {p_text(p)}."
    if p < ALPHA:
        return f"**{better} is {points:.1f} points more accurate on gender** than {worse} ({numbers}), {p_text(p)} (exact McNemar)."
    edge = (" The interval just excludes 0 while the exact test, which is conservative, does not reach p < 0.05: "
            "a borderline difference." if has_ci and (lo > 0 or hi < 0) else "")
    return (
        f"No clear difference on gender: {better} is {points:.1f} points more accurate than {worse} ({numbers}), "
        f"{p_text(p)} (exact McNemar) — could be chance.{edge}"
    )


def slice_name(slice_by: str, slice_label: str) -> str:
    """A group in words: "age 20–29", "female", "age 20–29 × female", "male × White"."""
    attributes = slice_by.split("×")
    parts = slice_label.split(" × ")
    if len(attributes) != len(parts):
        return slice_label
    return " × ".join(f"age {part}" if attribute == "age_band" else part for attribute, part in zip(attributes, parts))
