"""Uploaded files: checked, then saved in a folder that belongs to one browser session.

Two people using the app at the same time never see each other's files: every upload is saved to
``<cache dir>/uploads/<session id>/<kind>/<sha256[:16]>/<file name>``, where the session id is a
random token kept in that session's ``st.session_state``. Nothing is ever written to a shared,
fixed path. Folders of sessions idle for a day are removed when a new session starts.

The checks here are cheap and happen before TensorFlow or the zip extractor sees the file, so a
wrong file type gets a plain message instead of a stack trace. Deeper problems (a zip bomb, a
model whose outputs cannot be mapped) are caught later by ``analysis``. No streamlit import.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from analysis.compat import zipped_model_hint
from analysis.dataset import default_cache_dir

MODEL_SUFFIXES: tuple[str, ...] = (".keras", ".h5", ".hdf5")
SAMPLE_SUFFIXES: tuple[str, ...] = (".zip",)
# Per-file limits in MB (Streamlit's own limit, server.maxUploadSize, is the upper bound). Whole
# GB on purpose: Streamlit's drop zone prints the limit in decimal units rounded to one figure, so
# 512 MB read "1GB per file" under a label saying 512 MB. 1 GB also takes a VGG16 kept with its
# ImageNet top (~530 MB).
MAX_MODEL_UPLOAD_MB = 1024
MAX_SAMPLE_UPLOAD_MB = 1024
STALE_UPLOAD_HOURS = 24

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")  # a file entry, or an empty archive
_SESSION_ID = re.compile(r"^[0-9a-f]{32}$")


class UploadError(ValueError):
    """An uploaded file that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class SavedUpload:
    path: Path  # where the file now lives, inside the session's folder
    sha256: str  # content hash, hex
    size: int  # bytes


def uploads_root() -> Path:
    return default_cache_dir() / "uploads"


def session_upload_dir(session_id: str) -> Path:
    """The folder that holds one session's uploads. `session_id` is a 32-hex-digit token."""
    if not _SESSION_ID.match(session_id or ""):
        raise ValueError(f"session id must be 32 hex digits, got {session_id!r}")
    return uploads_root() / session_id


def safe_file_name(name: str) -> str:
    """The base name of `name` with anything but letters, digits, '.', '-', '_' replaced by '_'."""
    base = re.split(r"[\\/]", name or "")[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return cleaned[:120] or "upload"


def check_model_upload(name: str, head: bytes, size: int) -> None:
    """Refuse what cannot be a Keras model: wrong extension, too large, or wrong file signature.

    `head` is the first bytes of the file (16 are enough), `size` its length in bytes.
    """
    suffix = Path(name).suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise UploadError(
            f"{name} is not a model file: expected .keras or .h5 (got {suffix or 'no extension'}). "
            "Save the model with model.save('name.keras') and upload that file."
        )
    _check_size(name, size, MAX_MODEL_UPLOAD_MB)
    if suffix == ".keras" and not head.startswith(_ZIP_SIGNATURES):
        raise UploadError(
            f"{name} is not a Keras model: a .keras file is a zip archive and this one is not. "
            "Was it renamed from another format?"
        )
    if suffix in (".h5", ".hdf5") and not head.startswith(_HDF5_SIGNATURE):
        raise UploadError(f"{name} is not a Keras model: it is not an HDF5 file.")


def check_sample_upload(name: str, head: bytes, size: int) -> None:
    """Refuse what cannot be a zipped sample: wrong extension, too large, or not a zip."""
    suffix = Path(name).suffix.lower()
    if suffix not in SAMPLE_SUFFIXES:
        raise UploadError(
            f"{name} is not a .zip file. Upload a .zip of UTKFace-style images, "
            "or type the path of a local folder instead."
        )
    _check_size(name, size, MAX_SAMPLE_UPLOAD_MB)
    if not head.startswith(_ZIP_SIGNATURES):
        raise UploadError(f"{name} is not a zip archive (the file does not start like one). Re-create the zip.")


def _check_size(name: str, size: int, limit_mb: int) -> None:
    if size <= 0:
        raise UploadError(f"{name} is empty (0 bytes).")
    if size > limit_mb * 1024**2:
        raise UploadError(f"{name} is {size / 1024**2:,.0f} MB; the limit is {size_text(limit_mb)}.")


def size_text(mb: int) -> str:
    """An upload limit as people write it: "1 GB" for 1024 MB, "300 MB" otherwise."""
    return f"{mb // 1024} GB" if mb % 1024 == 0 else f"{mb:,} MB"


def save_upload(session_id: str, kind: str, name: str, data) -> SavedUpload:
    """Check an upload and save it into the session's folder; returns where it went.

    `kind` is "model" or "sample"; `data` is bytes or a memoryview (not copied).
    Raises UploadError when the file is refused. Saving the same content twice is a no-op.
    """
    checks = {"model": check_model_upload, "sample": check_sample_upload}
    if kind not in checks:
        raise ValueError(f"kind must be 'model' or 'sample', got {kind!r}")
    view = memoryview(data).cast("B")
    checks[kind](name, bytes(view[:16]), view.nbytes)
    sha256 = hashlib.sha256(view).hexdigest()
    folder = session_upload_dir(session_id) / kind / sha256[:16]
    path = folder / safe_file_name(name)
    if not (path.exists() and path.stat().st_size == view.nbytes):
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(view)
        partial.replace(path)
    if kind == "model" and path.suffix.lower() == ".keras":
        _check_keras_archive(path, name)
    return SavedUpload(path=path, sha256=sha256, size=view.nbytes)


def _check_keras_archive(path: Path, name: str) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
    except (zipfile.BadZipFile, OSError) as exc:
        path.unlink(missing_ok=True)
        raise UploadError(f"{name} is a damaged .keras file ({exc}).") from exc
    if "config.json" not in members:
        path.unlink(missing_ok=True)
        raise UploadError(f"{name} is a zip but not a Keras model (it has no config.json){zipped_model_hint(members)}.")


def file_sha256(path) -> str:
    """Content hash of a local file, hex (read in 1 MB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def prune_stale_uploads(max_age_hours: float = STALE_UPLOAD_HOURS, *, now: float | None = None) -> list[Path]:
    """Delete session folders not modified for `max_age_hours`; returns the folders removed."""
    root = uploads_root()
    if not root.is_dir():
        return []
    cutoff = (time.time() if now is None else now) - max_age_hours * 3600
    removed = []
    for folder in root.iterdir():
        if folder.is_dir() and _SESSION_ID.match(folder.name) and _newest_mtime(folder) < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _newest_mtime(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    times += [p.stat().st_mtime for p in folder.rglob("*")]
    return max(times)
