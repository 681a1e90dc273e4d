"""Charts of an evaluation: finished tables in, Altair charts (and one PIL grid) out.

One function per figure. Each takes the tables that `analysis.metrics` produced (or the
Predictions table, or a training history) and only *draws* them: no metric is recomputed here,
so a figure always shows the same numbers as the table next to it in the report.

Conventions shared by every figure:
- Models keep one look everywhere (`MODEL_STYLES`): A dark blue, solid lines/outlines, circles;
  B orange, dashed lines/outlines, triangles. Okabe–Ito colours, chosen to stay apart for
  colour-blind readers and, by lightness plus dash/shape, when printed in greyscale.
- Labels say what a value is and its unit: "Age MAE (years)", "Gender accuracy (%)".
- Slices with fewer than SMALL_SLICE_N images are faded and the subtitle says so.

`chart_png` / `chart_svg` render offline with vl-convert (no browser). PNGs are written at
`PNG_PPI` pixels per inch for the chart's nominal size (Vega lays charts out in 1/72-inch
points), i.e. 3× the pixels of the SVG and tagged 216 dpi.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from analysis.constants import SMALL_SLICE_N
from analysis.dataset import find_training_file

# ------------------------------------------------------------------ style


@dataclass(frozen=True)
class ModelStyle:
    colour: str
    dash: tuple[int, ...]  # Vega strokeDash: (1, 0) is solid
    shape: str  # Vega point shape


# Okabe–Ito blue and orange: greyscale lightness ~35% vs ~65%, plus dash and shape cues.
MODEL_STYLES: dict[str, ModelStyle] = {
    "A": ModelStyle(colour="#0072B2", dash=(1, 0), shape="circle"),
    "B": ModelStyle(colour="#E69F00", dash=(6, 3), shape="triangle-up"),
}
_EXTRA_STYLES = (ModelStyle("#009E73", (2, 2), "square"), ModelStyle("#CC79A7", (8, 2, 2, 2), "diamond"))

SMALL_OPACITY = 0.35
SMALL_NOTE = f"Faded: fewer than {SMALL_SLICE_N} images (wide confidence intervals)."
CI_NOTE = "Error bars: 95% confidence intervals."

PANEL_WIDTH = 320
PANEL_HEIGHT = 220
PNG_PPI = 216  # = vl-convert scale 3 at Vega's 72 points per inch

SLICE_TITLES = {
    "overall": "All images",
    "age_band": "Age band (years)",
    "gender": "Gender",
    "ethnicity": "Ethnicity",
}

# metric column -> (axis title, Vega number format, higher is better)
METRICS = {
    "gender_acc": ("Gender accuracy (%)", ".0%", True),
    "age_mae": ("Age MAE (years)", ".1f", False),
    "age_bias": ("Age bias, predicted − true (years)", "+.1f", None),
}


def model_style(key: str) -> ModelStyle:
    if key in MODEL_STYLES:
        return MODEL_STYLES[key]
    return _EXTRA_STYLES[sum(map(ord, key)) % len(_EXTRA_STYLES)]


def model_label(key: str, names: Mapping[str, str] | None = None) -> str:
    """Legend label of a model: "A: my_model.keras" (or just "A" without a name)."""
    name = (names or {}).get(key)
    return f"{key}: {name}" if name and name != key else str(key)


def _model_encodings(keys: Sequence[str], names: Mapping[str, str] | None, labels: Mapping[str, str] | None = None):
    """Colour, stroke-dash and shape encodings of `model_label` that give each model its fixed look.

    `labels` (model key -> legend text) overrides the default "A: name" labels.
    """
    domain = [(labels or {}).get(k) or model_label(k, names) for k in keys]
    styles = [model_style(k) for k in keys]
    # One model per row: side by side, two long file names overflow a half-page chart in the app.
    legend = alt.Legend(orient="bottom", columns=1, symbolStrokeWidth=2, labelLimit=400)
    colour = alt.Color("model_label:N", title="Model", scale=alt.Scale(domain=domain, range=[s.colour for s in styles]), legend=legend)
    dash = alt.StrokeDash("model_label:N", title="Model", scale=alt.Scale(domain=domain, range=[list(s.dash) for s in styles]), legend=legend)
    shape = alt.Shape("model_label:N", title="Model", scale=alt.Scale(domain=domain, range=[s.shape for s in styles]), legend=legend)
    return colour, dash, shape


def _with_model_labels(table: pd.DataFrame, names: Mapping[str, str] | None) -> tuple[pd.DataFrame, list[str]]:
    if "model" not in table:
        raise ValueError(f"table needs a 'model' column; it has {list(table.columns)}")
    keys = _ordered(table["model"].astype(str))
    data = table.copy()
    data["model"] = data["model"].astype(str)
    data["model_label"] = [model_label(k, names) for k in data["model"]]
    return data, keys


def _ordered(values) -> list:
    """Unique values in order of first appearance (the metric tables are already sorted)."""
    return list(dict.fromkeys(values))


def _require(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{what} needs columns {missing}; the table has {list(table.columns)}")


def _title(text: str, *notes: str) -> alt.TitleParams:
    notes = [n for n in notes if n]
    return alt.TitleParams(text, subtitle=notes or None, anchor="start", fontSize=15, subtitleFontSize=11)


# ------------------------------------------------------------------ bars with CIs


def _metric_bars(data: pd.DataFrame, keys, names, metric: str, x_field: str, x_title: str, x_order) -> alt.LayerChart:
    """Grouped bars (one per model inside each x category) with CI whiskers; small slices faded."""
    axis_title, number_format, _ = METRICS[metric]
    colour, dash, _ = _model_encodings(keys, names)
    y_scale = alt.Scale(domain=[0, 1]) if metric == "gender_acc" else alt.Scale(zero=True)
    base = alt.Chart(data).encode(
        x=alt.X(
            f"{x_field}:N", sort=x_order, title=x_title,
            axis=alt.Axis(labelAngle=0, labelExpr="split(datum.label, '\\n')", labelLimit=120),
        ),
        xOffset=alt.XOffset("model_label:N", sort=[model_label(k, names) for k in keys]),
        tooltip=[
            alt.Tooltip("model_label:N", title="Model"),
            alt.Tooltip("slice:N", title="Slice"),
            alt.Tooltip("n:Q", title="Images"),
            alt.Tooltip(f"{metric}:Q", title=axis_title, format=number_format.lstrip("+")),
            alt.Tooltip(f"{metric}_lo:Q", title="95% CI low", format=number_format.lstrip("+")),
            alt.Tooltip(f"{metric}_hi:Q", title="95% CI high", format=number_format.lstrip("+")),
        ],
    )
    opacity = alt.condition("datum.small", alt.value(SMALL_OPACITY), alt.value(1.0))
    bars = base.mark_bar(stroke="black", strokeWidth=1.2).encode(
        y=alt.Y(f"{metric}:Q", title=axis_title, scale=y_scale, axis=alt.Axis(format=number_format.lstrip("+"))),
        color=colour,
        strokeDash=dash,
        opacity=opacity,
    )
    whisker = base.mark_rule(color="black", strokeWidth=1.4).encode(
        y=alt.Y(f"{metric}_lo:Q"), y2=alt.Y2(f"{metric}_hi:Q"), opacity=opacity
    )
    caps = [
        base.mark_tick(color="black", thickness=1.4, size=8).encode(y=alt.Y(f"{metric}_{end}:Q"), opacity=opacity)
        for end in ("lo", "hi")
    ]
    return alt.layer(bars, whisker, *caps)


def _slice_rows(slices: pd.DataFrame, slice_by: str) -> pd.DataFrame:
    _require(slices, ["slice_by", "slice", "model", "n", "small"], "the slice table")
    rows = slices[slices["slice_by"] == slice_by]
    if rows.empty:
        raise ValueError(f"the slice table has no rows with slice_by == {slice_by!r}")
    return rows


def overall_chart(slices: pd.DataFrame, names: Mapping[str, str] | None = None) -> alt.HConcatChart:
    """Overall gender accuracy and age MAE per model, bars with 95% CI whiskers.

    `slices` is `metrics.slice_table` output (rows with slice_by == "overall" are used);
    `names` maps model key ("A") to its display name.
    """
    rows = _slice_rows(slices, "overall")
    _require(rows, ["gender_acc", "gender_acc_lo", "gender_acc_hi", "age_mae", "age_mae_lo", "age_mae_hi"], "overall_chart")
    data, keys = _with_model_labels(rows, names)
    data["slice_label"] = [f"{SLICE_TITLES['overall']}\nn = {n:,}" for n in data["n"]]
    order = _ordered(data["slice_label"])
    panels = [
        _metric_bars(data, keys, names, metric, "slice_label", None, order)
        .properties(width=170, height=PANEL_HEIGHT, title=METRICS[metric][0])
        for metric in ("gender_acc", "age_mae")
    ]
    return alt.hconcat(*panels).properties(
        title=_title("Overall: gender accuracy and age error", CI_NOTE, _small_note(data))
    )


def slice_chart(slices: pd.DataFrame, slice_by: str, names: Mapping[str, str] | None = None) -> alt.VConcatChart:
    """Gender accuracy and age MAE per slice (age band, gender or ethnicity) for every model.

    Grouped bars with 95% CI whiskers; the number of images is printed under each slice and
    slices with n < SMALL_SLICE_N are faded.
    """
    if "×" in slice_by or slice_by == "overall":
        raise ValueError(f"slice_chart draws single slices (age_band, gender, ethnicity), got {slice_by!r}")
    rows = _slice_rows(slices, slice_by)
    data, keys = _with_model_labels(rows, names)
    data["slice_label"] = [f"{s}\nn = {n:,}" for s, n in zip(data["slice"].astype(str), data["n"])]
    order = _ordered(data["slice_label"])
    x_title = SLICE_TITLES.get(slice_by, slice_by.replace("_", " ").capitalize())
    width = max(PANEL_WIDTH, 34 * len(order) * max(1, len(keys)))
    panels = [
        _metric_bars(data, keys, names, metric, "slice_label", x_title, order)
        .properties(width=width, height=PANEL_HEIGHT, title=METRICS[metric][0])
        for metric in ("gender_acc", "age_mae")
    ]
    by_words = x_title.split(" (")[0].lower()
    return alt.vconcat(*panels).properties(
        title=_title(f"Gender accuracy and age error by {by_words}", CI_NOTE, _small_note(data))
    )


def _small_note(data: pd.DataFrame) -> str:
    return SMALL_NOTE if "small" in data and data["small"].astype(bool).any() else ""


# ------------------------------------------------------------------ intersection heatmaps


def intersection_heatmap(
    slices: pd.DataFrame,
    slice_by: str = "age_band×ethnicity",
    metric: str = "age_mae",
    comparison: pd.DataFrame | None = None,
    names: Mapping[str, str] | None = None,
    max_cell_width: int = 60,
) -> alt.VConcatChart | alt.HConcatChart:
    """Heatmap of `metric` ("age_mae" or "gender_acc") over an intersection, per model, plus B − A.

    `max_cell_width` (pixels) caps the width of a cell (the dashboard uses narrower cells than
    the report, so two panels and the legend fit beside a sidebar on a laptop screen).

    Rows are the first component (`slice_1`), columns the second (`slice_2`). Each cell prints
    its value and n; cells with n < SMALL_SLICE_N are faded and starred. The model panels share
    one colour scale. When `comparison` (metrics.compare_table) is given, a panel below shows its
    `<metric>_delta` = B − A on a diverging scale (green = B better for both metrics).
    """
    if metric not in ("age_mae", "gender_acc"):
        raise ValueError(f"metric must be 'age_mae' or 'gender_acc', got {metric!r}")
    rows = _slice_rows(slices, slice_by)
    _require(rows, ["slice_1", "slice_2", metric], "intersection_heatmap")
    data, keys = _with_model_labels(rows, names)
    axis_title, number_format, higher_better = METRICS[metric]
    y_title, x_title = (SLICE_TITLES.get(p, p) for p in slice_by.split("×"))
    y_order, x_order = _ordered(data["slice_1"].astype(str)), _ordered(data["slice_2"].astype(str))
    data["cell_text"] = [
        _cell_text(v, n, small, number_format) for v, n, small in zip(data[metric], data["n"], data["small"])
    ]
    cell_w = max(40, min(int(max_cell_width), 420 // max(1, len(x_order))))
    size = {"width": cell_w * len(x_order), "height": 30 * len(y_order)}
    upright = len(x_order) <= 6 and cell_w >= 50  # narrower cells: slanted labels, else Vega hides every other one
    x = alt.X("slice_2:N", sort=x_order, title=x_title, axis=alt.Axis(labelAngle=0 if upright else -40))
    y = alt.Y("slice_1:N", sort=y_order, title=y_title)
    opacity = alt.condition("datum.small", alt.value(SMALL_OPACITY + 0.15), alt.value(1.0))
    values = data[metric].astype(float)
    domain = _colour_range(values, data["small"])
    # Viridis keeps a monotone lightness in greyscale; reversed for MAE so "worse" is darker.
    colour = alt.Color(
        f"{metric}:Q", title=axis_title,
        scale=alt.Scale(scheme="viridis", reverse=not higher_better, domain=list(domain), clamp=True),
        legend=alt.Legend(format=number_format, orient="right"),
    )
    # Light text on dark cells; faded (small) cells are light, so their text stays black.
    data["text_light"] = np.array(_dark_cells(values, domain, reverse=not higher_better)) & ~data["small"].astype(bool).to_numpy()
    panels = []
    for key in keys:
        part = data[data["model"] == key]
        panels.append(
            _heat_panel(part, x, y, colour, opacity, model_label(key, names), size, metric, axis_title, number_format)
        )
    chart_title = f"{axis_title.split(' (')[0]} by {y_title.split(' (')[0].lower()} × {x_title.split(' (')[0].lower()}"
    notes = ["Each cell: value and number of images."]
    models_row = alt.hconcat(*panels, spacing=16)
    if comparison is None or len(keys) < 2:
        return models_row.properties(title=_title(chart_title, *notes, *_heat_notes(data["small"], _beyond(values, domain))))
    better = "positive = B more accurate" if higher_better else "negative = B smaller error"
    notes.append(f"Bottom panel: B − A from the paired comparison ({better}).")
    delta, delta_rows, delta_domain = _delta_panel(comparison, slice_by, metric, x, y, size)
    notes += _heat_notes(pd.concat([data["small"], delta_rows["small"]]),
                         _beyond(values, domain) or _beyond(delta_rows[f"{metric}_delta"], delta_domain))
    # The two model panels share one colour scale; the difference panel has its own.
    return alt.vconcat(models_row, delta, spacing=20).resolve_scale(color="independent").properties(
        title=_title(chart_title, *notes)
    )


def _beyond(values: pd.Series, domain: tuple[float, float]) -> bool:
    """Does any value lie outside the colour scale's domain (and so take its end colour)?"""
    v = values.astype(float).to_numpy()
    v = v[np.isfinite(v)]
    return bool(len(v)) and bool(np.any((v < domain[0] - 1e-12) | (v > domain[1] + 1e-12)))


def _heat_notes(small: pd.Series, clamped: bool) -> list[str]:
    """The heatmap subtitle's lines on faded cells and on the colour scale, when they apply."""
    notes = []
    if small.astype(bool).any():
        notes.append(f"* faded cells: fewer than {SMALL_SLICE_N} images.")
    if clamped:
        notes.append(f"Colours span the cells with {SMALL_SLICE_N}+ images; a value beyond that range "
                     "takes the end colour (the printed value is exact).")
    return notes


def _cell_text(value, n, small, number_format) -> str:
    """Value and n on two lines, one string with a newline (mark_text's lineBreak): an array of
    lines renders as lines in vl-convert but as "[1.2,n=20*]" in Streamlit's Vega-Lite."""
    star = "*" if bool(small) else ""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"–\nn={int(n)}{star}"
    return f"{_format_number(value, number_format)}\nn={int(n)}{star}"


def _colour_range(values: pd.Series, small: pd.Series) -> tuple[float, float]:
    """(lowest, highest) value the colour scale spans: over the cells with enough images when
    there are two or more (one n=1 cell must not wash out every other colour; beyond the range a
    cell takes the end colour), else over every cell."""
    v = values.astype(float)
    finite = v[np.isfinite(v)]
    large = v[~small.astype(bool) & np.isfinite(v)]
    use = large if len(large) >= 2 and large.max() > large.min() else finite  # equal large cells: no range
    if not len(use):
        return (0.0, 1.0)
    lo, hi = float(use.min()), float(use.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)  # one value: a range around it, not a point


def _format_number(value: float, number_format: str) -> str:
    """Python rendering of the few d3 formats used here (cell labels are precomputed text)."""
    sign = "+" if number_format.startswith("+") else ""
    spec = number_format.lstrip("+")
    digits = int(spec[1]) if spec.startswith(".") and spec[1].isdigit() else 1
    if spec.endswith("%"):
        value = value * 100
    value = round(float(value), digits) + 0.0  # no "-0.00"
    return f"{value:{sign}.{digits}f}" + ("%" if spec.endswith("%") else "")


def _dark_cells(values: pd.Series, domain: tuple[float, float], reverse: bool = False, diverging: bool = False) -> list[bool]:
    """True where the cell colour is dark enough to need light text, on the colour scale's
    `domain` (clamped: values beyond it take the end colour)."""
    v = values.astype(float).to_numpy()
    lo, hi = domain
    if diverging:
        return list(np.abs(v) > 0.6 * hi) if hi > 0 else [False] * len(v)
    t = np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.full_like(v, 0.5)
    t = 1 - t if reverse else t
    return list(t < 0.45)  # viridis is dark at its low end


def _heat_panel(part, x, y, colour, opacity, title, size, value_field, value_title, value_format) -> alt.LayerChart:
    base = alt.Chart(part).encode(x=x, y=y)
    cells = base.mark_rect(stroke="white", strokeWidth=1).encode(
        color=colour,
        opacity=opacity,
        tooltip=[alt.Tooltip("slice:N", title="Slice"), alt.Tooltip("n:Q", title="Images"),
                 alt.Tooltip(f"{value_field}:Q", title=value_title, format=value_format)],
    )
    # Vega places a multi-line text's first line at the anchor: half a line up centres both lines.
    text = base.mark_text(fontSize=9.5, lineHeight=12, lineBreak="\n", dy=-6).encode(
        text="cell_text:N",
        color=alt.condition("datum.text_light", alt.value("white"), alt.value("black")),
    )
    return alt.layer(cells, text).properties(title=title, **size)


def _delta_panel(comparison, slice_by, metric, x, y, size) -> tuple[alt.LayerChart, pd.DataFrame, tuple[float, float]]:
    """The B − A panel, its rows (delta in display units: points or years) and its colour domain."""
    delta_col = f"{metric}_delta"
    _require(comparison, ["slice_by", "slice_1", "slice_2", "n", "small", delta_col], "the comparison table")
    rows = comparison[comparison["slice_by"] == slice_by].copy()
    axis_title, number_format, higher_better = METRICS[metric]
    # Accuracy differences in percentage points (B 93% − A 90% = +3.0 points), as the legend says.
    unit, scale = ("points", 100.0) if metric == "gender_acc" else ("years", 1.0)
    delta_format = "+.1f" if metric == "gender_acc" else "+.2f"
    rows[delta_col] = rows[delta_col].astype(float) * scale
    rows["cell_text"] = [_cell_text(v, n, s, delta_format) for v, n, s in zip(rows[delta_col], rows["n"], rows["small"])]
    lo, hi = _colour_range(rows[delta_col].abs(), rows["small"])
    extent = hi or 1e-9
    rows["text_light"] = (np.array(_dark_cells(rows[delta_col], (0.0, extent), diverging=True))
                          & ~rows["small"].astype(bool).to_numpy())
    # Purple–green keeps clear of the model colours; B-better is green in both metrics.
    colour = alt.Color(
        f"{delta_col}:Q",
        title=f"B − A ({unit})",
        scale=alt.Scale(scheme="purplegreen", domain=[-extent, extent], domainMid=0, reverse=not higher_better, clamp=True),
        legend=alt.Legend(format=delta_format, orient="right"),
    )
    opacity = alt.condition("datum.small", alt.value(SMALL_OPACITY + 0.15), alt.value(1.0))
    better = "B better if > 0" if higher_better else "B better if < 0"
    title = f"B − A, {axis_title.split(' (')[0]} ({better})"
    panel = _heat_panel(rows, x, y, colour, opacity, title, size, delta_col, f"B − A ({unit})", delta_format)
    return panel, rows, (-extent, extent)


# ------------------------------------------------------------------ age: scatter and bias


def age_scatter(
    predictions: pd.DataFrame,
    model_keys: Sequence[str] | None = None,
    names: Mapping[str, str] | None = None,
    max_points: int = 2000,
    seed: int = 0,
) -> alt.HConcatChart:
    """Predicted vs true age (years), one panel per model, with the identity line y = x.

    `predictions` is the wide Predictions table (`age`, `age_pred_<key>`). Above `max_points`
    images a seeded random subset is drawn (the subtitle says so) to keep the chart light.
    """
    keys = list(model_keys) if model_keys is not None else [c[len("age_pred_"):] for c in predictions if c.startswith("age_pred_")]
    if not keys:
        raise ValueError("the predictions table has no age_pred_<model> column")
    _require(predictions, ["age"] + [f"age_pred_{k}" for k in keys], "age_scatter")
    shown = predictions
    note = f"{len(predictions):,} images; dotted line: prediction = true age."
    if len(predictions) > max_points:
        shown = predictions.sample(n=max_points, random_state=seed)
        note = f"A random {max_points:,} of {len(predictions):,} images; dotted line: prediction = true age."
    top = float(np.nanmax([shown["age"].max()] + [shown[f"age_pred_{k}"].max() for k in keys]))
    top = math.ceil(max(top, 1.0) / 10) * 10
    colour, _, shape = _model_encodings(keys, names)
    panels = []
    for key in keys:
        part = pd.DataFrame(
            {
                "image_id": shown["image_id"].to_numpy() if "image_id" in shown else np.arange(len(shown)),
                "age": shown["age"].to_numpy(),
                "age_pred": shown[f"age_pred_{key}"].to_numpy(),
                "model_label": model_label(key, names),
            }
        )
        scale = alt.Scale(domain=[0, top], nice=False)
        points = alt.Chart(part).mark_point(size=18, filled=True, opacity=0.45).encode(
            x=alt.X("age:Q", title="True age (years)", scale=scale),
            y=alt.Y("age_pred:Q", title="Predicted age (years)", scale=scale),
            color=colour,
            shape=shape,
            tooltip=[alt.Tooltip("age:Q", title="True age"), alt.Tooltip("age_pred:Q", title="Predicted", format=".1f")],
        )
        identity = alt.Chart(part).mark_rule(color="black", strokeDash=[2, 3], strokeWidth=1.2).encode(
            x=alt.datum(0), y=alt.datum(0), x2=alt.datum(top), y2=alt.datum(top)
        )
        panels.append(alt.layer(points, identity).properties(width=260, height=260, title=model_label(key, names)))
    return alt.hconcat(*panels).properties(title=_title("Predicted vs true age", note))


def age_error_chart(age_error: pd.DataFrame, names: Mapping[str, str] | None = None) -> alt.VConcatChart:
    """Signed age error (bias) and MAE against true age, one line per model.

    `age_error` is `metrics.age_error_by_true_age` output: one row per model and true-age bin,
    columns model, age_lo, age_hi (years, bin = [age_lo, age_hi)), n, age_mae, age_bias and,
    when present, their CIs (`*_lo`/`*_hi`, drawn as error bars). Points sit at the bin centre
    (two models: 0.4 years either side, so the bars do not hide each other); bins with
    n < SMALL_SLICE_N are faded; the solid line joins neighbouring bins with more, a faint one all bins.
    """
    _require(age_error, ["model", "age_lo", "age_hi", "n", "age_mae", "age_bias"], "age_error_chart")
    data, keys = _with_model_labels(age_error, names)
    colour, dash, shape = _model_encodings(keys, names)
    data["age_mid"] = (data["age_lo"].astype(float) + data["age_hi"].astype(float)) / 2
    offsets = {key: 0.4 * (2 * i - (len(keys) - 1)) for i, key in enumerate(keys)} if len(keys) > 1 else {}
    data["age_plot"] = data["age_mid"] + data["model"].map(offsets).fillna(0.0)
    data["age_range"] = [f"{lo:g}–{hi - 1:g}" for lo, hi in zip(data["age_lo"], data["age_hi"])]
    data["small"] = data["n"] < SMALL_SLICE_N
    # runs of neighbouring bins with enough images: the solid line breaks at a small bin instead of
    # joining the bins either side of it in a straight line
    data = data.sort_values(["model", "age_lo"], kind="stable")
    after_gap = data["age_lo"].astype(float) != data.groupby("model")["age_hi"].shift().astype(float)  # no images between
    data["run"] = (data["small"] | after_gap).groupby(data["model"]).cumsum()
    top = float(data["age_hi"].max()) if len(data) else 100.0
    x = alt.X("age_plot:Q", title="True age (years)", scale=alt.Scale(domain=[0, top], nice=False))
    tooltip = [
        alt.Tooltip("model_label:N", title="Model"), alt.Tooltip("age_range:N", title="True age (years)"),
        alt.Tooltip("n:Q", title="Images"), alt.Tooltip("age_bias:Q", title="Mean signed error (years)", format="+.2f"),
        alt.Tooltip("age_mae:Q", title="MAE (years)", format=".2f"),
    ]
    opacity = alt.condition("datum.small", alt.value(SMALL_OPACITY), alt.value(1.0))
    has_ci = {f"{m}_{end}" for m in ("age_mae", "age_bias") for end in ("lo", "hi")} <= set(data.columns)
    panels = []
    for metric, panel_title in (("age_bias", "Signed error: above 0 = predicted too old"), ("age_mae", "Mean absolute error")):
        y = alt.Y(f"{metric}:Q", title=METRICS[metric][0])
        layers = []
        if metric == "age_bias":
            layers.append(alt.Chart(data).mark_rule(color="black", strokeWidth=1).encode(y=alt.datum(0)))
        line = alt.Chart(data).encode(x=x, y=y, color=colour, strokeDash=dash)
        # The solid line first: the legend takes its symbols from the first layer.
        layers.append(line.mark_line(strokeWidth=2).encode(detail="run:N").transform_filter("!datum.small"))
        layers.append(line.mark_line(strokeWidth=1.5, strokeOpacity=SMALL_OPACITY))
        if has_ci:
            layers.append(_ci_rules(data, x, metric, colour, opacity))
        layers.append(
            alt.Chart(data).mark_point(filled=True, size=36).encode(
                x=x, y=y, color=colour, shape=shape, opacity=opacity, tooltip=tooltip
            )
        )
        panels.append(alt.layer(*layers).properties(width=PANEL_WIDTH + 160, height=180, title=panel_title))
    width = int((data["age_hi"] - data["age_lo"]).iloc[0]) if len(data) else 0
    notes = [f"Points: mean over {width}-year bins of true age." if width else ""]
    if has_ci:
        notes[0] += " " + CI_NOTE
    if data["small"].any():
        notes.append(f"Faded: fewer than {SMALL_SLICE_N} images; the solid line joins only neighbouring bins with more.")
    return alt.vconcat(*panels, spacing=14).properties(title=_title("Age error by true age", *notes))


def _ci_rules(data: pd.DataFrame, x, column: str, colour, opacity) -> alt.Chart:
    """Error bars in each model's colour: a vertical rule from `<column>_lo` to `<column>_hi`."""
    return alt.Chart(data).mark_rule(strokeWidth=1.5).encode(
        x=x, y=alt.Y(f"{column}_lo:Q"), y2=f"{column}_hi:Q", color=colour, opacity=opacity)


# ------------------------------------------------------------------ gender calibration


def reliability_chart(
    calibration: pd.DataFrame,
    ece: Mapping[str, float] | None = None,
    names: Mapping[str, str] | None = None,
) -> alt.LayerChart:
    """Reliability diagram of P(female): mean predicted probability vs observed share of women.

    `calibration` is `metrics.calibration_table` output with a `model` column: one row per
    probability bin (bin, lo, hi, n, mean_p_female, frac_female); empty bins are not drawn.
    `ece` maps model key to its expected calibration error (summary["models"][key]["gender_ece"]),
    printed in the legend.
    """
    _require(calibration, ["model", "n", "mean_p_female", "frac_female"], "reliability_chart")
    data, keys = _with_model_labels(calibration[calibration["n"] > 0], names)
    ece = dict(ece or {})
    labels = {k: model_label(k, names) + (f" (ECE {ece[k]:.3f})" if ece.get(k) is not None else "") for k in keys}
    data["model_label"] = data["model"].map(labels)
    colour, dash, shape = _model_encodings(keys, names, labels)
    axis = alt.Scale(domain=[0, 1], padding=10)  # room for the large points at 0% and 100%
    x = alt.X("mean_p_female:Q", title="Predicted probability of female (%)", scale=axis, axis=alt.Axis(format=".0%"))
    y = alt.Y("frac_female:Q", title="Observed share of women (%)", scale=axis, axis=alt.Axis(format=".0%"))
    tooltip = [
        alt.Tooltip("model_label:N", title="Model"), alt.Tooltip("mean_p_female:Q", format=".2f", title="Mean P(female)"),
        alt.Tooltip("frac_female:Q", format=".2f", title="Observed share"), alt.Tooltip("n:Q", title="Images"),
    ]
    size = alt.Size("n:Q", title="Images in bin", scale=alt.Scale(range=[20, 220], zero=False), legend=alt.Legend(orient="right"))
    diagonal = alt.Chart(data).mark_rule(color="black", strokeDash=[2, 3]).encode(
        x=alt.datum(0), y=alt.datum(0), x2=alt.datum(1), y2=alt.datum(1)
    )
    line = alt.Chart(data).mark_line(strokeWidth=2).encode(x=x, y=y, color=colour, strokeDash=dash)
    small = data["n"] < SMALL_SLICE_N
    data["small"] = small
    opacity = alt.condition("datum.small", alt.value(SMALL_OPACITY), alt.value(0.9))
    chart_layers = [diagonal, line]
    notes = ["Dotted line: perfect calibration. ECE: expected calibration error (lower is better)."]
    if {"frac_female_lo", "frac_female_hi"} <= set(data.columns):
        chart_layers.append(_ci_rules(data, x, "frac_female", colour, opacity))
        notes.append("Error bars: 95% confidence intervals of the observed share (Wilson).")
    chart_layers.append(alt.Chart(data).mark_point(filled=True).encode(
        x=x, y=y, color=colour, shape=shape, size=size, opacity=opacity, tooltip=tooltip))
    if small.any():
        notes.append(f"Faded: bins with fewer than {SMALL_SLICE_N} images.")
    return alt.layer(*chart_layers).properties(
        width=300, height=300, title=_title("Gender calibration (reliability diagram)", *notes))


# ------------------------------------------------------------------ learning curves

# (panel title, how to recognise the training column); validation columns are "val_" + name.
_HISTORY_PANELS = (
    ("Loss", lambda c: c == "loss"),
    ("Age MAE (years)", lambda c: "age" in c and ("mae" in c or "mean_absolute_error" in c)),
    ("Gender accuracy (%)", lambda c: "gender" in c and "acc" in c),
)


def history_table(histories: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Long table (model, epoch, panel, subset, value, phase) from Keras CSVLogger-style histories.

    Column names are matched loosely (`age_mae`, `age_output_mae`, `age_mean_absolute_error`;
    `gender_accuracy`, `gender_binary_accuracy`, ...); unrecognised columns are ignored.
    """
    rows = []
    for key, history in histories.items():
        if history is None or history.empty:
            continue
        history = history.rename(columns=lambda c: str(c).strip().lower())
        epoch = history["epoch"] if "epoch" in history else pd.Series(np.arange(len(history)), index=history.index)
        phase = history["phase"].astype(str) if "phase" in history else pd.Series("", index=history.index)
        train_columns = [c for c in history.columns if not c.startswith("val_") and c not in ("epoch", "phase", "lr", "learning_rate")]
        for panel, matches in _HISTORY_PANELS:
            column = next((c for c in train_columns if matches(c)), None)
            if column is None:
                continue
            for subset, name in (("training", column), ("validation", f"val_{column}")):
                if name in history:
                    rows.append(pd.DataFrame({
                        "model": key, "epoch": epoch.to_numpy(), "panel": panel, "subset": subset,
                        "value": pd.to_numeric(history[name], errors="coerce").to_numpy(), "phase": phase.to_numpy(),
                    }))
    if not rows:
        return pd.DataFrame(columns=["model", "epoch", "panel", "subset", "value", "phase"])
    return pd.concat(rows, ignore_index=True)


def read_history(path) -> pd.DataFrame | None:
    """A training history CSV, or None when the file is absent or unreadable."""
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    return table if len(table) else None


def find_history(model_path) -> Path | None:
    """The history file our training writes next to a model (`age_gender_A.keras` → `history_A.csv`).

    Also accepts `<stem>_history.csv` / `<stem>.history.csv`. Returns None when there is none.
    """
    return find_training_file(model_path, "history")


def _phase_starts(histories: Mapping[str, pd.DataFrame], names) -> pd.DataFrame:
    """Epochs where a model's training `phase` changes (model, model_label, epoch, phase, boundary):
    `epoch` is the first epoch of the new phase, `boundary` the x position between the two epochs."""
    rows = []
    for key, history in histories.items():
        if history is None or "phase" not in history or "epoch" not in history:
            continue
        phase = history["phase"].astype(str)
        changed = phase.ne(phase.shift()) & (np.arange(len(phase)) > 0)
        for epoch, name in zip(history.loc[changed, "epoch"], phase[changed]):
            rows.append({"model": key, "model_label": model_label(key, names), "epoch": epoch, "phase": name,
                         "boundary": float(epoch) - 0.5})
    return pd.DataFrame(rows, columns=["model", "model_label", "epoch", "phase", "boundary"])


# Pixels between two lines of phase labels, and the share of a panel's epochs one label spans.
PHASE_LABEL_LINE = 12
PHASE_LABEL_SPAN = 0.25


def _phase_labels(starts: pd.DataFrame, low: float, high: float) -> pd.DataFrame:
    """One label per phase start of the learning curves (two models starting a phase of the same
    name at the same epoch share one): `near_end` when in the last fifth of the epochs (drawn left
    of its line, there is too little room right of it), and the `level` (line) it is drawn on —
    the first on which it does not overlap a label already placed, one label spanning
    PHASE_LABEL_SPAN of the epochs (a word of ~9 characters on a 230-pixel panel)."""
    labels = starts.drop_duplicates(["boundary", "phase"]).sort_values("boundary").reset_index(drop=True)
    span = max(high - low, 1e-9)
    labels["near_end"] = labels["boundary"] > high - 0.2 * span
    # where each label reaches, as a share of the epochs: right of its line, or left near the end
    left = (labels["boundary"] - low) / span - np.where(labels["near_end"], PHASE_LABEL_SPAN, 0)
    placed: list[list[tuple[float, float]]] = []
    levels = []
    for start in left:
        end = start + PHASE_LABEL_SPAN
        level = next((i for i, line in enumerate(placed) if all(end <= a or start >= b for a, b in line)), len(placed))
        if level == len(placed):
            placed.append([])
        placed[level].append((start, end))
        levels.append(level)
    return labels.assign(level=levels)


def _epoch_ticks(epochs: pd.Series, most: int = 12) -> list[int]:
    """Whole-epoch tick values between the first and the last epoch: the multiples of the
    smallest step of 1, 2, 5, 10, 20, ... epochs that gives at most `most` ticks."""
    first, last = int(np.ceil(epochs.min())), int(np.floor(epochs.max()))
    if first > last:  # no whole epoch in the data (e.g. 0.2–0.7): no tick outside it
        return []
    step = next(s * 10**k for k in range(12) for s in (1, 2, 5) if last // (s * 10**k) - first // (s * 10**k) < most)
    return [e for e in range(first, last + 1) if e % step == 0] or [first]


def learning_curves_chart(
    histories: Mapping[str, pd.DataFrame], names: Mapping[str, str] | None = None, title: str = "Learning curves"
) -> alt.HConcatChart:
    """Training (thin, faded) and validation (thick) curves per epoch for each model.

    `histories` maps model key to its history table (one row per epoch). A dotted vertical
    rule between two epochs marks where a new training `phase` starts (e.g. B's "fine-tune",
    "clean" for epochs without augmentation), labelled with that phase's name.
    """
    table = history_table(histories)
    if table.empty:
        raise ValueError("no learning-curve columns (loss, age MAE, gender accuracy) in the histories")
    data, keys = _with_model_labels(table, names)
    colour, dash, _ = _model_encodings(keys, names)
    starts = _phase_starts(histories, names)
    labels = _phase_labels(starts, float(data["epoch"].min()), float(data["epoch"].max()))
    # Ticks at whole epochs, given explicitly on every layer: Vega ignores tickMinStep on a
    # short run (a 2-epoch run got ticks at 1.0, 1.5, 2.0) and the phase rules sit at half epochs.
    epoch_axis = alt.Axis(values=_epoch_ticks(data["epoch"]), format="d")
    panels = []
    for panel in _ordered(data["panel"]):
        part = data[data["panel"] == panel]
        fmt = ".0%" if "%" in panel else ".3~r"  # 16 and 3.77, not 16.00
        base = alt.Chart(part).encode(
            x=alt.X("epoch:Q", title="Epoch", axis=epoch_axis),
            y=alt.Y("value:Q", title=panel, scale=alt.Scale(zero=False), axis=alt.Axis(format=fmt)),
            color=colour,
            strokeDash=dash,
            detail="subset:N",
        )
        lines = base.mark_line().encode(
            strokeWidth=alt.StrokeWidth("subset:N", title="Curve", scale=alt.Scale(domain=["training", "validation"], range=[1, 2.5]),
                                        legend=alt.Legend(orient="bottom")),
            opacity=alt.Opacity("subset:N", scale=alt.Scale(domain=["training", "validation"], range=[0.5, 1]), legend=None),
            tooltip=["model_label:N", "subset:N", "epoch:Q", alt.Tooltip("value:Q", format=".3f")],
        )
        layer = [lines]
        if not starts.empty:
            boundary_x = alt.X("boundary:Q", title="Epoch", axis=epoch_axis)
            boundaries = alt.Chart(starts).encode(x=boundary_x)
            layer.append(boundaries.mark_rule(strokeDash=[2, 3], color="grey").encode(
                tooltip=["model_label:N", alt.Tooltip("phase:N", title="Phase starts")]))
            # a label right of its line, or left of it near the panel's right edge (it ran over the
            # frame); labels that would overlap go on lines below each other
            texts = alt.Chart(labels).encode(x=boundary_x, text="phase:N")
            for (level, near_end), _ in labels.groupby(["level", "near_end"]):
                align, dx = ("right", -3) if near_end else ("left", 3)
                layer.append(texts.transform_filter(f"datum.level == {level} && {'' if near_end else '!'}datum.near_end")
                             .mark_text(align=align, baseline="top", dx=dx, y=2 + PHASE_LABEL_LINE * level,
                                        color="grey", fontSize=10))
        panels.append(alt.layer(*layer).properties(width=230, height=190, title=panel))
    notes = ["Thick lines: validation; thin faded lines: training."]
    if not starts.empty:
        which = ", ".join(f"model {r.model} starts '{r.phase}' at epoch {r.epoch}" for r in starts.itertuples())
        notes.append(f"Dotted vertical line: a new training phase ({which}).")
    return alt.hconcat(*panels).properties(title=_title(title, *notes))


# ------------------------------------------------------------------ rendering


def chart_png(chart, ppi: int = PNG_PPI) -> bytes:
    """PNG bytes at `ppi` pixels per inch of the chart's nominal (72-points-per-inch) size.

    `chart` is an Altair chart or its Vega-Lite spec (dict).
    """
    import vl_convert

    return vl_convert.vegalite_to_png(_spec(chart), ppi=ppi)


def chart_svg(chart) -> str:
    """SVG text of an Altair chart or Vega-Lite spec (dict)."""
    import vl_convert

    return vl_convert.vegalite_to_svg(_spec(chart))


def _spec(chart) -> dict:
    return chart if isinstance(chart, dict) else chart.to_dict()


# ------------------------------------------------------------------ Grad-CAM grid


def gradcam_grid(
    images: np.ndarray,
    heatmaps: Mapping[str, np.ndarray],
    row_labels: Sequence[str],
    column_titles: Mapping[str, str] | None = None,
    title: str = "",
    overlay: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    colour_bar: np.ndarray | None = None,
    cell: int = 160,
    scale: int = 1,
) -> Image.Image:
    """A grid image: one row per face, columns = the face then one Grad-CAM overlay per model.

    images: uint8 RGB, shape (n, h, w, 3) (any h, w; shown at `cell` × `cell` pixels).
    heatmaps: model key -> array (n, h', w') in [0, 1] (resized to the cell); an all-NaN map (no
    Grad-CAM for that face) shows the face in grey, marked "no Grad-CAM", and an all-zero one is
    marked "no evidence found".
    row_labels: n captions (e.g. "true 34 y, female · A 52 y · B 41 y"), drawn under each row.
    column_titles: model key -> column heading (default "Grad-CAM <key>").
    overlay(image, heatmap) -> uint8 RGB; defaults to `analysis.gradcam.overlay`.
    colour_bar: optional uint8 RGB strip (h, w, 3), low evidence on the left, drawn as a key.
    scale: every size (cells, text, margins) times this, for print (cell × scale pixels per face).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (n, h, w, 3), got {images.shape}")
    n = len(images)
    if len(row_labels) != n:
        raise ValueError(f"need one label per image: {n} images, {len(row_labels)} labels")
    for key, maps in heatmaps.items():
        if len(maps) != n:
            raise ValueError(f"heatmaps for {key} have {len(maps)} maps for {n} images")
    if overlay is None:
        from analysis.gradcam import overlay as default_overlay

        overlay = default_overlay
    keys = list(heatmaps)
    titles = ["Face"] + [(column_titles or {}).get(k, f"Grad-CAM {k}") for k in keys]
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be a positive whole number, got {scale}")
    font = _font(13 * scale)
    small_font = _font(12 * scale)
    cell, pad, header_h, line_h = cell * scale, 8 * scale, 26 * scale, 16 * scale
    caption_h = 4 * scale + line_h * max((str(label).count("\n") + 1 for label in row_labels), default=1)
    title_h = 30 * scale if title else 0
    key_h = 34 * scale if colour_bar is not None else 0
    width = pad + len(titles) * (cell + pad)
    height = title_h + header_h + n * (cell + caption_h + pad) + key_h + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 6 * scale), title, fill="black", font=_font(16 * scale))
    for j, text in enumerate(titles):
        draw.text((pad + j * (cell + pad), title_h + 4 * scale), _fit(draw, text, font, cell), fill="black", font=font)
    for i in range(n):
        top = title_h + header_h + i * (cell + caption_h + pad)
        face = np.asarray(Image.fromarray(images[i].astype(np.uint8)).resize((cell, cell), Image.BILINEAR))
        tiles, marks = [face], {}
        for key in keys:
            raw = np.asarray(heatmaps[key][i], dtype=np.float32)
            if not np.isfinite(raw).any():  # no map for this face (analysis.gradcam.undefined_maps)
                marks[len(tiles)] = "no Grad-CAM"
                tiles.append(np.asarray(Image.fromarray(face).convert("L").convert("RGB")))
                continue
            if not (raw > 0).any():  # a map, but no positive evidence anywhere (analysis.gradcam.empty_maps)
                marks[len(tiles)] = "no evidence found"
            heat = np.asarray(
                Image.fromarray(np.clip(raw, 0, 1), mode="F").resize((cell, cell), Image.BILINEAR)
            )
            tiles.append(np.asarray(overlay(face, heat), dtype=np.uint8))
        for j, tile in enumerate(tiles):
            left = pad + j * (cell + pad)
            canvas.paste(Image.fromarray(tile), (left, top))
            if j in marks:  # said on the tile: a grey face or a uniform colour would pass for a map
                draw.rectangle((left, top, left + cell - 1, top + line_h + 2 * scale), fill="white")
                draw.text((left + 3 * scale, top + scale), _fit(draw, marks[j], small_font, cell - 6 * scale),
                          fill="black", font=small_font)
        for j, line in enumerate(str(row_labels[i]).split("\n")):
            position = (pad, top + cell + 3 * scale + j * line_h)
            draw.text(position, _fit(draw, line, small_font, width - 2 * pad), fill="black", font=small_font)
    if colour_bar is not None:
        top = height - key_h - pad + 4 * scale
        low, high = "Grad-CAM: weak ", " strong evidence"
        left = pad + int(draw.textlength(low, font=small_font))
        bar_w = max(20, min(cell * 2, width - left - pad - int(draw.textlength(high, font=small_font))))
        bar = Image.fromarray(np.asarray(colour_bar, dtype=np.uint8)).resize((bar_w, 12 * scale))
        draw.text((pad, top), low, fill="black", font=small_font)
        canvas.paste(bar, (left, top + 2 * scale))
        draw.text((left + bar_w, top), high, fill="black", font=small_font)
    return canvas


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no scalable default font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Shorten `text` with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
