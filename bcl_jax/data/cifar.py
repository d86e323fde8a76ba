"""Split CIFAR-100 (the reference's ``data/cifar100.py``) from any copy.

Sources, picked by :func:`read_cifar100` from the path given:

- the official ``cifar-100-python.tar.gz`` (members read from the archive,
  nothing extracted to disk), or the extracted ``cifar-100-python`` folder
  (pickles ``train`` and ``test`` with ``data`` uint8 ``[N, 3072]`` and
  ``fine_labels``); https://www.cs.toronto.edu/~kriz/cifar.html;
- GEM's raw ``cifar100.pt`` = ``(x_tr, y_tr, x_te, y_te)`` (read without torch
  by :mod:`bcl_jax.data.torch_pickle`);
- ``tfds:DIR``, a TensorFlow Datasets data dir holding ``cifar100`` (needs the
  ``tfds`` extra, not TensorFlow: read through ``tfds.data_source``); TFDS
  images are HWC and are reordered to the pickle's channel-major flat layout.
  TFDS stores the examples in its own shuffled order, so task contents match
  the other sources but sample order does not.

:func:`build_cifar100` then applies the split of :mod:`bcl_jax.data.images`:
classes relabelled by ``torch_randperm(100, seed)`` (exactly the reference's
``torch.manual_seed(seed); torch.randperm(100)``), 20 tasks of 5, tasks 0-2 ->
``cifar-val`` (labels 0..14), tasks 3-19 -> ``cifar-cl`` (labels 0..84).
The only difference from the reference's ``cifar-val.pt`` / ``cifar-cl.pt`` is
that x stays uint8 (the reference stores ``x / 255`` as float32; the loop
divides on device, giving the same values).
"""

from __future__ import annotations

import os
import tarfile
from typing import Any

import numpy as np

from bcl_jax.data.benchmark import Benchmark
from bcl_jax.data.errors import DataError
from bcl_jax.data import images

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
N_CLASSES = 100
N_PIXELS = 3 * 32 * 32
_FIX = ("download the CIFAR-100 python version, cifar-100-python.tar.gz, "
        f"from {CIFAR_URL} and pass it (or the cifar-100-python folder it "
        "extracts to, or a folder holding either); GEM's raw cifar100.pt and "
        "tfds:DIR (a TFDS data dir) work too")

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _check_split(x: Any, y: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
  """Validates one split and returns uint8 ``[N, 3072]`` and int64 ``[N]``."""
  x = np.asarray(x)
  y = np.asarray(y).reshape(-1)
  if x.ndim < 2 or int(np.prod(x.shape[1:])) != N_PIXELS:
    raise DataError(f"{where}: images have shape {x.shape}, expected "
                    f"[N, 3072]; is this CIFAR-100?")
  if x.dtype != np.uint8:
    raise DataError(f"{where}: images are {x.dtype}, expected uint8 pixels; "
                    f"rebuild it from {CIFAR_URL}")
  if x.shape[0] != y.shape[0]:
    raise DataError(f"{where}: {x.shape[0]} images but {y.shape[0]} labels; "
                    "the file is damaged, re-download it")
  if not np.issubdtype(y.dtype, np.integer):
    raise DataError(f"{where}: labels are {y.dtype}, expected integers")
  if y.size and (y.min() < 0 or y.max() >= N_CLASSES):
    raise DataError(f"{where}: labels span [{y.min()}, {y.max()}], expected "
                    "the 100 fine labels 0..99; is this CIFAR-10?")
  return x.reshape(x.shape[0], N_PIXELS), y.astype(np.int64)


def _from_pickle(obj: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
  hint = (" (CIFAR-10 pickles have 'labels' instead: use the CIFAR-100 "
          f"python version from {CIFAR_URL})")
  data = images.get_key(obj, "data", where, hint)
  labels = images.get_key(obj, "fine_labels", where, hint)
  return _check_split(data, labels, where)


def read_pickle_folder(folder: str, progress_bar: bool = True) -> Arrays:
  """Reads the extracted ``cifar-100-python`` folder (``train``, ``test``)."""
  out = []
  for split in ("train", "test"):
    path = os.path.join(folder, split)
    if not os.path.isfile(path):
      raise DataError(f"{path}: missing; extract cifar-100-python.tar.gz "
                      f"(from {CIFAR_URL}) so that {folder} holds 'train' and "
                      "'test'")
    with open(path, "rb") as f:
      reader = images.ProgressReader(f, os.path.getsize(path),
                                     f"cifar100 {split}", progress_bar)
      with reader:
        obj = images.load_data_pickle(reader, path)
    out += _from_pickle(obj, path)
  return tuple(out)


def read_tarball(path: str, progress_bar: bool = True) -> Arrays:
  """Reads ``train`` and ``test`` straight out of ``cifar-100-python.tar.gz``.

  The archive is streamed once (no seeking back through the gzip stream) and
  nothing is written to disk.
  """
  found = {}
  try:
    with tarfile.open(path, "r|*") as tar:
      for member in tar:
        split = member.name.rstrip("/").split("/")[-1]
        if split not in ("train", "test") or not member.isfile():
          continue
        where = f"{path}:{member.name}"
        with images.ProgressReader(tar.extractfile(member), member.size,
                                   f"cifar100 {split}", progress_bar) as r:
          found[split] = _from_pickle(images.load_data_pickle(r, where),
                                      where)
  except (tarfile.TarError, OSError, EOFError) as e:
    raise DataError(f"{path}: not a readable tar archive ({e}); re-download "
                    f"cifar-100-python.tar.gz from {CIFAR_URL}") from None
  for split in ("train", "test"):
    if split not in found:
      raise DataError(f"{path}: no '{split}' member; expected "
                      f"cifar-100-python.tar.gz from {CIFAR_URL}")
  return found["train"] + found["test"]


def read_gem_raw(path: str) -> Arrays:
  """Reads GEM's raw ``cifar100.pt`` (a ``torch.save`` of four tensors)."""
  try:
    from bcl_jax.data.torch_pickle import load_torch
  except ImportError:
    raise DataError(f"{path}: reading .pt files needs "
                    "bcl_jax.data.torch_pickle, which this install lacks; use "
                    f"cifar-100-python.tar.gz from {CIFAR_URL} instead"
                    ) from None
  obj = load_torch(path)
  if not isinstance(obj, (tuple, list)) or len(obj) != 4:
    raise DataError(f"{path}: expected GEM's raw (x_tr, y_tr, x_te, y_te), "
                    f"got {type(obj).__name__}; build it with GEM's "
                    "data/raw/raw.py or pass cifar-100-python.tar.gz")
  x_tr, y_tr = _check_split(obj[0], obj[1], f"{path} (train)")
  x_te, y_te = _check_split(obj[2], obj[3], f"{path} (test)")
  return x_tr, y_tr, x_te, y_te


def read_tfds(data_dir: str | None, progress_bar: bool = True) -> Arrays:
  """Reads ``cifar100`` from a TFDS data dir (no download, no TensorFlow)."""
  where = data_dir or "the default TFDS data dir"
  out = []
  for split in ("train", "test"):
    n, examples = images.tfds_examples(
        "cifar100", split, data_dir,
        f"use cifar-100-python.tar.gz from {CIFAR_URL}")
    x = np.empty((n, N_PIXELS), np.uint8)
    y = np.empty((n,), np.int64)
    k = 0
    for ex in images.progress(examples, total=n, desc=f"cifar100 {split}",
                              enabled=progress_bar, unit="img"):
      img = np.asarray(ex["image"])
      if img.shape != (32, 32, 3) or k >= n:
        raise DataError(f"{where}: a cifar100/{split} image has shape "
                        f"{img.shape}, expected [32, 32, 3]")
      # TFDS images are HWC; the pickle's rows are channel-major.
      x[k] = img.transpose(2, 0, 1).reshape(-1)
      y[k] = int(ex["label"])
      k += 1
    out += _check_split(x[:k], y[:k], f"{where} (cifar100/{split})")
  return tuple(out)


def read_cifar100(source: str | os.PathLike,
                  progress_bar: bool = True) -> Arrays:
  """Reads CIFAR-100 from any supported source (see the module docstring).

  A folder is searched for, in order: ``train`` + ``test``,
  ``cifar-100-python/``, ``cifar-100-python.tar.gz``, ``cifar100.pt``.

  Returns:
    ``(x_tr uint8 [50000, 3072], y_tr int64, x_te uint8 [10000, 3072],
    y_te int64)`` with the fine labels, rows in the pickle's layout (1024
    red, 1024 green, 1024 blue values).

  Raises:
    DataError: missing or malformed source, saying what to put where.
  """
  is_tfds, path = images.split_tfds_source(source)
  if is_tfds:
    return read_tfds(path, progress_bar)
  if not os.path.exists(path):
    raise DataError(f"{path}: not found; {_FIX}")
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "train")):
      return read_pickle_folder(path, progress_bar)
    for name in ("cifar-100-python", "cifar-100-python.tar.gz", "cifar100.pt"):
      if os.path.exists(os.path.join(path, name)):
        return read_cifar100(os.path.join(path, name), progress_bar)
    if os.path.isdir(os.path.join(path, "cifar100")):
      return read_tfds(path, progress_bar)
    raise DataError(f"{path}: holds no CIFAR-100 copy; {_FIX}")
  if path.endswith((".tar.gz", ".tgz", ".tar")):
    return read_tarball(path, progress_bar)
  if path.endswith(".pt"):
    return read_gem_raw(path)
  if os.path.basename(path) in ("train", "test"):
    return read_pickle_folder(os.path.dirname(path) or ".", progress_bar)
  raise DataError(f"{path}: not a CIFAR-100 file; {_FIX}")


def build_cifar100(source: str | os.PathLike, seed: int = 0,
                   n_tasks: int = 20, n_val_tasks: int = 3,
                   progress_bar: bool = True) -> tuple[Benchmark, Benchmark]:
  """Split CIFAR-100 as the reference builds it: ``(cifar-val, cifar-cl)``.

  Args:
    source: see :func:`read_cifar100`.
    seed: the reference's ``--seed`` (default 0, as in the reference).
    n_tasks: tasks of ``100 // n_tasks`` classes (reference: 20).
    n_val_tasks: leading tasks kept for cross-validation (reference: 3).
    progress_bar: show tqdm bars while reading.

  Returns:
    Task-incremental benchmarks, x uint8 ``[N, 3072]``.
  """
  x_tr, y_tr, x_te, y_te = read_cifar100(source, progress_bar)
  return images.split_tasks("cifar", x_tr, y_tr, x_te, y_te,
                            n_classes=N_CLASSES, seed=seed, n_tasks=n_tasks,
                            n_val_tasks=n_val_tasks, source=os.fspath(source))
