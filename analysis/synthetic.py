"""Synthetic face-like images with UTKFace-style names, for tests and the built-in demo.

The labels are drawn into the pixels so that a small CNN can learn them:
- age: hair turns from dark to white with age, and older faces get more wrinkle lines;
- gender: female faces have long hair down both sides and red lips, male faces short hair;
- ethnicity: skin tone.
Position, scale, lighting and noise vary so the task is not trivial. No real faces are used,
so these images can be committed and shipped (UTKFace cannot).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from analysis.constants import ETHNICITIES

# Approximate skin tones per ethnicity code (RGB), purely to make ethnicity visible.
_SKIN = np.array(
    [(230, 195, 170), (120, 80, 55), (225, 190, 150), (175, 125, 90), (200, 160, 120)], dtype=float
)


def draw_face(age: int, gender: int, ethnicity: int, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """One synthetic face, uint8 RGB (size, size, 3)."""
    background = rng.uniform(40, 215, size=3)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(image)
    s = size / 96.0
    cx = size / 2 + rng.normal(0, 3 * s)
    cy = size / 2 + rng.normal(2 * s, 3 * s)
    # Faces grow until ~18, so the head size carries age information for children.
    growth = 0.72 + 0.28 * min(age, 18) / 18
    half_w = (26 + rng.normal(0, 1.5)) * s * growth
    half_h = (33 + rng.normal(0, 1.5)) * s * growth

    # Hair grey level rises with age: dark until ~25, white by ~80.
    grey = float(np.clip((age - 25) / 55, 0, 1))
    hair = np.array([45, 30, 20]) * (1 - grey) + np.array([235, 235, 235]) * grey
    hair = tuple(int(v) for v in np.clip(hair + rng.normal(0, 8, 3), 0, 255))
    if gender == 1:  # long hair framing the face
        draw.rectangle([cx - half_w - 9 * s, cy - half_h * 0.6, cx + half_w + 9 * s, cy + half_h * 1.25], fill=hair)
    draw.ellipse([cx - half_w - 4 * s, cy - half_h - 6 * s, cx + half_w + 4 * s, cy + half_h * 0.2], fill=hair)

    skin = np.clip(_SKIN[ethnicity] * rng.uniform(0.88, 1.12) + rng.normal(0, 5, 3), 0, 255)
    skin_rgb = tuple(int(v) for v in skin)
    draw.ellipse([cx - half_w, cy - half_h * 0.75, cx + half_w, cy + half_h], fill=skin_rgb)

    # Children have bigger eyes relative to the face.
    eye_r = (4.5 if age < 13 else 3.2) * s
    for side in (-1, 1):
        ex, ey = cx + side * half_w * 0.42, cy - half_h * 0.1
        draw.ellipse([ex - eye_r, ey - eye_r, ex + eye_r, ey + eye_r], fill=(30, 30, 40))
    mouth_color = (185, 30, 50) if gender == 1 else tuple(int(v * 0.7) for v in skin)
    mw = half_w * 0.45
    draw.rectangle([cx - mw, cy + half_h * 0.5, cx + mw, cy + half_h * 0.5 + 3.5 * s], fill=mouth_color)

    # Wrinkles: one horizontal forehead line per ~12 years past 25.
    line_color = tuple(int(v * 0.6) for v in skin)
    for k in range(int(max(0, age - 25) // 12)):
        y = cy - half_h * 0.35 - k * 3.2 * s
        draw.line([cx - half_w * 0.5, y, cx + half_w * 0.5, y], fill=line_color, width=max(1, int(s)))

    pixels = np.asarray(image, dtype=float) * rng.uniform(0.8, 1.15)
    pixels += rng.normal(0, 6, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def synthetic_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """Labels (n, 3) = age, gender, ethnicity with a UTKFace-like age spread (many 20–40)."""
    ages = np.where(
        rng.random(n) < 0.25, rng.integers(1, 19, n), np.clip(rng.normal(38, 17, n), 1, 95)
    ).astype(int)
    genders = rng.integers(0, 2, n)
    ethnicities = rng.choice(len(ETHNICITIES), n, p=[0.42, 0.19, 0.15, 0.17, 0.07])
    return np.stack([ages, genders, ethnicities], axis=1)


def make_synthetic_sample(out_dir, n: int = 200, seed: int = 0, size: int = 96) -> Path:
    """Write `n` synthetic faces named ``AGE_GENDER_RACE_DATETIME.jpg.chip.jpg`` into `out_dir`.

    Deterministic for a given seed. Returns the folder.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = synthetic_labels(n, rng)
    for i, (age, gender, ethnicity) in enumerate(labels):
        pixels = draw_face(int(age), int(gender), int(ethnicity), rng, size)
        stamp = 20170101000000000 + seed * 1_000_000 + i
        Image.fromarray(pixels).save(out / f"{age}_{gender}_{ethnicity}_{stamp}.jpg.chip.jpg", quality=92)
    return out
