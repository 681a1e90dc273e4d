"""The report bundle: built once from the real pipeline (synthetic faces, two tiny Keras models)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import figures, report
from analysis.report import BundleError

# ---------------------------------------------------------------- readable tables (no models needed)


def test_format_table_rounds_and_names_columns():
    comparison = pd.DataFrame(
        {
            "slice_by": ["overall", "age_band×gender"], "slice": ["all", "20–29 × female"], "slice_1": ["all", "20–29"],
            "slice_2": ["", "female"], "n": [1000, 12], "gender_acc_A": [0.91234, 0.5], "gender_acc_B": [0.9, 0.75],
            "gender_acc_delta": [-0.01234, 0.25], "only_A_correct": [30, 1], "only_B_correct": [18, 4],
            "mcnemar_p": [0.000412, 0.37512], "age_mae_A": [5.4321, 7.0], "age_mae_B": [5.0, 8.0],
            "age_mae_delta": [-0.4321, 1.0], "age_mae_delta_lo": [-0.61, 0.2], "age_mae_delta_hi": [-0.25, 1.9],
            "wilcoxon_p": [0.0123456, 1.0], "small": [False, True],
        }
    )  # fmt: skip
    formatted, numeric = report.format_table(comparison)
    row = formatted.iloc[0]
    assert row["Grouping"] == "Overall" and formatted.iloc[1]["Grouping"] == "Age band × gender"
    assert row["Gender accuracy A (%)"] == "91.2"  # accuracy as % with 1 decimal
    assert row["Gender accuracy B − A (points)"] == "-1.2"
    assert row["Age MAE A (years)"] == "5.43"  # MAE with 2 decimals
    assert row["Age MAE B − A (years)"] == "-0.43"
    assert row["Age MAE B − A 95% CI"] == "[-0.61, -0.25]"
    assert row["McNemar p"] == "<0.001" and formatted.iloc[1]["McNemar p"] == "0.375"  # 3 significant digits
    assert row["Wilcoxon p"] == "0.0123" and formatted.iloc[1]["Wilcoxon p"] == "1.00"
    assert row["n"] == "1,000" and formatted.iloc[1]["n < 30"] == "yes"
    assert "slice_1" not in formatted and "Slice 1" not in formatted
    assert dict(zip(formatted.columns, numeric))["n"] and not dict(zip(formatted.columns, numeric))["Group"]


def test_ranking_scores_read_in_the_units_of_each_table():
    from analysis import metrics
    from analysis.dataset import assign_age_bands

    # Three images: 0 both models wrong on gender (A 0.03, B 0.04 for a woman), 1 the models disagree
    # on gender (|0.9 - 0.2| = 0.7), 2 they agree on gender and differ by 12.3456 years of age.
    preds = pd.DataFrame(
        {
            "image_id": ["a" * 40, "b" * 40, "c" * 40], "path": ["/x/0.jpg", "/x/1.jpg", "/x/2.jpg"],
            "file_name": ["0.jpg", "1.jpg", "2.jpg"], "age": [30, 40, 50], "gender": [1, 0, 0], "ethnicity": [0, 1, 2],
            "age_pred_A": [31.0, 38.0, 62.3456], "age_pred_B": [30.0, 41.0, 50.0],
            "p_female_A": [0.03, 0.9, 0.1], "p_female_B": [0.04, 0.2, 0.2],
        }
    )  # fmt: skip
    preds["age_band"] = assign_age_bands(preds["age"])
    tables = {
        "worst_age_A": metrics.worst_errors(preds, "age", model="A"),
        "worst_gender_A": metrics.worst_errors(preds, "gender", model="A"),
        "worst_disagreement": metrics.worst_errors(preds, "disagreement", model="A"),
        "contradicted_labels": metrics.contradicted_labels(preds),
    }
    readable = {name: report.format_table(table, ["A", "B"], name)[0] for name, table in tables.items()}
    assert "Ranking score" not in readable["worst_age_A"] and "score" not in readable["worst_age_A"]
    assert readable["worst_age_A"]["Age error A (years)"].tolist() == ["12.35", "2.00", "1.00"]
    assert readable["worst_gender_A"]["Confidence in the wrong gender"].tolist() == ["0.970", "0.900"]
    size = readable["worst_disagreement"]["Disagreement size (ΔP(female) or years)"]
    assert size.tolist() == ["0.700", "12.35 years", "1.00 years"]
    assert readable["contradicted_labels"]["Smallest P(other gender)"].tolist() == ["0.960"]
    formatted, numeric = report.format_table(tables["worst_disagreement"], ["A", "B"], "worst_disagreement")
    assert "\\shortstack[r]{Disagreement\\\\size\\\\($\\Delta$P(female) or\\\\years)}" in report.latex_table(formatted, numeric)
    assert report.format_table(tables["worst_age_A"])[0]["Ranking score"].iloc[0] == "12.3"  # no name: generic


def test_markdown_and_latex_tables():
    formatted = pd.DataFrame({"Group": ["20–29 × female", "a|b & c_d"], "p": ["<0.001", "0.25"], "Acc (%)": ["91.2", "−1.0"]})
    numeric = [False, True, True]
    markdown = report.markdown_table(formatted, numeric).splitlines()
    assert markdown[0] == "| Group | p | Acc (%) |"
    assert markdown[1] == "|:---|---:|---:|"
    assert markdown[3] == "| a\\|b & c_d | 0.25 | −1.0 |"
    latex = report.latex_table(formatted, numeric)
    assert "\\toprule" in latex and "\\midrule" in latex and "\\bottomrule" in latex
    assert "\\begin{tabular}{lrr}" in latex
    assert "a|b \\& c\\_d" in latex and "Acc (\\%)" in latex
    assert "20--29 $\\times$ female" in latex and "\\textless{}0.001" in latex and "$-$1.0" in latex
    assert all(ord(ch) < 128 for ch in latex.replace("Needs", ""))  # pdflatex-safe


def test_latex_tables_are_captioned_floats_that_fit_a_page():
    """The .tex files were bare tabulars (comparison: 15 columns, slices: ~180 rows) with hyphens for
    minus signs: no caption, wider and longer than a page."""
    rows = 95
    formatted = pd.DataFrame({
        "Model": ["A"] * 50 + ["B"] * 45, "Grouping": ["Age band"] * 30 + ["Gender"] * 20 + ["Age band"] * 45,
        "Gender accuracy B − A (points)": [f"{v:+.1f}" for v in np.linspace(-3, 3, rows)],
        "Age bias (years)": ["-0.30"] * rows, "Group": ["20–29"] * rows})
    numeric = [False, False, True, True, False]
    latex = report.latex_table(formatted, numeric, "Per model & group: 95% CIs, `small` flagged.", "tab:slices")
    floats = latex.split("\\begin{table}")[1:]
    assert latex.startswith("% Needs \\usepackage{booktabs,graphicx}.")
    # cut at changes of model or grouping: 30+20 rows (A), then 45 rows of one group are split at 40
    assert [len(re.findall(r"^[AB] &", f, re.M)) for f in floats] == [30, 20, 40, 5]
    assert all(f.count("\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}") == 1 for f in floats)
    assert "\\caption{Per model \\& group: 95\\% CIs, small flagged. (part 1 of 4)\\label{tab:slices}}" in floats[0]
    assert "\\caption{Continued from Table~\\ref{tab:slices} (part 4 of 4).}" in floats[3]
    assert "& $-$0.30 &" in latex and "-0.30" not in latex.replace("$-$0.30", "")  # minus signs, not hyphens
    assert "20--29" in latex and "$-$29" not in latex  # an en dash stays a dash
    # a long header is stacked on lines, aligned as its column
    assert "\\shortstack[r]{Gender\\\\accuracy B $-$ A\\\\(points)}" in floats[0]
    assert all(ord(ch) < 128 for ch in latex)


def test_latex_cells_keep_hyphens_in_names_and_never_stop_pdflatex():
    """'photo -1.jpg' became 'photo $-$1.jpg', '--7.jpg' printed an en dash, "a``b''.jpg" quote
    marks, and a file name with ≤ or Chinese characters stopped pdflatex ("Unicode character not
    set up")."""
    cells = pd.DataFrame({"File": ["photo -1.jpg", "--7.jpg", "≤10.jpg", "中文.jpg", "é_x&%.jpg"],
                          "Bias": ["-0.30", "[-1.0, +2.0]", "1e-05", "+1.2", "-3"]})
    latex = report.latex_table(cells, [False, True], "Worst ≤ 5 中", "tab:x")
    rows = latex.split("\\midrule\n")[1].split("\\bottomrule")[0].splitlines()
    assert rows == ["photo -1.jpg & $-$0.30 \\\\", "-{}-7.jpg & [$-$1.0, +2.0] \\\\", "$\\leq$10.jpg & 1e-05 \\\\",
                    "??.jpg & +1.2 \\\\", "é\\_x\\&\\%.jpg & $-$3 \\\\"]
    assert "\\caption{Worst $\\leq$ 5 ?\\label{tab:x}}" in latex
    assert all(ord(ch) < 256 for ch in latex)
    # control characters and letters the default font encoding lacks; typographic punctuation mapped
    odd = pd.DataFrame({"File": ["a\x01b\x7f\x9c.jpg", "Þór.jpg", "O’Brien—x….jpg", "Zoë.jpg", "a``b''c,,,d!`e?`---.jpg",
                                 "a-–b e!‘f i'’j.jpg"]})
    rows = report.latex_table(odd, [False], "c", "l").split("\\midrule\n")[1].split("\\bottomrule")[0].splitlines()
    assert rows == ["a?b??.jpg \\\\", "?ór.jpg \\\\", "O'Brien---x\\ldots{}.jpg \\\\", "Zoë.jpg \\\\",
                    "a`{}`b'{}'c,{},{},d!{}`e?{}`-{}-{}-.jpg \\\\", "a-{}--b e!{}`f i'{}'j.jpg \\\\"]


def test_the_comparison_prints_as_a_gender_table_and_an_age_table(evaluation):
    formatted, numeric = report.format_table(evaluation.tables["comparison"], ["A", "B"], "comparison")
    assert formatted.shape[1] >= 15
    latex = report._latex_file("comparison", formatted, numeric)
    gender, age = latex.split("\\label{tab:comparison-age}")
    assert "\\caption{Gender half. Paired A vs B per group" in gender and "\\label{tab:comparison-gender}" in gender
    headers = {half: re.findall(r"\\toprule\n(.*)\n", text)[0] for half, text in (("gender", gender), ("age", age))}
    assert "McNemar" in headers["gender"] and "Wilcoxon" not in headers["gender"] and "MAE" not in headers["gender"]
    assert "Wilcoxon" in headers["age"] and "McNemar" not in headers["age"] and "Only" not in headers["age"]
    for header in headers.values():
        assert header.startswith("Grouping & Group & n &")


# ---------------------------------------------------------------- the real pipeline


def _tiny_model(path: Path, seed: int) -> Path:
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    image = keras.Input((32, 32, 3), name="image")
    x = layers.Rescaling(1 / 255.0)(image)
    x = layers.Conv2D(8, 3, activation="relu", padding="same")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(8, 3, activation="relu", padding="same", name="last_conv")(x)
    x = layers.GlobalAveragePooling2D()(x)
    age = layers.Dense(1, name="age", bias_initializer=keras.initializers.Constant(33.0))(x)
    gender = layers.Dense(1, activation="sigmoid", name="gender")(x)
    keras.Model(image, [age, gender]).save(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    _tiny_model(folder / "age_gender_A.keras", 1)
    _tiny_model(folder / "age_gender_B.keras", 2)
    history = pd.DataFrame(
        {"epoch": [0, 1, 2], "loss": [2.0, 1.5, 1.2], "val_loss": [2.1, 1.7, 1.6], "age_mae": [12.0, 9.0, 8.0],
         "val_age_mae": [12.5, 10.0, 9.5], "gender_accuracy": [0.5, 0.6, 0.7], "val_gender_accuracy": [0.5, 0.55, 0.6]}
    )  # fmt: skip
    history.to_csv(folder / "history_A.csv", index=False)  # B has no history: the figure shows A only
    return folder


@pytest.fixture(scope="module")
def evaluation(synthetic_dir, model_dir):
    from analysis.dataset import load_sample
    from analysis.evaluation import ModelSpec, evaluate

    specs = {key: ModelSpec(str(model_dir / f"age_gender_{key}.keras")) for key in ("A", "B")}
    return evaluate(load_sample(synthetic_dir), specs, n_boot=50, seed=0, use_cache=False)


@pytest.fixture(scope="module")
def bundle(evaluation, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "report"
    written = report.write_bundle(evaluation, out, seed=0, n_boot=50, gradcam=True, gradcam_n=3)
    return out, written


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_bundle_holds_every_promised_file(bundle, evaluation):
    out, written = bundle
    files = _files(out)
    assert files == {p.relative_to(out).as_posix() for p in written}
    assert {"README.md", "provenance.json", "report.zip", "summary.json", "models.json", "skipped.csv", "tables/predictions.csv"} <= files
    for name in evaluation.tables:
        assert {f"tables/{name}.csv", f"tables/{name}.md", f"tables/{name}.tex"} <= files
    expected_figures = {
        "overall", "by_age_band", "by_gender", "by_ethnicity", "age_scatter", "age_error_by_true_age",
        "gender_calibration", "learning_curves",
    } | {f"heatmap_{m}_{s}" for m in ("age_mae", "gender_acc") for s in ("age_band_x_ethnicity", "age_band_x_gender", "gender_x_ethnicity")}  # fmt: skip
    for name in expected_figures:
        assert {f"figures/{name}.png", f"figures/{name}.svg"} <= files
    assert {"gradcam/worst_age_A.png", "gradcam/worst_age_B.png"} <= files
    assert not (out / report.STAGING_NAME).exists()
    # README indexes every file, and nothing it lists is missing
    readme = (out / "README.md").read_text()
    listed = {line.split("`")[1] for line in readme.splitlines() if line.startswith("| `")}
    assert files <= listed and listed <= files


def test_csv_tables_round_trip_to_the_metric_tables(bundle, evaluation):
    out, _ = bundle
    for name, table in evaluation.tables.items():
        back = pd.read_csv(out / "tables" / f"{name}.csv", keep_default_na=False, na_values=[""])
        assert list(back.columns) == list(table.columns)
        for column in table.columns:
            if pd.api.types.is_bool_dtype(table[column]) or not pd.api.types.is_numeric_dtype(table[column]):
                continue
            np.testing.assert_array_equal(back[column].to_numpy(float), table[column].to_numpy(float), err_msg=f"{name}.{column}")
    predictions = pd.read_csv(out / "tables" / "predictions.csv")
    np.testing.assert_array_equal(predictions["age_pred_B"], evaluation.predictions["age_pred_B"])


def test_readable_tables_match_the_numbers(bundle, evaluation):
    out, _ = bundle
    overall = evaluation.tables["slices"].query("slice_by == 'overall' and model == 'A'").iloc[0]
    markdown = (out / "tables" / "slices.md").read_text()
    assert f"| {overall['gender_acc'] * 100:.1f} |" in markdown.splitlines()[2]
    assert f"| {overall['age_mae']:.2f} |" in markdown.splitlines()[2]
    latex = (out / "tables" / "slices.tex").read_text()
    assert "\\toprule" in latex and f"{overall['age_mae']:.2f}" in latex


def test_figures_are_valid_images_at_print_resolution(bundle):
    out, _ = bundle
    for png in sorted((out / "figures").glob("*.png")):
        image = Image.open(png)
        image.verify()
        image = Image.open(png)
        assert image.info["dpi"][0] == pytest.approx(figures.PNG_PPI, abs=0.5)
        svg = ET.parse(png.with_suffix(".svg")).getroot()
        assert svg.tag.endswith("svg")
        # printed at the SVG's nominal size (72 points per inch) the PNG has PNG_PPI >= 200 dpi
        assert image.width / (float(svg.attrib["width"]) / 72) >= 200
    grids = sorted((out / "gradcam").glob("*.png"))
    assert grids
    for png in grids:
        image = Image.open(png)
        assert image.mode == "RGB" and image.height > 3 * report.GRADCAM_CELL
        # face + 2 overlays drawn at twice the cell size: at its dpi a grid prints over 5.5 inches wide
        assert image.width >= 3 * report.GRADCAM_SCALE * report.GRADCAM_CELL
        assert image.width / image.info["dpi"][0] > 5.5


def test_grid_captions_say_when_a_label_is_likely_wrong():
    row = pd.Series({"file_name": "30_1_0_x.jpg", "age": 30, "gender": 1, "age_pred_A": 31.2, "p_female_A": 0.01,
                     "age_pred_B": 29.0, "p_female_B": 0.02, "label_contradicted": True})
    lines = report._grid_label(row, ["A", "B"]).split("\n")
    assert lines == ["30_1_0_x.jpg  true 30 y, female", "A: 31 y, P(female) 0.01 · B: 29 y, P(female) 0.02",
                     "label likely wrong: every model gives the other gender P ≥ 0.95"]
    row["label_contradicted"] = False
    assert len(report._grid_label(row, ["A", "B"]).split("\n")) == 2


def test_readme_says_what_the_contradicted_labels_would_change(tmp_path, evaluation):
    import dataclasses

    from analysis import metrics

    from analysis.evaluation import compute_tables

    predictions = evaluation.predictions.copy()
    assert metrics.label_check(predictions)["n_contradicted"] == 0
    # Both models made sure of the other gender on two images: both contradict their labels.
    flip = [3, 7]
    for m, p_other in (("A", 0.99), ("B", 0.97)):
        predictions.loc[flip, f"p_female_{m}"] = np.where(predictions.loc[flip, "gender"] == 1, 1 - p_other, p_other)
    accuracy = {m: ((predictions[f"p_female_{m}"] >= 0.5) == (predictions["gender"] == 1)).mean() for m in "AB"}
    changed = dataclasses.replace(
        evaluation, run=dataclasses.replace(evaluation.run, predictions=predictions), summary=metrics.summary(predictions, ("A", "B"), n_boot=20),
        tables=compute_tables(predictions, "AB", n_boot=20),
    )
    report.write_bundle(changed, tmp_path / "out", seed=0, n_boot=20, gradcam=False)
    readme = (tmp_path / "out" / "README.md").read_text()
    n = len(predictions)
    assert (f"2 gender labels ({2 / n:.1%} of the images) are contradicted by both models with P ≥ 0.95" in readme)
    assert f"gender accuracy would be A {accuracy['A'] + 2 / n:.1%}, B {accuracy['B'] + 2 / n:.1%}" in readme
    from analysis.__main__ import format_summary

    assert "2 gender labels" in format_summary(changed) and "tables/contradicted_labels.csv" in format_summary(changed)
    assert "gender labels" not in format_summary(evaluation)
    listed = pd.read_csv(tmp_path / "out" / "tables" / "contradicted_labels.csv")
    assert list(listed["image_id"]) == list(predictions["image_id"].iloc[flip])  # equal scores: table order


def test_label_check_sentence():
    check = {"confidence": 0.95, "models": ["B"], "n_contradicted": 1, "share": 0.004, "gender_acc_if_wrong": {"B": 0.9312}}
    assert report.label_check_text(check, "in the table") == (
        "1 gender label (0.4% of the images) is contradicted by the model with P ≥ 0.95 — check it by eye: labels "
        "can be wrong (UTKFace has some). If it is wrong, gender accuracy would be B 93.1% (the headline numbers keep "
        "the labels as given). It is listed in the table."
    )
    several = check | {"models": ["A", "B"], "n_contradicted": 2, "share": 2 / 5000, "gender_acc_if_wrong": {"A": 0.9, "B": 0.95}}
    text = report.label_check_text(several, "in the table")
    assert text.startswith("2 gender labels (0.04% of the images) are contradicted by both models")  # not "0.0%"
    assert "check them by eye" in text and "If they are wrong" in text and text.endswith("They are listed in the table.")
    assert report.label_check_text(check | {"n_contradicted": 0}) is None
    many = report.label_check_text(check | {"n_contradicted": 60, "share": 0.06})
    assert "60 gender labels (6.0% of the images)" in many and "likely the model's own confident mistakes" in many
    assert "own confident mistakes" not in text


def test_provenance_matches_the_inputs(bundle, evaluation, model_dir):
    out, _ = bundle
    record = json.loads((out / "provenance.json").read_text())
    for key in ("A", "B"):
        model_file = model_dir / f"age_gender_{key}.keras"
        assert record["models"][key]["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
        assert record["models"][key]["settings"]
    assert record["sample"]["fingerprint"] == evaluation.sample.fingerprint
    assert record["sample"]["n_evaluated"] == len(evaluation.predictions)
    assert record["seed"] == 0 and record["bootstrap_resamples"] == 50
    assert record["packages"]["altair"] and record["created"]
    assert record["report"]["png_ppi"] == figures.PNG_PPI
    files = record["files"]
    assert set(files) == _files(out) - {"provenance.json", "report.zip"}
    for name, digest in files.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest


def test_zip_holds_the_bundle(bundle):
    out, _ = bundle
    with zipfile.ZipFile(out / "report.zip") as archive:
        names = {n.removeprefix(f"{report.ZIP_ROOT}/") for n in archive.namelist()}
        assert names == _files(out) - {"report.zip"}
        assert archive.read(f"{report.ZIP_ROOT}/provenance.json") == (out / "provenance.json").read_bytes()


def test_bundle_zip_bytes_for_the_app(evaluation, monkeypatch):
    monkeypatch.setattr(report, "report_figures", _two_figures)
    data = report.bundle_zip_bytes(evaluation, gradcam=False)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        assert f"{report.ZIP_ROOT}/provenance.json" in names and f"{report.ZIP_ROOT}/figures/overall.png" in names
        assert "Grad-CAM grids were not requested" in archive.read(f"{report.ZIP_ROOT}/README.md").decode()


# ---------------------------------------------------------------- refusing bad folders, failing cleanly


def _two_figures(evaluation, histories=None):
    """A cheaper figure list for the tests that exercise the folder mechanics."""
    return [
        report.ReportFigure("overall", lambda: figures.overall_chart(evaluation.tables["slices"]), "overall"),
        report.ReportFigure("by_gender", lambda: figures.slice_chart(evaluation.tables["slices"], "gender"), "by gender"),
    ]


def test_unusable_output_folders_give_clear_messages(tmp_path, evaluation):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(BundleError, match="is a file, not a folder"):
        report.write_bundle(evaluation, a_file / "sub")
    with pytest.raises(BundleError, match="exists and is a file"):
        report.write_bundle(evaluation, a_file)
    with pytest.raises(BundleError, match="not an earlier report folder"):
        report.write_bundle(evaluation, tmp_path)
    assert a_file.read_text() == "keep me" and _files(tmp_path) == {"notes.txt"}


def test_existing_bundle_needs_overwrite_and_is_replaced_cleanly(tmp_path, evaluation, monkeypatch):
    monkeypatch.setattr(report, "report_figures", _two_figures)
    out = tmp_path / "report"
    report.write_bundle(evaluation, out, gradcam=False)
    with pytest.raises(BundleError, match="--overwrite"):
        report.write_bundle(evaluation, out, gradcam=False)
    (out / "my_notes.md").write_text("mine")  # a user's file: must survive
    stale = out / "figures" / "old_figure.png"  # a file an earlier bundle listed: must go
    stale.write_bytes(b"old")
    record = json.loads((out / "provenance.json").read_text())
    record["files"]["figures/old_figure.png"] = "0" * 64
    (out / "provenance.json").write_text(json.dumps(record))
    monkeypatch.setattr(report, "report_figures", lambda ev, histories=None: _two_figures(ev)[:1])
    report.write_bundle(evaluation, out, overwrite=True, gradcam=False)
    assert (out / "my_notes.md").read_text() == "mine"
    assert not stale.exists() and not (out / "figures" / "by_gender.png").exists()
    assert (out / "figures" / "overall.png").exists() and (out / "provenance.json").exists()


def test_failure_mid_export_leaves_no_complete_looking_bundle(tmp_path, evaluation, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("renderer crashed")

    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "other.txt").write_text("x")
    with monkeypatch.context() as patch:
        patch.setattr(figures, "slice_chart", broken)  # the second figure: tables are already staged
        with pytest.raises(RuntimeError, match="renderer crashed"):
            report.write_bundle(evaluation, parent / "report", gradcam=False)
    # the new folder is gone again and nothing else changed
    assert _files(parent) == {"other.txt"} and not (parent / "report").exists()

    # over an earlier bundle: the earlier one stays as it was
    monkeypatch.setattr(report, "report_figures", _two_figures)
    out = parent / "report"
    report.write_bundle(evaluation, out, gradcam=False)
    before = {name: (out / name).read_bytes() for name in _files(out)}
    monkeypatch.setattr(figures, "chart_svg", broken)
    with pytest.raises(RuntimeError):
        report.write_bundle(evaluation, out, overwrite=True, gradcam=False)
    assert {name: (out / name).read_bytes() for name in _files(out)} == before
    assert not (out / report.STAGING_NAME).exists()
    assert _files(parent) == {"other.txt"} | {f"report/{n}" for n in before}


def test_gradcam_failure_is_noted_not_fatal(tmp_path, evaluation, monkeypatch):
    def no_gradcam(*args, **kwargs):
        raise ImportError("tensorflow is not installed")

    monkeypatch.setattr(report, "report_figures", _two_figures)
    monkeypatch.setattr(report, "gradcam_grids", no_gradcam)
    out = tmp_path / "report"
    report.write_bundle(evaluation, out, gradcam=True)
    assert "Grad-CAM grids were skipped: ImportError: tensorflow is not installed" in (out / "README.md").read_text()
    assert not (out / "gradcam").exists() and (out / "provenance.json").exists()
    notes = json.loads((out / "provenance.json").read_text())["report"]["notes"]
    assert any("Grad-CAM" in note for note in notes)


def test_one_models_gradcam_failure_leaves_the_others_grids(tmp_path, evaluation, monkeypatch):
    """A model without a convolutional layer removed every grid, the other model's too; and faces
    whose map does not exist were drawn as if the model saw nothing there."""
    from analysis import gradcam as gc

    real = gc.gradcam

    def patched(loaded, images, target, **kwargs):
        if loaded is evaluation.models["B"]:
            raise ValueError("model 'B' has no spatial feature map")
        maps = real(loaded, images, target, **kwargs)
        maps[0] = np.nan  # the first face of each call: no map
        return maps

    monkeypatch.setattr(report, "report_figures", _two_figures)
    monkeypatch.setattr(gc, "gradcam", patched)
    out = tmp_path / "report"
    report.write_bundle(evaluation, out, gradcam=True, gradcam_n=3)
    assert {p.name for p in (out / "gradcam").iterdir()} == {"worst_age_A.png", "worst_age_B.png",
                                                               "worst_gender_A.png", "worst_gender_B.png"}
    readme = (out / "README.md").read_text()
    assert "Grad-CAM of model B: none (model 'B' has no spatial feature map)." in readme
    found = re.search(r"Grad-CAM of model A: (\d+) face\(s\) of the grids have no map \(no Grad-CAM: zero or "
                      r"non-finite gradient", readme)
    assert found and int(found.group(1)) >= 4  # the first face of every one of A's gradcam() calls, in 4 grids


def test_leftover_staging_folder_does_not_block_a_new_export(tmp_path, evaluation, monkeypatch):
    monkeypatch.setattr(report, "report_figures", _two_figures)
    out = tmp_path / "report"
    (out / report.STAGING_NAME).mkdir(parents=True)  # an export killed half-way
    (out / report.STAGING_NAME / "half.csv").write_text("x")
    report.write_bundle(evaluation, out, gradcam=False, make_zip=False)
    assert (out / "provenance.json").exists() and not (out / report.STAGING_NAME).exists()
    assert not (out / "report.zip").exists() and "report.zip" not in (out / "README.md").read_text()


def test_one_model_report_figures(synthetic_dir, model_dir):
    from analysis.dataset import load_sample
    from analysis.evaluation import ModelSpec, evaluate

    single = evaluate(load_sample(synthetic_dir), {"A": ModelSpec(str(model_dir / "age_gender_A.keras"))}, n_boot=20, use_cache=False)
    built = report.report_figures(single)
    assert [f.name for f in built][:4] == ["overall", "by_age_band", "by_gender", "by_ethnicity"]
    for figure in built:
        spec = figure.chart.to_dict()  # validates against the Vega-Lite schema
        assert "B − A" not in json.dumps(spec, ensure_ascii=False), figure.name
    for name, table in single.tables.items():
        formatted, numeric = report.format_table(table, ["A"])
        assert len(formatted) == len(table) and len(numeric) == formatted.shape[1], name


def test_training_overlap_matches_content_or_photo_and_ignores_foreign_files(tmp_path):
    """A model's split file names its training/validation images; the evaluated ones it lists are
    counted by content hash or by photo (a re-encoded in-the-wild .jpg of a training .chip.jpg);
    images the label check left out were not trained on; a CSV that is not ours says nothing."""
    from types import SimpleNamespace

    from analysis.evaluation import training_overlap
    from analysis.report import held_out_text, training_overlap_lines

    ids = [f"{i:040x}" for i in range(7)]
    stamp = "2017011617452512"
    split = pd.DataFrame({
        "image_id": ids,
        "file_name": [f"20_0_0_{stamp}1.jpg.chip.jpg", f"21_1_0_{stamp}2.jpg.chip.jpg", f"22_0_1_{stamp}3.jpg.chip.jpg",
                      f"23_1_1_{stamp}4.jpg.chip.jpg", f"24_0_2_{stamp}5.jpg.chip.jpg", f"25_1_2_{stamp}6.jpg.chip.jpg",
                      "26_0_3.jpg"],
        "subset": ["train", "train", "train", "val", "val", "train", "train"],
        "left_out": [False, False, False, False, False, True, False],
    })
    folder = tmp_path / "models"
    folder.mkdir()
    split.to_csv(folder / "split_A.csv", index=False)
    predictions = pd.DataFrame({
        "image_id": [ids[0], "f" * 40, ids[3], ids[5], "e" * 40, "d" * 40],
        "file_name": [f"20_0_0_{stamp}1.jpg.chip.jpg", f"21_1_0_{stamp}2.jpg", f"23_1_1_{stamp}4.jpg.chip.jpg",
                      f"25_1_2_{stamp}6.jpg.chip.jpg", f"30_0_0_{stamp}9.jpg", "26_0_3.jpg"],
    })  # same bytes (train), same photo re-encoded (train), same bytes (val), left out, unseen,
    # and a name without a timestamp: only labels, many photos — not matched by name
    models = {"A": SimpleNamespace(path=str(folder / "age_gender_A.keras"))}
    overlap = training_overlap(predictions, models)
    assert overlap == {"A": {"split_file": "split_A.csv", "n_train": 2, "n_val": 1, "n_evaluated": 6}}
    assert training_overlap_lines(overlap) == [
        "Model A was trained on 2 and validated on 1 of these 6 images (its split_A.csv says so): its numbers "
        "here are not held-out and flatter it. Evaluate on images neither model has seen (e.g. UTKFace's test/ folder)."]
    assert held_out_text(overlap) is None
    unseen = predictions.iloc[[4]]
    assert held_out_text(training_overlap(unseen, models)) == (
        "Held-out check: the training split of model A (split_A.csv) lists none of these images (by content or photo name).")
    # rows of another subset are ignored, the rest still counts
    split.assign(subset=["train", "train", "train", "val", "val", "train", "test"]).to_csv(folder / "split_A.csv", index=False)
    assert training_overlap(predictions, models)["A"]["n_train"] == 2
    # another tool's CSV under the same name, or a malformed one: nothing is claimed either way
    for foreign in (split.assign(image_id=[f"img{i}" for i in range(7)]),  # not content hashes
                    split.assign(subset="fold1")):  # no train/val row
        foreign.to_csv(folder / "split_A.csv", index=False)
        assert training_overlap(predictions, models) == {}
    (folder / "split_A.csv").write_bytes(b"\x00\x01 not a csv")
    assert training_overlap(predictions, models) == {}
    assert training_overlap(predictions, {"A": SimpleNamespace(path="")}) == {}  # an upload without a folder
