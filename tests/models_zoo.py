"""Tiny age + gender models built in code, in the shapes found in the wild, for tests/test_models.py.

Every builder is seeded, so a model and its saved copy give the same numbers.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import h5py
import keras
import numpy as np
from keras import layers


def _conv_features(x, seed: int):
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv",
                      kernel_initializer=keras.initializers.GlorotUniform(seed))(x)
    return layers.GlobalAveragePooling2D(name="pool")(x)


def _age_head(features, name, classes, seed, separate_activation=False):
    init = keras.initializers.GlorotUniform(seed + 1)
    if classes is None:
        return layers.Dense(1, name=name, kernel_initializer=init)(features)
    if separate_activation:
        logits_name = None if name is None else f"{name}_logits"
        logits = layers.Dense(classes, name=logits_name, kernel_initializer=init)(features)
        return layers.Softmax(name=name)(logits)
    return layers.Dense(classes, activation="softmax", name=name, kernel_initializer=init)(features)


def _gender_head(features, name, kind, seed, separate_activation=False):
    init = keras.initializers.GlorotUniform(seed + 2)
    units, activation = (1, "sigmoid") if kind == "sigmoid" else (2, "softmax")
    bias = keras.initializers.Constant(0.3)  # so P(female) is not exactly 0.5 everywhere
    if separate_activation:
        logits = layers.Dense(units, name=None if name is None else f"{name}_logits",
                              kernel_initializer=init, bias_initializer=bias)(features)
        return layers.Activation(activation, name=name)(logits)
    head = layers.Dense(units, activation=activation, name=name, kernel_initializer=init, bias_initializer=bias)
    return head(features)


def heads_model(
    input_shape=(16, 16, 3),
    *,
    age_name="age",
    gender_name="gender",
    gender_kind="sigmoid",
    age_classes=None,
    container="dict",
    gender_first=False,
    rescaling=None,
    backbone="inline",
    separate_activation=False,
    seed=0,
):
    """Conv + global pooling + an age head and a gender head.

    age_classes: None = 1-unit linear age in years, N = softmax over N classes. container: "dict"
    (keyed by the head names) or "list". rescaling: (scale, offset) for a Rescaling layer first.
    backbone: "inline", "functional" (a sub-model called as a layer) or "sequential" (a Sequential
    sub-model). Names of None let Keras choose (dense, dense_1, ...).
    """
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    if rescaling is not None:
        x = layers.Rescaling(rescaling[0], offset=rescaling[1], name="rescale")(x)
    if backbone == "inline":
        features = _conv_features(x, seed)
    elif backbone == "functional":
        inner_in = keras.Input(x.shape[1:], name="backbone_in")
        inner = keras.Model(inner_in, _conv_features(inner_in, seed), name="backbone")
        features = inner(x)
    elif backbone == "sequential":
        inner = keras.Sequential(
            [keras.Input(x.shape[1:]),
             layers.Conv2D(4, 3, padding="same", activation="relu",
                           kernel_initializer=keras.initializers.GlorotUniform(seed)),
             layers.GlobalAveragePooling2D()],
            name="seq_backbone",
        )
        features = inner(x)
    else:
        raise ValueError(backbone)
    age = _age_head(features, age_name, age_classes, seed, separate_activation)
    gender = _gender_head(features, gender_name, gender_kind, seed, separate_activation)
    if container == "dict":
        outputs = {age_name: age, gender_name: gender}
    else:
        outputs = [gender, age] if gender_first else [age, gender]
    return keras.Model(inputs, outputs, name="tiny_age_gender")


def preset_model(preset: str, *, inside: bool = False, flipped_gender: bool = False, size=(12, 12), age_divisor: float = 1.0):
    """Fixed-weight model that is right only when fed with `preset` (labels from `preset_images`).

    After the preset's scaling, let R, G, B be each channel's mean mapped back to [0, 1]. Ground
    truth: age = 80·R + 5 years; female iff G > B. The model computes exactly that, so another colour
    order breaks age (and gender), another scaling breaks age. With inside=True the model starts with
    Rescaling(1/255) and `preset` describes what it wants after that layer (so it wants raw 0–255).
    flipped_gender=True: the sigmoid gives P(male) instead of P(female).
    age_divisor: the age output is age / age_divisor (a model trained on ages divided by 100 or 116).
    """
    scale, offset = {"0_255": (1 / 255, 0.0), "0_1": (1.0, 0.0), "-1_1": (0.5, 0.5)}[preset.split("_", 1)[1]]
    red, green, blue = (0, 1, 2) if preset.startswith("rgb") else (2, 1, 0)
    inputs = keras.Input((*size, 3), name="image")
    x = layers.Rescaling(1 / 255, name="rescale")(inputs) if inside else inputs
    means = layers.GlobalAveragePooling2D(name="pool")(x)  # (n, 3)
    age_layer = layers.Dense(1, name="age" if age_divisor == 1 else "age_years")
    gender_layer = layers.Dense(1, activation="sigmoid", name="gender")
    age = age_layer(means)
    if age_divisor != 1:
        age = layers.Rescaling(1 / age_divisor, name="age")(age)
    model = keras.Model(inputs, {"age": age, "gender": gender_layer(means)})
    age_kernel = np.zeros((3, 1), np.float32)
    age_kernel[red, 0] = 80 * scale
    sign = -1.0 if flipped_gender else 1.0
    gender_kernel = np.zeros((3, 1), np.float32)
    gender_kernel[green, 0], gender_kernel[blue, 0] = sign * 40 * scale, -sign * 40 * scale
    age_layer.set_weights([age_kernel, np.array([5 + 80 * offset], np.float32)])
    gender_layer.set_weights([gender_kernel, np.zeros(1, np.float32)])
    return model


def preset_images(n: int = 48, size=(12, 12), seed: int = 0):
    """Labelled uint8 RGB images for `preset_model`: (images (n,h,w,3), ages (n,), genders (n,))."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(45, 210, size=(n, 3))
    # keep green and blue apart so the label is never a coin flip
    colours[:, 2] = colours[:, 1] + np.where(rng.random(n) < 0.5, -40.0, 40.0)
    noise = rng.normal(0, 4, size=(n, *size, 3))
    images = np.clip(colours[:, None, None, :] + noise, 0, 255).astype(np.uint8)
    means = images.reshape(n, -1, 3).mean(axis=1) / 255.0
    ages = 80 * means[:, 0] + 5
    genders = (means[:, 1] > means[:, 2]).astype(int)
    return images, ages, genders


# ---------------------------------------------------------------- Keras 2 files


def _strip_keras3(value):
    """Keras 3 → Keras 2 config details: plain dtype strings, no module / registered_name keys."""
    if isinstance(value, dict):
        if value.get("class_name") == "DTypePolicy":
            return value["config"]["name"]
        return {k: _strip_keras3(v) for k, v in value.items()
                if k not in ("module", "registered_name", "build_config", "compile_config", "optional")}
    if isinstance(value, list):
        return [_strip_keras3(v) for v in value]
    return value


def _tf_op(name: str, function: str, node: list) -> dict:
    """A Keras 2 TFOpLambda layer config; its one node is stored flat, as Keras 2 did."""
    config = {"name": name, "trainable": True, "dtype": "float32", "function": function}
    return {"class_name": "TFOpLambda", "name": name, "config": config, "inbound_nodes": [node]}


def _keras2_functional(config: dict, ops_instead_of_rescaling: bool) -> dict:
    """One Functional config (Keras 3 h5 flavour) rewritten the way Keras 2.x wrote it."""
    layers_in = config["layers"]
    nested = {l["name"] for l in layers_in if l["class_name"] in ("Functional", "Sequential")}
    renamed: dict[str, str] = {}

    def ref(history):
        name, node, tensor = history
        return [renamed.get(name, name), node + (1 if name in nested else 0), tensor]

    out_layers = []
    for layer in layers_in:
        layer = copy.deepcopy(layer)
        cfg = layer["config"]
        if layer["class_name"] == "InputLayer":
            cfg["batch_input_shape"] = cfg.pop("batch_shape")
        if layer["class_name"] == "DepthwiseConv2D":
            cfg["groups"] = 1  # what Keras 2 wrote, and Keras 3 rejects
        if layer["class_name"] == "Functional":
            layer["config"] = _keras2_functional(cfg, ops_instead_of_rescaling)
        nodes = []
        for node in layer.get("inbound_nodes", []):
            args = node["args"]
            tensors = args[0] if isinstance(args[0], list) else [args[0]]
            nodes.append([ref(t["config"]["keras_history"]) + [{}] for t in tensors])
        layer["inbound_nodes"] = nodes
        if ops_instead_of_rescaling and layer["class_name"] == "Rescaling":
            # Keras 2 models often wrote `x / 127.5 - 1` on tensors: two TFOpLambda layers
            source = nodes[0][0]
            scale, offset = cfg["scale"], cfg["offset"]
            first = _tf_op("tf.math.multiply", "math.multiply", source[:3] + [{"y": scale, "name": None}])
            second = _tf_op("tf.__operators__.add", "__operators__.add",
                            ["tf.math.multiply", 0, 0, {"y": offset, "name": None}])
            out_layers += [first, second]
            renamed[layer["name"]] = "tf.__operators__.add"
            continue
        out_layers.append(layer)
    inputs = config["input_layers"]
    outputs = config["output_layers"]
    inputs = [inputs] if isinstance(inputs[0], str) else inputs
    outputs = [outputs] if isinstance(outputs[0], str) else outputs
    result = dict(config)
    result["layers"] = out_layers
    result["input_layers"] = inputs
    result["output_layers"] = [ref(o) for o in outputs]
    return _strip_keras3(result)


def save_keras2_h5(model, path, *, ops_instead_of_rescaling: bool = False) -> Path:
    """Save `model` as a Keras 2.x `.h5` would be: Keras 2 config JSON, keras_version 2.12.0.

    Weights are written by Keras 3's own h5 writer (same layout for these layers); only the stored
    config and version change.
    """
    path = Path(path)
    model.save(path)
    with h5py.File(path, "r+") as handle:
        config = json.loads(handle.attrs["model_config"])
        keras2 = {"class_name": "Functional", "config": _keras2_functional(config["config"], ops_instead_of_rescaling)}
        handle.attrs["model_config"] = json.dumps(keras2).encode("utf-8")
        handle.attrs["keras_version"] = b"2.12.0"
        handle["model_weights"].attrs["keras_version"] = b"2.12.0"
    return path


def depthwise_model(input_shape=(16, 16, 3), rescaling=None, seed=0):
    """Teachable-Machine-like: a MobileNet-style backbone (with DepthwiseConv2D) nested in a model."""
    inner_in = keras.Input(input_shape, name="backbone_in")
    x = layers.Conv2D(4, 3, padding="same", name="stem",
                      kernel_initializer=keras.initializers.GlorotUniform(seed))(inner_in)
    x = layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw",
                               depthwise_initializer=keras.initializers.GlorotUniform(seed + 1))(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    backbone = keras.Model(inner_in, x, name="backbone")
    inputs = keras.Input(input_shape, name="image")
    y = inputs
    if rescaling is not None:
        y = layers.Rescaling(rescaling[0], offset=rescaling[1], name="rescale")(y)
    features = backbone(y)
    age = layers.Dense(1, name="dense_age", kernel_initializer=keras.initializers.GlorotUniform(seed + 2))(features)
    gender = layers.Dense(2, activation="softmax", name="dense_sex",
                          kernel_initializer=keras.initializers.GlorotUniform(seed + 3))(features)
    return keras.Model(inputs, [gender, age])


def copy_with_suffix(path, suffix) -> Path:
    target = Path(path).with_suffix(suffix)
    shutil.copyfile(path, target)
    return target
