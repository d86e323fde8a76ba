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

Nothing the file declares is trusted before it is checked: zip records
against the archive's bytes (:mod:`bcl_jax.data.safezip`), pickle lengths
against the bytes left, tensor views against their storage, and copies of
views against a budget, so a small hostile file cannot claim gigabytes.

:func:`save_torch_zip` (in :mod:`bcl_jax.data.torch_save`, re-exported here)
writes the zip format that real ``torch.load`` can read.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable

import numpy as np

from bcl_jax.data import safezip
from bcl_jax.data.errors import DataError

# Tensors are usually views of their whole storage (no copy). Other views are
# copied; all copies of one file may total 2x its size plus this much, so a
# stride-0 view of one element cannot expand to gigabytes. Raise it
# (bcl_jax.data.torch_pickle.MAX_VIEW_COPY_BYTES = ...) for a trusted file.
MAX_VIEW_COPY_BYTES = 64 << 20
# Longest pickle text line (module names, protocol-0 numbers) we read.
_MAX_LINE = 1 << 16

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
               array: np.ndarray | None, record: str = "?"):
    self.stype = stype
    self.numel = numel
    self.array = array
    self.record = record  # named in errors: "archive/data/0", "storage 0"


class _TorchDtype:
  """Stand-in for ``torch.float32`` etc. (used by ``_rebuild_tensor_v3``)."""

  def __init__(self, storage_name: str):
    self.storage_name = storage_name


class _Refused(Exception):
  """Internal: a global outside the allow-list (becomes a DataError)."""


class _Budget:
  """Bytes that copied tensor views of one file may allocate in total."""

  def __init__(self, file_size: int):
    self.limit = 2 * file_size + MAX_VIEW_COPY_BYTES
    self.spent = 0

  def spend(self, nbytes: int, what: str) -> None:
    self.spent += nbytes
    if self.spent > self.limit:
      raise _Refused(
          f"{what}, which would copy {safezip._human(nbytes)}; copied views "
          f"may total twice the file size plus "
          f"{safezip._human(MAX_VIEW_COPY_BYTES)} (bcl_jax.data.torch_pickle."
          "MAX_VIEW_COPY_BYTES); save contiguous tensors (tensor.contiguous())")


def _as_tensor(storage: Any, storage_offset: int, size: Any, stride: Any,
               budget: _Budget) -> np.ndarray | None:
  """Builds the numpy array that a torch tensor view of ``storage`` is."""
  if not isinstance(storage, _Storage):
    raise _Refused(f"a tensor whose storage is {type(storage).__name__}")
  if storage.array is None:  # sizing pass of the legacy reader
    return None
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  offset = int(storage_offset)
  flat = storage.array
  where = (f"a tensor view (size {size}, stride {stride}, offset {offset}) of "
           f"record {storage.record} ({flat.size} elements)")
  if len(size) != len(stride) or any(s < 0 for s in size) or offset < 0:
    raise _Refused(where)
  numel = math.prod(size)  # exact: numpy's prod would wrap around
  if numel == 0:
    out = np.zeros(size, flat.dtype)
  else:
    last = offset + sum((n - 1) * abs(st) for n, st in zip(size, stride))
    if any(st < 0 for st in stride) or last >= flat.size:
      raise _Refused(f"{where} outside its storage")
    contiguous = tuple(math.prod(size[i + 1:]) for i in range(len(size)))
    if all(st == c for n, st, c in zip(size, stride, contiguous) if n > 1):
      out = flat[offset:offset + numel].reshape(size)  # no copy
    else:
      # Overlapping strides (stride 0: torch's expand) can make a view far
      # bigger than its storage: charge the copy before making it.
      budget.spend(numel * flat.dtype.itemsize, where)
      item = flat.dtype.itemsize
      view = np.lib.stride_tricks.as_strided(
          flat[offset:], shape=size, strides=[s * item for s in stride],
          writeable=False)
      out = view.copy()
  if storage.stype.name == "BFloat16Storage":
    out = _widen_bf16(out, budget, where)
  return out


def _widen_bf16(out: np.ndarray, budget: _Budget, where: str) -> np.ndarray:
  budget.spend(out.size * 4, where)
  return (out.astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor(storage, storage_offset, size, stride, *, budget):
  return _as_tensor(storage, storage_offset, size, stride, budget)


def _rebuild_tensor_v2(storage, storage_offset, size, stride,
                       requires_grad=False, backward_hooks=None,
                       metadata=None, *, budget):
  del requires_grad, backward_hooks, metadata
  return _as_tensor(storage, storage_offset, size, stride, budget)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, dtype, metadata=None, *, budget):
  del requires_grad, backward_hooks, metadata
  out = _as_tensor(storage, storage_offset, size, stride, budget)
  if out is not None and isinstance(dtype, _TorchDtype):
    name = dtype.storage_name
    if name == "BFloat16Storage" and out.dtype == np.uint16:
      out = _widen_bf16(out, budget, "a bfloat16 tensor")
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


class _NdarrayClass:
  """``numpy.ndarray`` as ``_reconstruct``'s first argument; not callable.

  Calling the real class would allocate any shape the file names.
  """

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    raise _Refused("a call of numpy.ndarray")


_NDARRAY = _NdarrayClass()
_np_core = np._core if hasattr(np, "_core") else np.core  # numpy 2 vs 1


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
  """numpy pickles start every array as ``_reconstruct(ndarray, (0,), b'b')``
  and fill it with BUILD; an empty start is all we allow."""
  if (subtype is not _NDARRAY or not isinstance(shape, (tuple, list)) or
      math.prod(int(d) for d in shape) != 0):
    raise _Refused(f"numpy _reconstruct of shape {str(shape)[:40]}")
  return _np_core.multiarray._reconstruct(np.ndarray, tuple(shape), dtype)


def _plain_dtype(dtype: Any, what: str) -> np.dtype:
  """Refuses object, structured and subarray dtypes (not needed for data)."""
  if (not isinstance(dtype, np.dtype) or dtype.hasobject or
      dtype.fields is not None or dtype.subdtype is not None):
    raise _Refused(f"{what} of dtype {str(dtype)[:40]} (only plain numeric "
                   "or string numpy arrays are read)")
  return dtype


def _np_scalar(dtype: Any, data: Any = None) -> Any:
  _plain_dtype(dtype, "a numpy scalar")
  if not isinstance(data, bytes) or len(data) != dtype.itemsize:
    raise _Refused(f"a numpy {dtype} scalar with {str(data)[:20]!r}")
  return _np_core.multiarray.scalar(dtype, data)


def _check_array_state(state: Any) -> None:
  """ndarray.__setstate__ allocates what ``state`` names: check it first."""
  if not isinstance(state, tuple) or len(state) not in (4, 5):
    raise _Refused("a numpy array with a malformed state")
  shape, dtype, raw = state[-4], state[-3], state[-1]
  _plain_dtype(dtype, "a numpy array")
  if (not isinstance(shape, tuple) or
      not all(isinstance(d, int) and d >= 0 for d in shape)):
    raise _Refused(f"a numpy array of shape {str(shape)[:40]}")
  nbytes = math.prod(shape) * dtype.itemsize
  if not isinstance(raw, (bytes, bytearray, str)) or len(raw) != nbytes:
    raise _Refused(f"a numpy array of shape {shape} and dtype {dtype} whose "
                   f"data is not {nbytes} bytes")


def _allowed_numpy(module: str, name: str) -> Any:
  """numpy globals that only build arrays/dtypes (as torch's weights_only)."""
  if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    if name == "_reconstruct":
      return _np_reconstruct
    if name == "scalar":
      return _np_scalar
  if module == "numpy":
    if name == "ndarray":
      return _NDARRAY
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


class _CappedReader:
  """A file whose reads never ask for more than the bytes left.

  A pickle opcode may declare a length of gigabytes; a plain ``read(n)``
  would allocate ``n`` before finding out the file is shorter.
  """

  def __init__(self, fh: BinaryIO):
    self._fh = fh
    here = fh.tell()
    self._end = fh.seek(0, os.SEEK_END)
    fh.seek(here)

  def read(self, n: int = -1) -> bytes:
    left = self._end - self._fh.tell()
    return self._fh.read(left if n is None or n < 0 else min(n, left))

  def readline(self) -> bytes:
    return self._fh.readline(_MAX_LINE)


def _load_build(unpickler: "_SafeUnpickler") -> None:
  """BUILD only on numpy arrays (checked first) and dtypes."""
  state, inst = unpickler.stack[-1], unpickler.stack[-2]
  if isinstance(inst, np.ndarray):
    _check_array_state(state)
  elif not isinstance(inst, np.dtype):
    raise _Refused(f"a pickled state for a {type(inst).__name__}")
  pickle._Unpickler.load_build(unpickler)


def _refuse_buffers(unpickler: "_SafeUnpickler") -> None:
  del unpickler
  raise _Refused("protocol-5 buffers (not written by torch.save)")


class _SafeUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """An unpickler that builds numpy arrays and refuses all other code.

  It is the pure-Python unpickler: the C one grows its memo table to any
  index a PUT opcode names (8 bytes per slot, zero-filled), so a few bytes
  could claim gigabytes. Here the memo is a dict and every read is capped.
  """

  dispatch = dict(pickle._Unpickler.dispatch)
  dispatch[pickle.BUILD[0]] = _load_build
  for _op in (pickle.BYTEARRAY8, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
    dispatch[_op[0]] = _refuse_buffers
  del _op

  def __init__(self, file: BinaryIO,
               load_storage: Callable[[tuple], _Storage], budget: _Budget):
    super().__init__(_CappedReader(file), encoding="utf-8")
    self._load_storage = load_storage
    self._budget = budget

  def find_class(self, module: str, name: str) -> Any:
    func = _TORCH_FUNCS.get((module, name))
    if func in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3):
      return functools.partial(func, budget=self._budget)
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


_FIX = ("the file is not a readable torch.save file (re-create it with "
        "GEM's data scripts or scripts/prepare_data.py)")


def _bad(path: str, problem: str) -> DataError:
  return DataError(f"{path}: {problem}; {_FIX}")


def _load_zip(path: str, zf: zipfile.ZipFile, budget: _Budget) -> Any:
  names = zf.namelist()
  pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
  if not pkl:
    raise _bad(path, "zip archive without <name>/data.pkl")
  prefix = pkl[0][:-len("data.pkl")]
  records = safezip.BoundedZip(path, zf, _FIX)
  big_endian = False
  if prefix + "byteorder" in names:
    order = bytes(records.read(prefix + "byteorder")).strip()
    if order not in (b"little", b"big"):
      raise _bad(path, f"unknown byteorder record {order[:20]!r}")
    big_endian = order == b"big"
  cache: dict[str, _Storage] = {}

  def load_storage(pid: tuple) -> _Storage:
    stype, key, numel = _storage_args(pid)
    if key in cache:
      return cache[key]
    record = f"{prefix}data/{key}"
    if record not in names:
      raise _Refused(f"a storage whose record {record} is missing")
    dtype = stype.dtype.newbyteorder(">") if big_endian else stype.dtype
    nbytes = numel * dtype.itemsize
    size = zf.getinfo(record).file_size
    if size < nbytes:  # checked before reading: sizes are the file's claims
      raise _Refused(f"record {record} has {size} bytes, {nbytes} expected")
    array = np.frombuffer(records.read(record), dtype=dtype, count=numel)
    if big_endian:
      array = array.astype(stype.dtype)
    cache[key] = _Storage(stype, numel, array, record)
    return cache[key]

  data = records.read(pkl[0])
  return _SafeUnpickler(io.BytesIO(data), load_storage, budget).load()


def _load_legacy(path: str, fh: BinaryIO, budget: _Budget) -> Any:
  try:
    magic = _SafeUnpickler(fh, lambda pid: None, budget).load()
  except (_Refused, pickle.UnpicklingError, EOFError, ValueError,
          TypeError, AttributeError, IndexError, KeyError):
    raise _bad(path, "neither a zip archive nor a legacy torch pickle "
               "(no magic number)") from None
  if magic != _LEGACY_MAGIC:
    raise _bad(path, "neither a zip archive nor a legacy torch pickle "
               "(wrong magic number)")
  protocol = _SafeUnpickler(fh, lambda pid: None, budget).load()
  if protocol != _LEGACY_PROTOCOL:
    raise _bad(path, f"unsupported legacy protocol version {protocol}")
  _SafeUnpickler(fh, lambda pid: None, budget).load()  # sys_info: type sizes
  start = fh.tell()

  # Pass 1: find the storages (dtype, size) and where the pickle ends.
  seen: dict[str, _Storage] = {}

  def sizing(pid: tuple) -> _Storage:
    stype, key, numel = _storage_args(pid)
    if len(pid) > 5 and pid[5] is not None:
      raise _Refused("a storage view (legacy view_metadata)")
    seen.setdefault(key, _Storage(stype, numel, None))
    return seen[key]

  _SafeUnpickler(fh, sizing, budget).load()
  keys = _SafeUnpickler(fh, lambda pid: None, budget).load()
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
    return _Storage(stype, numel, arrays[key], f"storage {key}")

  return _SafeUnpickler(fh, loading, budget).load()


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
    budget = _Budget(os.path.getsize(path))
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as zf:
        return _load_zip(path, zf, budget)
    with open(path, "rb") as fh:
      if fh.read(4) == b"PK\x03\x04":
        raise _bad(path, "a zip archive without its central directory "
                   "(truncated or an interrupted copy)")
      fh.seek(0)
      return _load_legacy(path, fh, budget)
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


# The writer lives in its own module; importable from here as before.
from bcl_jax.data.torch_save import save_torch_zip  # noqa: E402,F401  pylint: disable=wrong-import-position
