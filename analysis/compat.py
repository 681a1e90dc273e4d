"""Read a model file safely and make old formats loadable by Keras 3.

`load_model_file` is the one entry point: it identifies the file from its bytes (`.keras` zip,
Keras-3 `.h5`, Keras-2 `.h5`, or something that is not a model and deserves a clear message),
checks the stored layer config, and hands the file to `keras.saving.load_model`.

No code from the file is ever executed by this module: the checks and shims read the stored JSON
config only, a custom layer class named by the file is refused (never imported), and the shims
pick their behaviour from fixed tables. Keras then loads in safe mode; a `Lambda` layer (stored
Python code) is refused unless the caller knowingly passes `allow_unsafe=True`.

Keras 2 configs (`.h5` files, and the `.keras` archives tf.keras 2.13–2.15 wrote) go through the
shims of `analysis.keras2` first; the patched config is written to a temporary copy, the user's file
is never changed.

A `Lambda` layer that applies a keras.applications `preprocess_input` is replaced by an identity
layer (with a note), so no code runs and the input preprocessing is left to calibration, whose
presets include every keras.applications mode: Keras 3 stores such a Lambda as a bare function name
(`preprocess_input`, module "builtins") that even Keras cannot load back, Keras 2 as that function's
bytecode with its module (`keras.applications.mobilenet_v2`).

Keras 3 files need no shim for what Keras 2 stored as TensorFlow-op layers: an operation written on a symbolic tensor
(`x / 127.5 - 1`, or `keras.applications.*.preprocess_input(inputs)` as in TensorFlow's
transfer-learning tutorial) is stored as an op node (`TrueDivide`, `Subtract`, `GetItem`, ...) of
`keras.ops`. Those are Keras' own code; they are accepted from a fixed list of op modules, and only
when their stored arguments are tensors and constants, never functions. A Keras 3 `.h5` file stores
those nodes without their module, and Keras cannot read it back (nor Keras 3's own MobileNetV3 or
ConvNeXt saved as `.h5`): the loader hands Keras the op classes by name, under names of their own
(an op and a layer can both be "Add"), and writes `x[..., k]` with explicit slices.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import keras
import numpy as np

from analysis.keras2 import (
    SHIM_CLASSES,
    TF_OP_NAMES,
    affine_map,
    first_call,
    is_legacy_config,
    layer_entries,
    patch_keras2_config,
    tf_op_supported,
)


class ModelLoadError(ValueError):
    """A model file that cannot be loaded or understood; the message says what to do."""


class ModelFileError(ModelLoadError):
    """The file itself cannot be loaded (not a model, damaged, unsafe, unsupported layers): no
    setting such as an output mapping or a preprocessing can change that."""


def load_model_file(path: Path, *, allow_unsafe: bool, notes: list[str]) -> tuple[keras.Model, str]:
    """(Keras model, file format label) for the file at `path`; what was shimmed is appended to `notes`.

    Raises ModelLoadError (a ValueError) with a readable message for anything it cannot or must not load.
    """
    try:  # a hostile or damaged config must end in a readable refusal, whatever it breaks on the way
        kind, file_format, config = _inspect_file(path)
        _refuse_malformed(config, path)
        patched = json.loads(json.dumps(config))
        changed = _replace_preprocess_input_lambdas(patched, notes)  # first: it reads Keras 2 Lambda arguments
        custom_objects = {}
        if kind.endswith("-legacy"):
            custom_objects = patch_keras2_config(patched, notes, archive=kind == "keras-legacy")
            changed = True
        op_classes = _refuse_unloadable(patched, path, allow_unsafe, notes)
        if op_classes and H5_OP_ALIAS in json.dumps(config):
            # the alias is ours: anywhere in the file (an initializer, say) it would reach an op unchecked
            raise ModelFileError(f"{path.name}: its configuration names {H5_OP_ALIAS}…, which no Keras model "
                                 "holds; the file was edited to look like something else — not loaded")
        if op_classes:
            _spell_out_ellipses(patched)
            op_classes = _alias_h5_ops(patched, op_classes)
            changed = True
    except ModelLoadError:
        raise
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, OverflowError, RecursionError) as exc:
        raise ModelFileError(f"{path.name}: its stored model configuration is malformed ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); the file is damaged or was edited — not loaded") from None
    if kind.startswith("h5"):  # .h5 configs name no module: Keras needs these classes handed over
        custom_objects.update({entry["class_name"]: _application_layer(entry["class_name"])
                               for entry in layer_entries(patched) if entry["class_name"] in APPLICATION_LAYERS})
    custom_objects.update(op_classes)  # op nodes stored without a module, renamed by _alias_h5_ops
    return _load_keras_model(path, kind, patched if changed else None, custom_objects, allow_unsafe), file_format


# ---------------------------------------------------------------- what the file is

_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _inspect_file(path: Path) -> tuple[str, str, dict]:
    """Identify the file without running anything: ("keras" | "keras-legacy" | "h5" | "h5-legacy", format
    label, config); the -legacy kinds hold a Keras 2 config."""
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            raise ModelFileError(
                f"{path} is a TensorFlow SavedModel folder; Keras 3 cannot load those as models. "
                "Re-save it from the original code as a .keras file (model.save('model.keras'))."
            )
        raise ModelFileError(f"{path} is a folder, not a model file (.keras or .h5)")
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(f"{path.name} is empty (0 bytes): not a model. Was the download or upload interrupted?")
    with open(path, "rb") as handle:
        head = handle.read(512)

    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
                if "config.json" not in names:
                    raise ModelFileError(f"{path.name} is a zip archive but not a Keras model (no config.json inside)"
                                         + zipped_model_hint(names))
                _check_unpacked_sizes(archive, path)
                config = json.loads(archive.read("config.json"))
                metadata = json.loads(archive.read("metadata.json")) if "metadata.json" in names else {}
                metadata = metadata if isinstance(metadata, dict) else {}
                if not any(n.endswith(".h5") or n.endswith(".npz") for n in names):
                    raise ModelFileError(f"{path.name} has a model config but no weights file inside")
        except (zipfile.BadZipFile, EOFError, OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFileError(
                f"{path.name} looks like a .keras archive but cannot be read ({exc}); "
                "it is probably truncated or damaged — download it again"
            ) from None
        version = str(metadata.get("keras_version", "unknown"))
        if version.startswith("2."):  # tf.keras 2.13–2.15 wrote .keras archives with Keras 2 configs
            return "keras-legacy", f".keras (Keras {version}, legacy)", config
        return "keras", f".keras (Keras {version})", config

    if head.startswith(_HDF5_MAGIC):
        import h5py

        try:
            with h5py.File(path, "r") as handle:
                raw = handle.attrs.get("model_config")
                version = handle.attrs.get("keras_version", b"unknown")
                has_weights = "model_weights" in handle
                looks_like_weights = "layer_names" in handle.attrs or "layers" in handle
        except OSError as exc:
            raise ModelFileError(
                f"{path.name} is an HDF5 file that cannot be read ({exc}); it is probably truncated or damaged"
            ) from None
        if raw is None:
            hint = ""
            if looks_like_weights:
                hint = (" It looks like a weights-only file (model.save_weights): the architecture needs the "
                        "original code. Save the whole model instead (model.save('model.keras')).")
            raise ModelFileError(f"{path.name} is an HDF5 file without a model configuration, not a full model.{hint}")
        if not has_weights:
            raise ModelFileError(f"{path.name} has a model configuration but no weights (model_weights group missing)")
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        version = version.decode("utf-8") if isinstance(version, bytes) else str(version)
        try:
            config = json.loads(text)
        except json.JSONDecodeError:
            raise ModelFileError(f"{path.name}: the stored model configuration is not valid JSON") from None
        legacy = version.startswith(("1.", "2.")) or (not version.startswith("3.") and is_legacy_config(config))
        return ("h5-legacy" if legacy else "h5"), f".h5 (Keras {version}{', legacy' if legacy else ''})", config

    if head[:1] in (b"{", b"[") or _is_text(head):
        hint = ""
        if b"modelTopology" in head or b"weightsManifest" in head:
            hint = " It looks like a TensorFlow.js model.json; convert it to .h5 or .keras first."
        elif b"class_name" in head:
            hint = " It looks like a model architecture saved as JSON (to_json), which has no weights."
        raise ModelFileError(f"{path.name} is a text file, not a Keras model (.keras or .h5).{hint}")
    raise ModelFileError(
        f"{path.name} is not a Keras model file: a .keras file is a zip archive and an .h5 file is HDF5, "
        f"but this file starts with bytes {head[:8].hex(' ')}. Check that you picked the right file."
    )


# Bounds on what a .keras archive may unpack to, checked on the sizes its directory declares
# (Python's zipfile never inflates an entry past its declared size): a model's config is
# kilobytes to a few megabytes; the weights no larger than the app's 1 GB model upload, with room.
MAX_CONFIG_BYTES = 64 * 2**20
MAX_ARCHIVE_UNPACKED_BYTES = 4 * 2**30


def _check_unpacked_sizes(archive: zipfile.ZipFile, path: Path) -> None:
    """Refuse a .keras archive whose entries would unpack to more than the bounds above (a zip bomb)."""
    entries = archive.infolist()
    for info in entries:
        if info.filename in ("config.json", "metadata.json") and info.file_size > MAX_CONFIG_BYTES:
            raise ModelFileError(
                f"{path.name}: its {info.filename} would unpack to {info.file_size / 2**20:,.0f} MB "
                f"(a model's is at most a few MB; limit {MAX_CONFIG_BYTES // 2**20} MB) — refused as a possible "
                "zip bomb. Re-save the model with model.save('model.keras')."
            )
    total = sum(info.file_size for info in entries)
    if total > MAX_ARCHIVE_UNPACKED_BYTES:
        raise ModelFileError(
            f"{path.name} would unpack to {total / 2**30:,.1f} GB (limit {MAX_ARCHIVE_UNPACKED_BYTES // 2**30} GB) "
            "— refused as a possible zip bomb"
        )


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---------------------------------------------------------------- safety checks on the stored config


def _refuse_malformed(config: dict, path: Path) -> None:
    """Refuse an entry whose config is not a dict: Keras reads `null` as empty, which would load the
    entry past every check below."""
    for item in layer_entries(config):
        if not isinstance(item.get("config"), dict):
            raise ModelFileError(
                f"{path.name}: the stored entry {item.get('name', '?')} ({item['class_name']}) has no configuration "
                f"dictionary (config is {type(item.get('config')).__name__}). Keras 3 cannot read that safely (it "
                "would load the entry unchecked); the file is damaged, edited, or from a very old Keras — not loaded"
            )


def zipped_model_hint(names) -> str:
    """For a zip that is not a .keras archive: the model files it holds, if any, and what to do."""
    models = sorted(n for n in names if n.lower().endswith((".keras", ".h5", ".hdf5")) and not n.endswith("/"))
    if not models:
        return ""
    return f". It holds {', '.join(models[:3])}{' …' if len(models) > 3 else ''}: unzip it and give that file"


def _refuse_unloadable(config: dict, path: Path, allow_unsafe: bool, notes: list[str]) -> dict:
    """Refuse Lambda layers (stored Python code) unless allowed, and custom layers we have no code for.
    Returns the Keras op classes a Keras 3 .h5 config names without their module, which Keras
    needs handed over (see _h5_op_class)."""
    top = config.get("class_name") if isinstance(config, dict) else None
    if top and not _is_builtin_layer(config):  # Functional / Sequential / Model are built in
        raise ModelFileError(
            f"{path.name} is a subclassed model (class {top}): its structure is Python code, which a model file "
            "does not hold and facecheck never imports. Rebuild it with the functional API "
            "(keras.Model(inputs, [age, gender])) and load its weights into that, then save it, or evaluate it "
            "where its code is installed."
        )
    lambdas, custom, unsupported, ops, h5_ops, h5_named = [], [], [], [], [], []
    h5_op_classes: dict[str, type] = {}
    for item in layer_entries(config):  # every entry, named or not: a Sequential's layers need no name
        class_name = item["class_name"]
        layer_name = item["config"].get("name", item.get("name", "?"))
        if class_name == "Lambda":  # those applying preprocess_input were replaced already
            lambdas.append(layer_name)
        elif class_name in SHIM_CLASSES and not tf_op_supported(item):
            unsupported.append(f"{layer_name} (Keras 2 TensorFlow op {item['config'].get('function', '?')})")
        elif str(item.get("module")).startswith("keras.src.ops."):
            if not _is_keras_op(item):
                ops.append(f"{layer_name} ({item['module']}.{class_name})")
        elif _is_h5_op_entry(item):
            op_class = _h5_op_class(item)
            if op_class is None:
                h5_ops.append(f"{layer_name} ({class_name})")
            else:
                h5_op_classes[class_name] = op_class
                h5_named.append(f"{layer_name} ({class_name})")
        elif not _is_builtin_layer(item):
            custom.append(class_name if layer_name == "?" else f"{layer_name} ({class_name})")
    if lambdas and not allow_unsafe:
        raise ModelFileError(
            f"{path.name} contains Lambda layer(s) {', '.join(lambdas)}. A Lambda layer stores Python code in the "
            "file and loading it would run that code — a model file from elsewhere could do anything on this "
            "machine, so it was not loaded. If you trust where this file came from, load it knowingly with "
            "allow_unsafe=True (command line: --allow-unsafe-model)."
        )
    if lambdas:
        notes.append(
            f"UNSAFE: loaded with allow_unsafe=True; Lambda layer(s) {', '.join(lambdas)} run code stored in the file"
        )
    if unsupported:
        raise ModelFileError(
            f"{path.name} uses Keras 2 TensorFlow-op layer(s) {', '.join(unsupported)} that Keras 3 cannot "
            f"rebuild. Supported: elementwise arithmetic with a constant ({', '.join(sorted(TF_OP_NAMES))}), the "
            "channel reversal x[..., ::-1], and, called once, the sum, product or difference of two tensors, "
            "activations such as tf.nn.relu, tf.concat, a spatial tf.reduce_mean/reduce_max and tf.image.resize. "
            "Re-save the model with standard Keras layers."
        )
    if ops:
        raise ModelFileError(
            f"{path.name} uses Keras operation(s) {', '.join(ops)} that facecheck does not load: only array "
            f"operations of keras.ops (numpy, math, nn, image; from core only {', '.join(sorted(_KERAS_CORE_OPS))}) "
            "whose stored arguments are tensors and constants (never functions) are accepted. Re-save the model "
            "with standard Keras layers."
        )
    if h5_ops:
        raise ModelFileError(
            f"{path.name} holds Keras operation(s) {', '.join(h5_ops[:5])}{' …' if len(h5_ops) > 5 else ''} (written as arithmetic or "
            "preprocess_input on a tensor), which Keras 3's .h5 format stores without saying where they come "
            "from, and which facecheck does not load (only array operations of keras.ops whose stored arguments "
            "are tensors and constants, named by one module alone): Keras itself cannot load this file either. "
            "Save the model as .keras instead (model.save('model.keras'))."
        )
    if h5_named:
        counts = Counter(name.rsplit(" (", 1)[1].rstrip(")") for name in h5_named)
        notes.append(
            f"Keras operation(s) {', '.join(f'{n} {cls}' for cls, n in sorted(counts.items()))} (arithmetic or "
            "preprocess_input written on a tensor) loaded "
            "as Keras' own keras.ops classes: Keras 3's .h5 format does not say where they come from, so Keras "
            "alone cannot load this file (nothing from the file is run)"
        )
    if custom:
        raise ModelFileError(
            f"{path.name} uses custom layer(s) {', '.join(custom)} whose code is not in the file. We never import "
            "code named by a model file. Re-save the model with standard Keras layers, or evaluate it where its "
            "code is installed."
        )
    return h5_op_classes


def _preprocess_input_source(item: dict) -> str | None:
    """Where a Lambda layer's function comes from when it is a keras.applications `preprocess_input`
    ("keras.applications.<model>" for Keras 2, "a function named preprocess_input" for Keras 3), else None."""
    config = item["config"]
    function, module = config.get("function"), str(config.get("module") or "")
    if isinstance(function, dict) and function.get("class_name") == "function" and function.get("config") == "preprocess_input":
        return "a function named preprocess_input"  # Keras 3: the name only, no code
    if config.get("function_type") == "lambda" and module.startswith(("keras.", "tensorflow.")) and ".applications." in module:
        return module[module.index("applications."):]  # Keras 2: the function's bytecode, never run here
    return None


def _replace_preprocess_input_lambdas(config: dict, notes: list[str]) -> bool:
    """Turn the Lambda layers _preprocess_input_source recognises into identity layers; True if any."""
    replaced = []
    for item in layer_entries(config):
        if item["class_name"] == "Lambda" and (source := _preprocess_input_source(item)):
            old = item["config"]
            # Activation("linear") rather than Identity: detect_preprocessing_inside looks through an
            # Identity, but must stop here — what this layer stood for is not known.
            item.update(class_name="Activation", module="keras.layers", registered_name=None)
            item["config"] = {key: old[key] for key in ("name", "trainable", "dtype") if key in old}
            item["config"]["activation"] = "linear"
            for node in item.get("inbound_nodes") or []:  # Lambda took a `mask` argument, Identity does not
                calls = [node] if isinstance(node, dict) else [ref for ref in node if isinstance(ref, list)]
                for call in calls:
                    extra = call.get("kwargs") if isinstance(call, dict) else (call[3] if len(call) > 3 else None)
                    if isinstance(extra, dict):
                        extra.pop("mask", None)
            replaced.append(f"{old.get('name', '?')} ({source})")
    if replaced:
        notes.append(
            f"Lambda layer(s) {', '.join(replaced)} replaced by an identity (linear activation) layer: the file "
            "holds no runnable "
            "preprocessing (and no code is run from it); the input preprocessing is chosen by calibration, "
            "whose presets include every keras.applications mode (caffe, torch, [-1, 1], 0–1)"
        )
    return bool(replaced)


# Keras 3 op nodes accepted in a model (see the module docstring), and the serialized objects
# their config and arguments may hold: tensors, constants, slices, a dtype policy — no functions
# (`__lambda__` or a named one; e.g. `Vectorize` takes one).
_KERAS_OP_MODULES = ("keras.src.ops.numpy", "keras.src.ops.math", "keras.src.ops.nn", "keras.src.ops.image",
                     "keras.src.ops.core")
# From keras.src.ops.core (control flow and functions otherwise) only these: `ops.cast(x, "float32")`
# starts models with a uint8 input.
_KERAS_CORE_OPS = frozenset({"Cast"})
_DATA_CLASS_NAMES = frozenset({"__keras_tensor__", "__tensor__", "__numpy__", "__ellipsis__", "__slice__", "__bytes__",
                               "DTypePolicy"})


def _keras_op_class(class_name: str, modules=_KERAS_OP_MODULES):
    """The Keras 3 op class (not a layer) of that name in one of `modules`, else None."""
    for module in modules:
        if module == "keras.src.ops.core" and class_name not in _KERAS_CORE_OPS:
            continue
        cls = getattr(importlib.import_module(module), class_name, None)
        if isinstance(cls, type) and issubclass(cls, keras.Operation) and not issubclass(cls, keras.layers.Layer):
            return cls
    return None


def _is_h5_op_entry(item: dict) -> bool:
    """A Keras 3 op node as a .h5 config stores it: no module, no layer settings ("trainable"), and
    the class name of a Keras op (which may also be a layer's: `x + 1.0` is stored as "Add")."""
    return "module" not in item and "trainable" not in item["config"] and _keras_op_class(item["class_name"]) is not None


# What a Keras 3 .h5 op node's class name becomes for loading: an op and a layer can share a name
# ("Add", "Multiply" in MobileNetV3), and Keras looks both up by that name alone.
H5_OP_ALIAS = "facecheck_keras_op_"


def _alias_h5_ops(config: dict, op_classes: dict[str, type]) -> dict[str, type]:
    """Give each accepted .h5 op node a class name of its own (H5_OP_ALIAS + name); returns the
    custom objects Keras needs for them."""
    for item in layer_entries(config):
        if item["class_name"] in op_classes and _is_h5_op_entry(item):
            item["class_name"] = H5_OP_ALIAS + item["class_name"]
    return {H5_OP_ALIAS + name: cls for name, cls in op_classes.items()}


def _spell_out_ellipses(config: dict) -> int:
    """In Keras 3 .h5 op nodes, write `x[..., i]` as `x[:, :, :, i]` when x's rank is stored: the
    legacy .h5 reader turns the stored ellipsis into a Python object that Keras' node
    deserialisation then rejects ("Could not parse config: Ellipsis"). Returns how many were spelled out."""
    every_slice = {"class_name": "__slice__", "config": {"start": None, "stop": None, "step": None}}
    done = 0
    for item in layer_entries(config):
        if item.get("class_name") != "GetItem" or "module" in item:
            continue
        for node in item.get("inbound_nodes") or []:
            args = node.get("args") if isinstance(node, dict) else None
            if not (isinstance(args, list) and len(args) == 2 and isinstance(args[0], dict) and isinstance(args[1], list)):
                continue
            shape = (args[0].get("config") or {}).get("shape")
            index = args[1]
            ellipses = [i for i, v in enumerate(index) if isinstance(v, dict) and v.get("class_name") == "__ellipsis__"]
            used = len(index) - len(ellipses) - sum(v is None for v in index)  # None (newaxis) uses no dimension
            if not isinstance(shape, list) or len(ellipses) != 1 or used > len(shape):
                continue
            at = ellipses[0]
            args[1] = index[:at] + [dict(every_slice)] * (len(shape) - used) + index[at + 1:]
            done += 1
    return done


def _h5_op_class(item: dict):
    """The Keras op class of a Keras 3 .h5 entry (which names no module) when exactly one module of
    _KERAS_OP_MODULES defines that name and the entry passes _is_keras_op there; else None."""
    found = {module: cls for module in _KERAS_OP_MODULES if (cls := _keras_op_class(item["class_name"], [module]))}
    if len(set(found.values())) != 1:
        return None
    module, cls = next(iter(found.items()))
    return cls if _is_keras_op({**item, "module": module}) else None


def _is_keras_op(item: dict) -> bool:
    """A Keras 3 op node from _KERAS_OP_MODULES whose stored config and arguments are data only."""
    if item.get("module") not in _KERAS_OP_MODULES or _keras_op_class(item["class_name"], [item["module"]]) is None:
        return False
    stack = [item["config"], item.get("inbound_nodes")]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if "class_name" in value and value["class_name"] not in _DATA_CLASS_NAMES:
                return False
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return True


# Layer classes that keras.applications models use and keras.layers does not export, by module.
APPLICATION_LAYERS = {"LayerScale": "keras.src.applications.convnext"}


def _application_layer(class_name: str, module: str | None = None):
    """The layer class `class_name` of a keras.applications module (Keras' own code), else None."""
    try:
        cls = getattr(importlib.import_module(module or APPLICATION_LAYERS[class_name]), class_name, None)
    except (ImportError, KeyError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, keras.layers.Layer) else None


def _is_builtin_layer(item: dict) -> bool:
    class_name = item["class_name"]
    module = item.get("module")
    if class_name in ("Functional", "Model", "Sequential", "InputLayer") or class_name in SHIM_CLASSES:
        return True
    if module and module.split(".")[0] in ("keras_hub", "keras_cv", "keras_nlp"):
        return True  # Keras' own add-on packages: Keras imports them only if installed
    if module and not (module == "keras" or module.startswith("keras.")):
        return False
    if module and module.startswith("keras.src.applications."):  # e.g. ConvNeXt's LayerScale: Keras' own code
        return _application_layer(class_name, module) is not None
    if not module and class_name in APPLICATION_LAYERS:  # .h5 files name no module
        return True
    registered = item.get("registered_name")
    if registered and registered != class_name and ">" in str(registered):
        return False
    return isinstance(getattr(keras.layers, class_name, None), type)


# ---------------------------------------------------------------- loading


@contextlib.contextmanager
def _loadable_copy(path: Path, suffix: str, config: dict | None):
    """A path Keras accepts: the file itself, or a temporary copy with the right suffix / patched config."""
    # Keras checks the suffix case-sensitively: model.KERAS is copied to model.keras.
    if config is None and path.suffix in ((".keras",) if suffix == ".keras" else (".h5", ".hdf5")):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="facecheck-model-") as folder:
        copy = Path(folder) / f"model{suffix}"
        if config is not None and suffix == ".keras":
            with zipfile.ZipFile(path) as source, zipfile.ZipFile(copy, "w") as target:
                for info in source.infolist():
                    entry_info = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                    entry_info.compress_type = info.compress_type  # Keras stores weights uncompressed: keep it so
                    if info.filename == "config.json":
                        target.writestr(entry_info, json.dumps(config))
                    else:
                        with source.open(info) as entry, target.open(entry_info, "w", force_zip64=True) as out:
                            shutil.copyfileobj(entry, out, 2**20)
            yield copy
            return
        shutil.copyfile(path, copy)
        if config is not None:
            import h5py

            with h5py.File(copy, "r+") as handle:
                handle.attrs["model_config"] = json.dumps(config).encode("utf-8")
        yield copy


def _load_keras_model(path: Path, kind: str, patched: dict | None, custom_objects: dict, allow_unsafe: bool):
    """Load with Keras (safe mode unless allowed), from a temporary copy holding `patched` if given."""
    suffix = ".keras" if kind.startswith("keras") else ".h5"
    try:
        with _loadable_copy(path, suffix, patched) as loadable:
            model = keras.saving.load_model(
                loadable, custom_objects=custom_objects, compile=False, safe_mode=not allow_unsafe
            )
    except ModelLoadError:
        raise
    except Exception as exc:  # Keras raises many types; the user needs one readable message
        message = str(exc).split("\n")[0][:600]
        hint = "If the file is complete, it may use layers or options this Keras version does not support."
        if kind == "h5":  # written by Keras 3, whose .h5 format drops what operation nodes need
            hint = ("Keras 3's .h5 format cannot store every model, so Keras itself cannot read some of its .h5 "
                    "files back: save the model as .keras (model.save('model.keras')) and load that.")
        raise ModelFileError(f"Keras could not load {path.name} ({type(exc).__name__}: {message}). {hint}") from exc
    if not isinstance(model, keras.Model):
        raise ModelFileError(f"{path.name} holds a {type(model).__name__}, not a Keras model")
    return model


# ---------------------------------------------------------------- reading arithmetic op layers and op nodes


# Keras 3 op nodes that are arithmetic with a constant operand, by kind (see keras2.affine_map).
_KERAS_OP_KINDS = {"Add": "add", "Multiply": "multiply", "Subtract": "subtract", "TrueDivide": "divide",
                   "Divide": "divide"}


def keras_op_affine(op) -> tuple[float, float, str] | None:
    """(a, b, description) when a Keras 3 op node computes a·x + b with a constant c, else None.

    A per-channel constant (e.g. the ImageNet mean) is averaged over its channels, as the other
    preprocessing readers do with per-channel means and variances."""
    kind = _KERAS_OP_KINDS.get(type(op).__name__)
    args = first_call(op)[0]
    if kind is None or isinstance(op, keras.layers.Layer) or len(args) != 2:
        return None
    symbolic = [isinstance(arg, keras.KerasTensor) for arg in args]
    if symbolic.count(True) != 1:
        return None
    try:
        values = np.asarray(keras.ops.convert_to_numpy(args[symbolic.index(False)]), float).reshape(-1)
    except (TypeError, ValueError):
        return None
    if not 1 <= values.size <= 4 or not np.all(np.isfinite(values)):
        return None
    affine = affine_map(kind, float(values.mean()), tensor_first=symbolic[0])
    if affine is None:
        return None
    shown = ", ".join(f"{v:.4g}" for v in values)
    return (*affine, f"{type(op).__name__}({shown})")


def keras_channel_order(op) -> tuple[int, ...] | None:
    """The channel order a Keras 3 `Stack` node builds from `x[..., k]` slices of one tensor (e.g.
    (2, 1, 0) for the RGB → BGR flip of keras.applications' "caffe" preprocessing), else None."""
    args = first_call(op)[0]
    if type(op).__name__ != "Stack" or getattr(op, "axis", None) not in (-1, 3) or len(args) != 1:
        return None
    order, sources = [], set()
    for tensor in args[0] if isinstance(args[0], (list, tuple)) else ():
        history = getattr(tensor, "_keras_history", None)
        channel = keras_channel_slice(history.operation) if history else None
        if channel is None:
            return None
        order.append(channel)
        sources.add(id(first_call(history.operation)[0][0]))
    return tuple(order) if len(sources) == 1 and sorted(order) == list(range(len(order))) else None


def keras_channel_slice(op) -> int | None:
    """k when a Keras 3 `GetItem` node takes `x[..., k]` (one channel), else None; also written
    `x[:, :, :, k]` (as _spell_out_ellipses stores it for a .h5 file)."""
    args = first_call(op)[0]
    if type(op).__name__ != "GetItem" or len(args) != 2 or not isinstance(args[0], keras.KerasTensor):
        return None
    key = args[1]
    if not (isinstance(key, (list, tuple)) and len(key) >= 2 and isinstance(key[-1], int)):
        return None
    if len(key) == 2 and key[0] is Ellipsis:
        return key[-1]
    if len(key) == len(args[0].shape) and all(k == slice(None) for k in key[:-1]):
        return key[-1]
    return None
