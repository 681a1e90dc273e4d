"""Errors: a gallery of the worst cases, each with the face, the truth, both models' answers and
Grad-CAM overlays showing where the chosen model looked for the chosen head."""

from dataclasses import dataclass

import numpy as np
import streamlit as st

from analysis import gradcam
from analysis.metrics import LABEL_CHECK_CONFIDENCE

from app import gallery, layout, state

CARDS_PER_ROW = 2
CARD_IMAGE_WIDTH = 128  # pixels on screen: the face and two overlays side by side in half the page
# "<head>_own": per face, the direction of the model's own answer (as in the report's Grad-CAM
# grids): the gender it gave; older where it over-estimated the age, younger where it under-estimated.
OWN_ANSWER = {"gender_own": "gender", "age_own": "age"}
TARGET_LABELS = {
    "gender_own": "Gender: evidence for the gender it gave",
    "age_own": "Age: evidence for its error (older or younger)",
    "age_older": "Age: evidence for older",
    "age_younger": "Age: evidence for younger",
    "gender_female": "Gender: evidence for female",
    "gender_male": "Gender: evidence for male",
}


@dataclass
class GalleryFilter:
    kind: str
    model: str
    slice_label: str
    min_error: float
    k: int


@dataclass
class GradcamChoice:
    models: list[str]  # whose overlays to show
    target: str
    layers: dict[str, str]  # model -> layer


def gallery_filter_ui(current) -> GalleryFilter:
    evaluation = current.evaluation
    slots = list(evaluation.models)
    kinds = [k for k in gallery.ERROR_KINDS if len(slots) == 2 or k not in gallery.TWO_MODEL_KINDS]
    options = state.slice_filter_options(current.run_key, evaluation.predictions)
    for key, offered in (("error_kind", kinds), ("error_model", slots), ("error_slice", list(options))):
        layout.forget_stale_choice(key, offered)
    kind = st.segmented_control(
        "Error type", kinds, format_func=gallery.ERROR_KINDS.get, key="error_kind", required=True, default="age"
    )
    first, second = st.columns([1, 1])
    model = first.segmented_control(
        "Model", slots, format_func=lambda s: f"{s}: {evaluation.models[s].name}", key="error_model",
        required=True, default=slots[0], disabled=kind == "contradicted",  # every model judges those labels
        help="Whose errors to rank (for the two-model types: whose confidence orders the cases).",
    )
    slice_label = second.selectbox("Slice", list(options), format_func=options.get, key="error_slice")
    third, fourth = st.columns([3, 1])
    min_error = third.slider(
        "Minimum age error (years)", 0, 60, 0, key="error_min",
        help="Drops age cases below it (for 'Models disagree': the age gap between the models). Gender and contradicted-label cases stay.",
    )
    k = fourth.selectbox("Cases", [6, 12, 24], index=0, key="error_k")
    return GalleryFilter(kind or "age", model or slots[0], slice_label, float(min_error), int(k))


def gradcam_ui(current, kind: str) -> GradcamChoice | None:
    evaluation = current.evaluation
    slots = list(evaluation.models)
    layout.forget_stale_choice("gradcam_models", slots)
    with st.expander("Grad-CAM: where the model looked", expanded=True):
        left, middle = st.columns([1, 2])
        shown = left.segmented_control(
            "Overlays for", slots, selection_mode="multi", default=slots, key="gradcam_models"
        )
        default_target = "gender_own" if kind in ("gender", "contradicted") else "age_own"
        target = middle.selectbox(
            "Head and direction", list(TARGET_LABELS), index=list(TARGET_LABELS).index(default_target),
            format_func=TARGET_LABELS.get, key=f"gradcam_target_{kind}",
            help="Grad-CAM highlights the regions that push this output up: e.g. 'evidence for older' "
            "shows what made the model's age estimate higher. The first two explain each model's own answer "
            "on each face, as the report's Grad-CAM grids do.",
        )
        head_target = {"gender_own": "gender_female", "age_own": "age_older"}.get(target, target)  # same layers
        layers = {}
        columns = st.columns(max(1, len(shown or [])))
        for column, slot in zip(columns, shown or []):
            loaded = evaluation.models[slot]
            candidates, default = state.gradcam_layers(loaded.cache_key(), head_target, loaded)
            if not candidates:
                column.caption(f"{slot}: no convolutional layer feeds this head, so no Grad-CAM.")
                continue
            layers[slot] = column.selectbox(
                f"Layer of {slot}", candidates, index=candidates.index(default), key=f"gradcam_layer_{slot}_{head_target}",
                help="The last layers give coarse, meaningful maps; earlier ones are finer but less specific.",
            )
    if not shown:
        return None
    return GradcamChoice(list(layers), target, layers)


def render_gallery(current, rows, choice: GradcamChoice | None) -> None:
    evaluation = current.evaluation
    overlays = {}
    if choice is not None:
        ids, paths = np.array(rows["image_id"]), np.array(rows["path"])
        for slot in choice.models:
            loaded = evaluation.models[slot]
            if choice.target in OWN_ANSWER:
                targets = gradcam.own_answer_targets(rows, slot, OWN_ANSWER[choice.target])
            else:
                targets = [choice.target] * len(rows)

            def compute(target, chosen, slot=slot, loaded=loaded):
                return state.gradcam_overlays(loaded.cache_key(), target, choice.layers[slot],
                                              tuple(ids[chosen]), loaded, tuple(paths[chosen]))

            try:
                with st.spinner(f"Grad-CAM for model {slot}…"):
                    overlays[slot] = gradcam.by_target(targets, compute)
            except ValueError as exc:
                st.warning(f"No Grad-CAM for model {slot}: {exc}")
                continue
            if missing := sum(shown == "none" for _, shown in overlays[slot]):
                st.warning(f"Model {slot}: {gradcam.UNDEFINED_MAP} on {missing} of these {len(rows)} faces "
                           f"({gradcam.UNDEFINED_MAP_WHY}); they are shown grey.")
    for start in range(0, len(rows), CARDS_PER_ROW):
        columns = st.columns(CARDS_PER_ROW)
        for column, (i, row) in zip(columns, rows.iloc[start : start + CARDS_PER_ROW].iterrows()):
            with column:
                render_card(row, list(evaluation.models), {slot: maps[i] for slot, maps in overlays.items()})


# A card's caption under each model's overlay, by what it shows (state.gradcam_overlays).
_CAM_CAPTIONS = {"map": "{slot}: Grad-CAM", "no evidence": "{slot}: Grad-CAM, no evidence found",
                 "none": "{slot}: no Grad-CAM"}


def render_card(row, slots: list[str], overlays: dict) -> None:
    with st.container(border=True):
        images = [state.face_thumbnail(row["path"])] + [image for image, _ in overlays.values()]
        captions = ["face"] + [_CAM_CAPTIONS[shown].format(slot=slot) for slot, (_, shown) in overlays.items()]
        st.image(images, caption=captions, width=CARD_IMAGE_WIDTH)
        truth = f"**True:** {int(row['age'])} y · {gallery.gender_name(row['gender'])} · {gallery.ethnicity_name(row['ethnicity'])}"
        answers = [truth]
        for slot in slots:
            error = row[f"age_pred_{slot}"] - row["age"]
            p_female = row[f"p_female_{slot}"]
            predicted_gender = "female" if p_female >= 0.5 else "male"
            right = ":green[✓]" if row[f"gender_correct_{slot}"] else ":red[✗]"
            answers.append(
                f"**{slot}:** {row[f'age_pred_{slot}']:.1f} y ({error:+.1f}) · {predicted_gender} {right} "
                f"(P(female) {p_female:.2f})"
            )
        if bool(row.get("label_contradicted", False)):
            answers.append(f":orange[Label likely wrong: every model gives the other gender P ≥ {LABEL_CHECK_CONFIDENCE:g}.]")
        st.markdown("  \n".join(answers))
        st.caption(row["file_name"])


current = layout.require_evaluation()
st.title("Errors")
layout.render_setup_caption(current)
chosen = gallery_filter_ui(current)
try:
    cases, n_matching = state.gallery_rows(
        current.run_key, chosen.kind, chosen.model, chosen.slice_label, chosen.min_error, chosen.k,
        current.evaluation.predictions,
    )
except ValueError as exc:
    st.warning(str(exc))
    st.stop()
gradcam_choice = gradcam_ui(current, chosen.kind)
if cases.empty:
    st.info(gallery.NO_CASES.get(chosen.kind, gallery.NO_CASES_DEFAULT))
else:
    st.caption(f"The worst {len(cases)} of {n_matching:,} case(s) matching these filters." if n_matching > len(cases)
               else f"All {n_matching} case(s) matching these filters, worst first.")
    render_gallery(current, cases, gradcam_choice)
