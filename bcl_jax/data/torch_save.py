"""Writes ``torch.save`` zip files without importing torch.

:func:`save_torch_zip` writes the zip format for nested containers of numpy
arrays and plain scalars, so that real ``torch.load`` (including its
``weights_only`` mode) can read our converted files. The reader is
:mod:`bcl_jax.data.torch_pickle`.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from typing import Any

import numpy as np

from bcl_jax import fileio
from bcl_jax.data.errors import DataError

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
  with fileio.atomic_open(path) as fh, zipfile.ZipFile(
      fh, "w", zipfile.ZIP_STORED) as zf:
    _aligned_write(zf, "archive/data.pkl", emitter.out.getvalue())
    _aligned_write(zf, "archive/byteorder", b"little")
    for i, flat in enumerate(emitter.storages):
      _aligned_write(zf, f"archive/data/{i}", flat.tobytes())
    _aligned_write(zf, "archive/version", b"3\n")
