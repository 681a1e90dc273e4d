"""Grad-CAM heatmaps: where did a model look when it judged a face?

Grad-CAM (Selvaraju et al., 2017) weights each channel of a spatial feature map A (n, h', w', c)
by the spatial mean of the gradient of a *target score* with respect to it, sums the channels and
keeps the positive part:

    cam = relu( sum_c  mean_ij(d score / d A_ijc) * A_c )        # (n, h', w')

The maps are upsampled to the model's input size and min-max normalised per image to [0, 1], so
a colour says where *within one face* the evidence is, not how strong it is compared with other
faces. Grad-CAM++ (Chattopadhay et al., 2018; ``method="gradcam++"``) replaces the plain gradient
mean by a weighted mean of the positive gradients only; it therefore cannot show evidence that the
head cancels (a pattern exciting two channels whose contributions the head subtracts still lights
up), which plain Grad-CAM does. Plain Grad-CAM is the default.

Targets are explicit, one per question a user asks of a face (never a bare output index):

    "gender_female"  evidence for "female": the log-odds log p_female - log p_male
    "gender_male"    evidence for "male": minus the above
    "age_older"      the age prediction in years (for age-as-classes: the expected age)
    "age_younger"    minus the age prediction

Why log-odds for gender: a confident sigmoid output saturates (p = 0.9999 has almost no gradient),
which would blank exactly the confident mistakes we want to look at. When the gender head is a
``Dense`` (or ``Activation``/``Softmax``) layer with a sigmoid or softmax activation, we recompute
its pre-activation (the logit) from the layer's own input and weights; otherwise we fall back to
``log(p) - log(1 - p)`` on the clipped probability, which is correct but still saturates in
float32 very close to 0 or 1. The same trick gives a ReLU age head's pre-activation, so that
"older" is defined even where the ReLU is off.

Models whose pretrained backbone is nested as one layer (``Input -> backbone -> GAP -> heads``) break
the textbook recipe ``keras.Model(model.inputs, [model.get_layer(name).output, model.output])``
(Keras 3: "Output ... is not connected to `inputs`"): the inner layer's tensor belongs to the
backbone's own graph; tf-keras-vis fails the same way. Instead of
building sub-models we *replay* the model's graph node by node (the same walk Keras' Functional.call
does), step into the nested backbone that holds the chosen layer, and keep the eager tensor that
layer produces; ``tf.GradientTape`` then differentiates the real forward pass with respect to it.
This works the same for flat Functional models, Sequential models, nested Functional/Sequential
backbones at any depth, list or dict outputs, and any output order. The replay, the gradient and
the map are compiled once per (model, layer, target, method) with ``tf.function`` and cached.

Computing a heatmap and drawing it are separate: ``gradcam`` returns arrays, ``overlay`` blends one
onto a face with a colour map, ``colorbar`` draws the matching scale.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import weakref
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from PIL import Image

from analysis.mapping import PASS_THROUGH_LAYERS

TARGETS: tuple[str, ...] = ("gender_female", "gender_male", "age_older", "age_younger")
HEADS: tuple[str, ...] = ("age", "gender")
METHODS: tuple[str, ...] = ("gradcam", "gradcam++")

# Clip for the probability fallback of the gender log-odds (float32 cannot hold 1 - 1e-8).
_PROB_EPS = 1e-7
# Path separator for layers inside a nested backbone: "backbone/block_16_project".
PATH_SEP = "/"

# Layer lists and compiled gradient programs, keyed weakly by the Keras model so that dropping a
# model frees its traces; the lock makes them safe for a threaded app server.
_CACHE_LOCK = threading.Lock()
# keras.Model -> {None: its sites as declared, (h, w): as measured at that input size}
_SITE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROGRAM_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # keras.Model -> {key: _CamProgram}


# ---------------------------------------------------------------- the model's layer graph
#
# Keras 3 keeps a Functional model's graph as nodes grouped by depth (0 = the output nodes). Each
# node records its operation (layer), its symbolic input/output tensors and its call arguments.
# These attributes are not public API (the same ones Functional.call and tf-keras-vis use), so the
# walk below turns an unexpected layout into a clear error instead of an AttributeError deep inside
# a forward pass. Tested with Keras 3.15.


def _graph_of(model):
    """The Functional graph that holds `model`'s layers, or None when it has none (subclassed)."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if hasattr(model, "_nodes_by_depth") and hasattr(model, "inputs") and hasattr(model, "outputs"):
        return model
    return None


def _nodes_in_run_order(graph) -> list:
    """The graph's computing nodes in the order Keras runs them (inputs first)."""
    by_depth = graph._nodes_by_depth
    return [
        node
        for depth in sorted(by_depth, reverse=True)
        for node in by_depth[depth]
        if node.operation is not None and not node.is_input
    ]


def _is_spatial(shape) -> bool:
    """A 4-D (n, h, w, c) tensor whose height and width are not 1 (unknown counts as spatial)."""
    return len(shape) == 4 and all(d is None or d > 1 for d in shape[1:3])


def _has_learned_weights(operation) -> bool:
    # A Normalization layer holds statistics, not learned features: a map right after it is the
    # image itself, not something the network computed.
    if isinstance(operation, keras.layers.Normalization):
        return False
    return bool(getattr(operation, "weights", None))


@dataclass(frozen=True)
class _Site:
    """One spatial feature map a heatmap can be computed on."""

    path: str  # "conv2" or "backbone/block_16_project"
    route: tuple  # nodes from the outer graph down to the node that produces the map
    shape: tuple  # (h, w, c) without the batch axis; None where unknown
    feeds: frozenset  # indices of the model's flattened outputs this map influences
    aligned: bool = True  # False after a cropping layer: the map covers only part of the image


# Layers whose output map does not cover the image the way their input did: padding adds rows and
# columns of no image pixels (MobileNetV2's block_13_pad, EfficientNet's *_dwconv_pad), cropping
# removes some. Stretched over the face, such a map would put every cell in the wrong place. A
# padding layer's own map is left out (the next, valid convolution takes the border off again);
# after a crop every map covers only part of the face, so none is offered.
_SHIFTING_LAYERS = (keras.layers.ZeroPadding2D, keras.layers.Cropping2D, keras.layers.CenterCrop)
_CROPPING_LAYERS = (keras.layers.Cropping2D, keras.layers.CenterCrop)


def _walk_sites(graph, prefix: str, route: tuple, in_learned: list, out_feeds: list, in_cropped: list | None = None) -> list[_Site]:
    """All spatial feature maps in `graph` (recursing into nested models), in run order.

    `in_learned[i]`: whether graph input i already went through a learned layer.
    `out_feeds[j]`: which model outputs graph output j feeds.
    `in_cropped[i]`: whether graph input i already went through a cropping layer.
    """
    nodes = _nodes_in_run_order(graph)

    # Backward pass: which model outputs does each tensor feed?
    feeds: dict[int, set] = {}
    for tensor, outs in zip(graph.outputs, out_feeds):
        feeds.setdefault(id(tensor), set()).update(outs)
    for node in reversed(nodes):
        node_feeds = set().union(*(feeds.get(id(t), set()) for t in node.outputs))
        for tensor in node.input_tensors:
            feeds.setdefault(id(tensor), set()).update(node_feeds)

    # Forward pass: has a learned layer been applied yet? Emit the spatial maps after one; those
    # after a crop as not aligned with the image.
    learned = {id(t): flag for t, flag in zip(graph.inputs, in_learned)}
    cropped = {id(t): flag for t, flag in zip(graph.inputs, in_cropped or [False] * len(graph.inputs))}
    sites: list[_Site] = []
    for node in nodes:
        operation = node.operation
        inputs_learned = any(learned.get(id(t), False) for t in node.input_tensors)
        inputs_cropped = any(cropped.get(id(t), False) for t in node.input_tensors)
        inner = _graph_of(operation) if isinstance(operation, keras.Model) else None
        if inner is not None:
            inner_in = [inputs_learned] * len(inner.inputs)
            inner_out = [feeds.get(id(t), set()) for t in node.outputs]
            sites.extend(_walk_sites(inner, f"{prefix}{operation.name}{PATH_SEP}", route + (node,), inner_in, inner_out,
                                     [inputs_cropped] * len(inner.inputs)))
            now_learned = inputs_learned or bool(operation.weights)
            now_cropped = inputs_cropped or _crops(inner)
        else:
            now_learned = inputs_learned or _has_learned_weights(operation)
            now_cropped = inputs_cropped or _removes_pixels(node)
            if (len(node.outputs) == 1 and _is_spatial(node.outputs[0].shape) and now_learned
                    and not isinstance(operation, _SHIFTING_LAYERS)):
                sites.append(
                    _Site(
                        path=prefix + operation.name,
                        route=route + (node,),
                        shape=tuple(node.outputs[0].shape[1:]),
                        feeds=frozenset(feeds.get(id(node.outputs[0]), set())),
                        aligned=not now_cropped,
                    )
                )
        for tensor in node.outputs:
            learned[id(tensor)] = now_learned
            cropped[id(tensor)] = now_cropped
    return sites


def _crops(graph) -> bool:
    """Whether a (nested) graph applies a cropping layer that removes pixels anywhere."""
    for node in _nodes_in_run_order(graph):
        inner = _graph_of(node.operation) if isinstance(node.operation, keras.Model) else None
        if _removes_pixels(node) or (inner is not None and _crops(inner)):
            return True
    return False


def _removes_pixels(node) -> bool:
    """A cropping node whose output is smaller than its input (not CenterCrop to the input's own
    size, nor Cropping2D(0)). Unknown sizes count as cropping."""
    if not isinstance(node.operation, _CROPPING_LAYERS):
        return False
    before, after = tuple(node.input_tensors[0].shape[1:3]), tuple(node.outputs[0].shape[1:3])
    return None in before or before != after


def _top_graph(keras_model):
    graph = _graph_of(keras_model)
    if graph is None:
        raise ValueError(
            f"model {keras_model.name!r} is a subclassed Keras model without a layer graph; Grad-CAM "
            "needs a Functional or Sequential model (save it as one, or wrap it in keras.Model(inputs, outputs))"
        )
    if len(graph.inputs) != 1:
        raise ValueError(
            f"model {keras_model.name!r} has {len(graph.inputs)} inputs; Grad-CAM supports one image input"
        )
    return graph


def _sites(loaded) -> list[_Site]:
    """Spatial feature maps of a LoadedModel at its input size, cached per Keras model and size.

    A model that takes any size (or a backbone built without an input shape, nested in a model
    that has one) does not say how large its maps are: they are measured on one blank image at
    `loaded.input_size`, so that a map of 1×1 cells is not offered and the default layer is
    chosen by its real size."""
    sites = _static_sites(loaded.keras_model)
    if all(d is not None for site in sites for d in site.shape[:2]):
        return sites
    size = tuple(int(d) for d in loaded.input_size)
    with _CACHE_LOCK:
        cached = _SITE_CACHE.get(loaded.keras_model, {}).get(size)
    if cached is None:
        shapes = _measured_shapes(loaded)
        measured = [dataclasses.replace(site, shape=shapes.get(tuple(map(id, site.route)), site.shape)) for site in sites]
        cached = [site for site in measured if _is_spatial((None, *site.shape))]
        with _CACHE_LOCK:
            _SITE_CACHE.setdefault(loaded.keras_model, {})[size] = cached
    return cached


def _measured_shapes(loaded) -> dict[tuple, tuple]:
    """{route (ids of the nodes from the outer graph down, as _Site.route): (h, w, c) of its
    output} for every node of the model and its nested models, from one forward pass of a blank
    image at the model's input size. By route, not node: a backbone called twice (at two scales)
    has the same inner nodes on both calls."""
    shapes: dict[tuple, tuple] = {}

    def run(graph, inputs: list, route: tuple = ()) -> list:
        tensors = {id(x): tf.cast(y, x.dtype) for x, y in zip(graph.inputs, inputs)}
        for node in _nodes_in_run_order(graph):
            if any(id(x) not in tensors for x in node.input_tensors):
                continue
            args, kwargs = node.arguments.fill_in(tensors)
            inner = _graph_of(node.operation) if isinstance(node.operation, keras.Model) else None
            if inner is not None:
                outputs = run(inner, keras.tree.flatten(args[0]), route + (id(node),))
            else:
                outputs = keras.tree.flatten(_call_for_inference(node.operation, args, kwargs))
            if len(outputs) == 1:
                shapes[route + (id(node),)] = tuple(outputs[0].shape[1:])
            for x, y in zip(node.outputs, outputs):
                tensors[id(x)] = y
        return [tensors[id(x)] for x in graph.outputs]

    height, width = (int(d) for d in loaded.input_size)
    run(_top_graph(loaded.keras_model), [tf.convert_to_tensor(loaded.prepare(np.zeros((1, height, width, 3), np.uint8)))])
    return shapes


def _static_sites(keras_model) -> list[_Site]:
    """Spatial feature maps of a Keras model with the shapes its graph declares (None where it
    takes any size), cached per model."""
    with _CACHE_LOCK:
        cached = _SITE_CACHE.get(keras_model, {}).get(None)
    if cached is not None:
        return cached
    graph = _top_graph(keras_model)
    try:
        walked = _walk_sites(graph, "", (), [False], [{k} for k in range(len(graph.outputs))])
    except AttributeError as exc:
        raise ValueError(
            f"cannot read the layer graph of model {keras_model.name!r} with Keras {keras.__version__} "
            f"({exc}); Grad-CAM was written against Keras 3.15's Functional model internals"
        ) from exc
    # A layer applied twice (shared weights) is offered once, at its first application.
    first: dict[str, _Site] = {}
    for site in walked:
        first.setdefault(site.path, site)
    sites = list(first.values())
    with _CACHE_LOCK:
        _SITE_CACHE.setdefault(keras_model, {})[None] = sites
    return sites


def _head_output(loaded, target: str) -> int:
    mapping = loaded.mapping
    return mapping.gender_output if target.startswith("gender") else mapping.age_output


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"unknown Grad-CAM target {target!r}; choose one of {', '.join(TARGETS)}")


def candidate_layers(loaded, target: str | None = None) -> list[str]:
    """Names of the layers Grad-CAM can explain, from the input side to the heads.

    Every layer with a spatial output (4-D, height and width > 1) that comes after a learned layer
    and feeds the gender or age head (only the `target`'s head when given), except padding layers
    and every layer from a crop on (their maps are offset from the image). Layers inside a
    nested backbone are named by path: "backbone/block_16_project". The last one is the default;
    earlier ones give finer but less semantic maps.
    """
    if target is not None:
        _check_target(target)
    heads = {_head_output(loaded, target)} if target else {loaded.mapping.gender_output, loaded.mapping.age_output}
    return [site.path for site in _sites(loaded) if site.feeds & heads and site.aligned]


# The default layer is the last map at least this many cells high and wide (when there is one):
# a 2x2 map (dlib's face ResNet at 150 px) can only say which quadrant mattered.
MIN_DEFAULT_SIDE = 3


def _side(site: _Site) -> float:
    known = [d for d in site.shape[:2] if d is not None]
    return min(known) if known else float("inf")


def default_layer(loaded, target: str | None = None) -> str:
    """The last spatial feature map feeding the `target`'s head (both heads when None), skipping
    maps smaller than MIN_DEFAULT_SIDE cells on a side when a larger one feeds the head too.

    Raises ValueError when the model has no spatial feature map (e.g. a Dense-only model).
    """
    if target is not None:
        _check_target(target)
        wanted = [{_head_output(loaded, target)}]
    else:
        both = {loaded.mapping.gender_output, loaded.mapping.age_output}
        wanted = [both, {loaded.mapping.gender_output}, {loaded.mapping.age_output}]
    sites = _sites(loaded)
    for heads in wanted:
        feeding = [site for site in sites if heads <= site.feeds and site.aligned]
        if feeding:
            large = [site for site in feeding if _side(site) >= MIN_DEFAULT_SIDE]
            return (large or feeding)[-1].path
    if any(not site.aligned for site in sites):
        raise ValueError(
            f"every feature map of model {loaded.name!r} comes after a cropping layer: each covers only part of "
            "the face, so a heatmap stretched over the face would put the evidence in the wrong place; no Grad-CAM"
        )
    raise ValueError(
        f"model {loaded.name!r} has no spatial feature map (a layer with a 4-D output whose height and "
        "width are > 1, after a learned layer) feeding its "
        f"{'heads' if target is None else target.split('_')[0] + ' head'}, so Grad-CAM cannot localise "
        "anything; use a convolutional model"
    )


def _resolve_site(loaded, layer: str, target: str) -> _Site:
    sites = _sites(loaded)
    by_path = {site.path: site for site in sites}
    site = by_path.get(layer)
    if site is None:
        # A bare inner name is fine when it is unambiguous: "block_16_project".
        matches = [s for s in sites if s.path.endswith(PATH_SEP + layer)]
        if len(matches) == 1:
            site = matches[0]
        elif len(matches) > 1:
            raise ValueError(
                f"layer name {layer!r} is ambiguous in model {loaded.name!r}: "
                f"{', '.join(s.path for s in matches)}; pass the full path"
            )
    if site is None:
        choices = [s.path for s in sites]
        shown = ", ".join(choices[-8:]) if choices else "none"
        raise ValueError(
            f"layer {layer!r} is not a spatial feature map of model {loaded.name!r}; "
            f"choose one from candidate_layers() (last ones: {shown})"
        )
    if not site.aligned:
        raise ValueError(
            f"layer {site.path!r} of model {loaded.name!r} comes after a cropping layer: its map covers only part of "
            "the face and would be drawn in the wrong place; choose one from candidate_layers()"
        )
    if _head_output(loaded, target) not in site.feeds:
        raise ValueError(
            f"layer {site.path!r} of model {loaded.name!r} does not feed the {target.split('_')[0]} head; "
            f"choose one from candidate_layers(loaded, {target!r})"
        )
    return site


# ---------------------------------------------------------------- replaying the forward pass


def _call_for_inference(operation, args, kwargs):
    # Functional.call passes training=False to every layer (Layer.__call__ drops it for layers whose
    # call() does not take it); so do we, so that Dropout is off and BatchNormalization uses its
    # moving statistics. Plain operations (keras.ops functions in the graph) take no such argument.
    if isinstance(operation, keras.layers.Layer):
        kwargs = dict(kwargs, training=False)
    return operation(*args, **kwargs)


class _Replay:
    """One forward pass through a model graph that keeps two things on the side:

    - the output of the chosen feature-map node (watched by the tape), and
    - the pre-activation of the output heads named in `pre_activation_nodes`.
    """

    def __init__(self, route: tuple, pre_activation_nodes: dict, tape: tf.GradientTape):
        self.route = route
        self.pre_activation_nodes = pre_activation_nodes  # node -> key ("gender" / "age")
        self.tape = tape
        self.feature = None
        self.pre_activation: dict[str, tf.Tensor] = {}

    def run(self, graph, inputs: list, depth: int = 0) -> list:
        tensors = {id(x): tf.cast(y, x.dtype) for x, y in zip(graph.inputs, inputs)}
        on_route = self.route[depth] if depth < len(self.route) else None
        for node in _nodes_in_run_order(graph):
            if any(id(x) not in tensors for x in node.input_tensors):
                continue  # not computable from these inputs (same rule as Keras)
            args, kwargs = node.arguments.fill_in(tensors)
            if node is on_route and depth + 1 < len(self.route):
                inner = _graph_of(node.operation)
                outputs = self.run(inner, keras.tree.flatten(args[0]), depth + 1)
            else:
                outputs = keras.tree.flatten(_call_for_inference(node.operation, args, kwargs))
                if node is on_route:
                    self.tape.watch(outputs[0])
                    self.feature = outputs[0]
            key = self.pre_activation_nodes.get(node) if depth == 0 else None
            if key is not None:
                self.pre_activation[key] = _pre_activation(node.operation, args)
            for x, y in zip(node.outputs, outputs):
                tensors[id(x)] = y
        return [tensors[id(x)] for x in graph.outputs]


def _activation_name(operation) -> str:
    if isinstance(operation, keras.layers.Softmax):
        return "softmax"
    if isinstance(operation, keras.layers.ReLU):
        return "relu"
    activation = getattr(operation, "activation", None)
    return getattr(activation, "__name__", "") if activation is not None else ""


def _pre_activation(operation, args):
    """The input of the head's final non-linearity, recomputed from the layer's own weights."""
    x = args[0]
    if isinstance(operation, (keras.layers.Activation, keras.layers.Softmax, keras.layers.ReLU)):
        return x
    # keras.layers.Dense: activation(x @ kernel + bias). Quantised kernels are left to the fallback.
    z = keras.ops.matmul(x, operation.kernel)
    if operation.use_bias:
        z = z + operation.bias
    return z


def _can_recompute_pre_activation(operation, wanted: tuple[str, ...]) -> bool:
    if _activation_name(operation) not in wanted:
        return False
    if isinstance(operation, (keras.layers.Activation, keras.layers.Softmax, keras.layers.ReLU)):
        return True
    return isinstance(operation, keras.layers.Dense) and getattr(operation, "quantization_mode", None) is None


def _producer(graph, index: int):
    """The top-level node that computes the model's flattened output `index`, looking through
    layers that only pass it on (a Reshape or Flatten after a head's sigmoid), or None."""
    tensor = graph.outputs[index]
    nodes = _nodes_in_run_order(graph)
    while True:
        node = next((n for n in nodes if any(out is tensor for out in n.outputs)), None)
        if node is None or len(node.outputs) != 1:
            return None
        if type(node.operation).__name__ in PASS_THROUGH_LAYERS and len(node.input_tensors) == 1:
            tensor = node.input_tensors[0]
            continue
        return node


def _target_score(outputs: list, pre_activation: dict, mapping, target: str):
    """The scalar per image that the heatmap explains, shape (n,)."""
    if target.startswith("gender"):
        female_log_odds = _female_log_odds(outputs[mapping.gender_output], pre_activation.get("gender"), mapping)
        return female_log_odds if target == "gender_female" else -female_log_odds
    age = _age_years(outputs[mapping.age_output], pre_activation.get("age"), mapping)
    return age if target == "age_older" else -age


def _female_log_odds(output, logits, mapping):
    """log p_female - log p_male, shape (n,).

    `logits`: the head's recomputed pre-activation, or None. A head the loader marked
    `gender_from_logits` outputs logits itself.
    """
    if logits is None and getattr(mapping, "gender_from_logits", False):
        logits = output
    n = tf.shape(output)[0]
    if mapping.gender_kind == "sigmoid":
        if logits is not None:
            z = tf.reshape(tf.cast(logits, tf.float32), (n, -1))[:, 0]
        else:
            p = tf.reshape(tf.cast(output, tf.float32), (n, -1))[:, 0]
            p = tf.clip_by_value(p, _PROB_EPS, 1.0 - _PROB_EPS)
            z = tf.math.log(p) - tf.math.log1p(-p)
        return z if mapping.female_index == 1 else -z
    # softmax: log-odds of the female column against all the others.
    f = mapping.female_index
    if logits is not None:
        z = tf.reshape(tf.cast(logits, tf.float32), (n, -1))
        others = tf.concat([z[:, :f], z[:, f + 1 :]], axis=1)
        return z[:, f] - tf.reduce_logsumexp(others, axis=1)
    p = tf.reshape(tf.cast(output, tf.float32), (n, -1))
    p_female = tf.clip_by_value(p[:, f], _PROB_EPS, 1.0 - _PROB_EPS)
    return tf.math.log(p_female) - tf.math.log1p(-p_female)


def _age_years(output, pre_activation, mapping):
    """Predicted age in years (expected age for age classes), shape (n,)."""
    n = tf.shape(output)[0]
    if mapping.age_kind == "classes":
        values = tf.constant(np.asarray(mapping.age_class_values, dtype=np.float32))
        probabilities = tf.reshape(tf.cast(output, tf.float32), (n, -1))
        if getattr(mapping, "age_from_logits", False):
            probabilities = tf.nn.softmax(probabilities, axis=1)
        return tf.reduce_sum(probabilities * values, axis=1)
    source = output if pre_activation is None else pre_activation
    return tf.reshape(tf.cast(source, tf.float32), (n, -1))[:, 0]


def _channel_weights(grads, feature, method: str):
    """Per-image, per-channel weights (n, 1, 1, c)."""
    if method == "gradcam":
        return tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    # Grad-CAM++ as in the authors' code and tf-keras-vis 0.8.7. Their exp(score) factor is a
    # positive per-image constant that cancels in the per-image normalisation, so it is left out
    # (it also overflows float32 for logits above ~88).
    g2 = grads * grads
    g3 = g2 * grads
    global_sum = tf.reduce_sum(feature, axis=(1, 2), keepdims=True)
    denominator = 2.0 * g2 + g3 * global_sum
    denominator = tf.where(denominator == 0.0, tf.ones_like(denominator), denominator)  # as the authors' code
    alphas = g2 / denominator
    alpha_sum = tf.reduce_sum(alphas, axis=(1, 2), keepdims=True)
    alphas = alphas / (alpha_sum + tf.cast(alpha_sum == 0.0, alpha_sum.dtype))
    return tf.reduce_sum(tf.nn.relu(grads) * alphas, axis=(1, 2), keepdims=True)


def _normalise(maps):
    """Per-image min-max to [0, 1] (n, h, w); a flat map (no positive evidence) becomes all zeros.

    No additive epsilon (tf-keras-vis adds 1e-7 to the range): the map must not depend on the
    units of the score (years vs logits) or on how confident the model is.
    """
    low = tf.reduce_min(maps, axis=(1, 2), keepdims=True)
    high = tf.reduce_max(maps, axis=(1, 2), keepdims=True)
    return tf.math.divide_no_nan(maps - low, high - low)


class _CamProgram:
    """The compiled heatmap computation for one (model, feature layer, output mapping)."""

    def __init__(self, loaded, site: _Site):
        graph = _top_graph(loaded.keras_model)
        self.site = site
        self.mapping = loaded.mapping
        self.input_size = tuple(loaded.input_size)
        self.pre_activation_nodes = {}
        gender_node = _producer(graph, loaded.mapping.gender_output)
        if gender_node is not None and _can_recompute_pre_activation(gender_node.operation, ("sigmoid", "softmax")):
            self.pre_activation_nodes[gender_node] = "gender"
        age_node = _producer(graph, loaded.mapping.age_output)
        if (
            loaded.mapping.age_kind == "regression"
            and age_node is not None
            and _can_recompute_pre_activation(age_node.operation, ("relu",))
        ):
            self.pre_activation_nodes[age_node] = "age"
        self._graph_ref = weakref.ref(graph)
        # One tf.function per (target, method, resize), each traced once per padded batch shape.
        self._compiled: dict[tuple, tf.types.experimental.PolymorphicFunction] = {}

    def _maps(self, x, target: str, method: str, resize: bool):
        graph = self._graph_ref()
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            replay = _Replay(self.site.route, self.pre_activation_nodes, tape)
            outputs = replay.run(graph, [x])
            score = _target_score(outputs, replay.pre_activation, self.mapping, target)
            total = tf.reduce_sum(score)  # images are independent in inference mode
        feature = tf.cast(replay.feature, tf.float32)
        grads = tape.gradient(total, replay.feature)
        if grads is None:
            raise ValueError(f"the {target} score does not depend on layer {self.site.path!r}")
        grads = tf.cast(grads, tf.float32)
        # Per image: a map exists only where the gradient is finite and not zero everywhere (a
        # saturated sigmoid, dead units: the score does not change with this layer at all).
        finite = tf.math.is_finite(grads) & tf.math.is_finite(feature)
        defined = tf.reduce_all(finite, axis=(1, 2, 3)) & tf.reduce_any(grads != 0.0, axis=(1, 2, 3))
        grads, feature = tf.where(finite, grads, 0.0), tf.where(finite, feature, 0.0)
        weights = _channel_weights(grads, feature, method)
        cams = tf.nn.relu(tf.reduce_sum(feature * weights, axis=-1))  # (n, h', w')
        if resize:
            # Bilinear with half-pixel centres: feature cell i covers input pixels [i*s, (i+1)*s).
            cams = tf.image.resize(cams[..., None], self.input_size, method="bilinear")[..., 0]
        return tf.where(defined[:, None, None], _normalise(cams), tf.constant(np.nan, tf.float32))

    def __call__(self, x: np.ndarray, target: str, method: str, resize: bool) -> np.ndarray:
        key = (target, method, resize)
        with _CACHE_LOCK:
            compiled = self._compiled.get(key)
            if compiled is None:
                maps = functools.partial(self._maps, target=target, method=method, resize=resize)
                compiled = self._compiled[key] = tf.function(maps)
        return compiled(tf.convert_to_tensor(x)).numpy()


def _program(loaded, site: _Site) -> _CamProgram:
    key = (site.path, loaded.mapping, tuple(loaded.input_size))
    with _CACHE_LOCK:
        programs = _PROGRAM_CACHE.setdefault(loaded.keras_model, {})
        program = programs.get(key)
        if program is None:
            program = programs[key] = _CamProgram(loaded, site)
    return program


# ---------------------------------------------------------------- public computation


def _as_image_batch(images_uint8_rgb, input_size: tuple[int, int]) -> np.ndarray:
    images = np.asarray(images_uint8_rgb)
    if images.ndim == 3:
        images = images[None]
    height, width = int(input_size[0]), int(input_size[1])
    if images.ndim != 4 or images.shape[1:] != (height, width, 3):
        raise ValueError(
            f"expected uint8 RGB images of shape (n, {height}, {width}, 3) at the model's input size, "
            f"got {images.shape}; load them with analysis.dataset.load_image(path, loaded.input_size)"
        )
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB images (0-255), got dtype {images.dtype}")
    return images


def _padded_size(n: int, batch_size: int) -> int:
    # Pad batches to a power of two (at most batch_size) so a handful of shapes cover every call
    # and tf.function does not retrace for each new count.
    size = 1
    while size < n:
        size *= 2
    return min(size, batch_size)


def gradcam(
    loaded,
    images_uint8_rgb,
    target: str,
    layer: str | None = None,
    method: str = "gradcam",
    batch_size: int = 16,
    resize: bool = True,
) -> np.ndarray:
    """Heatmaps of where `loaded` found evidence for `target`, one per image.

    images_uint8_rgb: uint8 RGB (n, h, w, 3) or one (h, w, 3) image at the model's input size.
    target: one of TARGETS. layer: a name from candidate_layers(loaded); default_layer() if None.
    method: "gradcam" or "gradcam++". resize=False returns the maps at the feature map's size.
    Returns float32 (n, h, w) in [0, 1], 1 = strongest evidence in that image; all zeros when the
    layer holds no positive evidence for the target; all NaN for an image whose map does not
    exist (see undefined_maps): the gradient there is not finite, or zero everywhere.
    """
    _check_target(target)
    if method not in METHODS:
        raise ValueError(f"unknown Grad-CAM method {method!r}; choose one of {', '.join(METHODS)}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"Grad-CAM needs the TensorFlow Keras backend, not {keras.backend.backend()!r}")
    images = _as_image_batch(images_uint8_rgb, loaded.input_size)
    site = _resolve_site(loaded, layer if layer is not None else default_layer(loaded, target), target)
    program = _program(loaded, site)
    maps = []
    for start in range(0, len(images), int(batch_size)):
        chunk = images[start : start + int(batch_size)]
        x = np.asarray(loaded.prepare(chunk), dtype=np.float32)
        padded = _padded_size(len(chunk), int(batch_size))
        if padded > len(chunk):
            x = np.concatenate([x, np.zeros((padded - len(chunk),) + x.shape[1:], dtype=x.dtype)])
        maps.append(program(x, target, method, bool(resize))[: len(chunk)])
    if not maps:
        height, width = (int(s) for s in loaded.input_size) if resize else site.shape[:2]
        return np.zeros((0, height, width), dtype=np.float32)
    return np.clip(np.concatenate(maps), 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------- drawing
#
# matplotlib is not a dependency (it is large and only this module would use it), so the colour
# maps are small anchor tables interpolated linearly to 256 entries. "jet" is matplotlib's own
# piecewise-linear definition (its segment data), so it is exact. "magma" is 17 evenly spaced samples
# of matplotlib's 256-entry table (van der Walt & Smith), within 3/255 of it everywhere; it is the
# perceptually uniform, colour-blind-friendlier choice. "gray" is the plain ramp.

_JET_SEGMENTS = {  # matplotlib _cm._jet_data: (position, value) per channel
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}
_MAGMA_ANCHORS = (  # RGB 0-255 at positions 0, 1/16, ..., 1
    (0, 0, 4), (10, 8, 34), (29, 17, 70), (54, 16, 106), (80, 18, 124), (105, 28, 129),
    (130, 38, 129), (156, 46, 127), (182, 55, 121), (207, 65, 112), (230, 81, 99), (245, 105, 92),
    (251, 135, 97), (254, 165, 113), (254, 195, 135), (253, 224, 162), (252, 253, 191),
)  # fmt: skip
COLORMAPS: tuple[str, ...] = ("jet", "magma", "gray")


def colormap_lut(colormap: str = "jet") -> np.ndarray:
    """The colour map as a lookup table: uint8 (256, 3), row i is the colour of value i/255."""
    positions = np.linspace(0.0, 1.0, 256)
    if colormap == "jet":
        channels = [
            np.interp(positions, [p for p, _ in _JET_SEGMENTS[c]], [v for _, v in _JET_SEGMENTS[c]])
            for c in ("red", "green", "blue")
        ]
        table = np.stack(channels, axis=1) * 255.0
    elif colormap == "magma":
        anchors = np.asarray(_MAGMA_ANCHORS, dtype=np.float64)
        anchor_positions = np.linspace(0.0, 1.0, len(anchors))
        table = np.stack([np.interp(positions, anchor_positions, anchors[:, c]) for c in range(3)], axis=1)
    elif colormap == "gray":
        table = np.repeat(positions[:, None] * 255.0, 3, axis=1)
    else:
        raise ValueError(f"unknown colour map {colormap!r}; choose one of {', '.join(COLORMAPS)}")
    return np.round(table).astype(np.uint8)


def apply_colormap(heatmap, colormap: str = "jet") -> np.ndarray:
    """Colour a heatmap in [0, 1] (any shape) -> uint8 RGB (..., 3). NaN counts as 0."""
    values = np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0)
    indices = np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.intp)
    return colormap_lut(colormap)[indices]


def _resize_heatmap(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    # A float32 array becomes a 32-bit float ("F") PIL image: no rounding to 8 bits before resizing.
    resized = Image.fromarray(heatmap.astype(np.float32)).resize((width, height), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def undefined_maps(heatmaps) -> np.ndarray:
    """Per heatmap of gradcam(), True where it does not exist (all NaN): the target's gradient at
    the layer was not finite, or zero everywhere — the score does not change with that layer on
    that image (a saturated output, dead units), so there is no evidence to show, not even "none"."""
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    return ~np.isfinite(heatmaps).reshape(len(heatmaps), -1).any(axis=1)


def empty_maps(heatmaps) -> np.ndarray:
    """Per heatmap of gradcam(), True where it exists but is zero everywhere: the layer holds no
    positive evidence for the target on that face (drawn as the colour map's low end throughout)."""
    heatmaps = np.asarray(heatmaps, dtype=np.float32).reshape(len(heatmaps), -1)
    return np.isfinite(heatmaps).any(axis=1) & ~(np.nan_to_num(heatmaps) > 0).any(axis=1)


UNDEFINED_MAP = "no Grad-CAM: zero or non-finite gradient"
# What that means, for a user: said by the report's notes and the app's Errors page.
UNDEFINED_MAP_WHY = "the answer does not change with the layer there, e.g. a saturated output"


def own_answer_targets(rows: pd.DataFrame, key: str, head: str) -> np.ndarray:
    """Per row of a Predictions table, the target that explains model `key`'s own answer:
    "age" → "age_older" where it estimated at least the true age, else "age_younger";
    "gender" → the gender it gave (P(female) ≥ 0.5 → "gender_female")."""
    if head == "age":
        return np.where(rows[f"age_pred_{key}"] >= rows["age"], "age_older", "age_younger")
    if head == "gender":
        return np.where(rows[f"p_female_{key}"] >= 0.5, "gender_female", "gender_male")
    raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")


def by_target(targets, compute) -> list:
    """`compute(target, indices)` once per distinct target, results put back in row order:
    Grad-CAM runs one target at a time, a gallery mixes them."""
    targets = np.asarray(targets)
    out = [None] * len(targets)
    for target in np.unique(targets):
        chosen = np.flatnonzero(targets == target)
        for i, result in zip(chosen, compute(str(target), chosen)):
            out[i] = result
    return out


def overlay(image_uint8_rgb, heatmap, alpha: float = 0.45, colormap: str = "jet") -> np.ndarray:
    """Blend a coloured heatmap onto a face: (1 - alpha) * image + alpha * colour(heatmap).

    image_uint8_rgb: uint8 (h, w, 3) RGB, or (h, w) grey. heatmap: (h', w') in [0, 1]; it is
    resized bilinearly when its size differs (e.g. a map at model size on the original photo).
    Returns uint8 RGB (h, w, 3).
    """
    image = np.asarray(image_uint8_rgb)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image (h, w, 3), got {image.dtype} {image.shape}")
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"expected one heatmap (h, w), got shape {heatmap.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not np.isfinite(heatmap).any():  # no map (see undefined_maps): the face in grey, no colours
        grey = np.round(image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
        return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    heatmap = np.nan_to_num(heatmap, nan=0.0)
    if heatmap.shape != image.shape[:2]:
        heatmap = _resize_heatmap(heatmap, image.shape[0], image.shape[1])
    colours = apply_colormap(heatmap, colormap).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def colorbar(height: int, width: int, colormap: str = "jet", vertical: bool = True) -> np.ndarray:
    """The colour scale as an image, uint8 RGB (height, width, 3).

    Vertical: 1 (strongest evidence) at the top, 0 at the bottom. Horizontal: 0 left, 1 right.
    """
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"colour bar size must be positive, got {height}x{width}")
    height, width = int(height), int(width)
    if vertical:
        ramp = np.linspace(1.0, 0.0, height)[:, None] * np.ones((1, width))
    else:
        ramp = np.ones((height, 1)) * np.linspace(0.0, 1.0, width)[None, :]
    return apply_colormap(ramp, colormap)


def colormap_stops(colormap: str = "jet", n: int = 9) -> list[str]:
    """`n` evenly spaced colours from 0 to 1 as "#rrggbb", e.g. for an Altair gradient legend."""
    if int(n) < 2:
        raise ValueError(f"need at least 2 colour stops, got {n}")
    table = colormap_lut(colormap)
    rows = np.round(np.linspace(0, 255, int(n))).astype(int)
    return ["#{:02x}{:02x}{:02x}".format(*table[i]) for i in rows]
