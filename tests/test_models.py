"""Model loading: formats, sizes, output mappings, preprocessing, safety and bad files.

Models are tiny and built in code (tests/models_zoo.py). Expected numbers are recomputed here with
numpy from the raw Keras outputs, never taken from the code under test.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pandas as pd
import pytest
from keras import layers

from analysis.compat import ModelFileError
from analysis.models import (
    PRESETS,
    LoadedModel,
    ModelLoadError,
    OutputMapping,
    calibrate_preprocessing,
    check_age_scale,
    check_gender_convention,
    load_model,
)
from models_zoo import (
    depthwise_model,
    heads_model,
    preset_images,
    preset_model,
    save_keras2_h5,
)

RNG = np.random.default_rng(7)
KERAS215 = Path(__file__).parent / "data" / "keras215"  # files written by TensorFlow 2.15 (build.py there)
# Keras 3.15 + numpy 2 warn inside model.save (keras/src/backend/tensorflow/core.py); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def images_for(size, n=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *size, 3), dtype=np.uint8)


def raw(model, x_float):
    """The model's own outputs as a flat dict name → array, for independent recomputation."""
    out = model.predict_on_batch(np.asarray(x_float, np.float32))
    if isinstance(out, dict):
        return {k: np.asarray(v) for k, v in out.items()}
    out = out if isinstance(out, list) else [out]
    return {t._keras_history.operation.name: np.asarray(v) for t, v in zip(model.outputs, out)}


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def save(model, tmp_path, name="model.keras"):
    path = tmp_path / name
    model.save(path)
    return path


# ---------------------------------------------------------------- our own models, formats


@pytest.mark.parametrize("file_name", ["ours.keras", "ours.h5"])
def test_our_self_describing_model_needs_no_hints(tmp_path, file_name):
    model = heads_model((20, 24, 3), rescaling=(1 / 255, 0.0))
    path = save(model, tmp_path, file_name)
    loaded = load_model(path)
    assert load_model(path, name="my model").user_settings == ()  # the app names every model it loads

    assert loaded.name == "ours"
    assert loaded.input_size == (20, 24) and loaded.channels == 3
    assert loaded.preprocessing == "rgb_0_255" and loaded.preprocessing_inside
    m = loaded.mapping
    assert m.output_names == ("age", "gender")
    assert (m.age_output, m.gender_output) == (0, 1)
    assert (m.age_kind, m.gender_kind, m.female_index) == ("regression", "sigmoid", 1)
    assert not any("calibrat" in note for note in loaded.notes)

    images = images_for((20, 24))
    ages, p_female = loaded.predict_batch(images)
    expected = raw(model, images.astype(np.float32))  # raw 0–255 RGB into the original model
    np.testing.assert_allclose(ages, expected["age"][:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p_female, expected["gender"][:, 0], rtol=1e-5, atol=1e-6)
    assert ages.dtype == np.float32 and p_female.shape == (5,)


def test_augmentation_layers_before_the_rescaling_do_not_hide_it(tmp_path):
    """Keras' newer augmentation layers (identity at inference) in front of a Rescaling(1/255):
    the model still wants 0–255 input. Before they were looked through, the loader fell back to
    feeding 0–1 pixels and a real Model A with RandomErasing went from 91% to 53%."""
    from keras import layers

    inputs = keras.Input((16, 16, 3), name="image")
    x = layers.RandomErasing(value_range=(0, 255))(inputs)
    x = layers.RandomGrayscale()(x)
    x = layers.RandomSaturation(0.2, value_range=(0, 255))(x)
    x = layers.RandomGaussianBlur(value_range=(0, 255))(x)
    x = layers.Rescaling(1 / 255)(x)
    features = layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3)(x))
    model = keras.Model(inputs, [layers.Dense(1, name="age")(features),
                                 layers.Dense(1, activation="sigmoid", name="gender")(features)])
    loaded = load_model(save(model, tmp_path))
    assert loaded.preprocessing == "rgb_0_255" and loaded.preprocessing_inside
    images = images_for((16, 16))
    expected = model.predict_on_batch(images.astype(np.float32))  # inference: the augmentation is off
    np.testing.assert_allclose(loaded.predict_batch(images)[1], expected[1][:, 0], rtol=1e-5, atol=1e-6)


def test_keras_and_keras3_h5_and_misnamed_files_agree(tmp_path):
    model = heads_model((16, 16, 3), container="list", age_name="age_output", gender_name="gender_output")
    paths = [save(model, tmp_path, "m.keras"), save(model, tmp_path, "m.h5")]
    # The right content under an unexpected extension still loads (the format is read from the bytes).
    (tmp_path / "m_keras.bin").write_bytes(paths[0].read_bytes())
    (tmp_path / "m_h5.model").write_bytes(paths[1].read_bytes())
    paths += [tmp_path / "m_keras.bin", tmp_path / "m_h5.model"]
    images = images_for((16, 16))
    results = []
    for path in paths:
        loaded = load_model(path, preprocessing="rgb_0_1")
        assert loaded.mapping.output_names == ("age_output", "gender_output")
        results.append(loaded.predict_batch(images))
    expected = raw(model, images / 255.0)
    for ages, p_female in results:
        np.testing.assert_allclose(ages, expected["age_output"][:, 0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(p_female, expected["gender_output"][:, 0], rtol=1e-5, atol=1e-6)
    formats = [load_model(p).file_format for p in paths[:2]]
    assert formats[0].startswith(".keras (Keras 3") and formats[1].startswith(".h5 (Keras 3")


@pytest.mark.parametrize(
    "shape",
    [(64, 64, 3), (128, 96, 3), (150, 200, 3), (224, 224, 3), (30, 20, 1)],
)
def test_input_size_and_channels_come_from_the_model(tmp_path, shape):
    loaded = load_model(save(heads_model(shape), tmp_path))
    assert loaded.input_size == shape[:2]
    assert loaded.channels == shape[2]
    x = loaded.prepare(images_for(shape[:2], n=2))
    assert x.shape == (2, *shape) and x.dtype == np.float32
    ages, p_female = loaded.predict_batch(images_for(shape[:2], n=2))
    assert ages.shape == p_female.shape == (2,)


def test_grey_model_gets_luma_then_scaling(tmp_path):
    model = heads_model((6, 5, 1))
    loaded = load_model(save(model, tmp_path), preprocessing="bgr_-1_1")
    images = images_for((6, 5), n=3)
    rgb = images.astype(np.float64)
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]  # ITU-R 601
    expected_input = (luma / 127.5 - 1)[..., None]
    np.testing.assert_allclose(loaded.prepare(images), expected_input, atol=1e-5)
    ages, _ = loaded.predict_batch(images)
    np.testing.assert_allclose(ages, raw(model, expected_input)["age"][:, 0], rtol=1e-5, atol=1e-5)
    # Calibration scores each grey input once: a BGR preset would repeat its RGB twin's row, and
    # "could not tell rgb_0_1 from bgr_0_1" was the advice that followed.
    (tmp_path / "auto").mkdir()
    auto = load_model(save(model, tmp_path / "auto"))
    calibrated, scores = calibrate_preprocessing(auto, images_for((6, 5), n=16), np.arange(16) * 5.0, np.arange(16) % 2)
    assert list(scores["preset"]) == ["rgb_0_255", "rgb_0_1", "rgb_-1_1", "bgr_caffe", "rgb_torch"]
    assert not any("from bgr_" in note for note in calibrated.notes)


def test_every_preset_scales_and_orders_channels_as_named(tmp_path):
    loaded = load_model(save(heads_model((1, 2, 3)), tmp_path))
    pixels = np.array([[[[0, 128, 255], [10, 20, 30]]]], dtype=np.uint8)  # (1, 1, 2, 3)
    rgb = pixels.astype(np.float64)
    bgr = rgb[..., ::-1]
    imagenet_mean = np.array([0.485, 0.456, 0.406])
    imagenet_std = np.array([0.229, 0.224, 0.225])
    expected = {
        "rgb_0_255": rgb,
        "rgb_0_1": rgb / 255,
        "rgb_-1_1": rgb / 127.5 - 1,
        "bgr_0_255": bgr,
        "bgr_0_1": bgr / 255,
        "bgr_-1_1": bgr / 127.5 - 1,
        "bgr_caffe": bgr - np.array([103.939, 116.779, 123.68]),
        "rgb_torch": (rgb / 255 - imagenet_mean) / imagenet_std,
    }
    assert set(expected) == set(PRESETS)
    for preset, want in expected.items():
        got = loaded.with_settings(preprocessing=preset).prepare(pixels)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=preset)
    with pytest.raises(ValueError, match=r"\(n, 1, 2, 3\)"):
        loaded.prepare(images_for((2, 2)))
    with pytest.raises(ModelLoadError, match="rgb_0_255"):
        loaded.with_settings(preprocessing="rgb_0_100")


def test_model_accepting_any_size_uses_a_default_or_the_given_size(tmp_path):
    path = save(heads_model((None, None, 3)), tmp_path)
    loaded = load_model(path)
    assert loaded.input_size == (128, 128)
    assert any("any image size" in note and "--input-size" in note for note in loaded.notes)
    resized = load_model(path, input_size=(48, 40))
    assert resized.input_size == (48, 40)
    assert resized.predict_batch(images_for((48, 40), n=2))[0].shape == (2,)
    assert resized.cache_key() != loaded.cache_key()
    fixed = save(heads_model((32, 32, 3)), tmp_path, "fixed.keras")
    with pytest.raises(ModelLoadError, match="conflicts with the model's fixed input"):
        load_model(fixed, input_size=64)


# ---------------------------------------------------------------- output mapping


@pytest.mark.parametrize(
    "age_name, gender_name, container, gender_first, age_index, gender_index, by",
    [
        ("age_output", "gender_output", "dict", False, 0, 1, "name"),
        ("age_out", "gender_out", "list", True, 1, 0, "name"),
        ("age", "sex", "list", True, 1, 0, "name"),
        ("pred_age", "gender", "dict", False, 1, 0, "name"),  # dict keys flatten sorted: gender first
        (None, None, "list", False, 0, 1, "shape"),  # Keras' own names: dense, dense_1
        (None, None, "list", True, 1, 0, "shape"),
    ],
)
def test_outputs_are_mapped_by_name_then_by_shape(tmp_path, age_name, gender_name, container, gender_first,
                                                  age_index, gender_index, by):
    model = heads_model((16, 16, 3), age_name=age_name, gender_name=gender_name, container=container,
                        gender_first=gender_first, seed=3)
    loaded = load_model(save(model, tmp_path), preprocessing="rgb_0_1")
    m = loaded.mapping
    assert (m.age_output, m.gender_output) == (age_index, gender_index)
    assert any(f"found by its {by}" in note for note in loaded.notes)

    images = images_for((16, 16))
    out = model.predict_on_batch(images / np.float32(255))
    flat = [out[k] for k in sorted(out)] if isinstance(out, dict) else out
    ages, p_female = loaded.predict_batch(images)
    np.testing.assert_allclose(ages, flat[age_index][:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p_female, flat[gender_index][:, 0], rtol=1e-5, atol=1e-6)
    # outputs_to_predictions takes the container the model returns, dict or list
    ages2, p2 = loaded.outputs_to_predictions(out)
    np.testing.assert_allclose(ages2, ages, rtol=1e-6)
    np.testing.assert_allclose(p2, p_female, rtol=1e-6)


@pytest.mark.parametrize("separate_activation", [False, True])
def test_two_unit_softmax_gender_uses_the_female_column(tmp_path, separate_activation):
    model = heads_model((16, 16, 3), gender_kind="softmax", container="list",
                        separate_activation=separate_activation)
    path = save(model, tmp_path)
    loaded = load_model(path, preprocessing="rgb_0_255")
    assert loaded.mapping.gender_kind == "softmax" and loaded.mapping.female_index == 1
    assert loaded.outputs[loaded.mapping.gender_output].activation == "softmax"
    images = images_for((16, 16))
    gender_probs = raw(model, images.astype(np.float32))["gender"]
    assert gender_probs.shape == (5, 2)
    np.testing.assert_allclose(loaded.predict_batch(images)[1], gender_probs[:, 1], rtol=1e-5)
    male_first = load_model(path, preprocessing="rgb_0_255", female_index=0)
    np.testing.assert_allclose(male_first.predict_batch(images)[1], gender_probs[:, 0], rtol=1e-5)


def test_sigmoid_female_index_0_means_the_output_is_p_male(tmp_path):
    model = heads_model((16, 16, 3))
    loaded = load_model(save(model, tmp_path), preprocessing="rgb_0_1", female_index=0)
    images = images_for((16, 16))
    p_male = raw(model, images / 255.0)["gender"][:, 0]
    np.testing.assert_allclose(loaded.predict_batch(images)[1], 1 - p_male, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("separate_activation", [False, True])
def test_age_softmax_over_101_classes_gives_the_expected_age(tmp_path, separate_activation):
    model = heads_model((16, 16, 3), age_classes=101, separate_activation=separate_activation)
    loaded = load_model(save(model, tmp_path), preprocessing="rgb_0_1")
    m = loaded.mapping
    assert m.age_kind == "classes" and m.age_class_values == tuple(float(v) for v in range(101))
    assert not m.age_from_logits
    images = images_for((16, 16))
    probs = raw(model, images / 255.0)["age"]
    assert probs.shape == (5, 101)
    by_hand = [sum(age * probs[i, age] for age in range(101)) for i in range(5)]
    np.testing.assert_allclose(loaded.predict_batch(images)[0], by_hand, rtol=1e-4)


def test_age_classes_of_unknown_count_need_their_values(tmp_path):
    model = heads_model((16, 16, 3), age_classes=8)
    path = save(model, tmp_path)
    with pytest.raises(ModelLoadError) as error:
        load_model(path)
    assert "age_class_values" in str(error.value) and "--age-classes-a" in str(error.value)
    bins = (1, 5, 10, 17, 28, 40, 50, 80)
    loaded = load_model(path, age_output="age", age_class_values=bins, preprocessing="rgb_0_1")
    images = images_for((16, 16))
    probs = raw(model, images / 255.0)["age"]
    np.testing.assert_allclose(loaded.predict_batch(images)[0], probs @ np.array(bins, float), rtol=1e-4)


def test_117_classes_are_read_as_utkface_ages(tmp_path):
    loaded = load_model(save(heads_model((16, 16, 3), age_classes=117), tmp_path))
    assert loaded.mapping.age_class_values == tuple(float(v) for v in range(117))


def test_heads_without_final_activation_get_it_applied(tmp_path):
    inputs = keras.Input((8, 8, 3))
    features = layers.GlobalAveragePooling2D()(inputs)
    age_logits = layers.Dense(101, name="age")(features)
    gender_logit = layers.Dense(1, name="gender", bias_initializer="ones")(features)
    model = keras.Model(inputs, [age_logits, gender_logit])
    loaded = load_model(save(model, tmp_path), preprocessing="rgb_0_1")
    assert loaded.mapping.age_from_logits and loaded.mapping.gender_from_logits
    images = images_for((8, 8))
    out = raw(model, images / 255.0)
    logits = out["age"].astype(np.float64)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ages, p_female = loaded.predict_batch(images)
    np.testing.assert_allclose(ages, probs @ np.arange(101), rtol=1e-4)
    np.testing.assert_allclose(p_female, sigmoid(out["gender"][:, 0]), rtol=1e-5)


def test_log_softmax_heads_are_read_as_log_probabilities(tmp_path):
    inputs = keras.Input((8, 8, 3))
    features = layers.GlobalAveragePooling2D()(inputs)
    age = layers.Dense(101, activation="log_softmax", name="age")(features)
    gender = layers.Dense(2, activation="log_softmax", name="gender", bias_initializer="ones")(features)
    model = keras.Model(inputs, [age, gender])
    loaded = load_model(save(model, tmp_path), preprocessing="rgb_0_1")
    assert loaded.mapping.age_from_logits and loaded.mapping.gender_from_logits
    assert any("log-probabilities" in n for n in loaded.notes)
    images = images_for((8, 8))
    out = raw(model, images / 255.0)
    ages, p_female = loaded.predict_batch(images)
    np.testing.assert_allclose(ages, np.exp(out["age"].astype(np.float64)) @ np.arange(101), rtol=1e-4)
    np.testing.assert_allclose(p_female, np.exp(out["gender"][:, 1]), rtol=1e-5)
    # Unnamed, a 2-unit log-softmax is still recognised as the gender head by its shape.
    unnamed = keras.Model(inputs, [layers.Dense(1)(features), layers.Dense(2, activation="log_softmax")(features)])
    assert load_model(save(unnamed, tmp_path, "unnamed.keras")).mapping.gender_output == 1


def test_a_sigmoid_named_for_male_is_read_as_p_male(tmp_path):
    model = heads_model((16, 16, 3), gender_name="is_male")
    loaded = load_model(save(model, tmp_path), preprocessing="rgb_0_1")
    assert loaded.mapping.female_index == 0
    note = next(n for n in loaded.notes if "named for male" in n)
    # the override is named for either slot: the library does not know whether this is A or B
    assert "--female-index-a 1" in note and "--female-index-b 1" in note
    images = images_for((16, 16))
    p_male = raw(model, images / 255.0)["is_male"][:, 0]
    np.testing.assert_allclose(loaded.predict_batch(images)[1], 1 - p_male, rtol=1e-5, atol=1e-6)
    assert load_model(save(model, tmp_path), female_index=1).mapping.female_index == 1  # the user decides
    for name in ("gender", "female", "male_female", "sex"):
        other = heads_model((16, 16, 3), gender_name=name)
        assert load_model(save(other, tmp_path, f"{name}.keras")).mapping.female_index == 1, name


@pytest.mark.parametrize("backbone", ["functional", "sequential"])
def test_nested_backbones_are_looked_through(tmp_path, backbone):
    model = heads_model((16, 16, 3), backbone=backbone, rescaling=(1 / 127.5, -1.0), container="list",
                        gender_kind="softmax", age_name="age_out", gender_name="gender_out")
    loaded = load_model(save(model, tmp_path, "nested.h5"))
    assert loaded.preprocessing == "rgb_0_255" and loaded.preprocessing_inside
    assert (loaded.mapping.age_output, loaded.mapping.gender_output) == (0, 1)
    images = images_for((16, 16))
    out = raw(model, images.astype(np.float32))
    ages, p_female = loaded.predict_batch(images)
    np.testing.assert_allclose(ages, out["age_out"][:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p_female, out["gender_out"][:, 1], rtol=1e-5)


def test_activation_is_found_through_a_sub_model_that_ends_in_the_head(tmp_path):
    inner_in = keras.Input((4,))
    head = keras.Model(inner_in, layers.Dense(2, activation="softmax")(inner_in), name="head_model")
    inputs = keras.Input((8, 8, 3))
    features = layers.Dense(4)(layers.GlobalAveragePooling2D()(inputs))
    model = keras.Model(inputs, [layers.Dense(1, activation="relu")(features), head(features)])
    loaded = load_model(save(model, tmp_path))
    assert [o.activation for o in loaded.outputs] == ["relu", "softmax"]
    assert (loaded.mapping.age_output, loaded.mapping.gender_output) == (0, 1)


def test_single_output_sequential_cannot_be_mapped_and_says_how_to_fix(tmp_path):
    model = keras.Sequential(
        [keras.Input((8, 8, 3)), layers.GlobalAveragePooling2D(), layers.Dense(2, name="dense_out")]
    )
    path = save(model, tmp_path)
    for hints in ({}, {"age_output": 0, "gender_output": 0}):
        with pytest.raises(ModelLoadError) as error:
            load_model(path, **hints)
        message = str(error.value)
        assert "dense_out: shape (2,), activation linear" in message
        # No output-naming hint can fix a single output: the message says what to change instead.
        assert "has 1 output" in message and "not supported" in message and "--age-output-a" not in message
        assert "separate age and gender outputs" in message


def test_ambiguous_outputs_are_listed_and_can_be_mapped_by_hand(tmp_path):
    inputs = keras.Input((8, 8, 3))
    features = layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, [layers.Dense(1, name="head_a")(features), layers.Dense(1, name="head_b")(features)])
    path = save(model, tmp_path)
    with pytest.raises(ModelLoadError) as error:
        load_model(path)
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert "[0] head_a: shape (1,), activation linear" in message
    assert "[1] head_b: shape (1,), activation linear" in message
    assert "--gender-output-a" in message

    loaded = load_model(path, age_output="head_b", gender_output="0", preprocessing="rgb_0_1")
    assert (loaded.mapping.age_output, loaded.mapping.gender_output) == (1, 0)
    assert loaded.mapping.gender_from_logits  # a linear 1-unit gender head is read as a logit
    images = images_for((8, 8))
    out = raw(model, images / 255.0)
    ages, p_female = loaded.predict_batch(images)
    np.testing.assert_allclose(ages, out["head_b"][:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p_female, sigmoid(out["head_a"][:, 0]), rtol=1e-5)
    with pytest.raises(ModelLoadError, match="not an output"):
        load_model(path, age_output="nope", gender_output=0)
    with pytest.raises(ModelLoadError, match="out of range"):
        load_model(path, age_output=5, gender_output=0)


# ---------------------------------------------------------------- Keras 2 files


def test_keras2_h5_with_depthwise_groups_and_nested_model_loads_via_the_shim(tmp_path):
    model = depthwise_model((16, 16, 3), rescaling=(1 / 127.5, -1.0))
    path = save_keras2_h5(model, tmp_path / "teachable.h5")
    with h5py.File(path) as handle:
        config = json.loads(handle.attrs["model_config"])
        assert handle.attrs["keras_version"] in (b"2.12.0", "2.12.0")
    assert '"groups": 1' in json.dumps(config)
    with pytest.raises(Exception, match="groups"):
        keras.saving.load_model(path, compile=False)  # what users hit without the shim

    loaded = load_model(path)
    assert "Keras 2.12.0" in loaded.file_format
    assert any("DepthwiseConv2D" in n and "groups=1" in n for n in loaded.notes)
    assert any("renumbered" in n for n in loaded.notes)
    # Outputs [gender (softmax-2) named dense_sex, age named dense_age]: gender first.
    assert loaded.mapping.output_names == ("dense_sex", "dense_age")
    assert (loaded.mapping.age_output, loaded.mapping.gender_output) == (1, 0)
    assert loaded.preprocessing == "rgb_0_255" and loaded.preprocessing_inside
    images = images_for((16, 16))
    gender_probs, age = model.predict_on_batch(images.astype(np.float32))
    ages, p_female = loaded.predict_batch(images)
    np.testing.assert_allclose(ages, age[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p_female, gender_probs[:, 1], rtol=1e-5)


def test_keras2_arithmetic_preprocessing_ops_are_rebuilt_and_detected(tmp_path):
    model = depthwise_model((16, 16, 3), rescaling=(1 / 127.5, -1.0), seed=4)
    path = save_keras2_h5(model, tmp_path / "ops.h5", ops_instead_of_rescaling=True)
    assert "TFOpLambda" in json.dumps(json.loads(h5py.File(path).attrs["model_config"]))
    loaded = load_model(path)
    assert loaded.preprocessing_inside and loaded.preprocessing == "rgb_0_255"
    assert any("TFOpLambda" in n for n in loaded.notes)
    images = images_for((16, 16))
    gender_probs, age = model.predict_on_batch(images.astype(np.float32))
    ages, p_female = loaded.predict_batch(images)
    np.testing.assert_allclose(ages, age[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p_female, gender_probs[:, 1], rtol=1e-5)

    # Any other TensorFlow op is refused by name before Keras sees it.
    _tamper_h5_config(path, lambda text: text.replace('"math.multiply"', '"nn.relu6"'))
    with pytest.raises(ModelLoadError, match=r"TensorFlow op nn\.relu6"):
        load_model(path)


# keras.applications' preprocess_input called on the input tensor, as in TensorFlow's transfer-
# learning tutorial: Keras 3 stores it as op nodes (TrueDivide, GetItem, Stack, Add, ...).
# mode -> (application module, the same preprocessing in numpy on RGB 0–255).
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
KERAS_APP_MODES = {
    "tf": (keras.applications.mobilenet_v2, lambda x: x / 127.5 - 1),
    "caffe": (keras.applications.resnet50, lambda x: x[..., ::-1] - np.array([103.939, 116.779, 123.68])),
    "torch": (keras.applications.densenet, lambda x: (x / 255 - IMAGENET_MEAN) / IMAGENET_STD),
}


def _preprocess_input_model(application):
    inputs = keras.Input((8, 8, 3), name="image")
    means = layers.GlobalAveragePooling2D()(application.preprocess_input(inputs))  # channel order matters
    return keras.Model(inputs, {"age": layers.Dense(1, name="age")(means),
                                "gender": layers.Dense(1, activation="sigmoid", name="gender")(means)})


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("mode", sorted(KERAS_APP_MODES))
def test_keras3_preprocess_input_op_nodes_load_and_are_detected(tmp_path, mode, suffix):
    """In a Keras 3 .h5 file the op nodes name no module, and Keras itself cannot read it back."""
    application, preprocess = KERAS_APP_MODES[mode]
    model = _preprocess_input_model(application)
    path = save(model, tmp_path, "ops" + suffix)
    if suffix == ".keras":
        assert '"module": "keras.src.ops.numpy"' in zipfile.ZipFile(path).read("config.json").decode()
    else:
        with pytest.raises((ValueError, TypeError)):
            keras.saving.load_model(path, compile=False)
    loaded = load_model(path)
    assert loaded.preprocessing_inside and loaded.preprocessing == "rgb_0_255"
    assert ("channels reordered (2, 1, 0)" in " ".join(loaded.notes)) == (mode == "caffe")
    assert any(n.startswith("Keras operation(s) ") and "loaded as Keras' own keras.ops classes" in n
               for n in loaded.notes) == (suffix == ".h5")

    images = images_for((8, 8))
    means = preprocess(images.astype(float)).reshape(len(images), -1, 3).mean(axis=1)
    age_kernel, age_bias = model.get_layer("age").get_weights()
    gender_kernel, gender_bias = model.get_layer("gender").get_weights()
    ages, p_female = loaded.predict_batch(images)
    np.testing.assert_allclose(ages, means @ age_kernel[:, 0] + age_bias[0], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(p_female, sigmoid(means @ gender_kernel[:, 0] + gender_bias[0]), rtol=1e-4, atol=1e-5)


def test_keras3_h5_op_nodes_named_like_layers_load_beside_those_layers(tmp_path):
    """`x + 1.0` (the Add operation) beside an Add layer: the .h5 file calls both "Add" (as
    MobileNetV3's hard-swish beside its residual additions), and Keras built a layer for the op."""
    inputs = keras.Input((8, 8, 3), name="image")
    shifted = inputs * 2.0 + 1.0
    pooled = layers.GlobalAveragePooling2D()(layers.Add()([shifted, inputs]))
    model = keras.Model(inputs, {"age": layers.Dense(1, name="age")(pooled),
                                 "gender": layers.Dense(1, activation="sigmoid", name="gender")(pooled)})
    path = save(model, tmp_path, "ops.h5")
    with pytest.raises(ValueError, match="Only input tensors may be passed as positional arguments"):
        keras.saving.load_model(path, compile=False)
    loaded = load_model(path, preprocessing="rgb_0_255")
    assert "Keras operation(s) 1 Add, 1 Multiply (arithmetic" in " ".join(loaded.notes)
    images = images_for((8, 8))
    means = images.astype(float).reshape(len(images), -1, 3).mean(axis=1) * 3.0 + 1.0  # (2x + 1) + x
    age_kernel, age_bias = model.get_layer("age").get_weights()
    ages, _ = loaded.predict_batch(images)
    np.testing.assert_allclose(ages, means @ age_kernel[:, 0] + age_bias[0], rtol=1e-4, atol=1e-3)


def test_keras3_h5_op_nodes_holding_more_than_data_are_refused_with_the_way_out(tmp_path):
    inputs = keras.Input((8, 8, 3), name="image")
    pooled = layers.GlobalAveragePooling2D()(inputs / 255.0)
    model = keras.Model(inputs, {"age": layers.Dense(1, name="age")(pooled),
                                 "gender": layers.Dense(1, activation="sigmoid", name="gender")(pooled)})
    path = save(model, tmp_path, "ops.h5")
    with h5py.File(path, "r+") as f:  # the constant replaced by a stored function, as a hostile file could
        text = f.attrs["model_config"]
        text = text.decode() if isinstance(text, bytes) else text
        f.attrs["model_config"] = text.replace("255.0]", '{"class_name": "__lambda__", "config": {"code": "x"}}]')
    with pytest.raises(ModelLoadError, match=r"operation\(s\) true_divide\w* \(TrueDivide\).*model\.save\('model\.keras'\)"):
        load_model(path)


@pytest.mark.parametrize("rank, key", [
    (4, (Ellipsis, 1)), (4, (Ellipsis, slice(1, 3))), (4, (0, Ellipsis)), (4, (slice(None), Ellipsis, 0)),
    (4, (Ellipsis, slice(None, None, -1))), (4, (Ellipsis,)), (3, (Ellipsis, None)), (4, (Ellipsis, None, 0)),
    (4, (None, Ellipsis)), (4, (Ellipsis, [2, 1, 0])),
])
def test_ellipses_in_h5_op_indices_are_spelled_out_as_numpy_reads_them(rank, key):
    """The .h5 reader cannot take `x[..., k]` back; the slices written instead must index the same
    elements (a newaxis uses no dimension: `x[..., None]` on rank 3 was spelled x[:, :, None])."""
    from analysis.compat import _spell_out_ellipses

    def stored(k):
        if k is Ellipsis:
            return {"class_name": "__ellipsis__", "config": {}}
        if isinstance(k, slice):
            return {"class_name": "__slice__", "config": {"start": k.start, "stop": k.stop, "step": k.step}}
        return k

    def read(k):
        if isinstance(k, dict):
            return slice(k["config"]["start"], k["config"]["stop"], k["config"]["step"])
        return k

    array = np.arange(2 * 4 * 5 * 3).reshape(2, 4, 5, 3)[(Ellipsis, 0) if rank == 3 else (Ellipsis,)]
    node = {"args": [{"class_name": "__keras_tensor__", "config": {"shape": [None, *array.shape[1:]], "dtype": "float32"}},
                     [stored(k) for k in key]], "kwargs": {}}
    config = {"class_name": "Functional", "config": {"layers": [
        {"class_name": "GetItem", "config": {"name": "get_item"}, "inbound_nodes": [node]}]}}
    assert _spell_out_ellipses(config) == 1
    spelled = tuple(read(k) for k in node["args"][1])
    assert Ellipsis not in spelled
    np.testing.assert_array_equal(array[spelled], array[key])


def test_a_keras3_h5_file_naming_the_loaders_op_alias_elsewhere_is_refused(tmp_path):
    """The alias under which ops are handed to Keras applies to the whole file: anywhere but an
    op node (here a Dense layer's initializer) it would build an op from an unchecked config."""
    from analysis.compat import H5_OP_ALIAS

    inputs = keras.Input((8, 8, 3), name="image")
    pooled = layers.GlobalAveragePooling2D()(inputs / 255.0)
    model = keras.Model(inputs, {"age": layers.Dense(1, name="age")(pooled),
                                 "gender": layers.Dense(1, activation="sigmoid", name="gender")(pooled)})
    path = save(model, tmp_path, "ops.h5")
    with h5py.File(path, "r+") as f:
        text = f.attrs["model_config"]
        config = json.loads(text.decode() if isinstance(text, bytes) else text)
        age = next(item for item in config["config"]["layers"] if item["config"].get("name") == "age")
        age["config"]["kernel_initializer"] = {"class_name": H5_OP_ALIAS + "TrueDivide", "config": {"name": "sneaky"}}
        f.attrs["model_config"] = json.dumps(config)
    with pytest.raises(ModelFileError, match=f"names {H5_OP_ALIAS}…, which no Keras model holds"):
        load_model(path)


def test_the_only_reading_of_look_alike_outputs_that_fits_the_settings_given_is_used(tmp_path):
    """Three dense_N outputs (101 ages, a sigmoid, a 2-way softmax) and an age scale given: the
    readings with the 101-way softmax as age are ruled out, one is left (it crashed on 'the next
    best reading')."""
    inputs = keras.Input((12, 12, 3))
    pooled = layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, [layers.Dense(101, activation="softmax", name="dense_1")(pooled),
                                 layers.Dense(1, activation="sigmoid", name="dense_2")(pooled),
                                 layers.Dense(2, activation="softmax", name="dense_3")(pooled)])
    path = save(model, tmp_path)
    loaded = load_model(path, age_scale="x100")
    m = loaded.mapping
    assert (m.output_names[m.age_output], m.output_names[m.gender_output], m.age_scale) == ("dense_2", "dense_3", "x100")
    assert any("the only way of reading them that fits the settings given" in n for n in loaded.notes)
    from analysis.mapping import AmbiguousOutputs

    with pytest.raises(AmbiguousOutputs, match="the 3 ways of reading them that fit"):  # without it, three fit
        load_model(path)


def _rewrite_config(path, change, metadata=None):
    """Apply `change` to the stored config of a .keras file (in place), and replace its metadata if given."""
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    change(config)
    files["config.json"] = json.dumps(config).encode()
    if metadata is not None:
        files["metadata.json"] = json.dumps(metadata).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)


def _tamper_h5_config(path, change, keras_version=None):
    """Apply `change` (text -> text) to the stored config of an .h5 file (in place); optionally say
    which Keras version wrote it."""
    with h5py.File(path, "r+") as handle:
        text = handle.attrs["model_config"]
        text = text.decode() if isinstance(text, bytes) else text
        handle.attrs["model_config"] = change(text).encode()
        if keras_version is not None:
            handle.attrs["keras_version"] = keras_version


def _json_edit(edit):
    """A text -> text change for _tamper_h5_config that applies `edit` to the parsed config."""
    def change(text):
        config = json.loads(text)
        edit(config)
        return json.dumps(config)
    return change


@pytest.mark.parametrize("tamper", ["function_argument", "function_in_config", "module_outside_the_list",
                                    "not_an_operation"])
def test_keras3_op_nodes_holding_functions_or_from_elsewhere_are_refused(tmp_path, tamper):
    path = save(_preprocess_input_model(keras.applications.mobilenet_v2), tmp_path, "ops.keras")

    def change(config):
        node = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "TrueDivide")
        if tamper == "function_argument":  # Keras would import os.system by name to rebuild the call
            node["inbound_nodes"][0]["args"][1] = {"module": "os", "class_name": "function", "config": "system",
                                                   "registered_name": "function"}
        elif tamper == "function_in_config":  # an op whose constructor takes a function
            node.update(class_name="Vectorize")
            node["config"]["pyfunc"] = {"module": "os", "class_name": "function", "config": "system",
                                        "registered_name": "function"}
        elif tamper == "module_outside_the_list":
            node.update(module="keras.src.ops.core", class_name="Cond")
        else:
            node.update(class_name="convert_to_tensor")  # a function of that module, not an Operation

    _rewrite_config(path, change)
    with pytest.raises(ModelLoadError, match=r"uses Keras operation\(s\) true_divide\w* .*never functions"):
        load_model(path)


def test_a_keras_archive_written_by_tf_keras_2_15_loads_with_the_keras2_shims(tmp_path):
    # Written by TensorFlow 2.15 (tests/data/keras215/build.py), as Colab saved coursework in 2023–24:
    # model classes under keras.src.engine, batch_input_shape on a Sequential's first layer, a
    # BatchNormalization axis list, DepthwiseConv2D(groups=1), TFOpLambda preprocessing, a nested model.
    path = tmp_path / "coursework.keras"
    shutil.copyfile(KERAS215 / "keras215.keras", path)
    expected = np.load(KERAS215 / "keras215_expected.npz")  # TensorFlow 2.15's own predictions
    with pytest.raises(Exception, match="keras.src.engine.functional"):  # Keras 3 alone cannot read it
        keras.saving.load_model(path, compile=False)

    loaded = load_model(path)
    assert loaded.file_format == ".keras (Keras 2.15.0, legacy)"
    assert loaded.preprocessing_inside and loaded.preprocessing == "rgb_0_255"
    assert any("DepthwiseConv2D argument(s) groups=1" in n for n in loaded.notes)
    ages, p_female = loaded.predict_batch(expected["images"])
    np.testing.assert_allclose(ages, expected["age"], atol=1e-5)
    np.testing.assert_allclose(p_female, expected["p_female"], atol=1e-6)
    assert path.read_bytes() == (KERAS215 / "keras215.keras").read_bytes()


def test_an_output_named_with_a_slash_can_still_be_given_by_its_keras2_name(tmp_path):
    path = tmp_path / "slashed_outputs.h5"
    shutil.copyfile(KERAS215 / "keras215_tfops.h5", path)

    def rename_outputs(config):
        for layer in config["config"]["layers"]:
            if layer["name"] in ("age", "gender"):
                layer["name"] = layer["config"]["name"] = f"head/{layer['name']}"
        config["config"]["output_layers"] = [[f"head/{name}", i, j] for name, i, j in config["config"]["output_layers"]]

    _tamper_h5_config(path, _json_edit(rename_outputs))
    loaded = load_model(path, age_output="head/age", gender_output="head/gender")
    names = loaded.mapping.output_names
    assert (names[loaded.mapping.age_output], names[loaded.mapping.gender_output]) == ("head_age", "head_gender")


def test_keras2_caffe_preprocessing_channel_flip_and_bias_are_rebuilt_and_detected(tmp_path):
    # resnet50.preprocess_input written on the input by TensorFlow 2.15: x[..., ::-1] (SlicingOpLambda)
    # then nn.bias_add of minus the ImageNet mean (TFOpLambda); fixture from tests/data/keras215/build.py.
    expected = np.load(KERAS215 / "keras215_caffe_expected.npz")
    loaded = load_model(KERAS215 / "keras215_caffe.h5")
    assert loaded.preprocessing_inside and loaded.preprocessing == "rgb_0_255"
    assert any("channels reversed → nn.bias_add(-103.9, -116.8, -123.7)" in n for n in loaded.notes)
    ages, p_female = loaded.predict_batch(expected["images"])
    np.testing.assert_allclose(ages, expected["age"], atol=1e-5)
    np.testing.assert_allclose(p_female, expected["p_female"], atol=1e-6)

    # Any other slice is refused by name before Keras sees it.
    path = tmp_path / "other_slice.h5"
    shutil.copyfile(KERAS215 / "keras215_caffe.h5", path)
    _tamper_h5_config(path, lambda text: text.replace('"step": -1', '"step": 2'))
    with pytest.raises(ModelLoadError, match=r"TensorFlow op __operators__\.getitem"):
        load_model(path)


def test_keras2_arguments_keras3_reads_differently_keep_the_model_exact():
    # LeakyReLU(alpha=0.05) (Keras 3: negative_slope, default 0.3), SpatialDropout2D stored with
    # noise_shape and trainable (its Keras 3 __init__ takes neither), a mixed_float16 layer (Keras 3
    # misreads Keras 2's policy): all written by TensorFlow 2.15 (tests/data/keras215/build.py).
    expected = np.load(KERAS215 / "keras215_layers_expected.npz")
    loaded = load_model(KERAS215 / "keras215_layers.h5")
    assert any("mixed_float16 run in float32" in n for n in loaded.notes)
    assert any("SpatialDropout2D argument(s) noise_shape=null, trainable=true" in n for n in loaded.notes)
    assert not any("LeakyReLU" in n for n in loaded.notes)  # renamed, not dropped
    ages, p_female = loaded.predict_batch(expected["images"])
    np.testing.assert_allclose(ages, expected["age"], atol=5e-4)  # the conv ran in float16 there
    np.testing.assert_allclose(p_female, expected["p_female"], atol=5e-4)


def test_keras2_tensorflow_ops_become_standard_layers_and_slashed_names_are_renamed():
    # Written by TensorFlow 2.15: 2.0 * (x / 255) - 1, then 1 - x (constants written first), a conv
    # named "block1/conv", tf.nn.relu, a + b of two tensors, tf.concat with ConvNeXt's LayerScale,
    # tf.image.resize and tf.reduce_mean over the image — each refused or unreadable before.
    expected = np.load(KERAS215 / "keras215_tfops_expected.npz")
    loaded = load_model(KERAS215 / "keras215_tfops.h5")
    notes = " ".join(loaded.notes)
    for rewrite in ("__operators__.add → Add", "concat → Concatenate", "image.resize → Resizing",
                    "math.reduce_mean → GlobalAveragePooling2D", "nn.relu → Activation"):
        assert rewrite in notes
    assert "3 layer name(s) with '/'" in notes
    # 1 - (2x/255 - 1) = 2 - 2x/255: raw 0–255 in, and the constant-first subtraction is read as c - x
    assert loaded.preprocessing_inside and loaded.preprocessing == "rgb_0_255"
    assert "math.subtract(1, x)" in notes
    ages, p_female = loaded.predict_batch(expected["images"])
    np.testing.assert_allclose(ages, expected["age"], atol=1e-5)
    np.testing.assert_allclose(p_female, expected["p_female"], atol=1e-6)


# ---------------------------------------------------------------- safety


def _lambda_model(marker):
    # The lambda writes a marker file whenever it runs, so we can see whether loading ran it.
    code = eval(f"lambda t: (open({str(marker)!r}, 'w').close(), t * 2)[1]")  # noqa: S307 - test fixture
    inputs = keras.Input((8, 8, 3))
    x = layers.Lambda(code, name="double")(layers.GlobalAveragePooling2D()(inputs))
    return keras.Model(inputs, {"age": layers.Dense(1, name="age")(x),
                                "gender": layers.Dense(1, activation="sigmoid", name="gender")(x)})


def _keras2_lambda(config):
    """A Keras 3 Lambda config in the Keras 2 shape ([code, defaults, closure])."""
    for layer in config["config"]["layers"]:
        if layer["class_name"] == "Lambda":
            fn = layer["config"]["function"]["config"]
            layer["config"]["function"] = [fn["code"], fn["defaults"], fn["closure"]]
            layer["config"]["function_type"] = "lambda"


def _keras2_lambda_file(path):
    """Rewrite a Keras 3 file's Lambda into the Keras 2 shape, and say Keras 2.x wrote it."""
    if path.suffix == ".keras":  # as tf.keras 2.13–2.15 wrote .keras archives
        _rewrite_config(path, _keras2_lambda, metadata={"keras_version": "2.15.0"})
        return
    _tamper_h5_config(path, _json_edit(_keras2_lambda), keras_version=b"2.11.0")


@pytest.mark.parametrize("file_name", ["lambda.keras", "lambda.h5", "lambda_keras2.h5", "lambda_keras2.keras"])
def test_lambda_layers_are_refused_without_running_them(tmp_path, file_name):
    marker = tmp_path / "code_ran"
    model = _lambda_model(marker)
    path = tmp_path / file_name
    model.save(path)
    if file_name.startswith("lambda_keras2"):
        _keras2_lambda_file(path)
    marker.unlink()  # building the model ran it once

    with pytest.raises(ModelLoadError) as error:
        load_model(path)
    message = str(error.value)
    assert "Lambda" in message and "double" in message
    assert "allow_unsafe=True" in message and "--allow-unsafe-model" in message
    assert not marker.exists()
    # Keras' own h5 and .keras readers also refuse in safe mode (defence in depth).
    with pytest.raises(ValueError, match="Lambda"):
        keras.saving.load_model(path, compile=False, safe_mode=True)
    assert not marker.exists()

    loaded = load_model(path, allow_unsafe=True, preprocessing="rgb_0_1")
    assert marker.exists()  # opting in really does run the file's code
    assert any(n.startswith("UNSAFE") for n in loaded.notes)
    images = images_for((8, 8))
    out = raw(model, images / 255.0)
    np.testing.assert_allclose(loaded.predict_batch(images)[0], out["age"][:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("file_name", ["prep.keras", "prep.h5", "prep_keras2.h5"])
def test_a_preprocess_input_lambda_becomes_identity_and_calibration_finds_its_scaling(tmp_path, file_name):
    # Right only on RGB in [-1, 1]: what mobilenet_v2.preprocess_input makes of raw 0–255 pixels.
    inner = preset_model("rgb_-1_1")
    inputs = keras.Input((12, 12, 3), name="image")
    outputs = inner(layers.Lambda(keras.applications.mobilenet_v2.preprocess_input, name="prep")(inputs))
    model = keras.Model(inputs, {"age": outputs["age"], "gender": outputs["gender"]})
    path = save(model, tmp_path, file_name)
    if file_name == "prep_keras2.h5":  # Keras 2 stored the function's bytecode (this fake one cannot run)
        def fake_bytecode(config):
            prep = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Lambda")
            prep["config"].update(function=["bm90IGNvZGU=", None, None], function_type="lambda",
                                  module="keras.applications.mobilenet_v2")

        _tamper_h5_config(path, _json_edit(fake_bytecode), keras_version=b"2.11.0")
    else:  # Keras 3 stores only the name: Keras itself cannot load it back, even unsafely
        with pytest.raises(Exception, match="preprocess_input"):
            keras.saving.load_model(path, compile=False, safe_mode=False)

    before = path.read_bytes()
    loaded = load_model(path)
    assert path.read_bytes() == before  # the identity layer is patched into a temporary copy
    note = next(n for n in loaded.notes if n.startswith("Lambda layer(s) prep ("))
    assert "identity" in note and ("applications.mobilenet_v2" in note) == (file_name == "prep_keras2.h5")
    images, ages, genders = preset_images()
    calibrated, _ = calibrate_preprocessing(loaded, images, ages, genders)
    assert calibrated.preprocessing == "rgb_-1_1"
    age, p_female = calibrated.predict_batch(images)
    expected = model.predict_on_batch(images.astype(np.float32))  # the original model, with its Lambda
    np.testing.assert_allclose(age, expected["age"][:, 0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(p_female, expected["gender"][:, 0], rtol=1e-5, atol=1e-6)


def test_a_replaced_lambda_hides_what_follows_from_the_inside_detection(tmp_path):
    # Whatever the Lambda did is unknown, so a Rescaling after it (as MobileNetV3 and EfficientNet
    # backbones start) says nothing about the input the model wants: calibration must stay free.
    inputs = keras.Input((8, 8, 3), name="image")
    x = layers.Lambda(keras.applications.mobilenet_v2.preprocess_input, name="prep")(inputs)
    x = layers.Rescaling(1 / 127.5, offset=-1, name="backbone_rescaling")(x)
    loaded = load_model(save(_preprocess_input_model_after(x, inputs), tmp_path))
    assert not loaded.preprocessing_inside
    assert any(n.startswith("preprocessing not known") for n in loaded.notes)


def _preprocess_input_model_after(x, inputs):
    means = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, {"age": layers.Dense(1, name="age")(means),
                                "gender": layers.Dense(1, activation="sigmoid", name="gender")(means)})


def test_an_unnamed_lambda_in_a_sequential_is_refused_too(tmp_path):
    # Layers of a Sequential need no name; stripping it must not get a Lambda past the check
    # (Keras' safe mode blocks stored bytecode, not a Lambda naming a Keras function).
    inner = keras.Sequential([keras.Input((8, 8, 3)), layers.Lambda(keras.ops.relu), layers.Conv2D(2, 1)], name="inner")
    inputs = keras.Input((8, 8, 3), name="image")
    path = save(_preprocess_input_model_after(inner(inputs), inputs), tmp_path)

    def strip(config):
        sequential = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Sequential")
        lam = next(layer for layer in sequential["config"]["layers"] if layer["class_name"] == "Lambda")
        lam.pop("build_config", None)
        lam.pop("name", None)
        lam["config"].pop("name", None)

    _rewrite_config(path, strip)
    with pytest.raises(ModelLoadError, match="Lambda layer"):
        load_model(path)


def test_an_entry_without_a_config_dict_is_refused_not_loaded_unchecked(tmp_path):
    # Keras reads "config": null as an empty config, which would skip every check on the entry.
    path = save(_preprocess_input_model(keras.applications.mobilenet_v2), tmp_path, "ops.keras")

    def blank(config):
        node = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "TrueDivide")
        node.update(module="keras.src.ops.core", class_name="Switch", config=None)

    _rewrite_config(path, blank)
    with pytest.raises(ModelLoadError, match=r"true_divide\w* \(Switch\) has no configuration dictionary"):
        load_model(path)


def test_a_uint8_input_cast_to_float_loads(tmp_path):
    inputs = keras.Input((8, 8, 3), dtype="uint8", name="image")
    x = keras.applications.mobilenet_v2.preprocess_input(keras.ops.cast(inputs, "float32"))
    model = _preprocess_input_model_after(x, inputs)
    loaded = load_model(save(model, tmp_path))
    images = images_for((8, 8))
    np.testing.assert_allclose(loaded.predict_batch(images)[0], model.predict_on_batch(images)["age"][:, 0], rtol=1e-5, atol=1e-5)


def _first_tf_op(config):
    return next(item for item in config["config"]["layers"] if item["class_name"] == "TFOpLambda")


HOSTILE_CONFIGS = {  # what a damaged or crafted Keras 2 config may hold, and what broke on it before
    "400_digit_constant": lambda text: text.replace('"bias": [', '"bias": [1' + "0" * 400 + ", "),
    "5000_digit_integer": lambda text: text.replace('"step": -1', '"step": 1' + "0" * 5000),
    "nested_5000_deep": lambda text: text.replace('"data_format": "NHWC"', '"data_format": ' + "[" * 5000 + "]" * 5000),
    "node_is_a_dict": _json_edit(lambda config: _first_tf_op(config).update(inbound_nodes=[{"args": [], "kwargs": {}}])),
    "node_is_a_number": _json_edit(lambda config: _first_tf_op(config).update(inbound_nodes=[5, 6])),
    "class_name_is_a_list": _json_edit(lambda config: _first_tf_op(config).update(class_name=["Dense"])),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CONFIGS))
def test_hostile_keras2_configs_end_in_a_readable_refusal(tmp_path, case):
    path = tmp_path / "hostile.h5"
    shutil.copyfile(KERAS215 / "keras215_caffe.h5", path)
    _tamper_h5_config(path, HOSTILE_CONFIGS[case])
    with pytest.raises(ModelLoadError):  # not OverflowError, RecursionError, KeyError or TypeError
        load_model(path)


def test_renaming_slashed_layers_does_not_turn_a_lambda_into_preprocess_input(tmp_path):
    # Only names and references are renamed: a Lambda named "preprocess/input" calling a function of
    # that name must stay a Lambda (refused), not become keras.applications' preprocess_input.
    path = tmp_path / "renamed.keras"
    shutil.copyfile(KERAS215 / "keras215.keras", path)

    def to_lambda(config):
        op = _first_tf_op(config)
        op.update(class_name="Lambda", name="preprocess/input")
        op["config"] = {"name": "preprocess/input", "function": {"class_name": "function", "config": "preprocess/input",
                                                                 "module": "keras.applications.mobilenet_v2"}}

    _rewrite_config(path, to_lambda)
    with pytest.raises(ModelLoadError, match="Lambda layer"):
        load_model(path)


def test_custom_layers_are_refused_with_a_reason(tmp_path):
    path = save(heads_model((8, 8, 3)), tmp_path, "custom.keras")

    def rename(config):
        conv = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Conv2D")
        conv.update(module="my_package.layers", class_name="FancyConv", registered_name="my_package>FancyConv")

    _rewrite_config(path, rename)
    with pytest.raises(ModelLoadError, match=r"custom layer\(s\) conv \(FancyConv\)"):
        load_model(path)


# ---------------------------------------------------------------- files that are not models


def _truncated(source, target, fraction=0.5):
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def test_files_that_are_not_models_give_readable_errors(tmp_path):
    good_keras = save(heads_model((8, 8, 3)), tmp_path, "good.keras")
    good_h5 = save(heads_model((8, 8, 3)), tmp_path, "good.h5")
    weights_only = tmp_path / "only.weights.h5"
    heads_model((8, 8, 3)).save_weights(weights_only)
    zip_without_model = tmp_path / "photos.keras"
    with zipfile.ZipFile(zip_without_model, "w") as archive:
        archive.writestr("a.txt", "hello")
    cases = {
        "empty.h5": (b"", "empty"),
        "notes.keras": (b"this is not a model\n", "text file"),
        "arch.h5": (json.dumps({"class_name": "Sequential", "config": {}}).encode(), "architecture saved as JSON"),
        "noise.h5": (RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not a Keras model file"),
    }
    for file_name, (data, expected) in cases.items():
        (tmp_path / file_name).write_bytes(data)
        with pytest.raises(ModelLoadError, match=expected):
            load_model(tmp_path / file_name)
    with pytest.raises(ModelLoadError, match="truncated or damaged"):
        load_model(_truncated(good_keras, tmp_path / "cut.keras"))
    with pytest.raises(ModelLoadError, match="truncated or damaged"):
        load_model(_truncated(good_h5, tmp_path / "cut.h5", 0.3))
    with pytest.raises(ModelLoadError, match="weights-only"):
        load_model(weights_only)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(zip_without_model)
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "missing.keras")
    with pytest.raises(ModelLoadError, match="folder"):
        load_model(tmp_path)


def test_a_keras_archive_that_would_unpack_to_gigabytes_is_refused_unread(tmp_path, monkeypatch):
    # 65 MB of config.json deflates to ~64 KB: refused from the sizes the zip declares.
    bomb = tmp_path / "bomb.keras"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", '{"pad": "' + " " * (65 * 2**20) + '"}')
        archive.writestr("model.weights.h5", b"")
    assert bomb.stat().st_size < 2**20
    with pytest.raises(ModelLoadError, match="zip bomb") as error:
        load_model(bomb)
    assert "config.json" in str(error.value)
    # The bound on the whole archive, checked with a real model and a lowered limit.
    good = save(heads_model((8, 8, 3)), tmp_path, "good.keras")
    with zipfile.ZipFile(good) as archive:
        unpacked = sum(info.file_size for info in archive.infolist())
    monkeypatch.setattr("analysis.compat.MAX_ARCHIVE_UNPACKED_BYTES", unpacked - 1)
    with pytest.raises(ModelLoadError, match="zip bomb"):
        load_model(good)
    monkeypatch.setattr("analysis.compat.MAX_ARCHIVE_UNPACKED_BYTES", unpacked)
    assert load_model(good).mapping.age_output is not None


# ---------------------------------------------------------------- calibration


@pytest.mark.parametrize("true_preset", ["rgb_0_1", "bgr_0_255", "rgb_-1_1", "bgr_-1_1"])
def test_calibration_recovers_the_preset_the_model_needs(tmp_path, true_preset):
    path = save(preset_model(true_preset), tmp_path)
    loaded = load_model(path)
    assert not loaded.preprocessing_inside
    assert any(n.startswith("preprocessing not known") for n in loaded.notes)
    images, ages, genders = preset_images()
    calibrated, scores = calibrate_preprocessing(loaded, images, ages, genders)

    assert calibrated.preprocessing == true_preset
    assert list(scores.columns) == ["preset", "gender_acc", "age_mae", "age_scale", "combined_rank", "inside", "chosen"]
    assert list(scores["preset"]) == list(PRESETS) and scores["chosen"].sum() == 1
    best = scores.set_index("preset").loc[true_preset]
    assert best["chosen"] and best["gender_acc"] == 1.0 and best["age_mae"] < 0.5
    assert best["combined_rank"] == scores["combined_rank"].min()
    # The table's numbers are the predictions' numbers: recompute one row independently.
    other = "rgb_0_255" if true_preset != "rgb_0_255" else "rgb_0_1"
    age_pred, p_female = loaded.with_settings(preprocessing=other).predict_batch(images)
    row = scores.set_index("preset").loc[other]
    assert row["age_mae"] == pytest.approx(np.mean(np.abs(age_pred - ages)), rel=1e-6)
    assert row["gender_acc"] == pytest.approx(np.mean((p_female >= 0.5) == genders))
    assert not any(n.startswith("preprocessing not known") for n in calibrated.notes)
    assert any(f"preprocessing {true_preset} chosen by calibration" in n for n in calibrated.notes)
    assert loaded.preprocessing == "rgb_0_1"  # provisional; the input LoadedModel is unchanged
    assert (calibrated.cache_key() != loaded.cache_key()) == (true_preset != "rgb_0_1")


@pytest.mark.parametrize("divisor", [100, 116])
def test_an_age_output_in_fractions_of_a_lifetime_is_read_in_years(tmp_path, divisor):
    """A model trained on age / 100 was read as years: MAE ~33, and those nonsense age ranks
    outvoted the right preprocessing's clear gender lead in calibration."""
    from analysis.evaluation import ModelSpec, prepare_model

    path = save(preset_model("rgb_0_1", age_divisor=divisor), tmp_path)
    images, ages, genders = preset_images()
    loaded = load_model(path)
    assert loaded.mapping.age_scale == "years"  # nothing known before labelled images are seen
    calibrated, scores = calibrate_preprocessing(loaded, images, ages, genders)
    assert calibrated.preprocessing == "rgb_0_1" and calibrated.mapping.age_scale == f"x{divisor}"
    age_pred, _ = calibrated.predict_batch(images)
    assert np.mean(np.abs(age_pred - ages)) < 0.5
    raw, _ = loaded.with_settings(preprocessing="rgb_0_1").predict_batch(images)  # as years: ~0.05–0.9
    assert np.mean(np.abs(raw - ages)) > 20
    assert scores.set_index("preset").loc["rgb_0_1", "age_scale"] == f"x{divisor}"
    assert any(f"read as a fraction of {divisor} years" in note for note in calibrated.notes)
    assert calibrated.cache_key() != loaded.with_settings(preprocessing="rgb_0_1").cache_key()
    # With the preprocessing given there is no calibration; the scale is still found.
    prepared, _ = prepare_model(ModelSpec(path=str(path), preprocessing="rgb_0_1"), _sample_table(tmp_path, images, ages, genders))
    assert prepared.mapping.age_scale == f"x{divisor}"
    # A scale the user gives is kept as given, even a wrong one.
    told = load_model(path, age_scale="log")
    assert "age_scale" in told.user_settings
    kept, _ = calibrate_preprocessing(told, images, ages, genders)
    assert kept.mapping.age_scale == "log"
    assert kept.with_settings(female_index=1).mapping.age_scale == "log"


def _look_alike_outputs_model(age_first: bool, same: bool = False, logits: bool = False):
    """Two 1-unit outputs named like Dense layers: one P(female) (green above blue, as
    preset_images labels), one age / 100 (a sigmoid close to 0.8·R + 0.05 over the images' range);
    same=True: both are the gender output; logits=True: neither has an activation (gender logits,
    age in years = 80·R + 5)."""
    import keras

    inputs = keras.Input((12, 12, 3))
    means = keras.layers.GlobalAveragePooling2D()(inputs)
    gender_layer = keras.layers.Dense(1, activation=None if logits else "sigmoid", name="dense_7")
    age_layer = keras.layers.Dense(1, activation=None if logits else "sigmoid", name="dense_9")
    gender, age = gender_layer(means), age_layer(means)
    model = keras.Model(inputs, [age, gender] if age_first else [gender, age])
    gender_weights = [np.array([[0.0], [40.0], [-40.0]], np.float32), np.zeros(1, np.float32)]
    gender_layer.set_weights(gender_weights)
    if same:
        age_layer.set_weights(gender_weights)
    elif logits:
        age_layer.set_weights([np.array([[80.0], [0.0], [0.0]], np.float32), np.array([5.0], np.float32)])
    else:  # sigmoid(3.2·R − 1.8) has the slope and middle of 0.8·R + 0.05 at R = 0.5 (age 45)
        age_layer.set_weights([np.array([[3.2], [0.0], [0.0]], np.float32), np.array([-1.8], np.float32)])
    return model


@pytest.mark.parametrize("age_first, logits", [(True, False), (False, False), (False, True)])
def test_outputs_their_names_and_shapes_cannot_tell_apart_are_told_apart_on_labelled_images(tmp_path, age_first, logits):
    """Two sigmoid outputs called dense_N (age trained on age/100, and gender), or two plain
    Dense(1) outputs (age in years, gender logits): the loader asked for --age-output-a and
    --gender-output-a although labelled images make the answer plain."""
    from analysis.evaluation import ModelSpec, prepare_model
    from analysis.mapping import AmbiguousOutputs

    model = _look_alike_outputs_model(age_first, logits=logits)
    path = save(model, tmp_path)
    with pytest.raises(AmbiguousOutputs, match="No output looks like gender" if logits else "Could not tell which output is gender") as caught:
        load_model(path)
    assert "the 2 ways of reading them that fit are tried on labelled images" in str(caught.value)
    assert len(caught.value.candidates) == 2
    sigmoid_note = "age output 'dense_9' ends in a sigmoid (0–1): not years as they are; labelled images decide"
    reading = next(c for c in caught.value.candidates if c.mapping.output_names[c.mapping.age_output] == "dense_9")
    assert any(n.startswith(sigmoid_note) for n in reading.notes) != logits
    images, ages, genders = preset_images(n=64)
    sample = _sample_table(tmp_path, images, ages, genders)
    raw = [np.asarray(o)[:, 0] for o in model.predict_on_batch(images.astype(np.float32) / 255.0)]
    raw_age, raw_gender = (raw[0], raw[1]) if age_first else (raw[1], raw[0])
    if logits:
        raw_gender = 1.0 / (1.0 + np.exp(-raw_gender))
    for preprocessing in ("auto", "rgb_0_1"):
        prepared, _ = prepare_model(ModelSpec(str(path), preprocessing=preprocessing), sample)
        m = prepared.mapping
        assert (m.output_names[m.age_output], m.output_names[m.gender_output]) == ("dense_9", "dense_7")
        assert prepared.preprocessing == "rgb_0_1" and m.female_index == 1 and m.gender_from_logits == logits
        assert m.age_scale == ("years" if logits else "x100")
        assert "age_output" not in prepared.user_settings  # inferred, from the labels
        age_pred, p_female = prepared.predict_batch(images)
        np.testing.assert_allclose(age_pred, raw_age * (1 if logits else 100), rtol=1e-5)  # the model's own numbers, in years
        np.testing.assert_allclose(p_female, raw_gender, rtol=1e-5, atol=1e-7)
        assert np.mean(np.abs(age_pred - ages)) < 3 and np.mean((p_female >= 0.5) == genders) == 1.0
        note = next(n for n in prepared.notes if n.startswith("outputs told apart on 64 labelled images"))
        assert "age 'dense_9', gender 'dense_7' (gender accuracy 1.000" in note
        assert "the next best reading, age 'dense_7', gender 'dense_9'" in note
        # once the labels have said how the sigmoid gives years, the "labels will decide" note goes
        assert not any(n.startswith(sigmoid_note) for n in prepared.notes)
        assert any(n.startswith("age output 'dense_9' ends in a sigmoid (0–1), so not years: read as a fraction of 100 "
                                "years") for n in prepared.notes) != logits


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("after", ["times100", "squeeze", "ops_sigmoid"])
def test_keras_ops_written_after_a_head_are_read_through(tmp_path, after, suffix):
    """`Dense(1, "sigmoid")(x) * 100` or `ops.squeeze(Dense(1)(x), -1)` as the age output: the op node
    had activation "unknown", so no output looked like age and the model was refused."""
    inputs = keras.Input((8, 8, 3))
    pooled = layers.GlobalAveragePooling2D()(layers.Rescaling(1 / 255)(inputs))
    if after == "times100":
        age = layers.Dense(1, activation="sigmoid")(pooled) * 100.0
    elif after == "squeeze":
        age = keras.ops.squeeze(layers.Dense(1)(pooled), -1)
    else:  # the gender head's sigmoid written as an op, the age a plain Dense
        age = layers.Dense(1)(pooled)
    gender = keras.ops.sigmoid(layers.Dense(1)(pooled)) if after == "ops_sigmoid" else layers.Dense(
        1, activation="sigmoid", name="gender")(pooled)
    model = keras.Model(inputs, [age, gender])
    path = save(model, tmp_path, "model" + suffix)
    loaded = load_model(path, preprocessing="rgb_0_255")
    m = loaded.mapping
    assert (m.age_output, m.gender_output, m.age_kind, m.gender_kind) == (0, 1, "regression", "sigmoid")
    assert loaded.outputs[0].activation == "linear" and loaded.outputs[1].activation == "sigmoid"
    images = images_for((8, 8))
    expected_age, expected_gender = (np.asarray(o).reshape(len(images)) for o in model.predict_on_batch(images.astype(np.float32)))
    ages, p_female = loaded.predict_batch(images)
    np.testing.assert_allclose(ages, expected_age, rtol=1e-5)
    np.testing.assert_allclose(p_female, expected_gender, rtol=1e-5)


def test_a_sigmoid_age_output_is_never_read_as_years(tmp_path):
    """An untrained model's sigmoid sits near 0.7: as years (0.7 y) it was 'closer' than ×100 (70 y)
    to the labels, and was read so, under a note saying it could not be years."""
    inputs = keras.Input((12, 12, 3))
    pooled = layers.GlobalAveragePooling2D()(inputs)
    age_layer = layers.Dense(1, activation="sigmoid", name="age")
    model = keras.Model(inputs, [age_layer(pooled), layers.Dense(1, activation="sigmoid", name="gender")(pooled)])
    age_layer.set_weights([np.zeros((3, 1), np.float32), np.array([0.85], np.float32)])  # sigmoid(0.85) ≈ 0.70
    path = save(model, tmp_path)
    images, ages, genders = preset_images(n=64)
    young = ages < 40  # labels nearer 0.7 years than 70: as years would fit "better"
    images, ages, genders = images[young], ages[young], genders[young]
    assert np.mean(np.abs(0.7 - ages)) < np.mean(np.abs(70 - ages))
    for loaded in (calibrate_preprocessing(load_model(path), images, ages, genders)[0],
                   check_age_scale(load_model(path, preprocessing="rgb_0_1"), images, ages)):
        assert loaded.mapping.age_scale in ("x100", "x116")
        age_pred, _ = loaded.predict_batch(images)
        np.testing.assert_allclose(age_pred, 0.7006 * int(loaded.mapping.age_scale[1:]), rtol=1e-3)
        assert any(n.startswith("age output 'age' ends in a sigmoid (0–1), so not years: read as a fraction of")
                   for n in loaded.notes)
        assert not any("labelled images decide" in n for n in loaded.notes)


def _named_age_unnamed_logits_model(noise: bool = False, constant: bool = False):
    """An output named age (years = 80·R + 5, as preset_images labels) and one unnamed plain
    Dense(1), dense_7, holding a gender logit: green minus blue (P(female) as labelled), or with
    noise=True the left half of the image minus the right half, which says nothing about the labels
    whatever the colour order; constant=True: always +5 ("female")."""
    inputs = keras.Input((12, 12, 3))
    means = layers.GlobalAveragePooling2D()(inputs)
    age_layer, gender_layer = layers.Dense(1, name="age"), layers.Dense(1, name="dense_7")
    if noise:
        halves = [layers.GlobalAveragePooling2D()(layers.Cropping2D(crop)(inputs)) for crop in (((0, 0), (0, 6)), ((0, 0), (6, 0)))]
        gender_in, kernel = layers.Subtract()(halves), np.full((3, 1), 100.0, np.float32)
    else:
        gender_in, kernel = means, np.array([[0.0], [40.0], [-40.0]], np.float32)
    model = keras.Model(inputs, [age_layer(means), gender_layer(gender_in)])
    age_layer.set_weights([np.array([[80.0], [0.0], [0.0]], np.float32), np.array([5.0], np.float32)])
    gender_layer.set_weights([kernel * (not constant), np.full(1, 5.0 if constant else 0.0, np.float32)])
    return model


def test_an_unnamed_output_holding_gender_logits_is_confirmed_on_labelled_images(tmp_path):
    """`age` named as such and the gender head a plain Dense(1) called dense_7 (logits, trained with
    from_logits=True): nothing looked like gender, so the model was refused until
    --gender-output-a was given. The only reading that fits is now kept when labelled images show
    its gender is no guess, and refused with its numbers when they do not."""
    from analysis.evaluation import ModelSpec, prepare_model
    from analysis.mapping import AmbiguousOutputs

    images, ages, genders = preset_images(n=64)
    sample = _sample_table(tmp_path, images, ages, genders)
    model = _named_age_unnamed_logits_model()
    path = save(model, tmp_path)
    with pytest.raises(AmbiguousOutputs, match="No output looks like gender") as caught:
        load_model(path)  # no labels to check it with
    assert "the one way of reading them that fits is checked on labelled images" in str(caught.value)
    assert caught.value.pairs == [(0, 1)] and len(caught.value.candidates) == 1
    raw_age, raw_logit = (np.asarray(o)[:, 0].astype(np.float64) for o in model.predict_on_batch(images.astype(np.float32) / 255.0))
    for preprocessing in ("auto", "rgb_0_1"):
        prepared, _ = prepare_model(ModelSpec(str(path), preprocessing=preprocessing), sample)
        m = prepared.mapping
        assert (m.age_output, m.gender_output, m.gender_from_logits, m.female_index) == (0, 1, True, 1)
        assert "gender_output" not in prepared.user_settings
        age_pred, p_female = prepared.predict_batch(images)
        np.testing.assert_allclose(age_pred, raw_age, rtol=1e-5)
        np.testing.assert_allclose(p_female, 1.0 / (1.0 + np.exp(-raw_logit)), rtol=1e-5, atol=1e-7)
        assert np.mean((p_female >= 0.5) == genders) == 1.0
        assert any(n.startswith("outputs read as age 'age', gender 'dense_7' after checking on 64 labelled images "
                                "(gender accuracy 1.000") for n in prepared.notes)

    # The same shapes with an output that does not track the gender labels: refused, with its numbers.
    from scipy import stats

    noise = _named_age_unnamed_logits_model(noise=True)
    noise_path = save(noise, tmp_path, "noise.keras")
    noise_logit = np.asarray(noise.predict_on_batch(images.astype(np.float32) / 255.0)[1])[:, 0]
    right = int(np.sum((noise_logit > 0) == genders))
    assert stats.binomtest(max(right, 64 - right), 64, 0.5, alternative="greater").pvalue > 0.01  # a guess on these labels
    with pytest.raises(AmbiguousOutputs) as caught:
        prepare_model(ModelSpec(str(noise_path)), sample)
    message = str(caught.value)
    assert "Read as age 'age', gender 'dense_7' it gave gender accuracy" in message
    assert re.search(r"do not clearly go with the labels \(Fisher's exact test p = [\d.e-]+, below 0.001 needed on these "
                     r"64 images\), so that output may not be gender; if it is gender but weak, name it", message)
    assert "--gender-output-a NAME_OR_INDEX" in message
    assert caught.value.candidates == () and caught.value.__context__ is None

    # An output calling everyone female is "right" on 44 of 64 when 44 are women: it knows nothing.
    more = preset_images(n=300, seed=3)
    women, men = np.flatnonzero(more[2] == 1)[:44], np.flatnonzero(more[2] == 0)[:20]
    chosen = np.concatenate([women, men])
    (tmp_path / "lopsided").mkdir()
    lopsided = _sample_table(tmp_path / "lopsided", *(part[chosen] for part in more))
    assert stats.binomtest(44, 64, 0.5, alternative="greater").pvalue < 0.01  # what the accuracy test accepted
    with pytest.raises(AmbiguousOutputs, match="44 women, 20 men.*do not clearly go with the labels"):
        prepare_model(ModelSpec(str(save(_named_age_unnamed_logits_model(constant=True), tmp_path, "constant.keras"))), lopsided)
    # The right output with a female column the user gave wrongly: said so, not "may not be gender".
    with pytest.raises(AmbiguousOutputs, match=r"go clearly against the labels with the female_index you gave \(0\)"):
        prepare_model(ModelSpec(str(path), female_index=0, preprocessing="rgb_0_1"), sample)
    with pytest.raises(AmbiguousOutputs, match=r"or the female_index you gave \(0\) is wrong"):
        prepare_model(ModelSpec(str(path), female_index=0), sample)  # it misled the preprocessing too
    # Six images cannot confirm anything, even all right.
    (tmp_path / "few").mkdir()
    few = _sample_table(tmp_path / "few", *(part[:6] for part in (images, ages, genders)))
    with pytest.raises(AmbiguousOutputs, match="too few of each gender to tell whether that output is gender"):
        prepare_model(ModelSpec(str(path)), few)


def test_look_alike_outputs_the_labels_cannot_separate_are_refused_with_what_was_tried(tmp_path):
    from analysis.evaluation import ModelSpec, prepare_model
    from analysis.mapping import AmbiguousOutputs

    path = save(_look_alike_outputs_model(age_first=True, same=True), tmp_path)
    images, ages, genders = preset_images(n=64)
    with pytest.raises(AmbiguousOutputs) as caught:
        prepare_model(ModelSpec(str(path)), _sample_table(tmp_path, images, ages, genders))
    message = str(caught.value)
    # a failure the app keeps for the session holds no Keras model (readings, context, traceback frames)
    assert caught.value.candidates == () and caught.value.__context__ is None
    assert "Could not tell which output is gender" in message and "[0] dense_9" in message
    assert "tried on 64 labelled images and none was clearly the best" in message
    # both readings, with their numbers (the same: the two outputs are one and the same)
    scored = dict(re.findall(r"(age '\w+', gender '\w+'): (gender accuracy [\d.]+, age MAE [\d.]+ years)", message))
    assert set(scored) == {"age 'dense_9', gender 'dense_7'", "age 'dense_7', gender 'dense_9'"}
    assert len(set(scored.values())) == 1
    assert "--age-output-a NAME_OR_INDEX" in message  # how to settle it
    # Saying which is which settles it without labels.
    told = load_model(path, age_output="dense_9", gender_output="dense_7")
    assert told.mapping.output_names[told.mapping.gender_output] == "dense_7"


def _sample_table(folder, images, ages, genders):
    """A Sample table over PNG copies of `images` (for prepare_model)."""
    from PIL import Image

    rows = []
    for i, (image, age, gender) in enumerate(zip(images, ages, genders)):
        path = folder / f"{i}.png"
        Image.fromarray(image).save(path)
        rows.append({"image_id": str(i), "path": str(path), "age": float(age), "gender": int(gender), "ethnicity": 0})
    return pd.DataFrame(rows)


def test_the_age_scale_rule_picks_log_years_and_leaves_years_alone():
    from analysis.models import _pick_age_scale

    rng = np.random.default_rng(0)
    ages = rng.uniform(1, 90, 64)
    assert _pick_age_scale(np.log(ages) + rng.normal(0, 0.1, 64), ages).scale == "log"
    assert _pick_age_scale(ages + rng.normal(0, 8, 64), ages).scale == "years"
    exact = _pick_age_scale(ages / 116 + rng.normal(0, 0.02, 64), ages)
    assert exact.scale == "x116" and exact.doubt is None
    # A model that is simply bad in years is not "rescued" by a reading: ×100 of years is worse.
    assert _pick_age_scale(np.full(64, 30.0) + rng.normal(0, 3, 64), ages).scale == "years"


@pytest.mark.parametrize("constant", [0.3, 3.4])
def test_an_output_that_carries_no_age_is_not_rescued_by_a_reading(constant):
    """A constant 0.3 read ×100 (or 3.4 as log-years) halved a dead model's MAE."""
    from analysis.models import _pick_age_scale

    rng = np.random.default_rng(1)
    ages = rng.uniform(1, 90, 64)
    for output in (np.full(64, constant), constant + rng.normal(0, 0.01, 64)):
        choice = _pick_age_scale(output, ages)
        assert choice.scale == "years" and "do not follow the labelled ages" in choice.doubt


def test_the_age_scale_is_not_judged_on_a_narrow_age_range():
    """On babies alone exp(output ≈ 0) ≈ 1 year fits, whatever the model's real reading."""
    from analysis.models import _pick_age_scale

    rng = np.random.default_rng(2)
    babies = rng.uniform(0, 3, 64)
    choice = _pick_age_scale(babies / 116 + rng.normal(0, 0.02, 64), babies)
    assert choice.scale == "years" and "spread too little" in choice.doubt
    # A 0–1 output is never read as log-years (exp of it spans 1–2.7 years).
    ages = rng.uniform(1, 90, 64)
    assert _pick_age_scale(rng.uniform(0, 0.2, 64), ages).scale != "log"


def test_a_tiny_sample_still_finds_an_overwhelming_reading(tmp_path):
    """With 6 images the paired test cannot reach p < 0.01: the right preprocessing was lost again."""
    path = save(preset_model("rgb_0_1", age_divisor=116), tmp_path)
    images, ages, genders = preset_images(n=6, seed=3)
    calibrated, _ = calibrate_preprocessing(load_model(path), images, ages, genders)
    assert calibrated.preprocessing == "rgb_0_1" and calibrated.mapping.age_scale == "x116"


@pytest.mark.parametrize("value, expected", [("100", "x100"), (116, "x116"), ("×120", "x120"), ("LOG", "log"), ("years", "years")])
def test_age_scale_values(value, expected):
    from analysis.mapping import parse_age_scale

    assert parse_age_scale(value) == expected


def test_bad_age_scales_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="age scale must be"):
        load_model(save(preset_model("rgb_0_1"), tmp_path), age_scale="decades")


def test_the_reading_line_says_when_calibration_changed_the_colour_order(tmp_path):
    from analysis.report import model_reading

    loaded = load_model(save(preset_model("bgr_0_1", inside=True), tmp_path))
    assert "rgb_0_255 (from the model's own scaling layer)" in model_reading(loaded, False)
    calibrated, _ = calibrate_preprocessing(loaded, *preset_images())
    assert calibrated.preprocessing == "bgr_0_255"
    assert "bgr_0_255 (the model's own scaling layer, in the other colour order chosen on the sample)" in model_reading(calibrated, True)


def test_calibration_confirms_preprocessing_inside_the_model(tmp_path):
    loaded = load_model(save(preset_model("rgb_0_1", inside=True), tmp_path))
    assert loaded.preprocessing_inside and loaded.preprocessing == "rgb_0_255"
    calibrated, scores = calibrate_preprocessing(loaded, *preset_images())
    assert calibrated.preprocessing == "rgb_0_255" and calibrated.preprocessing_inside
    assert scores.loc[scores["chosen"], "inside"].item()


def test_calibration_prefers_the_inside_preset_on_ties(tmp_path):
    # Rescaling(2, offset=-1) wants [0, 1] input; the heads ignore the pixels, so every preset ties.
    inputs = keras.Input((12, 12, 3))
    features = layers.GlobalAveragePooling2D()(layers.Rescaling(2.0, offset=-1.0)(inputs))
    model = keras.Model(inputs, {"age": layers.Dense(1, kernel_initializer="zeros", bias_initializer="ones")(features),
                                 "gender": layers.Dense(1, activation="sigmoid", kernel_initializer="zeros")(features)})
    loaded = load_model(save(model, tmp_path))
    assert loaded.preprocessing == "rgb_0_1" and loaded.preprocessing_inside
    calibrated, scores = calibrate_preprocessing(loaded, *preset_images(n=8))
    assert scores["combined_rank"].nunique() == 1
    assert calibrated.preprocessing == "rgb_0_1"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_never_overrides_the_preprocessing_declared_inside(tmp_path, seed):
    # An untrained self-describing model (Rescaling inside) on random labels: some other preset
    # will rank first by chance, but only a significant difference may override the file.
    model = heads_model((12, 12, 3), rescaling=(1 / 255, 0), seed=seed)
    loaded = load_model(save(model, tmp_path))
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (64, 12, 12, 3), dtype=np.uint8)
    ages, genders = rng.uniform(1, 90, 64), rng.integers(0, 2, 64)
    calibrated, scores = calibrate_preprocessing(loaded, images, ages, genders)
    assert calibrated.preprocessing == "rgb_0_255"
    assert scores.loc[scores["chosen"], "preset"].item() == "rgb_0_255"


def test_clear_evidence_still_overrides_the_inside_preset(tmp_path):
    # Rescaling(1/255) inside, but the model was built for BGR channel order (cv2-style training).
    loaded = load_model(save(preset_model("bgr_0_1", inside=True), tmp_path))
    assert loaded.preprocessing == "rgb_0_255" and loaded.preprocessing_inside
    calibrated, _ = calibrate_preprocessing(loaded, *preset_images(n=64))
    assert calibrated.preprocessing == "bgr_0_255"


def test_calibration_flips_a_reversed_gender_convention_only_when_not_given(tmp_path):
    path = save(preset_model("bgr_0_1", flipped_gender=True), tmp_path)
    images, ages, genders = preset_images()
    calibrated, scores = calibrate_preprocessing(load_model(path), images, ages, genders)
    assert calibrated.preprocessing == "bgr_0_1"
    assert calibrated.mapping.female_index == 0
    assert any("gender convention flipped" in n for n in calibrated.notes)
    assert scores.loc[scores["chosen"], "gender_acc"].item() == 1.0
    # The chosen preset's note gives the accuracy the table shows (it gave the one before the flip).
    assert any("bgr_0_1 chosen by calibration on 48 labelled images (gender accuracy 1.000 with the gender "
               "convention flipped" in n for n in calibrated.notes), calibrated.notes
    p_female = calibrated.predict_batch(images)[1]
    assert np.mean((p_female >= 0.5) == genders) == 1.0

    told, _ = calibrate_preprocessing(load_model(path, female_index=1), images, ages, genders)
    assert told.mapping.female_index == 1  # the caller said so: never overridden


def test_a_given_preprocessing_still_gets_its_gender_convention_checked(tmp_path):
    """With the preprocessing set by the user there is no calibration, but an inferred female column
    that is below chance on labelled images is flipped all the same — never one the user gave."""
    from PIL import Image

    from analysis.evaluation import ModelSpec, prepare_model

    path = save(preset_model("bgr_0_1", flipped_gender=True), tmp_path)
    images, ages, genders = preset_images(n=40)
    folder = tmp_path / "faces"
    folder.mkdir()
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    sample = pd.DataFrame({"path": [str(p) for p in paths], "age": ages, "gender": genders})

    prepared, scores = prepare_model(ModelSpec(str(path), preprocessing="bgr_0_1"), sample)
    assert scores is None and prepared.preprocessing == "bgr_0_1"
    assert prepared.mapping.female_index == 0
    assert any("gender convention flipped" in n for n in prepared.notes)
    assert not any(n.startswith("assumed ") for n in prepared.notes)
    assert np.mean((prepared.predict_batch(images)[1] >= 0.5) == genders) == 1.0

    told, _ = prepare_model(ModelSpec(str(path), preprocessing="bgr_0_1", female_index=1), sample)
    assert told.mapping.female_index == 1
    right = save(preset_model("bgr_0_1"), tmp_path, "right.keras")
    kept = check_gender_convention(load_model(right, preprocessing="bgr_0_1"), images, genders)
    assert kept.mapping.female_index == 1 and not any("flipped" in n for n in kept.notes)


def test_a_model_biased_to_one_gender_is_not_mistaken_for_an_inverted_one(tmp_path):
    """A model that calls everyone male is 0% right on an all-female sample; that is bias, not a
    P(male) output, and with one gender the convention cannot be judged at all."""
    inputs = keras.Input((12, 12, 3))
    features = layers.GlobalAveragePooling2D()(inputs)
    always_male = layers.Dense(1, activation="sigmoid", name="gender", kernel_initializer="zeros",
                               bias_initializer=keras.initializers.Constant(-5.0))(features)
    model = keras.Model(inputs, {"age": layers.Dense(1, name="age")(features), "gender": always_male})
    path = save(model, tmp_path)
    images, ages, genders = preset_images(n=64)
    females = genders == 1
    assert females.sum() >= 20 and (~females).sum() >= 8
    for calibrate in (True, False):
        loaded = load_model(path) if calibrate else load_model(path, preprocessing="rgb_0_255")
        if calibrate:
            result, _ = calibrate_preprocessing(loaded, images[females], ages[females], genders[females])
        else:
            result = check_gender_convention(loaded, images[females], genders[females])
        assert result.mapping.female_index == 1
        assert any("cannot be told" in n and "0 male" in n for n in result.notes)
        assert np.mean((result.predict_batch(images[females])[1] >= 0.5) == 1) == 0.0  # reported as it is
    # 8 men and the women: 21% right overall (binomial p < 0.001, the old rule flipped that), but
    # right on every man and wrong on every woman — biased, not inverted.
    mixed_rows = np.concatenate([np.flatnonzero(~females)[:8], np.flatnonzero(females)])
    assert np.mean(genders[mixed_rows] == 0) < 0.25
    mixed, _ = calibrate_preprocessing(load_model(path), images[mixed_rows], ages[mixed_rows], genders[mixed_rows])
    assert mixed.mapping.female_index == 1 and not any("flipped" in n for n in mixed.notes)
    told = check_gender_convention(load_model(path, preprocessing="rgb_0_255"), images[mixed_rows], genders[mixed_rows])
    assert told.mapping.female_index == 1 and not any("flipped" in n for n in told.notes)
    # The inverted model on the same mixed images is wrong on both genders: flipped, as before.
    inverted, _ = calibrate_preprocessing(load_model(save(preset_model("rgb_0_1", flipped_gender=True), tmp_path,
                                                          "inverted.keras")), images, ages, genders)
    assert inverted.mapping.female_index == 0


def test_a_preset_is_ranked_on_flipped_accuracy_only_if_it_would_be_flipped(tmp_path, monkeypatch):
    """Outputs made up per preset: under rgb_0_1 70% right on each gender; under bgr_0_1 right on
    18 of 32 men and no woman (28%: biased, not inverted, so never flipped); elsewhere P = 0.5 for
    everyone (50%). Ranking bgr_0_1 on 1 − 28% = 72% would pick it and then not flip it."""
    inputs = keras.Input((8, 8, 3))
    features = layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, {"age": layers.Dense(1, name="age")(features),
                                 "gender": layers.Dense(1, activation="sigmoid", name="gender")(features)})
    loaded = load_model(save(model, tmp_path))
    n = 64
    genders = np.array([0] * 32 + [1] * 32)

    def made_up(self, images):
        p = np.full(n, 0.5)
        if self.preprocessing == "rgb_0_1":
            p = np.where(genders == 1, 0.9, 0.1)
            p[:10], p[32:42] = 0.9, 0.1  # 10 wrong of each gender
        elif self.preprocessing == "bgr_0_1":
            p = np.full(n, 0.1)
            p[:14] = 0.9  # 14 men called female
        p = p if self.mapping.female_index == 1 else 1 - p
        return np.full(n, 30.0, np.float32), p.astype(np.float32)

    monkeypatch.setattr(LoadedModel, "predict_batch", made_up)
    calibrated, scores = calibrate_preprocessing(loaded, np.zeros((n, 8, 8, 3), np.uint8), np.full(n, 30.0), genders)
    accuracy = scores.set_index("preset")["gender_acc"]
    assert accuracy["rgb_0_1"] == pytest.approx(44 / 64) and accuracy["bgr_0_1"] == pytest.approx(18 / 64)
    assert calibrated.preprocessing == "rgb_0_1" and calibrated.mapping.female_index == 1


def _channel_age_model(k: float):
    """Rescaling(1/255) inside, then age = 30 + k × (mean of the first channel the model sees, in
    [0, 1]); the gender head ignores the image. Fed BGR, the first channel is blue."""
    inputs = keras.Input((12, 12, 3))
    means = layers.GlobalAveragePooling2D()(layers.Rescaling(1 / 255)(inputs))
    age = layers.Dense(1, name="age")
    gender = layers.Dense(1, activation="sigmoid", name="gender", kernel_initializer="zeros")
    model = keras.Model(inputs, {"age": age(means), "gender": gender(means)})
    age.set_weights([np.array([[k], [0.0], [0.0]], np.float32), np.array([30.0], np.float32)])
    return model


@pytest.mark.parametrize("k, switches", [(0.05, False), (2.0, True), (40.0, True)])
def test_a_consistent_but_negligible_gain_does_not_override_the_inside_preset(tmp_path, k, switches):
    """Labels made for BGR input: fed RGB, every age is off by k × |red − blue| (up to 0.05 × 0.6
    = 0.03 years for k = 0.05). Wilcoxon finds that consistent, but it is no reason to change what
    the file declares; at k = 2 (about half a year on average) or 40 (years) it is."""
    images, _, genders = preset_images(n=64)
    blue = images[..., 2].reshape(len(images), -1).mean(axis=1) / 255.0
    ages = 30 + k * blue
    loaded = load_model(save(_channel_age_model(k), tmp_path))
    assert loaded.preprocessing == "rgb_0_255" and loaded.preprocessing_inside
    calibrated, scores = calibrate_preprocessing(loaded, images, ages, genders)
    errors = scores.set_index("preset")["age_mae"]
    assert errors["bgr_0_255"] < errors["rgb_0_255"]  # BGR *is* better, by a hair or by a lot
    assert calibrated.preprocessing == ("bgr_0_255" if switches else "rgb_0_255")


def test_calibration_says_when_it_cannot_tell_presets_apart(tmp_path):
    inputs = keras.Input((12, 12, 3))
    features = layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, {"age": layers.Dense(1, kernel_initializer="zeros", bias_initializer="ones")(features),
                                 "gender": layers.Dense(1, activation="sigmoid", kernel_initializer="zeros")(features)})
    calibrated, scores = calibrate_preprocessing(load_model(save(model, tmp_path)), *preset_images(n=16))
    assert scores["combined_rank"].nunique() == 1
    assert any("could not clearly tell" in n for n in calibrated.notes)
    clear, _ = calibrate_preprocessing(load_model(save(preset_model("bgr_0_1"), tmp_path, "clear.keras")),
                                       *preset_images(n=64))
    assert clear.preprocessing == "bgr_0_1" and not any("could not clearly tell" in n for n in clear.notes)


def test_calibration_rejects_mismatched_inputs(tmp_path):
    loaded = load_model(save(preset_model("rgb_0_1"), tmp_path))
    images, ages, genders = preset_images(n=6)
    with pytest.raises(ValueError, match="same length"):
        calibrate_preprocessing(loaded, images, ages[:5], genders)
    with pytest.raises(ValueError, match="n ≥ 1"):
        calibrate_preprocessing(loaded, images[:0], ages[:0], genders[:0])


# ---------------------------------------------------------------- settings, cache key, overrides


def test_settings_cache_key_and_overrides(tmp_path):
    path = save(heads_model((16, 16, 3), gender_kind="softmax"), tmp_path)
    loaded = load_model(path, name="Model A")
    again = load_model(path, name="Another name")
    assert isinstance(loaded, LoadedModel) and isinstance(loaded.mapping, OutputMapping)
    assert loaded.name == "Model A"
    assert loaded.cache_key() == again.cache_key()  # the display name does not change predictions
    settings = loaded.settings()
    assert json.loads(json.dumps(settings)) == settings
    assert settings["preprocessing"] == "rgb_0_1" and settings["mapping"]["female_index"] == 1

    keys = {loaded.cache_key()}
    for change in ({"preprocessing": "bgr_0_1"}, {"female_index": 0}, {"input_size": None, "age_kind": None}):
        changed = loaded.with_settings(**change)
        keys.add(changed.cache_key())
    assert len(keys) == 3  # the last change changes nothing
    flipped = loaded.with_settings(female_index=0)
    assert flipped.mapping.female_index == 0 and flipped.mapping.gender_output == loaded.mapping.gender_output
    assert "female_index" in flipped.user_settings
    assert "name" not in loaded.with_settings(name="renamed").user_settings  # a label, not how to read it
    with pytest.raises(ModelLoadError, match="2 classes and their ages are unknown"):
        loaded.with_settings(age_output="gender", gender_output="age")  # a 2-unit head cannot be age
    with pytest.raises(ValueError, match="unknown setting"):
        loaded.with_settings(colour="blue")

    description = loaded.describe()
    assert json.loads(json.dumps(description)) == description
    assert description["input_size"] == [16, 16] and description["channels"] == 3
    assert description["preprocessing"] == "rgb_0_1" and description["preprocessing_inside"] is False
    assert [o["role"] for o in description["outputs"]] == ["age", "gender"]
    assert description["gender"]["kind"] == "softmax" and description["notes"] == list(loaded.notes)
    assert "keras_model" not in repr(loaded)


def test_load_arguments_are_validated(tmp_path):
    path = save(heads_model((16, 16, 3)), tmp_path)
    with pytest.raises(ModelLoadError, match="unknown preprocessing"):
        load_model(path, preprocessing="rgb")
    with pytest.raises(ModelLoadError, match="female_index must be 0 or 1"):
        load_model(path, female_index=2)
    with pytest.raises(ModelLoadError, match="age_kind"):
        load_model(path, age_kind="bins")
    with pytest.raises(ModelLoadError, match="regression age output needs 1 unit"):
        load_model(save(heads_model((16, 16, 3), age_classes=101), tmp_path, "c.keras"), age_kind="regression")


def test_an_empty_batch_gives_empty_predictions(tmp_path):
    loaded = load_model(save(heads_model((16, 16, 3)), tmp_path))
    ages, p_female = loaded.predict_batch(np.zeros((0, 16, 16, 3), np.uint8))
    assert ages.shape == p_female.shape == (0,)


# ------------------------------------------------ messages for models that cannot be read as they are


def test_an_age_head_over_unknown_groups_asks_for_that_many_ages(tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, {"age": layers.Dense(8, activation="softmax", name="age")(x),
                                 "gender": layers.Dense(1, activation="sigmoid", name="gender")(x)})
    path = save(model, tmp_path)
    with pytest.raises(ModelLoadError) as error:
        load_model(path)
    text = str(error.value)
    assert "has 8 classes and their ages are unknown" in text and "--age-classes-a a1,…,a8 (8 numbers" in text
    assert "0:101" not in text  # the generic example of 101 single years does not fit 8 groups
    loaded = load_model(path, age_class_values=(1, 6, 15, 25, 35, 45, 55, 75))
    assert loaded.mapping.age_kind == "classes" and loaded.mapping.age_class_values[-1] == 75


def test_a_model_without_an_age_output_is_told_so(tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, {"gender": layers.Dense(1, activation="sigmoid", name="gender")(x),
                                 "race": layers.Dense(5, activation="softmax", name="race")(x)})
    with pytest.raises(ModelLoadError, match="No output looks like age .*cannot be evaluated here"):
        load_model(save(model, tmp_path))


@keras.saving.register_keras_serializable(package="facecheck_tests")
class AgeGender(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.pool = layers.GlobalAveragePooling2D()
        self.age = layers.Dense(1)
        self.gender = layers.Dense(1, activation="sigmoid")

    def call(self, x):
        x = self.pool(x)
        return {"age": self.age(x), "gender": self.gender(x)}


def test_a_subclassed_model_is_named_as_such(tmp_path):
    model = AgeGender()
    model(np.zeros((1, 8, 8, 3), np.float32))
    path = tmp_path / "subclassed.keras"
    model.save(path)
    with pytest.raises(ModelFileError) as error:
        load_model(path)
    text = str(error.value)
    assert "is a subclassed model (class AgeGender)" in text and "functional API" in text and "?" not in text


def test_a_zip_holding_a_model_says_to_unzip_it(tmp_path):
    inner = save(preset_model("rgb_0_1"), tmp_path)
    outer = tmp_path / "model.zip"
    with zipfile.ZipFile(outer, "w") as archive:
        archive.write(inner, "my_model.keras")
    with pytest.raises(ModelFileError, match=r"no config.json inside\)\. It holds my_model.keras: unzip it and give that file"):
        load_model(outer)
