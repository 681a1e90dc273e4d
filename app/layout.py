"""Pieces every page draws the same way: the demo notice, the "nothing to show" state, captions."""

from __future__ import annotations

import streamlit as st

from app import state

DEMO_HOW_TO = (
    "To evaluate your own models, drop a `.keras` or `.h5` file into **Models** in the sidebar "
    "(or type its path), and give a folder or `.zip` of UTKFace-style images "
    "(`AGE_GENDER_RACE_DATETIME.jpg`) under **Held-out sample**."
)


def render_demo_banner() -> None:
    parts = state.demo_parts()
    if not parts:
        return
    if len(parts) == len(st.session_state["models"]) + 1:
        st.info(
            "**This is the built-in demo.** Two tiny models trained on synthetic cartoon faces, "
            f"evaluated on {state.DEMO_SAMPLE_SIZE} generated faces: the numbers only show how the dashboard "
            f"works and say nothing about real models. {DEMO_HOW_TO}",
            icon=":material/science:",
        )
    else:
        st.info(f"**Partly the built-in demo:** the {' and '.join(parts)} {'is' if len(parts) == 1 else 'are'} "
                f"synthetic demo material. {DEMO_HOW_TO}", icon=":material/science:")


def require_evaluation():
    """The current Evaluation; otherwise say what is missing and stop drawing the page."""
    current: state.Current = st.session_state["current"]
    for problem in current.problems:
        st.error(problem, icon=":material/error:")
    if current.evaluation is None:
        if not current.problems:
            st.warning("Nothing to show yet. " + DEMO_HOW_TO)
        st.stop()
    return current


def render_setup_caption(current: state.Current) -> None:
    evaluation = current.evaluation
    models = " · ".join(f"**{slot}**: {loaded.name}" for slot, loaded in evaluation.models.items())
    reading, decoding = len(evaluation.sample.skipped), len(evaluation.run.skipped)
    skipped = ""
    if decoding:  # the sidebar lists only the files skipped when reading
        skipped = f" ({reading + decoding:,} skipped: {reading:,} when reading, {decoding:,} when decoding; all in skipped.csv on the Export page)"
    elif reading:
        skipped = f" ({reading:,} skipped)"
    st.caption(
        f"{len(evaluation.predictions):,} images evaluated"
        + skipped
        + f" · {models} · 95% CIs: Wilson for accuracy, {current.n_boot:,} bootstrap resamples for age and ECE"
    )


def model_names(current: state.Current) -> dict[str, str]:
    return {slot: loaded.name for slot, loaded in current.evaluation.models.items()}


def show_chart(current, figure: str, build, *options) -> None:
    """Draw an analysis.figures chart; `build()` makes it, `figure` and `options` identify it.

    The Vega-Lite spec is cached per evaluation (state.chart_spec), so a rerun only sends it.
    """
    identity = (*options, tuple(model_names(current).items()))  # legends show the model names
    spec = state.chart_spec(state.tables_key(current), figure, identity, build)
    st.vega_lite_chart(spec, width="content")


def forget_stale_choice(key: str, options) -> None:
    """Forget a remembered widget value that is no longer offered (e.g. model B after it was removed),
    so the widget starts again from its default. Call before drawing the widget."""
    value = st.session_state.get(key)
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    if any(v not in options for v in values):
        del st.session_state[key]
