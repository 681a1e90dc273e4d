"""The report bundle: every table, figure and Grad-CAM grid of an Evaluation in one folder.

    write_bundle(evaluation, "report/")      # the folder (and report/report.zip)
    bundle_zip_bytes(evaluation)             # the same bundle as zip bytes, for a download button

What the folder holds (README.md inside lists every file with one line on what it is):

    README.md             index of the files, headline numbers, notes (e.g. skipped Grad-CAM)
    provenance.json       model file hashes and settings, sample fingerprint, skipped counts,
                          seed, package versions, date, sha256 of every other file  (written last)
    summary.json, models.json, skipped.csv
    tables/<name>.csv     full-precision metric tables (read back with pandas.read_csv)
    tables/<name>.md/.tex the same, rounded with readable headers (Markdown, LaTeX booktabs)
    figures/<name>.png/.svg   charts from analysis.figures (PNG at figures.PNG_PPI)
    gradcam/<name>.png    worst faces with each model's Grad-CAM overlay (optional)
    report.zip            all of the above in one file

Writing is atomic from the reader's point of view: files are written into a hidden staging
folder inside the chosen folder and moved into place only when everything succeeded, with
provenance.json last, so a failed export never leaves a half-written bundle that looks complete.
Nothing is written outside the chosen folder.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import platform
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import figures, metrics
from analysis.constants import DEFAULT_SEED, ETHNICITIES, GENDERS, SMALL_SLICE_N
from analysis.dataset import file_digest, load_image

BUNDLE_MARKER = "provenance.json"
STAGING_NAME = ".incomplete"
ZIP_NAME = "report.zip"
ZIP_ROOT = "facecheck_report"  # folder the zip unpacks into
GRADCAM_N = 8  # worst faces per Grad-CAM grid
GRADCAM_CELL = 200  # pixels per face in a grid (UTKFace crops are 200 x 200)
# Grids are drawn at twice that size (text too): at the PNGs' 216 dpi a grid then prints ~5.9 inches
# wide with ~8-point captions, instead of 2.9 inches with 4-point ones.
GRADCAM_SCALE = 2
GRADCAM_COLORMAP = "magma"  # monotone lightness: still readable in greyscale print
_PACKAGES = (
    "tensorflow-cpu", "tensorflow", "keras", "numpy", "pandas", "scipy", "scikit-learn", "pillow",
    "altair", "vl-convert-python",
)  # fmt: skip
# Top-level files a bundle may hold besides tables/, figures/ and gradcam/ (used on --overwrite).
_BUNDLE_TOP_FILES = ("README.md", BUNDLE_MARKER, ZIP_NAME, "summary.json", "models.json", "skipped.csv")

Progress = Callable[[int, int], None]


class BundleError(ValueError):
    """The output folder cannot be used."""


# ---------------------------------------------------------------- output folder


def check_output_folder(out_dir, *, overwrite: bool = False) -> Path:
    """Validate the output folder before any work starts; returns it resolved.

    A folder that exists and holds anything but a previous bundle is refused, so a mistyped
    `--out` can never clobber unrelated files. (Leftovers of an interrupted export, the hidden
    staging folder, do not count.)
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} exists and is a file; choose a folder path for the report")
    if out.exists() and any(p.name != STAGING_NAME for p in out.iterdir()):
        if not (out / BUNDLE_MARKER).exists():
            raise BundleError(
                f"{out} already exists and is not an earlier report folder; choose a new or empty folder"
            )
        if not overwrite:
            raise BundleError(f"{out} already holds a report; pass --overwrite to replace it, or choose a new folder")
    parent = out if out.exists() else _first_existing_parent(out)
    if not parent.is_dir():
        raise BundleError(f"cannot create {out}: {parent} is a file, not a folder; choose another folder for the report")
    # Ask the OS instead of writing a probe file: nothing may be written outside the chosen folder.
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BundleError(f"cannot write to {parent}: permission denied; choose a writable folder")
    return out


def _first_existing_parent(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path("/")


# ---------------------------------------------------------------- provenance


def to_jsonable(value):
    """Plain Python types for json.dump (numpy scalars, NaN → None, tuples → lists)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def provenance(evaluation, *, seed: int = DEFAULT_SEED, n_boot: int | None = None, extra: dict | None = None) -> dict:
    """Everything needed to reproduce the numbers: model hashes and settings, sample, versions.

    `extra` is merged in (write_bundle adds the report settings and the sha256 of every file).
    """
    sample = evaluation.sample
    record = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "models": {
            key: {"name": m.name, "path": m.path, "sha256": m.file_sha256, "settings": m.settings()}
            for key, m in evaluation.models.items()
        },
        "sample": {
            "source": sample.source,
            "fingerprint": sample.fingerprint,
            "age_band_edges": list(sample.age_band_edges),
            "n_images": int(len(sample.sample)),
            "n_evaluated": int(len(evaluation.predictions)),
            "n_skipped_reading": int(len(sample.skipped)),
            "n_skipped_decoding": int(len(evaluation.run.skipped)),
            "skipped_by_reason": sample.skipped_counts(),
            "n_duplicates": int(len(sample.duplicates)),
        },
        "seed": seed,
        "bootstrap_resamples": n_boot,
        "packages": package_versions(),
    }
    record.update(extra or {})
    return to_jsonable(record)




# ---------------------------------------------------------------- readable tables (Markdown, LaTeX)

_MODEL_SUFFIXED = {  # column prefix (before _<model>) -> (header, format kind)
    "gender_acc": ("Gender accuracy {m} (%)", "pct"),
    "age_mae": ("Age MAE {m} (years)", "years"),
    "only": ("Only {m} correct", "int"),
    "age_pred": ("Predicted age {m} (years)", "years1"),
    "p_female": ("P(female) {m}", "prob"),
    "abs_age_err": ("Age error {m} (years)", "years"),
}
_HEADERS = {  # column -> (header, format kind)
    "slice_by": ("Grouping", "grouping"),
    "slice": ("Group", "text"),
    "model": ("Model", "text"),
    "n": ("n", "int"),
    "gender_acc": ("Gender accuracy (%)", "pct"),
    "age_mae": ("Age MAE (years)", "years"),
    "age_bias": ("Age bias (years)", "signed_years"),
    "gender_acc_delta": ("Gender accuracy B − A (points)", "points"),
    "age_mae_delta": ("Age MAE B − A (years)", "signed_years"),
    "mcnemar_p": ("McNemar p", "p"),
    "wilcoxon_p": ("Wilcoxon p", "p"),
    "mcnemar_q": ("McNemar q (BH)", "p"),
    "wilcoxon_q": ("Wilcoxon q (BH)", "p"),
    "small": (f"n < {SMALL_SLICE_N}", "flag"),
    "metric": ("Metric", "metric"),
    "gap": ("Gap", "gap"),
    "best_slice": ("Best group", "text"),
    "best_value": ("Best value", "by_metric"),
    "worst_slice": ("Worst group", "text"),
    "worst_value": ("Worst value", "by_metric"),
    "n_groups": ("Groups", "int"),
    "n_excluded": ("Groups left out", "int"),
    "min_n": ("Minimum n", "int"),
    "bin": ("Bin", "int"),
    "mean_p_female": ("Mean P(female) (%)", "pct"),
    "frac_female": ("Observed share female (%)", "pct"),
    "file_name": ("File", "text"),
    "age": ("True age (years)", "int"),
    "gender": ("Gender", "gender"),
    "ethnicity": ("Ethnicity", "ethnicity"),
    "age_band": ("Age band", "text"),
    "disagreement": ("Disagreement", "text"),
    "label_contradicted": ("Label likely wrong", "flag"),
}
_METRIC_NAMES = {"gender_acc": "Gender accuracy (%)", "age_mae": "Age MAE (years)", "age_bias": "Age bias (years)"}
# Per-image helper columns of the worst-error tables that the readable versions leave out.
_DROP_PREFIXES = ("gender_pred_", "gender_correct_", "age_err_")
_DROP_COLUMNS = ("slice_1", "slice_2", "path", "image_id")
_NUMERIC_KINDS = {"int", "pct", "points", "years", "years1", "signed_years", "p", "prob", "float", "by_metric", "gap", "disagreement"}


def _fmt(value, kind: str, metric: str | None = None) -> str:
    """One cell as text. Accuracy as % with 1 decimal, years with 2, p-values 3 significant."""
    if kind == "by_metric":
        kind = {"gender_acc": "pct", "age_mae": "years", "age_bias": "signed_years"}.get(metric or "", "float")
    elif kind == "gap":  # a spread: never signed
        kind = "pct" if metric == "gender_acc" else "years"
    if kind in ("text", "grouping", "metric"):
        text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
        if kind == "grouping":
            return " × ".join(part.replace("_", " ") for part in text.split("×")).capitalize()
        return _METRIC_NAMES.get(text, text) if kind == "metric" else text
    if kind == "flag":
        return "yes" if bool(value) else ""
    if value is None or pd.isna(value):
        return "–"
    if kind == "gender":
        return GENDERS[int(value)] if 0 <= int(value) < len(GENDERS) else str(value)
    if kind == "ethnicity":
        return ETHNICITIES[int(value)] if 0 <= int(value) < len(ETHNICITIES) else str(value)
    value = float(value)
    # Round first so that a tiny negative value prints as 0.00, not -0.00.
    value = round(value, {"pct": 3, "points": 3, "years": 2, "years1": 1, "signed_years": 2, "prob": 3}.get(kind, 12)) + 0.0
    if kind == "p" and value < 0.001:
        return "<0.001"
    formatter = _NUMBER_FORMATS.get(kind, "{:.3g}")
    return formatter.format(value * 100 if kind in ("pct", "points") else value)


_NUMBER_FORMATS = {
    "int": "{:,.0f}",
    "pct": "{:.1f}",
    "points": "{:+.1f}",
    "years": "{:.2f}",
    "years1": "{:.1f}",
    "signed_years": "{:+.2f}",
    "p": "{:#.3g}",
    "prob": "{:.3f}",
}


def _column_spec(column: str, model_keys) -> tuple[str, str] | None:
    """(header, format kind) of a known column; per-model columns end in _<key> (only_<key>_correct)."""
    if column in _HEADERS:
        return _HEADERS[column]
    for m in model_keys:
        if column == f"only_{m}_correct":
            return _MODEL_SUFFIXED["only"][0].format(m=m), "int"
        if column.endswith(f"_{m}") and column[: -len(m) - 1] in _MODEL_SUFFIXED:
            header, kind = _MODEL_SUFFIXED[column[: -len(m) - 1]]
            return header.format(m=m), kind
    return None


# The ranking `score` of the per-image tables means something else in each: (header, format kind),
# or None where another column already shows it. "disagreement" mixes units, one per row.
_SCORE_COLUMNS = {
    "worst_age": None,  # = "Age error <model>"
    "worst_gender": ("Confidence in the wrong gender", "prob"),
    "worst_disagreement": ("Disagreement size (ΔP(female) or years)", "disagreement"),
    "contradicted_labels": ("Smallest P(other gender)", "prob"),
}


def _score_spec(name: str | None):
    for prefix, spec in _SCORE_COLUMNS.items():
        if name and (name == prefix or name.startswith(prefix + "_")):
            return spec
    return ("Ranking score", "float")


def format_table(table: pd.DataFrame, model_keys=("A", "B"), name: str | None = None) -> tuple[pd.DataFrame, list[bool]]:
    """A readable copy of a metric table: text cells, human headers, CIs as "[lo, hi]".

    `name` (a key of Evaluation.tables) says what the per-image tables' `score` column means.
    Returns (table of strings, per column whether it is numeric, for right alignment).
    Unknown columns keep their name and get 3 significant digits.
    """
    score = _score_spec(name)
    columns = [
        c for c in table.columns
        if c not in _DROP_COLUMNS and not str(c).startswith(_DROP_PREFIXES) and not str(c).endswith(("_lo", "_hi"))
        and not (c == "score" and score is None)
    ]  # fmt: skip
    out: dict[str, list[str]] = {}
    numeric: list[bool] = []
    metric = table["metric"] if "metric" in table else pd.Series([None] * len(table), index=table.index)
    for column in columns:
        if column in ("lo", "hi", "age_lo", "age_hi"):
            continue
        if column == "score":
            header, kind = score
        else:
            header, kind = _column_spec(str(column), model_keys) or (str(column), "float" if pd.api.types.is_numeric_dtype(table[column]) else "text")
        if kind == "disagreement":  # |ΔP(female)| for a gender disagreement, |Δage| in years otherwise
            row_kinds = table["disagreement"].map({"gender": "prob"}).fillna("years") if "disagreement" in table else ["float"] * len(table)
            out[header] = [_fmt(v, k) + (" years" if k == "years" else "") for v, k in zip(table[column], row_kinds)]
        else:
            out[header] = [_fmt(v, kind, m) for v, m in zip(table[column], metric)]
        numeric.append(kind in _NUMERIC_KINDS)
        lo, hi = f"{column}_lo", f"{column}_hi"
        if lo in table and hi in table:
            ci_kind = "points" if column == "gender_acc_delta" else kind
            short = header.split(" (")[0]
            out[f"{short} 95% CI"] = [f"[{_fmt(a, ci_kind)}, {_fmt(b, ci_kind)}]" for a, b in zip(table[lo], table[hi])]
            numeric.append(True)
    if {"age_lo", "age_hi"} <= set(table.columns):
        out = {"True age (years)": [f"{int(a)}–{int(b) - 1}" for a, b in zip(table["age_lo"], table["age_hi"])], **out}
        numeric.insert(0, False)
    elif {"lo", "hi", "mean_p_female"} <= set(table.columns):
        out = {"P(female) bin": [f"{a:.1f}–{b:.1f}" for a, b in zip(table["lo"], table["hi"])], **out}
        numeric.insert(0, False)
    if "Model" in out:  # model first: the tables are long by model
        position = list(out).index("Model")
        numeric.insert(0, numeric.pop(position))
        out = {"Model": out.pop("Model"), **out}
    return pd.DataFrame(out), numeric


def markdown_table(formatted: pd.DataFrame, numeric: list[bool] | None = None) -> str:
    """A GitHub-flavoured Markdown pipe table (pandas.to_markdown would need `tabulate`)."""
    numeric = numeric or [False] * formatted.shape[1]

    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(c) for c in formatted.columns) + " |",
        "|" + "|".join("---:" if right else ":---" for right in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in formatted.itertuples(index=False)]
    return "\n".join(lines) + "\n"


_LATEX_SYMBOLS = {"−": "$-$", "×": "$\\times$", "–": "--", "<": "\\textless{}", ">": "\\textgreater{}", "≥": "$\\geq$", "≤": "$\\leq$", "Δ": "$\\Delta$"}


# Rows per LaTeX float: more do not fit one page (a longer table is split into several floats).
LATEX_FLOAT_ROWS = 40


def latex_table(formatted: pd.DataFrame, numeric: list[bool] | None = None, caption: str | None = None,
                label: str | None = None) -> str:
    """A booktabs table ready to \\input (pdflatex-safe: special characters escaped, no Unicode
    maths, minus signs as $-$): a `table` float with the caption, shrunk to the line width when
    wider (graphicx). A table of more than LATEX_FLOAT_ROWS rows is split into several floats,
    at changes of grouping or model where it can (see _latex_parts). Without a caption: the bare
    `tabular`."""
    numeric = numeric or [False] * formatted.shape[1]
    columns = "".join("r" if r else "l" for r in numeric)

    def tabular(part: pd.DataFrame) -> str:
        part = part.copy()
        for column, right in zip(part.columns, numeric):
            if right:  # an ASCII hyphen before a digit in a number is a minus sign ($-$ below)
                part[column] = part[column].astype(str).str.replace(r"(?<![\w.])-(?=\d)", "−", regex=True)
            else:  # in text (file names) "--" would print as a dash, "``" as a quote mark: kept apart
                part[column] = part[column].astype(str).str.replace(_LIGATURE, _BREAK, regex=True)
        body = part.to_latex(index=False, escape=True, column_format=columns)
        lines = body.splitlines()
        header = lines.index("\\toprule") + 1  # long headers on several lines: narrower columns
        cells = lines[header].removesuffix(" \\\\").split(" & ")
        lines[header] = " & ".join(_stacked(cell, "r" if right else "l") for cell, right in zip(cells, numeric)) + " \\\\"
        return _latex_safe("\n".join(lines) + "\n").replace(_BREAK, "{}")

    if caption is None:
        return "% Needs \\usepackage{booktabs}.\n" + tabular(formatted)
    parts = _latex_parts(formatted, LATEX_FLOAT_ROWS)
    floats = []
    for i, part in enumerate(parts):
        if i == 0:
            title = _latex_text(caption) + (f" (part 1 of {len(parts)})" if len(parts) > 1 else "")
            title += f"\\label{{{label}}}" if label else ""
        else:
            source = f" from Table~\\ref{{{label}}}" if label else ""
            title = f"Continued{source} (part {i + 1} of {len(parts)})."
        floats.append("\\begin{table}[htbp]\n\\centering\n" f"\\caption{{{title}}}\n"
                      "\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{%\n"
                      + tabular(part) + "}\n\\end{table}\n")
    return "% Needs \\usepackage{booktabs,graphicx}.\n" + "\n".join(floats)


# Between two characters of a text cell that pdflatex would set as one (-- ``  '' ,, !` ?`): an
# empty group "{}" keeps them apart; a private-use character stands for it while pandas escapes.
# Typographic characters count as what they become (– is --, ‘ is `, ’ is '): "a-–b" is not an em dash.
_LIGATURE = r"(?<=[-–—])(?=[-–—])|(?<=[`‘“])(?=[`‘“])|(?<=['’”])(?=['’”])|(?<=,)(?=,)|(?<=[!?])(?=[`‘“])"
_BREAK = "\ue000"
_LATEX_PUNCTUATION = {"’": "'", "‘": "`", "“": "``", "”": "''", "—": "---", "…": "\\ldots{}"}
# Latin-1 letters pdflatex sets in its default (OT1) encoding; Ð Þ ð þ need T1, the rest are signs.
_LATEX_LETTERS = {chr(c) for c in range(0xC0, 0x100)} - set("ÐÞðþ×÷")


def _latex_safe(text: str) -> str:
    """Escaped LaTeX with only what pdflatex sets without extra packages: our symbols as commands
    (_LATEX_SYMBOLS), printable ASCII, line breaks, accented Latin letters and typographic
    quotes/dashes; anything else (control characters, CJK, other symbols) becomes "?" rather than
    stopping the compile. The private-use _BREAK passes through, for the caller to replace."""
    def safe(ch: str) -> str:
        if ch in _LATEX_SYMBOLS:
            return _LATEX_SYMBOLS[ch]
        if " " <= ch <= "~" or ch in ("\n", _BREAK) or ch in _LATEX_LETTERS:
            return ch
        return _LATEX_PUNCTUATION.get(ch, "?")

    return "".join(safe(ch) for ch in text)

# A LaTeX header cell longer than this many characters is stacked on several lines.
LATEX_HEADER_WIDTH = 14


def _stacked(cell: str, align: str) -> str:
    """A header cell (already escaped) on lines of about LATEX_HEADER_WIDTH characters (\\shortstack)."""
    lines: list[str] = []
    for word in cell.strip().split(" "):
        if lines and len(lines[-1]) + 1 + len(word) <= LATEX_HEADER_WIDTH:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return cell.strip() if len(lines) <= 1 else f"\\shortstack[{align}]{{" + "\\\\".join(lines) + "}"


def _latex_parts(formatted: pd.DataFrame, limit: int) -> list[pd.DataFrame]:
    """The table cut into parts of at most `limit` rows, each a run of whole groups (consecutive
    rows with the same Grouping and Model) where a group fits, so no part starts mid-group
    needlessly."""
    keys = [c for c in ("Grouping", "Model") if c in formatted.columns]
    if not keys or len(formatted) <= limit:
        return [formatted.iloc[i:i + limit] for i in range(0, max(len(formatted), 1), limit)]
    run = (formatted[keys] != formatted[keys].shift()).any(axis=1).cumsum()
    parts, current = [], []
    for _, group in formatted.groupby(run, sort=False):
        for start in range(0, len(group), limit):
            piece = group.iloc[start:start + limit]
            if current and sum(map(len, current)) + len(piece) > limit:
                parts.append(pd.concat(current))
                current = []
            current.append(piece)
    parts.append(pd.concat(current))
    return parts


_LATEX_ESCAPES = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
                  "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}", "`": ""}


def _latex_text(text: str) -> str:
    """Plain text (a caption) for LaTeX: special characters escaped, Unicode symbols as commands,
    Markdown's code backticks dropped."""
    return _latex_safe("".join(_LATEX_ESCAPES.get(ch, ch) for ch in text))


# ---------------------------------------------------------------- figures


@dataclass
class ReportFigure:
    """A figure of the report. Its chart is built on first use: a page that lists the 14 figures
    and shows one (the app's Export) built all of them first, ~1.5 s."""

    name: str  # file stem, e.g. "by_age_band"
    build: Callable[[], object]  # makes the Altair chart
    caption: str

    @functools.cached_property
    def chart(self):
        return self.build()


_INTERSECTIONS = ("age_band×ethnicity", "age_band×gender", "gender×ethnicity")


def model_names(evaluation) -> dict[str, str]:
    return {key: m.name for key, m in evaluation.models.items()}


def model_histories(evaluation) -> dict[str, pd.DataFrame]:
    """Training histories found next to the model files (history_<K>.csv), by model key."""
    histories = {}
    for key, loaded in evaluation.models.items():
        path = figures.find_history(loaded.path) if getattr(loaded, "path", None) else None
        history = figures.read_history(path) if path is not None else None
        if history is not None and not figures.history_table({key: history}).empty:
            histories[key] = history
    return histories


def report_figures(evaluation, histories: dict[str, pd.DataFrame] | None = None) -> list[ReportFigure]:
    """Every chart of the report, in reading order, built from the evaluation's tables.

    `histories` (model key -> training history table) defaults to the files found next to the
    models; the learning-curve figure is left out when there is none.
    """
    tables, names = evaluation.tables, model_names(evaluation)
    slices, comparison = tables["slices"], tables.get("comparison")
    out = [ReportFigure("overall", functools.partial(figures.overall_chart, slices, names), "Overall gender accuracy and age MAE with 95% CIs")]
    for slice_by, words in (("age_band", "age band"), ("gender", "gender"), ("ethnicity", "ethnicity")):
        if (slices["slice_by"] == slice_by).any():
            build = functools.partial(figures.slice_chart, slices, slice_by, names)
            out.append(ReportFigure(f"by_{slice_by}", build, f"Gender accuracy and age MAE by {words}, 95% CIs, n per group"))
    for slice_by in _INTERSECTIONS:
        if not (slices["slice_by"] == slice_by).any():
            continue
        words = slice_by.replace("_", " ").replace("×", " × ")
        for metric, what in (("age_mae", "Age MAE"), ("gender_acc", "Gender accuracy")):
            build = functools.partial(figures.intersection_heatmap, slices, slice_by, metric, comparison, names)
            suffix = " per model and B − A" if comparison is not None else ""
            out.append(ReportFigure(f"heatmap_{metric}_{slice_by.replace('×', '_x_')}", build, f"{what} by {words}{suffix}"))
    build = functools.partial(figures.age_scatter, evaluation.predictions, list(evaluation.models), names)
    out.append(ReportFigure("age_scatter", build, "Predicted vs true age with the identity line"))
    if "age_error_by_true_age" in tables:
        build = functools.partial(figures.age_error_chart, tables["age_error_by_true_age"], names)
        out.append(ReportFigure("age_error_by_true_age", build, "Signed age error (bias) and MAE by true age"))
    if "calibration" in tables:
        ece = {k: v.get("gender_ece") for k, v in evaluation.summary.get("models", {}).items()}
        build = functools.partial(figures.reliability_chart, tables["calibration"], ece, names)
        out.append(ReportFigure("gender_calibration", build, "Reliability diagram of P(female), ECE in the legend"))
    histories = model_histories(evaluation) if histories is None else histories
    if histories:
        build = functools.partial(figures.learning_curves_chart, histories, names)
        out.append(ReportFigure("learning_curves", build, "Training and validation curves from history_<model>.csv"))
    return out


# ---------------------------------------------------------------- Grad-CAM grids


@dataclass
class GradcamGrid:
    name: str
    image: object  # PIL.Image
    caption: str


def gradcam_grids(evaluation, n: int = GRADCAM_N, kinds=("age", "gender"), notes: list[str] | None = None) -> list[GradcamGrid]:
    """Per model and error kind: its `n` worst faces with every model's Grad-CAM overlay.

    Each overlay explains that model's *own* prediction: "age_older" where it guessed too old,
    "age_younger" where too young, its predicted gender for gender errors. Needs TensorFlow;
    raises whatever analysis.gradcam raises (write_bundle turns that into a README note), except a
    model's own Grad-CAM failure (no convolutional layer, ...): its column then shows grey faces
    marked "no Grad-CAM", as does a face whose map does not exist (gradcam.undefined_maps), and
    `notes` gets a line saying why.
    """
    from analysis import gradcam as gc  # imports TensorFlow: only when grids are wanted

    keys = list(evaluation.models)
    names = {k: loaded.name for k, loaded in evaluation.models.items()}
    overlay = functools.partial(gc.overlay, colormap=GRADCAM_COLORMAP)
    colour_bar = gc.colorbar(12, 256, GRADCAM_COLORMAP, vertical=False)
    titles = {k: f"{k}: Grad-CAM, own prediction" for k in keys}
    failures: dict[str, str] = {}  # model key -> why it has no Grad-CAM at all
    undefined: dict[str, int] = {}  # model key -> faces without a map
    grids = []
    for owner in keys:
        for kind in kinds:
            worst = evaluation.tables.get(f"worst_{kind}_{owner}")
            if worst is None or worst.empty:
                continue
            rows = worst.head(n).reset_index(drop=True)
            faces = np.stack([load_image(p, (GRADCAM_CELL, GRADCAM_CELL)) for p in rows["path"]])
            heatmaps = {k: _heatmaps(gc, evaluation.models[k], rows, k, kind, failures) for k in keys}
            labels = [_grid_label(row, keys) for _, row in rows.iterrows()]
            for k in keys:
                if k not in failures:
                    undefined[k] = undefined.get(k, 0) + int(gc.undefined_maps(heatmaps[k]).sum())
            what = "age errors" if kind == "age" else "gender errors"
            title = f"Worst {what} of model {figures.model_label(owner, names)}: where each model looked"
            image = figures.gradcam_grid(faces, heatmaps, labels, titles, title, overlay=overlay, colour_bar=colour_bar,
                                         cell=GRADCAM_CELL, scale=GRADCAM_SCALE)
            caption = f"Model {owner}'s {len(rows)} worst {what}: face, then each model's Grad-CAM for its own prediction"
            grids.append(GradcamGrid(f"worst_{kind}_{owner}", image, caption))
    if notes is not None:
        notes += [f"Grad-CAM of model {k}: none ({why})." for k, why in failures.items()]
        notes += [f"Grad-CAM of model {k}: {count} face(s) of the grids have no map ({gc.UNDEFINED_MAP}: "
                  f"{gc.UNDEFINED_MAP_WHY}); they are shown grey." for k, count in undefined.items() if count]
    return grids


def _heatmaps(gc, loaded, rows: pd.DataFrame, key: str, kind: str, failures: dict[str, str]) -> np.ndarray:
    """(n, h, w) heatmaps in [0, 1] of `loaded` for its own prediction on each row's face; all NaN
    (no map) when the model has no Grad-CAM, whose reason goes into `failures[key]`."""
    images = np.stack([load_image(p, loaded.input_size) for p in rows["path"]])
    targets = gc.own_answer_targets(rows, key, "age" if kind == "age" else "gender")
    if key not in failures:
        try:
            return np.stack(gc.by_target(targets, lambda target, chosen: gc.gradcam(loaded, images[chosen], target)))
        except ValueError as exc:  # this model's layers: the other model's column still stands
            failures[key] = str(exc)
    return np.full((len(rows), *(int(s) for s in loaded.input_size)), np.nan, dtype=np.float32)


def _whole_years(age: float) -> str:
    """An age rounded to whole years: "0", not "-0", for a prediction just below zero."""
    text = f"{age:.0f}"
    return "0" if text == "-0" else text


def _grid_label(row: pd.Series, keys) -> str:
    gender = GENDERS[int(row["gender"])] if int(row["gender"]) in (0, 1) else str(row["gender"])
    parts = [
        f"{k}: {_whole_years(row[f'age_pred_{k}'])} y, P(female) {row[f'p_female_{k}']:.2f}"
        for k in keys if f"age_pred_{k}" in row
    ]  # fmt: skip
    doubt = ("\nlabel likely wrong: every model gives the other gender "
             f"P ≥ {metrics.LABEL_CHECK_CONFIDENCE:g}" if bool(row.get("label_contradicted", False)) else "")
    return f"{row.get('file_name', '')}  true {int(row['age'])} y, {gender}\n" + " · ".join(parts) + doubt


# ---------------------------------------------------------------- the bundle

_TABLE_NOTES = {
    "predictions": "one row per image: labels, each model's predicted age (years) and P(female)",
    "slices": "per model and group (overall, single attributes, intersections): n, gender accuracy (95% Wilson CI), age MAE and bias (95% bootstrap CIs); `small` marks n < 30",
    "comparison": "paired A vs B per group: differences B − A; gender: Newcombe's paired 95% CI and exact McNemar p; "
                  "age MAE: paired bootstrap 95% CI and Wilcoxon p. Scanning many groups finds small p-values by "
                  "chance: read the q columns (p adjusted over the groups, Benjamini–Hochberg; the overall row keeps its p)",
    "gaps": "how much worse the worst group of each grouping is than the best (accuracy and MAE: largest minus "
            "smallest value; bias: the distance from zero, worst minus best; groups with n < 30 left out)",
    "calibration": "reliability bins of P(female) per model: mean predicted probability vs observed share of women",
    "age_error_by_true_age": "age MAE and signed bias per 5-year bin of true age, per model",
    "worst_disagreement": "images where the two models disagree most (gender first, then age)",
    "contradicted_labels": "images whose gender label every model contradicts with P ≥ "
    f"{metrics.LABEL_CHECK_CONFIDENCE:g}: likely wrong labels, to check by eye (score = the smallest P(other gender))",
}


def _table_note(name: str) -> str:
    if name in _TABLE_NOTES:
        return _TABLE_NOTES[name]
    for kind, what in (("worst_age_", "largest age errors"), ("worst_gender_", "most confident gender mistakes")):
        if name.startswith(kind):
            return (f"images with model {name[len(kind):]}'s {what}, worst first; `label_contradicted` marks gender "
                    f"labels every model contradicts with P ≥ {metrics.LABEL_CHECK_CONFIDENCE:g} (likely wrong)")
    return "metric table"


def write_bundle(
    evaluation,
    out_dir,
    *,
    overwrite: bool = False,
    seed: int = DEFAULT_SEED,
    n_boot: int | None = None,
    gradcam: bool = True,
    gradcam_n: int = GRADCAM_N,
    make_zip: bool = True,
    histories: dict[str, pd.DataFrame] | None = None,
    progress: Progress | None = None,
) -> list[Path]:
    """Write the whole report of `evaluation` to the folder `out_dir` (see the module docstring).

    gradcam: add Grad-CAM grids of the `gradcam_n` worst faces; if that fails (no TensorFlow, a
    model without convolutions, ...) the bundle is written without them and README.md says why.
    make_zip: also write `<out_dir>/report.zip` holding every other file of the bundle.
    histories: model key -> training history; default: history files found next to the models.
    progress(done, total) is called after each written figure or grid.
    Returns the written paths (final locations). Raises BundleError when the folder cannot be
    used; any other error leaves the folder without a (new) complete-looking bundle.
    """
    out = check_output_folder(out_dir, overwrite=overwrite)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = out / STAGING_NAME
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        extra = _write_contents(
            evaluation, staging, gradcam=gradcam, gradcam_n=gradcam_n, histories=histories, progress=progress, make_zip=make_zip
        )
        extra["files"] = {
            str(p.relative_to(staging).as_posix()): file_digest(p) for p in sorted(staging.rglob("*")) if p.is_file()
        }
        # The marker is the last file of the bundle: its presence means the bundle is complete.
        (staging / BUNDLE_MARKER).write_text(json.dumps(provenance(evaluation, seed=seed, n_boot=n_boot, extra=extra), indent=2))
        if make_zip:
            _write_zip(staging, staging / ZIP_NAME)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    return _move_into_place(staging, out)


def report_notes(out_dir) -> list[str]:
    """The notes of the report bundle written to `out_dir` (as in its README.md)."""
    return json.loads((Path(out_dir) / BUNDLE_MARKER).read_text())["report"]["notes"]


def bundle_zip_bytes(evaluation, **kwargs) -> bytes:
    """The report bundle as the bytes of a zip file (for a download button).

    Takes write_bundle's keyword arguments; the bundle is built in a temporary folder that is
    removed afterwards.
    """
    kwargs.pop("make_zip", None)
    kwargs.pop("overwrite", None)
    with tempfile.TemporaryDirectory(prefix="facecheck-report-") as tmp:
        out = Path(tmp) / "report"
        write_bundle(evaluation, out, make_zip=True, **kwargs)
        return (out / ZIP_NAME).read_bytes()


def _write_contents(evaluation, folder: Path, *, gradcam: bool, gradcam_n: int, histories, progress, make_zip: bool) -> dict:
    """Everything but provenance.json and the zip. Returns provenance extras (settings, timings)."""
    timings: dict[str, float] = {}
    notes: list[str] = []
    start = time.perf_counter()
    index = _write_tables(evaluation, folder) + _write_records(evaluation, folder)
    timings["tables"] = time.perf_counter() - start

    start = time.perf_counter()
    report_figs = report_figures(evaluation, histories)
    if not any(f.name == "learning_curves" for f in report_figs):
        notes.append("No learning curves: no training history (history_<model>.csv) was found next to the model files.")
    total = len(report_figs) + (2 * len(evaluation.models) if gradcam else 0)
    index += _write_figures(report_figs, folder, progress, total)
    timings["figures"] = time.perf_counter() - start

    if gradcam:
        start = time.perf_counter()
        index += _write_gradcam(evaluation, folder, gradcam_n, notes)
        if progress is not None:
            progress(total, total)
        timings["gradcam"] = time.perf_counter() - start
    else:
        notes.append("Grad-CAM grids were not requested.")

    index += [
        ("README.md", "this index"),
        (BUNDLE_MARKER, "provenance: model file hashes and settings, sample fingerprint and size, skipped-file counts, seed, package versions, date, sha256 of every file"),
    ]  # fmt: skip
    if make_zip:
        index.append((ZIP_NAME, f"every other file of this folder in one zip (unpacks into {ZIP_ROOT}/)"))
    (folder / "README.md").write_text(_readme(evaluation, index, notes))
    return {
        "report": {
            "figures": [f.name for f in report_figs],
            "png_ppi": figures.PNG_PPI,
            "gradcam": {"requested": gradcam, "n_worst": gradcam_n, "colormap": GRADCAM_COLORMAP},
            "notes": notes,
            "seconds": {k: round(v, 3) for k, v in timings.items()},
        }
    }


def _write_records(evaluation, folder: Path) -> list[tuple[str, str]]:
    """summary.json, models.json and skipped.csv."""
    summary = dict(evaluation.summary, training_overlap=evaluation.training_overlap)
    (folder / "summary.json").write_text(json.dumps(to_jsonable(summary), indent=2))
    models_info = {
        key: {
            "describe": m.describe(),
            "preprocessing_scores": None
            if evaluation.preprocessing_scores.get(key) is None
            else evaluation.preprocessing_scores[key].to_dict(orient="records"),
        }
        for key, m in evaluation.models.items()
    }
    (folder / "models.json").write_text(json.dumps(to_jsonable(models_info), indent=2))
    evaluation.skipped.to_csv(folder / "skipped.csv", index=False)
    return [
        ("summary.json", "headline numbers per model with 95% CIs and the gender ECE (and B − A), the contradicted gender labels "
         "(label_check), the overall A vs B comparison and how many images each model was trained or "
         "validated on (training_overlap)"),
        ("models.json", "what the loader inferred about each model (input size, preprocessing, output mapping) and the preprocessing calibration scores"),
        ("skipped.csv", "files left out of the evaluation and why (stage: reading or decoding)"),
    ]  # fmt: skip


def _write_figures(report_figs: list[ReportFigure], folder: Path, progress, total: int) -> list[tuple[str, str]]:
    (folder / "figures").mkdir()
    index = []
    for done, fig in enumerate(report_figs, start=1):
        stem = folder / "figures" / fig.name
        spec = fig.chart.to_dict()  # validated once, rendered twice
        stem.with_suffix(".png").write_bytes(figures.chart_png(spec))
        stem.with_suffix(".svg").write_text(figures.chart_svg(spec))
        index += [(f"figures/{fig.name}.png", fig.caption), (f"figures/{fig.name}.svg", "the same figure as SVG (vector)")]
        if progress is not None:
            progress(done, total)
    return index


def _write_gradcam(evaluation, folder: Path, n: int, notes: list[str]) -> list[tuple[str, str]]:
    """Grad-CAM grids; an error here becomes a note (the rest of the report stands without them)."""
    try:
        grids = gradcam_grids(evaluation, n=n, notes=notes)
    except Exception as exc:
        notes.append(f"Grad-CAM grids were skipped: {type(exc).__name__}: {exc}")
        return []
    if not grids:
        notes.append("Grad-CAM grids: no worst-error images to show.")
        return []
    (folder / "gradcam").mkdir()
    index = []
    for grid in grids:
        grid.image.save(folder / "gradcam" / f"{grid.name}.png", dpi=(figures.PNG_PPI, figures.PNG_PPI))
        index.append((f"gradcam/{grid.name}.png", grid.caption))
    return index


def _write_tables(evaluation, folder: Path) -> list[tuple[str, str]]:
    tables_dir = folder / "tables"
    tables_dir.mkdir()
    keys = list(evaluation.models)
    evaluation.predictions.to_csv(tables_dir / "predictions.csv", index=False)
    index = [("tables/predictions.csv", _table_note("predictions"))]
    for name, table in evaluation.tables.items():
        table.to_csv(tables_dir / f"{name}.csv", index=False)
        formatted, numeric = format_table(table, keys, name)
        (tables_dir / f"{name}.md").write_text(markdown_table(formatted, numeric))
        (tables_dir / f"{name}.tex").write_text(_latex_file(name, formatted, numeric))
        index += [
            (f"tables/{name}.csv", _table_note(name) + " (full precision)"),
            (f"tables/{name}.md", "the same, rounded, as a Markdown table"),
            (f"tables/{name}.tex", "the same, rounded, as captioned LaTeX tables to \\input (booktabs, graphicx; "
                                   "split over several floats when long)"),
        ]
    return index


# Column headers of the comparison table's gender half in LaTeX (the rest but the group columns: age).
_GENDER_HEADERS = ("Gender", "Only", "McNemar")
_GROUP_HEADERS = ("Grouping", "Group", "n", f"n < {SMALL_SLICE_N}")


def _latex_file(name: str, formatted: pd.DataFrame, numeric: list[bool]) -> str:
    """A table's .tex file: its floats captioned with its README note. The paired comparison (15+
    columns, too wide for a page) becomes two tables, gender and age, each with the group columns."""
    note = _table_note(name)
    caption, label = note[0].upper() + note[1:] + ".", f"tab:{name.replace('_', '-')}"
    if name != "comparison":
        return latex_table(formatted, numeric, caption, label)
    out = []
    for head, keep in (("Gender", lambda h: h.startswith(_GENDER_HEADERS)),
                       ("Age", lambda h: not h.startswith(_GENDER_HEADERS))):
        chosen = [i for i, h in enumerate(formatted.columns) if h in _GROUP_HEADERS or keep(h)]
        part = formatted.iloc[:, chosen]
        out.append(latex_table(part, [numeric[i] for i in chosen], f"{head} half. {caption}",
                               f"{label}-{head.lower()}"))
    return "\n".join(out)


def model_reading(loaded, calibrated: bool, quote: str = "'") -> str:
    """How a model is read, in one line: "64×64 colour · rgb_0_255 (chosen on the sample) · age:
    regression 'age' × 100 · gender: sigmoid 'gender', female = 1". `calibrated`: the
    preprocessing was chosen on labelled images; `quote` wraps output names (a backtick in Markdown)."""
    m = loaded.mapping
    height, width = loaded.input_size
    colour = "grey" if loaded.channels == 1 else "colour"
    if "preprocessing" in loaded.user_settings:
        how = "set by you"
    elif loaded.preprocessing_inside:
        from analysis.models import detect_preprocessing_inside

        implied = detect_preprocessing_inside(loaded.keras_model)
        if implied is None or implied[0] == loaded.preprocessing:
            how = "from the model's own scaling layer"
        else:  # calibration found the other colour order clearly better
            how = "the model's own scaling layer, in the other colour order chosen on the sample"
    else:
        how = "chosen on the sample" if calibrated else "assumed"
    given = set(loaded.user_settings)
    yours = " (set by you)"
    age = f"{m.age_kind} {quote}{m.output_names[m.age_output]}{quote}"
    if m.age_kind == "regression" and m.age_scale != "years":
        age += " as log-years" if m.age_scale == "log" else f" × {m.age_scale[1:]}"
    if given & {"age_output", "age_kind", "age_class_values", "age_scale"}:
        age += yours
    gender = f"{m.gender_kind} {quote}{m.output_names[m.gender_output]}{quote}, female = {m.female_index}"
    if given & {"gender_output", "female_index", "gender_kind"}:
        gender += yours
    return f"{height}×{width} {colour} · {loaded.preprocessing} ({how}) · age: {age} · gender: {gender}"


# Notes of routine inferences (an output found by its name, the preprocessing a layer declares,
# UTKFace's gender convention assumed); the others are worth the user's attention.
_ROUTINE_NOTE_PATTERNS = (
    r"^(age|gender) output '.*' found by ",
    r"^preprocessing inside the model ",
    r"^preprocessing \S+ chosen by calibration ",
    r"^assumed (the sigmoid gives P\(female\)|gender column 1 = female) ",
    r"^age output has \d+ classes: read as ages ",
)


def notes_to_read(loaded) -> list[str]:
    """The loader's notes about `loaded` that a user should read (not the routine ones)."""
    return [note for note in loaded.notes if not any(re.match(p, note) for p in _ROUTINE_NOTE_PATTERNS)]


def _readme(evaluation, index: list[tuple[str, str]], notes: list[str]) -> str:
    lines = ["# Age and gender model evaluation report", ""]
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sample = evaluation.sample
    lines += [
        f"Created {created}. Sample: {len(evaluation.predictions):,} images evaluated from `{sample.source}`"
        + (f" ({len(sample.skipped) + len(evaluation.run.skipped):,} files skipped, see skipped.csv)." if len(sample.skipped) + len(evaluation.run.skipped) else "."),
        "",
        "## Models",
        "",
    ]
    for key, m in evaluation.models.items():
        calibrated = evaluation.preprocessing_scores.get(key) is not None
        lines.append(f"- **{key}**: {m.name} (`{Path(m.path).name}`, sha256 `{m.file_sha256[:12]}…`): "
                     f"{model_reading(m, calibrated, '`')}")
        lines += [f"  - {note}" for note in notes_to_read(m)]
    slices = evaluation.tables.get("slices")
    if slices is not None:
        overall = slices[slices["slice_by"] == "overall"]
        formatted, numeric = format_table(overall.drop(columns=["slice_by", "slice", "small"], errors="ignore"), list(evaluation.models))
        lines += ["", "## Headline numbers (95% CIs)", "", markdown_table(formatted, numeric).rstrip()]
    comparison = comparison_sentence(evaluation)
    if comparison:
        lines += ["", comparison + " — per group in `tables/comparison.csv`."]
    overlap = training_overlap_lines(evaluation.training_overlap)
    if overlap:
        lines += ["", "## Not held-out", ""] + [f"**Warning**: {text}" for text in overlap]
    held_out = held_out_text(evaluation.training_overlap)
    if held_out:
        lines += ["", held_out]
    lines += label_check_lines(evaluation)
    lines += ["", "## Files", "", "| File | What it is |", "|:---|:---|"]
    lines += [f"| `{path}` | {what} |" for path, what in index]
    lines += [
        "",
        f"Figures: PNG at {figures.PNG_PPI} pixels per inch of the chart's nominal size (Vega lays out in "
        "1/72-inch points, so a PNG is 3× the SVG's pixel size); print a figure at that size or smaller "
        "for at least 216 dpi. SVG files scale freely.",
        f"Faded bars, points and cells: groups with fewer than {SMALL_SLICE_N} images (wide CIs).",
    ]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


# Above this share of contradicted labels the sentence warns that the models, not the labels, are
# likely at fault (UTKFace's wrong gender labels are about 1%; BENCHMARKS.md).
LABEL_CHECK_MANY = 0.05


def _share(share: float) -> str:
    """A share as a percentage that does not round a few images to 0.0%."""
    return f"{share:.1%}" if share >= 0.001 or share == 0 else f"{share * 100:.2g}%"


def label_check_text(check: dict, listed: str | None = None) -> str | None:
    """Sentences on the gender labels every model contradicts (summary["label_check"]), ending with
    where they are listed (`listed`, e.g. "in tables/contradicted_labels.csv"); None when there are none."""
    n = check["n_contradicted"]
    if not n:
        return None
    one = n == 1
    judges = "both models" if len(check["models"]) == 2 else "the model" if len(check["models"]) == 1 else "every model"
    if_wrong = ", ".join(f"{m} {acc:.1%}" for m, acc in check["gender_acc_if_wrong"].items())
    text = (
        f"{n} gender label{'' if one else 's'} ({_share(check['share'])} of the images) {'is' if one else 'are'} "
        f"contradicted by {judges} with P ≥ {check['confidence']:g} — check {'it' if one else 'them'} by eye: labels "
        f"can be wrong (UTKFace has some). If {'it is' if one else 'they are'} wrong, gender accuracy would be "
        f"{if_wrong} (the headline numbers keep the labels as given)."
    )
    if check["share"] > LABEL_CHECK_MANY:
        owner = "models'" if len(check["models"]) > 1 else "model's"
        text += (" That is more than wrong labels usually explain (about 1% in UTKFace): many are likely the "
                 f"{owner} own confident mistakes.")
    return text + (f" {'It is' if one else 'They are'} listed {listed}." if listed else "")


def comparison_sentence(evaluation) -> str | None:
    """The overall paired B − A result in one line (None with one model)."""
    comparison = evaluation.tables.get("comparison")
    if comparison is None:
        return None
    c = comparison[comparison["slice_by"] == "overall"].iloc[0]
    interval = (f"95% CI {c.age_mae_delta_lo:+.2f} to {c.age_mae_delta_hi:+.2f}; "
                if all(math.isfinite(v) for v in (c.age_mae_delta_lo, c.age_mae_delta_hi)) else "no CI; ")
    lo, hi = c.get("gender_acc_delta_lo", math.nan), c.get("gender_acc_delta_hi", math.nan)
    points = f"95% CI {lo * 100:+.1f} to {hi * 100:+.1f}; " if math.isfinite(lo) and math.isfinite(hi) else ""
    return (f"B − A: gender accuracy {c.gender_acc_delta * 100:+.1f} points ({points}{p_text(c.mcnemar_p)}, exact "
            f"McNemar); age MAE {c.age_mae_delta:+.2f} years ({interval}{p_text(c.wilcoxon_p)}, Wilcoxon)")


def p_text(p: float | None) -> str:
    """"p < 0.001", "p = 0.042" or "p not available" (None/NaN): p-values as the report and the app print them."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "p not available"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def training_overlap_lines(overlap: dict) -> list[str]:
    """One sentence per model evaluated on images it was trained or validated on (see
    analysis.evaluation.training_overlap)."""
    lines = []
    for key, o in overlap.items():
        if not (o["n_train"] or o["n_val"]):
            continue
        parts = [f"trained on {o['n_train']:,}" if o["n_train"] else "", f"validated on {o['n_val']:,}" if o["n_val"] else ""]
        lines.append(
            f"Model {key} was {' and '.join(p for p in parts if p)} of these {o['n_evaluated']:,} images "
            f"(its {o['split_file']} says so): its numbers here are not held-out and flatter it. "
            "Evaluate on images neither model has seen (e.g. UTKFace's test/ folder)."
        )
    return lines


def held_out_text(overlap: dict) -> str | None:
    """The confirmation that the sample is held-out for the models whose split file lists none of
    its images (see training_overlap_lines for the others); None when no model has a split file."""
    clean = [f"{key} ({o['split_file']})" for key, o in overlap.items() if not (o["n_train"] or o["n_val"])]
    if not clean:
        return None
    return (f"Held-out check: the training split of model{'s' if len(clean) > 1 else ''} {' and '.join(clean)} "
            "lists none of these images (by content or photo name).")


def label_check_lines(evaluation) -> list[str]:
    text = label_check_text(evaluation.summary["label_check"], "in `tables/contradicted_labels.csv`")
    return ["", "## Contradicted gender labels", "", text] if text else []


def _write_zip(folder: Path, zip_path: Path) -> None:
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path != zip_path:
                archive.write(path, f"{ZIP_ROOT}/{path.relative_to(folder).as_posix()}")


def _move_into_place(staging: Path, out: Path) -> list[Path]:
    """Replace any earlier bundle in `out` by the staged one; provenance.json goes last."""
    old_files = _old_bundle_files(out)
    (out / BUNDLE_MARKER).unlink(missing_ok=True)  # from here on the folder does not look complete
    for name in old_files:
        path = (out / name).resolve()
        if path.is_file() and out in path.parents:
            path.unlink()
    for sub in ("tables", "figures", "gradcam"):
        if (out / sub).is_dir() and not any((out / sub).iterdir()):
            (out / sub).rmdir()
    written = []
    for path in sorted(staging.rglob("*"), key=lambda p: (p.name == BUNDLE_MARKER, str(p))):
        if path.is_file():
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.replace(target)
            written.append(target)
    shutil.rmtree(staging, ignore_errors=True)
    return written


def _old_bundle_files(out: Path) -> set[str]:
    """Files of an earlier bundle in `out`, so that no stale figure survives an overwrite.

    Those its provenance.json lists (older bundles: the known names and tables/*.csv); anything
    else a user put in the folder stays.
    """
    names = set(_BUNDLE_TOP_FILES)
    try:
        names |= set(json.loads((out / BUNDLE_MARKER).read_text()).get("files", {}))
    except (OSError, ValueError, AttributeError):
        pass
    if (out / "tables").is_dir():
        names |= {f"tables/{p.name}" for p in (out / "tables").glob("*.csv")}
    return names
