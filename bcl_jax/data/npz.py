"""Our own benchmark format: one ``.npz`` readable without torch.

Keys: ``meta`` (a JSON string: format version, name, task_incremental,
n_outputs, n_tasks, per-task descriptors) and ``t{i}_x_train``,
``t{i}_y_train``, ``t{i}_x_test``, ``t{i}_y_test`` for each task ``i``.
Inputs keep their dtype (uint8 stays uint8).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from typing import Any

import numpy as np

from bcl_jax import fileio
from bcl_jax.data import safezip
from bcl_jax.data.benchmark import Benchmark, Task, make_benchmark
from bcl_jax.data.errors import DataError

FORMAT = "bcl_jax.benchmark"
VERSION = 1
_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _jsonable(value: Any) -> Any:
  """Descriptors as JSON values: arrays become (nested) lists."""
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return repr(value)


def save_npz(bench: Benchmark, path: str | os.PathLike) -> None:
  """Writes ``bench`` to ``path`` atomically (temp file, then rename)."""
  path = os.fspath(path)
  meta = {
      "format": FORMAT,
      "version": VERSION,
      "name": bench.name,
      "task_incremental": bool(bench.task_incremental),
      "n_outputs": int(bench.n_outputs),
      "n_tasks": bench.n_tasks,
      "descriptors": [_jsonable(t.descriptor) for t in bench.tasks],
  }
  arrays = {"meta": np.array(json.dumps(meta))}
  for i, task in enumerate(bench.tasks):
    for key in _KEYS:
      arrays[f"t{i}_{key}"] = np.asarray(getattr(task, key))
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise DataError(f"{path}: the folder {folder} does not exist; create it "
                    "first")
  with fileio.atomic_open(path) as fh:
    np.savez(fh, **arrays)


def _descriptor(value: Any) -> Any:
  """Numeric lists (e.g. permutations) come back as arrays."""
  if isinstance(value, list) and value and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
    return np.asarray(value)
  return value


# File-name prefix -> the prepare_data.py arguments that write such a file.
_MAKERS = (
    ("cifar", "cifar100 --source cifar-100-python.tar.gz"),
    ("cub", "cub --source CUB_200_2011"),
    ("mini", "mini --source DIR_WITH_MINI_IMAGENET_CACHES"),
    ("mnist_rotations", "rotated --source embedded|DIR_WITH_MNIST"),
    ("mnist_permutations", "permuted --source embedded|DIR_WITH_MNIST"),
)


def _how_to_create(path: str) -> str:
  """How to make a missing ``.npz``: the prepare_data command, if known."""
  folder = os.path.dirname(path) or "."
  name = os.path.basename(path)
  for prefix, args in _MAKERS:
    if name.startswith(prefix):
      if prefix.startswith("mnist"):
        return (f"create it with `python scripts/prepare_data.py {args} "
                f"--out {path}`")
      return (f"create it with `python scripts/prepare_data.py {args} "
              f"--out-dir {folder}` (writes {prefix}-val.npz and "
              f"{prefix}-cl.npz)")
  return "create it with `python scripts/prepare_data.py` (see its --help)"


def _check_members(path: str, how: str) -> None:
  """Checks every member's sizes before numpy allocates what they declare.

  Each ``.npy`` member's header (shape, dtype) must account for exactly the
  member's bytes, and those bytes must really be in the file (or, for a
  compressed member, within :data:`safezip.MAX_INFLATED_BYTES`).

  Raises:
    DataError: naming the file and the member.
  """
  with open(path, "rb") as fh:
    magic = fh.read(6)
  if not zipfile.is_zipfile(path):
    if magic == b"\x93NUMPY":
      raise DataError(f"{path}: is a single .npy array, not a benchmark "
                      f".npz; {how}")
    raise DataError(f"{path}: not a readable .npz (not a zip archive); "
                    f"{how}")
  with zipfile.ZipFile(path) as zf:
    members = safezip.BoundedZip(path, zf, how)
    for name in zf.namelist():
      info = members.check(name)
      if not name.endswith(".npy"):
        continue
      with zf.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
          shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
          shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        start = fh.tell()
      if dtype.hasobject:
        raise DataError(f"{path}: member {name} holds Python objects "
                        f"(dtype {dtype}), which are never read; {how}")
      size = start + math.prod(shape) * dtype.itemsize
      if size != info.file_size:
        raise DataError(f"{path}: member {name} declares shape {shape} of "
                        f"{dtype} ({size} bytes with its header) but holds "
                        f"{info.file_size} bytes (corrupt or forged); {how}")


def load_npz(path: str | os.PathLike) -> Benchmark:
  """Reads a benchmark written by :func:`save_npz`.

  Raises:
    DataError: missing file, not an npz, missing keys, bad meta, or arrays
      that break the benchmark invariants.
  """
  path = os.fspath(path)
  how = "re-create it with `python scripts/prepare_data.py`"
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file; {_how_to_create(path)}")
  try:
    _check_members(path, how)
    with np.load(path, allow_pickle=False) as data:
      files = set(data.files)
      if "meta" not in files:
        raise DataError(f"{path}: no 'meta' entry, so not a bcl_jax "
                        f"benchmark; {how}")
      try:
        meta = json.loads(str(data["meta"][()]))
      except (ValueError, TypeError) as err:
        raise DataError(f"{path}: 'meta' is not valid JSON ({err}); "
                        f"{how}") from None
      if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path}: 'meta' does not describe a {FORMAT} file; "
                        f"{how}")
      if meta.get("version") != VERSION:
        raise DataError(f"{path}: format version {meta.get('version')!r}, "
                        f"this bcl_jax reads version {VERSION}; {how}")
      n_tasks = meta.get("n_tasks")
      descriptors = meta.get("descriptors", [None] * (n_tasks or 0))
      if (not isinstance(n_tasks, int) or n_tasks <= 0 or
          not isinstance(descriptors, list) or len(descriptors) != n_tasks or
          not isinstance(meta.get("name"), str) or
          not isinstance(meta.get("task_incremental"), bool) or
          not isinstance(meta.get("n_outputs"), int)):
        raise DataError(f"{path}: 'meta' lacks or garbles name, n_tasks, "
                        f"n_outputs, task_incremental or descriptors; {how}")
      tasks = []
      for i in range(n_tasks):
        missing = [f"t{i}_{k}" for k in _KEYS if f"t{i}_{k}" not in files]
        if missing:
          raise DataError(f"{path}: missing {', '.join(missing)} (meta says "
                          f"{n_tasks} tasks); {how}")
        arrs = [data[f"t{i}_{k}"] for k in _KEYS]
        tasks.append(Task(*arrs, descriptor=_descriptor(descriptors[i])))
  except DataError:
    raise
  except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError,
          zlib.error, NotImplementedError, RuntimeError) as err:
    raise DataError(f"{path}: not a readable .npz ({type(err).__name__}: "
                    f"{str(err)[:80]}); {how}") from None
  return make_benchmark(meta["name"], tasks, meta["task_incremental"],
                        source=path, n_outputs=meta["n_outputs"])
