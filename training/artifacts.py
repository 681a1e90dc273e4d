"""Write a trained model and its records without ever leaving a half-written file.

Every file is written under a hidden temporary name in the output folder
(``.<name>.partial-<pid><suffix>``) and renamed into place only when complete, so a crash or an
interrupt never leaves something that looks like a finished model or report. The model itself
is written last: ``age_gender_<key>.keras`` appearing means all its records are there too.

Files per model key K ("A" or "B"):
    age_gender_K.keras   the model (Keras 3 format)
    history_K.csv        one row per epoch
    curves_K.png / .svg  learning curves (drawn by analysis.figures, as in the app)
    metrics_K.json       final validation metrics, configuration, split and timing
    summary_K.txt        layer-by-layer model summary
    split_K.csv          which image went to training and which to validation, and which were left out
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pandas as pd

from analysis.figures import chart_png, chart_svg, learning_curves_chart


def artifact_paths(out_dir, key: str) -> dict[str, Path]:
    out = Path(out_dir)
    return {
        "model": out / f"age_gender_{key}.keras",
        "history": out / f"history_{key}.csv",
        "curves_png": out / f"curves_{key}.png",
        "curves_svg": out / f"curves_{key}.svg",
        "metrics": out / f"metrics_{key}.json",
        "summary": out / f"summary_{key}.txt",
        "split": out / f"split_{key}.csv",
    }


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yield a temporary path next to `final`; rename it to `final` if the block succeeds.

    The temporary name keeps the suffix (Keras insists on ``.keras``) but starts with a dot and
    contains ``.partial-``, so it never looks like a finished file. On error it is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".{final.stem}.partial-{os.getpid()}{final.suffix}")
    try:
        yield partial
        os.replace(partial, final)
    finally:
        if partial.exists():
            partial.unlink()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as partial:
        partial.write_bytes(data)


def model_summary_text(model) -> str:
    """The Keras layer table, nested backbones expanded, with a trainable column."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), expand_nested=True, show_trainable=True)
    return "\n".join(lines) + "\n"


def write_artifacts(out_dir, key: str, model, history: pd.DataFrame, metrics: dict, split_table: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write all files for one trained model (model last). Returns the paths written.

    The earlier files of the same key are all removed first: the model appearing is the sign that
    its records are complete, so an interrupted overwrite must leave neither the old model nor old
    records (metrics, curves) beside new ones. A write that fails or is interrupted removes every
    file of the key written so far: records without their model would read as a finished run."""
    paths = artifact_paths(out_dir, key)
    for path in paths.values():
        path.unlink(missing_ok=True)
    if split_table is None:
        paths.pop("split")
    chart = learning_curves_chart({key: history}, title=f"Model {key}: learning curves")
    writers = {
        "history": lambda path: write_text(path, history.to_csv(index=False)),
        "curves_png": lambda path: write_bytes(path, chart_png(chart)),
        "curves_svg": lambda path: write_text(path, chart_svg(chart)),
        "metrics": lambda path: write_text(path, json.dumps(metrics, indent=2, default=_json_default) + "\n"),
        "summary": lambda path: write_text(path, model_summary_text(model)),
        "split": lambda path: write_text(path, split_table.to_csv(index=False)),
        "model": lambda path: _save_model(path, model),
    }
    order = [name for name in paths if name != "model"] + ["model"]  # the model last: its file means "complete"
    for name in order:
        path = paths[name]
        try:
            writers[name](path)
        except BaseException as exc:
            # Records without their model would read as a finished run (and block a rerun): none is kept.
            for written in paths.values():
                written.unlink(missing_ok=True)
            if not isinstance(exc, OSError):
                raise  # an interrupt, or a bug: as it is
            raise OSError(
                f"could not write {path}: {exc.strerror or exc}. The trained model {key} and its records were not "
                f"kept in {Path(out_dir)} (none of its files is left there); free some space or choose another "
                "--out, then train again"
            ) from exc
    return paths


def _save_model(path: Path, model) -> None:
    with atomic_path(path) as partial:
        inference_copy(model).save(partial)


def inference_copy(model):
    """The same network and weights without optimizer state (a third of the file size).

    Keras 3 always saves a compiled model's optimizer variables; an evaluated model never needs them.
    """
    import keras

    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()  # numpy scalars
    if isinstance(value, (Path, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
