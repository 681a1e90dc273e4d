"""Streaming, batched prediction of one or two models over a Sample, with a disk cache.

Each image is decoded once (PIL, in worker threads) and resized once per distinct model input
size; the model sees uint8 RGB batches that its LoadedModel turns into its own input. Nothing
holds the whole sample in memory: batches flow through a bounded queue.

The cache stores, per model (`LoadedModel.cache_key()`: file hash + settings), the predictions
by image id. Re-opening the same model on the same or an overlapping sample only computes the
images it has not seen. A cache file that cannot be read is ignored and rewritten.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.dataset import DECODE_VERSION, UNREADABLE_FILE, default_cache_dir, read_image_rgb, resize_image

DEFAULT_BATCH_SIZE = 64
Progress = Callable[[int, int], None]


@dataclass
class PredictionRun:
    """Result of `predict_sample`: the wide Predictions table and what could not be predicted."""

    predictions: pd.DataFrame
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "reason"]))
    cached: dict[str, int] = field(default_factory=dict)  # model key -> images served from cache
    seconds: float = 0.0

    def nothing_decoded(self, n_images: int) -> str:
        """The message when none of the sample's `n_images` decoded, with one file and its reason."""
        example = (f" (e.g. {Path(self.skipped['path'].iloc[0]).name}: {self.skipped['reason'].iloc[0]})"
                   if len(self.skipped) else "")
        images = "the image" if n_images == 1 else f"the {n_images:,} images"
        return f"none of {images} of the sample could be decoded{example}"


def predict_sample(
    sample: pd.DataFrame,
    models: dict,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir=None,
    use_cache: bool = True,
    progress: Progress | None = None,
    workers: int | None = None,
) -> PredictionRun:
    """Predict age (years) and P(female) for every image of `sample` with each model.

    `models` maps a model key ("A", "B") to a LoadedModel. Returns the Sample columns plus
    `age_pred_<key>` and `p_female_<key>` per model, for the images that decoded; the others
    are listed in `skipped` with the reason. `progress(done, total)` is called after each batch.
    """
    if not models:
        raise ValueError("give at least one model to predict with")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    start = time.perf_counter()
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "predictions"
    ids = sample["image_id"].to_numpy()

    known: dict[str, dict[str, tuple[float, float]]] = {}
    failures: dict[str, str] = {}
    for key, loaded in models.items():
        known[key] = _read_cache(cache_root, loaded) if use_cache else {}
        failures.update(known[key].pop("__failed__", {}))
    todo_keys = {key: [i for i, image_id in enumerate(ids) if image_id not in known[key]] for key in models}
    todo_rows = sorted(set().union(*todo_keys.values()) - {i for i, x in enumerate(ids) if x in failures})
    cached = {key: len(ids) - len(rows) for key, rows in todo_keys.items()}

    if todo_rows:
        fresh, new_failures = _run_models(
            sample, todo_rows, models, todo_keys, batch_size, progress, workers
        )
        failures.update(new_failures)
        for key, loaded in models.items():
            known[key].update(fresh[key])
            if use_cache:
                _write_cache(cache_root, loaded, known[key], failures)
    elif progress is not None:
        progress(len(ids), len(ids))

    keep = ~sample["image_id"].isin(failures)
    predictions = sample[keep].copy()
    for key in models:
        values = np.array([known[key][i] for i in predictions["image_id"]], dtype=np.float64).reshape(-1, 2)
        predictions[f"age_pred_{key}"] = values[:, 0]
        predictions[f"p_female_{key}"] = values[:, 1]
    skipped_rows = sample.loc[~keep, ["path", "image_id"]]
    skipped = pd.DataFrame(
        {"path": skipped_rows["path"].values, "reason": [failures[i] for i in skipped_rows["image_id"]]}
    )
    return PredictionRun(
        predictions=predictions.reset_index(drop=True),
        skipped=skipped,
        cached=cached,
        seconds=time.perf_counter() - start,
    )


def _decode_batch(paths: list[str], sizes: list[tuple[int, int]]):
    """Decode each path once and resize to every size. Returns ({size: uint8 array}, ok mask, errors)."""
    images = {size: [] for size in sizes}
    ok = np.zeros(len(paths), dtype=bool)
    errors: dict[int, str] = {}
    for i, path in enumerate(paths):
        try:
            pixels = read_image_rgb(path)
        except ValueError as exc:
            errors[i] = str(exc)
            continue
        for size in sizes:
            images[size].append(resize_image(pixels, size))
        ok[i] = True
    stacked = {
        size: np.stack(batch) if batch else np.zeros((0, size[0], size[1], 3), np.uint8)
        for size, batch in images.items()
    }
    return stacked, ok, errors


def _run_models(sample: pd.DataFrame, todo_rows, models: dict, todo_keys, batch_size, progress, workers):
    """Decode the rows at positions `todo_rows` in worker threads; feed each model what it still needs."""
    needed = {key: set(sample_rows) for key, sample_rows in todo_keys.items()}
    positions = np.asarray(todo_rows)
    rows = sample.iloc[positions]
    row_ids = rows["image_id"].to_numpy()
    paths = rows["path"].tolist()
    sizes = sorted({tuple(loaded.input_size) for loaded in models.values()})
    fresh: dict[str, dict[str, tuple[float, float]]] = {key: {} for key in models}
    failures: dict[str, str] = {}
    total = len(paths)
    starts = list(range(0, total, batch_size))
    workers = workers or max(1, min(4, (os.cpu_count() or 2)))
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # Keep a few batches decoding ahead of the model, never the whole sample.
        ahead = workers + 1
        futures = [pool.submit(_decode_batch, paths[s : s + batch_size], sizes) for s in starts[:ahead]]
        for n, start in enumerate(starts):
            images, ok, errors = futures[n].result()
            futures[n] = None  # release the decoded batch
            if n + ahead < len(starts):
                s = starts[n + ahead]
                futures.append(pool.submit(_decode_batch, paths[s : s + batch_size], sizes))
            batch_ids = row_ids[start : start + batch_size]
            batch_positions = positions[start : start + batch_size]
            for i, reason in errors.items():
                failures[batch_ids[i]] = reason
            good_ids = batch_ids[ok]
            good_positions = batch_positions[ok]
            for key, loaded in models.items():
                want = np.array([p in needed[key] for p in good_positions], dtype=bool)
                if not want.any():
                    continue
                batch = images[tuple(loaded.input_size)][want]
                ages, p_female = _predict_padded(loaded, batch, batch_size)
                for image_id, age, p in zip(good_ids[want], ages, p_female):
                    fresh[key][image_id] = (float(age), float(p))
            done += len(batch_ids)
            if progress is not None:
                progress(done, total)
    return fresh, failures


def _predict_padded(loaded, batch: np.ndarray, batch_size: int):
    """Run the model on a batch padded to `batch_size` so every call has one shape (no retracing)."""
    n = len(batch)
    if 0 < n < batch_size:
        pad = np.zeros((batch_size - n,) + batch.shape[1:], dtype=batch.dtype)
        batch = np.concatenate([batch, pad])
    ages, p_female = loaded.predict_batch(batch)
    ages = np.asarray(ages, dtype=np.float64)[:n]
    p_female = np.asarray(p_female, dtype=np.float64)[:n]
    if not (np.isfinite(ages).all() and np.isfinite(p_female).all()):
        raise ValueError(
            f"model {loaded.name} produced NaN or infinite outputs — check its preprocessing "
            f"(currently {loaded.preprocessing}) and output mapping"
        )
    return ages, p_female


# ---------------------------------------------------------------- cache

def _cache_path(cache_root: Path, loaded) -> Path:
    """Per model and settings, and per way of decoding images (a change in it changes pixels)."""
    return cache_root / f"{loaded.cache_key()}-d{DECODE_VERSION}.npz"


def _read_cache(cache_root: Path, loaded) -> dict:
    path = _cache_path(cache_root, loaded)
    if not path.exists():
        return {}
    try:
        with np.load(path, allow_pickle=False) as stored:
            ids = stored["image_id"].astype(str)
            values = stored["values"].astype(np.float64)
            failed_ids = stored["failed_id"].astype(str)
            failed_reasons = stored["failed_reason"].astype(str)
        if values.shape != (len(ids), 2):
            raise ValueError("cache arrays do not line up")
    except Exception:
        # A damaged cache only costs a recomputation.
        path.unlink(missing_ok=True)
        return {}
    known = {image_id: (age, p) for image_id, (age, p) in zip(ids, values)}
    known["__failed__"] = dict(zip(failed_ids, failed_reasons))
    return known


def _write_cache(cache_root: Path, loaded, known: dict, failures: dict[str, str]) -> None:
    # Failures are remembered by content hash; a file that could not even be opened says nothing
    # about its content (it may be back, or readable, next time).
    failures = {key: reason for key, reason in failures.items() if not reason.startswith(UNREADABLE_FILE)}
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        ids = np.array(list(known), dtype=str)
        values = np.array(list(known.values()), dtype=np.float64).reshape(-1, 2)
        with tempfile.NamedTemporaryFile(dir=cache_root, suffix=".tmp", delete=False) as handle:
            np.savez(
                handle,
                image_id=ids,
                values=values,
                failed_id=np.array(list(failures), dtype=str),
                failed_reason=np.array(list(failures.values()), dtype=str),
            )
        os.replace(handle.name, _cache_path(cache_root, loaded))
    except OSError:
        pass  # an unwritable cache folder must not stop the evaluation


def calibration_batch(sample: pd.DataFrame, size: tuple[int, int], n: int = 64, seed: int = 0):
    """A labelled batch for preprocessing calibration: (uint8 images (k,h,w,3), ages, genders).

    Draws up to `n` images at random (seeded), skipping ones that do not decode, with up to half
    of them of each gender when the sample has that many (the gender-convention check needs both
    genders; a sample of 200 women and 16 men gives 16 men and 48 women, not ~5 men).
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sample))
    genders_all = sample["gender"].to_numpy()[order]
    # Alternate the genders until one runs out, then continue with the other, in random order.
    by_gender = [order[genders_all == g] for g in (0, 1)]
    interleaved = [i for pair in zip(*by_gender) for i in pair]
    shorter = min(len(g) for g in by_gender)
    interleaved += [i for g in by_gender for i in g[shorter:]]
    order = interleaved[: n * 2]
    images, ages, genders, failures = [], [], [], []
    for i in order:
        row = sample.iloc[i]
        try:
            images.append(resize_image(read_image_rgb(row["path"]), size))
        except ValueError as exc:
            failures.append(f"{Path(row['path']).name}: {exc}")
            continue
        ages.append(row["age"])
        genders.append(row["gender"])
        if len(images) == n:
            break
    if not images:
        raise ValueError(f"none of the {len(failures)} images tried could be decoded to check the model on "
                         f"(e.g. {failures[0]})" if failures else "no images to check the model on")
    return np.stack(images), np.asarray(ages, dtype=float), np.asarray(genders, dtype=int)
