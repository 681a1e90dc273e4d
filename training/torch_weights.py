"""Read the tensors of a PyTorch ``.pth`` state dict into numpy, without torch and without
running code from the file.

A ``.pth`` file is a pickle, and a general ``pickle.load`` executes whatever the file asks for.
:class:`TensorUnpickler` is a restricted unpickler: ``find_class`` allows only the handful of
globals a state dict needs (``collections.OrderedDict``, torch's tensor rebuild functions and
the typed storage classes) and maps them to numpy; anything else (``os.system``, ``eval``, ...)
raises ``pickle.UnpicklingError``.

Both on-disk layouts are read:
- legacy (torch < 1.6, or ``_use_new_zipfile_serialization=False``): five pickles in a row
  (magic number, protocol, sys info, the object, storage keys) followed by the raw storages,
  each prefixed with its element count as int64;
- zip (torch >= 1.6): ``<name>/data.pkl`` plus one raw file per storage in ``<name>/data/``.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# torch typed storage class -> numpy dtype of its elements (little-endian on disk).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


@dataclass
class _Storage:
    """A storage named in the pickle; its bytes are read after the pickle (legacy) or from the zip.

    A legacy *view* shares the bytes of `base` from element `base_offset` on.
    """

    key: str
    dtype: np.dtype
    numel: int
    raw: np.ndarray | None = None
    base: "_Storage | None" = None
    base_offset: int = 0

    @property
    def data(self) -> np.ndarray | None:
        if self.base is not None:
            if self.base.raw is None:
                return None
            return self.base.raw[self.base_offset : self.base_offset + self.numel]
        return self.raw


@dataclass
class _LazyTensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self) -> np.ndarray:
        if self.storage.data is None:
            raise pickle.UnpicklingError(f"storage {self.storage.key} has no data in the file")
        flat = self.storage.data
        if not self.shape:
            return np.array(flat[self.offset])
        needed = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) + 1
        if needed > flat.size:
            raise pickle.UnpicklingError(f"tensor in storage {self.storage.key} reaches past its end")
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.shape,
            strides=tuple(s * flat.itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(view)  # own, contiguous copy


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuild without a storage")
    return _LazyTensor(storage, int(storage_offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    return data  # an nn.Parameter is just its tensor here


class TensorUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild torch tensors (as lazy numpy views) and nothing else."""

    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, storages: dict[str, _Storage] | None = None):
        super().__init__(file)
        self.storages = {} if storages is None else storages

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: this reader only rebuilds tensors of a "
            "PyTorch state dict (a weights file that needs other code is not a plain state dict)"
        )

    def persistent_load(self, saved_id):
        if not isinstance(saved_id, tuple) or not saved_id or _ascii(saved_id[0]) != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent object {saved_id!r:.80}")
        storage_type, key, _location, numel = saved_id[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r:.80}")
        view_metadata = saved_id[5] if len(saved_id) > 5 else None
        key = _ascii(key)
        if key not in self.storages:
            self.storages[key] = _Storage(key, storage_type.dtype, int(numel))
        storage = self.storages[key]
        if view_metadata is not None:  # legacy storage views: (view_key, offset, size)
            view_key, offset, size = view_metadata
            return _Storage(_ascii(view_key), storage.dtype, int(size), base=storage, base_offset=int(offset))
        return storage


def _ascii(value) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def load_torch_state_dict(path) -> dict[str, np.ndarray]:
    """Tensors of a PyTorch state dict file, as ``{name: numpy array}`` (torch's NCHW layouts).

    Entries that are not tensors are dropped. Raises ``ValueError`` when the file is missing or is not a readable state dict,
    and ``pickle.UnpicklingError`` when it references anything but tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    if zipfile.is_zipfile(path):
        result, storages = _load_zip(path)
    else:
        result, storages = _load_legacy(path)
    return _materialize(result)


def _load_legacy(path: Path):
    with open(path, "rb") as handle:
        try:
            magic = TensorUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise ValueError(f"{path.name} is not a PyTorch weights file: {exc}") from exc
        if magic != LEGACY_MAGIC_NUMBER:
            raise ValueError(f"{path.name} is not a PyTorch weights file (bad magic number)")
        TensorUnpickler(handle).load()  # protocol version
        TensorUnpickler(handle).load()  # sys info: endianness and type sizes
        unpickler = TensorUnpickler(handle)
        result = unpickler.load()
        storage_keys = TensorUnpickler(handle).load()
        storages = unpickler.storages
        for key in storage_keys:
            key = _ascii(key)
            storage = storages.get(key)
            if storage is None:
                raise pickle.UnpicklingError(f"storage {key} listed but never used")
            (numel,) = struct.unpack("<q", _read_exact(handle, 8))
            storage.raw = np.frombuffer(_read_exact(handle, numel * storage.dtype.itemsize), storage.dtype)
    return result, storages


def _load_zip(path: Path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{path.name} is a zip but not a PyTorch weights file (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        unpickler = TensorUnpickler(io.BytesIO(archive.read(pickles[0])))
        result = unpickler.load()
        for key, storage in unpickler.storages.items():
            raw = archive.read(f"{prefix}data/{key}")
            storage.raw = np.frombuffer(raw, storage.dtype, count=storage.numel)
    return result, unpickler.storages


def _read_exact(handle, n: int) -> bytes:
    data = handle.read(n)
    if len(data) != n:
        raise ValueError("weights file is truncated")
    return data


def _materialize(result) -> dict[str, np.ndarray]:
    if isinstance(result, dict) and "state_dict" in result and isinstance(result["state_dict"], dict):
        result = result["state_dict"]  # training checkpoints wrap the weights
    if not isinstance(result, dict):
        raise ValueError(f"expected a state dict (name -> tensor), got {type(result).__name__}")
    return {str(k): v.to_numpy() for k, v in result.items() if isinstance(v, _LazyTensor)}
