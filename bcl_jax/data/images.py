"""Split image benchmarks (CIFAR-100, CUB-200-2011, miniImageNet): shared parts.

The readers live in ``cifar.py``, ``cub.py`` and ``mini.py``; this module
holds what they share (and imports none of them: the ``prepare_data.py``
subcommands that do live in :mod:`bcl_jax.data.prepare`).

Split convention (the reference's ``data/cifar100.py``, spec section 10,
applied to all three datasets):

1. ``perm = torch_randperm(n_classes, seed)``; original class ``c`` gets the
   new label ``perm[c]`` (bit-exact with ``torch.manual_seed(seed);
   torch.randperm(n_classes)`` on CPU, see :func:`torch_randperm`).
2. Task ``t`` (of ``n_tasks``, each ``cpt = n_classes // n_tasks`` classes)
   holds every sample whose new label is in ``[t * cpt, (t + 1) * cpt)``, in
   the source's sample order; so task ``t`` owns the contiguous head columns
   ``[t * cpt, (t + 1) * cpt)`` (spec section 3).
3. The first ``n_val_tasks`` (3) tasks form ``<name>-val`` with labels as is;
   the others form ``<name>-cl`` with labels shifted down by
   ``n_val_tasks * cpt`` so that they start at 0.
4. Each task's descriptor is the reference's ``(c1, c2)``: the label range
   *before* the shift (so ``cifar-cl`` task 0 has descriptor ``(15, 20)`` and
   labels 0..4). Nothing reads descriptors for head offsets.

Images stay uint8 (CIFAR flat ``[N, 3072]`` in the pickle's CHW order, CUB
``[N, 3, 224, 224]``, miniImageNet ``[N, 3, 84, 84]``); the training loop
scales them to ``[0, 1]`` on device, which equals the reference's
``x.float() / 255``.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, Iterable, Sequence

import numpy as np

from bcl_jax.data.benchmark import Benchmark, Task, make_benchmark
from bcl_jax.data.errors import DataError

TFDS_HINT = 'pip install -e ".[tfds]"'


def torch_randperm(n: int, seed: int) -> np.ndarray:
  """``torch.manual_seed(seed); torch.randperm(n)`` on CPU, without torch.

  PyTorch's CPU generator is a 32-bit Mersenne Twister seeded (standard
  ``init_genrand``) with the low 32 bits of the seed, and for
  ``n < 2**32 / 20`` its ``randperm`` is one Fisher-Yates pass that swaps
  slot ``i`` with slot ``i + random() % (n - i)`` for ``i = 0 .. n - 2``.
  numpy's legacy ``RandomState(seed)`` is the same generator seeded the same
  way, and ``randint(0, 2**32, dtype=uint32)`` returns its raw outputs, so the
  permutation is reproduced exactly (torch 1.x and 2.x; the CUDA generator
  differs, but the reference draws this on CPU).

  Args:
    n: permutation length, ``0 <= n < 2**32 / 20``.
    seed: any Python int, as ``torch.manual_seed`` takes it.

  Returns:
    int64 ``[n]``, a permutation of ``range(n)``.
  """
  if n < 0 or n >= 2**32 // 20:
    raise ValueError(f"torch_randperm: n={n} is outside [0, 2**32 / 20)")
  perm = np.arange(n, dtype=np.int64)
  if n < 2:
    return perm
  rs = np.random.RandomState(seed & 0xFFFFFFFF)
  draws = rs.randint(0, 2**32, size=n - 1, dtype=np.uint32).astype(np.int64)
  for i in range(n - 1):
    j = i + int(draws[i] % (n - i))
    perm[i], perm[j] = perm[j], perm[i]
  return perm


def split_tasks(name: str, x_train: np.ndarray, y_train: np.ndarray,
                x_test: np.ndarray, y_test: np.ndarray, *, n_classes: int,
                seed: int = 0, n_tasks: int = 20, n_val_tasks: int = 3,
                source: str = "<memory>",
                permutation: Sequence[int] | None = None,
                ) -> tuple[Benchmark, Benchmark]:
  """Shuffles classes, cuts them into tasks and splits val / cl tasks.

  See the module docstring for the convention.

  Args:
    name: prefix of the benchmark names (``cifar`` -> ``cifar-val`` and
      ``cifar-cl``).
    x_train: ``[N, ...]`` inputs.
    y_train: ``[N]`` original labels in ``[0, n_classes)``.
    x_test: ``[M, ...]`` inputs.
    y_test: ``[M]`` original labels.
    n_classes: number of classes; a multiple of ``n_tasks``.
    seed: seed of the class permutation.
    n_tasks: total number of tasks (val + cl).
    n_val_tasks: how many leading tasks go to the ``-val`` benchmark.
    source: file or folder named in error messages.
    permutation: overrides the seeded permutation: original class ``c`` gets
      label ``permutation[c]``.

  Returns:
    ``(val, cl)`` task-incremental benchmarks with ``n_val_tasks * cpt`` and
    ``(n_tasks - n_val_tasks) * cpt`` outputs.

  Raises:
    DataError: bad labels, a class count that does not divide, or an empty
      task.
  """
  if n_tasks <= 0 or n_classes % n_tasks:
    raise DataError(f"{source}: {n_classes} classes cannot be cut into "
                    f"{n_tasks} equal tasks; pick n_tasks dividing {n_classes}")
  if not 0 < n_val_tasks < n_tasks:
    raise DataError(f"{source}: n_val_tasks={n_val_tasks} must be in "
                    f"[1, {n_tasks - 1}]")
  if permutation is None:
    perm = torch_randperm(n_classes, seed)
  else:
    perm = np.asarray(permutation, dtype=np.int64)
    if sorted(perm.tolist()) != list(range(n_classes)):
      raise DataError(f"{source}: the class permutation is not a permutation "
                      f"of 0..{n_classes - 1}")
  new_y = {}
  for split, y in (("train", y_train), ("test", y_test)):
    y = np.asarray(y).astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
      raise DataError(f"{source}: {split} labels span [{y.min()}, {y.max()}], "
                      f"expected [0, {n_classes}); is this the right dataset?")
    new_y[split] = perm[y]
  cpt = n_classes // n_tasks
  shift = n_val_tasks * cpt
  val_tasks, cl_tasks = [], []
  for t in range(n_tasks):
    c1, c2 = t * cpt, (t + 1) * cpt
    off = 0 if t < n_val_tasks else shift
    arrays = []
    for x, y in ((x_train, new_y["train"]), (x_test, new_y["test"])):
      idx = np.flatnonzero((y >= c1) & (y < c2))
      arrays += [x[idx], (y[idx] - off).astype(np.int32)]
    task = Task(*arrays, descriptor=(c1, c2))
    (val_tasks if t < n_val_tasks else cl_tasks).append(task)
  val = make_benchmark(f"{name}-val", val_tasks, task_incremental=True,
                       source=source, n_outputs=shift)
  cl = make_benchmark(f"{name}-cl", cl_tasks, task_incremental=True,
                      source=source, n_outputs=n_classes - shift)
  return val, cl


# ---------------------------------------------------------------- pickles --

# Globals a data pickle may name: numpy arrays (both numpy 1.x and 2.x module
# paths, protocol <= 5) and Python 3's encoding of bytes under protocol 2.
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
}


class _DataUnpickler(pickle.Unpickler):
  """Unpickles plain containers and numpy arrays, nothing executable."""

  def __init__(self, file: Any, source: str):
    super().__init__(file, encoding="latin1")
    self._source = source

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _PICKLE_ALLOWED:
      raise DataError(f"{self._source}: the pickle refers to {module}.{name}, "
                      "which a data file should not; is this the right file?")
    if module.startswith("numpy.core.") and hasattr(np, "_core"):
      module = "numpy._core." + module[len("numpy.core."):]
    return super().find_class(module, name)


def load_data_pickle(file: Any, source: str) -> Any:
  """Reads a pickle of containers and numpy arrays (no code runs).

  Python 2 pickles (the official CIFAR files) load with ``latin1``, so their
  ``str`` keys come back as ``str``; use :func:`get_key` to accept either.

  Args:
    file: a path or a binary file object.
    source: name for error messages.

  Raises:
    DataError: unreadable, truncated, or naming anything but numpy arrays.
  """
  try:
    if isinstance(file, (str, os.PathLike)):
      with open(file, "rb") as f:
        return _DataUnpickler(f, source).load()
    return _DataUnpickler(file, source).load()
  except DataError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
          AttributeError, ImportError, IndexError, KeyError) as e:
    raise DataError(f"{source}: not a readable data pickle ({e}); the file "
                    "may be truncated, re-download it") from None


def get_key(d: Any, key: str, source: str, hint: str = "") -> Any:
  """``d[key]`` accepting ``str`` or ``bytes`` keys; DataError if absent."""
  if isinstance(d, dict):
    for k in (key, key.encode()):
      if k in d:
        return d[k]
  have = sorted(str(k) for k in d) if isinstance(d, dict) else type(d).__name__
  raise DataError(f"{source}: no '{key}' entry (found {have}){hint}")


# --------------------------------------------------------------- progress --


def progress(iterable: Iterable[Any], *, total: int | None = None,
             desc: str = "", enabled: bool = True, unit: str = "it") -> Any:
  """``tqdm(iterable)`` when enabled and tqdm is installed, else as is."""
  if not enabled:
    return iterable
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return iterable
  return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False)


class ProgressReader(io.RawIOBase):
  """A read-only file wrapper that advances a byte progress bar."""

  def __init__(self, f: Any, total: int | None, desc: str, enabled: bool):
    super().__init__()
    self._f = f
    self._bar = None
    if enabled:
      try:
        from tqdm.auto import tqdm
        self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                         leave=False)
      except ImportError:
        pass

  def readable(self) -> bool:
    return True

  def _tick(self, n: int) -> None:
    if self._bar is not None and n:
      self._bar.update(n)

  def read(self, size: int = -1) -> bytes:
    b = self._f.read(size)
    self._tick(len(b))
    return b

  def readinto(self, b: Any) -> int:
    n = self._f.readinto(b)
    self._tick(n or 0)
    return n

  def readline(self, size: int = -1) -> bytes:
    b = self._f.readline(size)
    self._tick(len(b))
    return b

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    super().close()


# ----------------------------------------------------------------- images --


def decode_image(file: Any, size: int, source: str,
                 resample: int | None = None) -> np.ndarray:
  """Decodes one image file to uint8 ``[3, size, size]`` RGB.

  Grey-scale, palette and CMYK images are converted to RGB; images not
  already ``size x size`` are resized (bilinear unless ``resample`` names
  another PIL filter), without keeping the aspect ratio, as the usual
  ``Resize((size, size))`` does.

  Raises:
    DataError: missing or undecodable file.
  """
  from PIL import Image
  if resample is None:
    resample = Image.BILINEAR
  try:
    with Image.open(file) as im:
      im = im.convert("RGB")
      if im.size != (size, size):
        im = im.resize((size, size), resample)
      return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
  except FileNotFoundError:
    raise DataError(f"{source}: image file missing; the dataset copy is "
                    "incomplete, extract the archive again") from None
  except OSError as e:
    raise DataError(f"{source}: cannot decode the image ({e}); the file is "
                    "damaged, extract the archive again") from None


def tfds_module(where: str) -> Any:
  """Imports ``tensorflow_datasets`` or raises a DataError saying how."""
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError(f"{where}: reading a TFDS data dir needs "
                    f"tensorflow_datasets; run {TFDS_HINT}, or use the "
                    "official files instead") from None
  return tfds


def tfds_examples(name: str, split: str, data_dir: str | None,
                  fix: str) -> tuple[int, Iterable[dict[str, Any]]]:
  """``(count, examples)`` of a prepared TFDS dataset, without TensorFlow.

  Reads through ``tfds.data_source`` (random access to ArrayRecord files,
  no TensorFlow needed). A dataset built in the older TFRecord format needs
  ``tfds.load`` and so TensorFlow; that is used when TensorFlow is installed.

  Args:
    name: TFDS name, e.g. ``cifar100``.
    split: ``train`` or ``test``.
    data_dir: TFDS data dir, ``None`` for TFDS's default.
    fix: what else the user can do, appended to errors.

  Raises:
    DataError: tensorflow_datasets missing, or the dataset not prepared.
  """
  where = data_dir or "the default TFDS data dir"
  tfds = tfds_module(where)
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir,
                              download=False)
    return len(source), (source[i] for i in range(len(source)))
  except Exception as e:  # TFDS raises many types for a missing dataset.
    first = e
  try:
    import tensorflow  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    raise DataError(f"{where}: TFDS cannot read {name}/{split} without "
                    f"TensorFlow ({str(first).splitlines()[0][:200]}); build "
                    "it "
                    f"as ArrayRecord with `tfds build {name} "
                    f"--file_format=array_record`, or {fix}") from None
  try:
    ds = tfds.load(name, split=split, data_dir=data_dir, download=False)
    return int(ds.cardinality()), tfds.as_numpy(ds)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{where}: TFDS cannot load {name}/{split} "
                    f"({str(e).splitlines()[0][:200]}); run `tfds build "
                    f"{name}` for that data dir, or {fix}") from None


def split_tfds_source(source: str | os.PathLike) -> tuple[bool, str | None]:
  """``tfds:DIR`` -> ``(True, DIR)``; ``tfds:`` -> ``(True, None)``."""
  s = os.fspath(source)
  if s.startswith("tfds:"):
    return True, (s[len("tfds:"):] or None)
  return False, s
