"""Overview: headline numbers with CIs, the A−B comparison in words, calibration, worst slices."""

import pandas as pd
import streamlit as st

from analysis import figures, metrics, report
from analysis.constants import MODEL_KEYS, SMALL_SLICE_N
from app import gallery, layout, wording

WORST_K = 5
METRIC_TITLES = {"age_mae": "age MAE, years", "gender_acc": "gender accuracy"}


def _signed(value: float) -> str:
    """+0.42 / -0.42, and 0.00 (not -0.00) for a difference that rounds to nothing."""
    text = f"{value:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text


def render_headlines(current) -> None:
    """Gender accuracy and age MAE per model (B's deltas are against A)."""
    evaluation = current.evaluation
    slices = evaluation.tables["slices"]
    overall = slices[slices["slice_by"] == "overall"].set_index("model")
    columns = st.columns(len(overall))
    baseline = overall.iloc[0]
    for column, (slot, row) in zip(columns, overall.iterrows()):
        with column:
            st.markdown(f"##### Model {slot} · {evaluation.models[slot].name}")
            left, right = st.columns(2)
            is_baseline = slot == overall.index[0]
            points = (row["gender_acc"] - baseline["gender_acc"]) * 100
            years = row["age_mae"] - baseline["age_mae"]
            left.metric(
                "Gender accuracy",
                wording.percent(row["gender_acc"]),
                delta=None if is_baseline else f"{points:+.1f} points vs {overall.index[0]}",
                delta_color="off" if round(points, 1) == 0 else "normal",  # no green arrow for a tie
                border=True,
                help="Share of images whose predicted gender (P(female) ≥ 0.5) is right.",
            )
            left.caption(wording.ci_text(row["gender_acc_lo"], row["gender_acc_hi"], "percent"))
            right.metric(
                "Age MAE",
                wording.years(row["age_mae"]),
                delta=None if is_baseline else f"{_signed(years)} years vs {overall.index[0]}",
                delta_color="off" if round(years, 2) == 0 else "inverse",
                border=True,
                help="Mean absolute age error in years (lower is better).",
            )
            right.caption(
                wording.ci_text(row["age_mae_lo"], row["age_mae_hi"])
                + f" · bias {row['age_bias']:+.2f} years"
            )


def render_label_check(current) -> None:
    """A note on the gender labels every model contradicts (likely wrong labels), when there are any."""
    text = report.label_check_text(current.evaluation.summary["label_check"], f"on Errors → '{gallery.ERROR_KINDS['contradicted']}'")
    if text:
        st.info(text, icon=":material/label_off:")


def render_training_overlap(current) -> None:
    """A warning when a model is evaluated on images it was trained or validated on."""
    for text in report.training_overlap_lines(current.evaluation.training_overlap):
        st.warning(text, icon=":material/warning:")
    held_out = report.held_out_text(current.evaluation.training_overlap)
    if held_out:
        st.caption(held_out)


def render_comparison(current) -> None:
    comparison = current.evaluation.tables.get("comparison")
    if comparison is None:
        missing = next((slot for slot in MODEL_KEYS if slot not in current.evaluation.models), "B")
        st.caption(f"Load a model {missing} to compare two models on the same images.")
        return
    row = comparison[comparison["slice_by"] == "overall"].iloc[0]
    st.markdown("#### A vs B on the same images")
    st.markdown(f"- {wording.age_comparison(row)}\n- {wording.gender_comparison(row)}")
    st.caption(
        "Paired tests: both models judged the same images. p is the chance of a difference at least this "
        f"large if the models were equally good; below {wording.ALPHA} we call it clear."
    )


def render_calibration(current) -> None:
    evaluation = current.evaluation
    ece = {slot: entry["gender_ece"] for slot, entry in evaluation.summary["models"].items()}
    st.markdown("#### Calibration")
    names = layout.model_names(current)
    layout.show_chart(
        current, "reliability_chart", lambda: figures.reliability_chart(evaluation.tables["calibration"], ece=ece, names=names)
    )
    intervals = {slot: entry.get("gender_ece_ci") for slot, entry in evaluation.summary["models"].items()}
    st.caption(
        " · ".join(f"ECE {slot}: {value:.3f}" + (f" [{intervals[slot][0]:.3f}, {intervals[slot][1]:.3f}]"
                                                 if intervals[slot] and wording.known(*intervals[slot]) else "")
                   for slot, value in ece.items())
        + " — the average gap between predicted P(female) and the observed share of women (lower is better), with a "
        "conservative 95% interval: one starting at 0 is compatible with perfect calibration."
    )


def render_worst_slices(current) -> None:
    slices = current.evaluation.tables["slices"]
    st.markdown("#### Worst slices")
    st.caption(f"The groups where each model does worst; groups with fewer than {SMALL_SLICE_N} images are left out.")
    for metric, title in (("age_mae", "Highest age MAE"), ("gender_acc", "Lowest gender accuracy")):
        worst = metrics.worst_slices(slices, metric, k=WORST_K)
        st.markdown(f"**{title}**")
        st.dataframe(
            worst_slice_table(worst, metric),
            hide_index=True,
            column_config={"model": st.column_config.TextColumn(width="small"), "n": st.column_config.NumberColumn(width="small")},
        )


def worst_slice_table(worst, metric: str):
    """Readable rows: model, group ("age band 3–9"), n, value with its 95% CI."""
    if metric == "gender_acc":
        cells = [f"{wording.percent(v)} ({wording.percent(lo)}–{wording.percent(hi)})"
                 for v, lo, hi in zip(worst[metric], worst[f"{metric}_lo"], worst[f"{metric}_hi"])]  # fmt: skip
    else:
        cells = [f"{v:.2f} ({lo:.2f}–{hi:.2f})" for v, lo, hi in zip(worst[metric], worst[f"{metric}_lo"], worst[f"{metric}_hi"])]
    return pd.DataFrame(
        {
            "model": worst["model"],
            "group": [wording.slice_name(by, label) for by, label in zip(worst["slice_by"], worst["slice"])],
            "n": worst["n"],
            f"{METRIC_TITLES[metric]} (95% CI)": cells,
        }
    )


def render_learning_curves(current) -> None:
    """The training curves of the models with a history_<K>.csv beside them (python -m training)."""
    histories = report.model_histories(current.evaluation)
    if not histories:
        return
    with st.expander(f"Training: learning curves of model {' and '.join(histories)}"):
        names = layout.model_names(current)
        layout.show_chart(current, "learning_curves", lambda: figures.learning_curves_chart(histories, names))


current = layout.require_evaluation()
st.title("Overview")
layout.render_setup_caption(current)
render_headlines(current)
render_training_overlap(current)
render_label_check(current)
render_comparison(current)
calibration_column, worst_column = st.columns(2, gap="large")
with calibration_column:
    render_calibration(current)
with worst_column:
    render_worst_slices(current)
render_learning_curves(current)
