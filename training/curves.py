"""Learning curves (loss, gender accuracy, age MAE; training vs validation) as an Altair chart.

Drawing is separate from training: :func:`learning_curves_chart` takes the history table that
:mod:`training.train` writes (one row per epoch, Keras log names as columns) and returns a chart;
:func:`chart_png` / :func:`chart_svg` render it with vl-convert (no browser, no matplotlib).
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

# (history column without the "val_" prefix, panel title)
PANELS = (
    ("loss", "loss (weighted sum)"),
    ("gender_accuracy", "gender accuracy"),
    ("age_mae", "age MAE (years)"),
)


def curves_table(history: pd.DataFrame) -> pd.DataFrame:
    """Long table: epoch, panel, subset ("training"/"validation"), value."""
    rows = []
    for column, title in PANELS:
        for subset, name in (("training", column), ("validation", f"val_{column}")):
            if name in history:
                rows.append(pd.DataFrame({"epoch": history["epoch"], "panel": title, "subset": subset, "value": history[name]}))
    if not rows:
        raise ValueError("history has none of the columns loss, gender_accuracy, age_mae")
    return pd.concat(rows, ignore_index=True)


def phase_starts(history: pd.DataFrame) -> pd.DataFrame:
    """Where a new training phase starts: epoch = x position of the boundary (between two
    epochs), phase = name of the phase that starts there. Empty with fewer than two phases."""
    if "phase" not in history or history["phase"].nunique() < 2:
        return pd.DataFrame({"epoch": [], "phase": []})
    phase = history["phase"].astype(str)
    starts = phase.ne(phase.shift()) & (np.arange(len(phase)) > 0)
    return pd.DataFrame({"epoch": history.loc[starts, "epoch"].astype(float) - 0.5, "phase": phase[starts]}).reset_index(drop=True)


def learning_curves_chart(history: pd.DataFrame, title: str = "") -> alt.HConcatChart:
    """One panel per metric, training vs validation per epoch; dashed rule at each phase start,
    labelled with the phase's name (B: "fine-tune"; "clean" for the epochs without augmentation)."""
    table = curves_table(history)
    boundaries = phase_starts(history)
    panels = []
    for _column, panel in PANELS:
        data = table[table["panel"] == panel]
        if data.empty:
            continue
        lines = (
            alt.Chart(data)
            .mark_line(point=True)
            .encode(
                x=alt.X("epoch:Q", title="epoch", axis=alt.Axis(tickMinStep=1)),
                y=alt.Y("value:Q", title=panel, scale=alt.Scale(zero=False)),
                color=alt.Color("subset:N", title=None, scale=alt.Scale(domain=["training", "validation"])),
            )
            .properties(width=260, height=200, title=panel)
        )
        if not boundaries.empty:
            rule = (
                alt.Chart(boundaries)
                .mark_rule(strokeDash=[5, 4], color="gray")
                .encode(x="epoch:Q", tooltip=alt.Tooltip("phase:N", title="phase starting"))
            )
            label = (
                alt.Chart(boundaries)
                .mark_text(align="left", dx=3, dy=-90, color="gray", fontSize=10)
                .encode(x="epoch:Q", text="phase:N")
            )
            lines = alt.layer(lines, rule, label)
        panels.append(lines)
    return alt.hconcat(*panels).properties(title=title)


def chart_png(chart: alt.TopLevelMixin, scale: float = 2.0) -> bytes:
    import vl_convert

    return vl_convert.vegalite_to_png(chart.to_dict(), scale=scale)


def chart_svg(chart: alt.TopLevelMixin) -> str:
    import vl_convert

    return vl_convert.vegalite_to_svg(chart.to_dict())
