"""Evaluation: every task's test set, scored by the method's ``predict``.

The test sets are stacked into ``[T, N_max]`` arrays (padded, masked) and
placed once. For each run the method prepares its evaluation state
(``prepare_eval``: its variables, per-task adapted copies, class means),
then for each task ``j`` its ``predict`` scores the test inputs in chunks of
``eval_batch_size``; the prediction is the argmax over task ``j``'s columns
(task-aware evaluation, spec section 3) and the row entry is the fraction
correct.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from bcl_jax.data.benchmark import Benchmark
from bcl_jax.methods import Method
from bcl_jax.runs import RunAxis

# Incremented each time the evaluation is traced (tests check for retraces).
TRACE_COUNTS = {"evaluate": 0}


def batch_size(bench: Benchmark, eval_bs: int) -> int:
  """The evaluation chunk: ``eval_bs``, but no larger than the largest test
  set, so a small test set is not padded up to a large ``eval_bs`` (split
  CIFAR's 100-image test sets with ``eval_batch_size=500`` computed 5x the
  rows)."""
  n_max = max(t.x_test.shape[0] for t in bench.tasks)
  return max(1, min(int(eval_bs), n_max))


def stack_tests(bench: Benchmark, eval_bs: int):
  """All test sets as ``(x [T, N], y [T, N], valid [T, N])``, ``N`` the
  largest test set rounded up to a multiple of ``eval_bs``."""
  n_max = max(t.x_test.shape[0] for t in bench.tasks)
  n_pad = max(1, math.ceil(n_max / eval_bs)) * eval_bs
  shape = bench.tasks[0].x_test.shape[1:]
  dtype = bench.tasks[0].x_test.dtype
  x = np.zeros((bench.n_tasks, n_pad) + shape, dtype)
  y = np.zeros((bench.n_tasks, n_pad), np.int32)
  valid = np.zeros((bench.n_tasks, n_pad), bool)
  for i, t in enumerate(bench.tasks):
    n = t.x_test.shape[0]
    x[i, :n], y[i, :n], valid[i, :n] = t.x_test, t.y_test, True
  return x, y, valid


def task_accuracy(method: Method, class_mask, eval_bs: int, prepared, x, y,
                  valid, j):
  """Fraction of ``x``'s valid rows (one task's test set, ``[N, ...]``,
  ``N`` a multiple of ``eval_bs``) whose argmax over task ``j``'s columns of
  ``method.predict`` is the label."""
  n_chunks = x.shape[0] // eval_bs
  xs = x.reshape((n_chunks, eval_bs) + x.shape[1:])
  logits = jax.lax.map(lambda xb: method.predict(prepared, xb, j),
                       xs).reshape((x.shape[0], class_mask.shape[1]))
  pred = jnp.argmax(jnp.where(class_mask[j], logits, -jnp.inf), -1)
  correct = jnp.sum((pred == y) & valid)
  return correct / jnp.maximum(jnp.sum(valid), 1)


class Evaluator:
  """Accuracy rows of run-batched states on a benchmark's test sets."""

  def __init__(self, method: Method, bench: Benchmark, axis: RunAxis,
               eval_bs: int):
    self.method = method
    self.class_mask = np.asarray(bench.class_mask)
    self.axis = axis
    self.eval_bs = batch_size(bench, eval_bs)
    self.tests = axis.place_shared(stack_tests(bench, self.eval_bs))

  def _fn(self, state, x, y, valid, seen):
    TRACE_COUNTS["evaluate"] += 1
    method, eval_bs = self.method, self.eval_bs
    class_mask = jnp.asarray(self.class_mask)

    def one_run(s):
      prepared = method.prepare_eval(s, seen)
      return jax.lax.map(
          lambda j: task_accuracy(method, class_mask, eval_bs, prepared, x[j],
                                  y[j], valid[j], j), jnp.arange(x.shape[0]))

    return self.axis.over_runs(one_run)(state)

  def __call__(self, state, seen: int) -> np.ndarray:
    """``[runs, T]`` accuracies; ``seen`` is the last task learned (-1:
    none)."""
    s = jnp.asarray(seen, jnp.int32)
    fn = self.axis.compile("eval", self._fn, state, *self.tests, s)
    return np.asarray(fn(state, *self.tests, s))
