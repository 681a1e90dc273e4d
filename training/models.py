"""The two age+gender networks we train, as Keras Functional models.

Both are self-describing, so ``analysis.models.load_model`` needs no hints:
- input ``image``: RGB floats 0–255, shape (batch, height, width, 3);
- preprocessing (scaling) inside the model, augmentation layers inside too (active only when
  training);
- outputs ``age`` (batch, 1) in years and ``gender`` (batch, 1) = P(female) from a sigmoid;
- only built-in layers (no Lambda, no custom classes), so ``safe_mode`` loading works.

Model A is a small CNN trained from scratch. Model B puts heads on a pretrained backbone
(a nested sub-model whose BatchNorm layers stay frozen in inference mode, keeping their ImageNet
statistics; see make_model_b) and is fine-tuned in two phases by :mod:`training.train`.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from pathlib import Path

import keras
import numpy as np
from keras import layers

from training.catalog import BACKBONES, IMAGENET_STD_RGB, PRECISIONS, BackboneSpec, offline_backbones
from training.dlib_face import make_dlib_face_resnet
from training.lite import make_efficientnet_lite

# Mean and spread of UTKFace ages in years: the age output starts at the mean, on a unit scale.
AGE_PRIOR_YEARS = 33.0
AGE_SCALE_YEARS = 20.0
# "bins" age head: one class per whole year 0..AGE_MAX_YEARS (UTKFace goes to 116).
AGE_MAX_YEARS = 116
AGE_DISTRIBUTION = "age_distribution"  # name of the softmax layer of the "bins" age head
# BatchNorm moving-average momentum for the layers we train from scratch. Keras' 0.99 needs
# ~500 steps to forget its initial statistics; a short run on a few thousand images has only a
# few hundred, and validation then runs on stale statistics.
BN_MOMENTUM = 0.9


AUGMENTATION_PREFIX = "aug_"  # names of the augmentation layers


def add_augmentation(x, strength: float = 1.0, seed: int | None = None):
    """Random flip, small rotation/zoom/translation and brightness/contrast on RGB 0–255 images.

    Keras preprocessing layers: identity at inference, random only when called with training=True.
    `strength` scales every range (0 disables augmentation).
    """
    if strength <= 0:
        return x
    s = float(strength)
    x = layers.RandomFlip("horizontal", seed=seed, name=f"{AUGMENTATION_PREFIX}flip")(x)
    x = layers.RandomRotation(0.03 * s, fill_mode="reflect", seed=seed, name=f"{AUGMENTATION_PREFIX}rotation")(x)  # ±11° at s=1
    x = layers.RandomZoom(0.1 * s, fill_mode="reflect", seed=seed, name=f"{AUGMENTATION_PREFIX}zoom")(x)
    x = layers.RandomTranslation(0.06 * s, 0.06 * s, fill_mode="reflect", seed=seed, name=f"{AUGMENTATION_PREFIX}translation")(x)
    x = layers.RandomBrightness(0.15 * s, value_range=(0, 255), seed=seed, name=f"{AUGMENTATION_PREFIX}brightness")(x)
    x = layers.RandomContrast(0.2 * s, value_range=(0, 255), seed=seed, name=f"{AUGMENTATION_PREFIX}contrast")(x)
    return x


def age_bin_centers() -> np.ndarray:
    """Ages (years, float32) of the classes of the "bins" age head: 0, 1, ..., AGE_MAX_YEARS."""
    return np.arange(AGE_MAX_YEARS + 1, dtype=np.float32)


def age_distribution_targets(ages, sigma: float) -> np.ndarray:
    """Soft labels for the "bins" age head: a Gaussian of width `sigma` years around each age,
    discretised on the bin centres and normalised; shape (n, AGE_MAX_YEARS + 1), float32."""
    ages = np.asarray(ages, dtype=np.float64).reshape(-1, 1)
    if sigma <= 0:
        raise ValueError(f"age label sigma must be positive, got {sigma}")
    logits = -0.5 * ((age_bin_centers()[None, :] - ages) / sigma) ** 2
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def augmentation_layers(model: keras.Model) -> list:
    """The augmentation layers of a model built by add_augmentation, in their order."""
    return [layer for layer in model.layers if layer.name.startswith(AUGMENTATION_PREFIX)]


def training_view(model: keras.Model, augment: bool = True) -> keras.Model:
    """The model to fit: the same layers and weights as `model`, with
    - a "bins" age head's softmax as a third output (the saved model keeps only age and gender);
    - with augment=False, its input after the augmentation layers (they are skipped).
    Returns `model` itself when neither applies."""
    outputs = list(model.outputs)
    if has_age_distribution(model):
        outputs.append(model.get_layer(AGE_DISTRIBUTION).output)
    augmentation = augmentation_layers(model)
    inputs = model.inputs
    if not augment and augmentation:
        inputs = augmentation[-1].output  # the layers are chained in order, see add_augmentation
    if inputs is model.inputs and len(outputs) == len(model.outputs):
        return model
    return keras.Model(inputs, outputs, name=model.name)


def has_age_distribution(model: keras.Model) -> bool:
    return any(layer.name == AGE_DISTRIBUTION for layer in model.layers)


def add_heads(features, hidden_units: int = 128, dropout: float = 0.3, age_output: str = "linear"):
    """Age and gender heads on a pooled feature vector (batch, channels).

    age_output: "linear" -> a Dense unit predicts standardised age and a Rescaling layer turns it
    into years (AGE_PRIOR_YEARS + AGE_SCALE_YEARS * u), so the unit works on a scale of about 1;
    "log" -> a Dense unit predicts log(years) and an exponential activation turns it into years
    (errors scale with age, ages stay positive);
    "bins" -> a softmax over whole years 0..AGE_MAX_YEARS (layer ``age_distribution``) and a fixed,
    non-trainable Dense layer that takes its expectation (label-distribution learning: training
    also fits the distribution to a Gaussian around the true age, see :func:`age_distribution_targets`).
    Returns [age (batch, 1) years, gender (batch, 1) P(female)].
    """
    x = layers.Dropout(dropout, name="head_dropout")(features)
    age = layers.Dense(hidden_units, activation="relu", name="age_hidden")(x)
    gender = layers.Dense(hidden_units, activation="relu", name="gender_hidden")(x)
    if age_output == "log":
        age = layers.Dense(1, bias_initializer=keras.initializers.Constant(math.log(AGE_PRIOR_YEARS)), name="log_age")(age)
        age = layers.Activation("exponential", name="age")(age)
    elif age_output == "bins":
        centers = age_bin_centers()
        # Starts as a broad Gaussian around the prior age instead of uniform over 0..116.
        prior = -0.5 * ((centers - AGE_PRIOR_YEARS) / AGE_SCALE_YEARS) ** 2
        age = layers.Dense(len(centers), bias_initializer=keras.initializers.Constant(prior), name="age_logits")(age)
        age = layers.Softmax(name=AGE_DISTRIBUTION)(age)
        expectation = layers.Dense(
            1, use_bias=False, trainable=False, name="age",
            kernel_initializer=keras.initializers.Constant(centers.reshape(-1, 1)),
        )
        age = expectation(age)
    elif age_output == "linear":
        age = layers.Dense(1, name="age_standardized")(age)
        age = layers.Rescaling(AGE_SCALE_YEARS, offset=AGE_PRIOR_YEARS, name="age")(age)
    else:
        raise ValueError(f"age_output must be 'linear', 'log' or 'bins', got {age_output!r}")
    gender = layers.Dense(1, activation="sigmoid", name="gender")(gender)
    return [age, gender]


def conv_bn_relu(x, filters: int, prefix: str, suffix: str = "", dtype=None):
    """3x3 convolution (no bias), BatchNorm, ReLU; layers named <prefix>_conv<suffix> etc.
    dtype: the layers' dtype policy (None = the global one)."""
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{prefix}_conv{suffix}", dtype=dtype)(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_bn{suffix}", dtype=dtype)(x)
    return layers.ReLU(name=f"{prefix}_relu{suffix}", dtype=dtype)(x)


def make_model_a(
    image_size=(112, 112),
    widths=(32, 64, 128, 256),
    convs_per_block: int = 1,
    augment: float = 1.0,
    dropout: float = 0.3,
    hidden_units: int = 128,
    age_output: str = "linear",
    pooling: str = "avg",
    precision: str = "float32",
    name: str = "age_gender_A",
) -> keras.Model:
    """Model A: a from-scratch CNN, shared convolutional trunk and two heads.

    Trunk: per width, `convs_per_block` × (3x3 conv, BatchNorm, ReLU) then 2x2 max-pooling.
    pooling: "avg" = global average pooling; "flatten" keeps the spatial layout of the last
    feature map (faces are aligned, so *where* a feature is carries information).
    precision: "float32", or "bfloat16" = the trunk computes in bfloat16 with float32 weights
    (Keras "mixed_bfloat16"; the input, augmentation and heads stay float32) — 1.15–1.4× faster
    training on CPUs with bfloat16 instructions. Rebuild with "float32" and copy the weights
    to save a model that runs the same everywhere (see training.train).
    image_size = (height, width) in pixels.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    trunk = "mixed_bfloat16" if precision == "bfloat16" else None
    inputs = keras.Input(shape=(int(image_size[0]), int(image_size[1]), 3), name="image")
    x = add_augmentation(inputs, augment)
    x = layers.Rescaling(1.0 / 255, name="rescaling")(x)
    for block, filters in enumerate(widths):
        for conv in range(convs_per_block):
            x = conv_bn_relu(x, filters, f"block{block}", str(conv), dtype=trunk)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool", dtype=trunk)(x)
    if pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="pool", dtype=trunk)(x)
    elif pooling == "flatten":
        x = layers.Flatten(name="flatten", dtype=trunk)(x)
    else:
        raise ValueError(f"pooling must be 'avg' or 'flatten', got {pooling!r}")
    return keras.Model(inputs, add_heads(x, hidden_units, dropout, age_output), name=name)


# ---------------------------------------------------------------- Model B: backbones


def make_backbone(name: str, image_size, weights: str | None = "imagenet", drop_connect: float = 0.0) -> keras.Model:
    """A backbone sub-model taking RGB 0–255 floats (batch, h, w, 3) -> feature map (batch, h', w', c).

    weights: "imagenet", None or "none" (random init) or a path to a local weights file (``.pth`` for
    efficientnet_lite<N>, a Keras "notop" ``.h5``/``.weights.h5`` for keras.applications).
    Raises ValueError for an unknown backbone, a missing weights file, or ImageNet weights that
    cannot be downloaded (naming the offline alternatives).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    if weights is not None and str(weights).lower() == "none":
        weights = None
    input_shape = (int(image_size[0]), int(image_size[1]), 3)
    if weights is not None and weights != "imagenet" and not Path(weights).is_file():
        raise ValueError(f"weights file not found: {weights}")
    if spec.lite_variant is not None:
        return make_efficientnet_lite(spec.lite_variant, input_shape, include_top=False, weights=weights, name=name,
                                      drop_connect=drop_connect)
    if name == "dlib_face_resnet":
        return make_dlib_face_resnet(input_shape, include_top=False, weights=weights, name=name)
    if name == "tiny":
        if weights is not None:
            raise ValueError("the 'tiny' backbone has no pretrained weights; use --weights none")
        return make_tiny_backbone(input_shape)
    return _keras_application(spec, input_shape, weights)


def _download_folders() -> list[Path]:
    """Where keras.applications saves downloaded weights (keras.utils.get_file): KERAS_HOME or
    ~/.keras, or the temporary folder's .keras when that is not writable."""
    home = Path(os.path.expanduser(os.environ.get("KERAS_HOME", os.path.join("~", ".keras"))))
    return [home / "models", Path(tempfile.gettempdir()) / ".keras" / "models"]


def _keras_application(spec: BackboneSpec, input_shape, weights) -> keras.Model:
    constructor = getattr(keras.applications, spec.application)
    missing = [folder for folder in _download_folders() if not folder.exists()]
    try:
        with warnings.catch_warnings():  # a wrong file makes Keras warn once per layer
            warnings.simplefilter("ignore")
            core = constructor(include_top=False, weights=weights, input_shape=input_shape)
    except Exception as exc:  # download failures surface as many exception types
        if weights != "imagenet":
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = " ".join(lines[:2])[:300]  # Keras may list every layer of the file
            raise ValueError(f"cannot load {spec.name} weights from {weights}: {reason} — give the "
                             f"'notop' weights file of keras.applications.{spec.application}") from exc
        for folder in missing:  # Keras made it for the download that failed; nothing else may be left
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        raise ValueError(
            f"could not fetch the ImageNet weights of {spec.name} (no internet connection?): {exc}. "
            f"Offline alternatives: --backbone {offline_backbones()} "
            "(their weights come with pip packages), or --weights PATH to a local "
            f"'notop' weights file for {spec.application}."
        ) from exc
    if spec.application.startswith("EfficientNetB") and weights not in (None, "imagenet"):
        _rescale_efficientnet_stem(core)
    if spec.scale is None:  # scales pixels itself; core.output, not core.outputs (a list when called)
        return keras.Model(core.input, core.output, name=spec.name)
    # Wrap it so the sub-model as a whole takes 0–255 pixels.
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(spec.scale[0], offset=spec.scale[1], name="rescaling")(inputs)
    if spec.normalize is not None:
        mean, std = spec.normalize
        x = layers.Normalization(mean=list(mean), variance=[s * s for s in std], name="normalization")(x)
    return keras.Model(inputs, core(x), name=spec.name)


def _rescale_efficientnet_stem(core: keras.Model) -> None:
    """keras.applications' EfficientNetB<N> divides its normalised input once more by
    sqrt(ImageNet std) — but only when built with weights="imagenet", not when given the same
    weights as a file. Fold that per-channel factor into the stem convolution (no bias; zero
    padding stays zero), so a local "notop" file sees the pixels its weights were trained on."""
    stem = core.get_layer("stem_conv")
    kernel = stem.get_weights()[0]  # (3, 3, channels in, filters)
    factors = np.array([1.0 / np.sqrt(s) for s in IMAGENET_STD_RGB], dtype=kernel.dtype)
    stem.set_weights([kernel * factors[None, None, :, None]])


def make_tiny_backbone(input_shape=(64, 64, 3), widths=(16, 32, 64)) -> keras.Model:
    """A small randomly initialised CNN backbone: RGB 0–255 -> (batch, h/2^k, w/2^k, widths[-1])."""
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255, name="rescaling")(inputs)
    for block, filters in enumerate(widths):
        x = conv_bn_relu(x, filters, f"block{block}")
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    return keras.Model(inputs, x, name="tiny")


def make_model_b(
    backbone: keras.Model,
    augment: float = 1.0,
    dropout: float = 0.3,
    hidden_units: int = 256,
    age_output: str = "linear",
    name: str = "age_gender_B",
    pretrained: bool = True,
) -> keras.Model:
    """Model B: augmentation -> backbone (nested) -> pooling -> two heads.

    A pretrained backbone is called with training=False so its BatchNorm layers stay in
    inference mode even when the backbone is unfrozen for fine-tuning (Keras transfer-learning
    guide) — unless it has Dropout layers (stochastic depth: training.lite with drop_connect > 0,
    and the keras.applications EfficientNets' own), which must see the training flag: then it is
    called with the flag, and its BatchNorm layers, kept frozen by set_backbone_trainable, run in
    inference mode all the same (a frozen Keras 3 BatchNormalization always does).

    A randomly initialised backbone (pretrained=False) has no statistics to keep: it sees the
    flag, and its BatchNorm layers are trained (set_backbone_trainable(..., batchnorm=True)) with
    momentum 0.9 — with their initial statistics frozen a deep network's features vanish
    (MobileNetV2's: ~1e-12) and the model predicts a constant.
    """
    inputs = keras.Input(shape=backbone.input_shape[1:], name="image")
    x = add_augmentation(inputs, augment)
    stochastic = any(isinstance(layer, layers.Dropout) for layer in _leaf_layers(backbone))
    if not pretrained:
        for layer in _leaf_layers(backbone):
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = BN_MOMENTUM
    x = backbone(x) if stochastic or not pretrained else backbone(x, training=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, add_heads(x, hidden_units, dropout, age_output), name=name)


def set_backbone_trainable(backbone: keras.Model, fraction: float, batchnorm: bool = False) -> int:
    """Freeze the backbone except its top `fraction` of layers; BatchNorm layers stay frozen,
    or, with `batchnorm` (a randomly initialised backbone), are all trained whatever `fraction`.

    Nested sub-models (e.g. a keras.applications model wrapped with its rescaling) are looked
    into. fraction 0 freezes everything (phase 1), 1 unfreezes all but BatchNorm. Returns the
    number of layers with weights that are now trainable.
    """
    backbone.trainable = True  # then decided per layer
    weighted = [layer for layer in _leaf_layers(backbone) if layer.weights]
    first_trainable = len(weighted) - int(round(fraction * len(weighted)))
    n_trainable = 0
    for index, layer in enumerate(weighted):
        if isinstance(layer, layers.BatchNormalization):
            trainable = batchnorm
        else:
            trainable = index >= first_trainable
        layer.trainable = trainable
        n_trainable += trainable
    if n_trainable == 0:
        backbone.trainable = False
    return n_trainable


def _leaf_layers(model: keras.Model) -> list:
    """The layers of `model` in order, with nested models replaced by their own layers."""
    leaves = []
    for layer in model.layers:
        leaves.extend(_leaf_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return leaves
