"""dlib's face-recognition ResNet as a Keras backbone, with its weights read from the pip package.

dlib_face_recognition_resnet_model_v1 (Davis King, 2017) is a 29-layer ResNet that maps a
150x150 aligned face to a 128-number descriptor; it was trained for face identity on about 3
million faces, so unlike the ImageNet backbones its features already describe faces. The
``face_recognition_models`` package on PyPI ships the file, so the backbone works offline. Its
author released it into the public domain (github.com/davisking/dlib-models); its training faces
came from FaceScrub, VGG Face and the web, not from UTKFace as far as is documented.

The file is dlib's own binary serialization of a ``dlib::loss_metric`` network. It is read here
by a restricted reader (no dlib, no code execution): only the layer records this network uses
(``con_4``, ``affine_``, ``relu_``, ``max_pool_2``, ``avg_pool_2``, ``add_prev_``, ``fc_2``) are
understood, anything else is refused. The network's wiring is dlib's example network
(examples/dnn_face_recognition_ex.cpp), which the records are checked against layer by layer.

dlib conventions the Keras network reproduces (checked against dlib's own output, see
bench/dlib_reference.py and tests/test_dlib_face.py):

- input: (pixel - channel mean) / 256, means stored in the file;
- a convolution or pooling with stride > 1 has no padding ("valid"), with stride 1 "same";
- ``affine_`` is a BatchNorm folded into gamma * x + beta (a frozen BatchNormalization here);
- ``add_prev_`` adds tensors of different shapes as if the smaller were zero-padded at the end
  of each axis (the downsampling blocks meet a 2x2 average-pooled shortcut with fewer channels,
  and at odd sizes a smaller convolution output).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

import keras
from keras import layers

NATIVE_SIZE = 150
EMBEDDING_SIZE = 128
# (filters, downsample first, blocks) per level, input side first — dnn_face_recognition_ex.cpp's
# alevel4 .. alevel0.
LEVELS = ((32, False, 3), (64, True, 4), (128, True, 3), (256, True, 3), (256, True, 1))
STEM_FILTERS = 32
FEATURE_CHANNELS = 256
PACKAGE = "face_recognition_models"
MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
MAX_FILE_BYTES = 64 * 2**20  # the real file is 22 MB
BN_EPSILON = 1e-3


# ---------------------------------------------------------------------------------------------
# Reading dlib's serialization


class _Reader:
    """dlib's portable serialization: integers as a length byte (0x80 = negative) followed by
    that many little-endian bytes, floats as an integer mantissa and exponent, strings as a
    length and bytes, bools as the characters '0'/'1', tensors (version 2) as four sizes and
    raw little-endian float32 values."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"the file ends early (at byte {self.pos})")

    def integer(self) -> int:
        self._need(1)
        head = self.data[self.pos]
        size = head & 0x0F
        if head & 0x70 or size > 8:
            raise ValueError(f"not a dlib integer at byte {self.pos}")
        self.pos += 1
        self._need(size)
        value = int.from_bytes(self.data[self.pos:self.pos + size], "little")
        self.pos += size
        return -value if head & 0x80 else value

    def number(self) -> float:
        mantissa, exponent = self.integer(), self.integer()
        if abs(exponent) > 2000:  # dlib's codes for inf / nan
            raise ValueError(f"non-finite number at byte {self.pos}")
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:
            raise ValueError(f"number out of range at byte {self.pos}") from None

    def string(self, limit: int = 64) -> str:
        size = self.integer()
        if not 0 <= size <= limit:
            raise ValueError(f"not a dlib layer name at byte {self.pos}")
        self._need(size)
        text = self.data[self.pos:self.pos + size]
        self.pos += size
        try:
            return text.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"not a dlib layer name at byte {self.pos - size}") from None

    def flags(self, count: int) -> None:
        self._need(count)
        if any(b not in b"01" for b in self.data[self.pos:self.pos + count]):
            raise ValueError(f"not a dlib flag at byte {self.pos}")
        self.pos += count

    def tensor(self) -> np.ndarray:
        version = self.integer()
        if version != 2:
            raise ValueError(f"unsupported dlib tensor version {version} at byte {self.pos}")
        dims = [self.integer() for _ in range(4)]
        if min(dims) < 0:
            raise ValueError(f"negative tensor size at byte {self.pos}")
        count = int(np.prod(dims, dtype=np.int64))
        self._need(4 * count)
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos).astype(np.float32)
        self.pos += 4 * count
        return values

    def alias(self) -> tuple[int, ...]:
        if self.integer() != 1:
            raise ValueError(f"unsupported dlib alias_tensor at byte {self.pos}")
        return tuple(self.integer() for _ in range(4))  # samples, k, rows, cols


def _read_layer(reader: _Reader, kind: str) -> dict:
    """One layer's details (after its name), then the wrapper's state that follows them."""
    layer = {"kind": kind}
    if kind == "con_4":
        params = reader.tensor()
        filters, rows, cols, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(7))
        shape = reader.alias()  # filters, k, rows, cols
        reader.alias()  # biases
        for _ in range(4):
            reader.number()  # learning-rate and weight-decay multipliers
        n_kernel = int(np.prod(shape))
        if shape[0] != filters or params.size != n_kernel + filters:
            raise ValueError(f"inconsistent convolution record ({filters} filters, {params.size} numbers)")
        kernel = params[:n_kernel].reshape(shape)  # dlib (out, in, rows, cols)
        layer.update(filters=filters, kernel_size=(rows, cols), strides=(stride_y, stride_x),
                     padding=(pad_y, pad_x), kernel=np.transpose(kernel, (2, 3, 1, 0)), bias=params[n_kernel:])
    elif kind == "affine_":
        params = reader.tensor()
        gamma, beta = reader.alias(), reader.alias()
        channels = gamma[1]
        if reader.integer() != 0 or params.size != 2 * channels or beta[1] != channels:
            raise ValueError("unsupported affine layer (expected per-channel convolution mode)")
        layer.update(gamma=params[:channels], beta=params[channels:])
    elif kind in ("max_pool_2", "avg_pool_2"):
        rows, cols, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(6))
        layer.update(pool_size=(rows, cols), strides=(stride_y, stride_x), padding=(pad_y, pad_x))
    elif kind == "fc_2":
        outputs, inputs = reader.integer(), reader.integer()
        params = reader.tensor()
        reader.alias()
        reader.alias()
        bias_mode = reader.integer()
        for _ in range(4):
            reader.number()
        expected = inputs * outputs + (outputs if bias_mode == 0 else 0)
        if params.size != expected:
            raise ValueError(f"inconsistent fully-connected record ({params.size} numbers, {expected} expected)")
        layer.update(units=outputs, kernel=params[:inputs * outputs].reshape(inputs, outputs),
                     bias=params[inputs * outputs:] if bias_mode == 0 else None)
    elif kind not in ("relu_", "add_prev_"):
        raise ValueError(f"unsupported dlib layer {kind!r}")
    reader.flags(3)
    for _ in range(3):
        reader.tensor()  # gradients and cached outputs: empty in a saved network
    return layer


def read_dlib_network(path) -> dict:
    """The input normalisation, size and layer records (input side first) of a dlib metric network.

    Raises ValueError when the file is missing, too large, or not a network of the kind described
    in this module.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dlib network file not found: {path}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path.name} is larger than {MAX_FILE_BYTES // 2**20} MB: not the dlib face network")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    reader = _Reader(data)
    try:
        if reader.integer() != 1 or reader.string() != "loss_metric_2":
            raise ValueError("not a dlib metric-learning network (no loss_metric_2 record)")
        reader.number()
        reader.number()  # margin, distance threshold
        marker = b"\x01\x15input_rgb_image_sized"
        for _ in range(1000):  # the wrappers' version numbers, output side first
            if reader.data.startswith(marker, reader.pos):
                break
            if reader.integer() not in (1, 2, 3):
                raise ValueError(f"unexpected dlib layer wrapper at byte {reader.pos}")
        else:
            raise ValueError("no input_rgb_image_sized layer")
        reader.string()
        mean = [reader.number() for _ in range(3)]
        rows, cols = reader.integer(), reader.integer()
        records = []
        while reader.pos < len(reader.data):
            records.append(_read_layer(reader, reader.string()))
            if records[-1]["kind"] == "con_4" and len(records) == 1:
                reader.integer()  # the first wrapper also stores the sample expansion factor
    except ValueError as exc:
        raise ValueError(f"cannot read {path.name} as dlib's face-recognition network ({exc}); the backbone "
                         f"dlib_face_resnet takes {MODEL_FILE} (uncompressed; the {PACKAGE} pip package "
                         "ships it), or leave --weights out to use that package's copy") from None
    return {"mean": mean, "size": (rows, cols), "layers": records}


# ---------------------------------------------------------------------------------------------
# The Keras network


class _Layers:
    """Hands out the file's layer records in order, checking each against what the wiring expects."""

    def __init__(self, records: list[dict] | None):
        self.records = records
        self.index = 0

    def take(self, kind: str, **expected) -> dict | None:
        if self.records is None:
            return None
        if self.index >= len(self.records):
            raise ValueError(f"the file has {len(self.records)} layers; the network needs more (is the file truncated?)")
        record = self.records[self.index]
        found = {key: record.get(key) for key in expected}
        if record["kind"] != kind or found != expected:
            raise ValueError(f"layer {self.index}: expected {kind} {expected}, found {record['kind']} {found}")
        self.index += 1
        return record


def _conv(x, records: _Layers, filters: int, size: int, stride: int, name: str):
    record = records.take("con_4", filters=filters, kernel_size=(size, size), strides=(stride, stride))
    padding = "same" if stride == 1 else "valid"
    if record is not None and record["padding"] != ((size // 2, size // 2) if stride == 1 else (0, 0)):
        raise ValueError(f"{name}: unexpected padding {record['padding']}")
    conv = layers.Conv2D(filters, size, strides=stride, padding=padding, name=f"{name}_conv")
    x = conv(x)
    if record is not None:
        conv.set_weights([record["kernel"], record["bias"]])
    return x


def _affine(x, records: _Layers, name: str):
    """dlib's affine layer (a BatchNorm folded into gamma * x + beta) as a BatchNormalization with
    mean 0 and variance 1 - epsilon, which computes exactly that in inference mode."""
    record = records.take("affine_")
    bn = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")
    x = bn(x)
    if record is not None:
        channels = record["gamma"].size
        if channels != x.shape[-1]:
            raise ValueError(f"{name}: affine layer for {channels} channels, the network has {x.shape[-1]}")
        bn.set_weights([record["gamma"], record["beta"], np.zeros(channels, np.float32),
                        np.full(channels, 1.0 - BN_EPSILON, np.float32)])
    return x


def _relu(x, records: _Layers, name: str):
    records.take("relu_")
    return layers.ReLU(name=f"{name}_relu")(x)


def _pad_to(x, height: int, width: int, channels: int, name: str):
    """Zero-pad x at the bottom, right and last channels up to (height, width, channels)."""
    h, w, c = x.shape[1:]
    if (h, w) != (height, width):
        x = layers.ZeroPadding2D(((0, height - h), (0, width - w)), name=f"{name}_pad")(x)
    if c != channels:  # channels as a third "spatial" axis of ZeroPadding3D
        x = layers.Reshape((height, width, c, 1), name=f"{name}_split")(x)
        x = layers.ZeroPadding3D(((0, 0), (0, 0), (0, channels - c)), name=f"{name}_chpad")(x)
        x = layers.Reshape((height, width, channels), name=f"{name}_merge")(x)
    return x


def _residual(x, records: _Layers, filters: int, downsample: bool, name: str):
    """dlib's ``ares`` / ``ares_down``: relu(block(x) + shortcut(x)), the shortcut a 2x2 average pool
    when downsampling; shapes that differ are zero-padded to the larger (dlib's add_prev)."""
    shortcut = x
    y = _conv(x, records, filters, 3, 2 if downsample else 1, f"{name}_1")
    y = _affine(y, records, f"{name}_1")
    y = _relu(y, records, f"{name}_1")
    y = _conv(y, records, filters, 3, 1, f"{name}_2")
    y = _affine(y, records, f"{name}_2")
    if downsample:
        records.take("avg_pool_2", pool_size=(2, 2), strides=(2, 2), padding=(0, 0))
        shortcut = layers.AveragePooling2D(2, strides=2, padding="valid", name=f"{name}_shortcut_pool")(shortcut)
    records.take("add_prev_")
    target = [max(a, b) for a, b in zip(y.shape[1:], shortcut.shape[1:])]
    y = _pad_to(y, *target, name=f"{name}_block")
    shortcut = _pad_to(shortcut, *target, name=f"{name}_shortcut")
    x = layers.Add(name=f"{name}_add")([y, shortcut])
    return _relu(x, records, f"{name}_out")


def feature_side(side: int) -> int:
    """The side of the last feature map for an input side (0: too small for the network)."""
    side = (side - 7) // 2 + 1  # stem convolution, stride 2, no padding
    side = (side - 3) // 2 + 1  # max pool
    for _filters, downsample, _blocks in LEVELS:
        if downsample:
            if side < 3:
                return 0
            side = max((side - 3) // 2 + 1, (side - 2) // 2 + 1)  # block conv vs pooled shortcut
    return max(side, 0)


MIN_INPUT_SIDE = next(side for side in range(8, 1024) if feature_side(side) > 0)  # 103


def default_weights_path() -> Path:
    """The network file shipped by the face_recognition_models package (found without importing
    it: its __init__ needs pkg_resources). Raises ValueError with the pip command when missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the dlib face network's weights need the package {PACKAGE} "
            f"(pip install {PACKAGE}), or pass --weights PATH to {MODEL_FILE}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / MODEL_FILE
    if not path.is_file():
        raise ValueError(f"{PACKAGE} is installed but has no {MODEL_FILE}; reinstall it (pip install --force-reinstall {PACKAGE})")
    return path


def make_dlib_face_resnet(
    input_shape=None,
    include_top: bool = True,
    weights: str | Path | None = None,
    name: str = "dlib_face_resnet",
) -> keras.Model:
    """dlib's face-recognition ResNet taking RGB 0–255 floats of `input_shape` = (height, width, 3).

    input_shape: None -> the native 150x150.
    include_top: True -> the 128-number face descriptor (dlib's compute_face_descriptor);
    False -> the last feature map (batch, h', w', 256) for use as a backbone (2x2 at 150 px).
    weights: None (random init), "imagenet" or "dlib" (the pip package's file) or a path to a
    ``dlib_face_recognition_resnet_model_v1.dat``. Raises ValueError when the file cannot be read
    or does not fit the network.
    """
    if input_shape is None:
        input_shape = (NATIVE_SIZE, NATIVE_SIZE, 3)
    if min(feature_side(int(input_shape[0])), feature_side(int(input_shape[1]))) < 1:
        raise ValueError(f"dlib_face_resnet needs images of at least {MIN_INPUT_SIDE} px "
                         f"(native {NATIVE_SIZE}); got {input_shape[0]}x{input_shape[1]}")
    network, path = None, None
    if weights is not None:
        path = default_weights_path() if str(weights) in ("imagenet", "dlib") else Path(weights)
        network = read_dlib_network(path)
    records = _Layers(network["layers"] if network else None)
    mean = network["mean"] if network else [122.782, 117.001, 104.298]

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Normalization(mean=mean, variance=[256.0**2] * 3, name="normalization")(inputs)
    try:
        x = _conv(x, records, STEM_FILTERS, 7, 2, "stem")
        x = _affine(x, records, "stem")
        x = _relu(x, records, "stem")
        records.take("max_pool_2", pool_size=(3, 3), strides=(2, 2), padding=(0, 0))
        x = layers.MaxPooling2D(3, strides=2, padding="valid", name="stem_pool")(x)
        for level, (filters, downsample, blocks) in enumerate(LEVELS):
            for block in range(blocks):
                x = _residual(x, records, filters, downsample and block == 0, f"level{level}_block{block}")
        if include_top or network is not None:
            records.take("avg_pool_2", pool_size=(0, 0), strides=(1, 1), padding=(0, 0))
            fc = records.take("fc_2", units=EMBEDDING_SIZE)
        if records.records is not None and records.index != len(records.records):
            raise ValueError(f"the file has {len(records.records) - records.index} layers more than the network")
    except ValueError as exc:
        raise ValueError(f"{path.name}: not dlib's face-recognition network: {exc}") from None
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        dense = layers.Dense(EMBEDDING_SIZE, use_bias=False, name="descriptor")
        x = dense(x)
        if network is not None:
            dense.set_weights([fc["kernel"]])
    return keras.Model(inputs, x, name=name)
