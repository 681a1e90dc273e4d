"""Constants shared by the whole project: label names, age bands, defaults.

Defined once here so the dataset reader, the metrics, the figures and the app agree.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# UTKFace codes: the index in each tuple is the code used in file names.
GENDERS: tuple[str, ...] = ("male", "female")
ETHNICITIES: tuple[str, ...] = ("White", "Black", "Asian", "Indian", "Others")

# UTKFace's ages run 1–116 (its description says 0–116); names with ages up to 120 are accepted
# for other datasets named the same way, and anything above is taken as a label error.
AGE_MIN, AGE_MAX = 0, 120

# Left edges of the default age bands: 0–2, 3–9, 10–19, ..., 60–69, 70+.
AGE_BAND_EDGES: tuple[int, ...] = (0, 3, 10, 20, 30, 40, 50, 60, 70)

# Slices with fewer images than this are flagged: their CIs are wide and gaps unreliable.
SMALL_SLICE_N = 30

DEFAULT_SEED = 0
MODEL_KEYS: tuple[str, ...] = ("A", "B")

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Safety bounds for user-supplied archives and images.
MAX_ZIP_FILES = 100_000
MAX_ZIP_UNCOMPRESSED_BYTES = 4 * 1024**3  # 4 GiB: the full UTKFace set is ~1 GB unzipped
MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused as likely decompression bombs
MAX_IMAGE_FILE_BYTES = 128 * 1024**2  # a 40-megapixel photo is well under this; each file is read whole


def check_age_band_edges(edges) -> tuple[int, ...]:
    """The edges as integers, if they are strictly increasing and start at AGE_MIN (so every age
    has a band); ValueError saying what to give otherwise."""
    try:
        edges = tuple(int(e) for e in edges)
    except (TypeError, ValueError):
        raise ValueError(f"age band edges must be whole years, got {','.join(map(str, edges))}") from None
    if len(edges) < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"age band edges must be strictly increasing integers, got {edges}")
    if edges[0] != AGE_MIN:
        fixed = ",".join(map(str, (AGE_MIN, *[e for e in edges if e > AGE_MIN])))
        raise ValueError(
            f"age band edges must start at {AGE_MIN} so that every age has a band, got "
            f"{','.join(map(str, edges))}; e.g. {fixed}"
        )
    return edges


def age_band_labels(edges: tuple[int, ...] = AGE_BAND_EDGES) -> list[str]:
    """Readable labels for bands starting at `edges`: ["0–2", "3–9", ..., "70+"]."""
    edges = tuple(int(e) for e in edges)
    if len(edges) < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"age band edges must be strictly increasing integers, got {edges}")
    labels = [f"{lo}–{hi - 1}" if hi - 1 > lo else f"{lo}" for lo, hi in zip(edges, edges[1:])]
    labels.append(f"{edges[-1]}+")
    return labels


def assign_age_bands(ages, edges: tuple[int, ...] = AGE_BAND_EDGES) -> pd.Categorical:
    """Map ages in years (shape (n,)) to an ordered categorical of band labels.

    Ages below the first edge get NaN (the dataset reader rejects them before this).
    """
    labels = age_band_labels(edges)
    ages = np.asarray(ages, dtype=float)
    codes = np.searchsorted(np.asarray(edges, dtype=float), ages, side="right") - 1
    codes = np.where(np.isnan(ages), -1, codes)
    return pd.Categorical.from_codes(codes, categories=labels, ordered=True)
