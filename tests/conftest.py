"""Shared fixtures: synthetic samples made on the fly, and the real UTKFace sample when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
UTKFACE = REPO.parent / "shared" / "utkface"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's caches out of the user's home folder."""
    monkeypatch.setenv("FACECHECK_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """120 synthetic 64-px faces with UTKFace-style names (deterministic)."""
    from analysis.synthetic import make_synthetic_sample

    return make_synthetic_sample(tmp_path_factory.mktemp("synthetic"), n=120, seed=3, size=64)


@pytest.fixture(scope="session")
def utkface_test_dir() -> Path:
    path = UTKFACE / "test"
    if not path.is_dir():
        pytest.skip("../shared/utkface/test is not present")
    return path
