"""The Streamlit dashboard, driven headlessly with streamlit.testing.v1.AppTest.

Every page on the built-in demo, filters, uploads (good and bad), two sessions side by side and the
export download. The app's pure helpers (uploads, gallery, wording) are tested directly at the end.
AppTest runs the app in this process, so Streamlit's caches carry over between tests: only the first
test pays for loading TensorFlow and predicting the demo sample.
"""

from __future__ import annotations

import io
import os
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.constants import AGE_BAND_EDGES, assign_age_bands

APP = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
TIMEOUT = 180  # seconds per script run: the first one imports TensorFlow and predicts the demo sample


# ---------------------------------------------------------------- fixtures and helpers


def _tiny_model(path: Path, *, mappable: bool = True, seed: int = 0) -> Path:
    """A 32×32 conv model with outputs `age` and `gender` (or two 1-unit linear outputs, `scores`
    and `other`, that nothing tells apart)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    if mappable:
        outputs = {
            "age": keras.layers.Dense(1, name="age", bias_initializer=keras.initializers.Constant(30.0))(x),
            "gender": keras.layers.Dense(1, activation="sigmoid", name="gender")(x),
        }
    else:
        outputs = [keras.layers.Dense(1, name="scores")(x), keras.layers.Dense(1, name="other")(x)]
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def demo_models(tmp_path_factory):
    """The committed demo models; tiny stand-ins (patched in) only while models/demo/ is empty."""
    import analysis.__main__ as cli

    if all((cli.DEMO_MODELS / f"age_gender_{key}.keras").exists() for key in "AB"):
        yield cli.DEMO_MODELS
        return
    folder = tmp_path_factory.mktemp("demo_models")
    for seed, key in enumerate("AB"):
        _tiny_model(folder / f"age_gender_{key}.keras", seed=seed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "DEMO_MODELS", folder)
        yield folder


@pytest.fixture(scope="module", autouse=True)
def _unfreeze_gc_afterwards():
    """The app gc.freeze()s the objects alive after its first evaluation (see app.state); give them
    back to the collector so the rest of the test session sees an ordinary heap."""
    import gc

    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("upload_models")
    return {
        "good": _tiny_model(folder / "my_model.keras", seed=5),
        "unmappable": _tiny_model(folder / "scores_only.keras", mappable=False),
    }


def new_app():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()


def uploader(at, name: str):
    """The uploader `name` (its key gets a new suffix each time an upload is accepted)."""
    rounds = at.session_state["upload_round"] if "upload_round" in at.session_state else {}
    return at.file_uploader(key=f"{name}_{rounds.get(name, 0)}")


def upload(at, name: str, file_name: str, data: bytes):
    uploader(at, name).set_value((file_name, data, "application/octet-stream"))
    return at.run()


def assert_clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def model_name(at, slot: str) -> str | None:
    choice = at.session_state["models"][slot]
    return None if choice is None else choice.name


def assert_headlines(at, n_models: int = 2) -> None:
    """The Overview shows gender accuracy and age MAE for each model."""
    labels = [m.label for m in at.metric]
    assert labels.count("Gender accuracy") == n_models and labels.count("Age MAE") == n_models, labels


def zip_with_names(names_and_bytes: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in names_and_bytes.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def declared_zip_bomb() -> bytes:
    """A tiny zip whose central directory claims ~8 GB of images (over the 4 GiB unpack limit)."""
    data = bytearray(zip_with_names({f"2{i}_0_0_20170101.jpg": b"x" for i in range(2)}))
    start = 0
    while (position := data.find(b"PK\x01\x02", start)) != -1:
        data[position + 24 : position + 28] = (0xF0000000).to_bytes(4, "little")  # uncompressed size
        start = position + 4
    return bytes(data)


# ---------------------------------------------------------------- the demo and every page


def test_demo_opens_on_the_overview_and_says_it_is_a_demo():
    at = new_app()
    assert_clean(at)
    assert "built-in demo" in texts(at.info) and "Held-out sample" in texts(at.info)
    assert_headlines(at)
    markdown = texts(at.markdown)
    assert "A vs B on the same images" in markdown
    assert "on age" in markdown and "Wilcoxon" in markdown and "on gender" in markdown and "McNemar" in markdown
    assert "Worst slices" in markdown and "Calibration" in markdown
    assert "300 images read · 0 skipped" in texts(at.sidebar.caption)
    assert model_name(at, "A") == "demo A" and model_name(at, "B") == "demo B"
    # each model's ECE with its interval around it
    found = re.findall(r"ECE ([AB]): (\d\.\d{3}) \[(\d\.\d{3}), (\d\.\d{3})\]", texts(at.caption))
    assert [k for k, *_ in found] == ["A", "B"]
    assert all(float(lo) <= float(value) < float(hi) for _, value, lo, hi in found)


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("views/slices.py", "Fairness gaps"),
        ("views/errors.py", "True:"),
        ("views/export.py", "Report bundle"),
    ],
)
def test_every_page_renders_on_the_demo(page, expected):
    at = new_app()
    at.switch_page(page).run()
    assert_clean(at)
    assert expected in texts(at.markdown)
    assert "built-in demo" in texts(at.info)


def test_filters_change_the_view_without_predicting_again(monkeypatch):
    import analysis.predict

    calls = []
    real = analysis.predict.predict_sample
    monkeypatch.setattr(analysis.predict, "predict_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    at = new_app()
    at.switch_page("views/slices.py").run()
    predicted = len(calls)
    at.button_group(key="slice_by").set_value("ethnicity").run()
    assert_clean(at)
    slice_rows = at.dataframe[0].value
    assert set(slice_rows["slice"]) <= {"White", "Black", "Asian", "Indian", "Others"}
    # accuracies in percent, B − A in percentage points (the same images), p-values as text
    accuracy = slice_rows.pivot(index="slice", columns="model", values="gender_acc")
    assert accuracy.max().max() > 1 and (accuracy <= 100).all().all()
    paired = at.dataframe[1].value.set_index("slice")
    np.testing.assert_allclose(paired["gender_acc_delta"], (accuracy["B"] - accuracy["A"]).loc[paired.index], atol=1e-9)
    assert all(p == "< 0.001" or 0.001 <= float(p) <= 1 for p in paired["wilcoxon_p"])  # never "0.000"
    at.toggle(key="hide_small").set_value(True).run()
    assert (at.dataframe[0].value["n"] >= 30).all()
    at.button_group(key="slice_by").set_value("age_band×gender").run()
    assert_clean(at)

    at.switch_page("views/errors.py").run()
    at.button_group(key="error_kind").set_value("gender").run()
    assert_clean(at)
    cards = [m.value for m in at.markdown if m.value.startswith("**True:**")]
    assert cards and all(":red[✗]" in card.split("**B:**")[0] for card in cards)  # A got each one wrong
    # the caption gives how many wrong answers A made in all, counted here from A's own predictions
    from analysis.dataset import load_image, load_sample
    from analysis.models import load_model

    sample = load_sample(at.session_state["sample"].source).sample
    model_a = load_model(Path(__file__).resolve().parents[1] / "models" / "demo" / "age_gender_A.keras")
    p_female = model_a.predict_batch(np.stack([load_image(p, model_a.input_size) for p in sample["path"]]))[1]
    n_wrong = int(((p_female >= 0.5).astype(int) != sample["gender"]).sum())
    assert f"of {n_wrong:,} case(s) matching" in texts(at.caption) or f"All {n_wrong} case(s)" in texts(at.caption)
    at.selectbox(key="error_slice").set_value("gender=female").run()
    cards = [m.value for m in at.markdown if m.value.startswith("**True:**")]
    assert all("· female ·" in card.split("\n")[0] for card in cards)
    at.button_group(key="error_kind").set_value("age").run()
    at.slider(key="error_min").set_value(60).run()
    assert_clean(at)
    assert len(calls) == predicted  # no model ran for any of these reruns


def test_errors_page_shows_gradcam_overlays_with_a_selectable_layer(monkeypatch):
    from app import state

    calls = []
    real = state.gradcam_overlays
    monkeypatch.setattr(state, "gradcam_overlays", lambda key, target, layer, ids, loaded, paths: calls.append(
        (Path(loaded.path).name, target, {Path(p).name for p in paths})) or real(key, target, layer, ids, loaded, paths))
    at = new_app()
    at.switch_page("views/errors.py").run()
    images = at.get("image")
    assert images, "no images on the Errors page"
    captions = [caption for element in images for caption in element.captions]
    assert "A: Grad-CAM" in captions and "B: Grad-CAM" in captions
    # by default each overlay explains the model's own answer on that face, as the report's grids do:
    # "older" for the faces whose card shows A over-estimating, "younger" for the others
    assert at.selectbox(key="gradcam_target_age").value == "age_own"
    cards = {caption.value: card.value for caption, card in zip(
        [c for c in at.caption if c.value.endswith(".jpg")], [m for m in at.markdown if m.value.startswith("**True:**")])}
    over = {name for name, card in cards.items() if not card.split("**A:**")[1].split("(")[1].startswith("-")}
    asked = {}
    for model, target, names in calls:
        if model == "age_gender_A.keras":
            asked.setdefault(target, set()).update(names)
    assert cards and asked.get("age_older", set()) == over and asked.get("age_younger", set()) == set(cards) - over
    layer_a = at.selectbox(key="gradcam_layer_A_age_older")
    assert layer_a.value == layer_a.options[-1]  # the default is the last feature map
    layer_a.set_value(layer_a.options[0]).run()
    assert_clean(at)
    at.selectbox(key="gradcam_target_age").set_value("gender_female").run()
    assert_clean(at)
    at.segmented_control(key="error_kind").set_value("gender").run()
    assert_clean(at)
    assert at.selectbox(key="gradcam_target_gender").value == "gender_own"


# ---------------------------------------------------------------- uploads, paths and bad inputs


def test_upload_a_model_into_slot_a(model_files):
    at = new_app()
    upload(at, "model_A", "my_model.keras", model_files["good"].read_bytes())
    assert_clean(at)
    assert model_name(at, "A") == "my_model.keras"
    assert "Loaded my_model.keras as model A" in texts(at.sidebar.success)
    assert_headlines(at)
    assert "my_model.keras" in texts(at.markdown)
    assert "This is the built-in demo" not in texts(at.info)
    assert "Partly the built-in demo:** the sample and model B are" in texts(at.info)


def test_candidate_becomes_b_and_swap_exchanges_the_models(model_files):
    at = new_app()
    upload(at, "candidate", "candidate.keras", model_files["good"].read_bytes())
    assert_clean(at)
    assert model_name(at, "B") == "candidate.keras" and model_name(at, "A") == "demo A"
    assert "compared against baseline A (demo A)" in texts(at.sidebar.success)
    at.button(key="swap").click().run()
    assert_clean(at)
    assert model_name(at, "A") == "candidate.keras" and model_name(at, "B") == "demo A"
    at.button(key="remove_B").click().run()
    assert_clean(at)
    assert model_name(at, "B") is None
    assert_headlines(at, n_models=1)
    assert "Load a model B" in texts(at.caption)


def test_a_model_evaluated_on_its_own_training_images_is_warned_about(demo_models, synthetic_dir, tmp_path):
    """A model folder written by python -m training has split_A.csv: the Overview warns when the
    sample holds images the model was trained or validated on (matched by content hash)."""
    import hashlib
    import shutil

    folder = tmp_path / "trained"
    folder.mkdir()
    shutil.copy(Path(demo_models) / "age_gender_A.keras", folder / "age_gender_A.keras")
    files = sorted(Path(synthetic_dir).iterdir())
    ids = [hashlib.sha1(f.read_bytes()).hexdigest() for f in files[:15]]
    pd.DataFrame({"image_id": ids, "file_name": [f.name for f in files[:15]],
                  "subset": ["train"] * 10 + ["val"] * 5, "left_out": False}).to_csv(folder / "split_A.csv", index=False)
    at = new_app()
    at.text_input(key="path_A_0").input(str(folder / "age_gender_A.keras")).run()
    at.text_input(key="sample_path_0").input(str(synthetic_dir)).run()
    assert_clean(at)
    assert f"Model A was trained on 10 and validated on 5 of these {len(files)} images" in texts(at.warning)
    assert "Model B was" not in texts(at.warning)  # the demo B has no split file


def test_learning_curves_and_the_age_scatter_are_on_the_pages():
    """The demo models have history_A/B.csv beside them: the Overview shows their curves; the
    predicted-vs-true scatter sits with the age error by true age on Slices."""
    def chart_specs(at) -> list[str]:
        return [e.proto.spec for e in at.main if getattr(e, "type", None) == "vega_lite_chart"]

    at = new_app()
    assert "Training: learning curves of model A and B" in [e.label for e in at.expander]
    assert any('"Learning curves"' in spec or "learning curves" in spec.lower() for spec in chart_specs(at))
    at.switch_page("views/slices.py").run()
    assert_clean(at)
    assert any("Predicted age" in spec for spec in chart_specs(at))


def test_age_bands_can_be_chosen_in_settings(monkeypatch):
    """Other bands regroup every table without running a model; a bad list is refused, saying why."""
    import analysis.models

    at = new_app()
    calls = []
    real = analysis.models.LoadedModel.predict_batch
    monkeypatch.setattr(analysis.models.LoadedModel, "predict_batch", lambda self, x: calls.append(1) or real(self, x))
    at.text_input(key="age_bands_text").input("5,20").run()
    assert "Age bands not changed: age band edges must start at 0" in texts(at.sidebar.error)
    at.text_input(key="age_bands_text").input("0, 20, 40, 60").run()
    assert_clean(at)
    at.switch_page("views/slices.py").run()
    rows = at.dataframe[0].value
    assert set(rows["slice"]) == {"0–19", "20–39", "40–59", "60+"}
    # n per band, counted here from the sample's own names
    from analysis.dataset import load_sample

    ages = load_sample(at.session_state["sample"].source).sample["age"]
    expected = {"0–19": (ages < 20).sum(), "20–39": ((ages >= 20) & (ages < 40)).sum(),
                "40–59": ((ages >= 40) & (ages < 60)).sum(), "60+": (ages >= 60).sum()}
    assert rows[rows["model"] == "A"].set_index("slice")["n"].to_dict() == expected
    assert calls == []  # predictions came from the cache
    for same in ("0,20,40,60,", "0,020,40, 60"):  # the same bands typed otherwise: applied once, no rerun loop
        at.text_input(key="age_bands_text").input(same).run(timeout=30)
        assert_clean(at)
        assert at.session_state["age_band_edges"] == (0, 20, 40, 60)
    at.text_input(key="age_bands_text").input("0,3,10,20,30,40,50,60,70").run()
    assert at.session_state["age_band_edges"] == AGE_BAND_EDGES


def test_a_model_can_be_renamed_without_predicting_again(monkeypatch):
    import analysis.predict

    calls = []
    real = analysis.predict.predict_sample
    monkeypatch.setattr(analysis.predict, "predict_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    at = new_app()
    at.switch_page("views/export.py").run()  # its figures are built (and cached) under the old name
    predicted = len(calls)
    box = next(t for t in at.sidebar.text_input if t.key.startswith("label_A_"))
    box.input("custom  CNN ").run()  # stored as "custom CNN": once, not a rename on every rerun
    assert_clean(at)
    assert at.session_state["models"]["A"].label == "custom CNN"
    assert "shown as **custom CNN**" in texts(at.sidebar.markdown)
    assert len(calls) == predicted  # a name changes no prediction
    at.switch_page("views/overview.py").run()
    assert "Model A · custom CNN" in texts(at.markdown)  # the Overview's headline
    at.switch_page("views/export.py").run()
    assert_clean(at)
    specs = [e.proto.spec for e in at.main if getattr(e, "type", None) == "vega_lite_chart"]
    assert specs and any("custom CNN" in spec for spec in specs) and not any("demo A" in spec for spec in specs)
    # The name travels with the model, not the slot — also when both slots hold the same file
    # (their name boxes then differ only by slot, and a kept box renamed the model swapped in).
    at.text_input(key="path_B_0").input(at.session_state["models"]["A"].path).run()
    next(t for t in at.sidebar.text_input if t.key.startswith("label_B_")).input("second").run()
    at.button(key="swap").click().run()
    assert_clean(at)
    assert (at.session_state["models"]["A"].label, at.session_state["models"]["B"].label) == ("second", "custom CNN")
    at.button(key="swap").click().run()
    box = next(t for t in at.sidebar.text_input if t.key.startswith("label_A_"))
    box.input("").run()  # empty: back to the file name
    assert_clean(at)
    assert at.session_state["models"]["A"].label == ""


def test_model_and_sample_from_local_paths(model_files, synthetic_dir):
    at = new_app()
    at.text_input(key="path_B_0").input(str(model_files["good"])).run()
    assert_clean(at)
    assert model_name(at, "B") == "my_model.keras"
    at.text_input(key="sample_path_0").input(str(synthetic_dir)).run()
    assert_clean(at)
    assert "120 images read" in texts(at.sidebar.caption)
    assert "120 images evaluated" in texts(at.caption)
    at.text_input(key="sample_path_0").input("/no/such/folder").run()
    assert "sample not found" in texts(at.sidebar.error) and "still using" in texts(at.sidebar.error)
    assert "120 images evaluated" in texts(at.caption)  # the previous sample stays


def test_a_path_typed_again_after_remove_swap_or_demo_is_acted_on(model_files, synthetic_dir):
    at = new_app()
    at.text_input(key="path_B_0").input(str(model_files["good"])).run()
    assert model_name(at, "B") == "my_model.keras"
    at.button(key="remove_B").click().run()
    assert model_name(at, "B") is None
    at.text_input(key=f"path_B_{at.session_state['upload_round']['path_B']}").input(str(model_files["good"])).run()
    assert_clean(at)
    assert model_name(at, "B") == "my_model.keras"
    # Remove B, swap: A is empty and the Overview asks for a model A, not B.
    at.button(key="remove_B").click().run()
    at.button(key="swap").click().run()
    assert model_name(at, "A") is None and model_name(at, "B") == "demo A"
    assert "Load a model A" in texts(at.caption) and "Load a model B" not in texts(at.caption)
    # The sample: a folder, back to the demo (its box emptied), the same folder again.
    at.text_input(key="sample_path_0").input(str(synthetic_dir)).run()
    assert at.session_state["sample"].origin == "path"
    at.button(key="demo_sample").click().run()
    assert at.session_state["sample"].origin == "demo"
    box = at.text_input(key=f"sample_path_{at.session_state['upload_round']['sample_path']}")
    assert box.value == ""
    box.input(str(synthetic_dir)).run()
    assert_clean(at)
    assert at.session_state["sample"].origin == "path" and "120 images read" in texts(at.sidebar.caption)


def test_a_sample_no_image_of_which_decodes_is_refused_and_the_models_keep_working(tmp_path, synthetic_dir):
    folder = tmp_path / "broken"
    folder.mkdir()
    for source in sorted(Path(synthetic_dir).iterdir())[:3]:
        data = source.read_bytes()
        (folder / source.name).write_bytes(data[: len(data) // 2])  # truncated: the header still reads
    at = new_app()
    at.text_input(key="sample_path_0").input(str(folder)).run()
    assert_clean(at)
    errors = texts(at.sidebar.error)
    assert "none of its 3 images can be decoded" in errors and "still using" in errors
    assert at.session_state["sample"].origin == "demo"
    assert model_name(at, "A") == "demo A" and "Could not use" not in errors
    assert_headlines(at)


def test_gender_labels_both_models_contradict_are_pointed_out_and_shown(tmp_path, synthetic_dir, demo_models):
    """Four labels flipped where both demo models are sure of the truth: the Overview counts the
    labels both contradict (counted here from the models' own predictions) and Errors lists them."""
    import shutil

    from analysis.dataset import load_image
    from analysis.models import load_model

    files = sorted(Path(synthetic_dir).iterdir())
    genders = np.array([int(f.name.split("_")[1]) for f in files])
    p_female = {}
    for key in "AB":
        loaded = load_model(Path(demo_models) / f"age_gender_{key}.keras")
        p_female[key] = loaded.predict_batch(np.stack([load_image(f, loaded.input_size) for f in files]))[1]
    p_true = np.minimum(*[np.where(genders == 1, p, 1 - p) for p in p_female.values()])
    flip = np.argsort(-p_true, kind="stable")[:4]
    assert p_true[flip].min() >= 0.99, "the demo models are no longer sure of any four faces"
    folder = tmp_path / "flipped"
    folder.mkdir()
    new_genders = genders.copy()
    new_genders[flip] = 1 - genders[flip]
    flipped_names = set()
    for i, source in enumerate(files):
        age, _, rest = source.name.split("_", 2)
        name = f"{age}_{new_genders[i]}_{rest}"
        shutil.copy(source, folder / name)
        if i in flip:
            flipped_names.add(name)
    p_other = np.minimum(*[np.where(new_genders == 1, 1 - p, p) for p in p_female.values()])
    expected = int((p_other >= 0.95).sum())
    assert expected >= 4

    at = new_app()
    at.text_input(key="sample_path_0").input(str(folder)).run()
    assert_clean(at)
    note = texts(at.info)
    assert f"{expected} gender labels ({expected / len(files):.1%} of the images) are contradicted by both models" in note
    at.switch_page("views/errors.py").run()
    at.segmented_control(key="error_kind").set_value("contradicted").run()
    assert at.segmented_control(key="error_model").disabled  # every model judges these labels
    at.selectbox(key="error_k").set_value(24).run()
    assert_clean(at)
    shown = {str(c.value) for c in at.caption} & {f.name for f in folder.iterdir()}
    assert flipped_names <= shown and len(shown) == expected
    # A slice without any: the page says so instead of suggesting a lower minimum error.
    from app import gallery

    bands = np.asarray(assign_age_bands([int(f.name.split("_")[0]) for f in files]).astype(str))
    clean_band = next(band for band in pd.unique(bands) if not (p_other[bands == band] >= 0.95).any())
    at.selectbox(key="error_slice").set_value(f"age_band={clean_band}").run()
    assert_clean(at)
    assert gallery.NO_CASES["contradicted"] in texts(at.info)
    # Among model A's wrong gender answers, the cards of those labels say the label is likely wrong.
    at.selectbox(key="error_slice").set_value(gallery.ALL_IMAGES).run()
    at.segmented_control(key="error_kind").set_value("gender").run()
    assert_clean(at)
    cards = [m.value for m in at.markdown if "**True:**" in m.value]
    assert len(cards) > expected
    assert sum("Label likely wrong: every model gives the other gender P ≥ 0.95." in c for c in cards) == expected


def test_an_upload_error_names_the_uploaded_file_not_the_cache(tmp_path):
    at = new_app()
    upload(at, "sample_zip", "holiday.zip", zip_with_names({"readme.txt": b"no faces here"}))
    errors = texts(at.sidebar.error)
    assert "holiday.zip" in errors and "uploads" not in errors, errors


def test_a_model_with_an_upper_case_suffix_loads(model_files):
    at = new_app()
    upload(at, "model_B", "MY_MODEL.KERAS", model_files["good"].read_bytes())
    assert_clean(at)
    assert model_name(at, "B") == "MY_MODEL.KERAS", texts(at.sidebar.error)


def test_upload_a_zipped_sample(synthetic_dir):
    at = new_app()
    files = {f"faces/{p.name}": p.read_bytes() for p in sorted(Path(synthetic_dir).iterdir())[:60]}
    files["faces/badly named.jpg"] = files[next(iter(files))]  # a face whose name carries no labels
    upload(at, "sample_zip", "faces.zip", zip_with_names(files))
    assert_clean(at)
    assert "60 images read · 1 skipped" in texts(at.sidebar.caption)
    assert "60 images evaluated" in texts(at.caption)
    assert at.session_state["sample"].origin == "upload"
    at.button(key="demo_sample").click().run()
    assert "300 images read" in texts(at.sidebar.caption)


def test_skipped_files_are_named_by_their_path_in_the_sample(synthetic_dir, tmp_path):
    """The table showed bare names: a copy in a second folder read "X — byte-identical to X"."""
    import shutil

    folder = tmp_path / "faces"
    shutil.copytree(synthetic_dir, folder / "UTKFace")
    first = sorted((folder / "UTKFace").iterdir())[0]
    (folder / "crop_part1").mkdir()
    shutil.copy(first, folder / "crop_part1" / first.name)
    at = new_app()
    at.text_input(key="sample_path_0").input(str(folder)).run()
    assert "120 images read · 1 skipped" in texts(at.sidebar.caption)
    table = next(frame.value for frame in at.sidebar.dataframe if "reason" in frame.value.columns)
    assert table.values.tolist() == [[f"crop_part1/{first.name}", f"duplicate: byte-identical to UTKFace/{first.name} (same labels)"]]


def test_a_folder_can_be_chosen_again_after_a_zip_replaced_it(synthetic_dir):
    """Folder, then a zip upload, then the same folder typed again: the path box was left showing
    the folder and typing the same path did nothing."""
    at = new_app()
    at.text_input(key="sample_path_0").input(str(synthetic_dir)).run()
    assert "120 images read" in texts(at.sidebar.caption)
    files = {f"faces/{p.name}": p.read_bytes() for p in sorted(Path(synthetic_dir).iterdir())[:40]}
    upload(at, "sample_zip", "faces.zip", zip_with_names(files))
    assert "40 images read" in texts(at.sidebar.caption)
    box = at.text_input(key=f"sample_path_{at.session_state['upload_round']['sample_path']}")
    assert box.value == ""  # the folder is no longer the sample
    box.input(str(synthetic_dir)).run()
    assert_clean(at)
    assert "120 images read" in texts(at.sidebar.caption)


@pytest.mark.parametrize(
    ("target", "file_name", "content", "message"),
    [
        ("model_A", "junk.keras", b"\x00\x01 not a model at all", "is not a Keras model"),
        ("model_A", "weights.h5", b"hello, I am text", "not an HDF5 file"),
        ("model_A", "faces.txt", b"some text", "is not a model file"),
        ("candidate", "notes.keras", zip_with_names({"a.txt": b"x"}), "not a Keras model"),
        ("sample_zip", "faces.txt", b"some text", "is not a .zip file"),
        ("sample_zip", "corrupt.zip", b"PK\x03\x04" + bytes(range(256)) * 4, "zip"),
        ("sample_zip", "bomb.zip", declared_zip_bomb(), "would unpack to"),
        ("sample_zip", "empty.zip", b"", "is empty"),
    ],
    ids=["random-bytes", "text-as-h5", "wrong-type-model", "zip-without-config", "wrong-type-sample",
         "corrupt-zip", "zip-bomb", "empty-file"],
)
def test_a_bad_upload_shows_a_message_in_place_and_keeps_what_was_loaded(target, file_name, content, message):
    at = new_app()
    upload(at, target, file_name, content)
    assert_clean(at)
    errors = texts(at.sidebar.error)
    assert message in errors, errors
    assert model_name(at, "A") == "demo A" and model_name(at, "B") == "demo B"
    assert "300 images read" in texts(at.sidebar.caption)
    assert_headlines(at)


def test_an_unmappable_model_can_be_retried_with_overrides(model_files):
    at = new_app()
    upload(at, "model_B", "scores_only.keras", model_files["unmappable"].read_bytes())
    assert_clean(at)
    errors = texts(at.sidebar.error)
    assert "No output looks like gender" in errors and "still demo B" in errors
    assert "Retry form below" in errors and "--age-output-a" not in errors  # the app's way, not the CLI's
    assert model_name(at, "B") == "demo B"
    assert_headlines(at)
    # The retry form for the failed file is offered; a second failure is explained the same way.
    retry = [b for b in at.sidebar.button if b.label == "Apply and reload"]
    assert len(retry) == 3  # the two loaded models' override forms and the Retry form
    at.sidebar.text_input[[t.label for t in at.sidebar.text_input].index("Age output")].input("scores")
    retry[-1].click().run()
    assert_clean(at)
    assert model_name(at, "B") == "demo B"
    assert at.session_state["pending"]["B"].overrides == (("age_output", "scores"),)


def test_no_retry_form_for_a_file_no_setting_can_mend(model_files, tmp_path):
    import keras

    inputs = keras.Input((8, 8, 3))
    single = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(inputs)))
    single.save(tmp_path / "packed.keras")
    whole = model_files["good"].read_bytes()
    for name, data in (("cut.keras", whole[: len(whole) // 2]), ("packed.keras", (tmp_path / "packed.keras").read_bytes())):
        at = new_app()
        upload(at, "model_B", name, data)
        assert_clean(at)
        assert texts(at.sidebar.error) and model_name(at, "B") == "demo B"
        assert "B" not in at.session_state["pending"], name
        # Only the override forms of the two loaded models, no Retry form (the unmappable model gets one).
        assert len([b for b in at.sidebar.button if b.label == "Apply and reload"]) == 2, name
    # The second time the same file is given, its remembered failure still says no retry can help.
    bad = tmp_path / "bad.keras"
    bad.write_text("not a model")
    at = new_app()
    for _ in range(2):
        at.text_input(key="path_B_0").input("").run()
        at.text_input(key="path_B_0").input(str(bad)).run()
        assert "bad.keras" in texts(at.sidebar.error) and "B" not in at.session_state["pending"]


def test_overrides_reload_the_model_with_the_given_preprocessing():
    at = new_app()
    # the demo models scale their input themselves: said so, not "chosen on the sample"
    assert "rgb_0_255 (from the model's own scaling layer)" in texts(at.sidebar.caption)
    form_selects = [s for s in at.sidebar.selectbox if s.label == "Preprocessing"]
    form_selects[0].set_value("rgb_0_1")
    [b for b in at.sidebar.button if b.label == "Apply and reload"][0].click().run()
    assert_clean(at)
    assert at.session_state["models"]["A"].overrides == (("preprocessing", "rgb_0_1"),)
    assert "loaded with preprocessing = rgb_0_1" in texts(at.sidebar.success)
    assert "rgb_0_1 (set by you)" in texts(at.sidebar.caption)
    assert_headlines(at)


def test_the_age_scale_can_be_given_and_is_shown():
    at = new_app()
    [s for s in at.sidebar.selectbox if s.label == "Age scale"][0].set_value("x100")
    [b for b in at.sidebar.button if b.label == "Apply and reload"][0].click().run()
    assert_clean(at)
    assert at.session_state["models"]["A"].overrides == (("age_scale", "x100"),)
    assert "age: regression `age` × 100" in texts(at.sidebar.caption)
    details = texts(at.sidebar.markdown)  # the details as lines, which wrap in the sidebar
    assert "- **set by you**: age_scale" in details and "- **age output**: age (regression, read as a fraction of 100 years" in details
    # Contradictory: a scale for an age head over classes.
    [s for s in at.sidebar.selectbox if s.label == "Age head"][1].set_value("classes")
    [s for s in at.sidebar.selectbox if s.label == "Age scale"][1].set_value("log")
    [b for b in at.sidebar.button if b.label == "Apply and reload"][1].click().run()
    assert "an age scale applies to a regression age head" in texts(at.sidebar.error)
    assert at.session_state["models"]["B"].overrides == ()


def _type_new_option(select, text: str):
    """What the browser sends when a new option is typed into a selectbox that accepts them (the
    test driver only knows the listed options)."""
    select.options.append(text)
    return select.set_value(text)


def test_any_age_multiplier_can_be_typed_and_a_bad_one_is_refused():
    """The CLI takes any multiplier (--age-scale-a x80); the form offered only years/x100/x116/log."""
    at = new_app()
    _type_new_option([s for s in at.sidebar.selectbox if s.label == "Age scale"][0], "×80")
    [b for b in at.sidebar.button if b.label == "Apply and reload"][0].click().run()
    assert_clean(at)
    assert at.session_state["models"]["A"].overrides == (("age_scale", "x80"),)
    assert "age: regression `age` × 80 (set by you)" in texts(at.sidebar.caption)
    again = [s for s in at.sidebar.selectbox if s.label == "Age scale"][0]
    assert again.value == "x80" and "x80" in again.options  # the typed value stays selected
    _type_new_option(again, "eighty")
    [b for b in at.sidebar.button if b.label == "Apply and reload"][0].click().run()
    assert "positive multiplier such as 100 or 116, not 'eighty'" in texts(at.sidebar.error)
    assert at.session_state["models"]["A"].overrides == (("age_scale", "x80"),)  # nothing half-applied


def test_the_preprocessing_scores_fit_the_sidebar():
    """A three-column table was cut at the MAE column in the sidebar's expander: lines wrap."""
    from app.sidebar import score_lines

    scores = pd.DataFrame({"preset": ["rgb_0_1", "rgb_0_255", "bgr_0_255"], "gender_acc": [0.5, 0.984375, np.nan],
                           "age_mae": [30.0, 6.5612, np.nan], "age_scale": ["years"] * 3, "combined_rank": [2.0, 1.0, 3.0],
                           "inside": [False, True, False], "chosen": [False, True, False]})
    assert score_lines(scores) == ["`rgb_0_1`: 50.0% · 30.00\u00a0y", "`rgb_0_255` ✓: 98.4% · 6.56\u00a0y",
                                   "`bgr_0_255`: outputs not finite"]
    scores.loc[1, "age_scale"] = "x100"  # a reading other than years is worth saying, for every preset
    assert score_lines(scores)[:2] == ["`rgb_0_1`: 50.0% · 30.00\u00a0y · age in years",
                                       "`rgb_0_255` ✓: 98.4% · 6.56\u00a0y · age ×100"]


def test_an_age_head_over_groups_is_mended_with_the_age_of_each_class(tmp_path):
    """The form only offered consecutive years (from … to): 8 groups loaded as ages 1…8, MAE 29."""
    import keras

    inputs = keras.Input((64, 64, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    groups = keras.Model(inputs, {"age_group": keras.layers.Dense(8, activation="softmax", name="age_group")(x),
                                  "gender": keras.layers.Dense(1, activation="sigmoid", name="gender")(x)})
    groups.save(tmp_path / "groups.keras")
    at = new_app()
    upload(at, "model_B", "groups.keras", (tmp_path / "groups.keras").read_bytes())
    assert_clean(at)
    errors = texts(at.sidebar.error)
    assert "has 8 classes and their ages are unknown" in errors and "“…or the age of each class”" in errors
    assert "--age-classes" not in errors  # the app's way, not the command line's
    # A failed retry says why at once (it showed the previous message until the next rerun).
    [s for s in at.sidebar.selectbox if s.label == "Age head"][-1].set_value("classes")
    [b for b in at.sidebar.button if b.label == "Apply and reload"][-1].click().run()
    assert "101 age class values were given but 'age_group' has 8 classes" in texts(at.sidebar.error)
    ages = "1, 6, 15, 25, 35, 45, 55, 75"
    next(t for t in at.sidebar.text_input if t.key == "retry_B_class_ages").input(ages)
    [b for b in at.sidebar.button if b.label == "Apply and reload"][-1].click().run()
    assert_clean(at)
    assert model_name(at, "B") == "groups.keras", texts(at.sidebar.error)
    assert dict(at.session_state["models"]["B"].overrides)["age_class_values"] == (1, 6, 15, 25, 35, 45, 55, 75)
    assert "age: classes `age_group` (set by you)" in texts(at.sidebar.caption)


def test_notes_worth_reading_are_shown_under_the_model(model_files):
    at = new_app()
    [s for s in at.sidebar.selectbox if s.label == "Age scale"][0].set_value("x100")
    [b for b in at.sidebar.button if b.label == "Apply and reload"][0].click().run()
    captions = texts(at.sidebar.caption)
    assert "age: regression `age` × 100 (set by you)" in captions
    # The demo models' notes are all routine: none is repeated under the summary line.
    assert ":orange[●]" not in captions
    # A model read as giving P(male) says so under its summary, not only inside the expander.
    from models_zoo import heads_model

    folder = model_files["good"].parent
    heads_model((64, 64, 3), gender_name="is_male", rescaling=(1 / 255, 0), seed=4).save(folder / "male.keras")
    upload(at, "model_B", "male.keras", (folder / "male.keras").read_bytes())
    assert_clean(at)
    captions = texts(at.sidebar.caption)
    assert ":orange[●] assumed the sigmoid 'is_male' gives P(male)" in captions
    assert "override with Female index = 1 in the override form" in captions and "--female-index" not in captions


def test_contradictory_overrides_are_refused_whole_with_a_message():
    at = new_app()
    [s for s in at.sidebar.selectbox if s.label == "Age head"][0].set_value("classes")
    [n for n in at.sidebar.number_input if n.label == "Age classes from"][0].set_value(50)
    [n for n in at.sidebar.number_input if n.label == "…to (inclusive)"][0].set_value(20)
    [b for b in at.sidebar.button if b.label == "Apply and reload"][0].click().run()
    assert_clean(at)
    assert "the last age must be above the first" in texts(at.sidebar.error)
    assert at.session_state["models"]["A"].overrides == ()  # nothing half-applied
    [s for s in at.sidebar.selectbox if s.label == "Age head"][0].set_value("regression")
    at.text_input(key="overrides_A_class_ages").input("1, 6, 15")
    [b for b in at.sidebar.button if b.label == "Apply and reload"][0].click().run()
    assert "the age of each class applies to an age head over classes" in texts(at.sidebar.error)
    assert at.session_state["models"]["A"].overrides == ()
    [n for n in at.sidebar.number_input if n.label == "Input height"][0].set_value(64)
    [b for b in at.sidebar.button if b.label == "Apply and reload"][0].click().run()
    assert "give both the input height and width" in texts(at.sidebar.error)
    assert at.session_state["models"]["A"].overrides == ()
    assert_headlines(at)


def test_two_sessions_do_not_see_each_others_uploads(model_files):
    from analysis.dataset import default_cache_dir

    first, second = new_app(), new_app()
    upload(first, "model_A", "my_model.keras", model_files["good"].read_bytes())
    second.run()
    assert model_name(first, "A") == "my_model.keras"
    assert model_name(second, "A") == "demo A"
    first_id, second_id = first.session_state["session_id"], second.session_state["session_id"]
    assert first_id != second_id
    saved = Path(first.session_state["models"]["A"].path)
    assert saved.is_relative_to(default_cache_dir() / "uploads" / first_id)
    assert not (default_cache_dir() / "uploads" / second_id).exists()


def test_without_demo_models_the_app_explains_how_to_start(tmp_path, monkeypatch):
    import analysis.__main__ as cli

    monkeypatch.setattr(cli, "DEMO_MODELS", tmp_path)
    at = new_app()
    assert_clean(at)
    assert "No model to evaluate" in texts(at.error)
    assert model_name(at, "A") is None
    assert "No model. Drop a .keras or .h5 file" in texts(at.sidebar.caption)


# ---------------------------------------------------------------- export


def test_export_builds_and_serves_the_report_zip(monkeypatch):
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    served: dict[str, bytes] = {}
    real = MemoryMediaFileStorage.load_and_get_id

    def remember(self, path_or_data, mimetype, kind, filename=None):
        if filename:
            served[filename] = path_or_data
        return real(self, path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", remember)
    from streamlit.runtime.media_file_manager import MediaFileManager

    deferred: dict[str, object] = {}  # the figure files, rendered only when their button is clicked
    real_deferred = MediaFileManager.add_deferred

    def remember_deferred(self, data_callable, mimetype, coordinates, file_name=None, **kwargs):
        deferred[file_name] = data_callable
        return real_deferred(self, data_callable, mimetype, coordinates, file_name=file_name, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add_deferred", remember_deferred)
    at = new_app()
    at.switch_page("views/export.py").run()
    assert_clean(at)
    table_buttons = [b.label for b in at.get("download_button")]
    assert any(label.startswith("slices.csv") for label in table_buttons)
    assert any(label.startswith("predictions.csv · 300 rows") for label in table_buttons)
    assert pd.read_csv(io.BytesIO(served["slices.csv"]))["slice_by"].iloc[0] == "overall"
    shown = at.selectbox(key="export_figure").value
    assert not any(name.endswith((".png", ".svg")) for name in served)  # nothing rendered before a click
    assert deferred[f"{shown}.png"]()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = deferred[f"{shown}.svg"]().decode("utf-8")
    assert svg.lstrip().startswith("<svg") and "</svg>" in svg
    at.selectbox(key="export_figure").set_value("by_gender").run()
    by_gender = deferred["by_gender.svg"]().decode("utf-8")  # the figure now shown, not the first one
    assert "female" in by_gender and "female" not in svg

    at.toggle(key="bundle_gradcam").set_value(False).run()  # Grad-CAM grids are tested on the Errors page
    at.button(key="build_bundle").click().run()
    assert_clean(at)
    assert any(b.label.startswith("Download facecheck_report.zip") for b in at.get("download_button"))
    with zipfile.ZipFile(io.BytesIO(served["facecheck_report.zip"])) as archive:
        names = archive.namelist()
        provenance = next(n for n in names if n.endswith("provenance.json"))
        assert any(n.endswith("tables/slices.csv") for n in names)
        assert any(n.endswith(".png") for n in names)
        assert b"sample" in archive.read(provenance)


# ---------------------------------------------------------------- the pure helpers


def test_loader_notes_name_the_override_forms_fields_instead_of_options():
    from analysis.mapping import female_index_hint
    from app.state import app_note

    told_apart = ("outputs told apart on 64 labelled images, their names and shapes did not say: age 'dense_9', gender "
                  "'dense_7' (…); if that is wrong, say which is which with age_output= / --age-output-a and gender_output= / "
                  "--gender-output-a")
    assert app_note(told_apart).endswith(
        "if that is wrong, say which is which with the Age output and Gender output fields of the override form")
    assert app_note(f"assumed P(male); override with {female_index_hint(1)}").endswith(
        "override with Female index = 1 in the override form")
    assert app_note("or give age_scale= / --age-scale-a") == "or give the Age scale field of the override form"


def test_uploads_are_checked_and_kept_per_session(tmp_path):
    from app import uploads

    good = b"PK\x03\x04" + b"rest"
    first, second = "a" * 32, "b" * 32
    saved = uploads.save_upload(first, "sample", "../../etc/x y.zip", good)
    assert saved.path.parent.parent.parent == uploads.session_upload_dir(first)
    assert saved.path.name == "x_y.zip" and saved.path.read_bytes() == good
    again = uploads.save_upload(first, "sample", "x y.zip", good)
    assert again.path == saved.path and again.sha256 == saved.sha256
    other = uploads.save_upload(second, "sample", "x y.zip", good)
    assert other.path != saved.path and other.path.is_relative_to(uploads.session_upload_dir(second))
    with pytest.raises(ValueError, match="32 hex digits"):
        uploads.session_upload_dir("../../somewhere")
    with pytest.raises(uploads.UploadError, match="1,025 MB; the limit is 1 GB"):
        uploads.check_model_upload("big.keras", good, 1025 * 1024**2)
    uploads.check_model_upload("vgg16_with_top.keras", good, 530 * 1024**2)  # no error
    assert uploads.size_text(1024) == "1 GB" and uploads.size_text(300) == "300 MB"
    with pytest.raises(uploads.UploadError, match="no config.json"):
        uploads.save_upload(first, "model", "fake.keras", zip_with_names({"weights.bin": b"0"}))


def test_stale_upload_folders_are_pruned():
    from app import uploads

    old, fresh = uploads.session_upload_dir("c" * 32), uploads.session_upload_dir("d" * 32)
    for folder in (old, fresh):
        (folder / "model").mkdir(parents=True, exist_ok=True)
        (folder / "model" / "m.keras").write_bytes(b"x")
    past = time.time() - 3 * 24 * 3600
    for path in (old / "model" / "m.keras", old / "model", old):
        os.utime(path, (past, past))
    removed = uploads.prune_stale_uploads(max_age_hours=24)
    assert old in removed and not old.exists() and fresh.exists()


def _predictions(n: int = 400, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    table = pd.DataFrame(
        {
            "image_id": [f"{i:04d}" for i in range(n)],
            "path": [f"/faces/{i}.jpg" for i in range(n)],
            "file_name": [f"{i}.jpg" for i in range(n)],
            "age": rng.integers(1, 90, n),
            "gender": rng.integers(0, 2, n),
            "ethnicity": rng.integers(0, 5, n),
        }
    )
    table["age_band"] = assign_age_bands(table["age"])
    for key in "AB":
        table[f"age_pred_{key}"] = table["age"] + rng.normal(0, 10, n)
        table[f"p_female_{key}"] = np.clip(0.7 * table["gender"] + rng.uniform(0, 0.45, n), 0, 1)
    return table


def test_gallery_selects_the_cases_the_filters_describe():
    from app import gallery

    preds = _predictions()
    error_a = (preds["age_pred_A"] - preds["age"]).abs()
    wrong_a = (preds["p_female_A"] >= 0.5) != (preds["gender"] == 1)
    wrong_b = (preds["p_female_B"] >= 0.5) != (preds["gender"] == 1)

    age = gallery.select_cases(preds, kind="age", model="A", min_error=15, k=500)
    expected = error_a[error_a >= 15].sort_values(ascending=False, kind="stable")
    assert list(age["image_id"]) == list(preds.loc[expected.index, "image_id"])

    women = gallery.select_cases(preds, kind="gender", model="A", slice_label="gender=female", k=500)
    assert set(women["image_id"]) == set(preds.loc[wrong_a & (preds["gender"] == 1), "image_id"])

    both = gallery.select_cases(preds, kind="both_wrong", model="A", min_error=12, k=500)
    both_gender = both[both["both_gender_wrong"]]
    assert set(both_gender["image_id"]) == set(preds.loc[wrong_a & wrong_b, "image_id"])
    assert both["both_gender_wrong"].tolist() == sorted(both["both_gender_wrong"], reverse=True)
    age_part = both[~both["both_gender_wrong"]]
    assert (np.minimum(age_part["abs_age_err_A"], age_part["abs_age_err_B"]) >= 12).all()

    disagree = gallery.select_cases(preds, kind="disagree", model="A", min_error=5, k=500)
    gaps = (disagree["age_pred_A"] - disagree["age_pred_B"]).abs()
    assert ((disagree["disagreement"] == "gender") | (gaps >= 5)).all()

    # Gender labels both models contradict (P(other gender) >= 0.95 for each): three images made so
    # by hand, and one only model A contradicts, which is not listed.
    flagged = preds.copy()
    male = flagged.index[flagged["gender"] == 0]
    female = flagged.index[flagged["gender"] == 1]
    flagged.loc[male[:2], ["p_female_A", "p_female_B"]] = [[0.99, 0.97], [0.96, 0.995]]
    flagged.loc[female[:2], ["p_female_A", "p_female_B"]] = [[0.001, 0.02], [0.01, 0.2]]
    contradicted = gallery.select_cases(flagged, kind="contradicted", model="B", min_error=50, k=500)
    assert list(contradicted["image_id"]) == list(flagged.loc[[female[0], male[0], male[1]], "image_id"])
    in_slice = gallery.select_cases(flagged, kind="contradicted", model="A", slice_label="gender=male", k=500)
    assert list(in_slice["image_id"]) == list(flagged.loc[[male[0], male[1]], "image_id"])

    without_others = preds[preds["ethnicity"] != 4]
    assert gallery.select_cases(without_others, kind="age", model="A", slice_label="ethnicity=Others").empty

    options = gallery.slice_options(preds)
    assert options["all"] == "All images" and "age_band=20–29" in options and "ethnicity=Asian" in options
    # intersections, as on the Slices page: offered only where there are images, masked by hand here
    band = str(preds["age_band"].iloc[0])
    both = f"age_band={band}&gender=female"
    assert options[both] == f"{band} × female"
    by_hand = (preds["age_band"].astype(str) == band) & (preds["gender"] == 1)
    np.testing.assert_array_equal(gallery.slice_mask(preds, both), by_hand.to_numpy())
    cases = gallery.select_cases(preds, kind="age", model="A", slice_label=both, k=500)
    assert set(cases["image_id"]) == set(preds.loc[by_hand, "image_id"])
    assert all(gallery.slice_mask(preds, key).any() for key in options)
    with pytest.raises(ValueError, match="compares two models"):
        gallery.select_cases(preds.drop(columns=["age_pred_B", "p_female_B"]), kind="disagree", model="A")


def test_comparisons_read_as_plain_sentences():
    from app import wording

    row = {
        "age_mae_A": 8.2, "age_mae_B": 6.4, "age_mae_delta": -1.8, "age_mae_delta_lo": -2.3, "age_mae_delta_hi": -1.3,
        "wilcoxon_p": 0.0002, "gender_acc_A": 0.91, "gender_acc_B": 0.912, "gender_acc_delta": 0.002,
        "only_A_correct": 10, "only_B_correct": 11, "mcnemar_p": 0.83,
    }  # fmt: skip
    assert wording.age_comparison(row).startswith("**B is 1.80 years better on age** than A")
    assert "p < 0.001" in wording.age_comparison(row)
    gender = wording.gender_comparison(row)
    assert gender.startswith("No clear difference on gender: B is 0.2 points more accurate")
    assert "p = 0.830" in gender and "only A right on 10 images, only B on 11" in gender
    assert "95% CI" not in gender  # none given
    with_ci = wording.gender_comparison({**row, "gender_acc_delta_lo": -0.0153, "gender_acc_delta_hi": 0.0194})
    assert "only B on 11; 95% CI of B − A: -1.5 to +1.9 points)" in with_ci and "borderline" not in with_ci
    edge = wording.gender_comparison({**row, "gender_acc_delta": 0.055, "mcnemar_p": 0.065,
                                      "gender_acc_delta_lo": 0.004, "gender_acc_delta_hi": 0.109})
    assert edge.startswith("No clear difference") and edge.endswith("a borderline difference.")
    assert wording.ci_text(0.9, 0.95, "percent") == "95% CI 90.0%–95.0%"
    assert wording.slice_name("age_band×gender", "20–29 × female") == "age 20–29 × female"
    assert wording.slice_name("ethnicity", "Asian") == "Asian"


def test_a_tie_is_not_shown_as_a_gain():
    """"+0.0 points vs A" came with a green arrow when both models were equally right."""
    at = new_app()
    differing = [m.proto.color for m in at.metric if m.proto.delta]
    at.text_input(key="path_B_0").input(at.session_state["models"]["A"].path).run()
    assert_clean(at)
    tied = {m.proto.delta: m.proto.color for m in at.metric if m.proto.delta}
    assert set(tied) == {"+0.0 points vs A", "0.00 years vs A"}
    grey = type(at.metric[0].proto).MetricColor.Value("GRAY")
    assert set(tied.values()) == {grey} and grey not in differing
