"""GEM-format benchmark files (``mnist_permutations.pt``, ``cifar-cl.pt``, ...).

A GEM file is ``torch.save([tasks_train, tasks_test])`` where each task is
``[descriptor, x, y]``: ``x`` float32 ``[N, D]`` (values in [0, 1]) or
``[N, 3, H, W]``, ``y`` int64 ``[N]`` (spec sections 1 and 10). GEM's raw
MNIST files ``mnist_train.pt`` / ``mnist_test.pt`` are ``(x uint8 [N, 28, 28],
y int64 [N])``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from bcl_jax.data.benchmark import Benchmark, Task, make_benchmark
from bcl_jax.data.errors import DataError
from bcl_jax.data.torch_pickle import load_torch

_HOW_TO_MAKE = ("GEM-format files come from GEM's data scripts "
                "(mnist_permutations.py, ...) or `python scripts/prepare_data.py`")


def default_task_incremental(path: str) -> bool:
  """The reference's rule: split benchmarks are recognised by file name."""
  name = os.path.basename(path).lower()
  return any(key in name for key in ("cifar", "cub", "mini"))


def _describe(obj: Any) -> str:
  if isinstance(obj, np.ndarray):
    return f"an array of shape {obj.shape}"
  if isinstance(obj, (list, tuple)):
    return f"a {type(obj).__name__} of {len(obj)} items"
  return f"a {type(obj).__name__}"


def _descriptor(value: Any) -> Any:
  """Keeps descriptors small and plain: 0-d arrays become Python numbers."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return value.item()
  return value


def _task(path: str, split: str, i: int, task: Any) -> Task:
  where = f"{path}: task {i} of the {split} list"
  if not isinstance(task, (list, tuple)) or len(task) != 3:
    raise DataError(f"{where} is {_describe(task)}, expected "
                    "[descriptor, x, y]; " + _HOW_TO_MAKE)
  descriptor, x, y = task
  for name, arr in (("x", x), ("y", y)):
    if not isinstance(arr, np.ndarray):
      raise DataError(f"{where}: {name} is {_describe(arr)}, expected a "
                      f"tensor; {_HOW_TO_MAKE}")
  if y.ndim != 1 or x.ndim < 2 or x.shape[0] != y.shape[0]:
    raise DataError(f"{where}: x has shape {x.shape} and y {y.shape}; "
                    "expected x [N, ...] and y [N] with the same N")
  if x.shape[0] == 0:
    raise DataError(f"{where} is empty (0 samples); drop the task or "
                    "re-create the file")
  if y.size and np.issubdtype(y.dtype, np.integer) and y.min() < 0:
    raise DataError(f"{where}: labels must be >= 0, found {int(y.min())}; "
                    "re-create the file with class indices 0..C-1")
  if x.dtype == np.float64:
    x = x.astype(np.float32)
  if split == "train":
    return Task(x, y, x[:0], y[:0], _descriptor(descriptor))
  return Task(x[:0], y[:0], x, y, _descriptor(descriptor))


def benchmark_from_gem_object(obj: Any, source: str, name: str,
                              task_incremental: bool) -> Benchmark:
  """Validates a loaded ``[tasks_train, tasks_test]`` and builds a Benchmark.

  Raises:
    DataError: wrong nesting, disagreeing shapes or counts, bad labels.
  """
  if not isinstance(obj, (list, tuple)) or len(obj) != 2:
    raise DataError(f"{source}: holds {_describe(obj)}, expected a GEM "
                    f"benchmark [tasks_train, tasks_test]; {_HOW_TO_MAKE}")
  tr, te = obj
  for split, tasks in (("train", tr), ("test", te)):
    if not isinstance(tasks, (list, tuple)):
      raise DataError(f"{source}: the {split} task list is {_describe(tasks)}"
                      f", expected a list of [descriptor, x, y]; "
                      + _HOW_TO_MAKE)
  if len(tr) != len(te):
    raise DataError(f"{source}: {len(tr)} train tasks but {len(te)} test "
                    "tasks; both lists must have one entry per task")
  tasks = []
  for i, (a, b) in enumerate(zip(tr, te)):
    ta = _task(source, "train", i, a)
    tb = _task(source, "test", i, b)
    tasks.append(Task(ta.x_train, ta.y_train, tb.x_test, tb.y_test,
                      ta.descriptor))
  return make_benchmark(name, tasks, task_incremental, source=source)


def load_gem(path: str | os.PathLike, name: str | None = None,
             task_incremental: bool | None = None) -> Benchmark:
  """Reads a GEM benchmark file.

  Args:
    path: the ``.pt`` file.
    name: benchmark name; defaults to the file name without extension.
    task_incremental: multi-head layout; None applies the reference's rule
      (True iff the file name contains 'cifar', 'cub' or 'mini').

  Returns:
    The benchmark; descriptors are kept as loaded (arrays, numbers, ...).

  Raises:
    DataError: missing, unreadable or malformed file.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file; {_HOW_TO_MAKE}")
  if os.path.isdir(path):
    raise DataError(f"{path}: is a folder, expected a GEM .pt file; "
                    + _HOW_TO_MAKE)
  obj = load_torch(path)
  if name is None:
    name = os.path.splitext(os.path.basename(path))[0]
  if task_incremental is None:
    task_incremental = default_task_incremental(path)
  return benchmark_from_gem_object(obj, path, name, task_incremental)


def gem_object_from_benchmark(bench: Benchmark) -> list:
  """The ``[tasks_train, tasks_test]`` nesting of ``bench`` (for writing)."""
  tr, te = [], []
  for task in bench.tasks:
    tr.append([task.descriptor, task.x_train, task.y_train.astype(np.int64)])
    te.append([task.descriptor, task.x_test, task.y_test.astype(np.int64)])
  return [tr, te]


def load_gem_mnist_raw(path: str | os.PathLike) -> tuple[np.ndarray,
                                                          np.ndarray]:
  """Reads GEM's ``mnist_train.pt`` / ``mnist_test.pt``: ``(x, y)``.

  Returns:
    ``x`` uint8 ``[N, 28, 28]`` and ``y`` int64 ``[N]``.

  Raises:
    DataError: missing or malformed file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file; GEM's raw MNIST files come from "
                    "GEM's data/raw scripts (mnist_train.pt, mnist_test.pt)")
  obj = load_torch(path)
  if (not isinstance(obj, (list, tuple)) or len(obj) != 2 or
      not all(isinstance(a, np.ndarray) for a in obj)):
    raise DataError(f"{path}: holds {_describe(obj)}, expected GEM raw MNIST "
                    "(x uint8 [N, 28, 28], y int64 [N])")
  x, y = obj
  if x.ndim == 2 and x.shape[1] == 784:
    x = x.reshape(-1, 28, 28)
  if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
    raise DataError(f"{path}: x has shape {x.shape} and y {y.shape}; "
                    "expected x [N, 28, 28] and y [N]")
  if x.dtype != np.uint8:
    if np.issubdtype(x.dtype, np.floating) and x.size and x.max() <= 1.0:
      x = x * 255.0
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
  if not np.issubdtype(y.dtype, np.integer) or (y.size and (
      y.min() < 0 or y.max() > 9)):
    raise DataError(f"{path}: labels must be integers 0..9")
  return x, y.astype(np.int64)
