"""Streaming prediction and its cache, with stand-in models whose outputs are known functions of the pixels."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.dataset import load_image, load_sample
from analysis.predict import calibration_batch, predict_sample


class PixelModel:
    """Duck-typed LoadedModel: age = mean red value / 2, P(female) = mean green / 255."""

    def __init__(self, size=(32, 32), name="pixel", salt=""):
        self.input_size = size
        self.name = name
        self.preprocessing = "rgb_0_255"
        self.salt = salt
        self.calls = 0
        self.batch_shapes = set()

    def cache_key(self) -> str:
        return f"pixel-{self.input_size[0]}x{self.input_size[1]}-{self.salt}"

    def predict_batch(self, images):
        self.calls += 1
        self.batch_shapes.add(images.shape)
        pixels = images.astype(np.float64)
        return pixels[..., 0].mean(axis=(1, 2)) / 2, pixels[..., 1].mean(axis=(1, 2)) / 255


def expected(paths, size):
    images = np.stack([load_image(p, size).astype(np.float64) for p in paths])
    return images[..., 0].mean(axis=(1, 2)) / 2, images[..., 1].mean(axis=(1, 2)) / 255


@pytest.fixture()
def sample(synthetic_dir):
    return load_sample(synthetic_dir).sample


def test_two_models_each_see_their_own_input_size(sample, tmp_path):
    small, large = PixelModel((24, 24), "small"), PixelModel((40, 30), "large")
    steps = []
    run = predict_sample(sample, {"A": small, "B": large}, batch_size=16, cache_dir=tmp_path,
                         progress=lambda done, total: steps.append((done, total)))
    preds = run.predictions
    assert list(preds["image_id"]) == list(sample["image_id"])
    for key, model in (("A", small), ("B", large)):
        age, p = expected(preds["path"], model.input_size)
        np.testing.assert_allclose(preds[f"age_pred_{key}"], age, rtol=1e-9)
        np.testing.assert_allclose(preds[f"p_female_{key}"], p, rtol=1e-9)
        # every call is padded to one batch shape so a compiled model never retraces
        assert model.batch_shapes == {(16, *model.input_size, 3)}
    assert steps[-1] == (len(sample), len(sample))
    assert [d for d, _ in steps] == sorted(d for d, _ in steps)
    assert run.skipped.empty


def test_undecodable_images_are_skipped_and_the_rest_predicted(sample, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(Path(sample["path"].iloc[0]).parent, folder)
    victim = sorted(folder.iterdir())[5]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])  # truncated: passes the header check, fails to decode
    broken = load_sample(folder).sample
    run = predict_sample(broken, {"A": PixelModel()}, batch_size=32, cache_dir=tmp_path / "cache")
    assert len(run.predictions) == len(broken) - 1
    assert list(run.skipped["path"]) == [str(victim.resolve())]
    assert "not decodable" in run.skipped["reason"].iloc[0]
    # The failure is remembered by the cache too, not retried forever.
    model = PixelModel()
    again = predict_sample(broken, {"A": model}, batch_size=32, cache_dir=tmp_path / "cache")
    assert len(again.skipped) == 1 and again.cached["A"] == len(broken) - 1 and model.calls == 0


def test_a_file_gone_since_the_scan_is_skipped_but_not_remembered_as_undecodable(sample, tmp_path):
    """A reader whose extraction was swapped out under it (or a file moved away) cached the image's
    content as "not decodable" for good."""
    folder = tmp_path / "faces"
    shutil.copytree(Path(sample["path"].iloc[0]).parent, folder)
    table = load_sample(folder).sample
    victim = Path(table["path"].iloc[3])
    kept = victim.read_bytes()
    victim.unlink()
    run = predict_sample(table, {"A": PixelModel()}, batch_size=32, cache_dir=tmp_path / "cache")
    assert list(run.skipped["path"]) == [str(victim)] and run.skipped["reason"].iloc[0].startswith("cannot be read: ")
    victim.write_bytes(kept)  # back again: predicted, not skipped from the cache
    again = predict_sample(table, {"A": PixelModel()}, batch_size=32, cache_dir=tmp_path / "cache")
    assert again.skipped.empty and len(again.predictions) == len(table)


def test_cache_hit_runs_no_model_and_gives_identical_numbers(sample, tmp_path):
    first_model = PixelModel()
    first = predict_sample(sample, {"A": first_model}, cache_dir=tmp_path)
    second_model = PixelModel()
    second = predict_sample(sample, {"A": second_model}, cache_dir=tmp_path)
    assert second_model.calls == 0 and second.cached == {"A": len(sample)}
    assert first.predictions.equals(second.predictions)
    # New settings (a different cache key) must not reuse the old numbers.
    other = PixelModel(salt="bgr")
    predict_sample(sample, {"A": other}, cache_dir=tmp_path)
    assert other.calls > 0


def test_only_new_images_are_computed_for_an_overlapping_sample(sample, tmp_path):
    predict_sample(sample.iloc[:50], {"A": PixelModel()}, batch_size=10, cache_dir=tmp_path)
    model = PixelModel()
    run = predict_sample(sample, {"A": model}, batch_size=10, cache_dir=tmp_path)
    assert run.cached["A"] == 50
    assert model.calls == int(np.ceil((len(sample) - 50) / 10))
    age, _ = expected(run.predictions["path"], model.input_size)
    np.testing.assert_allclose(run.predictions["age_pred_A"], age, rtol=1e-9)


def test_a_corrupt_cache_file_is_recomputed(sample, tmp_path):
    predict_sample(sample, {"A": PixelModel()}, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("*.npz")
    cache_file.write_bytes(b"garbage")
    model = PixelModel()
    run = predict_sample(sample, {"A": model}, cache_dir=tmp_path)
    assert model.calls > 0 and run.cached["A"] == 0
    age, _ = expected(run.predictions["path"], model.input_size)
    np.testing.assert_allclose(run.predictions["age_pred_A"], age, rtol=1e-9)


def test_nan_outputs_give_a_clear_error(sample, tmp_path):
    class NaNModel(PixelModel):
        def predict_batch(self, images):
            return np.full(len(images), np.nan), np.zeros(len(images))

    with pytest.raises(ValueError, match="NaN"):
        predict_sample(sample, {"A": NaNModel()}, cache_dir=tmp_path)


def test_bad_arguments(sample):
    with pytest.raises(ValueError, match="at least one model"):
        predict_sample(sample, {})
    with pytest.raises(ValueError, match="batch_size"):
        predict_sample(sample, {"A": PixelModel()}, batch_size=0)


def test_calibration_batch_is_labelled_and_seeded(sample):
    images, ages, genders = calibration_batch(sample, (20, 20), n=8, seed=1)
    again, _, _ = calibration_batch(sample, (20, 20), n=8, seed=1)
    assert images.shape == (8, 20, 20, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, again)
    by_age = dict(zip(sample["age"], sample["path"]))
    assert set(ages) <= set(sample["age"]) and set(genders) <= {0, 1}
    assert len(by_age) > 0


def test_calibration_batch_takes_both_genders_from_a_skewed_sample(sample):
    """The gender-convention check needs both genders: from a sample of few men the batch takes
    every man it can (up to half), not the handful a random draw would give."""
    men, women = sample[sample["gender"] == 0], sample[sample["gender"] == 1]
    assert len(men) >= 3 and len(women) >= 12
    skewed = pd.concat([men.head(3), women]).reset_index(drop=True)
    n = 12
    _, _, genders = calibration_batch(skewed, (20, 20), n=n, seed=0)
    assert len(genders) == n and int((genders == 0).sum()) == 3
    _, _, balanced = calibration_batch(sample, (20, 20), n=8, seed=3)
    assert (balanced == 0).sum() == (balanced == 1).sum() == 4
    # The draw is still a random one: another seed picks other women.
    first, _, _ = calibration_batch(skewed, (20, 20), n=n, seed=0)
    other, _, _ = calibration_batch(skewed, (20, 20), n=n, seed=1)
    assert not np.array_equal(first, other)


def test_files_skipped_from_a_zip_are_named_by_their_path_in_the_zip(sample, tmp_path):
    """At every stage (a bad name, a byte-identical copy, a failed decode) a zip's files are
    reported as the user knows them, not by where the zip was unpacked in the cache."""
    import zipfile

    from analysis.evaluation import Evaluation

    first, second = (Path(p) for p in sample["path"].iloc[:2])
    data = second.read_bytes()
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(first, f"faces/{first.name}")
        zipped.writestr(f"faces/{second.name}", data[: len(data) // 3])  # decodes only in part
        zipped.write(first, f"faces/copy/{first.name}")  # byte-identical to the first
        zipped.writestr("faces/holiday.jpg", first.read_bytes())  # no UTKFace labels in the name
    result = load_sample(archive, extract_to=tmp_path / "unpacked")
    run = predict_sample(result.sample, {"A": PixelModel()}, batch_size=8, cache_dir=tmp_path / "cache")
    skipped = Evaluation(sample=result, models={}, preprocessing_scores={}, run=run).skipped
    where = dict(zip(skipped["path"], skipped["stage"]))
    assert where == {"faces/holiday.jpg": "reading", f"faces/copy/{first.name}": "reading",
                     f"faces/{second.name}": "decoding"}
    # a folder's skipped files keep their full path
    assert result.reported_path(str(tmp_path / "elsewhere" / "x.jpg")) == str(tmp_path / "elsewhere" / "x.jpg")
    assert load_sample(tmp_path / "unpacked").extracted_to == ""


def test_files_skipped_from_a_folder_are_named_as_found_at_every_stage(sample, tmp_path, monkeypatch):
    """A folder given as a relative path had its reading skips reported as "faces/notes.txt" but
    its decoding failures by their resolved absolute path (a link's target, even)."""
    from analysis.evaluation import Evaluation

    first, second = (Path(p) for p in sample["path"].iloc[:2])
    (tmp_path / "faces").mkdir()
    (tmp_path / "faces" / first.name).write_bytes(first.read_bytes())
    (tmp_path / "faces" / "notes.txt").write_text("x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / second.name).write_bytes(second.read_bytes()[: second.stat().st_size // 3])  # decodes only in part
    (tmp_path / "faces" / second.name).symlink_to(elsewhere / second.name)
    monkeypatch.chdir(tmp_path)
    result = load_sample("faces")
    run = predict_sample(result.sample, {"A": PixelModel()}, batch_size=8, cache_dir=tmp_path / "cache")
    skipped = Evaluation(sample=result, models={}, preprocessing_scores={}, run=run).skipped
    assert dict(zip(skipped["path"], skipped["stage"])) == {"faces/notes.txt": "reading", f"faces/{second.name}": "decoding"}


def test_when_nothing_decodes_the_check_on_labelled_images_names_a_file_and_its_reason(sample, tmp_path):
    """It said "no decodable images to calibrate preprocessing on": no file, no reason."""
    folder = tmp_path / "cut"
    folder.mkdir()
    for path in map(Path, sample["path"].iloc[:3]):
        (folder / path.name).write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the header passes
    result = load_sample(folder)
    with pytest.raises(ValueError, match=r"none of the 3 images tried could be decoded to check the model on "
                                         r"\(e\.g\. \d+_\d_\d_\w+\.jpg\S*: not decodable: "):
        calibration_batch(result.sample, (20, 20))
