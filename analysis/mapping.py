"""Which model output is age and which is gender, and how to read each one.

`describe_outputs` lists a Keras model's outputs (name, shape, final activation); `infer_mapping`
decides the roles from output names first, then from shape and activation, and says what it
assumed. Every choice can be overridden; when it cannot decide it raises ModelLoadError listing
the outputs and the options that settle it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import keras
import numpy as np

from analysis.compat import ModelFileError, ModelLoadError

DEFAULT_FEMALE_INDEX = 1  # UTKFace convention: gender code 1 = female
# Age softmax heads whose class values can be inferred from the number of classes.
KNOWN_AGE_CLASSES: dict[int, tuple[float, ...]] = {
    101: tuple(float(v) for v in range(0, 101)),  # DEX / IMDB-WIKI style 0..100
    117: tuple(float(v) for v in range(0, 117)),  # UTKFace ages 0..116
}

AGE_KINDS = ("regression", "classes")
GENDER_KINDS = ("sigmoid", "softmax")

# Layers that pass values through unchanged in meaning, looked through when asking
# "what activation produced this output?" or "what does the model do to its input first?".
PASS_THROUGH_LAYERS = {
    "Reshape", "Flatten", "Identity", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
    "GaussianDropout", "GaussianNoise", "AlphaDropout", "ActivityRegularization", "Permute",
}
_AGE_NAME = re.compile(r"(age|ages)(out|output|pred|prediction|head|reg|regression|cls|class|classes|logits|probs)?")
_GENDER_NAME = re.compile(
    r"(gender|genders|sex|male|female|malefemale)(out|output|pred|prediction|head|cls|class|logits|probs|prob)?"
)


# ---------------------------------------------------------------- descriptions


@dataclass(frozen=True)
class OutputInfo:
    """One model output as found in the file: name, shape without batch, final activation."""

    name: str
    shape: tuple
    activation: str  # "sigmoid", "softmax", "linear", "relu", ... or "unknown"

    @property
    def units(self) -> int:
        dims = [d for d in self.shape if d is not None]
        return int(np.prod(dims)) if dims else 1

    def describe(self) -> str:
        dims = ["None" if d is None else str(d) for d in self.shape]
        shape = "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
        return f"{self.name}: shape {shape}, activation {self.activation}"


@dataclass(frozen=True)
class OutputMapping:
    """Which model output is age and which is gender, and how to read them.

    `age_output` / `gender_output` index the model's flattened output list (`output_names`).
    `female_index`: softmax column that means female; for a sigmoid, 1 = the output is P(female),
    0 = the output is P(male). `*_from_logits`: the head has no final sigmoid/softmax, we apply it.
    """

    age_output: int
    gender_output: int
    age_kind: str  # "regression" | "classes"
    age_class_values: tuple[float, ...] | None
    gender_kind: str  # "sigmoid" | "softmax"
    female_index: int
    output_names: tuple[str, ...]
    age_from_logits: bool = False
    gender_from_logits: bool = False
    age_scale: str = "years"  # a regression age output's reading, see AGE_SCALES

    def to_dict(self) -> dict:
        return {
            "age_output": self.age_output,
            "age_output_name": self.output_names[self.age_output],
            "age_kind": self.age_kind,
            "age_scale": self.age_scale,
            "age_class_values": None if self.age_class_values is None else list(self.age_class_values),
            "age_from_logits": self.age_from_logits,
            "gender_output": self.gender_output,
            "gender_output_name": self.output_names[self.gender_output],
            "gender_kind": self.gender_kind,
            "gender_from_logits": self.gender_from_logits,
            "female_index": self.female_index,
            "output_names": list(self.output_names),
        }


# ---------------------------------------------------------------- outputs


def describe_outputs(model) -> list[OutputInfo]:
    """Name, shape (without batch) and final activation of each output, in flattened order."""
    structure = getattr(model, "output", None)
    tensors = list(model.outputs)
    names: list[str] | None = None
    if isinstance(structure, dict):
        paths = keras.tree.flatten_with_path(structure)
        if len(paths) == len(tensors):
            names = [".".join(str(p) for p in path) for path, _ in paths]
    if names is None:
        declared = list(getattr(model, "output_names", None) or [])
        if len(declared) == len(tensors) and len(set(declared)) == len(declared):
            names = [str(n) for n in declared]
        else:
            names = [t._keras_history.operation.name for t in tensors]
    if len(set(names)) != len(names):
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    return [OutputInfo(name, tuple(t.shape[1:]), _final_activation(t)) for name, t in zip(names, tensors)]


def _activation_name(fn) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return str(name).lower()


def _final_activation(tensor, depth: int = 0) -> str:
    """The activation that produced `tensor`, looking through linear/reshaping layers and sub-models."""
    if depth > 50:
        return "unknown"
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return "unknown"
    layer, node_index, tensor_index = history
    class_name = type(layer).__name__
    if isinstance(layer, keras.Model):
        inner = layer.outputs[tensor_index] if hasattr(layer, "outputs") else None
        return _final_activation(inner, depth + 1) if inner is not None else "unknown"
    if class_name == "Softmax":
        return "softmax"
    if class_name in ("ReLU", "LeakyReLU", "ELU", "PReLU"):
        return class_name.lower()
    if class_name == "Activation" or class_name in PASS_THROUGH_LAYERS:
        activation = _activation_name(layer.activation) if class_name == "Activation" else "linear"
        if activation != "linear":
            return activation
        try:
            previous = layer._inbound_nodes[node_index].input_tensors[0]
        except (IndexError, AttributeError):
            return "unknown"
        return _final_activation(previous, depth + 1)
    if getattr(layer, "activation", None) is not None and class_name != "InputLayer":
        return _activation_name(layer.activation)
    if class_name in ("Rescaling", "TFOpLambda"):
        return "linear"  # e.g. age = sigmoid × 100: a scaled value, no longer a probability
    if isinstance(layer, keras.Operation) and not isinstance(layer, keras.layers.Layer):  # a Keras 3 op node
        if class_name in _SHAPE_OPS:
            try:
                previous = layer._inbound_nodes[node_index].input_tensors[0]
            except (IndexError, AttributeError):
                return "unknown"
            return _final_activation(previous, depth + 1)
        # ops.sigmoid(x) is a sigmoid; arithmetic (Dense(1, "sigmoid")(x) * 100) gives a plain value
        return _OP_ACTIVATIONS.get(class_name, "linear")
    return "unknown"


# Keras 3 op nodes (keras.ops written on a tensor) seen through or read as an activation.
_SHAPE_OPS = {"Squeeze", "Reshape", "ExpandDims"}
_OP_ACTIVATIONS = {"Sigmoid": "sigmoid", "Softmax": "softmax", "LogSoftmax": "log_softmax", "Relu": "relu",
                   "Exp": "exponential", "Softplus": "softplus"}


def _name_tokens(name: str) -> list[str]:
    spaced = re.sub(r"([a-z])([A-Z])", r"\1_\2", name)
    return [t for t in re.split(r"[^a-z]+", spaced.lower()) if t]


def _name_role(name: str) -> str | None:
    tokens = _name_tokens(name)
    is_age = any(_AGE_NAME.fullmatch(t) for t in tokens)
    is_gender = any(_GENDER_NAME.fullmatch(t) for t in tokens)
    if is_age and not is_gender:
        return "age"
    if is_gender and not is_age:
        return "gender"
    return None


_REGRESSION_ACTIVATIONS = {"linear", "relu", "softplus", "exponential", "elu", "selu", "relu6", "leaky_relu",
                           "leakyrelu", "prelu", "abs"}


def _looks_like_gender(info: OutputInfo) -> bool:
    return (info.units == 1 and info.activation == "sigmoid") or (
        info.units == 2 and info.activation in ("softmax", "log_softmax"))


def _looks_like_age(info: OutputInfo, class_values) -> bool:
    if info.units == 1:
        return info.activation in _REGRESSION_ACTIVATIONS
    if info.units >= 3 and info.activation in ("softmax", "log_softmax"):
        return class_values is not None or info.units in KNOWN_AGE_CLASSES
    return False


def _resolve_output(spec, outputs: list[OutputInfo], role: str, model_label: str) -> int:
    names = [o.name for o in outputs]
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        index = int(spec)
    elif isinstance(spec, str) and spec in names:
        return names.index(spec)
    elif isinstance(spec, str) and "/" in spec and spec.replace("/", "_") in names:
        return names.index(spec.replace("/", "_"))  # a Keras 2 name the loader renamed (see keras2)
    elif isinstance(spec, str) and re.fullmatch(r"-?\d+", spec.strip()):
        index = int(spec)
    else:
        raise ModelLoadError(
            f"{role}_output {spec!r} is not an output of {model_label}.\n{_outputs_listing(outputs)}"
        )
    if not -len(outputs) <= index < len(outputs):
        raise ModelLoadError(
            f"{role}_output index {index} is out of range: {model_label} has {len(outputs)} output(s).\n"
            f"{_outputs_listing(outputs)}"
        )
    return index % len(outputs)


# Final activations whose values are not probabilities but become them through a softmax (or
# sigmoid): plain logits, and log-probabilities (softmax(log p) = p).
_LOGIT_ACTIVATIONS = {
    "linear": "have no softmax/sigmoid in the model (logits)",
    "log_softmax": "are log-probabilities (log_softmax)",
}


def _says_male(name: str) -> bool:
    """An output named for "male" alone (is_male, male_prob, p_male): a sigmoid there gives P(male)."""
    tokens = _name_tokens(name)
    return "male" in tokens and not any(t in ("female", "gender", "sex", "genders") for t in tokens)


def _outputs_listing(outputs: list[OutputInfo]) -> str:
    return "Its outputs:\n" + "\n".join(f"  [{i}] {info.describe()}" for i, info in enumerate(outputs))


class AmbiguousOutputs(ModelLoadError):
    """infer_mapping could not tell which output is which, but only a few (age, gender) pairs of
    outputs fit their shapes and activations: labelled images can decide between them
    (analysis.evaluation.prepare_model). `pairs` lists them as (age index, gender index);
    load_model adds `candidates`, the model read with each pair. A single pair is a reading that
    only its accuracy on labelled images can confirm (an unnamed output holding gender logits)."""

    def __init__(self, listing: str, pairs: list[tuple[int, int]], tried: str | None = None):
        """`listing`: what could not be told and the outputs; `tried`: what labelled images showed
        (None: they have not been asked yet)."""
        if tried is not None:
            labels = tried
        elif len(pairs) == 1:
            labels = ("With a labelled sample (evaluate --data, the app) the one way of reading them that fits is "
                      "checked on labelled images and kept if its gender answers clearly go with the labels.")
        else:
            labels = (f"With a labelled sample (evaluate --data, the app) the {len(pairs)} ways of reading them that "
                      "fit are tried on labelled images and a clearly better one is kept.")
        super().__init__(f"{listing}\n{labels}\n{MAPPING_HELP}")
        self.listing, self.pairs = listing, pairs
        self.candidates: tuple = ()


# At most this many readings are tried on labelled images; more means the model has too many
# look-alike outputs for a guess to be worth making.
MAX_OUTPUT_PAIRS = 4


def _plausible_pairs(outputs: list[OutputInfo], age, gender, values, logits: bool = False) -> list[tuple[int, int]]:
    """(age, gender) output pairs that fit by shape and activation, keeping a role already known.
    An age output may also be a 1-unit sigmoid (an age/100 or age/116 target); with logits=True
    a gender output may be 1 or 2 units without their sigmoid/softmax (asked only when no output
    looks like gender otherwise: two plain Dense(1) outputs)."""
    ages = [age] if age is not None else [
        i for i, o in enumerate(outputs) if _looks_like_age(o, values) or (o.units == 1 and o.activation == "sigmoid")]
    genders = [gender] if gender is not None else [
        i for i, o in enumerate(outputs)
        if _looks_like_gender(o) or (logits and o.units in (1, 2) and o.activation in _LOGIT_ACTIVATIONS)]
    return [(a, g) for a in ages for g in genders if a != g]


MAPPING_HELP = (
    "Say which is which: load_model(..., age_output=NAME_OR_INDEX, gender_output=NAME_OR_INDEX) or on the "
    "command line --age-output-a NAME_OR_INDEX --gender-output-a NAME_OR_INDEX (-b for model B). For a softmax "
    "age head also give its class ages: age_class_values=... / --age-classes-a 0:101; for the gender column that "
    "means female: female_index=0|1 / --female-index-a 0|1."
)


# How a regression age output turns into years: as it is, a fraction of 100 or 116 years (a
# target divided by the largest age, often with a sigmoid), or log-years. The labelled images
# decide unless the user says (age_scale= / --age-scale-a); any other "xN" can be given.
AGE_SCALES: tuple[str, ...] = ("years", "x100", "x116", "log")
AGE_SCALE_WORDS = {"years": "years as they are", "log": "log-years (age = exp(output))"}


# The loader's note on a sigmoid age output before labelled images have said how it gives years
# (models.calibrate_preprocessing and check_age_scale drop it once they have).
SIGMOID_AGE_NOTE = "ends in a sigmoid (0–1): not years as they are"


def age_scale_words(scale: str) -> str:
    return AGE_SCALE_WORDS.get(scale) or f"a fraction of {scale[1:]} years (age = output × {scale[1:]})"


def parse_age_scale(value) -> str:
    """"years", "log", or a multiplier ("x100", "100", 100, "×116") → its canonical name."""
    text = str(value).strip().lower().replace("×", "x")
    if text in ("years", "log"):
        return text
    try:
        factor = float(text.removeprefix("x"))
    except ValueError:
        factor = math.nan
    if not (math.isfinite(factor) and factor > 0):
        raise ModelLoadError(f"age scale must be 'years', 'log' or a positive multiplier such as 100 or 116, got {value!r}")
    return f"x{factor:g}"


def apply_age_scale(raw, scale: str) -> np.ndarray:
    """Years from a regression age output read with `scale` (see AGE_SCALES)."""
    raw = np.asarray(raw, dtype=np.float64)
    if scale == "years":
        return raw
    if scale == "log":
        return np.exp(np.clip(raw, -50.0, 50.0))
    return raw * float(scale[1:])


# How to give the ages of an age head's classes ("{n}" = their number); the app puts its own
# field's name in its place (app.state).
CLASS_AGES_HELP = (
    "Give the age of each class — for age groups, e.g. the middle of each group: age_class_values=(a1, …, a{n}) / "
    "--age-classes-a a1,…,a{n} ({n} numbers; -b for model B), or 'START:STOP' when the classes are the single "
    "years START to STOP−1."
)


def female_index_hint(value: int) -> str:
    """How to set the female column, in the library and on the command line (either model's slot)."""
    return f"female_index={value} (command line: --female-index-a {value}, or --female-index-b {value} for model B)"


def infer_mapping(
    outputs,
    *,
    model_label: str = "the model",
    age_output=None,
    gender_output=None,
    female_index=None,
    age_kind=None,
    age_class_values=None,
    gender_kind=None,
    age_scale=None,
) -> tuple[OutputMapping, list[str]]:
    """Decide which output is age and which is gender: by name first, then by shape and activation.

    Returns the mapping and notes on what was inferred. Raises ModelLoadError listing the outputs
    when it cannot decide.
    """
    outputs = list(outputs)
    notes: list[str] = []
    values = None if age_class_values is None else tuple(float(v) for v in age_class_values)
    age = None if age_output is None else _resolve_output(age_output, outputs, "age", model_label)
    gender = None if gender_output is None else _resolve_output(gender_output, outputs, "gender", model_label)

    def fail(reason: str):
        raise ModelLoadError(f"{reason} in {model_label}.\n{_outputs_listing(outputs)}\n{MAPPING_HELP}")

    def labels_may_decide(pairs, reason: str, fewest: int = 2):
        """Raise AmbiguousOutputs when a few readings fit: labelled images can choose between them
        (fewest=1: or confirm the only one)."""
        if fewest <= len(pairs) <= MAX_OUTPUT_PAIRS:
            raise AmbiguousOutputs(f"{reason}\n{_outputs_listing(outputs)}", pairs)

    if len(outputs) < 2:  # no setting can mend that
        raise ModelFileError(
            f"{model_label} has {len(outputs)} output; facecheck needs two, one for age and one for gender "
            f"(a single output that packs both, e.g. [age, P(female)] in one tensor, is not supported).\n"
            f"{_outputs_listing(outputs)}\nRe-save the model with separate age and gender outputs "
            "(keras.Model(inputs, [age, gender])), splitting a packed output with two slicing layers."
        )

    # 1. names
    for role in ("age", "gender"):
        if (age if role == "age" else gender) is not None:
            continue
        taken = {age, gender}
        by_name = [i for i, o in enumerate(outputs) if i not in taken and _name_role(o.name) == role]
        if len(by_name) > 1:
            plausible = [i for i in by_name if (_looks_like_age(outputs[i], values) if role == "age"
                                                else _looks_like_gender(outputs[i]))]
            by_name = plausible if len(plausible) == 1 else by_name
        if len(by_name) == 1:
            if role == "age":
                age = by_name[0]
            else:
                gender = by_name[0]
            notes.append(f"{role} output '{outputs[by_name[0]].name}' found by its name")
        elif len(by_name) > 1:
            fail(f"Several outputs are named like {role} ({', '.join(outputs[i].name for i in by_name)})")

    # 2. shape and activation
    for role in ("gender", "age"):
        if (age if role == "age" else gender) is not None:
            continue
        taken = {age, gender}
        candidates = [
            i for i, o in enumerate(outputs)
            if i not in taken and (_looks_like_age(o, values) if role == "age" else _looks_like_gender(o))
        ]
        if not candidates:
            if role == "gender":
                labels_may_decide(_plausible_pairs(outputs, age, gender, values, logits=True),
                                  "No output looks like gender (1 unit or 2, ending in a sigmoid or softmax) in "
                                  f"{model_label}: one may hold logits.", fewest=1)
            fail(f"No output looks like {role} (" + ("1 unit, or a softmax over a known number of ages"
                 if role == "age" else "1 unit or 2, ending in a sigmoid or softmax")
                 + "); if none is, this model cannot be evaluated here, else say which output it is")
        if len(candidates) > 1:
            labels_may_decide(_plausible_pairs(outputs, age, gender, values),
                              f"Could not tell which output is {role} in {model_label}.")
            fail(f"Could not tell which output is {role}")
        if role == "age":
            age = candidates[0]
        else:
            gender = candidates[0]
        info = outputs[candidates[0]]
        notes.append(
            f"{role} output '{info.name}' found by its shape and activation ({info.units} unit(s), {info.activation})"
        )
    if age == gender:
        fail("Age and gender cannot be the same output")

    # 3. how to read each head
    age_info, gender_info = outputs[age], outputs[gender]
    if age_kind is None:
        age_kind = "regression" if age_info.units == 1 and values is None else "classes"
    if age_kind not in AGE_KINDS:
        raise ModelLoadError(f"age_kind must be one of {AGE_KINDS}, got {age_kind!r}")
    age_from_logits = False
    if age_kind == "regression":
        if age_info.units != 1:
            fail(f"A regression age output needs 1 unit, but '{age_info.name}' has {age_info.units}")
        values = None
        if age_info.activation == "sigmoid" and age_scale is None:
            notes.append(f"age output '{age_info.name}' {SIGMOID_AGE_NOTE}; labelled images decide between age/100 "
                         "and age/116 (or give age_scale= / --age-scale-a)")
    else:
        if age_scale is not None:
            fail(f"An age scale ({age_scale}) applies to a regression age output, not to one over classes "
                 f"('{age_info.name}'); give the class ages instead")
        if values is None:
            values = KNOWN_AGE_CLASSES.get(age_info.units)
            if values is None:
                n = age_info.units
                raise ModelLoadError(
                    f"The age output '{age_info.name}' of {model_label} has {n} classes and their ages are unknown. "
                    + CLASS_AGES_HELP.replace("{n}", str(n))
                )
            notes.append(
                f"age output has {age_info.units} classes: read as ages {values[0]:g}…{values[-1]:g}, "
                "prediction = expected age"
            )
        if len(values) != age_info.units:
            fail(f"{len(values)} age class values were given but '{age_info.name}' has {age_info.units} "
                 f"class{'es' if age_info.units != 1 else ''}")
        age_from_logits = age_info.activation in _LOGIT_ACTIVATIONS
        if age_from_logits:
            notes.append(f"age classes {_LOGIT_ACTIVATIONS[age_info.activation]}: softmax applied")

    if gender_kind is None:
        gender_kind = {1: "sigmoid", 2: "softmax"}.get(gender_info.units)
        if gender_kind is None:
            fail(f"The gender output '{gender_info.name}' has {gender_info.units} units (expected 1 or 2)")
    if gender_kind not in GENDER_KINDS:
        raise ModelLoadError(f"gender_kind must be one of {GENDER_KINDS}, got {gender_kind!r}")
    if gender_info.units != {"sigmoid": 1, "softmax": 2}[gender_kind]:
        fail(f"A {gender_kind} gender output cannot have {gender_info.units} units ('{gender_info.name}')")
    if gender_info.activation == "log_softmax" and gender_kind == "sigmoid":
        fail(f"The gender output '{gender_info.name}' is a log-softmax over 1 unit (always 0): it carries no information")
    gender_from_logits = gender_info.activation in _LOGIT_ACTIVATIONS
    if gender_from_logits:
        notes.append(f"gender values {_LOGIT_ACTIVATIONS[gender_info.activation]}: {gender_kind} applied")
    elif gender_info.activation not in ("sigmoid", "softmax", "unknown"):
        notes.append(
            f"gender output '{gender_info.name}' ends in {gender_info.activation}, not a probability: "
            "its values are read as P and clipped to [0, 1]"
        )
    if female_index is None and gender_kind == "sigmoid" and _says_male(gender_info.name):
        female_index = 0
        notes.append(
            f"assumed the sigmoid '{gender_info.name}' gives P(male), as it is named for male (female_index 0); "
            "override with " + female_index_hint(1)
        )
    if female_index is None:
        female_index = DEFAULT_FEMALE_INDEX
        notes.append(
            "assumed "
            + ("the sigmoid gives P(female)" if gender_kind == "sigmoid" else "gender column 1 = female")
            + " (UTKFace convention); override with " + female_index_hint(0)
        )
    female_index = int(female_index)
    if female_index not in (0, 1):
        raise ModelLoadError(f"female_index must be 0 or 1, got {female_index}")

    mapping = OutputMapping(
        age_output=age,
        gender_output=gender,
        age_kind=age_kind,
        age_class_values=values,
        gender_kind=gender_kind,
        female_index=female_index,
        output_names=tuple(o.name for o in outputs),
        age_from_logits=age_from_logits,
        gender_from_logits=gender_from_logits,
        age_scale="years" if age_scale is None else parse_age_scale(age_scale),
    )
    return mapping, notes
