"""Figures: each chart builds from small hand-made tables and its spec shows exactly their numbers."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import figures
from analysis.constants import SMALL_SLICE_N

NAMES = {"A": "small_cnn.keras", "B": "effnet.keras"}


# ---------------------------------------------------------------- hand-made tables (documented shapes)


def slice_rows(slice_by, groups, acc, mae, n, models=("A", "B")):
    """Rows of a slice table: groups = [(slice, slice_1, slice_2)], one value per group and model."""
    rows = []
    for g, (label, s1, s2) in enumerate(groups):
        for m_index, m in enumerate(models):
            a, e = acc[g][m_index], mae[g][m_index]
            rows.append(
                {
                    "slice_by": slice_by, "slice": label, "slice_1": s1, "slice_2": s2, "model": m, "n": n[g],
                    "gender_acc": a, "gender_acc_lo": a - 0.05, "gender_acc_hi": min(1.0, a + 0.04),
                    "age_mae": e, "age_mae_lo": e - 0.5, "age_mae_hi": e + 0.6,
                    "age_bias": e / 3, "age_bias_lo": e / 3 - 1, "age_bias_hi": e / 3 + 1,
                    "small": n[g] < SMALL_SLICE_N,
                }
            )  # fmt: skip
    return rows


@pytest.fixture
def slices() -> pd.DataFrame:
    rows = slice_rows("overall", [("all", "all", "")], [(0.90, 0.85)], [(5.5, 6.25)], [300])
    bands = [("0–2", "0–2", ""), ("20–29", "20–29", ""), ("70+", "70+", "")]
    rows += slice_rows("age_band", bands, [(0.6, 0.7), (0.95, 0.9), (0.8, 0.82)], [(3.0, 2.5), (5.0, 6.0), (9.0, 8.0)], [12, 250, 38])
    rows += slice_rows("gender", [("male", "male", ""), ("female", "female", "")], [(0.9, 0.8), (0.9, 0.9)], [(5.0, 6.0), (6.0, 6.5)], [150, 150])
    ethnicities = [("White", "White", ""), ("Others", "Others", "")]
    rows += slice_rows("ethnicity", ethnicities, [(0.92, 0.88), (0.7, 0.75)], [(5.1, 6.0), (7.0, 6.0)], [280, 20])
    cells = [(f"{b} × {e}", b, e) for b in ("20–29", "70+") for e in ("White", "Others")]
    rows += slice_rows(
        "age_band×ethnicity", cells, [(0.9, 0.8), (0.5, 0.6), (0.7, 0.9), (0.8, 0.8)],
        [(4.0, 5.0), (6.0, 4.0), (9.0, 9.5), (12.0, 10.0)], [240, 10, 35, 3],
    )  # fmt: skip
    return pd.DataFrame(rows)


@pytest.fixture
def comparison(slices) -> pd.DataFrame:
    a = slices[slices["model"] == "A"].reset_index(drop=True)
    b = slices[slices["model"] == "B"].reset_index(drop=True)
    delta = b["age_mae"] - a["age_mae"]
    return pd.DataFrame(
        {
            "slice_by": a["slice_by"], "slice": a["slice"], "slice_1": a["slice_1"], "slice_2": a["slice_2"],
            "n": a["n"], "gender_acc_A": a["gender_acc"], "gender_acc_B": b["gender_acc"],
            "gender_acc_delta": b["gender_acc"] - a["gender_acc"], "only_A_correct": 4, "only_B_correct": 2,
            "mcnemar_p": 0.69, "age_mae_A": a["age_mae"], "age_mae_B": b["age_mae"], "age_mae_delta": delta,
            "age_mae_delta_lo": delta - 0.3, "age_mae_delta_hi": delta + 0.3, "wilcoxon_p": 0.0004, "small": a["small"],
        }
    )  # fmt: skip


@pytest.fixture
def predictions() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    age = rng.integers(1, 90, 40)
    return pd.DataFrame(
        {
            "image_id": [f"{i:040x}" for i in range(40)], "age": age, "gender": rng.integers(0, 2, 40),
            "age_pred_A": age + rng.normal(0, 5, 40), "p_female_A": rng.uniform(0, 1, 40),
            "age_pred_B": age + rng.normal(2, 4, 40), "p_female_B": rng.uniform(0, 1, 40),
        }
    )  # fmt: skip


@pytest.fixture
def calibration() -> pd.DataFrame:
    rows = []
    for m, shift in (("A", 0.05), ("B", -0.04)):
        for b in range(5):
            lo = b / 5
            empty = b == 2
            rows.append(
                {
                    "bin": b, "lo": lo, "hi": lo + 0.2, "n": 0 if empty else 20 + b,
                    "mean_p_female": np.nan if empty else lo + 0.1,
                    "frac_female": np.nan if empty else min(1.0, max(0.0, lo + 0.1 + shift)), "model": m,
                }
            )  # fmt: skip
    return pd.DataFrame(rows)


@pytest.fixture
def age_error() -> pd.DataFrame:
    rows = []
    for m in ("A", "B"):
        for lo, n in ((0, 12), (5, 40), (10, 55)):
            rows.append({"model": m, "age_lo": lo, "age_hi": lo + 5, "n": n, "age_mae": 3 + lo / 5, "age_bias": 2 - lo / 5})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- spec helpers


def spec_datasets(chart) -> list[pd.DataFrame]:
    """Every inline dataset of a chart's Vega-Lite spec as a DataFrame."""
    spec = chart.to_dict()
    return [pd.DataFrame(values) for values in spec.get("datasets", {}).values()]


def dataset_with(chart, *columns) -> pd.DataFrame:
    found = [d for d in spec_datasets(chart) if set(columns) <= set(d.columns)]
    assert found, f"no dataset with columns {columns}"
    return found[0]


def walk(node):
    """Yield every dict inside a spec."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def encoded_fields(chart) -> set[str]:
    fields = set()
    for node in walk(chart.to_dict()):
        for channel in node.get("encoding", {}).values() if isinstance(node.get("encoding"), dict) else ():
            if isinstance(channel, dict) and "field" in channel:
                fields.add(channel["field"])
    return fields


def scales_of(chart, channel: str) -> list[dict]:
    return [
        node["encoding"][channel]["scale"]
        for node in walk(chart.to_dict())
        if isinstance(node.get("encoding"), dict) and "scale" in node["encoding"].get(channel, {})
    ]


def texts(chart) -> str:
    """All titles, subtitles and axis titles of a spec, joined (to check the words shown)."""
    parts = []
    for node in walk(chart.to_dict()):
        for key in ("title", "text", "subtitle"):
            value = node.get(key)
            if isinstance(value, str):
                parts.append(value)
            elif isinstance(value, list):
                parts += [v for v in value if isinstance(v, str)]
    return " | ".join(parts)


# ---------------------------------------------------------------- style


def test_model_colours_are_fixed_and_apart_in_greyscale():
    def luminance(hex_colour):
        r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
        return 0.299 * r + 0.587 * g + 0.114 * b

    a, b = figures.MODEL_STYLES["A"], figures.MODEL_STYLES["B"]
    assert abs(luminance(a.colour) - luminance(b.colour)) > 60  # of 255: clearly different greys
    assert a.dash != b.dash and a.shape != b.shape


def test_model_label():
    assert figures.model_label("A", NAMES) == "A: small_cnn.keras"
    assert figures.model_label("B") == "B"


# ---------------------------------------------------------------- bar charts


def test_overall_chart_shows_the_overall_rows(slices):
    chart = figures.overall_chart(slices, NAMES)
    data = dataset_with(chart, "gender_acc", "age_mae")
    expected = slices[slices["slice_by"] == "overall"]
    assert data["gender_acc"].tolist() == expected["gender_acc"].tolist()
    assert data["age_mae_hi"].tolist() == expected["age_mae_hi"].tolist()
    assert data["model_label"].tolist() == ["A: small_cnn.keras", "B: effnet.keras"]
    assert {"gender_acc", "gender_acc_lo", "gender_acc_hi", "age_mae", "age_mae_lo", "age_mae_hi", "model_label"} <= encoded_fields(chart)
    colour = scales_of(chart, "color")[0]
    assert colour["domain"] == ["A: small_cnn.keras", "B: effnet.keras"]
    assert colour["range"] == [figures.MODEL_STYLES["A"].colour, figures.MODEL_STYLES["B"].colour]
    words = texts(chart)
    assert "Gender accuracy (%)" in words and "Age MAE (years)" in words and "95% confidence" in words


@pytest.mark.parametrize("slice_by", ["age_band", "gender", "ethnicity"])
def test_slice_chart_shows_every_group_with_n(slices, slice_by):
    chart = figures.slice_chart(slices, slice_by, NAMES)
    data = dataset_with(chart, "gender_acc", "slice_label")
    expected = slices[slices["slice_by"] == slice_by]
    assert data["slice"].tolist() == expected["slice"].tolist()
    assert np.array_equal(data["age_mae"], expected["age_mae"])
    assert np.array_equal(data["gender_acc_lo"], expected["gender_acc_lo"])
    for label, n in zip(data["slice_label"], data["n"]):
        assert f"n = {n:,}" in label
    # x keeps the table's order (age bands young to old), not alphabetical
    x_sorts = [node["encoding"]["x"]["sort"] for node in walk(chart.to_dict()) if "sort" in node.get("encoding", {}).get("x", {})]
    assert x_sorts[0] == list(dict.fromkeys(data["slice_label"]))


def test_small_slices_are_faded_and_explained(slices):
    chart = figures.slice_chart(slices, "age_band", NAMES)
    spec = chart.to_dict()
    conditions = [node["opacity"] for node in walk(spec) if isinstance(node.get("opacity"), dict) and "condition" in node["opacity"]]
    assert conditions and conditions[0]["condition"]["test"] == "datum.small"
    assert conditions[0]["condition"]["value"] < conditions[0]["value"]
    assert f"fewer than {SMALL_SLICE_N}" in texts(chart)
    # no small slice: no note
    big = slices[(slices["slice_by"] == "gender")]
    assert "fewer than" not in texts(figures.slice_chart(big, "gender", NAMES))


def test_slice_chart_rejects_wrong_slicings(slices):
    with pytest.raises(ValueError, match="single slices"):
        figures.slice_chart(slices, "age_band×ethnicity")
    with pytest.raises(ValueError, match="no rows"):
        figures.slice_chart(slices.iloc[:2], "ethnicity")
    with pytest.raises(ValueError, match="needs columns"):
        figures.slice_chart(slices.drop(columns=["small"]), "gender")


def test_one_model_charts(slices):
    only_a = slices[slices["model"] == "A"]
    chart = figures.slice_chart(only_a, "gender", NAMES)
    assert set(dataset_with(chart, "gender_acc")["model"]) == {"A"}
    assert scales_of(chart, "color")[0]["range"] == [figures.MODEL_STYLES["A"].colour]


# ---------------------------------------------------------------- heatmaps


@pytest.mark.parametrize("metric", ["age_mae", "gender_acc"])
def test_intersection_heatmap_per_model_and_difference(slices, comparison, metric):
    chart = figures.intersection_heatmap(slices, "age_band×ethnicity", metric, comparison, NAMES)
    cells = slices[slices["slice_by"] == "age_band×ethnicity"]
    datasets = spec_datasets(chart)
    for key in ("A", "B"):
        panel = next(d for d in datasets if metric in d and set(d.get("model", [])) == {key})
        expected = cells[cells["model"] == key]
        assert panel[metric].tolist() == expected[metric].tolist()
        assert panel["slice_1"].tolist() == expected["slice_1"].tolist()
    delta = next(d for d in datasets if f"{metric}_delta" in d)
    expected_delta = comparison[comparison["slice_by"] == "age_band×ethnicity"][f"{metric}_delta"]
    points = 100 if metric == "gender_acc" else 1  # accuracy differences in percentage points
    assert np.allclose(delta[f"{metric}_delta"], expected_delta * points)
    # the difference panel says which way round it is
    words = texts(chart)
    assert "B − A" in words
    assert ("B better if < 0" if metric == "age_mae" else "B better if > 0") in words
    # small cells carry a star and n
    small_cell = cells[(cells["model"] == "A") & cells["small"]].iloc[0]
    panel_a = next(d for d in datasets if metric in d and set(d.get("model", [])) == {"A"})
    text = panel_a.loc[panel_a["slice"] == small_cell["slice"], "cell_text"].iloc[0]
    assert text.split("\n")[1] == f"n={small_cell['n']}*"  # one string, two lines (see _cell_text)
    # the colour scales span the cells with enough images; a tiny cell takes the end colour
    for scale in scales_of(chart, "color"):
        assert scale.get("clamp") is True
    large = cells[~cells["small"]][metric]
    shared = [s["domain"] for s in scales_of(chart, "color") if s.get("scheme") == "viridis"]  # one per model panel
    assert len(shared) == 2 and all(d == [pytest.approx(large.min()), pytest.approx(large.max())] for d in shared)
    large_delta = comparison[(comparison["slice_by"] == "age_band×ethnicity") & ~comparison["small"]][f"{metric}_delta"]
    diverging = next(s for s in scales_of(chart, "color") if s.get("scheme") == "purplegreen")
    assert diverging["domain"][1] == pytest.approx(large_delta.abs().max() * points)


def test_intersection_heatmap_without_comparison_has_no_difference_panel(slices):
    chart = figures.intersection_heatmap(slices, "age_band×ethnicity", "age_mae", None, NAMES)
    assert not any("age_mae_delta" in d for d in spec_datasets(chart))
    assert "B − A" not in texts(chart)
    with pytest.raises(ValueError, match="metric"):
        figures.intersection_heatmap(slices, "age_band×ethnicity", "age_bias")


# ---------------------------------------------------------------- age


def test_age_scatter_has_points_and_identity_line(predictions):
    chart = figures.age_scatter(predictions, names=NAMES)
    datasets = spec_datasets(chart)
    for key in ("A", "B"):
        panel = next(d for d in datasets if d["model_label"].iloc[0].startswith(key))
        assert np.allclose(panel["age_pred"], predictions[f"age_pred_{key}"])
        assert np.array_equal(panel["age"], predictions["age"])
    rules = [n for n in walk(chart.to_dict()) if n.get("mark", {}) == {"type": "rule", "color": "black", "strokeDash": [2, 3], "strokeWidth": 1.2}]
    assert len(rules) == 2  # one identity line per panel
    enc = rules[0]["encoding"]
    assert enc["x"]["datum"] == enc["y"]["datum"] == 0 and enc["x2"]["datum"] == enc["y2"]["datum"]
    assert "True age (years)" in texts(chart) and "Predicted age (years)" in texts(chart)


def test_age_scatter_subsamples_large_tables(predictions):
    chart = figures.age_scatter(predictions, names=NAMES, max_points=10)
    assert all(len(d) == 10 for d in spec_datasets(chart))
    assert "A random 10 of 40 images" in texts(chart)


def test_age_error_chart(age_error):
    chart = figures.age_error_chart(age_error, NAMES)
    data = dataset_with(chart, "age_bias", "age_mid")
    assert data["age_bias"].tolist() == age_error["age_bias"].tolist()
    assert data["age_mae"].tolist() == age_error["age_mae"].tolist()
    assert data["age_mid"].tolist() == ((age_error["age_lo"] + age_error["age_hi"]) / 2).tolist()
    assert data["small"].tolist() == (age_error["n"] < SMALL_SLICE_N).tolist()
    assert {"age_plot", "age_bias", "age_mae"} <= encoded_fields(chart)
    assert "predicted − true (years)" in texts(chart)
    # two models sit 0.4 years either side of the bin centre; the axis ends at the last bin's end
    offset = data["age_plot"] - data["age_mid"]
    assert offset[data["model"] == "A"].tolist() == pytest.approx([-0.4] * 3)
    assert offset[data["model"] == "B"].tolist() == pytest.approx([0.4] * 3)
    x_scales = scales_of(chart, "x")
    assert x_scales and all(s["domain"] == [0, age_error["age_hi"].max()] for s in x_scales)
    spec = chart.to_dict()
    # the solid line joins only the bins with enough images
    lines = [n for n in walk(spec) if isinstance(n.get("mark"), dict) and n["mark"].get("type") == "line"]
    assert sum(n.get("transform") == [{"filter": "!datum.small"}] for n in lines) == 2  # one per panel
    # ...and breaks at a small bin instead of bridging it: a run per stretch of neighbouring large bins
    solid = [n for n in lines if n.get("transform") == [{"filter": "!datum.small"}]]
    assert all(n["encoding"]["detail"]["field"] == "run" for n in solid)
    gap = pd.DataFrame([{"model": m, "age_lo": lo, "age_hi": lo + 5, "n": n, "age_mae": 3.0, "age_bias": 0.0}
                        for m in "AB" for lo, n in ((0, 40), (5, 50), (10, 3), (15, 60))])  # 10–14 small between large
    runs = dataset_with(figures.age_error_chart(gap, NAMES), "run")
    large = runs[~runs["small"]]
    for m in "AB":
        run_of = dict(zip(large[large["model"] == m]["age_lo"], large[large["model"] == m]["run"]))
        assert run_of[0] == run_of[5] != run_of[15]  # 0–4 and 5–9 joined, 15–19 not joined to them
    # an empty stretch of ages (no 5–9 bin at all) breaks it too
    empty = gap[gap["age_lo"] != 5].assign(n=40)
    runs = dataset_with(figures.age_error_chart(empty, NAMES), "run")
    a = runs[runs["model"] == "A"].set_index("age_lo")["run"]
    assert a[0] != a[10] == a[15]
    # no CI columns: no error bars, and the subtitle promises none
    assert not any("y2" in n.get("encoding", {}) for n in walk(spec) if isinstance(n.get("encoding"), dict))
    assert "confidence intervals" not in texts(chart)
    with_ci = age_error.assign(**{f"{m}_{end}": age_error[m] + (1 if end == "hi" else -1)
                                  for m in ("age_mae", "age_bias") for end in ("lo", "hi")})
    chart = figures.age_error_chart(with_ci, NAMES)
    bars = [n["encoding"] for n in walk(chart.to_dict()) if isinstance(n.get("encoding"), dict) and "y2" in n["encoding"]]
    assert sorted(b["y"]["field"] + ".." + b["y2"]["field"] for b in bars) == ["age_bias_lo..age_bias_hi", "age_mae_lo..age_mae_hi"]
    assert "Error bars: 95% confidence intervals." in texts(chart)


# ---------------------------------------------------------------- calibration


def test_reliability_chart_with_ece_in_legend(calibration):
    chart = figures.reliability_chart(calibration, {"A": 0.0512, "B": 0.031}, NAMES)
    data = dataset_with(chart, "mean_p_female", "frac_female")
    filled = calibration[calibration["n"] > 0]
    assert data["frac_female"].tolist() == filled["frac_female"].tolist()  # empty bins left out
    assert set(data["model_label"]) == {"A: small_cnn.keras (ECE 0.051)", "B: effnet.keras (ECE 0.031)"}
    assert scales_of(chart, "color")[0]["domain"] == ["A: small_cnn.keras (ECE 0.051)", "B: effnet.keras (ECE 0.031)"]
    assert {"mean_p_female", "frac_female", "n"} <= encoded_fields(chart)
    assert "Faded: bins with fewer than 30 images." in texts(chart)  # every bin here has 20–24

    assert "Error bars" not in texts(chart)
    with_ci = calibration.assign(frac_female_lo=calibration["frac_female"] - 0.1, frac_female_hi=calibration["frac_female"] + 0.1)
    chart = figures.reliability_chart(with_ci, {"A": 0.0512, "B": 0.031}, NAMES)
    bars = [n["encoding"] for n in walk(chart.to_dict())
            if isinstance(n.get("encoding"), dict) and "field" in n["encoding"].get("y2", {})]  # not the diagonal
    assert [(b["y"]["field"], b["y2"]["field"]) for b in bars] == [("frac_female_lo", "frac_female_hi")]
    assert "95% confidence intervals of the observed share (Wilson)" in texts(chart)


# ---------------------------------------------------------------- learning curves


def test_learning_curves_tolerate_column_names_and_phases():
    a = pd.DataFrame({"epoch": [0, 1, 2], "loss": [3.0, 2.0, 1.5], "val_loss": [3.1, 2.4, 2.0],
                      "age_output_mae": [9.0, 7.0, 6.0], "val_age_output_mae": [9.5, 8.0, 7.5],
                      "gender_binary_accuracy": [0.6, 0.7, 0.8], "val_gender_binary_accuracy": [0.55, 0.65, 0.7]})  # fmt: skip
    b = pd.DataFrame({"epoch": [0, 1, 2, 3], "loss": [2.0, 1.0, 0.9, 0.8], "val_loss": [2.1, 1.5, 1.2, 1.1],
                      "age_mae": [8.0, 6.0, 5.0, 4.5], "val_age_mae": [8.5, 7.0, 6.0, 5.5],
                      "phase": ["head", "head", "fine-tune", "fine-tune"]})  # fmt: skip
    table = figures.history_table({"A": a, "B": b})
    assert set(table["panel"]) == {"Loss", "Age MAE (years)", "Gender accuracy (%)"}
    got = table[(table["model"] == "A") & (table["panel"] == "Age MAE (years)") & (table["subset"] == "validation")]
    assert got["value"].tolist() == [9.5, 8.0, 7.5]
    assert table[(table["model"] == "B") & (table["panel"] == "Gender accuracy (%)")].empty  # B has no such column
    chart = figures.learning_curves_chart({"A": a, "B": b}, NAMES)
    rules = dataset_with(chart, "phase", "boundary")
    assert rules["epoch"].tolist() == [2] and rules["phase"].tolist() == ["fine-tune"]
    # boundary 1.5 of epochs 0–3: in the last fifth? no (> 2.4 is); a phase label near the right edge
    # is drawn left of its line, where it does not run over the frame
    assert not dataset_with(chart, "near_end")["near_end"].iloc[0]
    c = b.assign(phase=["head", "head", "head", "clean"])
    spec = figures.learning_curves_chart({"B": c}).to_dict()
    labels = [n for n in walk(spec) if isinstance(n.get("mark"), dict) and n["mark"].get("type") == "text"]
    assert {n["mark"]["align"]: n["transform"][0]["filter"] for n in labels} == {"right": "datum.level == 0 && datum.near_end"}
    clean = next(pd.DataFrame(v) for v in spec["datasets"].values() if "near_end" in pd.DataFrame(v))
    assert clean["phase"].tolist() == ["clean"] and clean["near_end"].tolist() == [True]
    axes = [n["encoding"]["y"]["axis"]["format"] for n in walk(spec) if isinstance(n.get("encoding"), dict)
            and isinstance(n["encoding"].get("y"), dict) and "axis" in n["encoding"]["y"]]
    assert set(axes) == {".3~r"}  # loss and MAE: 16, not 16.00
    with pytest.raises(ValueError, match="no learning-curve columns"):
        figures.learning_curves_chart({"A": pd.DataFrame({"epoch": [0], "lr": [0.1]})})


def test_phase_labels_of_two_models_do_not_overlap():
    """A's and B's phase labels at nearby epochs were drawn on top of each other: each now goes on
    the first line where it overlaps no other, and one phase two models start at the same epoch
    is labelled once."""
    def history(phases):
        return pd.DataFrame({"epoch": np.arange(1, len(phases) + 1), "loss": 1.0, "val_loss": 1.0, "phase": phases})

    a = history(["train"] * 33 + ["clean"] * 3)  # clean from epoch 34 of 36: near the end, left of its line
    b = history(["heads"] * 8 + ["fine-tune"] * 13 + ["clean"] * 3)  # fine-tune at 9, clean at 22
    chart = figures.learning_curves_chart({"A": a, "B": b})
    labels = dataset_with(chart, "near_end", "level").set_index("phase")
    # epochs 1–36: A's "clean" label spans 0.68–0.93 of the axis, B's 0.59–0.84, B's fine-tune 0.21–0.46
    assert labels.loc["fine-tune", "level"] == 0 and not labels.loc["fine-tune", "near_end"]
    assert labels.loc["clean"].sort_values("boundary")["level"].tolist() == [0, 1]
    spec = chart.to_dict()
    ys = {n["transform"][0]["filter"]: n["mark"]["y"] for n in walk(spec)
          if isinstance(n.get("mark"), dict) and n["mark"].get("type") == "text"}
    # B's two labels on the first line, A's "clean" (placed last, left of its line) below them
    assert ys == {"datum.level == 0 && !datum.near_end": 2, "datum.level == 1 && datum.near_end": 2 + figures.PHASE_LABEL_LINE}
    # the same phase at the same epoch for both models: one label, and the rules stay one per model
    same = figures.learning_curves_chart({"A": a, "B": a.copy()})
    assert dataset_with(same, "near_end", "level")["phase"].tolist() == ["clean"]
    assert dataset_with(same, "phase", "boundary", "model_label")["model"].tolist() == ["A", "B"]


def _x_tick_values(chart) -> list[list]:
    """The explicit tick values of every x axis in a chart's spec."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            x = node.get("encoding", {}).get("x")
            if isinstance(x, dict):
                found.append(x.get("axis", {}).get("values"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(chart.to_dict())
    return found


@pytest.mark.parametrize("n_epochs, expected", [(2, [1, 2]), (12, list(range(1, 13))), (36, [5, 10, 15, 20, 25, 30, 35])])
def test_learning_curves_tick_whole_epochs_on_every_layer(n_epochs, expected):
    """A two-epoch run with a phase change drew ticks at 1.0, 1.5, 2.0: the phase rule between
    two epochs brought its own axis. Every layer now carries the same whole-epoch ticks."""
    epochs = np.arange(1, n_epochs + 1)
    history = pd.DataFrame({"epoch": epochs, "loss": 1.0 / epochs, "val_loss": 1.1 / epochs,
                            "phase": ["heads"] + ["fine-tune"] * (n_epochs - 1)})
    ticks = _x_tick_values(figures.learning_curves_chart({"B": history}))
    assert len(ticks) == 3  # the curves, the phase rule and its label
    assert all(values == expected for values in ticks)


def test_find_and_read_history(tmp_path):
    model = tmp_path / "age_gender_A.keras"
    model.write_bytes(b"x")
    assert figures.find_history(model) is None
    (tmp_path / "history_A.csv").write_text("epoch,loss,val_loss\n0,1.0,1.2\n")
    assert figures.find_history(model) == tmp_path / "history_A.csv"
    assert figures.read_history(tmp_path / "history_A.csv")["val_loss"].tolist() == [1.2]
    assert figures.read_history(tmp_path / "missing.csv") is None
    (tmp_path / "empty.csv").write_text("")
    assert figures.read_history(tmp_path / "empty.csv") is None


# ---------------------------------------------------------------- rendering


def test_png_and_svg_rendering(slices):
    chart = figures.slice_chart(slices, "gender", NAMES)
    png = figures.chart_png(chart)
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.format == "PNG"
    assert image.info["dpi"][0] == pytest.approx(figures.PNG_PPI, abs=0.5)
    svg = ET.fromstring(figures.chart_svg(chart))
    assert svg.tag.endswith("svg")
    # PNG pixels = SVG size (1/72-inch points) × ppi/72: printed at the SVG's size it has PNG_PPI dpi
    width_points = float(svg.attrib["width"])
    assert image.width == pytest.approx(width_points * figures.PNG_PPI / 72, abs=2)
    assert figures.PNG_PPI >= 200


# ---------------------------------------------------------------- Grad-CAM grid


def test_gradcam_grid_layout():
    images = np.full((3, 40, 30, 3), 120, dtype=np.uint8)
    heat = {"A": np.random.default_rng(0).random((3, 8, 8)), "B": np.zeros((3, 40, 30))}
    calls = []

    def overlay(face, heatmap):
        calls.append((face.shape, heatmap.shape))
        return np.zeros_like(face)

    grid = figures.gradcam_grid(
        images, heat, ["true 30 y\nA 40 y", "b", "c"], {"A": "A: Grad-CAM"}, "Worst", overlay=overlay,
        colour_bar=np.zeros((1, 256, 3), np.uint8), cell=64,
    )  # fmt: skip
    assert grid.mode == "RGB"
    assert grid.width == 8 + 3 * (64 + 8)
    assert calls == [((64, 64, 3), (64, 64))] * 6  # every heatmap resized to the cell
    # the face column holds the (grey) face; the overlay columns what overlay() returned (black)
    pixels = np.asarray(grid)
    top = 30 + 26
    assert (pixels[top + 10, 8 + 10] == 120).all()
    assert (pixels[top + 10, 8 + 72 + 10] == 0).all()
    # scale=2 (the report's, for print): every size doubles, the same tiles twice as large
    calls.clear()
    big = figures.gradcam_grid(
        images, heat, ["true 30 y\nA 40 y", "b", "c"], {"A": "A: Grad-CAM"}, "Worst", overlay=overlay,
        colour_bar=np.zeros((1, 256, 3), np.uint8), cell=64, scale=2,
    )  # fmt: skip
    assert big.size == (2 * grid.width, 2 * grid.height)
    assert calls == [((128, 128, 3), (128, 128))] * 6
    pixels = np.asarray(big)
    assert (pixels[2 * top + 20, 16 + 20] == 120).all() and (pixels[2 * top + 20, 16 + 144 + 20] == 0).all()
    with pytest.raises(ValueError, match="scale"):
        figures.gradcam_grid(images, heat, ["a", "b", "c"], overlay=overlay, scale=0)


def test_gradcam_grid_marks_faces_without_a_map_or_without_evidence():
    """A face without a map (all NaN) was drawn through overlay() like one with no evidence; now
    it is the face in grey, and both are said on the tile."""
    face = np.zeros((1, 64, 64, 3), np.uint8)
    face[..., 0] = 200  # a red face: grey only if drawn without colour
    heat = {"A": np.full((1, 8, 8), np.nan, np.float32), "B": np.zeros((1, 8, 8), np.float32),
            "C": np.random.default_rng(0).random((1, 8, 8))}
    grid = np.asarray(figures.gradcam_grid(face, heat, ["x"], cell=64))
    top, tile = 26, lambda j: grid[top:top + 64, 8 + j * 72: 8 + j * 72 + 64]
    below_mark = slice(24, 64)  # under the white label box
    a = tile(1)[below_mark]
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all() and a[..., 0].max() > 40  # grey face
    assert (tile(1)[2, 40] == 255).all() and (tile(2)[2, 40] == 255).all()  # the label box on A and B
    assert not (tile(3)[2, 40] == 255).all()  # C has a map with evidence: no label
    red = tile(0)[below_mark]
    assert (red[..., 0] == 200).all() and (red[..., 1] == 0).all()


def test_gradcam_grid_rejects_mismatched_inputs():
    images = np.zeros((2, 10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="one label per image"):
        figures.gradcam_grid(images, {"A": np.zeros((2, 10, 10))}, ["x"], overlay=lambda f, h: f)
    with pytest.raises(ValueError, match="heatmaps for A"):
        figures.gradcam_grid(images, {"A": np.zeros((3, 10, 10))}, ["x", "y"], overlay=lambda f, h: f)
    with pytest.raises(ValueError, match=r"\(n, h, w, 3\)"):
        figures.gradcam_grid(np.zeros((2, 10, 10)), {}, ["x", "y"], overlay=lambda f, h: f)


def test_heatmap_colour_range_edge_cases():
    """The range spans the cells with enough images, unless fewer than two of them differ."""
    values = pd.Series([1.0, 5.0, 40.0, np.nan])
    assert figures._colour_range(values, pd.Series([False, False, True, False])) == (1.0, 5.0)  # n=1 outlier out
    assert figures._colour_range(values, pd.Series([True, True, True, False])) == (1.0, 40.0)  # one large cell: all
    same = pd.Series([1.0, 1.0, 0.6])  # two large cells at 100%, a small one at 60%: not one colour for all
    assert figures._colour_range(same, pd.Series([False, False, True])) == (0.6, 1.0)
    assert figures._colour_range(pd.Series([2.0, 2.0]), pd.Series([False, False])) == (1.5, 2.5)
    assert figures._colour_range(pd.Series([np.nan]), pd.Series([False])) == (0.0, 1.0)


def test_heatmap_notes_say_only_what_applies_and_two_line_cells_are_centred(slices, comparison):
    """The subtitle said "* faded cells" when no cell was faded and did not say that the colour
    scale is clamped; the second line of each cell ran into its lower border."""
    cells = slices[slices["slice_by"] == "age_band×ethnicity"]
    assert cells["small"].any()
    words = texts(figures.intersection_heatmap(slices, "age_band×ethnicity", "gender_acc", comparison))
    assert "* faded cells: fewer than 30 images." in words
    large = cells[~cells["small"]]["gender_acc"]
    beyond = ((cells["gender_acc"] < large.min()) | (cells["gender_acc"] > large.max())).any()
    assert ("a value beyond that range takes the end colour" in words) == beyond
    # every cell large and in range: neither note
    big = slices.assign(small=False)
    plain = texts(figures.intersection_heatmap(big, "age_band×ethnicity", "gender_acc"))
    assert "faded cells" not in plain and "end colour" not in plain
    # only the difference panel beyond its range: the note still appears
    shifted = comparison.assign(small=False, gender_acc_delta=comparison["gender_acc_delta"])
    rows = shifted["slice_by"] == "age_band×ethnicity"
    shifted.loc[rows.idxmax(), "small"] = True
    shifted.loc[rows.idxmax(), "gender_acc_delta"] = 0.9  # +90 points, far beyond the others
    assert "end colour" in texts(figures.intersection_heatmap(big, "age_band×ethnicity", "gender_acc", shifted))
    # two lines centred on the cell: the text is lifted by half its line height
    spec = figures.intersection_heatmap(big, "age_band×ethnicity", "gender_acc").to_dict()
    text_marks = [node["mark"] for node in walk(spec) if isinstance(node.get("mark"), dict) and node["mark"].get("type") == "text"]
    assert text_marks and all(m["dy"] == -m["lineHeight"] / 2 for m in text_marks)


def test_epoch_ticks_stay_inside_the_data():
    assert figures._epoch_ticks(pd.Series([0.2, 0.7])) == []
    assert figures._epoch_ticks(pd.Series([3.0])) == [3]


def test_heatmap_cells_can_be_narrowed_and_keep_every_label(slices):
    """The dashboard's narrower cells (so two panels fit beside the sidebar) slant the column
    labels instead of letting Vega drop every other one."""
    def panel_widths_and_angles(chart):
        spec = chart.to_dict()
        found = []
        for node in walk(spec):
            x = node.get("encoding", {}).get("x", {}) if isinstance(node.get("encoding"), dict) else {}
            if node.get("width") is not None:
                found.append(("width", node["width"]))
            if isinstance(x, dict) and x.get("field") == "slice_2":
                found.append(("angle", x["axis"]["labelAngle"]))
        return found

    n_columns = slices.loc[slices["slice_by"] == "age_band×ethnicity", "slice_2"].nunique()
    wide = panel_widths_and_angles(figures.intersection_heatmap(slices, "age_band×ethnicity", "age_mae"))
    narrow = panel_widths_and_angles(figures.intersection_heatmap(slices, "age_band×ethnicity", "age_mae", max_cell_width=44))
    assert {v for k, v in wide if k == "width"} == {min(60, 420 // n_columns) * n_columns}
    assert {v for k, v in narrow if k == "width"} == {44 * n_columns}
    assert {v for k, v in wide if k == "angle"} == {0} and {v for k, v in narrow if k == "angle"} == {-40}
