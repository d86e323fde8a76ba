"""Reads and writes ``torch.save`` files without importing torch.

Two on-disk formats exist (spec section 10):

* zip (PyTorch >= 1.6): ``<archive>/data.pkl`` is a pickle whose persistent
  ids ``('storage', StorageType, key, location, numel)`` name raw blobs stored
  uncompressed as ``<archive>/data/<key>``; ``<archive>/byteorder`` says how
  the blobs are laid out (little endian when absent).
* legacy: five concatenated records: pickled magic number, protocol version,
  ``sys_info``, the object pickle (persistent ids
  ``('storage', StorageType, key, location, numel, view_metadata)``), a
  pickled list of storage keys, then per key an int64 element count followed
  by the raw little-endian bytes.

Unpickling runs code named by the file, so :class:`_SafeUnpickler` resolves
only an allow-list of globals (tensor rebuilders, storage and dtype names,
``collections.OrderedDict``, numpy's array reconstructor) to numpy-producing
stand-ins and refuses everything else with a :class:`DataError`. Tensors come
back as numpy arrays.

:func:`save_torch_zip` writes the zip format for nested containers of numpy
arrays and plain scalars, so that real ``torch.load`` (including its
``weights_only`` mode) can read our converted files.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import tempfile
import zipfile
from typing import Any, BinaryIO, Callable

import numpy as np

from bcl_jax.data.errors import DataError

# torch's legacy-format header constants (torch/serialization.py).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Storage class name -> numpy dtype (little endian; swapped later if needed).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # widened to float32 on rebuild
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "UntypedStorage": np.dtype("u1"),
    "_LoadedStorage": np.dtype("u1"),
}

# torch dtype name -> storage class name (for torch.float32 etc. globals).
_DTYPE_NAMES: dict[str, str] = {
    "float64": "DoubleStorage", "double": "DoubleStorage",
    "float32": "FloatStorage", "float": "FloatStorage",
    "float16": "HalfStorage", "half": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "int64": "LongStorage", "long": "LongStorage",
    "int32": "IntStorage", "int": "IntStorage",
    "int16": "ShortStorage", "short": "ShortStorage",
    "int8": "CharStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
}

# numpy dtype -> storage class name, for the writer.
_WRITE_STORAGE: dict[np.dtype, str] = {
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class _StorageType:
  """Stand-in for ``torch.FloatStorage`` and friends: just a dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]

  def __repr__(self) -> str:
    return f"_StorageType({self.name})"


class _Storage:
  """A loaded storage: a flat numpy array (``None`` in a sizing pass)."""

  def __init__(self, stype: _StorageType, numel: int,
               array: np.ndarray | None):
    self.stype = stype
    self.numel = numel
    self.array = array


class _TorchDtype:
  """Stand-in for ``torch.float32`` etc. (used by ``_rebuild_tensor_v3``)."""

  def __init__(self, storage_name: str):
    self.storage_name = storage_name


class _Refused(Exception):
  """Internal: a global outside the allow-list (becomes a DataError)."""


def _as_tensor(storage: Any, storage_offset: int, size: Any,
               stride: Any) -> np.ndarray | None:
  """Builds the numpy array that a torch tensor view of ``storage`` is."""
  if not isinstance(storage, _Storage):
    raise _Refused(f"a tensor whose storage is {type(storage).__name__}")
  if storage.array is None:  # sizing pass of the legacy reader
    return None
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  offset = int(storage_offset)
  flat = storage.array
  if len(size) != len(stride) or any(s < 0 for s in size) or offset < 0:
    raise _Refused(f"a tensor with size {size}, stride {stride}, "
                   f"offset {offset}")
  if 0 in size:
    out = np.zeros(size, flat.dtype)
  else:
    last = offset + sum((n - 1) * abs(st) for n, st in zip(size, stride))
    if any(st < 0 for st in stride) or last >= flat.size:
      raise _Refused(f"a tensor view (size {size}, stride {stride}, offset "
                     f"{offset}) outside its storage of {flat.size} elements")
    contiguous = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    if offset == 0 and stride == contiguous and flat.size == np.prod(size):
      out = flat.reshape(size)  # the common case: no copy
    else:
      item = flat.dtype.itemsize
      view = np.lib.stride_tricks.as_strided(
          flat[offset:], shape=size, strides=[s * item for s in stride],
          writeable=False)
      out = view.copy()
  if storage.stype.name == "BFloat16Storage":
    out = (out.astype(np.uint32) << 16).view(np.float32)
  return out


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _as_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride,
                       requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks, metadata
  return _as_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, dtype, metadata=None):
  del requires_grad, backward_hooks, metadata
  out = _as_tensor(storage, storage_offset, size, stride)
  if out is not None and isinstance(dtype, _TorchDtype):
    name = dtype.storage_name
    if name == "BFloat16Storage" and out.dtype == np.uint16:
      out = (out.astype(np.uint32) << 16).view(np.float32)
    elif name != "BFloat16Storage":
      out = out.view(_STORAGE_DTYPES[name]) if out.size else out.astype(
          _STORAGE_DTYPES[name])
  return out


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None,
                       *unused):
  del requires_grad, backward_hooks, unused
  return data


def _torch_size(*args):
  return tuple(*args)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
  """Protocol 2 pickles ``bytes`` as ``_codecs.encode(text, 'latin1')``."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise _Refused(f"_codecs.encode with encoding {encoding!r}")
  return text.encode("latin1")


def _allowed_numpy(module: str, name: str) -> Any:
  """numpy globals that only build arrays/dtypes (as torch's weights_only)."""
  if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    if name == "_reconstruct":
      return np._core.multiarray._reconstruct if hasattr(
          np, "_core") else np.core.multiarray._reconstruct
    if name == "scalar":
      return np._core.multiarray.scalar if hasattr(
          np, "_core") else np.core.multiarray.scalar
  if module == "numpy":
    if name == "ndarray":
      return np.ndarray
    if name == "dtype":
      return np.dtype
  if module.startswith("numpy") and name.endswith("DType"):
    return getattr(np.dtypes, name, None)
  return None


_TORCH_FUNCS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): _torch_size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_bytes,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("__builtin__", "set"): set,
}


class _SafeUnpickler(pickle.Unpickler):
  """An unpickler that builds numpy arrays and refuses all other code."""

  def __init__(self, file: BinaryIO,
               load_storage: Callable[[tuple], _Storage]):
    super().__init__(file, encoding="utf-8")
    self._load_storage = load_storage

  def find_class(self, module: str, name: str) -> Any:
    func = _TORCH_FUNCS.get((module, name))
    if func is not None:
      return func
    if module in ("torch", "torch.storage", "torch.cuda"):
      if name in _STORAGE_DTYPES:
        return _StorageType(name)
      if name in _DTYPE_NAMES:
        return _TorchDtype(_DTYPE_NAMES[name])
    numpy_obj = _allowed_numpy(module, name)
    if numpy_obj is not None:
      return numpy_obj
    raise _Refused(f"the global {module}.{name}, which is not a tensor, "
                   "storage or plain container (refused for safety: "
                   "unpickling it could run arbitrary code)")

  def persistent_load(self, pid: Any) -> Any:
    if (not isinstance(pid, tuple) or len(pid) < 5 or
        pid[0] not in ("storage", b"storage")):
      raise _Refused(f"an unknown persistent id {str(pid)[:60]}")
    return self._load_storage(pid)


def _storage_args(pid: tuple) -> tuple[_StorageType, str, int]:
  stype, key, numel = pid[1], pid[2], pid[4]
  if not isinstance(stype, _StorageType):
    raise _Refused(f"a storage of type {stype!r}")
  if isinstance(key, bytes):
    key = key.decode("ascii")
  if not isinstance(numel, int) or numel < 0:
    raise _Refused(f"a storage with {numel!r} elements")
  return stype, str(key), numel


def _bad(path: str, problem: str) -> DataError:
  return DataError(
      f"{path}: {problem}; the file is not a readable torch.save file "
      "(re-create it with GEM's data scripts or scripts/prepare_data.py)")


def _load_zip(path: str, zf: zipfile.ZipFile) -> Any:
  names = zf.namelist()
  pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
  if not pkl:
    raise _bad(path, "zip archive without <name>/data.pkl")
  prefix = pkl[0][:-len("data.pkl")]
  big_endian = False
  if prefix + "byteorder" in names:
    order = zf.read(prefix + "byteorder").strip()
    if order not in (b"little", b"big"):
      raise _bad(path, f"unknown byteorder record {order[:20]!r}")
    big_endian = order == b"big"
  cache: dict[str, _Storage] = {}

  def load_storage(pid: tuple) -> _Storage:
    stype, key, numel = _storage_args(pid)
    if key in cache:
      return cache[key]
    record = f"{prefix}data/{key}"
    try:
      info = zf.getinfo(record)
    except KeyError:
      raise _Refused(f"a storage whose record {record} is missing") from None
    dtype = stype.dtype.newbyteorder(">") if big_endian else stype.dtype
    nbytes = numel * dtype.itemsize
    if info.file_size < nbytes:
      raise _Refused(f"record {record} has {info.file_size} bytes, "
                     f"{nbytes} expected")
    buf = bytearray(info.file_size)
    with zf.open(info) as fh:
      view = memoryview(buf)
      got = 0
      while got < len(buf):
        n = fh.readinto(view[got:])
        if not n:
          break
        got += n
    array = np.frombuffer(buf, dtype=dtype, count=numel)
    if big_endian:
      array = array.astype(stype.dtype)
    cache[key] = _Storage(stype, numel, array)
    return cache[key]

  data = zf.read(pkl[0])
  return _SafeUnpickler(io.BytesIO(data), load_storage).load()


def _load_legacy(path: str, fh: BinaryIO) -> Any:
  try:
    magic = _SafeUnpickler(fh, lambda pid: None).load()
  except (_Refused, pickle.UnpicklingError, EOFError, ValueError,
          TypeError, AttributeError, IndexError, KeyError):
    raise _bad(path, "neither a zip archive nor a legacy torch pickle "
               "(no magic number)") from None
  if magic != _LEGACY_MAGIC:
    raise _bad(path, "neither a zip archive nor a legacy torch pickle "
               "(wrong magic number)")
  protocol = _SafeUnpickler(fh, lambda pid: None).load()
  if protocol != _LEGACY_PROTOCOL:
    raise _bad(path, f"unsupported legacy protocol version {protocol}")
  _SafeUnpickler(fh, lambda pid: None).load()  # sys_info: type sizes
  start = fh.tell()

  # Pass 1: find the storages (dtype, size) and where the pickle ends.
  seen: dict[str, _Storage] = {}

  def sizing(pid: tuple) -> _Storage:
    stype, key, numel = _storage_args(pid)
    if len(pid) > 5 and pid[5] is not None:
      raise _Refused("a storage view (legacy view_metadata)")
    seen.setdefault(key, _Storage(stype, numel, None))
    return seen[key]

  _SafeUnpickler(fh, sizing).load()
  keys = _SafeUnpickler(fh, lambda pid: None).load()
  if not isinstance(keys, list):
    raise _Refused("a storage key list that is not a list")
  arrays: dict[str, np.ndarray] = {}
  for key in keys:
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    if key not in seen:
      raise _Refused(f"storage key {key} that no tensor uses")
    head = fh.read(8)
    if len(head) != 8:
      raise _Refused(f"a truncated storage {key}")
    (numel,) = struct.unpack("<q", head)
    dtype = seen[key].stype.dtype
    if numel != seen[key].numel:
      raise _Refused(f"storage {key} with {numel} elements, "
                     f"{seen[key].numel} expected")
    here = fh.tell()
    remaining = fh.seek(0, os.SEEK_END) - here
    fh.seek(here)
    if numel * dtype.itemsize > remaining:
      raise _Refused(f"a truncated storage {key}")
    raw = fh.read(numel * dtype.itemsize)
    if len(raw) != numel * dtype.itemsize:
      raise _Refused(f"a truncated storage {key}")
    # Storage bytes are always little endian in this format.
    arrays[key] = np.frombuffer(bytearray(raw), dtype=dtype)

  # Pass 2: rebuild the object with the storages loaded.
  fh.seek(start)

  def loading(pid: tuple) -> _Storage:
    stype, key, numel = _storage_args(pid)
    if key not in arrays:
      raise _Refused(f"storage {key} missing from the file")
    return _Storage(stype, numel, arrays[key])

  return _SafeUnpickler(fh, loading).load()


def load_torch(path: str | os.PathLike) -> Any:
  """Loads a ``torch.save`` file; tensors become numpy arrays.

  Args:
    path: a file written by ``torch.save`` (zip or legacy format).

  Returns:
    The saved object with every tensor replaced by a numpy array of the same
    dtype, shape and values (bfloat16 becomes float32).

  Raises:
    DataError: the file is missing, not a torch file, truncated, or names a
      global outside the allow-list.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as zf:
        return _load_zip(path, zf)
    with open(path, "rb") as fh:
      if fh.read(4) == b"PK\x03\x04":
        raise _bad(path, "a zip archive without its central directory "
                   "(truncated or an interrupted copy)")
      fh.seek(0)
      return _load_legacy(path, fh)
  except DataError:
    raise
  except _Refused as err:
    raise _bad(path, f"it contains {err}") from None
  except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError,
          pickle.UnpicklingError, ValueError, TypeError, AttributeError,
          IndexError, KeyError, struct.error, OverflowError,
          MemoryError, UnicodeDecodeError, NotImplementedError,
          RecursionError) as err:
    raise _bad(path, f"corrupt or truncated ({type(err).__name__}: "
               f"{str(err)[:80]})") from None
  except OSError as err:
    raise DataError(f"{path}: cannot read the file ({err.strerror or err}); "
                    "check its permissions") from None


# ---------------------------------------------------------------- writer ----


class _Emitter:
  """Writes a protocol-2 pickle of plain containers, arrays as tensors.

  Writing the opcodes directly lets us name ``torch._utils`` globals without
  importing torch (``pickle.Pickler`` verifies every global by import).
  """

  def __init__(self):
    self.out = io.BytesIO()
    self.storages: list[np.ndarray] = []

  def _global(self, module: str, name: str) -> None:
    self.out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

  def _str(self, s: str) -> None:
    data = s.encode("utf-8")
    self.out.write(b"X" + struct.pack("<I", len(data)) + data)

  def _int(self, v: int) -> None:
    if 0 <= v < 256:
      self.out.write(b"K" + bytes([v]))
    elif 0 <= v < 65536:
      self.out.write(b"M" + struct.pack("<H", v))
    elif -2**31 <= v < 2**31:
      self.out.write(b"J" + struct.pack("<i", v))
    else:
      data = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
      if len(data) > 255:
        raise DataError(f"integer {v} is too large to save")
      self.out.write(b"\x8a" + bytes([len(data)]) + data)

  def _tuple(self, items: list[Any], depth: int) -> None:
    if not items:
      self.out.write(b")")
      return
    if len(items) > 3:
      self.out.write(b"(")
    for item in items:
      self.save(item, depth + 1)
    self.out.write({1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(items), b"t"))

  def _array(self, arr: np.ndarray, depth: int) -> None:
    dtype = arr.dtype.newbyteorder("=")
    if dtype not in _WRITE_STORAGE:
      raise DataError(f"cannot save an array of dtype {arr.dtype} as a torch "
                      f"tensor; supported: "
                      f"{', '.join(str(d) for d in _WRITE_STORAGE)}")
    flat = np.ascontiguousarray(arr, dtype=dtype.newbyteorder("<"))
    key = str(len(self.storages))
    self.storages.append(flat)
    shape = list(arr.shape)
    strides = [int(np.prod(shape[i + 1:])) for i in range(len(shape))]
    self._global("torch._utils", "_rebuild_tensor_v2")
    self.out.write(b"(")
    # persistent id: ('storage', torch.XStorage, key, 'cpu', numel)
    self.out.write(b"(")
    self._str("storage")
    self._global("torch", _WRITE_STORAGE[dtype])
    self._str(key)
    self._str("cpu")
    self._int(int(flat.size))
    self.out.write(b"tQ")
    self._int(0)
    self._tuple(shape, depth)
    self._tuple(strides, depth)
    self.out.write(b"\x89")  # requires_grad=False
    self._global("collections", "OrderedDict")
    self.out.write(b")R")
    self.out.write(b"tR")

  def save(self, obj: Any, depth: int = 0) -> None:
    """Appends the opcodes that rebuild ``obj``."""
    if depth > 100:
      raise DataError("cannot save: nesting deeper than 100 (a cycle?)")
    if obj is None:
      self.out.write(b"N")
    elif isinstance(obj, (bool, np.bool_)):
      self.out.write(b"\x88" if obj else b"\x89")
    elif isinstance(obj, (int, np.integer)):
      self._int(int(obj))
    elif isinstance(obj, (float, np.floating)):
      self.out.write(b"G" + struct.pack(">d", float(obj)))
    elif isinstance(obj, str):
      self._str(obj)
    elif isinstance(obj, np.ndarray):
      self._array(obj, depth)
    elif isinstance(obj, list):
      self.out.write(b"]")
      if obj:
        self.out.write(b"(")
        for item in obj:
          self.save(item, depth + 1)
        self.out.write(b"e")
    elif isinstance(obj, tuple):
      self._tuple(list(obj), depth)
    elif isinstance(obj, dict):
      self.out.write(b"}")
      if obj:
        self.out.write(b"(")
        for k, v in obj.items():
          self.save(k, depth + 1)
          self.save(v, depth + 1)
        self.out.write(b"u")
    else:
      raise DataError(f"cannot save a {type(obj).__name__} in a torch file; "
                      "use arrays, numbers, strings, lists, tuples and dicts")


def _aligned_write(zf: zipfile.ZipFile, name: str, data: bytes,
                   align: int = 64) -> None:
  """Writes an uncompressed record whose bytes start on an ``align`` offset.

  torch pads its local headers the same way so storages can be mmapped; the
  padding lives in an extra field (id 0x4246, "FB"), which readers skip.
  """
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  header = 30 + len(name.encode("utf-8"))
  offset = zf.fp.tell()
  pad = (-(offset + header + 4)) % align
  info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
  zf.writestr(info, data)


def _set_default_mode(path: str) -> None:
  """Gives a mkstemp file (mode 0600) the mode a plain open() would."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def save_torch_zip(obj: Any, path: str | os.PathLike) -> None:
  """Writes ``obj`` in torch's zip format; numpy arrays become tensors.

  ``obj`` may nest lists, tuples, dicts, numpy arrays (float16/32/64,
  int8/16/32/64, uint8, bool), ints, floats, bools, strings and None. The
  file is written to a temporary name beside ``path`` and renamed, so an
  existing file is never left half-written.

  Raises:
    DataError: ``obj`` holds something that cannot be saved.
  """
  path = os.fspath(path)
  emitter = _Emitter()
  emitter.out.write(b"\x80\x02")
  emitter.save(obj)
  emitter.out.write(b".")
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
  try:
    with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(
        fh, "w", zipfile.ZIP_STORED) as zf:
      _aligned_write(zf, "archive/data.pkl", emitter.out.getvalue())
      _aligned_write(zf, "archive/byteorder", b"little")
      for i, flat in enumerate(emitter.storages):
        _aligned_write(zf, f"archive/data/{i}", flat.tobytes())
      _aligned_write(zf, "archive/version", b"3\n")
    _set_default_mode(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
