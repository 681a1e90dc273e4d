"""`python -m analysis`: the whole evaluation headless, and its errors for unusable inputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, mean_absolute_error

from analysis.__main__ import main
from models_zoo import heads_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A self-describing model (Rescaling inside, dict outputs) and a BGR list-output model."""
    folder = tmp_path_factory.mktemp("cli_models")
    ours = heads_model((24, 24, 3), rescaling=(1 / 255, 0), seed=1)
    ours.save(folder / "ours.keras")
    theirs = heads_model((20, 20, 3), age_name="age_output", gender_name="gender_output",
                         gender_kind="softmax", container="list", gender_first=True, seed=2)
    theirs.save(folder / "theirs.h5")
    return folder / "ours.keras", folder / "theirs.h5"


def test_evaluate_two_models_writes_tables_that_match_sklearn(model_files, synthetic_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main([
        "evaluate", "--model-a", str(model_files[0]), "--model-b", str(model_files[1]),
        "--data", str(synthetic_dir), "--out", str(out), "--bootstrap", "200",
        "--preprocessing-b", "rgb_0_1",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "gender accuracy" in printed and "B − A" in printed
    # How each model was read: the preprocessing found in A, the one given for B, B's outputs.
    assert "  A: 24×24 colour · rgb_0_255 (from the model's own scaling layer) · age: regression 'age'" in printed
    assert "  B: 20×20 colour · rgb_0_1 (set by you) · age: regression 'age_output'" in printed

    preds = pd.read_csv(out / "tables" / "predictions.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert len(preds) == 120 and summary["n_images"] == 120
    # The headline CIs come from the resamples asked for and equal the overall rows of slices.csv.
    assert summary["bootstrap_resamples"] == 200
    overall = pd.read_csv(out / "tables" / "slices.csv").query("slice_by == 'overall'").set_index("model")
    for key in ("A", "B"):
        assert summary["models"][key]["age_mae_ci"] == pytest.approx(
            [overall.loc[key, "age_mae_lo"], overall.loc[key, "age_mae_hi"]])
    for key in ("A", "B"):
        gender_pred = (preds[f"p_female_{key}"] >= 0.5).astype(int)
        assert summary["models"][key]["gender_acc"] == pytest.approx(accuracy_score(preds["gender"], gender_pred))
        assert summary["models"][key]["age_mae"] == pytest.approx(
            mean_absolute_error(preds["age"], preds[f"age_pred_{key}"]))
    # The paired B − A line, on the console and in the bundle's README, and the console's gaps.
    right = {key: (preds[f"p_female_{key}"] >= 0.5).astype(int) == preds["gender"] for key in ("A", "B")}
    delta = f"B − A: gender accuracy {(right['B'].mean() - right['A'].mean()) * 100:+.1f} points"
    assert delta in printed and delta in (out / "README.md").read_text()
    # with the paired interval of that difference, also in summary.json
    comparison = summary["comparison"]
    both = int((right["A"] & right["B"]).sum())
    only_a, only_b = int((right["A"] & ~right["B"]).sum()), int((~right["A"] & right["B"]).sum())
    from analysis.metrics import paired_accuracy_difference_interval

    lo, hi = paired_accuracy_difference_interval(both, only_a, only_b, len(preds) - both - only_a - only_b)
    assert [comparison["gender_acc_delta_lo"], comparison["gender_acc_delta_hi"]] == pytest.approx([lo, hi])
    assert f"{delta} (95% CI {lo * 100:+.1f} to {hi * 100:+.1f}; p" in printed
    by_gender = right["A"].groupby(preds["gender"]).mean()
    assert f"A gender accuracy by gender: {abs(by_gender[1] - by_gender[0]) * 100:.1f} points" in printed

    slices = pd.read_csv(out / "tables" / "slices.csv")
    female = slices[(slices.slice_by == "gender") & (slices.slice == "female") & (slices.model == "A")].iloc[0]
    mask = preds["gender"] == 1
    assert female["n"] == mask.sum()
    assert female["age_mae"] == pytest.approx(mean_absolute_error(preds.age[mask], preds.age_pred_A[mask]))

    models = json.loads((out / "models.json").read_text())
    assert models["A"]["describe"]["preprocessing"] == "rgb_0_255"  # found the Rescaling layer
    assert models["B"]["preprocessing_scores"] is None  # given by the user: no calibration
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["sample"]["n_images"] == 120 and provenance["bootstrap_resamples"] == 200
    assert provenance["sample"]["age_band_edges"] == [0, 3, 10, 20, 30, 40, 50, 60, 70]  # the default bands
    assert not (out / ".incomplete").exists()


def test_an_age_scale_given_on_the_command_line_is_used_and_a_bad_one_refused(model_files, synthetic_dir, tmp_path, capsys):
    out = tmp_path / "scaled"
    base = ["evaluate", "--model-a", str(model_files[0]), "--data", str(synthetic_dir), "--bootstrap", "50", "--no-gradcam"]
    assert main(base + ["--out", str(out), "--age-scale-a", "116"]) == 0
    assert "age: regression 'age' × 116" in capsys.readouterr().out
    models = json.loads((out / "models.json").read_text())
    assert models["A"]["describe"]["age"]["scale"] == "x116"
    assert main(base + ["--out", str(tmp_path / "years"), "--age-scale-a", "years"]) == 0
    scaled = pd.read_csv(out / "tables" / "predictions.csv")
    as_years = pd.read_csv(tmp_path / "years" / "tables" / "predictions.csv")
    np.testing.assert_allclose(scaled["age_pred_A"], 116 * as_years["age_pred_A"], rtol=1e-5)
    assert main(base + ["--out", str(tmp_path / "bad"), "--age-scale-a", "decades"]) == 2
    assert "age scale must be 'years', 'log' or a positive multiplier" in capsys.readouterr().err


def test_one_model_and_overwrite_rules(model_files, synthetic_dir, tmp_path, capsys):
    out = tmp_path / "one"
    args = ["evaluate", "--model-a", str(model_files[0]), "--data", str(synthetic_dir),
            "--out", str(out), "--bootstrap", "50", "--quiet"]
    assert main(args) == 0
    assert capsys.readouterr().out == f"{out.resolve()}\n"  # --quiet prints only where the report is
    assert not (out / "tables" / "comparison.csv").exists()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0

    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("precious")
    assert main(args[:-3] + ["--out", str(unrelated), "--overwrite"]) == 2
    assert (unrelated / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in unrelated.iterdir()) == ["thesis.tex"]


def test_the_console_counts_what_was_evaluated_not_only_what_was_found(model_files, synthetic_dir, tmp_path, capsys):
    """It said "120 labelled images found" and evaluated 119: a JPEG cut short passes the
    reading check and fails only when decoded."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    victim = sorted(data.rglob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) * 7 // 10])  # cut short: decodes no more
    out = tmp_path / "report"
    assert main(["evaluate", "--model-a", str(model_files[0]), "--data", str(data), "--out", str(out),
                 "--bootstrap", "50", "--no-gradcam"]) == 0
    captured = capsys.readouterr()
    n_files = len(list(data.iterdir()))
    assert f"Sample: {n_files} labelled images found" in captured.err
    assert (f"Evaluated on {n_files - 1} images (1 more could not be decoded and were left out; see skipped.csv)"
            in captured.out)
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped[["path", "stage"]].values.tolist() == [[str(victim), "decoding"]]
    assert skipped["reason"].iloc[0].startswith("not decodable: OSError: image file is truncated")


def test_no_bootstrap_still_writes_the_report(model_files, synthetic_dir, tmp_path):
    """--bootstrap 0 (no resampled CIs) stopped with "n_boot must be a positive integer" once the
    ECE interval came: its lower end needs resamples, its upper end does not."""
    out = tmp_path / "report"
    assert main(["evaluate", "--model-a", str(model_files[0]), "--data", str(synthetic_dir), "--out", str(out),
                 "--bootstrap", "0", "--no-gradcam"]) == 0
    model = json.loads((out / "summary.json").read_text())["models"]["A"]
    assert model["gender_ece_ci"][0] is None and model["gender_ece_ci"][1] > model["gender_ece"]
    assert model["age_mae_ci"] == [None, None]


def test_a_sample_where_nothing_decodes_names_a_file_and_its_reason(model_files, synthetic_dir, tmp_path, capsys):
    """With a preprocessing given (no check on labelled images first) it said "no image of the
    sample could be decoded; see the skipped list", and wrote no skipped list."""
    data = tmp_path / "cut"
    data.mkdir()
    for path in sorted(synthetic_dir.glob("*.jpg"))[:4]:
        (data / path.name).write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the header passes
    assert main(["evaluate", "--model-a", str(model_files[0]), "--preprocessing-a", "rgb_0_255", "--data", str(data),
                 "--out", str(tmp_path / "report"), "--bootstrap", "50", "--no-gradcam"]) == 2
    error = capsys.readouterr().err
    assert re.search(r"error: none of the 4 images of the sample could be decoded \(e\.g\. \S+\.jpg: not decodable: ", error)


def test_a_model_without_gradcam_is_said_on_the_console_and_the_others_grids_stay(model_files, synthetic_dir, tmp_path, capsys):
    import keras

    inputs = keras.Input((24, 24, 3))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    dense_only = keras.Model(inputs, [keras.layers.Dense(1, name="age")(x),
                                      keras.layers.Dense(1, activation="sigmoid", name="gender")(x)])
    dense_only.save(tmp_path / "dense_only.keras")
    out = tmp_path / "report"
    assert main(["evaluate", "--model-a", str(model_files[0]), "--model-b", str(tmp_path / "dense_only.keras"),
                 "--data", str(synthetic_dir), "--out", str(out), "--bootstrap", "20", "--gradcam-n", "2"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"note: Grad-CAM of model B: none \(model .* has no spatial feature map", printed)
    assert (out / "gradcam" / "worst_age_A.png").is_file()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_data", "sample not found"),
        ("not_a_model", "model"),
        ("missing_model", "not found"),
        ("saved_model_folder", "savedmodel folder"),  # the loader's advice, not 'not found'
        ("bad_size", "input size"),
    ],
)
def test_unusable_inputs_exit_2_with_a_message(case, message, model_files, synthetic_dir, tmp_path, capsys):
    model, data = str(model_files[0]), str(synthetic_dir)
    extra = []
    if case == "missing_data":
        data = str(tmp_path / "nowhere")
    elif case == "not_a_model":
        fake = tmp_path / "fake.keras"
        fake.write_text("I am not a model")
        model = str(fake)
    elif case == "missing_model":
        model = str(tmp_path / "absent.keras")
    elif case == "saved_model_folder":
        folder = tmp_path / "exported"
        (folder / "variables").mkdir(parents=True)
        (folder / "saved_model.pb").write_bytes(b"\x08\x01")
        model = str(folder)
    elif case == "bad_size":
        extra = ["--input-size-a", "big"]
    out = tmp_path / "out"
    code = main(["evaluate", "--model-a", model, "--data", data, "--out", str(out), "--quiet", *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err.lower()
    assert not (out / "provenance.json").exists()


@pytest.mark.parametrize("edges, message", [("5,20,40,60", "must start at 0"), ("0,20,10", "increasing"),
                                             ("0,ten", "whole years")])
def test_bad_age_bands_are_refused_before_any_work(edges, message, model_files, synthetic_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        main(["evaluate", "--model-a", str(model_files[0]), "--data", str(synthetic_dir), "--out", str(out),
              "--quiet", "--age-bands", edges])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--age-bands" in err and message in err
    assert not out.exists()


@pytest.mark.parametrize("flag, value, message", [("--gradcam-n", "0", "must be at least 1, got 0"),
                                                   ("--gradcam-n", "-2", "must be at least 1, got -2"),
                                                   ("--seed", "-1", "must be at least 0, got -1")])
def test_counts_below_their_minimum_are_refused_before_any_work(flag, value, message, model_files, synthetic_dir, tmp_path, capsys):
    """--gradcam-n -2 once drew grids of all but 2 of the 50 worst faces (head(-2)); 0 put a
    numpy error in the README; --seed -1 failed with numpy's words after all the predicting."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        main(["evaluate", "--model-a", str(model_files[0]), "--data", str(synthetic_dir), "--out", str(out),
              "--quiet", flag, value])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and message in err
    assert not out.exists()


def test_a_report_inside_the_data_is_refused_and_the_same_model_twice_is_pointed_out(model_files, synthetic_dir, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    assert main(["evaluate", "--model-a", str(model_files[0]), "--data", str(data), "--out", str(data / "report"), "--quiet"]) == 2
    assert "lies inside --data" in capsys.readouterr().err and not (data / "report").exists()
    assert main(["evaluate", "--model-a", str(model_files[0]), "--model-b", str(model_files[0]), "--data", str(data),
                 "--out", str(tmp_path / "out"), "--no-gradcam", "--bootstrap", "20"]) == 0
    err = capsys.readouterr().err
    assert "are the same file" in err
    assert f"Sample: {len(list(data.iterdir()))} labelled images found in" in err


def test_two_unnamed_models_with_the_same_file_name_are_named_by_their_folders(tmp_path):
    """Two runs of B (runs/1/age_gender_B.keras, runs/2/age_gender_B.keras) were both called
    "age_gender_B" in every table and figure."""
    from analysis.__main__ import _told_apart
    from analysis.evaluation import ModelSpec

    specs = {"A": ModelSpec(str(tmp_path / "base" / "age_gender_B.keras")), "B": ModelSpec(str(tmp_path / "today" / "age_gender_B.keras"))}
    told = _told_apart(specs)
    assert (told["A"].name, told["B"].name) == ("base/age_gender_B", "today/age_gender_B")
    assert told["A"].path == specs["A"].path
    named = {**specs, "A": ModelSpec(specs["A"].path, name="mine")}
    assert _told_apart(named) == named  # a name given is kept, and then the other is not renamed
    other = {**specs, "B": ModelSpec(str(tmp_path / "today" / "age_gender_A.keras"))}
    assert _told_apart(other) == other  # different file names say it already
    assert _told_apart({"A": specs["A"]}) == {"A": specs["A"]}
    deep = {"A": ModelSpec(str(tmp_path / "exp1" / "models" / "age_gender_B.keras")),
            "B": ModelSpec(str(tmp_path / "exp2" / "models" / "age_gender_B.keras"))}
    assert [s.name for s in _told_apart(deep).values()] == ["exp1/models/age_gender_B", "exp2/models/age_gender_B"]
    rooted = {"A": ModelSpec("/models/m.keras"), "B": ModelSpec(str(tmp_path / "models" / "m.keras"))}
    assert [s.name for s in _told_apart(rooted).values()] == ["models/m", f"{tmp_path.name}/models/m"]
    dotted = {"A": ModelSpec(str(tmp_path / "runs" / "1" / ".." / "1" / "m.keras")), "B": ModelSpec(str(tmp_path / "runs" / "2" / "m.keras"))}
    assert [s.name for s in _told_apart(dotted).values()] == ["1/m", "2/m"]
    formats = {"A": ModelSpec(str(tmp_path / "age_gender_B.keras")), "B": ModelSpec(str(tmp_path / "age_gender_B.h5"))}
    assert [s.name for s in _told_apart(formats).values()] == ["age_gender_B.keras", "age_gender_B.h5"]


def test_help_explains_the_options():
    result = subprocess.run([sys.executable, "-m", "analysis", "evaluate", "--help"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    for needle in ("--model-a", "--model-b", "--data", "--out", "--preprocessing-b", "bgr_0_255",
                   "--female-index-a", "--age-classes-a", "--allow-unsafe-model", "AGE_GENDER_RACE"):
        assert needle in result.stdout


def test_inspect_prints_the_inferred_mapping(model_files, capsys):
    assert main(["inspect", str(model_files[1])]) == 0
    described = json.loads(capsys.readouterr().out)
    text = json.dumps(described)
    assert "gender_output" in text and "softmax" in text


def test_inspect_takes_the_evaluate_overrides(model_files, capsys):
    """To check that an override makes a model load before a full evaluate ('unrecognized arguments')."""
    assert main(["inspect", str(model_files[0]), "--female-index-a", "0", "--age-scale-a", "100"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["gender"]["female_index"] == 0 and described["age"]["scale"] == "x100"
    assert set(described["user_settings"]) == {"female_index", "age_scale"}
    assert main(["inspect", str(model_files[0]), "--age-classes-a", "1,6"]) == 2
    assert "2 age class values were given but 'age' has 1 class " in capsys.readouterr().err
