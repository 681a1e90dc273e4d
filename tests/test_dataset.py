"""Reading UTKFace-style samples: names, bad files, duplicates, zips (including hostile ones)."""

from __future__ import annotations

import io
import re
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis.constants import AGE_BAND_EDGES, age_band_labels, assign_age_bands
from analysis.dataset import (
    SampleError,
    extract_zip_safely,
    load_sample,
    parse_utkface_name,
    read_image_rgb,
    resize_image,
)


def _jpeg_bytes(color=(120, 80, 60), size=(40, 40), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


# ---------------------------------------------------------------- names

@pytest.mark.parametrize(
    "name, labels",
    [
        ("26_1_2_20170116174525125.jpg.chip.jpg", (26, 1, 2)),
        ("26_1_2_20170116174525125.jpg", (26, 1, 2)),
        ("26_0_4_20170116174525125.JPG", (26, 0, 4)),
        ("3_0_1_20170116174525125.png", (3, 0, 1)),
        ("116_1_0.jpeg", (116, 1, 0)),
        ("sub/dir/40_0_3_2017.jpg.chip.jpg", (40, 0, 3)),
    ],
)
def test_parse_accepts_the_usual_variants(name, labels):
    assert parse_utkface_name(name) == labels


@pytest.mark.parametrize(
    "name, reason",
    [
        ("39_1_20170116174525125.jpg.chip.jpg", "ethnicity missing"),
        ("61_1_20170109150557335.jpg.chip.jpg", "ethnicity missing"),
        ("61_1_3_20170109150557335 .jpg.chip.jpg", "space"),
        ("53__0_20170116184028385.jpg.chip.jpg", "malformed"),
        ("24_0_1_20170116220224657jpg.chip.jpg", "malformed"),
        ("face.jpg", "malformed"),
        ("130_0_1_2017.jpg", "age 130"),
        ("30_2_1_2017.jpg", "gender 2"),
        ("30_1_5_2017.jpg", "ethnicity 5"),
        # a two- or four-digit race field is out of range; a timestamp in its place means it is missing
        ("25_0_10_20170101000021.jpg", "label out of range: ethnicity 10"),
        ("25_0_20170101000021.jpg", "ethnicity missing"),
        ("25_0_1234_20170101000021.jpg", "label out of range: ethnicity 1234"),
    ],
)
def test_parse_rejects_malformed_names_with_reason(name, reason):
    with pytest.raises(ValueError, match=reason):
        parse_utkface_name(name)


def test_age_bands_match_pandas_cut():
    ages = np.array([0, 1, 2, 3, 9, 10, 19, 20, 29, 45, 69, 70, 116])
    ours = assign_age_bands(ages)
    bins = list(AGE_BAND_EDGES) + [np.inf]
    expected = pd.cut(ages, bins=bins, right=False, labels=age_band_labels())
    assert list(ours) == list(expected)
    assert list(ours.categories) == ["0–2", "3–9", "10–19", "20–29", "30–39", "40–49", "50–59", "60–69", "70+"]
    assert ours.ordered


def test_custom_age_bands(synthetic_dir):
    ours = assign_age_bands([5, 15, 25, 65], edges=(0, 18, 60))
    assert list(ours) == ["0–17", "0–17", "18–59", "60+"]
    read = load_sample(synthetic_dir, age_band_edges=(0, 18, 60))  # the sample remembers its bands
    assert read.age_band_edges == (0, 18, 60) and set(read.sample["age_band"].astype(str)) <= {"0–17", "18–59", "60+"}
    with pytest.raises(ValueError, match="increasing"):
        assign_age_bands([5], edges=(0, 20, 10))


# ---------------------------------------------------------------- decoding

@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16", "LA"])
def test_read_image_rgb_converts_every_mode(tmp_path, mode):
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    if mode == "I;16":
        Image.fromarray(np.full((10, 12), 40000, dtype=np.uint16)).save(path, format="PNG")
    else:
        Image.new(mode, (12, 10)).save(path, format=fmt)
    pixels = read_image_rgb(path)
    assert pixels.shape == (10, 12, 3) and pixels.dtype == np.uint8


def test_16_bit_grey_keeps_its_brightness(tmp_path):
    """A 16-bit PNG holds the same picture as an 8-bit one at 257× the values; a darker 16-bit
    image must stay darker (stretching to its own maximum would make both the same)."""
    gray8 = np.random.default_rng(0).integers(0, 200, (10, 12)).astype(np.uint8)
    Image.fromarray(gray8).save(tmp_path / "g8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    Image.fromarray(gray8.astype(np.uint16) * 128).save(tmp_path / "g16_dark.png")
    eight, sixteen, dark = (read_image_rgb(tmp_path / f"{n}.png") for n in ("g8", "g16", "g16_dark"))
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    np.testing.assert_array_equal(sixteen, eight)
    np.testing.assert_array_equal(dark[..., 0], np.rint(gray8.astype(float) * 128 / 257).astype(np.uint8))


def test_read_image_rgb_composites_alpha_on_white(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(path)
    assert (read_image_rgb(path) == 255).all()


def test_read_image_rgb_rejects_junk_and_truncation(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image" * 10)
    with pytest.raises(ValueError, match="not decodable"):
        read_image_rgb(junk)
    full = _jpeg_bytes(size=(64, 64))
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="not decodable"):
        read_image_rgb(truncated)


def test_resize_image_shape_and_identity():
    image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    assert resize_image(image, (20, 30)) is image
    assert resize_image(image, (8, 5)).shape == (8, 5, 3)


# ---------------------------------------------------------------- folders

def _messy_folder(root: Path) -> dict[str, str]:
    """A folder of good and bad files; returns {file name: expected skip reason fragment}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "25_0_0_20170101000000001.jpg.chip.jpg").write_bytes(_jpeg_bytes((200, 150, 120)))
    (root / "nested").mkdir()
    (root / "nested" / "70_1_1_20170101000000002.JPG").write_bytes(_jpeg_bytes((90, 60, 40)))
    buffer = io.BytesIO()
    Image.new("CMYK", (30, 30), (10, 60, 90, 0)).save(buffer, format="JPEG")
    (root / "33_1_2_20170101000000003.jpg").write_bytes(buffer.getvalue())
    Image.new("RGBA", (30, 30), (10, 200, 90, 128)).save(root / "8_0_3_20170101000000004.png")
    (root / "50_1_4_20170101000000005.jpg").write_bytes(_jpeg_bytes(128, mode="L"))
    # the same bytes as the first file, with other labels: label noise
    (root / "31_1_0_20170101000000006.jpg.chip.jpg").write_bytes(_jpeg_bytes((200, 150, 120)))
    bad = {
        "39_1_20170116174525125.jpg.chip.jpg": "ethnicity missing",
        "40_0_1_20170116174525125 .jpg.chip.jpg": "space",
        "41_0_1_20170116174525125jpg.chip.jpg": "malformed",
        "42_0_1_20170101000000007.jpg": "empty file",
        "43_0_1_20170101000000008.jpg": "not decodable",
        "44_0_9_20170101000000009.jpg": "ethnicity 9",
        "notes.txt": "not an image",
        "45_0_1_20170101000000010.png": "too large",
    }
    for name in list(bad)[:3]:
        (root / name).write_bytes(_jpeg_bytes())
    (root / "42_0_1_20170101000000007.jpg").write_bytes(b"")
    (root / "43_0_1_20170101000000008.jpg").write_bytes(b"\x89PNG garbage" * 20)
    (root / "44_0_9_20170101000000009.jpg").write_bytes(_jpeg_bytes())
    (root / "notes.txt").write_text("hello")
    Image.new("1", (8000, 6000)).save(root / "45_0_1_20170101000000010.png")  # 48 Mpx, tiny file
    (root / ".DS_Store").write_bytes(b"\0\0")
    return bad


def test_load_sample_reports_bad_files_and_keeps_the_rest(tmp_path):
    bad = _messy_folder(tmp_path / "messy")
    result = load_sample(tmp_path / "messy")
    sample = result.sample
    assert sorted(sample["file_name"]) == sorted(
        [
            "70_1_1_20170101000000002.JPG",
            "33_1_2_20170101000000003.jpg",
            "8_0_3_20170101000000004.png",
            "50_1_4_20170101000000005.jpg",
        ]
    )
    row = sample.set_index("file_name").loc["70_1_1_20170101000000002.JPG"]
    assert (row["age"], row["gender"], row["ethnicity"], row["age_band"]) == (70, 1, 1, "70+")
    reasons = dict(zip(result.skipped["path"].map(lambda p: Path(p).name), result.skipped["reason"]))
    for name, fragment in bad.items():
        assert fragment in reasons[name], (name, reasons.get(name))
    # Byte-identical, labelled 25/male/White and 31/female/White: neither label can be trusted.
    assert reasons["31_1_0_20170101000000006.jpg.chip.jpg"].startswith("conflicting labels")
    assert reasons["25_0_0_20170101000000001.jpg.chip.jpg"].startswith("conflicting labels")
    assert ".DS_Store" not in reasons
    assert len(result.duplicates) == 1 and not result.duplicates["same_labels"].iloc[0]
    assert sample["image_id"].is_unique
    assert set(sample.columns) >= {"image_id", "path", "file_name", "age", "gender", "ethnicity", "age_band"}
    assert result.skipped_counts()["malformed name"] == 3


def test_same_label_copies_keep_one_and_conflicting_copies_keep_none(tmp_path):
    folder = tmp_path / "dups"
    folder.mkdir()
    red, blue = _jpeg_bytes((200, 30, 20)), _jpeg_bytes((20, 40, 200))
    (folder / "20_0_0_20170101000000001.jpg").write_bytes(red)
    (folder / "20_0_0_20170101000000002.jpg").write_bytes(red)  # same labels: one is kept
    (folder / "30_1_1_20170101000000003.jpg").write_bytes(blue)
    (folder / "30_1_1_20170101000000004.jpg").write_bytes(blue)
    (folder / "30_0_1_20170101000000005.jpg").write_bytes(blue)  # the same face labelled male
    (folder / "40_1_2_20170101000000006.jpg").write_bytes(_jpeg_bytes((30, 200, 40)))
    result = load_sample(folder)
    assert sorted(result.sample["file_name"]) == ["20_0_0_20170101000000001.jpg", "40_1_2_20170101000000006.jpg"]
    reasons = dict(zip(result.skipped["path"].map(lambda p: Path(p).name), result.skipped["reason"]))
    assert reasons["20_0_0_20170101000000002.jpg"] == "duplicate: byte-identical to 20_0_0_20170101000000001.jpg (same labels)"
    assert {n for n, r in reasons.items() if r.startswith("conflicting labels")} == {
        "30_1_1_20170101000000003.jpg", "30_1_1_20170101000000004.jpg", "30_0_1_20170101000000005.jpg"}
    assert result.skipped_counts() == {"duplicate": 1, "conflicting labels": 3}


def test_keep_duplicates_keeps_both_copies(tmp_path):
    _messy_folder(tmp_path / "m")
    assert len(load_sample(tmp_path / "m", keep_duplicates=True).sample) == 6


def test_unusable_sources_raise_clear_errors(tmp_path):
    with pytest.raises(SampleError, match="not found"):
        load_sample(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SampleError, match="no usable labelled images"):
        load_sample(tmp_path / "empty")
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    (unlabeled / "holiday.jpg").write_bytes(_jpeg_bytes())
    with pytest.raises(SampleError, match="AGE_GENDER_RACE"):
        load_sample(unlabeled)
    fake_zip = tmp_path / "sample.zip"
    fake_zip.write_text("not a zip at all")
    with pytest.raises(SampleError, match="not a zip"):
        load_sample(fake_zip)


def test_synthetic_sample_reads_back_with_its_labels(synthetic_dir):
    result = load_sample(synthetic_dir)
    assert len(result.sample) == 120 and result.skipped.empty
    for row in result.sample.head(10).itertuples():
        assert parse_utkface_name(row.file_name) == (row.age, row.gender, row.ethnicity)


def test_utkface_test_sample(utkface_test_dir):
    result = load_sample(utkface_test_dir)
    n_files = len(list(utkface_test_dir.iterdir()))
    assert len(result.sample) + len(result.skipped) == n_files
    assert len(result.sample) >= 0.99 * n_files
    assert result.sample["gender"].isin([0, 1]).all()
    assert result.sample["age_band"].notna().all()


# ---------------------------------------------------------------- zips

def _zip_folder(folder: Path, zip_path: Path) -> Path:
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, "sample/" + path.relative_to(folder).as_posix())
    return zip_path


def test_zip_gives_the_same_sample_as_the_folder(tmp_path, synthetic_dir):
    archive = _zip_folder(synthetic_dir, tmp_path / "synthetic.zip")
    from_zip = load_sample(archive, extract_to=tmp_path / "out")
    from_folder = load_sample(synthetic_dir)
    assert from_zip.fingerprint == from_folder.fingerprint
    assert all(Path(p).is_relative_to(tmp_path / "out") for p in from_zip.sample["path"])
    again = load_sample(archive, extract_to=tmp_path / "out")  # reuses the extraction
    assert again.fingerprint == from_folder.fingerprint


def test_hostile_zip_entries_never_leave_the_target(tmp_path):
    archive_path = tmp_path / "hostile.zip"
    good = _jpeg_bytes()
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("20_0_0_20170101000000001.jpg", good)
        archive.writestr("../21_0_0_20170101000000002.jpg", good)
        archive.writestr("/tmp/22_0_0_20170101000000003.jpg", good)
        archive.writestr("a/../../23_0_0_20170101000000004.jpg", good)
        archive.writestr("C:/24_0_0_20170101000000005.jpg", good)
        link = zipfile.ZipInfo("25_0_0_20170101000000006.jpg")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
        archive.writestr("__MACOSX/._20_0_0_20170101000000001.jpg", b"junk")
    target = tmp_path / "inside" / "target"
    before = set(tmp_path.rglob("*"))
    result = load_sample(archive_path, extract_to=target)
    written = set(tmp_path.rglob("*")) - before
    assert all(p == target.parent or p.is_relative_to(target) for p in written)
    assert not (tmp_path / "inside" / "21_0_0_20170101000000002.jpg").exists()
    assert list(result.sample["file_name"]) == ["20_0_0_20170101000000001.jpg"]
    unsafe = result.skipped[result.skipped["reason"].str.contains("unsafe")]
    assert len(unsafe) == 5


def test_every_zip_entry_left_out_is_listed_with_its_reason_on_every_run(tmp_path):
    """Non-images, a nested zip, an encrypted entry, a repeated name and a file where a folder
    must go are listed — the same on the first run and when the extraction is reused — while the
    good images survive; hidden files and __MACOSX/ are ignored as in a folder."""
    blue, red, green = _jpeg_bytes((20, 40, 200)), _jpeg_bytes((200, 30, 20)), _jpeg_bytes((30, 200, 40))
    archive_path = tmp_path / "messy.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("photos/20_0_0_20170101000000001.jpg", green)
        archive.writestr("photos/readme.txt", b"hello")
        archive.writestr("photos/inner.zip", b"PK")
        archive.writestr("photos/30_1_0_20170101000000009.tif", b"II*")
        archive.writestr("photos/31_1_1_20170101000000010.jpg", blue)  # marked encrypted below
        archive.writestr("dup/21_1_2_20170101000000002.jpg", blue)
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("dup/21_1_2_20170101000000002.jpg", red)
        archive.writestr("a.jpg", green)
        archive.writestr("a.jpg/22_0_3_20170101000000003.jpg", red)
        archive.writestr(".hidden/23_0_0_20170101000000004.jpg", blue)
        archive.writestr("__MACOSX/photos/._20_0_0_20170101000000001.jpg", b"junk")
    _mark_encrypted(archive_path, "photos/31_1_1_20170101000000010.jpg")
    reasons = []
    for _ in range(2):  # the second run reuses the extraction
        result = load_sample(archive_path, extract_to=tmp_path / "out")
        assert sorted(result.sample["file_name"]) == [
            "20_0_0_20170101000000001.jpg", "21_1_2_20170101000000002.jpg", "22_0_3_20170101000000003.jpg"]
        reasons.append(dict(zip(result.skipped["path"], result.skipped["reason"])))
    assert reasons[0] == reasons[1]
    why = reasons[0]
    assert set(why) == {"photos/readme.txt", "photos/inner.zip", "photos/30_1_0_20170101000000009.tif",
                        "photos/31_1_1_20170101000000010.jpg", "dup/21_1_2_20170101000000002.jpg", "a.jpg"}
    assert why["photos/inner.zip"].startswith("a zip inside the zip")
    accepted = "(images must be .jpg, .jpeg, .png, .bmp, .webp)"
    assert why["photos/readme.txt"] == f"not an image file: unsupported extension .txt {accepted}"
    assert why["photos/30_1_0_20170101000000009.tif"] == f"not an image file: unsupported extension .tif {accepted}"
    assert why["photos/31_1_1_20170101000000010.jpg"].startswith("not decodable: encrypted zip entry (password-protected)")
    assert why["dup/21_1_2_20170101000000002.jpg"].startswith("duplicate zip entry")
    assert "clashes with a folder" in why["a.jpg"]
    kept = result.sample.set_index("file_name").loc["21_1_2_20170101000000002.jpg", "path"]
    assert read_image_rgb(kept)[..., 2].mean() > 150  # the first of the two same-named entries (blue)


def test_zip_names_that_clash_on_a_case_insensitive_disk_are_not_both_unpacked(tmp_path):
    red, blue = _jpeg_bytes((200, 30, 20)), _jpeg_bytes((20, 40, 200))
    archive_path = tmp_path / "cases.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("Faces/20_0_0_20170101000000001.JPG", red)
        archive.writestr("faces/20_0_0_20170101000000001.jpg", blue)  # the same file on macOS/Windows
        archive.writestr("B.jpg", red)
        archive.writestr("b.jpg/21_1_0_20170101000000002.jpg", blue)  # needs a folder named like B.jpg
        archive.writestr("photos\\", b"")  # a folder entry written with a backslash
    result = load_sample(archive_path, extract_to=tmp_path / "out")
    why = dict(zip(result.skipped["path"], result.skipped["reason"]))
    assert set(why) == {"faces/20_0_0_20170101000000001.jpg", "B.jpg"}
    assert why["faces/20_0_0_20170101000000001.jpg"].startswith("duplicate zip entry")
    assert "clashes with a folder" in why["B.jpg"]
    assert sorted(result.sample["file_name"]) == ["20_0_0_20170101000000001.JPG", "21_1_0_20170101000000002.jpg"]


def test_an_entry_that_cannot_be_written_is_skipped_and_remembered(tmp_path, monkeypatch):
    import errno

    import analysis.dataset as dataset

    copy = dataset._copy_bounded

    def refuse_long_names(archive, entry, destination, budget):
        if "9999" in entry.filename:
            raise OSError(errno.ENAMETOOLONG, "File name too long")
        return copy(archive, entry, destination, budget)

    monkeypatch.setattr(dataset, "_copy_bounded", refuse_long_names)
    archive_path = tmp_path / "names.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("20_0_0_20170101000000001.jpg", _jpeg_bytes((200, 30, 20)))
        archive.writestr("21_1_0_20170101009999.jpg", _jpeg_bytes((20, 40, 200)))
    runs = [load_sample(archive_path, extract_to=tmp_path / "out") for _ in range(2)]
    for result in runs:
        assert list(result.sample["file_name"]) == ["20_0_0_20170101000000001.jpg"]
        assert result.skipped.values.tolist() == [["21_1_0_20170101009999.jpg", "cannot be unpacked here: File name too long"]]


def test_an_extraction_made_under_older_rules_is_unpacked_again(tmp_path):
    archive_path = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("20_0_0_20170101000000001.jpg", _jpeg_bytes((20, 40, 200)))
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("20_0_0_20170101000000001.jpg", _jpeg_bytes((200, 30, 20)))
    out = tmp_path / "out"
    load_sample(archive_path, extract_to=out)
    image = out / "20_0_0_20170101000000001.jpg"
    assert read_image_rgb(image)[..., 2].mean() > 150  # the first entry (blue) was kept
    # What the old rules left behind: the last same-named entry on disk, a bare marker file.
    image.write_bytes(_jpeg_bytes((200, 30, 20)))
    (out / ".facecheck-extracted").write_text("")
    result = load_sample(archive_path, extract_to=out)
    assert read_image_rgb(result.sample["path"].iloc[0])[..., 2].mean() > 150


def _mark_encrypted(path: Path, name: str) -> None:
    """Set the "encrypted" flag bit of entry `name` in its local header and central directory
    (Python's zipfile cannot write encrypted entries)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        data[archive.getinfo(name).header_offset + 6] |= 0x1
    start = 0
    while (start := data.find(b"PK\x01\x02", start)) >= 0:
        length = int.from_bytes(data[start + 28:start + 30], "little")
        if data[start + 46:start + 46 + length] == name.encode():
            data[start + 8] |= 0x1
        start += 4
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo(name).flag_bits & 0x1


def test_age_band_edges_must_cover_every_age(synthetic_dir):
    with pytest.raises(SampleError, match="must start at 0.*e.g. 0,5,20"):
        load_sample(synthetic_dir, age_band_edges=(5, 20))
    banded = load_sample(synthetic_dir, age_band_edges=(0, 20))
    expected = np.where(banded.sample["age"] < 20, "0–19", "20+")
    assert (banded.sample["age_band"].astype(str).to_numpy() == expected).all()


def test_oversized_files_are_skipped_before_they_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr("analysis.dataset.MAX_IMAGE_FILE_BYTES", 1000)
    small, large = _jpeg_bytes(size=(8, 8)), _jpeg_bytes(size=(200, 200))
    assert len(small) < 1000 < len(large)
    folder = tmp_path / "faces"
    folder.mkdir()
    (folder / "20_0_0_20170101000000001.jpg").write_bytes(small)
    (folder / "21_0_0_20170101000000002.jpg").write_bytes(large)
    result = load_sample(folder)
    assert list(result.sample["file_name"]) == ["20_0_0_20170101000000001.jpg"]
    assert result.skipped["reason"].str.startswith("file too large for a face image").tolist() == [True]
    archive_path = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.write(folder / "20_0_0_20170101000000001.jpg", "20_0_0_20170101000000001.jpg")
        archive.write(folder / "21_0_0_20170101000000002.jpg", "21_0_0_20170101000000002.jpg")
    zipped = load_sample(archive_path, extract_to=tmp_path / "out")
    assert list(zipped.sample["file_name"]) == ["20_0_0_20170101000000001.jpg"]
    assert not (tmp_path / "out" / "21_0_0_20170101000000002.jpg").exists()  # never unpacked


def test_undecodable_and_huge_images_get_stable_reasons(tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    Image.new("L", (10000, 9000)).save(folder / "23_0_0_20170101000000004.png")  # 90 MP: Pillow warns
    assert 10000 * 9000 > Image.MAX_IMAGE_PIXELS
    (folder / "20_0_0_20170101000000001.jpg").write_bytes(b"this is text, not a JPEG" * 20)
    big = Image.new("L", (8000, 6000))  # 48 MP, over the 40 MP limit
    big.save(folder / "21_0_0_20170101000000002.png", optimize=False)
    (folder / "22_0_0_20170101000000003.jpg").write_bytes(_jpeg_bytes())
    first, second = (load_sample_or_reasons(folder) for _ in range(2))
    assert first == second
    assert first["20_0_0_20170101000000001.jpg"] == "not decodable: not an image format Pillow reads (or the file is damaged)"
    assert first["21_0_0_20170101000000002.png"].startswith("image too large: 8000x6000 pixels")
    assert first["23_0_0_20170101000000004.png"].startswith("image too large")
    # A reason, not a warning on the user's console (pytest's recwarn would record every warning).
    import subprocess, sys
    probe = f"from analysis.dataset import load_sample; load_sample({str(folder)!r})"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert "Warning" not in result.stderr, result.stderr
    assert not re.search(r"0x[0-9a-f]{6,}", " ".join(first.values()))  # no memory address


def load_sample_or_reasons(folder) -> dict:
    from analysis.dataset import SampleError as Error

    try:
        skipped = load_sample(folder).skipped
    except Error:
        raise AssertionError("the sample should have failed only on its images") from None
    return {Path(p).name: r for p, r in zip(skipped["path"], skipped["reason"])}


def test_zip_bombs_and_corrupt_zips_are_refused(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("20_0_0_20170101000000001.jpg", b"\0" * 5_000_000)
    assert bomb.stat().st_size < 50_000
    with pytest.raises(SampleError, match="zip"):
        extract_zip_safely(bomb, tmp_path / "t1", max_bytes=1_000_000)
    assert not list(tmp_path.glob("t1*"))  # neither the target nor an unpacking folder is left

    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as archive:
        for i in range(12):
            archive.writestr(f"{20 + i}_0_0_2017.jpg", b"x")
    with pytest.raises(SampleError, match="limit is 10"):
        extract_zip_safely(many, tmp_path / "t2", max_files=10)

    corrupt = tmp_path / "corrupt.zip"
    shutil.copy(many, corrupt)
    data = bytearray(corrupt.read_bytes())
    corrupt.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(SampleError, match="corrupt.zip is a damaged or incomplete zip .*download or zip it again"):
        load_sample(corrupt, extract_to=tmp_path / "t3")


# ------------------------------------------------ what real users' folders and zips hold


def _set_method(path: Path, name: str, method: int) -> None:
    """Write compression method `method` for entry `name` in its local header and central directory
    (Deflate64 = 9, as Windows and 7-Zip write it; Python's zipfile cannot)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        offset = archive.getinfo(name).header_offset
    data[offset + 8:offset + 10] = method.to_bytes(2, "little")
    start = 0
    while (start := data.find(b"PK\x01\x02", start)) >= 0:
        length = int.from_bytes(data[start + 28:start + 30], "little")
        if data[start + 46:start + 46 + length] == name.encode():
            data[start + 10:start + 12] = method.to_bytes(2, "little")
        start += 4
    path.write_bytes(bytes(data))


def test_unsupported_compression_and_encrypted_entries_say_what_to_do(tmp_path):
    archive_path = tmp_path / "windows.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("20_0_0_20170101000000001.jpg", _jpeg_bytes((200, 30, 20)))
        archive.writestr("30_1_0_20170101000000002.jpg", _jpeg_bytes((20, 30, 200)))
    _set_method(archive_path, "30_1_0_20170101000000002.jpg", 9)
    result = load_sample(archive_path, extract_to=tmp_path / "out")
    assert list(result.sample["file_name"]) == ["20_0_0_20170101000000001.jpg"]
    assert result.skipped.values.tolist() == [[
        "30_1_0_20170101000000002.jpg",
        "not decodable: zip compression method 9 (Deflate64) is not supported; zip it again with the standard Deflate method"]]
    # Nothing usable: the message gives the commonest reason, not the naming rule.
    locked = tmp_path / "locked.zip"
    with zipfile.ZipFile(locked, "w") as archive:
        for i in range(3):
            archive.writestr(f"2{i}_0_0_2017010100000000{i}.jpg", _jpeg_bytes())
    for i in range(3):
        _mark_encrypted(locked, f"2{i}_0_0_2017010100000000{i}.jpg")
    with pytest.raises(SampleError) as error:
        load_sample(locked, extract_to=tmp_path / "out2")
    assert ("3 files skipped, 3 of them as not decodable (e.g. 20_0_0_20170101000000000.jpg: \"not decodable: encrypted zip entry (password-protected); "
            "zip it again without a password\")") in str(error.value)
    assert "AGE_GENDER_RACE" not in str(error.value)


def test_concurrent_reads_of_one_zip_each_get_the_whole_sample(tmp_path):
    """Two readers of one zip (the CLI beside the app) shared one unpacking folder: one crashed,
    the other got part of the sample and marked it finished for every later run."""
    from concurrent.futures import ThreadPoolExecutor

    archive_path = tmp_path / "big.zip"
    noise = np.random.default_rng(0).integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
    with zipfile.ZipFile(archive_path, "w") as archive:
        for i in range(300):
            buffer = io.BytesIO()
            Image.fromarray(noise[i]).save(buffer, format="PNG")
            archive.writestr(f"sub/{i % 90 + 1}_{i % 2}_0_2017010100{i:07d}.png", buffer.getvalue())
    out = tmp_path / "cache" / "sample"
    for _ in range(3):
        shutil.rmtree(out, ignore_errors=True)
        with ThreadPoolExecutor(4) as pool:
            counts = list(pool.map(lambda _: len(load_sample(archive_path, extract_to=out).sample), range(4)))
        assert counts == [300] * 4
        assert len(load_sample(archive_path, extract_to=out).sample) == 300
    assert sorted(p.name for p in out.parent.iterdir()) == ["sample"]  # no unpacking folder left behind


def test_a_finished_extraction_missing_files_is_unpacked_again(tmp_path):
    archive_path = tmp_path / "ten.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        for i in range(10):
            archive.writestr(f"{20 + i}_0_0_2017010100000000{i}.jpg", _jpeg_bytes((20 * i, 40, 60)))
    out = tmp_path / "out"
    assert len(load_sample(archive_path, extract_to=out).sample) == 10
    for path in sorted(out.glob("*.jpg"))[:4]:
        path.unlink()
    (out / "29_0_0_20170101000000009.jpg").write_bytes(b"cut")
    assert len(load_sample(archive_path, extract_to=out).sample) == 10


def _jpeg_with_broken_exif(array: np.ndarray) -> bytes:
    """A JPEG whose EXIF says orientation 6 (turn 90° clockwise) and holds text in ResolutionUnit
    (tag 296, a number): Pillow's exif_transpose raises struct.error on it."""
    import struct

    entries = struct.pack("<HHI", 274, 3, 1) + struct.pack("<HH", 6, 0)
    entries += struct.pack("<HHII", 296, 2, 6, 8 + 2 + 2 * 12 + 4)
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 2) + entries + struct.pack("<I", 0) + b"Canon\x00"
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95, exif=b"Exif\x00\x00" + tiff)
    return buffer.getvalue()


def test_a_broken_exif_block_still_turns_the_face_upright(tmp_path):
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (220, 20, 20)  # left half red, right half blue
    array[:, 20:] = (20, 20, 220)
    data = _jpeg_with_broken_exif(array)
    with pytest.raises(Exception):  # the Pillow behaviour this guards against
        from PIL import ImageOps
        ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    image = read_image_rgb(data)
    expected = np.rot90(array, k=-1)  # orientation 6: 90° clockwise; red ends on top
    assert image.shape == (40, 20, 3)
    assert np.abs(image.astype(int) - expected).mean() < 8
    folder = tmp_path / "camera"
    folder.mkdir()
    (folder / "20_0_0_20170101000000001.jpg").write_bytes(data)
    (folder / "30_1_0_20170101000000002.jpg").write_bytes(_jpeg_bytes())
    assert len(load_sample(folder).sample) == 2


def test_names_that_are_not_utf8_are_skipped_and_the_rest_is_read(tmp_path):
    import os

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "20_0_0_20170101000000001.jpg").write_bytes(_jpeg_bytes((200, 30, 20)))
    base = os.fsencode(folder)
    os.mkdir(base + b"/\xc8\xcb\xc1\xb3")  # "faces" in GBK: not UTF-8
    with open(base + b"/\xc8\xcb\xc1\xb3/30_1_0_20170101000000002.jpg", "wb") as handle:
        handle.write(_jpeg_bytes((20, 30, 200)))
    with open(base + b"/40_0_1_2017\xff.jpg", "wb") as handle:
        handle.write(_jpeg_bytes((20, 200, 30)))
    result = load_sample(folder)
    assert list(result.sample["file_name"]) == ["20_0_0_20170101000000001.jpg"]
    assert len(result.skipped) == 2
    assert all(reason.startswith("unreadable name: not valid UTF-8") for reason in result.skipped["reason"])
    assert any(path.endswith("/40_0_1_2017\ufffd.jpg") for path in result.skipped["path"])
    result.skipped.to_csv(tmp_path / "skipped.csv")  # the table holds only writable text


def test_links_count_once_and_linked_folders_and_broken_links_are_reported(tmp_path):
    folder = tmp_path / "links"
    (folder / "real").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "50_0_1_20170101000000009.jpg").write_bytes(_jpeg_bytes((90, 90, 90)))
    original = folder / "real" / "10_0_0_20170101000000001.jpg"
    original.write_bytes(_jpeg_bytes((200, 30, 20)))
    (folder / "10_0_0_20170101000000002.jpg").symlink_to(original)  # same labels: a duplicate
    (folder / "12_1_0_20170101000000003.jpg").symlink_to(original)  # other labels: a conflict
    (folder / "20_1_0_20170101000000004.jpg").symlink_to(folder / "gone.jpg")
    (folder / "more").symlink_to(outside, target_is_directory=True)
    (folder / "30_1_1_20170101000000005.jpg").write_bytes(_jpeg_bytes((20, 30, 200)))
    result = load_sample(folder)
    assert list(result.sample["file_name"]) == ["30_1_1_20170101000000005.jpg"]
    assert result.sample["image_id"].is_unique
    reasons = {Path(p).relative_to(folder).as_posix(): r for p, r in result.skipped.values}
    # In path order the first link is the kept copy; the others name it by its path in the sample.
    assert reasons["10_0_0_20170101000000002.jpg"].startswith("conflicting labels: a byte-identical copy is labelled differently")
    assert reasons["12_1_0_20170101000000003.jpg"].startswith("conflicting labels: byte-identical to 10_0_0_20170101000000002.jpg,")
    assert reasons["real/10_0_0_20170101000000001.jpg"].startswith("conflicting labels: byte-identical to 10_0_0_20170101000000002.jpg,")
    assert reasons["20_1_0_20170101000000004.jpg"] == "broken link: the file it points to does not exist"
    assert reasons["more"].startswith("linked folder: not followed")
    assert len(reasons) == 5


def test_nothing_usable_names_the_commonest_kind_of_reason(tmp_path):
    """Ages 121–125 were five different reasons, so two .txt files were named as the cause."""
    folder = tmp_path / "old"
    folder.mkdir()
    for age in range(121, 126):
        (folder / f"{age}_0_0_20170101000000001.jpg").write_bytes(_jpeg_bytes())
    (folder / "notes.txt").write_text("x")
    (folder / "more.txt").write_text("y")
    with pytest.raises(SampleError) as error:
        load_sample(folder)
    text = str(error.value)
    assert ("7 files skipped, 5 of them as label out of range (e.g. 121_0_0_20170101000000001.jpg: "
            "\"label out of range: age 121 not in 0..120\")") in text
    assert "AGE_GENDER_RACE_DATETIME" in text


def test_a_link_to_a_path_that_is_not_utf8_is_skipped(tmp_path):
    import os

    target = os.fsencode(tmp_path) + b"/\xc8\xcb\xc1\xb3"
    os.mkdir(target)
    with open(target + b"/30_1_0_20170101000000002.jpg", "wb") as handle:
        handle.write(_jpeg_bytes((20, 30, 200)))
    folder = tmp_path / "faces"
    folder.mkdir()
    (folder / "20_0_0_20170101000000001.jpg").write_bytes(_jpeg_bytes((200, 30, 20)))
    os.symlink(target + b"/30_1_0_20170101000000002.jpg", os.fsencode(folder) + b"/30_1_0_20170101000000002.jpg")
    result = load_sample(folder)
    assert list(result.sample["file_name"]) == ["20_0_0_20170101000000001.jpg"]
    assert result.skipped["reason"].iloc[0].startswith("unreadable name: the file it links to")


# ------------------------------------------------ files, folders and zip entries that cannot be read


def test_a_file_or_folder_that_cannot_be_read_is_skipped_and_the_rest_is_read(tmp_path, monkeypatch):
    """One file without read permission stopped the whole sample with a bare PermissionError, and
    a folder without it was passed over without a word. (Simulated: the tests may run as root,
    who reads anything.)"""
    import os

    folder = tmp_path / "perm"
    (folder / "locked").mkdir(parents=True)
    (folder / "locked" / "40_1_0_20170101000000003.jpg").write_bytes(_jpeg_bytes((10, 10, 10)))
    good = folder / "20_0_0_20170101000000001.jpg"
    good.write_bytes(_jpeg_bytes((200, 10, 10)))
    denied = folder / "30_1_0_20170101000000002.jpg"
    denied.write_bytes(_jpeg_bytes((10, 200, 10)))
    read_bytes, scandir = Path.read_bytes, os.scandir

    def refuse_file(self):
        if self.name == denied.name:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    def refuse_folder(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    # a link into a folder this user may not enter: Python 3.11's exists() and is_file() raise
    (folder / "50_0_0_20170101000000004.jpg").symlink_to(tmp_path / "elsewhere" / "x.jpg")
    exists = Path.exists

    def refuse_link(self, *args, **kwargs):
        if self.name == "50_0_0_20170101000000004.jpg":
            raise PermissionError(13, "Permission denied", str(self))
        return exists(self, *args, **kwargs)

    (folder / ".Trashes").mkdir()  # hidden and unreadable on Mac-formatted drives: ignored, not reported
    monkeypatch.setattr(Path, "read_bytes", refuse_file)
    monkeypatch.setattr(Path, "exists", refuse_link)
    monkeypatch.setattr(os, "scandir", lambda path=".": (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(path)))
                        if Path(path).name == ".Trashes" else refuse_folder(path))
    result = load_sample(folder)
    assert result.sample["file_name"].tolist() == [good.name]
    reasons = dict(result.skipped.values)
    assert reasons[str(denied)] == "cannot be read: Permission denied"
    assert reasons[str(folder / "locked")].startswith("folder cannot be read: Permission denied; its images are left out")
    assert reasons[str(folder / "50_0_0_20170101000000004.jpg")] == "cannot be read: Permission denied"
    assert len(reasons) == 3


def test_a_link_loop_is_called_a_loop(tmp_path):
    folder = tmp_path / "loop"
    folder.mkdir()
    (folder / "20_0_0_20170101000000001.jpg").write_bytes(_jpeg_bytes())
    (folder / "30_0_0_20170101000000002.jpg").symlink_to(folder / "31_0_0_20170101000000003.jpg")
    (folder / "31_0_0_20170101000000003.jpg").symlink_to(folder / "30_0_0_20170101000000002.jpg")
    reasons = {Path(p).name: r for p, r in load_sample(folder).skipped.values}
    assert reasons == {name: "link loop: the link leads (through other links) back to itself; remove it"
                       for name in ("30_0_0_20170101000000002.jpg", "31_0_0_20170101000000003.jpg")}


def _zip_of_faces(path: Path, n: int, method: int) -> list[str]:
    names = [f"{20 + i}_{i % 2}_0_201701010000000{i:02d}.jpg" for i in range(n)]
    with zipfile.ZipFile(path, "w", method) as archive:
        for i, name in enumerate(names):
            archive.writestr(f"UTKFace/{name}", _jpeg_bytes((10 * i, 100, 50), size=(64, 64)))
    return names


def _entry_data_offset(path: Path, name: str) -> int:
    with zipfile.ZipFile(path) as archive:
        entry = archive.getinfo(name)
    return entry.header_offset + 30 + len(entry.filename.encode()) + len(entry.extra)


@pytest.mark.parametrize("method, damage", [(zipfile.ZIP_DEFLATED, "stream"), (zipfile.ZIP_STORED, "crc"),
                                            (zipfile.ZIP_BZIP2, "stream"), (zipfile.ZIP_STORED, "header")])
def test_a_damaged_zip_entry_is_skipped_and_the_rest_is_read(tmp_path, method, damage):
    """One entry with damaged compressed data raised zlib.error out of load_sample (a traceback in
    the CLI and the app); one with a bad checksum refused the whole zip."""
    path = tmp_path / f"{damage}.zip"
    names = _zip_of_faces(path, 6, method)
    data = bytearray(path.read_bytes())
    start = _entry_data_offset(path, f"UTKFace/{names[2]}")
    if damage == "stream":
        data[start:start + 8] = b"\xff" * 8  # not a valid deflate block
    elif damage == "header":  # the entry's local header signature: a raw BadZipFile escaped (was "corrupt" once)
        header = start - 30 - len(f"UTKFace/{names[2]}")
        data[header:header + 4] = b"XXXX"
    else:
        data[start + 200] ^= 0xFF  # stored bytes changed: the CRC-32 no longer matches
    path.write_bytes(bytes(data))
    for _ in range(2):  # unpacked, then read back from the finished extraction: the same skip
        result = load_sample(path, extract_to=tmp_path / "out")
        assert sorted(result.sample["file_name"]) == sorted(names[:2] + names[3:])
        reasons = dict(result.skipped.values)
        assert list(reasons) == [f"UTKFace/{names[2]}"]
        expected = {(zipfile.ZIP_DEFLATED, "stream"): "damaged in the zip: error: Error -3",
                    (zipfile.ZIP_STORED, "crc"): "damaged in the zip: BadZipFile: Bad CRC-32",
                    (zipfile.ZIP_BZIP2, "stream"): "damaged in the zip: OSError: Invalid data stream",
                    (zipfile.ZIP_STORED, "header"): "damaged in the zip: BadZipFile: Bad magic number"}[method, damage]
        assert reasons[f"UTKFace/{names[2]}"].startswith(expected)
        assert reasons[f"UTKFace/{names[2]}"].endswith("zip the sample again to get this file back")
    assert not (tmp_path / "out" / "UTKFace" / names[2]).exists()  # no half-written file (counted twice before)


def test_a_zip_whose_names_claim_utf8_falsely_gets_a_clear_message(tmp_path):
    path = tmp_path / "names.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("UTKFace/20_0_0_2017.jpg", _jpeg_bytes())
        archive.writestr(zipfile.ZipInfo("UTKFace/Zoë.txt"), b"x")  # stored with the UTF-8 flag
    path.write_bytes(path.read_bytes().replace("Zoë".encode(), b"Zo\xff\xfe"))  # the same length
    with pytest.raises(SampleError, match="names.zip lists a file name marked as UTF-8 that is not UTF-8.*unzip it yourself"):
        load_sample(path, extract_to=tmp_path / "out")


def test_an_unusable_cache_folder_is_named_with_what_to_do(tmp_path, monkeypatch):
    path = tmp_path / "faces.zip"
    _zip_of_faces(path, 2, zipfile.ZIP_STORED)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("FACECHECK_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(SampleError, match=r"cannot unpack faces.zip into .*a_file/cache/samples: Not a directory — that is "
                                          r"the cache folder \(FACECHECK_CACHE_DIR sets it\)"):
        load_sample(path)


@pytest.mark.parametrize("mode, colour, transparent", [
    ("RGB", (10, 20, 30), (10, 20, 30)), ("L", 18, 18), ("I;16", 4626, 4626), ("1", 0, 0),
])
def test_a_png_with_one_transparent_colour_is_put_on_white(tmp_path, mode, colour, transparent):
    """RGBA, LA and palette transparency were composited onto white, but not a PNG whose one
    transparent colour is given by its tRNS chunk (RGB, grey, 16-bit grey)."""
    image = Image.new(mode, (6, 4), colour)
    image.putpixel((5, 3), {"RGB": (200, 100, 0), "I;16": 3000, "L": 100, "1": 1}[mode])
    path = tmp_path / "t.png"
    image.save(path, transparency=transparent)
    assert "transparency" in Image.open(path).info
    pixels = read_image_rgb(path)
    assert (pixels[:3] == 255).all() and (pixels[3, :5] == 255).all()  # the transparent colour: white
    opaque = {"RGB": [200, 100, 0], "L": [100] * 3, "I;16": [round(3000 / 257)] * 3, "1": [255] * 3}[mode]
    assert pixels[3, 5].tolist() == opaque  # every other colour as it was
