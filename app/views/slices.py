"""Slices: metrics by age band, gender, ethnicity and their intersections, with CIs and fairness gaps."""

import pandas as pd
import streamlit as st

from analysis import figures
from analysis.constants import SMALL_SLICE_N
from app import layout, wording

SLICINGS = {
    "age_band": "Age band",
    "gender": "Gender",
    "ethnicity": "Ethnicity",
    "age_band×gender": "Age band × gender",
    "age_band×ethnicity": "Age band × ethnicity",
    "gender×ethnicity": "Gender × ethnicity",
}
HEATMAP_METRICS = {"age_mae": "Age MAE", "gender_acc": "Gender accuracy"}
# Narrower than the report's 60 px: two 5-column panels and the legend fit beside the sidebar on a
# 1280-px screen (at 60 px the legend was cut off).
HEATMAP_CELL_WIDTH = 44
METRIC_LABELS = {"gender_acc": "gender accuracy", "age_mae": "age MAE", "age_bias": "age bias"}


def slice_controls_ui() -> tuple[str, str, bool]:
    """(slicing, heatmap metric, hide small slices) as chosen by the user."""
    slice_by = st.segmented_control(
        "Slice by", list(SLICINGS), format_func=SLICINGS.get, key="slice_by", required=True, default="age_band"
    )
    left, right = st.columns([2, 1], vertical_alignment="bottom")
    metric = left.segmented_control(
        "Heatmap metric (intersections)", list(HEATMAP_METRICS), format_func=HEATMAP_METRICS.get,
        key="heatmap_metric", required=True, default="age_mae", disabled="×" not in slice_by,
    )
    hide_small = right.toggle(
        f"Hide slices with n < {SMALL_SLICE_N}", key="hide_small",
        help=f"Slices with fewer than {SMALL_SLICE_N} images have wide confidence intervals.",
    )
    return slice_by, metric, hide_small


def render_chart(current, slice_by: str, metric: str, hide_small: bool) -> None:
    tables = current.evaluation.tables
    slices = tables["slices"]
    if hide_small:
        slices = slices[~slices["small"]]
    if not (slices["slice_by"] == slice_by).any():
        st.info(f"No slice of {SLICINGS[slice_by].lower()} has {SMALL_SLICE_N} images or more.")
        return
    names = layout.model_names(current)
    if "×" in slice_by:
        comparison = tables.get("comparison")
        layout.show_chart(
            current, "intersection_heatmap",
            lambda: figures.intersection_heatmap(slices, slice_by, metric, comparison=comparison, names=names,
                                                 max_cell_width=HEATMAP_CELL_WIDTH),
            slice_by, metric, hide_small,
        )
    else:
        layout.show_chart(current, "slice_chart", lambda: figures.slice_chart(slices, slice_by, names=names), slice_by, hide_small)


def ci_columns(column: str, label: str, number_format: str) -> dict:
    """Column configs for a value and its 95% CI columns <column>_lo / <column>_hi."""
    return {
        column: st.column_config.NumberColumn(label, format=number_format),
        f"{column}_lo": st.column_config.NumberColumn(f"{label}: CI low", format=number_format),
        f"{column}_hi": st.column_config.NumberColumn(f"{label}: CI high", format=number_format),
    }


SLICE_COLUMN = st.column_config.TextColumn("slice", width="medium", pinned=True)


def as_percent(rows, columns):
    """`rows` with accuracy columns (shares 0–1) in percent, shown with one decimal ("69.9%")."""
    return rows.assign(**{c: rows[c] * 100 for c in columns})


def render_slice_table(current, slice_by: str, hide_small: bool) -> None:
    slices = current.evaluation.tables["slices"]
    rows = slices[slices["slice_by"] == slice_by]
    if hide_small:
        rows = rows[~rows["small"]]
    columns = ["slice", "model", "n", "gender_acc", "gender_acc_lo", "gender_acc_hi",
               "age_mae", "age_mae_lo", "age_mae_hi", "age_bias", "age_bias_lo", "age_bias_hi", "small"]
    st.dataframe(
        as_percent(rows[columns], ["gender_acc", "gender_acc_lo", "gender_acc_hi"]),
        hide_index=True,
        column_config={
            "slice": SLICE_COLUMN,
            **ci_columns("gender_acc", "gender acc", "%.1f%%"),
            **ci_columns("age_mae", "age MAE", "%.2f"),
            **ci_columns("age_bias", "age bias", "%+.2f"),
            "small": st.column_config.CheckboxColumn(f"n < {SMALL_SLICE_N}", help="Small slice: wide CI"),
        },
    )


def render_comparison_table(current, slice_by: str, hide_small: bool) -> None:
    comparison = current.evaluation.tables.get("comparison")
    if comparison is None:
        return
    rows = comparison[comparison["slice_by"] == slice_by]
    if hide_small:
        rows = rows[~rows["small"]]
    st.markdown("##### B − A on the same images")
    st.caption(
        "Negative age MAE difference: B is closer. p-values: exact McNemar (gender), Wilcoxon signed-rank (age). "
        "95% CIs: Newcombe's paired interval for the accuracy difference, a paired bootstrap for the age one. "
        "Near the edge a CI can exclude 0 while its test's p is above 0.05: Wilcoxon asks whether one model's "
        "errors are typically smaller, the bootstrap CI about the mean difference, and the exact McNemar test is "
        "conservative. Among many groups some p-values are small by chance: q is p adjusted over all groups of "
        "the table (Benjamini–Hochberg)."
    )
    columns = ["slice", "n", "gender_acc_delta", "gender_acc_delta_lo", "gender_acc_delta_hi", "mcnemar_p", "mcnemar_q",
               "age_mae_delta", "age_mae_delta_lo", "age_mae_delta_hi", "wilcoxon_p", "wilcoxon_q", "small"]
    shown = as_percent(rows[columns], ["gender_acc_delta", "gender_acc_delta_lo", "gender_acc_delta_hi"])  # points
    for p in ("mcnemar_p", "mcnemar_q", "wilcoxon_p", "wilcoxon_q"):  # "< 0.001" rather than "0.000"
        shown[p] = ["–" if pd.isna(v) else wording.p_text(v).removeprefix("p ").removeprefix("= ") for v in shown[p]]
    st.dataframe(
        shown,
        hide_index=True,
        column_config={
            "slice": SLICE_COLUMN,
            **ci_columns("gender_acc_delta", "gender acc B − A (points)", "%+.1f"),
            "mcnemar_p": st.column_config.TextColumn("p (McNemar)"),
            "mcnemar_q": st.column_config.TextColumn("q (McNemar)"),
            **ci_columns("age_mae_delta", "age MAE B − A", "%+.2f"),
            "wilcoxon_p": st.column_config.TextColumn("p (Wilcoxon)"),
            "wilcoxon_q": st.column_config.TextColumn("q (Wilcoxon)"),
            "small": st.column_config.CheckboxColumn(f"n < {SMALL_SLICE_N}"),
        },
    )


def render_gaps(current, slice_by: str) -> None:
    gaps = current.evaluation.tables["gaps"]
    rows = gaps[gaps["slice_by"] == slice_by]
    st.markdown("##### Fairness gaps")
    if rows.empty:
        st.caption(f"Fewer than two groups with {SMALL_SLICE_N}+ images: no gap to report for this slicing.")
        return
    lines = []
    for row in rows.itertuples():
        if row.metric == "gender_acc":
            gap, best, worst = f"{row.gap * 100:.1f} points", wording.percent(row.best_value), wording.percent(row.worst_value)
        else:
            signed = "+" if row.metric == "age_bias" else ""
            gap, best, worst = f"{row.gap:.2f} years", f"{row.best_value:{signed}.2f}", f"{row.worst_value:{signed}.2f}"
        lines.append(
            f"- **{row.model}** {METRIC_LABELS[row.metric]}: **{gap}** — worst {row.worst_slice} ({worst}), best {row.best_slice} ({best})"
        )
    st.markdown("\n".join(lines))
    left_out = int(rows["n_excluded"].max())
    st.caption(
        f"Gap = how much worse the worst group is than the best, among the groups with at least {SMALL_SLICE_N} "
        "images (for the bias: the distance from zero, worst minus best)"
        + (f"; {left_out} smaller group(s) left out." if left_out else ".")
    )


def render_age_error_by_age(current) -> None:
    table = current.evaluation.tables["age_error_by_true_age"]
    names = layout.model_names(current)
    layout.show_chart(current, "age_error_chart", lambda: figures.age_error_chart(table, names=names))
    predictions, keys = current.evaluation.predictions, list(current.evaluation.models)
    layout.show_chart(current, "age_scatter", lambda: figures.age_scatter(predictions, keys, names))


current = layout.require_evaluation()
st.title("Slices")
layout.render_setup_caption(current)
slice_by, metric, hide_small = slice_controls_ui()
render_chart(current, slice_by, metric, hide_small)
render_gaps(current, slice_by)
st.markdown(f"##### {SLICINGS[slice_by]}: per model")
render_slice_table(current, slice_by, hide_small)
render_comparison_table(current, slice_by, hide_small)
with st.expander("Age error by true age · predicted vs true age"):
    render_age_error_by_age(current)
