"""What the app keeps between reruns: the session's choices and the cached calls into `analysis`.

Every number the app shows is computed by `analysis`; this module only decides *when*:

- `st.cache_resource` holds LoadedModels (`prepared_model`): shared by all sessions, never mutated
  (overrides make a new LoadedModel, never edit one).
- `st.cache_data` holds tables: the sample (`read_sample`), the metric tables (`metric_tables`),
  the Errors gallery (`gallery_rows`), Grad-CAM overlays and the export files.
- Predictions are memoised per session in `st.session_state["runs"]`, on top of analysis.predict's
  per-image disk cache. They cannot be a st.cache_data function: the progress bar drawn while
  predicting would be recorded and replayed by Streamlit on every cache hit.

Cached functions take plain, hashable arguments (paths, content hashes, widget values). A large
object whose identity is already in another argument is passed with a leading underscore, which
Streamlit does not hash (`_sample` next to its `fingerprint`, `_loaded` next to its cache key).
"""

from __future__ import annotations

import gc
import hashlib
import re
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from analysis.constants import AGE_BAND_EDGES, DEFAULT_SEED, MODEL_KEYS
from analysis.dataset import SampleResult, load_image, load_sample
from app import gallery, uploads

DEMO_SAMPLE_SIZE = 300
BOOTSTRAP_CHOICES = (200, 500, 1000, 2000)
DEFAULT_BOOTSTRAP = 1000
KEPT_RUNS = 3  # prediction runs remembered per session (e.g. before and after a swap)
CARD_IMAGE_SIZE = 160  # pixels; faces and overlays in the Errors gallery
_FREEZE_LOCK = threading.Lock()
_frozen = False  # see freeze_long_lived_objects


# ---------------------------------------------------------------- what the user chose


@dataclass(frozen=True)
class ModelChoice:
    """One model slot's content: a file plus the user's overrides (empty = infer everything)."""

    path: str
    sha256: str
    name: str
    origin: str  # "demo", "upload" or "path"
    overrides: tuple[tuple[str, object], ...] = ()  # sorted (ModelSpec field, value) pairs
    label: str = ""  # the user's name for it in charts, tables and the report ("" = the file name)

    @property
    def key(self) -> str:
        return f"{self.sha256[:16]}|{Path(self.path).name}|{self.overrides!r}"


@dataclass(frozen=True)
class SampleChoice:
    source: str  # folder or zip path
    origin: str  # "demo", "upload" or "path"
    label: str  # what the sidebar calls it
    extract_to: str | None = None  # per-session folder for an uploaded zip


@dataclass(frozen=True)
class Note:
    """A message shown in place, next to the input it is about."""

    level: str  # "error", "warning", "success", "info"
    text: str


@dataclass
class Current:
    """This rerun's evaluation, or why there is none."""

    evaluation: object | None = None  # analysis.evaluation.Evaluation
    run_key: str = ""
    fingerprint: str = ""
    n_boot: int = DEFAULT_BOOTSTRAP
    seed: int = DEFAULT_SEED
    problems: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- session state


def init_session() -> None:
    """Set every session-state default once, at the top of the app script."""
    defaults = {
        "session_id": lambda: uuid.uuid4().hex,
        "models": lambda: demo_model_choices(),  # slot -> ModelChoice | None
        "model_notes": dict,  # slot -> Note
        "pending": dict,  # slot -> ModelChoice that failed to load; the user may retry it with overrides
        "sample": demo_sample_choice,
        "sample_note": lambda: None,
        "handled": dict,  # input name -> the upload id / path already acted on
        "upload_round": dict,  # input name -> counter; bumping it empties that uploader
        "runs": OrderedDict,  # run key -> analysis.predict.PredictionRun
        "failures": dict,  # (model key, sample fingerprint) -> message, so a failure is not retried
        "n_boot": lambda: DEFAULT_BOOTSTRAP,
        "seed": lambda: DEFAULT_SEED,
        "age_band_edges": lambda: AGE_BAND_EDGES,
        "current": Current,
        "bundles": dict,  # (report key, with Grad-CAM) -> report zip bytes
    }
    fresh_session = "session_id" not in st.session_state
    for name, make in defaults.items():
        if name not in st.session_state:
            st.session_state[name] = make()
    if fresh_session:
        uploads.prune_stale_uploads()


def set_note(slot: str, level: str, text: str) -> None:
    st.session_state["model_notes"][slot] = Note(level, text)


def is_new_input(name: str, token) -> bool:
    """True the first time `token` (an upload id or a typed path) shows up for input `name`.
    An emptied input forgets its token, so typing the same path again acts on it again."""
    handled = st.session_state["handled"]
    if token in (None, ""):
        handled.pop(name, None)
        return False
    if handled.get(name) == token:
        return False
    handled[name] = token
    return True


def clear_input(name: str) -> None:
    """Give the text input or uploader `name` a fresh, empty widget and forget what it held (after
    the slot it fed was changed some other way: removed, swapped, back to the demo)."""
    clear_uploader(name)
    st.session_state["handled"].pop(name, None)


def _sentence(text: str) -> str:
    """`text` ending in a full stop, so another sentence can follow it."""
    text = text.rstrip()
    return text if text.endswith((".", "!", "?")) else text + "."


def upload_key(name: str) -> str:
    """Widget key of an uploader; `clear_uploader(name)` gives it a fresh, empty one."""
    return f"{name}_{st.session_state['upload_round'].get(name, 0)}"


def clear_uploader(name: str) -> None:
    rounds = st.session_state["upload_round"]
    rounds[name] = rounds.get(name, 0) + 1


# ---------------------------------------------------------------- the built-in demo


def demo_model_files() -> dict[str, tuple[str, str]]:
    """slot -> (path, sha256) of the committed demo models; {} when they are missing.

    Not cached: it runs once per new session, and a cache would hide models trained later.
    """
    from analysis.__main__ import demo_specs

    try:
        specs = demo_specs()
    except ValueError:
        return {}
    return {key: (spec.path, uploads.file_sha256(spec.path)) for key, spec in specs.items()}


def demo_model_choices() -> dict[str, ModelChoice | None]:
    files = demo_model_files()
    return {
        key: ModelChoice(path, sha, f"demo {key}", "demo") if key in files else None
        for key, (path, sha) in ((k, files.get(k, ("", ""))) for k in MODEL_KEYS)
    }


def demo_sample_choice() -> SampleChoice:
    from analysis.__main__ import demo_sample_dir

    folder = demo_sample_dir(DEMO_SAMPLE_SIZE)
    return SampleChoice(str(folder), "demo", f"Demo: {DEMO_SAMPLE_SIZE} synthetic faces")


def demo_parts() -> list[str]:
    """Which parts of the current setup are the built-in demo ("sample", "model A", ...)."""
    parts = ["sample"] if st.session_state["sample"].origin == "demo" else []
    for slot, choice in st.session_state["models"].items():
        if choice is not None and choice.origin == "demo":
            parts.append(f"model {slot}")
    return parts


# ---------------------------------------------------------------- sample


@st.cache_data(max_entries=8, show_spinner="Reading the sample…")
def read_sample(source: str, extract_to: str | None, age_band_edges: tuple[int, ...]) -> tuple[SampleResult, str]:
    """(SampleResult, fingerprint) of a folder or zip. Raises SampleError for an unusable source.

    The fingerprint covers the age bands too: the predictions table carries each image's band,
    so other bands are another run (its predictions come from the disk cache, no model runs)."""
    result = load_sample(source, age_band_edges=age_band_edges, extract_to=extract_to)
    bands = "" if tuple(age_band_edges) == AGE_BAND_EDGES else f"|bands={','.join(map(str, age_band_edges))}"
    return result, result.fingerprint + bands


def age_band_edges() -> tuple[int, ...]:
    """The left edges of the age bands chosen in Settings (default AGE_BAND_EDGES)."""
    return st.session_state["age_band_edges"]


def parse_age_bands(text: str) -> tuple[tuple[int, ...] | None, str | None]:
    """(edges, None) for age bands typed as left edges ("0,20,40,60"), or (None, the problem)."""
    from analysis.constants import check_age_band_edges

    try:
        return check_age_band_edges([v.strip() for v in text.split(",") if v.strip()]), None
    except ValueError as exc:
        return None, str(exc)


def current_sample() -> tuple[SampleResult, str]:
    choice: SampleChoice = st.session_state["sample"]
    return read_sample(choice.source, choice.extract_to, age_band_edges())


def try_sample(choice: SampleChoice) -> bool:
    """Switch to `choice` if it reads; otherwise keep the current sample and say why."""
    from analysis.dataset import SampleError

    try:
        result, _ = read_sample(choice.source, choice.extract_to, age_band_edges())
        check_decodable(result)
    except (SampleError, OSError, ValueError) as exc:
        text = str(exc).replace(choice.source, choice.label)  # an upload's cache path means nothing to the user
        st.session_state["sample_note"] = Note("error", f"{text} — still using {st.session_state['sample'].label}.")
        return False
    st.session_state["sample"] = choice
    skipped = f", {len(result.skipped)} skipped" if len(result.skipped) else ""
    st.session_state["sample_note"] = Note("success", f"Loaded {choice.label}: {len(result.sample):,} images{skipped}.")
    return True


def check_decodable(result: SampleResult) -> None:
    """Raise SampleError when not one image of the sample decodes. Reading checks only each file's
    header, which a truncated JPEG passes; decoding stops at the first image that works."""
    from analysis.dataset import SampleError, read_image_rgb

    first_problem = None
    for path in result.sample["path"]:
        try:
            read_image_rgb(path)
            return
        except ValueError as exc:
            first_problem = first_problem or f"{Path(path).name}: {exc}"
    n = len(result.sample)
    raise SampleError(f"none of its {n:,} image{'s' if n != 1 else ''} can be decoded (e.g. {first_problem})")


def use_sample_path(text: str) -> bool:
    path = Path(text.strip().strip('"').strip("'")).expanduser()
    return try_sample(SampleChoice(str(path), "path", str(path)))


def use_sample_upload(name: str, data) -> bool:
    try:
        saved = uploads.save_upload(st.session_state["session_id"], "sample", name, data)
    except uploads.UploadError as exc:
        st.session_state["sample_note"] = Note("error", str(exc))
        return False
    extract_to = saved.path.parent / "extracted"
    return try_sample(SampleChoice(str(saved.path), "upload", name, str(extract_to)))


def use_demo_sample() -> None:
    st.session_state["sample"] = demo_sample_choice()
    st.session_state["sample_note"] = None
    clear_input("sample_path")


# ---------------------------------------------------------------- models


@st.cache_resource(max_entries=8, show_spinner="Loading the model and choosing its preprocessing on the sample…")
def prepared_model(path: str, sha256: str, name: str, overrides: tuple, fingerprint: str, seed: int, _sample: pd.DataFrame):
    """(LoadedModel, preprocessing scores or None) for a model file on one sample.

    Loading infers input size, colour order, scaling and the output mapping; preprocessing "auto"
    is chosen by scoring every preset on labelled images of the sample (hence the fingerprint).
    """
    from analysis.evaluation import ModelSpec, prepare_model

    spec = ModelSpec(path=path, name=name, **dict(overrides))
    return prepare_model(spec, _sample, seed=seed)


def prepare(choice: ModelChoice):
    """prepared_model for a slot's choice on the current sample (raises on failure)."""
    sample, _ = current_sample()
    fingerprint = sample.fingerprint  # the images and labels: choosing a preprocessing does not depend on the age bands
    seed = st.session_state["seed"]
    failures = st.session_state["failures"]
    if (choice.key, fingerprint) in failures:
        message, cause = failures[(choice.key, fingerprint)]
        raise ValueError(message) from cause  # the cause tells try_model whether a retry can help
    try:
        loaded, scores = prepared_model(
            choice.path, choice.sha256, choice.name, choice.overrides, fingerprint, seed, sample.sample
        )
    except Exception as exc:  # a model file can fail in many ways; every one is the user's to fix
        message = describe_load_error(choice.name, exc)
        failures[(choice.key, fingerprint)] = (message, exc.with_traceback(None))  # (the key holds the file's path: a renamed copy is retried)
        raise ValueError(message) from exc
    if choice.label and choice.label != loaded.name:  # a name only: same predictions, no reload
        loaded = replace(loaded, name=choice.label)
    return loaded, scores


def clean_label(text: str) -> str:
    """A model name as stored: runs of whitespace (any kind) become one space, none at the ends."""
    return " ".join(text.split())


def rename_model(slot: str, label: str) -> None:
    """Show the model in `slot` as `label` (blank: its file name again)."""
    choice = st.session_state["models"].get(slot)
    if choice is not None:
        label = clean_label(label)
        st.session_state["models"][slot] = replace(choice, label="" if label == choice.name else label)


# The loader's notes name library keywords and command-line options; the app has form fields.
_NOTE_OPTIONS = (
    (re.compile(r"female_index=(\d) \(command line: [^)]*\)"), r"Female index = \1 in the override form"),
    (re.compile(r"age_scale= / --age-scale-a"), "the Age scale field of the override form"),
    (re.compile(r"preprocessing= / --preprocessing-a"), "the Preprocessing field of the override form"),
    (re.compile(r"age_output= / --age-output-a and gender_output= / --gender-output-a"),
     "the Age output and Gender output fields of the override form"),
)


def app_note(note: str) -> str:
    """A loader note in the app's terms (its form fields instead of keywords and options)."""
    for pattern, replacement in _NOTE_OPTIONS:
        note = pattern.sub(replacement, note)
    return note


def describe_load_error(name: str, exc: Exception) -> str:
    from analysis.mapping import CLASS_AGES_HELP, MAPPING_HELP

    text = str(exc).strip() or type(exc).__name__
    text = text.replace(MAPPING_HELP, "Say which output is which in the Retry form below.")
    text = re.sub(re.escape(CLASS_AGES_HELP).replace(re.escape("{n}"), r"\d+"),
                  "Give the age of each class in the Retry form below: Age head = classes, and the ages in "
                  "“…or the age of each class” (for age groups, e.g. the middle of each group).", text)
    if isinstance(exc, ValueError):  # ModelLoadError, SampleError and friends say it well already
        return f"Could not use {name}: {text}"
    return f"Could not load {name} ({type(exc).__name__}): {text}"


def try_model(slot: str, choice: ModelChoice, success: str) -> bool:
    """Put `choice` into `slot` if it loads on the current sample; otherwise keep the slot as it was
    and remember `choice` as pending, so the user can retry it with overrides."""
    try:
        prepare(choice)
    except ValueError as exc:
        kept = st.session_state["models"].get(slot)
        still = f" Model {slot} is still {kept.name}." if kept is not None else ""
        set_note(slot, "error", f"{_sentence(str(exc))}{still}")
        from analysis.compat import ModelFileError

        if not isinstance(exc.__cause__, ModelFileError):  # settings cannot mend a damaged or unsafe file
            st.session_state["pending"][slot] = choice
        return False
    st.session_state["models"][slot] = choice
    st.session_state["pending"].pop(slot, None)
    set_note(slot, "success", success)
    return True


def use_model_upload(slot: str, name: str, data, success: str | None = None) -> bool:
    try:
        saved = uploads.save_upload(st.session_state["session_id"], "model", name, data)
    except uploads.UploadError as exc:
        set_note(slot, "error", str(exc))
        return False
    choice = ModelChoice(str(saved.path), saved.sha256, name, "upload")
    return try_model(slot, choice, success or f"Loaded {name} as model {slot}.")


def use_model_path(slot: str, text: str) -> bool:
    path = Path(text.strip().strip('"').strip("'")).expanduser()
    if not path.is_file():
        set_note(slot, "error", f"No model file at {path}. Give the full path of a .keras or .h5 file.")
        return False
    if path.suffix.lower() not in uploads.MODEL_SUFFIXES:
        set_note(slot, "error", f"{path.name} is not a .keras or .h5 file.")
        return False
    choice = ModelChoice(str(path.resolve()), uploads.file_sha256(path), path.name, "path")
    return try_model(slot, choice, f"Loaded {path.name} as model {slot}.")


def clean_overrides(overrides: dict) -> tuple[tuple[str, object], ...]:
    """Sorted (name, value) pairs of the overrides actually given (None, "" and "auto" = infer)."""
    return tuple(sorted((k, v) for k, v in overrides.items() if v not in (None, "", "auto")))


def apply_overrides(slot: str, overrides: dict, *, pending: bool = False) -> bool:
    """Reload the slot's model (or its pending, failed one) with these overrides."""
    source = st.session_state["pending" if pending else "models"].get(slot)
    if source is None:
        return False
    cleaned = clean_overrides(overrides)
    if cleaned == source.overrides and not pending:
        return False
    what = ", ".join(f"{k} = {v}" for k, v in cleaned) or "everything inferred"
    return try_model(slot, replace(source, overrides=cleaned), f"Model {slot} is {source.name}, loaded with {what}.")


def swap_models() -> None:
    models = st.session_state["models"]
    models["A"], models["B"] = models.get("B"), models.get("A")
    for key in [k for k in st.session_state if str(k).startswith("label_")]:
        del st.session_state[key]  # a name box keeps its text by key: it must not rename the model swapped in
    st.session_state["model_notes"].clear()
    st.session_state["pending"].clear()
    for slot in MODEL_KEYS:
        clear_input(f"path_{slot}")


def remove_model(slot: str) -> None:
    st.session_state["models"][slot] = None
    st.session_state["model_notes"].pop(slot, None)
    st.session_state["pending"].pop(slot, None)
    clear_input(f"path_{slot}")


# ---------------------------------------------------------------- predictions and tables


def run_key(models: dict, fingerprint: str) -> str:
    parts = [f"{slot}={loaded.cache_key()}" for slot, loaded in models.items()] + [fingerprint]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


def predictions(models: dict, sample: pd.DataFrame, fingerprint: str, progress=None):
    """PredictionRun for these models on the sample: memoised per session, else predicted (disk-cached)."""
    from analysis.predict import predict_sample

    key = run_key(models, fingerprint)
    runs: OrderedDict = st.session_state["runs"]
    if key in runs:
        runs.move_to_end(key)
        return key, runs[key]
    run = predict_sample(sample, models, progress=progress)
    runs[key] = run
    while len(runs) > KEPT_RUNS:
        runs.popitem(last=False)
    return key, run


@st.cache_data(max_entries=8, show_spinner="Computing metrics and bootstrap confidence intervals…")
def metric_tables(run_key: str, keys: tuple[str, ...], n_boot: int, seed: int, _predictions: pd.DataFrame) -> dict:
    """Every metric table of the report (analysis.evaluation.compute_tables) plus the summary."""
    from analysis import metrics
    from analysis.evaluation import compute_tables

    tables = compute_tables(_predictions, keys, n_boot=n_boot, seed=seed)
    summary = metrics.summary(_predictions, keys, n_boot=n_boot, seed=seed, tables=tables)
    return {"tables": tables, "summary": summary}


@st.cache_data(max_entries=8, show_spinner=False)
def training_overlap(run_key: str, paths: tuple, _predictions: pd.DataFrame, _models: dict) -> dict:
    """analysis.evaluation.training_overlap, read once per run and model files (~0.1 s of CSV
    reading for a 5000-image split: not on every rerun of a page)."""
    from analysis.evaluation import training_overlap as overlap

    return overlap(_predictions, _models)


@st.cache_data(max_entries=64, show_spinner=False)
def chart_spec(tables_key: str, figure: str, options: tuple, _build) -> dict:
    """The Vega-Lite spec of an analysis.figures chart, built once per (tables, figure, options).

    `_build()` makes the Altair chart; `figure` and `options` say which one, so building and
    validating the chart (the slow part) happens once, not on every rerun. "pad" autosizing keeps
    the plot at its designed size: Streamlit's default "fit" squeezes it to make room for legends.
    """
    import altair as alt

    return _build().properties(autosize=alt.AutoSizeParams(type="pad")).to_dict()


@st.cache_data(max_entries=4, show_spinner=False)
def slice_filter_options(run_key: str, _predictions: pd.DataFrame) -> dict[str, str]:
    return gallery.slice_options(_predictions)


@st.cache_data(max_entries=32, show_spinner=False)
def gallery_rows(run_key: str, kind: str, model: str, slice_label: str, min_error: float, k: int, _predictions) -> tuple[pd.DataFrame, int]:
    """(the k worst cases, how many cases match the filters in all)."""
    cases = gallery.select_cases(_predictions, kind=kind, model=model, slice_label=slice_label, min_error=min_error, k=None)
    return cases.head(k), len(cases)


@st.cache_data(max_entries=64, show_spinner=False)
def gradcam_overlays(
    model_key: str, target: str, layer: str, image_ids: tuple[str, ...], _loaded, _paths: tuple[str, ...]
) -> list[tuple[np.ndarray, str]]:
    """Grad-CAM overlays (uint8 RGB, CARD_IMAGE_SIZE square), one per image, for one model/head/layer,
    each with what it shows: "map", "no evidence" (gradcam.empty_maps) or "none" (no map, a grey
    face: gradcam.undefined_maps)."""
    from analysis import gradcam

    images = np.stack([load_image(path, _loaded.input_size) for path in _paths])
    heatmaps = gradcam.gradcam(_loaded, images, target, layer=layer)
    size = (CARD_IMAGE_SIZE, CARD_IMAGE_SIZE)
    states = np.where(gradcam.undefined_maps(heatmaps), "none", np.where(gradcam.empty_maps(heatmaps), "no evidence", "map"))
    return [(gradcam.overlay(load_image(path, size), heatmap), str(shown))
            for path, heatmap, shown in zip(_paths, heatmaps, states)]


@st.cache_data(max_entries=256, show_spinner=False)
def face_thumbnail(path: str) -> np.ndarray:
    return load_image(path, (CARD_IMAGE_SIZE, CARD_IMAGE_SIZE))


@st.cache_resource(max_entries=8, show_spinner=False)
def gradcam_layers(model_key: str, target: str, _loaded) -> tuple[list[str], str | None]:
    """(candidate layers, default layer) for one model and head; ([], None) for a model without any."""
    from analysis import gradcam

    try:
        return gradcam.candidate_layers(_loaded, target), gradcam.default_layer(_loaded, target)
    except ValueError:
        return [], None


# ---------------------------------------------------------------- the pipeline of one rerun


def evaluate_current(progress_area) -> Current:
    """Sample → models → predictions → tables for the session's choices, reusing every cache.

    Problems (a model that fails on this sample, no model at all) are collected, not raised.
    `progress_area` is an st.empty() slot for the progress bar while predicting.
    """
    from analysis.evaluation import Evaluation

    current = Current(n_boot=st.session_state["n_boot"], seed=st.session_state["seed"])
    try:
        sample, fingerprint = current_sample()
    except (OSError, ValueError) as exc:
        current.problems.append(f"The sample could not be read: {exc}")
        return current
    current.fingerprint = fingerprint
    models, scores = {}, {}
    for slot, choice in st.session_state["models"].items():
        if choice is None:
            continue
        try:
            models[slot], scores[slot] = prepare(choice)
        except ValueError as exc:
            current.problems.append(f"Model {slot}: {exc}")
    if not models:
        if not current.problems:
            current.problems.append(
                "No model to evaluate. Drop a .keras or .h5 file into Model A in the sidebar, or type its path."
            )
        return current

    def show_progress(done: int, total: int) -> None:
        progress_area.progress(done / max(total, 1), text=f"Predicting: {done:,} of {total:,} images")

    try:
        key, run = predictions(models, sample.sample, fingerprint, progress=show_progress)
    except ValueError as exc:  # e.g. a model producing NaN under the chosen preprocessing
        current.problems.append(str(exc))
        return current
    finally:
        progress_area.empty()
    if run.predictions.empty:
        text = run.nothing_decoded(len(sample.sample))  # the sidebar lists only the files skipped when reading
        current.problems.append(text[0].upper() + text[1:] + ".")
        return current
    computed = metric_tables(key, tuple(models), current.n_boot, current.seed, run.predictions)
    current.evaluation = Evaluation(sample, models, scores, run, computed["tables"], computed["summary"])
    paths = tuple((slot, loaded.path) for slot, loaded in models.items())
    current.evaluation.training_overlap = training_overlap(key, paths, run.predictions, models)  # fills the cached_property
    current.run_key = key
    freeze_long_lived_objects()
    return current


def freeze_long_lived_objects() -> None:
    """Once per process, after TensorFlow and the first models are loaded: gc.freeze().

    Streamlit calls keras.backend.clear_session() after every script run of an app that imports
    Keras, and that runs a full garbage collection: ~0.25 s per interaction with TensorFlow's
    millions of objects on the heap. Frozen objects are skipped by the collector; everything
    created later (and everything freed by reference counting) is handled as usual.
    """
    global _frozen
    with _FREEZE_LOCK:
        if not _frozen:
            gc.collect()
            gc.freeze()
            _frozen = True


# ---------------------------------------------------------------- export


def tables_key(current: Current) -> str:
    """Identifies the tables of an evaluation: same predictions, bootstrap size and seed."""
    return f"{current.run_key}|{current.n_boot}|{current.seed}"


def report_key(current: Current) -> str:
    """Identifies the report's figures and bundle: the tables plus the models' names, which the
    figures and the bundle print (a rename changes no table)."""
    names = {slot: loaded.name for slot, loaded in current.evaluation.models.items()}
    return f"{tables_key(current)}|{sorted(names.items())!r}"


@st.cache_data(max_entries=64, show_spinner=False)
def table_csv(tables_key: str, name: str, _table: pd.DataFrame) -> bytes:
    return _table.to_csv(index=False).encode("utf-8")


@st.cache_resource(max_entries=4, show_spinner=False)
def report_figures(report_key: str, _evaluation) -> list:
    """analysis.report.report_figures: every chart of the report (Altair; never mutated)."""
    from analysis import report

    return report.report_figures(_evaluation)


def stored_bundle(current: Current, with_gradcam: bool) -> bytes | None:
    return st.session_state["bundles"].get((report_key(current), with_gradcam))


def build_bundle(current: Current, with_gradcam: bool, progress=None) -> bytes:
    """analysis.report.bundle_zip_bytes for the current evaluation, remembered for this session.

    Not st.cache_data: the progress bar drawn while building must not be replayed.
    """
    from analysis import report

    data = report.bundle_zip_bytes(
        current.evaluation, seed=current.seed, n_boot=current.n_boot, gradcam=with_gradcam, progress=progress
    )
    bundles = st.session_state["bundles"]
    bundles.clear()  # one bundle per session is plenty; they can be tens of MB
    bundles[(report_key(current), with_gradcam)] = data
    return data
