"""Keras 2 model configs made readable by Keras 3 — the shims `analysis.compat` applies to Keras 2
`.h5` files and to the `.keras` archives tf.keras 2.13–2.15 wrote.

Keras 3 misreads or rejects valid Keras 2 configs. Every fix here rewrites the stored JSON config
(never the user's file: compat loads a patched temporary copy) or stands in for a Keras 2 layer
class with a fixed table of operations — nothing from the file is executed:
- node references to nested models are renumbered (Keras 2 counted their calls from 1, Keras 3
  from 0), and flat TFOpLambda nodes are wrapped as lists of inputs;
- arguments Keras 3 no longer accepts (e.g. `DepthwiseConv2D(groups=1)`) are dropped, LeakyReLU's
  alpha is renamed, a BatchNormalization axis list becomes a number, model classes stored under
  `keras.src.engine` point to Keras 3's, and mixed-precision policies become float32;
- TensorFlow ops written on tensors (`TFOpLambda`, `SlicingOpLambda`): arithmetic with a constant
  and the channel reversal `x[..., ::-1]` run in stand-in layers. Any other op is refused by compat
  with a message.
"""

from __future__ import annotations

import inspect
import json

import keras
import numpy as np


def layer_entries(config):
    """Yield every layer entry (a dict with a class_name) in a stored model config, nested ones too —
    also one whose `config` is not a dict (Keras reads a null config as empty: see _refuse_unloadable)."""
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "class_name" in item:
                yield item
            for key, value in item.items():
                if key in ("layers", "layer", "forward_layer", "backward_layer", "config", "cell", "cells"):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def tf_op_supported(item: dict) -> bool:
    """A Keras 2 TFOpLambda / SlicingOpLambda we can rebuild: known arithmetic with a numeric constant
    (or a per-channel bias), or the channel reversal x[..., ::-1]."""
    function = item["config"].get("function")
    if function not in (TF_OP_NAMES if item["class_name"] == "TFOpLambda" else {_GETITEM}):
        return False
    for node in item.get("inbound_nodes") or []:
        if not isinstance(node, list) or not node:
            return False  # a Keras 3 node (dict) or something else: not a Keras 2 op layer we rebuild
        refs = [node] if isinstance(node[0], str) else node
        for ref in refs:
            extra = ref[3] if isinstance(ref, list) and len(ref) > 3 and isinstance(ref[3], dict) else {}
            if _tf_op_operand(function, extra) is None:
                return False
    return True


def _is_number(value) -> bool:
    """A finite number of float range (a file could store a 400-digit integer)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300


def _tf_op_operand(function: str, kwargs: dict):
    """The constant a Keras 2 op layer was called with: a number ("y"), a per-channel bias (list),
    or "reverse" for the slice x[..., ::-1]; None when the call is anything else."""
    if function == _GETITEM:
        spec = kwargs.get("slice_spec")
        if isinstance(spec, (list, tuple)) and len(spec) == 2:  # stored serialized, or rebuilt by Keras
            ellipsis = spec[0] is Ellipsis or spec[0] == {"class_name": "__ellipsis__"}
            reverse = spec[1] == slice(None, None, -1) or spec[1] == {"start": None, "stop": None, "step": -1}
            if ellipsis and reverse:
                return "reverse"
        return None
    if function == _BIAS_ADD:
        bias = kwargs.get("bias")
        ok = (isinstance(bias, (list, tuple)) and 1 <= len(bias) <= 4 and all(map(_is_number, bias))
              and kwargs.get("data_format") in (None, "NHWC"))
        return [float(b) for b in bias] if ok else None
    y = kwargs.get("y")  # a number, or one per channel (densenet.preprocess_input divides by the std)
    if isinstance(y, (list, tuple)) and 1 <= len(y) <= 4 and all(map(_is_number, y)):
        return [float(v) for v in y]
    return float(y) if _is_number(y) else None


def tf_op_lambda_classes() -> dict:
    """Stand-ins for Keras 2's `TFOpLambda` and `SlicingOpLambda` (layers made by writing `x / 127.5 - 1`
    or `x[..., ::-1]` on a tensor, as keras.applications' preprocess_input does).

    Only elementwise arithmetic with constants and the channel reversal are allowed — the op is
    chosen from a fixed table by name, so nothing from the file is executed.
    """
    ops = keras.ops
    by_kind = {"divide": ops.divide, "multiply": ops.multiply, "subtract": ops.subtract, "add": ops.add}

    class TFOpLambda(keras.layers.Layer):
        def __init__(self, function, **kwargs):
            kwargs.pop("module", None)
            super().__init__(**kwargs)
            if function not in _TF_OPS:
                raise ValueError(
                    f"Keras 2 op layer '{function}' is not supported (only elementwise arithmetic with constants)"
                )
            self.function = function

        def call(self, x, name=None, reverse=False, **kwargs):
            operand = _tf_op_operand(self.function, kwargs)
            if operand is None or set(kwargs) - {"y", "bias", "data_format"}:
                raise ValueError(f"Keras 2 op layer '{self.function}' is supported only with one constant operand")
            operation, constant = by_kind[_TF_OPS[self.function]], ops.cast(operand, x.dtype)
            return operation(constant, x) if reverse else operation(x, constant)  # reverse: `2.0 - x`

        def get_config(self):
            return {**super().get_config(), "function": self.function}

    class SlicingOpLambda(TFOpLambda):
        def __init__(self, function, **kwargs):
            keras.layers.Layer.__init__(self, **{k: v for k, v in kwargs.items() if k != "module"})
            if function != _GETITEM:
                raise ValueError(f"Keras 2 slicing layer '{function}' is not supported")
            self.function = function

        def call(self, x, slice_spec=None, name=None):
            if _tf_op_operand(self.function, {"slice_spec": slice_spec}) != "reverse":
                raise ValueError("Keras 2 slicing layers are supported only as the channel reversal x[..., ::-1]")
            return ops.flip(x, axis=-1)

    return {"TFOpLambda": TFOpLambda, "SlicingOpLambda": SlicingOpLambda}


SHIM_CLASSES = {"TFOpLambda", "SlicingOpLambda"}
_GETITEM = "__operators__.getitem"
_BIAS_ADD = "nn.bias_add"  # x + a per-channel constant (keras.applications' "caffe" mean)
# Keras 2 `TFOpLambda` function names we rebuild, and the arithmetic each one is.
_TF_OPS = {
    "math.truediv": "divide", "math.divide": "divide", "__operators__.truediv": "divide",
    "math.multiply": "multiply", "__operators__.mul": "multiply",
    "math.subtract": "subtract", "__operators__.sub": "subtract",
    "math.add": "add", "__operators__.add": "add",
    _BIAS_ADD: "add",
}
TF_OP_NAMES = frozenset(_TF_OPS)


# Arguments Keras 3 layers still read from **kwargs, not their signature (Keras' layers/*.py: grep
# "kwargs.pop"): dropping LeakyReLU's Keras 2 `alpha` would silently change the model.
_KWARGS_READ = {"LeakyReLU": {"alpha"}, "LayerNormalization": {"rms_scaling"}, "LSTM": {"implementation"},
                "GRU": {"implementation"}, "Embedding": {"input_length"}}


def _accepted_kwargs(cls) -> set[str]:
    """The keyword arguments `cls(**config)` accepts: its __init__'s parameters and, as long as each
    __init__ passes **kwargs on, its parents' up to keras.layers.Layer (which also reads input shapes).
    E.g. SpatialDropout2D takes no `noise_shape` or `trainable` although Dropout and Layer do."""
    names = set()
    for klass in cls.__mro__:
        names |= _KWARGS_READ.get(klass.__name__, set())
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
        if klass is keras.layers.Layer:
            names |= {"input_shape", "input_dim", "batch_input_shape", "batch_size", "batch_shape"}
            break
    return names - {"self"}


def drop_unknown_arguments(config: dict) -> list[str]:
    """Delete the layer arguments Keras 3 no longer accepts (e.g. `DepthwiseConv2D(groups=1)`) from a
    Keras 2 config, in place; a note per class. (Keras 2.13–2.15 .keras files name every class with
    registered_name null, so Keras 3 would ignore a custom_objects substitute: the config must change.)"""
    dropped: dict[str, dict[str, set]] = {}
    for item in layer_entries(config):
        cls = getattr(keras.layers, item["class_name"], None)
        if not isinstance(cls, type) or not issubclass(cls, keras.layers.Layer) or issubclass(cls, keras.Model):
            continue
        for key in set(item["config"]) - _accepted_kwargs(cls):
            value = item["config"].pop(key)
            shown = json.dumps(value, sort_keys=True)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            dropped.setdefault(item["class_name"], {}).setdefault(key, set()).add(shown)
    return [
        f"compatibility shim: dropped old {class_name} argument(s) "
        + ", ".join(f"{key}={'/'.join(sorted(values))}" for key, values in sorted(keys.items()))
        + " that Keras 3 rejects"
        for class_name, keys in sorted(dropped.items())
    ]


# Where Keras 2 kept the model classes, and where Keras 3 has them.
_KERAS3_MODEL_MODULES = {"Functional": "keras.src.models.functional", "Sequential": "keras.src.models.sequential",
                         "Model": "keras.src.models.model"}


def modernise_keras2_entries(config: dict, *, archive: bool = False) -> list[str]:
    """Keras 2 config details Keras 3 rejects or misreads, fixed in place (see _modernise_entry), and
    layer names with "/" renamed. archive: the config came from a `.keras` file. Returns a note per
    kind of change the user should know about."""
    notes = []
    if renamed := rename_slashed_layers(config):
        notes.append(f"compatibility shim: {renamed} layer name(s) with '/' (which Keras 3 rejects) use '_' instead")
    mixed = {policy for item in layer_entries(config) if (policy := _modernise_entry(item, archive))}
    if mixed:
        notes.append(f"compatibility shim: layers trained in {'/'.join(sorted(mixed))} run in float32 (their "
                     "weights are float32; Keras 3 cannot read Keras 2's mixed-precision policy)")
    return notes


def _modernise_entry(item: dict, archive: bool) -> str | None:
    """Fix one Keras 2 layer entry in place: a mixed-precision policy becomes float32 (returned, for the
    note); model classes under `keras.src.engine.*` point to Keras 3's modules; `batch_input_shape`
    stays on input layers only; LeakyReLU's `alpha` is renamed `negative_slope`; a BatchNormalization
    axis list becomes a number; TFOpLambda entries lose Keras 2's module (so the stand-in is used);
    and, in a `.keras` archive, a Lambda's [code, defaults, closure] takes the form Keras 3 reads
    (still refused unless the caller allows unsafe loading)."""
    config, class_name, policy = item["config"], item["class_name"], None
    dtype = config.get("dtype")
    if isinstance(dtype, dict) and dtype.get("class_name") == "Policy":
        name = str((dtype.get("config") or {}).get("name", "float32"))
        policy = name if name.startswith("mixed_") else None
        config["dtype"] = "float32" if policy else name
    if class_name in _KERAS3_MODEL_MODULES and ".engine." in f"{item.get('module', '')}.":
        item["module"] = _KERAS3_MODEL_MODULES[class_name]
    layers = config.get("layers")
    if isinstance(layers, list) and layers and isinstance(layers[0], dict) and layers[0].get("class_name") == "InputLayer":
        for layer in layers[1:]:  # a Sequential's InputLayer already gives the shape
            if isinstance(layer, dict) and isinstance(layer.get("config"), dict):
                layer["config"].pop("batch_input_shape", None)
    shape = config.pop("batch_input_shape", None)
    if isinstance(shape, list) and shape:  # Keras 3 reads it on an InputLayer only
        config.update({"batch_shape": shape} if class_name == "InputLayer" else {"input_shape": shape[1:]})
    if class_name == "LeakyReLU" and "alpha" in config:
        config["negative_slope"] = config.pop("alpha")
    if class_name == "BatchNormalization" and isinstance(config.get("axis"), list) and len(config["axis"]) == 1:
        config["axis"] = config["axis"][0]
    if class_name in SHIM_CLASSES:
        item.pop("module", None)
        item.pop("registered_name", None)
    function = config.get("function")
    if archive and class_name == "Lambda" and isinstance(function, list) and len(function) == 3:
        config["function"] = {"class_name": "__lambda__", "config": dict(zip(("code", "defaults", "closure"), function))}
    return policy


def fix_legacy_nodes(config: dict) -> int:
    """Rewrite Keras 2 node references Keras 3 misreads; returns how many were changed.

    Keras 2 gave every nested Functional/Sequential model an extra node at construction, so
    calls to it are numbered from 1; Keras 3 numbers them from 0 (it corrects this only for the
    model's outputs). Keras 2 `TFOpLambda` nodes are stored as one flat input, not a list of inputs.
    """
    changed = 0
    models_by_scope = [item["config"]["layers"] for item in layer_entries(config)
                       if isinstance(item.get("config"), dict) and isinstance(item["config"].get("layers"), list)]
    for layers in models_by_scope:
        nested = {
            layer.get("name") or layer["config"].get("name")
            for layer in layers
            if isinstance(layer, dict) and layer.get("class_name") in ("Functional", "Model", "Sequential")
        }
        for layer in layers:
            nodes = layer.get("inbound_nodes") if isinstance(layer, dict) else None
            if not isinstance(nodes, list):
                continue
            for n, node in enumerate(nodes):
                if isinstance(node, list) and node and isinstance(node[0], str):
                    nodes[n] = node = [node]  # flat TFOpLambda-style node → list of inputs
                    changed += 1
                if not isinstance(node, list):
                    continue
                for ref in node:
                    if isinstance(ref, list) and len(ref) >= 3 and ref[0] in nested and ref[1] >= 1:
                        ref[1] -= 1
                        changed += 1
    return changed


def is_legacy_config(config: dict) -> bool:
    for item in layer_entries(config):
        nodes = item.get("inbound_nodes")
        if isinstance(nodes, list) and nodes:
            return isinstance(nodes[0], list)
        if "module" in item:
            return False
    return True


def first_call(operation) -> tuple[tuple, dict]:
    """(args, kwargs) a loaded layer or op node was first called with in its model; empty if none."""
    try:
        arguments = operation._inbound_nodes[0].arguments
    except (IndexError, AttributeError):
        return (), {}
    return tuple(arguments.args), dict(arguments.kwargs)


def tf_op_affine(layer) -> tuple[float, float, str] | None:
    """(a, b, description) when a rebuilt Keras 2 op layer computes a·x + b with a constant (a
    per-channel bias is averaged over its channels), else None."""
    kwargs = first_call(layer)[1]
    kwargs.pop("name", None)
    reverse = bool(kwargs.pop("reverse", False))
    operand = _tf_op_operand(layer.function, kwargs)
    kind = _TF_OPS.get(layer.function)
    if operand is None or operand == "reverse" or kind is None:
        return None
    affine = affine_map(kind, float(np.mean(operand)), tensor_first=not reverse)
    shown = ", ".join(f"{v:.4g}" for v in np.atleast_1d(operand)) + (", x" if reverse else "")
    return None if affine is None else (*affine, f"{layer.function}({shown})")


def tf_op_reverses_channels(layer) -> bool:
    """True for a rebuilt Keras 2 slicing layer that computes x[..., ::-1]."""
    return type(layer).__name__ == "SlicingOpLambda" and _tf_op_operand(_GETITEM, first_call(layer)[1]) == "reverse"


def affine_map(kind: str, c: float, tensor_first: bool = True) -> tuple[float, float] | None:
    """(a, b) such that `x <kind> c` (or `c <kind> x`) is a·x + b; None when it is not affine in x."""
    if kind == "add":
        return 1.0, c
    if kind == "multiply":
        return c, 0.0
    if kind == "subtract":
        return (1.0, -c) if tensor_first else (-1.0, c)
    if kind == "divide" and tensor_first and c:
        return 1.0 / c, 0.0
    return None


# ---------------------------------------------------------------- the whole patch


def patch_keras2_config(config: dict, notes: list[str], *, archive: bool) -> dict:
    """Rewrite a Keras 2 config in place so Keras 3 reads it; returns the custom_objects it needs
    (the TF-op stand-ins) and appends a note per shim. archive: the config came from a `.keras` file."""
    notes += rewrite_tf_op_layers(config)  # first: it turns tensors passed as arguments into inputs
    if fix_legacy_nodes(config):
        notes.append("compatibility shim: renumbered Keras 2 layer connections for Keras 3")
    notes += modernise_keras2_entries(config, archive=archive)
    notes += drop_unknown_arguments(config)
    if not any(item["class_name"] in SHIM_CLASSES for item in layer_entries(config)):
        return {}
    notes.append("compatibility shim: Keras 2 arithmetic op layers (TFOpLambda, SlicingOpLambda) rebuilt from a "
                 "fixed table")
    return tf_op_lambda_classes()


# ---------------------------------------------------------------- TensorFlow ops as standard layers

# TensorFlow functions Keras 2 recorded as TFOpLambda layers that a standard Keras layer computes.
_TF_ACTIVATIONS = {"nn.relu": "relu", "nn.relu6": "relu6", "math.sigmoid": "sigmoid", "nn.sigmoid": "sigmoid",
                   "math.tanh": "tanh", "nn.tanh": "tanh", "nn.silu": "silu", "nn.swish": "silu", "nn.elu": "elu",
                   "nn.gelu": "gelu", "math.softplus": "softplus", "nn.softplus": "softplus"}
_TF_MERGES = {"add": "Add", "multiply": "Multiply", "subtract": "Subtract"}  # of two tensors
_TF_SPATIAL = {"math.reduce_mean": "GlobalAveragePooling2D", "math.reduce_max": "GlobalMaxPooling2D"}
_RESIZE_METHODS = {"bilinear", "nearest", "bicubic", "lanczos3", "lanczos5", "area"}
_CONSTANT = "_CONSTANT_VALUE"  # how Keras 2 stored the constant of `2.0 * x` (the tensor came second)


def _is_ref(value) -> bool:
    """A Keras 2 reference to a layer output: [layer name, node index, tensor index]."""
    return (isinstance(value, list) and len(value) == 3 and isinstance(value[0], str)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value[1:]))


def _as_layer(function: str, refs: list, kwargs: dict):
    """(class_name, config, node) of a standard layer computing the TF op, or of the TFOpLambda
    stand-in with the constant moved after the tensor; None to leave the entry as it is."""
    kind = _TF_OPS.get(function)
    y = kwargs.get("y")
    if kind and len(refs) == 1 and refs[0][0] == _CONSTANT and _is_ref(y) and set(kwargs) <= {"y"}:
        call = {"y": refs[0][2]} if kind in ("add", "multiply") else {"y": refs[0][2], "reverse": True}
        return "TFOpLambda", {"function": function}, [[*y, call]]
    if kind in _TF_MERGES and function != _BIAS_ADD and len(refs) == 1 and _is_ref(y) and set(kwargs) <= {"y"}:
        return _TF_MERGES[kind], {}, [[*refs[0][:3], {}], [*y, {}]]
    if function in _TF_ACTIVATIONS and len(refs) == 1 and not kwargs:
        return "Activation", {"activation": _TF_ACTIVATIONS[function]}, [[*refs[0][:3], {}]]
    calls = [{k: v for k, v in ref[3].items() if k != "name"} for ref in refs]
    if function == "concat" and all(set(call) == {"axis"} and call == calls[0] for call in calls):
        axis = calls[0]["axis"]
        if isinstance(axis, int) and not isinstance(axis, bool):
            return "Concatenate", {"axis": axis}, [[*ref[:3], {}] for ref in refs]
    if function in _TF_SPATIAL and len(refs) == 1 and list(kwargs.get("axis") or []) == [1, 2] \
            and set(kwargs) <= {"axis", "keepdims"} and kwargs.get("keepdims") in (None, False, True):
        return _TF_SPATIAL[function], {"keepdims": bool(kwargs.get("keepdims"))}, [[*refs[0][:3], {}]]
    if function == "image.resize" and len(refs) == 1 and set(kwargs) <= {"size", "method", "antialias",
                                                                          "preserve_aspect_ratio"}:
        size, method = kwargs.get("size"), kwargs.get("method") or "bilinear"
        if (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and 0 < v <= 4096 for v in size)
                and method in _RESIZE_METHODS and not kwargs.get("antialias") and not kwargs.get("preserve_aspect_ratio")):
            return "Resizing", {"height": size[0], "width": size[1], "interpolation": method}, [[*refs[0][:3], {}]]
    return None


def rewrite_tf_op_layers(config: dict) -> list[str]:
    """Keras 2 TFOpLambda layers that a standard layer computes become that layer (`x + y` of two
    tensors → Add, `tf.nn.relu` → Activation, `tf.concat` → Concatenate, a spatial mean → global
    pooling, `tf.image.resize` → Resizing); a constant written first (`2.0 * x`) moves after the tensor.
    Returns a note naming what was rewritten."""
    rewritten: dict[str, int] = {}
    for item in layer_entries(config):
        nodes = item.get("inbound_nodes")
        if item["class_name"] != "TFOpLambda" or not isinstance(nodes, list) or len(nodes) != 1 or not nodes[0]:
            continue  # a TF-op layer called more than once stays as it is (and is checked by compat)
        refs = [nodes[0]] if isinstance(nodes[0][0], str) else nodes[0]
        if not all(isinstance(ref, list) and len(ref) == 4 and isinstance(ref[3], dict) for ref in refs):
            continue
        function = item["config"].get("function")
        kwargs = {k: v for k, v in refs[0][3].items() if k != "name"}
        layer = _as_layer(function, refs, kwargs)
        if layer is None:
            continue
        class_name, layer_config, node = layer
        old = item["config"]
        item["config"] = {**{k: old[k] for k in ("name", "trainable", "dtype") if k in old}, **layer_config}
        item["class_name"], item["inbound_nodes"] = class_name, [node]
        item.pop("module", None)
        item.pop("registered_name", None)
        if class_name != "TFOpLambda":
            rewritten[f"{function} → {class_name}"] = rewritten.get(f"{function} → {class_name}", 0) + 1
    if not rewritten:
        return []
    return ["compatibility shim: Keras 2 TensorFlow-op layers rebuilt as standard layers ("
            + ", ".join(f"{what}{f' ×{n}' if n > 1 else ''}" for what, n in sorted(rewritten.items())) + ")"]


# ---------------------------------------------------------------- names Keras 3 rejects


def rename_slashed_layers(config: dict) -> int:
    """Keras 2 allowed "/" in layer names (MobileNetV3's `Conv/BatchNorm`, DenseNet's `conv1/conv`);
    Keras 3 rejects it. Each such name becomes "_"-joined where the config names or references a
    layer — its `name` fields, the inbound nodes and a model's input and output layers — and nowhere
    else (a function or class named like a layer is not a reference). The weights are matched by
    position in .h5 files and by layer class in .keras archives. Returns how many were renamed."""
    entries = list(layer_entries(config))
    taken = {name for item in entries for name in (item.get("name"), item["config"].get("name")) if isinstance(name, str)}
    renames = {}
    for name in sorted(n for n in taken if "/" in n):
        new = name.replace("/", "_")
        while new in taken:
            new += "_"
        renames[name] = new
        taken.add(new)
    if not renames:
        return 0
    for item in entries:
        for holder in (item, item["config"]):
            if isinstance(holder.get("name"), str):
                holder["name"] = renames.get(holder["name"], holder["name"])
        for key in ("inbound_nodes", "input_layers", "output_layers"):
            for where in (item, item["config"]):
                if key in where:
                    where[key] = _replace_strings(where[key], renames)
    return len(renames)


def _replace_strings(value, renames: dict):
    """`value` (nested lists and dicts) with every string that is a key of `renames` replaced."""
    if isinstance(value, str):
        return renames.get(value, value)
    if isinstance(value, dict):
        return {key: _replace_strings(item, renames) for key, item in value.items()}
    if isinstance(value, list):
        return [_replace_strings(item, renames) for item in value]
    return value
