"""Training data: read a labelled folder, split it, decode the images once, feed them to Keras.

The images are decoded and resized exactly once with :func:`analysis.dataset.load_image` — the
same resize the evaluator uses, so a model sees the same pixels in training and in evaluation —
into one uint8 array (n, height, width, 3), cached on disk between runs. ``tf.data`` then only
shuffles, batches, converts to float and prefetches; augmentation lives inside the model
(Keras preprocessing layers, active only when training).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.constants import DEFAULT_SEED
from analysis.dataset import DECODE_VERSION, default_cache_dir, load_image, load_sample, photo_key  # noqa: F401 (photo_key: part of this module's API)

# Below this many images a train/validation split leaves too little on either side to learn
# or to measure anything.
MIN_IMAGES = 10
MIN_PER_SUBSET = 2


@dataclass
class SplitSample:
    """A labelled sample split into training and validation rows (Sample tables)."""

    train: pd.DataFrame
    val: pd.DataFrame
    stratified_by: str  # "age band × gender", "gender" or "none"
    seed: int
    skipped: pd.DataFrame

    def describe(self) -> str:
        n = len(self.train) + len(self.val)
        stratified = "not stratified" if self.stratified_by == "none" else f"stratified by {self.stratified_by}"
        repeated = int(pd.concat([self.train, self.val])["file_name"].map(photo_key).duplicated().sum())
        return (
            f"{n} images: {len(self.train)} for training, {len(self.val)} for validation "
            f"({len(self.val) / n:.0%}, {stratified}, seed {self.seed})"
            + (f"; {repeated} files repeat a photo found elsewhere under the same name and stay on its side"
               if repeated else "")
        )

    def without(self, reasons: dict) -> "SplitSample":
        """The split without the images {image_id: reason}, each added to `skipped` with its reason.
        Raises ValueError when too few images are left on either side."""
        drop = set(reasons)
        gone = pd.concat([self.train, self.val])
        gone = gone[gone["image_id"].isin(drop)]
        skipped = pd.concat(
            [self.skipped, pd.DataFrame({"path": gone["path"], "reason": gone["image_id"].map(reasons)})],
            ignore_index=True,
        )
        train, val = self.train[~self.train["image_id"].isin(drop)], self.val[~self.val["image_id"].isin(drop)]
        if len(train) < MIN_PER_SUBSET or len(val) < MIN_PER_SUBSET:
            raise ValueError(
                f"too few decodable images: {len(train)} for training and {len(val)} for validation are left "
                f"after {len(gone)} that cannot be decoded; give at least {MIN_PER_SUBSET} on each side"
            )
        return SplitSample(train=train, val=val, stratified_by=self.stratified_by, seed=self.seed, skipped=skipped)

    def table(self, left_out=None) -> pd.DataFrame:
        """One row per image: image_id, file_name, age, gender, ethnicity, subset ("train"/"val")
        and left_out: `left_out` (a boolean mask over the training rows, in order) marks the
        training images left out of training; validation rows are never left out."""
        columns = ["image_id", "file_name", "age", "gender", "ethnicity"]
        left_out = np.zeros(len(self.train), bool) if left_out is None else np.asarray(left_out, bool)
        return pd.concat(
            [self.train[columns].assign(subset="train", left_out=left_out),
             self.val[columns].assign(subset="val", left_out=False)],
            ignore_index=True,
        )


def split_sample(sample: pd.DataFrame, val_fraction: float = 0.2, seed: int = DEFAULT_SEED) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Split a Sample table into (train, val, stratified_by), stratified by age band × gender.

    Strata with a single image are pooled (a lone one joins the largest stratum); when the validation part is smaller than the number
    of strata, the split falls back to gender only, then to a plain random split. Deterministic
    for a given seed. Files of the same photo (same name without extensions, in different
    folders: photo_key) go to the same side — the photos are split, each with all its files —
    so validation never sees a face trained on. Raises ValueError when there are too few images.
    """
    keys = sample["file_name"].map(photo_key)
    first = ~keys.duplicated()
    if first.all():
        return _split_photos(sample, val_fraction, seed)
    train, val, stratified_by = _split_photos(sample[first], val_fraction, seed)
    in_val = keys.isin(set(keys[val.index]))
    return sample[~in_val], sample[in_val], stratified_by


def _split_photos(sample: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"the validation fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    n = len(sample)
    n_val = int(round(n * val_fraction))
    if n < MIN_IMAGES or n_val < MIN_PER_SUBSET or n - n_val < MIN_PER_SUBSET:
        raise ValueError(
            f"too few images for a train/validation split: {n} usable images with a validation "
            f"fraction of {val_fraction} gives {n - n_val} for training and {n_val} for validation; "
            f"give at least {MIN_IMAGES} labelled images and at least {MIN_PER_SUBSET} on each side"
        )
    candidates = [
        ("age band × gender", sample["age_band"].astype(str) + "|" + sample["gender"].astype(str)),
        ("gender", sample["gender"].astype(str)),
    ]
    for name, strata in candidates:
        counts = strata.map(strata.value_counts())
        strata = strata.where(counts >= 2, "pooled")  # singletons cannot be split
        if (strata == "pooled").sum() == 1:  # a lone singleton joins the largest stratum
            strata = strata.replace("pooled", strata[strata != "pooled"].value_counts().idxmax())
        n_strata = strata.nunique()
        if strata.value_counts().min() >= 2 and n_strata <= min(n_val, n - n_val):
            train, val = train_test_split(sample, test_size=n_val, random_state=seed, stratify=strata)
            return train.sort_index(), val.sort_index(), name
    train, val = train_test_split(sample, test_size=n_val, random_state=seed)
    return train.sort_index(), val.sort_index(), "none"


def read_split(data_dir, val_fraction: float = 0.2, seed: int = DEFAULT_SEED, *, extract_to=None) -> SplitSample:
    """Read the labelled images under `data_dir` (see analysis.dataset.load_sample; a zip is
    extracted into `extract_to`, by default the cache folder) and split them.

    Raises ValueError (analysis.dataset.SampleError is one) for a missing or empty folder, a
    folder without UTKFace-named images, or too few images.
    """
    result = load_sample(data_dir, extract_to=extract_to)
    train, val, stratified_by = split_sample(result.sample, val_fraction, seed)
    return SplitSample(train=train, val=val, stratified_by=stratified_by, seed=seed, skipped=result.skipped)


def load_images(paths, size: tuple[int, int], image_ids=None, *, cache: bool = True, workers: int | None = None) -> np.ndarray:
    """Decode and resize images to uint8 RGB, shape (n, height, width, 3), in the order given
    (see decode_images). Raises ValueError naming the first file that cannot be decoded."""
    images, problems = decode_images(paths, size, image_ids, cache=cache, workers=workers)
    if problems:
        index, reason = next(iter(problems.items()))
        raise ValueError(f"cannot decode {Path(str(list(paths)[index])).name}: {reason}")
    return images


def decode_images(paths, size: tuple[int, int], image_ids=None, *, cache: bool = True,
                  workers: int | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """(uint8 RGB images (n, height, width, 3) in the order given, {index: reason} of the files
    that cannot be decoded — their rows are black). The header check of load_sample passes some
    damaged files (a truncated JPEG verifies), so the full decode can still fail here.

    Decoding runs in a thread pool (PIL releases the GIL while decoding). With `cache` and the
    content hashes `image_ids`, the array is kept under
    ``default_cache_dir()/training/`` and reused when the same images are asked for at the same
    size (only when every image decoded).
    """
    paths = [str(p) for p in paths]
    height, width = int(size[0]), int(size[1])
    cache_path = None
    if cache and image_ids is not None:
        digest = hashlib.sha1("\n".join(map(str, image_ids)).encode()).hexdigest()[:20]
        cache_path = default_cache_dir() / "training" / f"images-{height}x{width}-{digest}-d{DECODE_VERSION}.npy"
        if cache_path.is_file():
            try:
                images = np.load(cache_path, mmap_mode=None, allow_pickle=False)
                if images.shape == (len(paths), height, width, 3) and images.dtype == np.uint8:
                    with contextlib.suppress(OSError):  # a read-only cache still serves
                        os.utime(cache_path)  # used now: pruned last (see _prune_cache)
                    return images, {}
            except (OSError, ValueError):
                pass  # a damaged cache file is rebuilt below

    def decode(path: str) -> np.ndarray | str:
        try:
            return load_image(path, (height, width))
        except ValueError as exc:
            return str(exc)

    images = np.zeros((len(paths), height, width, 3), dtype=np.uint8)
    problems: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) + 2)) as pool:
        for i, pixels in enumerate(pool.map(decode, paths)):
            if isinstance(pixels, str):
                problems[i] = pixels
            else:
                images[i] = pixels
    if cache_path is not None and not problems:
        partial = cache_path.with_name(f".{cache_path.stem}.{os.getpid()}.partial.npy")
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            np.save(partial, images)
            os.replace(partial, cache_path)
            _prune_cache(cache_path)
        except OSError:
            pass  # caching is an optimisation (the folder may not even be one): training goes on
        finally:  # also after Ctrl-C: no half-written cache file is left behind
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
    return images, problems


# The decoded-image cache keeps at most this many bytes: each seed, validation share and image
# size makes its own arrays (Model B's 5000 faces at 150 px: 340 MB), and none is ever reused
# once the settings change.
TRAINING_CACHE_BYTES = 2 * 2**30


def _prune_cache(kept: Path) -> None:
    """Delete the least recently used cached arrays beside `kept` (never it, even when it alone
    is larger) until the folder holds at most TRAINING_CACHE_BYTES of them."""
    total, full = 0, False
    by_use = sorted(((f, f.stat()) for f in kept.parent.glob("images-*.npy")), key=lambda fs: fs[1].st_mtime, reverse=True)
    for cached, info in by_use:
        size = info.st_size
        full = full or (cached != kept and total + size > TRAINING_CACHE_BYTES)
        if full and cached != kept:  # this one and every older one: least recently used first
            cached.unlink(missing_ok=True)
        else:
            total += size


def targets(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """Keras targets for a Sample table: {"age": years float32 (n, 1), "gender": 0/1 float32 (n, 1)}."""
    return {
        "age": table["age"].to_numpy(np.float32).reshape(-1, 1),
        "gender": table["gender"].to_numpy(np.float32).reshape(-1, 1),
    }


def make_dataset(
    images: np.ndarray, labels: dict[str, np.ndarray], batch_size: int, *, training: bool,
    seed: int = DEFAULT_SEED, mixup: float = 0.0,
):
    """A batched tf.data pipeline of (float32 RGB 0–255 images, {"age", "gender", ...} targets).

    Training pipelines reshuffle every epoch (seeded); validation pipelines keep the order.
    mixup > 0 (training only): each batch is blended with a reversed copy of itself,
    x = λ·x + (1 − λ)·x_reversed with one λ ~ Beta(mixup, mixup) per image, and every target
    (age in years, gender, soft age labels) blended with the same λ.
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if training:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    if training and mixup > 0:
        generator = tf.random.Generator.from_seed(seed)
        dataset = dataset.map(lambda x, y: _mixup(x, y, mixup, generator))
    return dataset.prefetch(tf.data.AUTOTUNE)


def _mixup(images, labels: dict, alpha: float, generator):
    """Blend a batch with its reverse; λ ~ Beta(alpha, alpha) per image from two Gamma draws."""
    import tensorflow as tf

    n = tf.shape(images)[0]
    g1 = tf.random.stateless_gamma([n], generator.make_seeds(1)[:, 0], alpha)
    g2 = tf.random.stateless_gamma([n], generator.make_seeds(1)[:, 0], alpha)
    lam = g1 / (g1 + g2)

    def blend(t):
        shape = tf.concat([[n], tf.ones([tf.rank(t) - 1], tf.int32)], axis=0)
        weight = tf.cast(tf.reshape(lam, shape), t.dtype)
        return weight * t + (1 - weight) * tf.reverse(t, axis=[0])

    return blend(images), {key: blend(value) for key, value in labels.items()}
