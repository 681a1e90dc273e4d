"""Read a labelled UTKFace-style sample from a folder or a zip.

UTKFace file names carry the labels: ``AGE_GENDER_RACE_DATETIME.jpg[.chip.jpg]`` with gender
0 male / 1 female and race 0–4 (White, Black, Asian, Indian, Others). This module is the one
place that knows that convention; everything else works on the Sample table it returns:

    image_id  sha1 of the file bytes (content hash, unique after duplicate removal)
    path      absolute path of the image on disk
    file_name base name
    age       int, years
    gender    int, 0 male / 1 female
    ethnicity int, 0..4
    age_band  ordered Categorical (see constants.age_band_labels)

Files that cannot be used go to a *skipped* table with a reason; nothing is fatal except a
source that does not exist, is not a folder or zip, or holds no usable image at all.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import tempfile
import time
import unicodedata
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from analysis.constants import (
    AGE_BAND_EDGES,
    AGE_MAX,
    AGE_MIN,
    ETHNICITIES,
    GENDERS,
    IMAGE_EXTENSIONS,
    MAX_IMAGE_FILE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_ZIP_FILES,
    MAX_ZIP_UNCOMPRESSED_BYTES,
    assign_age_bands,
    check_age_band_edges,
)

SAMPLE_COLUMNS = ["image_id", "path", "file_name", "age", "gender", "ethnicity", "age_band"]

# AGE_GENDER_RACE_DATETIME then an image extension, optionally followed by ".chip.<ext>".
_EXT = r"(?:jpe?g|png|bmp|webp)"
_NAME_RE = re.compile(rf"^(\d+)_(\d+)_(\d+)(?:_(\d+))?\.{_EXT}(?:\.chip\.{_EXT})?$", re.IGNORECASE)
_LOOSE_RE = re.compile(r"^(\d+)_(\d+)_(\d+)", re.IGNORECASE)


def photo_key(file_name: str) -> str:
    """The photo a file name stands for: the name without its extensions, so UTKFace's aligned
    crop (``25_0_1_20170116174525125.jpg.chip.jpg``) and in-the-wild image (``….jpg``) of one
    photo, or a copy in another folder, share it."""
    return str(file_name).split(".", 1)[0].lower()


def find_training_file(model_path, kind: str) -> Path | None:
    """A file `python -m training` writes next to a model, e.g. kind "history" or "split":
    `age_gender_A.keras` → `history_A.csv`; also `<stem>_<kind>.csv` / `<stem>.<kind>.csv`.
    None when there is none."""
    model_path = Path(model_path)
    stem, folder = model_path.stem, model_path.parent
    candidates = [folder / f"{stem}_{kind}.csv", folder / f"{stem}.{kind}.csv"]
    if "_" in stem:
        candidates.append(folder / f"{kind}_{stem.rsplit('_', 1)[-1]}.csv")
    return next((c for c in candidates if c.is_file()), None)


class SampleError(ValueError):
    """The sample source as a whole cannot be used (missing, not a zip, nothing usable)."""


@dataclass
class SampleResult:
    """A readable sample plus everything that was left out of it, and why."""

    sample: pd.DataFrame
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "reason"]))
    duplicates: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["path", "duplicate_of", "same_labels"])
    )
    source: str = ""
    # For a zip: the folder it was extracted to. Paths of skipped files under it are reported as
    # their path inside the zip (see reported_path), not as a cache location the user never chose.
    extracted_to: str = ""
    age_band_edges: tuple[int, ...] = AGE_BAND_EDGES  # left edges of the bands in sample["age_band"]
    # sample["path"] (resolved) -> the path as found under the source, for reported_path
    found: dict[str, str] = field(default_factory=dict, repr=False)

    def reported_path(self, path) -> str:
        """`path` as the user knows it: relative to the zip for a file extracted from one; a
        sample image's path as found under the folder given (not resolved: not a link's target);
        unchanged otherwise."""
        path = self.found.get(str(path), path)
        if self.extracted_to and Path(path).is_absolute():
            try:
                return Path(path).resolve().relative_to(self.extracted_to).as_posix()
            except ValueError:
                pass
        return str(path)

    def path_in_sample(self, reported: str) -> str:
        """A reported path (see reported_path) relative to the sample folder, for display: the
        same name can be in two sub-folders (a zip's are relative already)."""
        try:
            return Path(reported).relative_to(self.source).as_posix()
        except ValueError:
            return str(reported)

    @property
    def fingerprint(self) -> str:
        """Hash of the images and labels: equal fingerprints mean the same evaluation sample."""
        return sample_fingerprint(self.sample)

    def skipped_counts(self) -> dict[str, int]:
        return reason_counts(self.skipped)


def reason_counts(skipped: pd.DataFrame) -> dict[str, int]:
    """Number of skipped files per reason category (text before the first colon) of a `skipped` table."""
    if skipped.empty:
        return {}
    return _reason_categories(skipped["reason"]).value_counts().to_dict()


def _reason_categories(reasons: pd.Series) -> pd.Series:
    """Each skip reason's category: its text before the first colon ("malformed name", ...)."""
    return reasons.str.split(":").str[0]


def sample_fingerprint(sample: pd.DataFrame) -> str:
    rows = sample.sort_values("image_id")[["image_id", "age", "gender", "ethnicity"]]
    digest = hashlib.sha1()
    for row in rows.itertuples(index=False):
        digest.update(f"{row.image_id}:{row.age}:{row.gender}:{row.ethnicity};".encode())
    return digest.hexdigest()


def parse_utkface_name(name: str) -> tuple[int, int, int]:
    """Labels (age years, gender 0/1, ethnicity 0..4) from a UTKFace file name.

    Raises ValueError saying what is wrong with the name.
    """
    base = os.path.basename(name)
    match = _NAME_RE.match(base)
    if match is None:
        if " " in base:
            raise ValueError("malformed name: contains a space")
        loose = _LOOSE_RE.match(base)
        if loose is None:
            parts = base.split("_")
            if len(parts) >= 3 and parts[0].isdigit() and parts[1].isdigit() and len(parts[2]) > 4:
                raise ValueError("malformed name: ethnicity missing (AGE_GENDER_DATETIME)")
            raise ValueError("malformed name: expected AGE_GENDER_RACE_DATETIME.jpg")
        if len(loose.group(3)) > 4:
            raise ValueError("malformed name: ethnicity missing (AGE_GENDER_DATETIME)")
        raise ValueError("malformed name: unexpected extension or punctuation after the labels")
    age, gender, ethnicity = (int(match.group(i)) for i in (1, 2, 3))
    if len(match.group(3)) > 4:
        # A long third field is a timestamp: the race field is missing.
        raise ValueError("malformed name: ethnicity missing (AGE_GENDER_DATETIME)")
    if not AGE_MIN <= age <= AGE_MAX:
        raise ValueError(f"label out of range: age {age} not in {AGE_MIN}..{AGE_MAX}")
    if gender >= len(GENDERS):
        raise ValueError(f"label out of range: gender {gender} (0 male, 1 female)")
    if ethnicity >= len(ETHNICITIES):
        raise ValueError(f"label out of range: ethnicity {ethnicity} (0..{len(ETHNICITIES) - 1})")
    return age, gender, ethnicity


def read_image_rgb(source) -> np.ndarray:
    """Decode an image file (path or bytes) to uint8 RGB, shape (H, W, 3).

    Grayscale, palette, CMYK, 16-bit and alpha images are converted; EXIF rotation is applied.
    Raises ValueError with the reason when the file cannot be decoded or is implausibly large.
    """
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with Image.open(handle) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(_too_many_pixels(image))
            return _to_rgb_array(_upright(image))
    except (ValueError, MemoryError):  # out of memory is the machine's state, not the file's: not a reason
        raise
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:  # the file, not its content
        raise ValueError(f"{UNREADABLE_FILE}: {exc.strerror or exc}") from exc
    except Exception as exc:  # Pillow raises many types for damaged files (struct.error, IndexError, ...)
        raise ValueError(_decode_problem(exc)) from exc


# Pillow's warnings about a file are not printed: "Corrupt EXIF data ..." names no file (the file
# decodes, or its skip reason says why not), and a decompression-bomb warning (from 89 MP) only
# precedes our own, lower limit (MAX_IMAGE_PIXELS), which refuses the image with a reason. Set
# once here rather than per call: warnings.catch_warnings is not thread-safe, and images are
# decoded in threads.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says. ImageOps.exif_transpose also rewrites the
    EXIF block, and fails on one with a mistyped tag (a camera's text where a number belongs:
    struct.error); the orientation is then applied here from the tag alone, or not at all when
    even that cannot be read."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        try:
            method = _ORIENTATION_TRANSPOSE.get(image.getexif().get(0x0112))
        except Exception:
            return image
        return image.transpose(method) if method is not None else image


# Skip reason of a file that could not be opened (gone, not permitted): a state of the disk, not of
# the image's content, so it is not remembered with the content's predictions (analysis.predict).
UNREADABLE_FILE = "cannot be read"
_TOO_LARGE = f"image too large: over {MAX_IMAGE_PIXELS:,} pixels; resize it first"


def _too_many_pixels(image: Image.Image) -> str:
    return f"image too large: {image.width}x{image.height} pixels (limit {MAX_IMAGE_PIXELS:,}); resize it first"


def _decode_problem(exc: Exception) -> str:
    """A skip reason for an image Pillow cannot (or must not) decode, the same on every run."""
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return _TOO_LARGE  # Pillow's own, higher limit: the same reason as ours
    if isinstance(exc, UnidentifiedImageError):
        return "not decodable: not an image format Pillow reads (or the file is damaged)"
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc))  # no memory addresses in reasons
    return f"not decodable: {type(exc).__name__}: {text}" if text else f"not decodable: {type(exc).__name__}"


# The version of what read_image_rgb makes of a file's bytes: part of every cache key of decoded
# pixels or of predictions on them, so a change in decoding is never served stale from a cache.
# 2: a PNG's single transparent colour (tRNS) composited onto white, as alpha already was.
DECODE_VERSION = 2


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    transparency = image.info.get("transparency")  # a PNG's one transparent colour (tRNS), or a palette's
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale (a 16-bit PNG opens as I;16 or I): 0–65535 → 0–255, as 8 bits = 16 bits / 257.
        # Not by the image's own range: stretching would change its brightness (PIL's convert clips).
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        if isinstance(transparency, int):
            gray[values == transparency] = 255  # transparent: white, as below
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("P", "RGB", "L", "1") and transparency is not None):
        # Composite onto white so transparent borders do not become black blocks.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 RGB (H, W, 3) to `size` = (height, width) with antialiased bilinear filtering.

    Training and evaluation both call this, so models see the same pixels in both.
    """
    height, width = int(size[0]), int(size[1])
    if image.shape[0] == height and image.shape[1] == width:
        return image
    resized = Image.fromarray(image).resize((width, height), Image.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def load_image(path, size: tuple[int, int]) -> np.ndarray:
    """Decode and resize one image: uint8 RGB (height, width, 3)."""
    return resize_image(read_image_rgb(path), size)


def _check_image_header(data: bytes) -> str | None:
    """Cheap structural check (no full decode). Returns a reason or None when it looks usable."""
    if not data:
        return "not decodable: empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                return _too_many_pixels(image)
            image.verify()
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises many exception types for junk input
        return _decode_problem(exc)
    return None


def _is_ignored(relative: str) -> bool:
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def load_sample(
    source,
    *,
    age_band_edges: tuple[int, ...] = AGE_BAND_EDGES,
    extract_to=None,
    keep_duplicates: bool = False,
) -> SampleResult:
    """Read a labelled sample from a folder (searched recursively) or a ``.zip``.

    A zip is extracted safely into `extract_to` (default: a per-archive folder in the cache
    directory, reused on the next call). Byte-identical files are reported in ``duplicates``;
    unless `keep_duplicates`, only the first copy (by path order) is kept and the others are
    listed as skipped — and when the copies carry different labels, none is kept (for evaluation as
    for training: which label is right cannot be told).
    """
    try:
        age_band_edges = check_age_band_edges(age_band_edges)
    except ValueError as exc:
        raise SampleError(str(exc)) from None
    source_path = Path(source).expanduser()
    if not _is_utf8(str(source_path)):
        raise SampleError(f"the path {_printable(str(source_path))} is not valid UTF-8 text (a folder named in another "
                          "language's code page?); rename the folder")
    if not source_path.exists():
        raise SampleError(f"sample not found: {source_path} — give a folder of images or a .zip")
    if source_path.is_file():
        if not zipfile.is_zipfile(source_path):
            raise SampleError(_not_a_zip(source_path))
        if extract_to is None:
            extract_to = default_cache_dir() / "samples" / file_digest(source_path, "sha1")
        root, skipped = extract_zip_safely(source_path, extract_to)
    elif source_path.is_dir():
        root, skipped = source_path, []
    else:
        raise SampleError(f"{source_path} is neither a folder nor a zip file")

    rows = []
    paths, unreadable = _walk(root)
    skipped.extend(unreadable)
    for path in paths:
        relative = path.relative_to(root).as_posix()
        if _is_ignored(relative):
            continue
        try:
            row = _read_entry(path, relative)
        except OSError as exc:  # no permission (also on a link into a folder this user may not enter:
            row = (str(path), f"{UNREADABLE_FILE}: {exc.strerror or exc}")  # is_file() raises), a disk error
        if row is not None:
            (skipped if len(row) == 2 else rows).append(row)

    sample = pd.DataFrame(rows, columns=[*SAMPLE_COLUMNS[:-1], "_found", "_relative"])
    sample, duplicates, duplicate_skips = _split_duplicates(sample, keep_duplicates)
    found = dict(zip(sample["path"], sample["_found"]))
    sample = sample.drop(columns=["_found", "_relative"])
    skipped.extend(duplicate_skips)
    if sample.empty:
        raise SampleError(_nothing_usable(source_path, skipped))
    sample["age_band"] = assign_age_bands(sample["age"], age_band_edges)
    for column in ("age", "gender", "ethnicity"):
        sample[column] = sample[column].astype(int)
    result = SampleResult(
        sample=sample.reset_index(drop=True),
        duplicates=duplicates,
        source=str(source_path),
        extracted_to=str(root.resolve()) if root != source_path else "",
        age_band_edges=tuple(age_band_edges),
        found=found,
    )
    result.skipped = pd.DataFrame([(result.reported_path(path), reason) for path, reason in skipped],
                                  columns=["path", "reason"])
    return result


def _read_entry(path: Path, relative: str):
    """One path found under a sample folder: None (not a file to consider: a folder, a socket),
    a (path, reason) skip, or the sample row (image_id, resolved path, file name, age, gender,
    ethnicity, path as found, relative path). Raises OSError when the file system refuses."""
    if path.is_dir():
        if path.is_symlink():
            return (_printable(str(path)), "linked folder: not followed (a link can lead outside the sample or "
                                           "into a loop); give that folder itself, or copy its images in")
        return None
    if not _is_utf8(relative):  # pandas (and every table and CSV after it) cannot hold the name
        return (_printable(str(path)), "unreadable name: not valid UTF-8 (a name from another language's "
                                       "code page, e.g. a zip unpacked on another system); rename it")
    if path.is_symlink() and not path.exists():
        return (str(path), _broken_link(path))
    if not path.is_file():  # a socket, a device, ...
        return None
    if not path.name.lower().endswith(IMAGE_EXTENSIONS):
        return (str(path), _unsupported_extension(path.name))
    try:
        age, gender, ethnicity = parse_utkface_name(path.name)
    except ValueError as exc:
        return (str(path), str(exc))
    size = path.stat().st_size
    if size > MAX_IMAGE_FILE_BYTES:  # checked before reading: the file is read whole below
        return (str(path), _file_too_large(size))
    data = path.read_bytes()
    problem = _check_image_header(data)
    if problem:
        return (str(path), problem)
    image_id = hashlib.sha1(data).hexdigest()
    resolved = str(path.resolve())
    if not _is_utf8(resolved):  # a link to a file whose own path is not UTF-8
        return (str(path), "unreadable name: the file it links to has a path that is not valid UTF-8; "
                           "rename it or copy it in")
    return (image_id, resolved, path.name, age, gender, ethnicity, str(path), relative)


def _walk(root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every path under `root` (folders too, sorted; linked folders are listed, not entered: they
    are reported by the caller), and the folders that cannot be read, as skips with a reason
    (Path.rglob passes over them without a word)."""
    paths: list[Path] = []
    unreadable: list[tuple[str, str]] = []

    def failed(exc: OSError) -> None:
        unreadable.append((str(exc.filename or root), f"folder cannot be read: {exc.strerror or exc}; its images are "
                                                      "left out (check its permissions)"))

    for folder, folders, files in os.walk(root, onerror=failed):
        folders[:] = [f for f in folders if not _is_ignored(f)]  # not entered: .Trashes, __MACOSX, ...
        here = Path(folder)
        paths.extend(here / name for name in (*folders, *files))
    return sorted(paths), unreadable


def _broken_link(path: Path) -> str:
    """Why a link that leads to no file leads nowhere."""
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "link loop: the link leads (through other links) back to itself; remove it"
    return "broken link: the file it points to does not exist"


def _split_duplicates(sample: pd.DataFrame, keep_duplicates: bool):
    """Byte-identical files (copies, or links to one file: rows after the first with the same
    image_id). Skips name each file as it was found (`_found`) and the kept copy by its path in
    the sample (`_relative`), so two copies with the same name in two folders can be told apart."""
    is_copy = sample.duplicated("image_id", keep="first")
    first = sample[~is_copy].set_index("image_id")
    copies = sample[is_copy]
    originals = first.loc[copies["image_id"]]
    labels = ["age", "gender", "ethnicity"]
    same = (copies[labels].values == originals[labels].values).all(axis=1)
    duplicates = pd.DataFrame(
        {"path": copies["_found"].values, "duplicate_of": originals["_found"].values, "same_labels": same}
    )
    skips = []
    if not keep_duplicates:
        # Copies with other labels: which label is right cannot be told, so no copy is used.
        conflicting = set(copies["image_id"][~same])
        for path, original, image_id in zip(copies["_found"], originals["_relative"], copies["image_id"]):
            if image_id in conflicting:
                skips.append((path, f"conflicting labels: byte-identical to {original}, and the "
                                    "copies are not all labelled the same; no copy is used"))
            else:
                skips.append((path, f"duplicate: byte-identical to {original} (same labels)"))
        first_of_conflict = ~is_copy & sample["image_id"].isin(conflicting)
        for path in sample.loc[first_of_conflict, "_found"]:
            skips.append((path, "conflicting labels: a byte-identical copy is labelled differently; no copy is used"))
        sample = sample[~is_copy & ~first_of_conflict]
    return sample, duplicates, skips


def _is_utf8(text: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    """`text` with its undecodable bytes shown as U+FFFD, so it can go into tables and messages."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _unsupported_extension(name: str) -> str:
    suffix = Path(name).suffix.lower()
    what = f"unsupported extension {suffix}" if suffix else "no extension"
    return f"not an image file: {what} (images must be {', '.join(IMAGE_EXTENSIONS)})"


def _not_a_zip(path: Path) -> str:
    """Why a file given as the sample cannot be opened as a zip, and what to do."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        return f"{path.name} cannot be read: {exc.strerror or exc}"
    if head == b"PK\x03\x04":  # a zip's first entry, but no directory at the end: cut short
        return (f"{path.name} is a damaged or incomplete zip (its end, where a zip lists its files, is missing — "
                "an interrupted download or copy?); download or zip it again")
    return f"{path.name} is not a zip archive — give a folder of images or a .zip file"


# Skip categories that mean the file names, not the files, are the problem.
_NAMING_REASONS = ("malformed name", "label out of range")


def _nothing_usable(source_path: Path, skipped: list[tuple[str, str]]) -> str:
    """The message for a sample without one usable image: the most common reason, and the naming
    rule only when names are what is wrong (or nothing was found at all)."""
    naming = "Images must be named AGE_GENDER_RACE_DATETIME.jpg as in UTKFace."
    if not skipped:
        return f"no usable labelled images in {source_path}: no image files found. {naming}"
    reasons = pd.Series([reason for _, reason in skipped])
    categories = _reason_categories(reasons)
    counts = categories.value_counts()
    common, count = counts.index[0], int(counts.iloc[0])
    first = int(np.flatnonzero((categories == common).to_numpy())[0])
    name, example = Path(skipped[first][0]).name, reasons.iloc[first]
    text = (f"no usable labelled images in {source_path}: {len(skipped)} file{'s' if len(skipped) != 1 else ''} "
            f"skipped, {count} of them as {common} (e.g. {name}: \"{example}\")")
    if common in _NAMING_REASONS:
        text += f". {naming}"
    return text


def extract_zip_safely(
    zip_path,
    target_dir,
    *,
    max_files: int = MAX_ZIP_FILES,
    max_bytes: int = MAX_ZIP_UNCOMPRESSED_BYTES,
) -> tuple[Path, list[tuple[str, str]]]:
    """Extract the image entries of a zip into `target_dir`; returns (target_dir, skipped entries).

    Never writes outside `target_dir`: absolute paths, ``..`` components, drive letters and
    symlinks are refused per entry. The number of entries and the total *actual* decompressed
    size are bounded (a lying header cannot get past the byte count). Raises SampleError for a
    corrupt archive or one over the bounds.
    """
    target = Path(target_dir).resolve()
    done_marker = target / _DONE_MARKER
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SampleError(f"{Path(zip_path).name} is not a readable zip archive: {exc}") from exc
    except UnicodeDecodeError:  # zipfile decodes every name when it opens the archive
        raise SampleError(f"{Path(zip_path).name} lists a file name marked as UTF-8 that is not UTF-8 (made by a tool "
                          "that mislabels names?); unzip it yourself and give the folder, or zip it again") from None
    with archive:
        entries = [e for e in archive.infolist() if not e.is_dir() and not e.filename.endswith("\\")]
        if len(entries) > max_files:
            raise SampleError(f"zip has {len(entries):,} files; the limit is {max_files:,}")
        declared = sum(e.file_size for e in entries)
        if declared > max_bytes:
            raise SampleError(
                f"zip would unpack to {declared / 2**30:.1f} GB; the limit is {max_bytes / 2**30:g} GB"
            )
        planned, skipped = _plan_zip(entries)
        done = _read_marker(done_marker)
        if done is not None and _is_complete(target, planned, done):
            return target, skipped + done
        # Unpacked into a folder of this process's own, then moved into place whole with its
        # marker: another process reading the same zip at the same time (the CLI beside the app)
        # never sees, or marks as finished, a half-written folder.
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _prune_leftovers(target)
            partial = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
        except OSError as exc:
            raise SampleError(f"cannot unpack {Path(zip_path).name} into {target.parent}: {exc.strerror or exc} — that is "
                              "the cache folder (FACECHECK_CACHE_DIR sets it); choose one you can write to, or unzip "
                              "the sample yourself and give the folder") from None
        written, unpack_skips = 0, []
        try:
            for entry, relative in planned:
                destination = partial / relative
                try:
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    written += _copy_bounded(archive, entry, destination, max_bytes - written)
                except _DamagedEntry as exc:  # a bad checksum or compressed data: that entry only
                    destination.unlink(missing_ok=True)
                    unpack_skips.append((entry.filename, f"damaged in the zip: {exc} — the rest "
                                                         "is read; zip the sample again to get this file back"))
                except OSError as exc:  # e.g. a name this file system cannot hold: that entry only
                    with contextlib.suppress(OSError):
                        destination.unlink(missing_ok=True)
                    unpack_skips.append((entry.filename, f"cannot be unpacked here: {exc.strerror or exc}"))
            (partial / done_marker.name).write_text(json.dumps({"version": EXTRACTION_VERSION, "unpack_skips": unpack_skips}))
        except Exception:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        _move_into_place(partial, target, planned)
    return target, skipped + unpack_skips


# What reading one damaged entry raises: zipfile's bad CRC or header, the decompressors' own errors.
_DAMAGED_ENTRY = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError)

# Written into an extraction once every file is in it (with the entries that could not be unpacked).
_DONE_MARKER = ".facecheck-extracted"


def _is_complete(target: Path, planned, done: list[tuple[str, str]]) -> bool:
    """Every planned entry that was not skipped while unpacking is in `target` at its full size
    (a finished extraction whose files were since deleted or cut short is unpacked again)."""
    not_unpacked = {name for name, _ in done}
    for entry, relative in planned:
        if entry.filename in not_unpacked:
            continue
        try:
            if (target / relative).stat().st_size != entry.file_size:
                return False
        except OSError:
            return False
    return True


def _move_into_place(partial: Path, target: Path, planned) -> None:
    """Rename the finished `partial` folder to `target`. When `target` exists, it is kept if it is
    a complete extraction (another process finished first), else moved aside and deleted."""
    for _ in range(3):
        try:
            partial.rename(target)  # atomic; fails when target exists and is not empty
            return
        except OSError:
            pass
        done = _read_marker(target / _DONE_MARKER)
        if done is not None and _is_complete(target, planned, done):
            shutil.rmtree(partial, ignore_errors=True)
            return
        aside = target.with_name(f"{target.name}.stale-{os.getpid()}-{time.time_ns()}")
        try:
            target.rename(aside)
        except OSError:
            continue  # another process moved it first: try again
        shutil.rmtree(aside, ignore_errors=True)
    raise SampleError(f"could not put the unpacked zip in place at {target}; close other programs using it and try again")


# Unpacking folders of other processes older than this are leftovers of a crash or a kill.
_LEFTOVER_SECONDS = 6 * 3600


def _prune_leftovers(target: Path) -> None:
    name = glob.escape(target.name)
    for pattern in (f"{name}.partial-*", f"{name}.stale-*", f"{name}.partial"):
        for folder in target.parent.glob(pattern):
            try:
                if time.time() - folder.stat().st_mtime > _LEFTOVER_SECONDS or folder.name.endswith(".partial"):
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:
                pass


def _read_marker(marker: Path) -> list[tuple[str, str]] | None:
    """The entries that could not be unpacked by a finished extraction made under the current
    rules, or None when there is none (no marker, an old or damaged one: extract again)."""
    try:
        done = json.loads(marker.read_text())
        if done["version"] == EXTRACTION_VERSION:
            return [(str(name), str(reason)) for name, reason in done["unpack_skips"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


# Written into the extraction's marker file; an extraction made under other rules (an older
# version of _plan_zip) is unpacked again.
EXTRACTION_VERSION = "2"


def _name_key(relative: str) -> str:
    """Paths that name the same file on a case-insensitive file system (macOS, Windows) share a key."""
    return unicodedata.normalize("NFC", relative).casefold()


def _plan_zip(entries) -> tuple[list[tuple[zipfile.ZipInfo, str]], list[tuple[str, str]]]:
    """([(entry, relative path to extract it to)], [(entry name, reason it is skipped)]).

    Decided from the archive's directory alone, so a re-used extraction reports the same skips.
    Hidden files and __MACOSX/ are ignored without a word, as in a folder; every other entry that
    is not extracted gets a reason (unsafe path, nested zip, not an image, encrypted, too large,
    a name another entry already has, a file where another entry needs a folder). Names are
    compared as a case-insensitive file system would (A.jpg and a.jpg clash)."""
    planned, skipped, seen = [], [], set()
    for entry in entries:
        relative = _safe_member_path(entry)
        if relative is None:
            skipped.append((entry.filename, "unsafe zip entry: an absolute path, a '..' that leaves the folder, or a link; "
                                            "not unpacked (zip the folder itself, so its entries have relative paths)"))
        elif _is_ignored(relative):
            continue
        elif relative.lower().endswith(".zip"):
            skipped.append((entry.filename, "a zip inside the zip: not opened; unzip it and give the folder or its own zip"))
        elif not relative.lower().endswith(IMAGE_EXTENSIONS):
            skipped.append((entry.filename, _unsupported_extension(relative)))
        elif entry.flag_bits & 0x1:
            skipped.append((entry.filename, "not decodable: encrypted zip entry (password-protected); zip it again without a password"))
        elif entry.compress_type not in _ZIP_METHODS:
            skipped.append((entry.filename, f"not decodable: zip compression method {entry.compress_type} "
                                            f"({_ZIP_METHOD_NAMES.get(entry.compress_type, 'unknown')}) is not supported; "
                                            "zip it again with the standard Deflate method"))
        elif entry.file_size > MAX_IMAGE_FILE_BYTES:
            skipped.append((entry.filename, _file_too_large(entry.file_size)))
        elif _name_key(relative) in seen:
            skipped.append((entry.filename, "duplicate zip entry: an earlier entry has the same path (kept that one)"))
        else:
            seen.add(_name_key(relative))
            planned.append((entry, relative))
    folders = set()  # every folder the planned files need
    for _, relative in planned:
        parts = relative.split("/")
        folders.update(_name_key("/".join(parts[:i])) for i in range(1, len(parts)))
    for entry, relative in planned:
        if _name_key(relative) in folders:
            skipped.append((entry.filename, "zip entry clashes with a folder of the same name in the zip (kept the folder)"))
    return [(entry, relative) for entry, relative in planned if _name_key(relative) not in folders], skipped


# Compression methods Python's zipfile unpacks (stored, Deflate, bzip2, LZMA); Windows' and
# 7-Zip's Deflate64 (9), and others, it does not.
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_ZIP_METHOD_NAMES = {9: "Deflate64", 10: "PKWARE imploding", 93: "Zstandard", 95: "XZ", 96: "JPEG", 97: "WavPack", 98: "PPMd", 99: "AES-encrypted"}


def _file_too_large(size: int) -> str:
    return (f"file too large for a face image: {size / 2**20:,.0f} MB (limit {MAX_IMAGE_FILE_BYTES // 2**20} MB); "
            "resize it first")


def _safe_member_path(entry: zipfile.ZipInfo) -> str | None:
    """The entry's relative POSIX path if it stays inside the target folder, else None."""
    mode = entry.external_attr >> 16
    if stat.S_ISLNK(mode):
        return None
    name = entry.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return None
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


class _DamagedEntry(Exception):
    """A zip entry's data cannot be read back (bad checksum, damaged compressed stream)."""


def _copy_bounded(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, destination: Path, budget: int) -> int:
    """Unpack one entry, at most `budget` bytes; a failure to read the entry (as opposed to
    writing it) raises _DamagedEntry."""
    copied = 0
    try:
        source = archive.open(entry)  # a damaged local header: BadZipFile here already
    except _DAMAGED_ENTRY as exc:
        raise _DamagedEntry(f"{type(exc).__name__}: {exc}") from exc
    with source, open(destination, "wb") as sink:
        while True:
            try:
                chunk = source.read(1 << 20)
            except (*_DAMAGED_ENTRY, OSError) as exc:  # bz2 says OSError("Invalid data stream")
                raise _DamagedEntry(f"{type(exc).__name__}: {exc}") from exc
            if not chunk:
                break
            copied += len(chunk)
            if copied > budget:
                raise SampleError(
                    "zip unpacks to more than the allowed size (possible zip bomb); "
                    "unzip it yourself and give the folder instead"
                )
            sink.write(chunk)
    return copied


def file_digest(path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks (model files can be hundreds of MB)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def default_cache_dir() -> Path:
    """Where extracted samples and prediction caches live (``$FACECHECK_CACHE_DIR`` overrides)."""
    configured = os.environ.get("FACECHECK_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "facecheck"
