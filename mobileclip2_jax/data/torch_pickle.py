"""Read and write ``torch.save`` files (the ``pth.gz`` embeddings of reinforced shards) without torch.

DataCompDR-bf16 style shards store each sample's teacher embeddings as ``gzip(torch.save(dict))``
with bf16 tensors (``training_and_data.md`` §1.1, §9.1). Data workers of a JAX project should not
import torch, and ``pickle.load`` on files from the internet executes whatever callables the
pickle names. So this module reads the two ``torch.save`` layouts itself:

* the zip layout (torch ≥ 1.6): ``<prefix>/data.pkl`` plus one raw record per storage,
  ``<prefix>/data/<key>``, and ``<prefix>/byteorder``;
* the legacy stream (``_use_new_zipfile_serialization=False``): magic, protocol and sys-info
  pickles, the main pickle, the list of storage keys, then each storage as an int64 element count
  followed by its raw bytes.

The main pickle is loaded by a :class:`pickle.Unpickler` whose ``find_class`` returns only inert
stand-ins for the tensor-rebuild globals (``torch._utils._rebuild_tensor_v2``,
``torch._utils._rebuild_parameter``, ``torch.<Type>Storage``) and ``collections.OrderedDict``.
Any other global (``os.system``, ``builtins.eval``, …) raises :class:`UnsafePickleError` naming
it, before anything is called. Storage views are bounds-checked, so a crafted size/stride cannot
read outside its storage. Tensors come back as numpy arrays; bf16 becomes float32 by a 16-bit
shift (exact), or ``ml_dtypes.bfloat16`` when ``upcast_bf16=False``.

The writer emits the zip layout with hand-written pickle opcodes (a ``pickle.Pickler`` would need
the real torch globals importable), so writing needs only numpy. ``torch.load(weights_only=True)``
reads the result; the tests check that.
"""
from __future__ import annotations

import collections
import gzip
import io
import pickle
import struct
import zipfile
import zlib
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

# torch storage class name → numpy dtype of its elements ("bfloat16" is special-cased).
_STORAGE_DTYPES: Dict[str, Any] = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER (legacy stream)
_LEGACY_PROTOCOL = 1001


class UnsafePickleError(ValueError):
    """The pickle names a global outside the tensor-rebuild allow-list; nothing was called."""


class TorchFileError(ValueError):
    """The bytes are not a readable ``torch.save`` file (truncated, corrupt, unsupported)."""


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) → float32; exact (bf16 is the top half of a float32)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bf16 bit patterns (uint16), rounding to nearest even as torch does; NaN stays NaN."""
    bits = np.asarray(x, dtype=np.float32, order="C").view(np.uint32)  # asarray keeps 0-d
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)  # keep quiet NaN
    return rounded


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bf16 precision and returned as float32 (what a bf16 round trip gives)."""
    return bfloat16_bits_to_float32(float32_to_bfloat16_bits(x))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
class _StorageType:
    """Inert stand-in for ``torch.<Name>Storage``; only usable as a persistent-id field."""

    def __init__(self, name: str):
        self.name = name


class _Storage:
    def __init__(self, type_name: str, key: str, numel: int):
        self.type_name, self.key, self.numel = type_name, key, numel
        self.flat: Optional[np.ndarray] = None  # filled from the zip record or legacy stream


class _LazyTensor:
    """A tensor whose storage bytes may not be read yet (legacy streams store data after the pickle)."""

    def __init__(self, storage: _Storage, offset: int, size: Tuple[int, ...], stride: Tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _int_tuple(x: Any, what: str) -> Tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(type(v) is int and v >= 0 for v in x):
        raise TorchFileError(f"tensor {what} must be a tuple of non-negative ints; got {x!r}")
    return tuple(x)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise TorchFileError(f"_rebuild_tensor_v2 got {type(storage).__name__}, not a storage")
    if type(storage_offset) is not int or storage_offset < 0:
        raise TorchFileError(f"bad storage offset {storage_offset!r}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise TorchFileError(f"size {size} and stride {stride} differ in rank")
    if 0 not in size:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise TorchFileError(f"tensor view (offset {storage_offset}, size {size}, stride "
                                 f"{stride}) reaches element {last} of a {storage.numel}-element "
                                 f"storage")
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storages: Dict[str, _Storage]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(
            f"refusing pickle global '{module}.{name}': only tensor storage rebuilds "
            f"(torch._utils._rebuild_tensor_v2, torch.<Type>Storage) and collections.OrderedDict "
            f"are allowed; nothing was executed")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise TorchFileError(f"unsupported persistent id {pid!r:.80}")
        fields = pid[1:]
        if len(fields) not in (4, 5):
            raise TorchFileError(f"storage persistent id has {len(fields)} fields")
        stype, key, _location, numel = fields[:4]
        if not isinstance(stype, _StorageType):
            raise TorchFileError(f"storage type {stype!r:.80} is not a torch storage class")
        if isinstance(key, bytes):
            key = key.decode("ascii")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise TorchFileError(f"bad storage id {pid!r:.80}")
        if len(fields) == 5 and fields[4] is not None:
            raise TorchFileError("legacy storage views (view_metadata) are not supported")
        storage = self._storages.setdefault(key, _Storage(stype.name, key, numel))
        if storage.type_name != stype.name or storage.numel != numel:
            raise TorchFileError(f"storage {key!r} is declared twice with different types/sizes")
        return storage


def _storage_from_bytes(storage: _Storage, raw: bytes, big_endian: bool) -> None:
    dt = _STORAGE_DTYPES[storage.type_name]
    np_dt = np.dtype(np.uint16 if dt == "bfloat16" else dt)
    if len(raw) != storage.numel * np_dt.itemsize:
        raise TorchFileError(f"storage {storage.key!r}: {len(raw)} bytes for {storage.numel} "
                             f"{storage.type_name} elements (truncated?)")
    storage.flat = np.frombuffer(raw, dtype=np_dt.newbyteorder(">" if big_endian else "<"))


def _materialize(obj: Any, upcast_bf16: bool) -> Any:
    if isinstance(obj, _LazyTensor):
        st = obj.storage
        if st.flat is None:
            raise TorchFileError(f"storage {st.key!r} has no data record")
        item = st.flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            st.flat[obj.offset:], shape=obj.size, strides=tuple(s * item for s in obj.stride),
            writeable=False) if 0 not in obj.size else np.zeros(obj.size, st.flat.dtype)
        arr = np.array(view, dtype=view.dtype.newbyteorder("="))
        if _STORAGE_DTYPES[st.type_name] == "bfloat16":
            if upcast_bf16:
                return bfloat16_bits_to_float32(arr)
            import ml_dtypes  # a JAX dependency; only needed to keep bf16 as bf16
            return arr.view(ml_dtypes.bfloat16)
        return arr
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _materialize(v, upcast_bf16)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _materialize(v, upcast_bf16) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, upcast_bf16) for v in obj)
    if isinstance(obj, (_Storage, _StorageType)):
        raise TorchFileError("bare storages are not supported (only tensors)")
    return obj


def _load_zip(data: bytes, upcast_bf16: bool) -> Any:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise TorchFileError(f"corrupt torch zip archive: {e}") from None
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise TorchFileError(f"torch zip archive must hold exactly one <prefix>/data.pkl; has {pkls}")
    prefix = pkls[0][:-len("data.pkl")]
    try:
        big = prefix + "byteorder" in names and zf.read(prefix + "byteorder") == b"big"
        storages: Dict[str, _Storage] = {}
        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), storages).load()
        for key, st in storages.items():
            rec = f"{prefix}data/{key}"
            if rec not in names:
                raise TorchFileError(f"storage record {rec!r} is missing")
            _storage_from_bytes(st, zf.read(rec), big)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise TorchFileError(f"corrupt torch zip archive: {e}") from None
    return _materialize(obj, upcast_bf16)


def _load_legacy(data: bytes, upcast_bf16: bool) -> Any:
    f = io.BytesIO(data)

    def plain_int() -> Any:  # magic/protocol pickles hold only ints: no globals allowed either
        return _RestrictedUnpickler(f, {}).load()

    if plain_int() != _MAGIC_NUMBER:
        raise TorchFileError("not a torch.save file (bad magic number)")
    if plain_int() != _LEGACY_PROTOCOL:
        raise TorchFileError("unsupported legacy torch.save protocol version")
    sys_info = _RestrictedUnpickler(f, {}).load()
    big = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
    storages: Dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(f, storages).load()
    keys = _RestrictedUnpickler(f, {}).load()
    if not isinstance(keys, list) or set(keys) != set(storages):
        raise TorchFileError("legacy storage key list does not match the pickled storages")
    for key in keys:
        st = storages[key]
        head = f.read(8)
        if len(head) != 8:
            raise TorchFileError("legacy torch file truncated in the storage data")
        numel = struct.unpack(">q" if big else "<q", head)[0]
        if numel != st.numel:
            raise TorchFileError(f"legacy storage {key!r}: {numel} elements, pickle says {st.numel}")
        dt = _STORAGE_DTYPES[st.type_name]
        _storage_from_bytes(st, f.read(numel * np.dtype(np.uint16 if dt == "bfloat16" else dt).itemsize), big)
    return _materialize(obj, upcast_bf16)


def load_torch(data: bytes, *, upcast_bf16: bool = True) -> Any:
    """Loads ``torch.save`` bytes (zip or legacy stream) into numpy arrays, executing no pickle code.

    Raises :class:`UnsafePickleError` for a forbidden global, :class:`TorchFileError` for
    anything unreadable.
    """
    try:
        if data[:4] == b"PK\x03\x04":
            return _load_zip(data, upcast_bf16)
        if data[257:262] == b"ustar":
            raise TorchFileError("tar-based torch.save files (torch < 0.4) are not supported")
        return _load_legacy(data, upcast_bf16)
    except (UnsafePickleError, TorchFileError):
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, struct.error, MemoryError, RecursionError) as e:
        raise TorchFileError(f"corrupt torch pickle: {type(e).__name__}: {e}") from None


def load_pth_gz(data: bytes, *, upcast_bf16: bool = True) -> Any:
    """:func:`load_torch` on gzip-compressed bytes (the webdataset ``pth.gz`` member)."""
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise TorchFileError(f"corrupt gzip stream: {e}") from None
    return load_torch(raw, upcast_bf16=upcast_bf16)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _p_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def _p_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def _p_tuple(items: Tuple[int, ...]) -> bytes:
    return b")" if not items else b"(" + b"".join(_p_int(i) for i in items) + b"t"


def _storage_of(arr: np.ndarray) -> Tuple[str, bytes]:
    if arr.dtype.name == "bfloat16":
        return "BFloat16Storage", arr.view(np.uint16).astype("<u2").tobytes()
    for name, dt in _STORAGE_DTYPES.items():
        if dt != "bfloat16" and arr.dtype == np.dtype(dt):
            return name, arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    raise TypeError(f"no torch storage type for dtype {arr.dtype}")


def dump_torch(tensors: Mapping[str, np.ndarray], *, bfloat16: bool = False) -> bytes:
    """``torch.save`` bytes (zip layout) of a ``{name: tensor}`` dict, written with numpy only.

    ``bfloat16=True`` stores float arrays as bf16 (round to nearest even, like ``.to(bfloat16)``);
    arrays already of ``ml_dtypes.bfloat16`` are stored as bf16 either way.
    """
    pkl = bytearray(b"\x80\x02}")  # PROTO 2, EMPTY_DICT
    records: List[Tuple[str, bytes]] = []
    if tensors:
        pkl += b"("
    for i, (name, value) in enumerate(tensors.items()):
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str; got {name!r}")
        arr = np.asarray(value, order="C")  # not ascontiguousarray: it turns 0-d into [1]
        if bfloat16 and arr.dtype.kind == "f" and arr.dtype.name != "bfloat16":
            arr = float32_to_bfloat16_bits(arr.astype(np.float32))
            stype, raw = "BFloat16Storage", arr.astype("<u2").tobytes()
        else:
            stype, raw = _storage_of(arr)
        key = str(i)
        records.append((key, raw))
        stride = tuple(int(np.prod(arr.shape[d + 1:], dtype=np.int64)) for d in range(arr.ndim))
        pkl += _p_str(name) + b"ctorch._utils\n_rebuild_tensor_v2\n("
        pkl += (b"(" + _p_str("storage") + f"ctorch\n{stype}\n".encode() + _p_str(key)
                + _p_str("cpu") + _p_int(arr.size) + b"tQ")
        pkl += _p_int(0) + _p_tuple(arr.shape) + _p_tuple(stride)
        pkl += b"\x89ccollections\nOrderedDict\n)RtR"  # requires_grad=False, hooks=OrderedDict()
    if tensors:
        pkl += b"u"
    pkl += b"."
    return _zip_records([("data.pkl", bytes(pkl)), (".format_version", b"1"),
                         (".storage_alignment", b"64"), ("byteorder", b"little")]
                        + [(f"data/{k}", raw) for k, raw in records]
                        + [("version", b"3\n"), (".data/serialization_id", b"0" * 40)])


def _zip_records(records: List[Tuple[str, bytes]], prefix: str = "archive") -> bytes:
    """Stored (uncompressed) zip with every record's data 64-byte aligned, as torch writes it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, raw in records:
            info = zipfile.ZipInfo(f"{prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            start = buf.tell() + 30 + len(info.filename.encode()) + 4
            pad = (-start) % 64
            info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            zf.writestr(info, raw)
    return buf.getvalue()


def dump_pth_gz(tensors: Mapping[str, np.ndarray], *, bfloat16: bool = True) -> bytes:
    """gzip(:func:`dump_torch`), the ``pth.gz`` member; gzip mtime 0 so equal input gives equal bytes."""
    return gzip.compress(dump_torch(tensors, bfloat16=bfloat16), mtime=0)
