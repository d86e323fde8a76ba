"""Continual-learning metrics as plain functions of the accuracy matrix.

``R[i, j]`` is the test accuracy on task ``j`` after training on tasks
``0..i`` (spec section 2). All functions take a ``[T, T]`` array.
"""

from __future__ import annotations

import numpy as np


def _check(r) -> np.ndarray:
  r = np.asarray(r, dtype=np.float64)
  if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
    raise ValueError(f"accuracy matrix must be square and non-empty, got "
                     f"shape {r.shape}")
  return r


def acc(r) -> float:
  """Final average accuracy: mean of the last row."""
  return float(_check(r)[-1].mean())


def fm(r) -> float:
  """Forgetting: mean over j < T-1 of max_{i < T-1} R[i, j] - R[T-1, j].

  The max runs over every row before the last, including rows from before
  task j was learned (the reference's definition). 0 for a single task.
  """
  r = _check(r)
  t = r.shape[0]
  if t < 2:
    return 0.0
  return float(np.mean(r[:-1, :-1].max(axis=0) - r[-1, :-1]))


def la(r) -> float:
  """Learning accuracy: mean of the diagonal."""
  return float(np.mean(np.diag(_check(r))))


def bwt(r) -> float:
  """Backward transfer: mean over j < T-1 of R[T-1, j] - R[j, j]."""
  r = _check(r)
  t = r.shape[0]
  if t < 2:
    return 0.0
  return float(np.mean(r[-1, :-1] - np.diag(r)[:-1]))


def fwt(r) -> float:
  """Forward transfer, reference form: mean over t >= 1 of R[t-1, t] - R[0, t]."""
  r = _check(r)
  t = r.shape[0]
  if t < 2:
    return 0.0
  idx = np.arange(1, t)
  return float(np.mean(r[idx - 1, idx] - r[0, idx]))


def fwt_gem(r, init_acc) -> float:
  """Forward transfer, GEM's form: against the random initialisation.

  mean over t >= 1 of R[t-1, t] - b[t], with ``b`` the accuracy of the
  untrained model on each task.
  """
  r = _check(r)
  b = np.asarray(init_acc, dtype=np.float64)
  t = r.shape[0]
  if b.shape != (t,):
    raise ValueError(f"init_acc must have shape ({t},), got {b.shape}")
  if t < 2:
    return 0.0
  idx = np.arange(1, t)
  return float(np.mean(r[idx - 1, idx] - b[idx]))


def all_metrics(r, init_acc=None) -> dict[str, float]:
  out = {"acc": acc(r), "fm": fm(r), "la": la(r), "bwt": bwt(r),
         "fwt": fwt(r)}
  if init_acc is not None:
    out["fwt_gem"] = fwt_gem(r, init_acc)
  return out
