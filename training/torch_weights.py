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

# The most bytes one storage may hold (EfficientNet-Lite2's largest is ~5 MB): a file that claims
# more is refused before anything is allocated.
MAX_STORAGE_BYTES = 1 << 30


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
            if self.base_offset < 0 or self.numel < 0 or self.base_offset + self.numel > self.base.raw.size:
                raise pickle.UnpicklingError(f"storage view {self.key} lies outside storage {self.base.key}")
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
        # as_strided checks nothing: every element the view can reach must lie inside the storage,
        # and the copy may not be larger than the storage (stride 0 would let a tiny file ask for TBs).
        if (self.offset < 0 or len(self.stride) != len(self.shape) or any(n < 0 for n in self.shape)
                or any(s < 0 for s in self.stride) or int(np.prod(self.shape, dtype=object)) > flat.size):
            raise pickle.UnpicklingError(f"tensor in storage {self.storage.key} has an impossible layout "
                                         f"(offset {self.offset}, shape {self.shape}, stride {self.stride})")
        if not self.shape:
            if self.offset >= flat.size:
                raise pickle.UnpicklingError(f"tensor in storage {self.storage.key} reaches past its end")
            return np.array(flat[self.offset])
        if 0 in self.shape:
            return np.zeros(self.shape, flat.dtype)
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
            storage.raw = np.frombuffer(_read_exact(handle, _storage_bytes(key, numel, storage.dtype)), storage.dtype)
    return result, storages


def _load_zip(path: Path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{path.name} is a zip but not a PyTorch weights file (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        if archive.getinfo(pickles[0]).file_size > MAX_STORAGE_BYTES:
            raise ValueError(f"{path.name}: its data.pkl is over {MAX_STORAGE_BYTES:,} bytes, not a weights file we can trust")
        unpickler = TensorUnpickler(io.BytesIO(archive.read(pickles[0])))
        result = unpickler.load()
        for key, storage in unpickler.storages.items():
            nbytes = _storage_bytes(key, storage.numel, storage.dtype)
            try:
                info = archive.getinfo(f"{prefix}data/{key}")
            except KeyError:
                raise ValueError(f"{path.name} is damaged: storage {key} is missing from the archive") from None
            if info.file_size < nbytes:
                raise ValueError(f"{path.name} is damaged: storage {key} holds {info.file_size} bytes, "
                                 f"its tensors need {nbytes}")
            with archive.open(info) as member:
                storage.raw = np.frombuffer(member.read(nbytes), storage.dtype, count=storage.numel)
    return result, unpickler.storages


def _storage_bytes(key: str, numel: int, dtype: np.dtype) -> int:
    """The byte size of a storage of `numel` elements, refused when negative or implausibly large."""
    nbytes = int(numel) * dtype.itemsize
    if not 0 <= nbytes <= MAX_STORAGE_BYTES:
        raise ValueError(f"storage {key} claims {numel} elements ({nbytes:,} bytes; at most "
                         f"{MAX_STORAGE_BYTES:,} are read): not a weights file we can trust")
    return nbytes


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
