"""Continual-learning metrics as plain functions of the accuracy matrix.

``R[i, j]`` is the test accuracy on task ``j`` after training on tasks
``0..i`` (spec section 2). The matrix metrics take a ``[T, T]`` array;
``lca`` takes per-task learning curves; ``mean_std`` is the one place that
fixes how a spread over runs is computed (the sample std, ``ddof=1``).
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


def lca(acc_curve, beta: int | None = None) -> float:
  """Learning curve area (Chaudhry et al. 2019, "Efficient Lifelong Learning
  with A-GEM", section 5).

  ``LCA_beta = 1/(beta+1) * sum_{b=0..beta} Z_b`` with ``Z_b`` the mean over
  tasks ``k`` of the accuracy on task ``k`` after ``b`` mini-batches of task
  ``k`` (``b = 0``: before its first batch). That is the mean over tasks of
  the mean of the first ``beta + 1`` points of each task's learning curve.

  Args:
    acc_curve: ``[T, P]`` array, ``acc_curve[k, b]`` as above, ``P >= beta+1``.
    beta: the number of mini-batches covered (default ``P - 1``: all points).

  Raises:
    ValueError: for a non-2-D curve or a ``beta`` the curve does not cover.
  """
  a = np.array(acc_curve, dtype=np.float64)  # None (JSON null) -> NaN
  if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
    raise ValueError(f"acc_curve must be a non-empty [tasks, beta+1] array, "
                     f"got shape {a.shape}")
  beta = a.shape[1] - 1 if beta is None else int(beta)
  if not 0 <= beta < a.shape[1]:
    raise ValueError(f"beta={beta} needs {beta + 1} points per task; "
                     f"acc_curve has {a.shape[1]}")
  # Points a short task never reached are NaN and left out.
  return float(np.nanmean(np.nanmean(a[:, :beta + 1], axis=1)))


# The spread of a metric over runs (seeds) is the sample standard deviation.
STD_DDOF = 1


def nan_to_none(a) -> list:
  """An array as nested lists with NaN as None (valid JSON)."""
  return [nan_to_none(x) for x in a] if np.ndim(a) else (
      None if np.isnan(a) else float(a))


def mean_std(values) -> tuple[float, float]:
  """Mean and sample std (``ddof=1``) of per-run values; std 0 for one run."""
  v = np.asarray(values, dtype=np.float64)
  if v.size == 0:
    raise ValueError("mean_std needs at least one value")
  std = float(np.std(v, ddof=STD_DDOF)) if v.size > 1 else 0.0
  return float(v.mean()), std


def all_metrics(r, init_acc=None) -> dict[str, float]:
  out = {"acc": acc(r), "fm": fm(r), "la": la(r), "bwt": bwt(r),
         "fwt": fwt(r)}
  if init_acc is not None:
    out["fwt_gem"] = fwt_gem(r, init_acc)
  return out
