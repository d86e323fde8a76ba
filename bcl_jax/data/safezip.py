"""Reading zip records without trusting the sizes the archive declares.

A zip's central directory states each record's offset and sizes, and
``zipfile`` believes them: a directory entry that overstates a stored
record's size makes a reader allocate that much and zero-fill the rest, and
a small deflated record can inflate to many gigabytes. :class:`BoundedZip`
checks every record against the archive's real bytes *before* anything is
allocated:

* a stored record must lie inside the file and its two sizes must agree;
* the records read from one archive may not use more bytes than the file
  has (so entries that share bytes cannot multiply them);
* compressed records may inflate to :data:`MAX_INFLATED_BYTES` in total.

Both the torch ``.pt`` reader and the ``.npz`` reader use it.
"""

from __future__ import annotations

import lzma
import os
import struct
import zipfile
import zlib

from bcl_jax.data.errors import DataError

# Most bytes that the compressed records of one archive may inflate to. torch
# and our .npz writer store records uncompressed, whose size the file itself
# bounds; this cap only concerns archives someone re-compressed. Raise it
# (bcl_jax.data.safezip.MAX_INFLATED_BYTES = ...) for a bigger trusted file.
MAX_INFLATED_BYTES = 4 << 30

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # 30 bytes, zip spec 4.3.7


def _human(n: int) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n} bytes"


class BoundedZip:
  """Checks and reads the records of one open zip archive.

  Args:
    path: the archive's path (named in every error).
    zf: the open ``zipfile.ZipFile`` of ``path``.
    fix: what the user should do about a bad file (ends every message).
  """

  def __init__(self, path: str, zf: zipfile.ZipFile, fix: str):
    self.path = path
    self.zf = zf
    self.fix = fix
    self.size = os.path.getsize(path)
    self.used = 0  # archive bytes consumed by the records checked so far
    self.inflated = 0  # bytes promised by compressed records so far

  def _error(self, name: str, problem: str) -> DataError:
    return DataError(f"{self.path}: record {name} {problem}; {self.fix}")

  def check(self, name: str) -> zipfile.ZipInfo:
    """Validates record ``name``'s sizes against the file; returns its info.

    Raises:
      DataError: the record is missing, encrypted, lies about its size, reuses
        bytes of other records, or would inflate past the cap.
    """
    try:
      info = self.zf.getinfo(name)
    except KeyError:
      raise self._error(name, "is missing") from None
    if info.flag_bits & 0x1:
      raise self._error(name, "is encrypted")
    start = info.header_offset
    if start < 0 or start + _LOCAL_HEADER.size > self.size:
      raise self._error(name, f"starts at byte {start}, past the end of the "
                        f"{self.size}-byte file (truncated?)")
    self.zf.fp.seek(start)
    head = self.zf.fp.read(_LOCAL_HEADER.size)
    fields = _LOCAL_HEADER.unpack(head)
    if fields[0] != b"PK\x03\x04":
      raise self._error(name, "has no local header where the directory "
                        "points (corrupt archive)")
    data_start = start + _LOCAL_HEADER.size + fields[9] + fields[10]
    stored = info.compress_size
    if data_start + stored > self.size:
      raise self._error(name, f"claims {stored} bytes at offset {data_start}, "
                        f"but the file has only {self.size} bytes (truncated "
                        "or a forged directory)")
    self.used += stored
    if self.used > self.size:
      raise self._error(name, "reuses bytes of other records (overlapping "
                        "entries, a zip bomb)")
    if info.compress_type == zipfile.ZIP_STORED:
      if info.file_size != stored:
        raise self._error(name, f"is stored uncompressed in {stored} bytes "
                          f"but its directory entry says {info.file_size} "
                          "(a forged or corrupt directory)")
    else:
      self.inflated += info.file_size
      if self.inflated > MAX_INFLATED_BYTES:
        raise self._error(
            name, f"inflates {_human(stored)} to {_human(info.file_size)}, "
            "past the cap of "
            f"{_human(MAX_INFLATED_BYTES)} for compressed records "
            "(bcl_jax.data.safezip.MAX_INFLATED_BYTES; a zip bomb? store "
            "the records uncompressed)")
    return info

  def read(self, name: str) -> bytearray:
    """Reads record ``name`` after :meth:`check`; exactly its stated size.

    Raises:
      DataError: as :meth:`check`, or the record holds fewer bytes than
        stated.
    """
    info = self.check(name)
    buf = bytearray(info.file_size)
    view = memoryview(buf)
    got = 0
    try:
      with self.zf.open(info) as fh:
        while got < len(buf):
          n = fh.readinto(view[got:])
          if not n:
            break
          got += n
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, OSError, EOFError,
            NotImplementedError, RuntimeError) as err:
      raise self._error(name, f"cannot be read ({type(err).__name__}: "
                        f"{str(err)[:80]})") from None
    if got != len(buf):
      raise self._error(name, f"holds {got} bytes, its directory entry says "
                        f"{info.file_size} (truncated or corrupt)")
    return buf
