"""The sidebar: which sample and which models are evaluated, and what the loader made of each model.

`*_ui()` functions draw widgets and return what the user asked for; `render_*()` functions only
draw; app.state does the loading, checking and keeping (or refusing) of what the user gave.
Every message about an input is shown right under that input.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import streamlit as st

from analysis.constants import MODEL_KEYS
from analysis.mapping import AGE_SCALES, ModelLoadError, age_scale_words, parse_age_scale
from analysis.report import model_reading, notes_to_read
from app import state, uploads

ROLE = {"A": "baseline", "B": "compared"}
ORIGIN_BADGE = {"demo": ("demo", "gray"), "upload": ("uploaded", "blue"), "path": ("local path", "violet")}


@dataclass
class SourceInput:
    """What the user did with one source's inputs during this rerun."""

    upload: object | None = None  # streamlit UploadedFile
    path: str = ""
    use_demo: bool = False


# ---------------------------------------------------------------- layout


def render_sidebar() -> None:
    with st.sidebar:
        st.markdown("## facecheck")
        st.caption("Compare age & gender face models on a labelled sample.")
        models_box = st.container()
        st.divider()
        sample_box = st.container()
        st.divider()
        with st.expander("Settings"):
            settings_ui()
    # The sample comes first: a new model is checked (and its preprocessing chosen) on it.
    with sample_box:
        sample_section()
    with models_box:
        models_section()


def render_note(note: state.Note | None) -> None:
    if note is None:
        return
    show = {"error": st.error, "warning": st.warning, "success": st.success, "info": st.info}[note.level]
    icons = {"error": ":material/error:", "warning": ":material/warning:", "success": ":material/check_circle:", "info": ":material/info:"}
    show(note.text, icon=icons[note.level])


def settings_ui() -> None:
    st.select_slider(
        "Bootstrap resamples",
        options=state.BOOTSTRAP_CHOICES,
        key="n_boot",
        help="For the 95% confidence intervals of age MAE and bias (gender accuracy uses Wilson intervals). More is steadier and slower; the numbers are cached.",
    )
    st.number_input("Random seed", min_value=0, step=1, key="seed", help="Bootstrap and calibration draws.")
    current = ",".join(map(str, state.age_band_edges()))
    text = st.text_input(
        "Age bands (left edges, years)", value=current, key="age_bands_text",
        help="Where each age band starts, from 0: the default 0,3,10,20,...,70 gives 0–2, 3–9, ..., 70+; "
        "e.g. 0,20,40,60 gives four bands. The same as the CLI's --age-bands.",
    )
    edges, problem = state.parse_age_bands(text)
    if problem:
        st.error(f"Age bands not changed: {problem}.")
    elif edges != state.age_band_edges():  # compared parsed: "0,20," and "0,020" are 0,20
        st.session_state["age_band_edges"] = edges
        st.rerun()


# ---------------------------------------------------------------- sample


def sample_section() -> None:
    st.markdown("#### Held-out sample")
    summary_box = st.container()
    action = sample_source_ui()
    if action.use_demo:
        state.use_demo_sample()
        st.rerun()
    elif action.upload is not None and state.is_new_input("sample_zip", action.upload.file_id):
        if state.use_sample_upload(action.upload.name, action.upload.getbuffer()):
            state.clear_uploader("sample_zip")
            state.clear_input("sample_path")  # the folder it showed is no longer the sample; typing it again must act
            st.rerun()
    elif state.is_new_input("sample_path", action.path.strip()):
        if state.use_sample_path(action.path):
            st.rerun()  # the widgets above were drawn for the previous sample
    render_note(st.session_state["sample_note"])
    with summary_box:
        render_sample_summary()


def sample_source_ui() -> SourceInput:
    choice: state.SampleChoice = st.session_state["sample"]
    path = st.text_input(
        "Local folder or .zip path",
        key=state.upload_key("sample_path"),
        placeholder="e.g. ../shared/utkface/test, then Enter",
        help="A folder (searched recursively) or .zip of images named like UTKFace: "
        "AGE_GENDER_RACE_DATETIME.jpg (gender 0 male / 1 female; race 0–4 White, Black, Asian, Indian, Others).",
    )
    # No `type=` filter: Streamlit would raise on a wrong extension; app.uploads explains it instead.
    upload = st.file_uploader(
        "…or upload a .zip",
        key=state.upload_key("sample_zip"),
        max_upload_size=uploads.MAX_SAMPLE_UPLOAD_MB,
    )
    use_demo = choice.origin != "demo" and st.button("Back to the demo sample", key="demo_sample")
    return SourceInput(upload=upload, path=path or "", use_demo=bool(use_demo))


def render_sample_summary() -> None:
    choice: state.SampleChoice = st.session_state["sample"]
    try:
        result, _ = state.current_sample()
    except (OSError, ValueError) as exc:
        st.error(f"{choice.label}: {exc}")
        return
    badge, colour = ORIGIN_BADGE[choice.origin]
    st.markdown(f"**{choice.label}** :{colour}-badge[{badge}]")
    skipped, duplicates = len(result.skipped), len(result.duplicates)
    n = len(result.sample)
    parts = [f"{n:,} image{'' if n == 1 else 's'} read", f"{skipped:,} skipped"]
    if duplicates:
        parts.append(f"{duplicates:,} duplicates")
    st.caption(" · ".join(parts))
    if skipped:
        with st.expander(f"Skipped files ({skipped:,}) and why"):
            counts = result.skipped_counts()
            st.markdown("\n".join(f"- {reason}: {n:,}" for reason, n in counts.items()))
            table = result.skipped.assign(file=result.skipped["path"].map(result.path_in_sample))
            st.dataframe(table[["file", "reason"]], hide_index=True, height=200)


# ---------------------------------------------------------------- models


def models_section() -> None:
    st.markdown("#### Models")
    candidate = st.file_uploader(
        f"Candidate: drop a new .keras or .h5 model to compare against the baseline (A), up to {uploads.size_text(uploads.MAX_MODEL_UPLOAD_MB)}",
        key=state.upload_key("candidate"),
        max_upload_size=uploads.MAX_MODEL_UPLOAD_MB,
        help="It becomes model B; model A stays as the baseline. Swap them below if needed.",
    )
    if candidate is not None and state.is_new_input("candidate", candidate.file_id):
        baseline = st.session_state["models"].get("A")
        against = f" against baseline A ({baseline.name})" if baseline else ""
        if state.use_model_upload("B", candidate.name, candidate.getbuffer(), f"Candidate {candidate.name} is model B, compared{against}."):
            state.clear_uploader("candidate")
            st.rerun()
    for slot in MODEL_KEYS:
        model_slot_section(slot)
    swap, remove = st.columns(2)
    models = st.session_state["models"]
    if swap.button("⇄ Swap A and B", key="swap", disabled=models.get("A") is None and models.get("B") is None):
        state.swap_models()
        st.rerun()
    if remove.button("Remove B", key="remove_B", disabled=models.get("B") is None, help="Evaluate model A alone."):
        state.remove_model("B")
        st.rerun()


def model_slot_section(slot: str) -> None:
    with st.container(border=True):
        header_box = st.container()
        with st.expander(f"Load another model {slot}"):
            action = model_source_ui(slot)
        if action.upload is not None and state.is_new_input(f"model_{slot}", action.upload.file_id):
            if state.use_model_upload(slot, action.upload.name, action.upload.getbuffer()):
                state.clear_uploader(f"model_{slot}")
                st.rerun()
        elif state.is_new_input(f"path_{slot}", action.path.strip()):
            state.use_model_path(slot, action.path)
        choice = st.session_state["models"].get(slot)
        loaded, scores = None, None
        if choice is not None:
            try:
                loaded, scores = state.prepare(choice)
            except ValueError as exc:
                note = st.session_state["model_notes"].get(slot)
                if note is None or note.level != "error":  # keep the message about a failed new file
                    state.set_note(slot, "error", str(exc))
        with header_box:
            render_model_header(slot, choice, loaded, scores)
            if loaded is not None:
                with st.expander("What the loader inferred · override · rename"):
                    label = st.text_input(
                        "Name in charts, tables and the report", value=loaded.name, key=f"label_{slot}_{choice.sha256[:12]}",
                        help="e.g. 'custom CNN' or 'fine-tuned ResNet'; empty = the file name.",
                    )
                    cleaned = state.clean_label(label)  # compared as stored: "a  b" must not rename forever
                    if cleaned != loaded.name and (cleaned or choice.label):
                        state.rename_model(slot, cleaned)
                        st.rerun()
                    render_model_details(loaded, scores)
                    overrides = overrides_ui(f"overrides_{slot}", dict(choice.overrides), list(loaded.mapping.output_names))
                if overrides is not None and state.apply_overrides(slot, overrides):
                    st.rerun()
        render_note(st.session_state["model_notes"].get(slot))
        pending = st.session_state["pending"].get(slot)
        if pending is not None:
            with st.expander(f"Retry {pending.name} with these settings", expanded=True):
                st.caption("Say what the loader could not infer, e.g. which output is age and which is gender.")
                overrides = overrides_ui(f"retry_{slot}", dict(pending.overrides), None)
            if overrides is not None:
                state.apply_overrides(slot, overrides, pending=True)
                st.rerun()  # success or not: the note above this form must say what happened now


def model_source_ui(slot: str) -> SourceInput:
    upload = st.file_uploader(
        f"Drop a .keras or .h5 file as model {slot} (up to {uploads.size_text(uploads.MAX_MODEL_UPLOAD_MB)})",
        key=state.upload_key(f"model_{slot}"),
        max_upload_size=uploads.MAX_MODEL_UPLOAD_MB,
    )
    path = st.text_input(
        f"…or the path of a model file on this machine",
        key=state.upload_key(f"path_{slot}"),
        placeholder="/models/age_gender.keras, then Enter",
    )
    return SourceInput(upload=upload, path=path or "")


def render_model_header(slot: str, choice: state.ModelChoice | None, loaded, scores) -> None:
    if choice is None:
        st.markdown(f"**Model {slot}** · {ROLE[slot]}")
        st.caption("No model. Drop a .keras or .h5 file below, or type its path.")
        return
    badge, colour = ORIGIN_BADGE[choice.origin]
    shown = f" · shown as **{choice.label}**" if choice.label else ""
    st.markdown(f"**Model {slot}** · {ROLE[slot]} :{colour}-badge[{badge}]  \n`{choice.name}`{shown}")
    if loaded is not None:
        st.caption(model_reading(loaded, scores is not None, "`"))
        for note in notes_to_read(loaded):  # the rest is under "What the loader inferred"
            st.caption(f":orange[●] {state.app_note(note)}")


def render_model_details(loaded, scores: pd.DataFrame | None) -> None:
    from analysis.models import PRESET_DESCRIPTIONS

    m = loaded.mapping
    rows = [
        ("file", f"{loaded.file_format} · sha256 {loaded.file_sha256[:12]}…"),
        ("input", f"{loaded.input_size[0]}×{loaded.input_size[1]}, {loaded.channels} channel(s); declared {list(loaded.declared_input_shape)}"),
        ("preprocessing", f"{loaded.preprocessing}: {PRESET_DESCRIPTIONS[loaded.preprocessing]}"),
        ("age output", f"{m.output_names[m.age_output]} ({m.age_kind}{', from logits' if m.age_from_logits else ''}"
                       + (f", read as {age_scale_words(m.age_scale)}" if m.age_kind == "regression" else "") + ")"),
        ("gender output", f"{m.output_names[m.gender_output]} ({m.gender_kind}{', from logits' if m.gender_from_logits else ''}); female index {m.female_index}"),
        ("set by you", ", ".join(loaded.user_settings) or "nothing: all inferred"),
    ]
    # Lines rather than a table: they wrap in the narrow sidebar, where a table cut its values.
    st.markdown("\n".join(f"- **{setting}**: {value}" for setting, value in rows))
    if loaded.notes:
        st.markdown("\n".join(f"- {state.app_note(note)}" for note in loaded.notes))
    if scores is not None:
        st.caption("Preprocessing auto-detection: every preset scored on labelled sample images, gender accuracy · "
                   "age MAE (✓ the one kept; all columns in the report bundle's models.json).")
        # Lines, not a table: the sidebar's expander is too narrow for three columns of numbers.
        st.markdown("\n".join(f"- {line}" for line in score_lines(scores)))


def score_lines(scores: pd.DataFrame) -> list[str]:
    """One line per scored preset, the kept one ticked; the age reading only when some preset reads
    the age output other than as years."""
    show_scale = "age_scale" in scores and bool((scores["age_scale"] != "years").any())
    lines = []
    for row in scores.itertuples(index=False):
        numbers = ("outputs not finite" if pd.isna(row.gender_acc) or pd.isna(row.age_mae)
                   else f"{row.gender_acc:.1%} · {row.age_mae:.2f}\u00a0y")  # no lone "y" on a line
        scale = (" · age " + {"years": "in years", "log": "in log-years"}.get(row.age_scale, row.age_scale.replace("x", "×"))
                 if show_scale else "")
        lines.append(f"`{row.preset}`{' ✓' if row.chosen else ''}: {numbers}{scale}")
    return lines


def overrides_ui(form_key: str, given: dict, output_names: list[str] | None) -> dict | None:
    """An override form; returns the submitted overrides (None values = infer), or None if not submitted.

    `given`: the overrides in force. `output_names`: the model's outputs to choose from, or None
    when the model did not load (then outputs are typed as a name or an index).
    """
    from analysis.models import PRESETS

    inferred = "auto"  # short: "(inferred)" was cut to "(inferre…" in the sidebar's half-width columns
    with st.form(key=form_key, border=False):
        presets = ["auto", *PRESETS]
        preprocessing = st.selectbox(
            "Preprocessing", presets, index=_index(presets, given.get("preprocessing", "auto")),
            help="auto: scores every preset on labelled images of the sample and keeps the best.",
        )
        left, right = st.columns(2)
        if output_names is None:
            age_output = left.text_input("Age output", str(given.get("age_output", "")), placeholder="name or index")
            gender_output = right.text_input("Gender output", str(given.get("gender_output", "")), placeholder="name or index")
        else:
            outputs = [inferred, *output_names]
            age_output = left.selectbox("Age output", outputs, index=_index(outputs, given.get("age_output")))
            gender_output = right.selectbox("Gender output", outputs, index=_index(outputs, given.get("gender_output")))
        female_index = left.selectbox(
            "Female index", [inferred, 0, 1], index=_index([inferred, 0, 1], given.get("female_index")),
            help="Which gender class means female (UTKFace: 1). For a single sigmoid, 0 means the output is P(male).",
        )
        age_kinds = [inferred, "regression", "classes"]
        age_kind = right.selectbox(
            "Age head", age_kinds, index=_index(age_kinds, given.get("age_kind")),
            help="classes: a softmax over ages; the prediction is the expected age.",
        )
        classes = given.get("age_class_values") or ()
        consecutive = bool(classes) and list(classes) == [float(v) for v in range(int(classes[0]), int(classes[-1]) + 1)]
        first_age = left.number_input("Age classes from", 0, 120, int(classes[0]) if consecutive else 0,
                                      help="Only for an age head over classes: one class per year, from … to.")
        last_age = right.number_input("…to (inclusive)", 0, 120, int(classes[-1]) if consecutive else 100)
        class_list = st.text_input(
            "…or the age of each class", ", ".join(f"{v:g}" for v in classes) if classes and not consecutive else "",
            key=f"{form_key}_class_ages", placeholder="e.g. 1, 6, 15, 25, 35, 45, 55, 75",
            help="For an age head over age groups: one age per class, in the model's order (e.g. the middle of "
                 "each group). Overrides from/to.",
        )
        scales = [inferred, *AGE_SCALES]
        if given.get("age_scale") and given["age_scale"] not in scales:
            scales.append(given["age_scale"])  # a multiplier typed earlier stays selectable
        age_scale = st.selectbox(  # full width: the columns' rows stay paired (height beside width)
            "Age scale", scales, index=_index(scales, given.get("age_scale")), accept_new_options=True,
            help="How a 1-unit age output gives years: years as they are, x100 / x116 for a model trained on "
                 "age/100 or age/116, log for log-years; type another multiplier (e.g. x80) for age/80. "
                 "auto: chosen on labelled images of the sample.",
        )
        size = given.get("input_size") or (0, 0)
        height = left.number_input("Input height", 0, 1024, int(size[0]), help="0 = the model's own size.")
        width = right.number_input("Input width", 0, 1024, int(size[1]))
        submitted = st.form_submit_button("Apply and reload", type="primary")
    if not submitted:
        return None
    problems = []
    listed = None
    if class_list.strip():
        try:
            listed = tuple(float(v) for v in class_list.replace(";", ",").split(",") if v.strip())
        except ValueError:
            problems.append(f"the age of each class must be numbers separated by commas, got “{class_list.strip()}”")
        if age_kind == inferred:
            age_kind = "classes"  # class ages say what the head is
        elif age_kind == "regression":
            problems.append("the age of each class applies to an age head over classes, not to a regression head")
    if age_kind == "classes" and listed is None and last_age <= first_age:
        problems.append(f"age classes from {first_age} to {last_age}: the last age must be above the first")
    if age_scale not in (None, inferred):
        try:
            age_scale = parse_age_scale(age_scale)
        except ModelLoadError as err:
            problems.append(str(err).replace("got ", "not "))
        if age_kind == "classes":
            problems.append("an age scale applies to a regression age head, not to one over classes")
    if bool(height) != bool(width):
        problems.append("give both the input height and width (or 0 for both: the model's own size)")
    if problems:  # refused as a whole: nothing half-applied
        st.error("Not applied: " + "; ".join(problems) + ".")
        return None
    return {
        "preprocessing": preprocessing,
        "age_output": _output_choice(age_output, inferred),
        "gender_output": _output_choice(gender_output, inferred),
        "female_index": None if female_index == inferred else int(female_index),
        "age_kind": None if age_kind == inferred else age_kind,
        "age_scale": None if age_scale in (None, inferred) else age_scale,
        "age_class_values": listed if age_kind == "classes" and listed
        else tuple(float(v) for v in range(int(first_age), int(last_age) + 1)) if age_kind == "classes" and last_age > first_age
        else None,
        "input_size": (int(height), int(width)) if height and width else None,
    }


def _output_choice(value, inferred: str):
    """An output name, an index (typed digits), or None for "infer it"."""
    text = str(value).strip()
    if text in ("", inferred):
        return None
    return int(text) if text.isdigit() else text


def _index(options: list, value) -> int:
    return options.index(value) if value in options else 0
