"""Atomic file writes shared by the results writer and the data writers.

A file is written to a temporary name in its own folder, flushed to disk and
renamed over the target, so readers see either the old file or the new one,
never half of one. The new file gets the mode a plain ``open()`` would give
(``0o666 & ~umask``, usually 0644), not ``tempfile.mkstemp``'s 0600, so that
colleagues sharing a results folder can read it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Iterator


def _default_mode() -> int:
  """``0o666 & ~umask``: the mode ``open(path, 'w')`` would create."""
  umask = os.umask(0)  # the only portable way to read the umask
  os.umask(umask)
  return 0o666 & ~umask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
  """Opens a binary temp file beside ``path``; renames it there on success.

  On any exception (including KeyboardInterrupt) the temp file is removed and
  ``path`` is left as it was.

  Args:
    path: the file to (re)write; its folder must exist.

  Yields:
    A binary file object to write to.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-",
                             suffix="-" + os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as fh:
      yield fh
      fh.flush()
      os.fsync(fh.fileno())
    os.chmod(tmp, _default_mode())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes ``data`` (str is encoded as UTF-8) to ``path`` atomically."""
  if isinstance(data, str):
    data = data.encode("utf-8")
  with atomic_open(path) as fh:
    fh.write(data)
