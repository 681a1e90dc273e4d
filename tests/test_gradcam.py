"""Grad-CAM on tiny models built here: planted signals, a randomisation sanity check, every model
layout analysis.models can load, and tf-keras-vis as an oracle on a flat model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from analysis import gradcam as G
from analysis.models import load_model

# Keras' own model.save and tf-keras-vis' scipy import warn on NumPy 2 / SciPy 1.17; not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Please import `zoom`:DeprecationWarning"),
]

SIZE = 32
# Planted regions (row_start, row_stop, col_start, col_stop) in a 32×32 image.
GENDER_BOX = (3, 13, 19, 29)
AGE_BOX = (19, 29, 3, 13)


# ---------------------------------------------------------------- synthetic faces and models


def planted_faces(n: int, seed: int, age_contrast: float = 1.2):
    """Grey noise faces; gender is a bright (female) or dark (male) square in GENDER_BOX, age is the
    contrast of a checkerboard in AGE_BOX (grey levels per year). Nothing else carries a label."""
    rng = np.random.default_rng(seed)
    images = rng.normal(128.0, 25.0, (n, SIZE, SIZE, 3))
    gender = rng.integers(0, 2, n)
    age = rng.uniform(1.0, 90.0, n)
    r0, r1, c0, c1 = GENDER_BOX
    images[:, r0:r1, c0:c1, :] = np.where(gender == 1, 218.0, 38.0)[:, None, None, None]
    r0, r1, c0, c1 = AGE_BOX
    rows, cols = np.mgrid[r0:r1, c0:c1]
    checker = np.where((rows + cols) % 2 == 0, 1.0, -1.0)
    images[:, r0:r1, c0:c1, :] = 128.0 + age_contrast * age[:, None, None, None] * checker[None, :, :, None]
    return np.clip(images, 0, 255).astype(np.uint8), gender, age


def mass_inside(maps: np.ndarray, box, margin: int = 3) -> np.ndarray:
    """Share of each map's total mass inside `box` grown by `margin` pixels (the receptive field)."""
    r0, r1, c0, c1 = box
    inside = maps[:, max(r0 - margin, 0) : r1 + margin, max(c0 - margin, 0) : c1 + margin].sum(axis=(1, 2))
    return inside / maps.sum(axis=(1, 2))


def save_and_load(model, tmp_path, name: str, **overrides):
    path = tmp_path / f"{name}.keras"
    model.save(path)
    return load_model(path, **overrides)


def conv_trunk(x):
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    return keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2")(x)


def heads(features, gender_activation="sigmoid", gender_units=1):
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(features)
    age = keras.layers.Dense(1, name="age")(pooled)
    gender = keras.layers.Dense(gender_units, activation=gender_activation, name="gender")(pooled)
    return age, gender


def flat_model(seed: int = 0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(inputs)
    age, gender = heads(conv_trunk(x))
    return keras.Model(inputs, [age, gender], name="flat")


def copy_weights(source, nested):
    """Give a nested model the flat model's weights: c1, c2 inside the backbone, heads outside."""
    backbone = nested.get_layer("backbone")
    for name in ("c1", "c2"):
        backbone.get_layer(name).set_weights(source.get_layer(name).get_weights())
    for name in ("age", "gender"):
        nested.get_layer(name).set_weights(source.get_layer(name).get_weights())


@pytest.fixture(scope="module")
def faces():
    return planted_faces(12, seed=100)


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    return save_and_load(flat_model(), tmp_path_factory.mktemp("flat"), "flat")


# ---------------------------------------------------------------- planted signal, fixed weights


def fixed_weight_model(gender_scale: float = 4.0, softmax_female_index: int | None = None):
    """The gender logit is 4 × (bright - dark) evidence inside the gender box only.

    c1 has four channels computed from the mean pixel: 0 = bright above a threshold, 1 = dark above a
    threshold, 2 and 3 = the same without threshold (they fire on the noise everywhere, and only
    the age head reads them). Grad-CAM for gender must give channels 2 and 3 zero weight.
    """
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(inputs)
    c1 = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")
    x = keras.layers.MaxPooling2D(name="pool")(c1(x))
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    age_layer = keras.layers.Dense(1, name="age")
    units = 1 if softmax_female_index is None else 2
    gender_layer = keras.layers.Dense(units, activation="sigmoid" if units == 1 else "softmax", name="gender")
    model = keras.Model(inputs, [age_layer(pooled), gender_layer(pooled)])

    kernel = np.zeros((3, 3, 3, 4), np.float32)
    kernel[1, 1, :, 0] = kernel[1, 1, :, 2] = 1 / 3
    kernel[1, 1, :, 1] = kernel[1, 1, :, 3] = -1 / 3
    c1.set_weights([kernel, np.array([-0.4, -0.4, 0.0, 0.0], np.float32)])
    age_layer.set_weights([np.array([[0.0], [0.0], [40.0], [40.0]], np.float32), np.array([10.0], np.float32)])
    evidence = np.array([gender_scale, -gender_scale, 0.0, 0.0], np.float32)  # female log-odds per channel
    if softmax_female_index is None:
        gender_layer.set_weights([evidence[:, None], np.zeros(1, np.float32)])
    else:
        columns = np.zeros((4, 2), np.float32)
        columns[:, softmax_female_index] = evidence / 2
        columns[:, 1 - softmax_female_index] = -evidence / 2
        gender_layer.set_weights([columns, np.zeros(2, np.float32)])
    return model


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    return save_and_load(fixed_weight_model(), tmp_path_factory.mktemp("fixed"), "fixed")


@pytest.mark.parametrize("method", G.METHODS)
def test_planted_gender_evidence_sits_in_the_gender_box(fixed, method):
    images, gender, _ = planted_faces(12, seed=100, age_contrast=0.0)
    female = G.gradcam(fixed, images[gender == 1], "gender_female", method=method)
    male = G.gradcam(fixed, images[gender == 0], "gender_male", method=method)
    # a uniform map would put (16 × 16) / 32² = 25 % of its mass inside the grown box
    assert mass_inside(female, GENDER_BOX).min() > 0.9
    assert mass_inside(male, GENDER_BOX).min() > 0.9


def test_gradcam_shows_evidence_the_head_cancels_as_none(fixed, faces):
    """The age checkerboard fires the bright and the dark detector alike, and the gender logit
    (bright - dark) cancels it. Grad-CAM weighs both channels and leaves it out. (Grad-CAM++ keeps
    only positive gradients, so it would light the checkerboard up as "female": a known property.)"""
    images, gender, age = faces
    assert age[gender == 1].max() > 60  # high-contrast checkerboards are present
    female = G.gradcam(fixed, images[gender == 1], "gender_female")
    assert mass_inside(female, GENDER_BOX).min() > 0.9


def test_saturated_sigmoid_still_explained_through_its_logit(tmp_path, faces):
    images, gender, _ = faces
    calm = save_and_load(fixed_weight_model(gender_scale=4.0), tmp_path, "calm")
    saturated = save_and_load(fixed_weight_model(gender_scale=4000.0), tmp_path, "saturated")
    _, p_female = saturated.predict_batch(images)
    assert set(np.round(p_female, 6)) <= {0.0, 1.0}  # the probability has no gradient left
    for target, faces_of in (("gender_female", gender == 1), ("gender_male", gender == 0)):
        expected = G.gradcam(calm, images[faces_of], target)
        got = G.gradcam(saturated, images[faces_of], target)
        assert got.max(axis=(1, 2)).min() > 0.99
        np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("female_index", [0, 1])
def test_softmax_gender_head_explains_the_same_log_odds(tmp_path, fixed, faces, female_index):
    images, _, _ = faces
    softmax = save_and_load(
        fixed_weight_model(softmax_female_index=female_index), tmp_path, f"softmax{female_index}",
        female_index=female_index,
    )
    assert softmax.mapping.gender_kind == "softmax"
    for target in ("gender_female", "gender_male"):
        np.testing.assert_allclose(G.gradcam(softmax, images, target), G.gradcam(fixed, images, target), atol=1e-5)


# ---------------------------------------------------------------- planted signal, trained; sanity check


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small CNN trained for a few seconds on planted faces (gender box + age checkerboard)."""
    keras.utils.set_random_seed(0)
    images, gender, age = planted_faces(768, seed=0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c1")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="features")(x)
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    age_out = keras.layers.Rescaling(100.0, name="age")(keras.layers.Dense(1, name="age_unit")(pooled))
    gender_out = keras.layers.Dense(1, activation="sigmoid", name="gender")(pooled)
    model = keras.Model(inputs, {"age": age_out, "gender": gender_out})
    model.compile(
        keras.optimizers.Adam(5e-3),
        {"age": "mae", "gender": "binary_crossentropy"},
        loss_weights={"age": 0.02, "gender": 1.0},
    )
    model.fit(images, {"age": age, "gender": gender}, epochs=12, batch_size=32, verbose=0)
    return save_and_load(model, tmp_path_factory.mktemp("trained"), "trained")


def test_trained_model_learned_the_planted_signals(trained):
    images, gender, age = planted_faces(64, seed=7)
    age_pred, p_female = trained.predict_batch(images)
    assert ((p_female >= 0.5) == gender).mean() > 0.95
    assert np.abs(age_pred - age).mean() < 8.0


def test_trained_model_looks_where_the_signal_is(trained):
    images, gender, age = planted_faces(24, seed=101)
    _, p_female = trained.predict_batch(images)
    predicted_female = p_female >= 0.5
    female = G.gradcam(trained, images[predicted_female], "gender_female")
    male = G.gradcam(trained, images[~predicted_female], "gender_male")
    gender_mass = np.concatenate([mass_inside(female, GENDER_BOX), mass_inside(male, GENDER_BOX)])
    assert gender_mass.mean() > 0.7
    older = G.gradcam(trained, images[age > 45], "age_older")
    assert mass_inside(older, AGE_BOX).mean() > 0.7
    assert mass_inside(older, GENDER_BOX).mean() < 0.2  # age evidence is not where gender is


def spearman_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.stats import spearmanr

    return np.array([spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(a, b)])


def test_randomising_the_top_layers_changes_the_maps(trained, tmp_path):
    """Adebayo et al. (2018) model-randomisation check: re-initialise the layers above c1."""
    images, _, age = planted_faces(8, seed=102)
    images = images[np.argsort(age)[-6:]]  # older faces: the age map has something to show
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 2, images.shape), 0, 255).astype(np.uint8)

    keras.utils.set_random_seed(123)
    model = trained.keras_model
    randomised = keras.models.clone_model(model)  # fresh initial weights everywhere ...
    randomised.get_layer("c1").set_weights(model.get_layer("c1").get_weights())  # ... but the bottom layer
    randomised_loaded = save_and_load(randomised, tmp_path, "randomised")

    for target in ("age_older", "gender_female"):
        maps = G.gradcam(trained, images, target)
        self_agreement = spearman_per_image(maps, G.gradcam(trained, noisy, target)).mean()
        after_randomising = np.nan_to_num(spearman_per_image(maps, G.gradcam(randomised_loaded, images, target)))
        assert self_agreement > 0.8
        assert after_randomising.mean() < self_agreement - 0.4


def test_older_and_younger_maps_differ(trained):
    images, _, _ = planted_faces(6, seed=103)
    older = G.gradcam(trained, images, "age_older")
    younger = G.gradcam(trained, images, "age_younger")
    assert np.abs(older - younger).mean() > 0.1


def test_own_answer_maps_follow_each_faces_answer(trained):
    """own_answer_targets + by_target (the report's grids and the app's default): each face gets
    the map of the direction its own answer took, computed per target and put back in order."""
    import pandas as pd

    images, _, ages = planted_faces(6, seed=104)
    predicted_age, p_female = trained.predict_batch(images)
    rows = pd.DataFrame({"age": ages, "age_pred_A": predicted_age, "p_female_A": p_female})
    rows.loc[0, "age"], rows.loc[1, "age"] = rows.loc[0, "age_pred_A"] + 5, rows.loc[1, "age_pred_A"] - 5
    age_targets = G.own_answer_targets(rows, "A", "age")
    assert age_targets[0] == "age_younger" and age_targets[1] == "age_older"  # under- and over-estimated
    gender_targets = G.own_answer_targets(rows, "A", "gender")
    assert list(gender_targets) == ["gender_female" if p >= 0.5 else "gender_male" for p in p_female]
    maps = np.stack(G.by_target(age_targets, lambda target, chosen: G.gradcam(trained, images[chosen], target)))
    for i, target in enumerate(age_targets):
        np.testing.assert_allclose(maps[i], G.gradcam(trained, images[i], str(target))[0], atol=1e-5)
    with pytest.raises(ValueError, match="unknown head"):
        G.own_answer_targets(rows, "A", "ethnicity")


# ---------------------------------------------------------------- oracle: tf-keras-vis on a flat model


def min_max(maps: np.ndarray) -> np.ndarray:
    low = maps.min(axis=(1, 2), keepdims=True)
    return (maps - low) / (maps.max(axis=(1, 2), keepdims=True) - low)


@pytest.mark.parametrize("method", G.METHODS)
def test_matches_tf_keras_vis_on_a_flat_model(flat, faces, method):
    """tf-keras-vis 0.8.7 computes the same map from the same score on the same layer.

    Apples to apples: its un-normalised map goes through the same per-image min-max as ours (it adds
    1e-7 to the range, which matters for Grad-CAM++ because it scales the map by exp(score)). It
    upsamples with scipy.ndimage.zoom(order=1) aligning corner pixels; we align pixel centres (a
    feature cell covers its stride of input pixels), so at input size its low-resolution map is
    upsampled with half-pixel centres (zoom(..., grid_mode=True)) before the normalisation.
    """
    from scipy.ndimage import zoom
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear

    images, _, _ = faces
    x = flat.prepare(images)
    age_index, gender_index = flat.mapping.age_output, flat.mapping.gender_output
    # ReplaceToLinear turns the sigmoid head into its logit, which is what we explain.
    oracle = (Gradcam if method == "gradcam" else GradcamPlusPlus)(flat.keras_model, model_modifier=ReplaceToLinear())
    signs = {"gender_female": (gender_index, 1.0), "gender_male": (gender_index, -1.0),
             "age_older": (age_index, 1.0), "age_younger": (age_index, -1.0)}
    for target, (index, sign) in signs.items():
        scores = [(lambda out, s=(sign if i == index else 0.0): s * out[:, 0]) for i in range(2)]
        options = dict(penultimate_layer="c2", seek_penultimate_conv_layer=False, expand_cam=False)
        raw_small = np.asarray(oracle(scores, x, normalize_cam=False, **options))
        assert (raw_small.max(axis=(1, 2)) > 0).all()
        expected_small = min_max(raw_small)
        expected = min_max(np.stack([zoom(m, 2, order=1, grid_mode=True, mode="nearest") for m in raw_small]))

        small = G.gradcam(flat, images, target, layer="c2", method=method, resize=False)
        full = G.gradcam(flat, images, target, layer="c2", method=method)
        assert small.shape == (len(images), SIZE // 2, SIZE // 2)
        np.testing.assert_allclose(small, expected_small, atol=1e-4)
        np.testing.assert_allclose(full, expected, atol=1e-4)


# ---------------------------------------------------------------- every model layout


def test_candidates_and_default_layer(flat):
    assert G.candidate_layers(flat) == ["c1", "pool", "c2"]  # the input-side Rescaling is not a feature
    assert G.default_layer(flat) == "c2"
    assert G.default_layer(flat, "age_older") == "c2"


def test_default_layer_skips_a_map_too_small_to_localise(tmp_path):
    """32 px -> c1 32x32 -> c2 4x4 -> c3 2x2: the default is c2 (a 2x2 map only names a quadrant);
    with no map of 3x3 or more feeding the heads, the last map is still the default."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(4, 3, strides=8, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="c3")(x)
    loaded = save_and_load(keras.Model(inputs, heads(x), name="shrinking"), tmp_path, "shrinking")
    assert G.candidate_layers(loaded) == ["c1", "c2", "c3"]
    assert G.default_layer(loaded) == "c2" and G.default_layer(loaded, "age_older") == "c2"
    assert G.gradcam(loaded, np.zeros((1, SIZE, SIZE, 3), np.uint8), "gender_female", resize=False).shape == (1, 4, 4)

    small = keras.Input((8, 8, 3))
    y = keras.layers.Conv2D(4, 3, strides=4, padding="same", activation="relu", name="only")(small)
    loaded = save_and_load(keras.Model(small, heads(y), name="tiny_map"), tmp_path, "tiny_map")
    assert G.default_layer(loaded) == "only"  # 2x2, but the only map there is


def test_padding_and_cropping_maps_are_not_offered(tmp_path):
    """A ZeroPadding2D map has rows and columns that cover no pixel (MobileNetV2's block_13_pad);
    stretched over the face it would misplace every cell. The conv after it is a fine map."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, strides=4, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name="pad")(x)
    x = keras.layers.Conv2D(4, 3, padding="valid", activation="relu", name="c2")(x)
    x = keras.layers.Cropping2D(1, name="crop")(x)
    loaded = save_and_load(keras.Model(inputs, heads(x), name="padded"), tmp_path, "padded")
    assert G.candidate_layers(loaded) == ["c1", "c2"]
    assert G.default_layer(loaded) == "c2"
    with pytest.raises(ValueError, match="pad"):
        G.gradcam(loaded, np.zeros((1, SIZE, SIZE, 3), np.uint8), "gender_female", layer="pad")


def test_maps_after_a_crop_are_not_offered_and_a_model_cropped_first_has_none(tmp_path):
    """A map after a Cropping2D or CenterCrop covers only part of the face: stretched over all of
    it, a model looking at the top-left quadrant lit up the mouth and chin."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.Cropping2D(((0, 16), (0, 16)), name="crop")(x)  # the top-left quadrant only
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c2")(x)
    loaded = save_and_load(keras.Model(inputs, heads(x), name="cropped"), tmp_path, "cropped")
    assert G.candidate_layers(loaded) == ["c1"] and G.default_layer(loaded) == "c1"
    with pytest.raises(ValueError, match="'c2' of model .* comes after a cropping layer"):
        G.gradcam(loaded, np.zeros((1, SIZE, SIZE, 3), np.uint8), "gender_female", layer="c2")
    inputs = keras.Input((SIZE + 8, SIZE + 8, 3))
    x = keras.layers.CenterCrop(SIZE, SIZE, name="centre")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(x)
    loaded = save_and_load(keras.Model(inputs, heads(x), name="centred"), tmp_path, "centred")
    assert G.candidate_layers(loaded) == []
    with pytest.raises(ValueError, match="every feature map of model .* comes after a cropping layer"):
        G.default_layer(loaded)


def test_a_crop_that_removes_nothing_keeps_every_map(tmp_path):
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.CenterCrop(SIZE, SIZE, name="centre")(inputs)  # to the input's own size
    x = keras.layers.Cropping2D(0, name="nothing")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(x)
    loaded = save_and_load(keras.Model(inputs, heads(x), name="uncropped"), tmp_path, "uncropped")
    assert G.candidate_layers(loaded) == ["c1"]


def test_a_backbone_of_any_size_called_at_two_scales_offers_the_maps_it_draws(tmp_path):
    """Measured by inner node, the second call's map sizes were taken for the first's: a layer
    listed as 4x4 drew a 2x2 map."""
    inner_in = keras.Input((None, None, 3))
    x = inner_in
    for i in range(4):  # full scale 32, 16, 8, 4; half scale 16, 8, 4, 2
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name=f"c{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"p{i}")(x) if i < 3 else x
    backbone = keras.Model(inner_in, x, name="bb")
    inputs = keras.Input((SIZE, SIZE, 3))
    full = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    half = keras.layers.GlobalAveragePooling2D()(backbone(keras.layers.AveragePooling2D(2)(inputs)))
    pooled = keras.layers.Concatenate()([full, half])
    model = keras.Model(inputs, [keras.layers.Dense(1, name="age")(pooled),
                                 keras.layers.Dense(1, activation="sigmoid", name="gender")(pooled)])
    loaded = save_and_load(model, tmp_path, "two_scales")
    listed = {site.path: site.shape[:2] for site in G._sites(loaded)}
    for layer in G.candidate_layers(loaded):
        drawn = G.gradcam(loaded, np.zeros((1, SIZE, SIZE, 3), np.uint8), "gender_female", layer=layer, resize=False)
        assert drawn.shape[1:] == listed[layer], layer


def test_a_saturated_head_behind_a_reshape_is_still_explained_through_its_logit(tmp_path, faces):
    """A Reshape after the sigmoid hid the head's Dense: P(female) of exactly 0 or 1 has no
    gradient, so every map was zero."""
    images, gender, _ = faces
    calm = save_and_load(fixed_weight_model(gender_scale=4.0), tmp_path, "calm")
    base = fixed_weight_model(gender_scale=4000.0)
    age, gender_p = base.outputs
    gender_p = keras.layers.Reshape((1,), name="gender_out")(gender_p)
    reshaped = save_and_load(keras.Model(base.inputs, [age, gender_p]), tmp_path, "reshaped")
    _, p_female = reshaped.predict_batch(images)
    assert set(np.round(p_female, 6)) <= {0.0, 1.0}
    expected = G.gradcam(calm, images[gender == 1], "gender_female")
    np.testing.assert_allclose(G.gradcam(reshaped, images[gender == 1], "gender_female"), expected, atol=1e-4)


def test_a_map_that_does_not_exist_is_said_to_be_missing_not_drawn_as_none(tmp_path):
    """NaN gradients (a square root of a pooled dead map) gave all-NaN maps drawn like "no
    evidence", and a zero gradient (a dead layer after the chosen one) an all-zero map: both are
    now NaN, found by undefined_maps, and drawn as a grey face."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255, name="scale")(inputs)
    c1 = keras.layers.Conv2D(1, 1, activation="relu", name="c1")
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(c1(x))
    rooted = keras.ops.sqrt(pooled)  # d sqrt / dx is infinite at 0: a dark face's map is NaN
    model = keras.Model(inputs, [keras.layers.Dense(1, name="age")(rooted),
                                 keras.layers.Dense(1, activation="sigmoid", name="gender")(rooted)])
    c1.set_weights([np.full((1, 1, 3, 1), 1 / 3, np.float32), np.array([-0.5], np.float32)])
    loaded = save_and_load(model, tmp_path, "rooted")
    bright, dark = np.full((SIZE, SIZE, 3), 220, np.uint8), np.full((SIZE, SIZE, 3), 30, np.uint8)
    maps = G.gradcam(loaded, np.stack([bright, dark, bright]), "age_older")
    assert G.undefined_maps(maps).tolist() == [False, True, False]
    assert np.isfinite(maps[0]).all() and np.isnan(maps[1]).all()
    grey = G.overlay(dark, maps[1])
    assert (grey == 30).all()  # the face itself, no colour: nothing is shown as evidence

    # a dead layer after the chosen one: no gradient reaches c1 at all, on any face
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inputs)
    dead = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c2",
                               bias_initializer=keras.initializers.Constant(-1e4))(x)
    loaded = save_and_load(keras.Model(inputs, heads(dead), name="dead"), tmp_path, "dead")
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    assert G.undefined_maps(G.gradcam(loaded, images, "gender_female", layer="c1")).all()
    at_c2 = G.gradcam(loaded, images, "gender_female", layer="c2")  # its map exists and is zero: no evidence
    assert not G.undefined_maps(at_c2).any() and G.empty_maps(at_c2).all()


@pytest.mark.parametrize("nested", [False, True])
def test_a_model_of_any_input_size_gets_layers_by_their_real_size(tmp_path, nested):
    """With (None, None, 3) inputs, or a backbone built without an input shape and nested in a
    model that has one (keras.applications' default), no map had a known size: a 1×1 map was
    offered and a 2×2 one chosen by default."""
    def trunk(x):
        for i, width in enumerate((4, 4, 4, 4, 4, 4)):  # 32 px: 32, 16, 8, 4, 2, 1
            x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=f"c{i}")(x)
            if i < 5:
                x = keras.layers.MaxPooling2D(name=f"p{i}")(x)
        return x

    if nested:
        inner_in = keras.Input((None, None, 3))
        backbone = keras.Model(inner_in, trunk(inner_in), name="backbone")
        inputs = keras.Input((SIZE, SIZE, 3))
        model = keras.Model(inputs, heads(backbone(inputs)))
        loaded = save_and_load(model, tmp_path, "nested_any")
        prefix = "backbone/"
    else:
        inputs = keras.Input((None, None, 3))
        loaded = save_and_load(keras.Model(inputs, heads(trunk(inputs))), tmp_path, "any", input_size=(SIZE, SIZE))
        prefix = ""
    assert tuple(loaded.input_size) == (SIZE, SIZE)
    # in run order; p4 and c5 (1x1) are not offered
    assert G.candidate_layers(loaded) == [prefix + n for n in ("c0", "p0", "c1", "p1", "c2", "p2", "c3", "p3", "c4")]
    assert G.default_layer(loaded) == f"{prefix}c3"  # 4×4; c4 and p3 are 2×2, c5 1×1
    maps = G.gradcam(loaded, np.zeros((2, SIZE, SIZE, 3), np.uint8), "gender_female", resize=False)
    assert maps.shape == (2, 4, 4)


def nested_model(sequential: bool = False):
    """Rescaling -> backbone (one layer holding c1, pool, c2) -> GAP -> heads."""
    if sequential:
        backbone = keras.Sequential(
            [
                keras.Input((SIZE, SIZE, 3)),
                keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1"),
                keras.layers.MaxPooling2D(name="pool"),
                keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2"),
            ],
            name="backbone",
        )
    else:
        backbone_in = keras.Input((SIZE, SIZE, 3))
        backbone = keras.Model(backbone_in, conv_trunk(backbone_in), name="backbone")
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(inputs)
    age, gender = heads(backbone(x))
    return keras.Model(inputs, [age, gender], name="nested")


@pytest.mark.parametrize("sequential", [False, True], ids=["functional_backbone", "sequential_backbone"])
def test_nested_backbone_gives_the_flat_models_maps(flat, faces, tmp_path, sequential):
    """The textbook sub-model recipe fails here (graph disconnected); replaying the graph must give
    exactly the maps of the same network written flat."""
    images, _, _ = faces
    model = nested_model(sequential)
    copy_weights(flat.keras_model, model)
    nested = save_and_load(model, tmp_path, "nested")

    assert G.candidate_layers(nested) == ["backbone/c1", "backbone/pool", "backbone/c2"]
    assert G.default_layer(nested) == "backbone/c2"
    for target in G.TARGETS:
        np.testing.assert_allclose(G.gradcam(nested, images, target), G.gradcam(flat, images, target), atol=1e-5)
    # an earlier layer inside the backbone, by full path or by its unambiguous bare name
    inner = G.gradcam(nested, images, "gender_female", layer="backbone/c1")
    np.testing.assert_allclose(inner, G.gradcam(flat, images, "gender_female", layer="c1"), atol=1e-5)
    np.testing.assert_array_equal(G.gradcam(nested, images, "gender_female", layer="c1"), inner)


@pytest.mark.parametrize("layout", ["gender_first", "dict"])
def test_output_order_and_container_do_not_matter(flat, faces, tmp_path, layout):
    images, _, _ = faces
    base = flat.keras_model
    age, gender = base.get_layer("age").output, base.get_layer("gender").output
    outputs = [gender, age] if layout == "gender_first" else {"gender": gender, "age": age}
    other = save_and_load(keras.Model(base.inputs, outputs), tmp_path, layout)
    if layout == "gender_first":
        assert (other.mapping.gender_output, other.mapping.age_output) == (0, 1)
    for target in G.TARGETS:
        np.testing.assert_allclose(G.gradcam(other, images, target), G.gradcam(flat, images, target), atol=1e-6)


def test_age_classes_head_explains_the_expected_age(tmp_path, faces):
    images, _, _ = faces
    keras.utils.set_random_seed(2)
    inputs = keras.Input((SIZE, SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(conv_trunk(keras.layers.Rescaling(1 / 255)(inputs)))
    age = keras.layers.Dense(10, activation="softmax", name="age")(pooled)
    gender = keras.layers.Dense(1, activation="sigmoid", name="gender")(pooled)
    loaded = save_and_load(keras.Model(inputs, [age, gender]), tmp_path, "age_classes",
                           age_class_values=[5 + 10 * i for i in range(10)])
    assert loaded.mapping.age_kind == "classes"
    older = G.gradcam(loaded, images, "age_older")
    younger = G.gradcam(loaded, images, "age_younger")
    for maps in (older, younger):
        assert maps.shape == (len(images), SIZE, SIZE) and maps.dtype == np.float32
        assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    assert np.abs(older - younger).mean() > 0.05


def test_keras_application_backbone(tmp_path, faces):
    """A real nested backbone (MobileNetV2, random weights) with BatchNorm, ReLU6 and skip additions."""
    images, _, _ = faces
    keras.utils.set_random_seed(3)
    backbone = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), alpha=0.35, include_top=False, weights=None)
    inputs = keras.Input((SIZE, SIZE, 3))
    features = backbone(keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs))
    age, gender = heads(features)
    loaded = save_and_load(keras.Model(inputs, {"age": age, "gender": gender}), tmp_path, "mobilenet")
    candidates = G.candidate_layers(loaded)
    assert all(name.startswith(backbone.name + "/") for name in candidates)
    assert f"{backbone.name}/block_3_expand_relu" in candidates
    layer = f"{backbone.name}/block_3_expand_relu"  # 8×8 at 32 px: finer than the default
    default_maps = G.gradcam(loaded, images[:4], "gender_female")
    inner_maps = G.gradcam(loaded, images[:4], "age_older", layer=layer)
    for maps in (default_maps, inner_maps):
        assert maps.shape == (4, SIZE, SIZE) and np.isfinite(maps).all()
        assert maps.min() >= 0.0 and maps.max() <= 1.0


def test_batching_does_not_change_the_maps(flat, faces):
    images, _, _ = faces
    one_batch = G.gradcam(flat, images, "age_older", batch_size=16)
    np.testing.assert_allclose(G.gradcam(flat, images, "age_older", batch_size=5), one_batch, atol=1e-6)
    np.testing.assert_allclose(G.gradcam(flat, images[3], "age_older"), one_batch[3:4], atol=1e-6)


# ---------------------------------------------------------------- bad input


def test_model_without_a_spatial_layer_is_refused(tmp_path, faces):
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Dense(8, activation="relu")(keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs)))
    age = keras.layers.Dense(1, name="age")(x)
    model = keras.Model(inputs, [age, keras.layers.Dense(1, activation="sigmoid", name="gender")(x)])
    loaded = save_and_load(model, tmp_path, "dense_only")
    assert G.candidate_layers(loaded) == []
    with pytest.raises(ValueError, match="no spatial feature map"):
        G.gradcam(loaded, faces[0][:2], "gender_female")


def test_bad_requests_get_clear_errors(flat, faces):
    images, _, _ = faces
    with pytest.raises(ValueError, match="unknown Grad-CAM target"):
        G.gradcam(flat, images, "female")
    with pytest.raises(ValueError, match="unknown Grad-CAM method"):
        G.gradcam(flat, images, "gender_female", method="scorecam")
    with pytest.raises(ValueError, match="not a spatial feature map.*candidate_layers"):
        G.gradcam(flat, images, "gender_female", layer="gap")
    with pytest.raises(ValueError, match="model's input size"):
        G.gradcam(flat, images[:, :20], "gender_female")
    with pytest.raises(ValueError, match="uint8"):
        G.gradcam(flat, images.astype(np.float32), "gender_female")
    with pytest.raises(ValueError, match="batch_size"):
        G.gradcam(flat, images, "gender_female", batch_size=0)
    assert G.gradcam(flat, images[:0], "gender_female").shape == (0, SIZE, SIZE)


# ---------------------------------------------------------------- drawing


def test_colormaps_match_matplotlib_at_known_points():
    jet = G.colormap_lut("jet")
    assert jet.shape == (256, 3) and jet.dtype == np.uint8
    np.testing.assert_array_equal(jet[0], [0, 0, 128])  # matplotlib jet(0) = (0, 0, 0.5)
    np.testing.assert_array_equal(jet[255], [128, 0, 0])  # jet(1) = (0.5, 0, 0)
    magma = G.colormap_lut("magma")
    np.testing.assert_array_equal(magma[0], [0, 0, 4])  # magma(0) = (0.0015, 0.0005, 0.0139)
    np.testing.assert_array_equal(magma[255], [252, 253, 191])  # magma(1) = (0.987, 0.991, 0.750)
    assert (np.diff(magma.astype(int).sum(axis=1)) >= 0).all()  # magma only gets lighter
    with pytest.raises(ValueError, match="unknown colour map"):
        G.colormap_lut("rainbow")


def test_overlay_blends_heatmap_onto_the_face():
    face = np.full((40, 30, 3), 100, np.uint8)
    heat = np.zeros((40, 30), np.float32)
    heat[:20] = 1.0
    np.testing.assert_array_equal(G.overlay(face, heat, alpha=0.0), face)
    full = G.overlay(face, heat, alpha=1.0, colormap="jet")
    np.testing.assert_array_equal(full[0, 0], [128, 0, 0])
    np.testing.assert_array_equal(full[-1, -1], [0, 0, 128])
    half = G.overlay(face, heat, alpha=0.5)
    np.testing.assert_array_equal(half[0, 0], [114, 50, 50])
    # a map at model size on a larger photo, and a grey photo
    assert G.overlay(np.zeros((64, 48), np.uint8), heat[::2, ::2]).shape == (64, 48, 3)
    with pytest.raises(ValueError, match="alpha"):
        G.overlay(face, heat, alpha=1.5)
    with pytest.raises(ValueError, match="uint8 RGB image"):
        G.overlay(face.astype(np.float32), heat)


def test_colorbar_and_legend_stops():
    bar = G.colorbar(100, 12, colormap="magma")
    assert bar.shape == (100, 12, 3) and bar.dtype == np.uint8
    np.testing.assert_array_equal(bar[0, 0], G.colormap_lut("magma")[255])  # strongest on top
    np.testing.assert_array_equal(bar[-1, 0], G.colormap_lut("magma")[0])
    wide = G.colorbar(8, 50, vertical=False)
    np.testing.assert_array_equal(wide[0, 0], [0, 0, 128])
    stops = G.colormap_stops("jet", n=5)
    assert len(stops) == 5 and stops[0] == "#000080" and stops[-1] == "#800000"
