"""Plain numpy versions of ``ftml`` and ``offline``, written from the spec.

Float64 MLP with hand-written backprop (``np_reference``) and the reference's
memory bookkeeping as straight-line Python. The only shared piece with the
compiled methods is the random draw of the meta task: the same
``jax.random.randint`` on the same key, so both sides train on the same
memory rows.
"""

from __future__ import annotations

import copy

import jax
import numpy as np

import np_reference as ref


def interpolate(before, after, beta):
  return ref.add(before, ref.scale(ref.add(after, ref.scale(before, -1)),
                                   beta))


def fit(P, x, y, cols, steps, lr, beta):
  """``steps`` SGD steps on CE(x, y) over ``cols`` (gradients zeroed every
  step), then ``theta0 + beta * (theta - theta0)``."""
  theta0 = copy.deepcopy(P)
  cols = np.broadcast_to(cols, (len(x), len(cols)))
  loss = None
  for _ in range(steps):
    loss, g = ref.ce_grad(P, x, y, cols, np.ones(len(x), bool))
    P = ref.add(P, ref.scale(g, -lr))
  return interpolate(theta0, P, beta), loss


def ftml_observe(P, mem: ref.Ring, x, y, t, key, cfg, class_mask,
                 chosen=None):
  """One ``observe`` of the reference's ``model/ftml.py``.

  ``x, y`` are the batch's real rows. ``chosen`` (a list) collects the meta
  tasks drawn. Returns ``(P, last meta loss)``.
  """
  mem.write(t, x, y, cfg["drop_at_wrap"], False)
  P, _ = fit(P, x, y, class_mask[t], cfg["inner_steps"], cfg["lr"],
             cfg["beta"])
  loss = None
  for k in jax.random.split(key, cfg["n_meta"]):
    i = int(jax.random.randint(k, (), 0, t + 1))  # np.random.choice(t + 1)
    if chosen is not None:
      chosen.append(i)
    f = mem.filled[i]
    P, loss = fit(P, mem.x[i][f], mem.y[i][f], class_mask[i],
                  cfg["inner_steps"], cfg["lr"], cfg["beta"])
  return P, loss


def offline_step(P, x, y, tasks, lr, class_mask):
  """One SGD step on CE where row ``r`` is scored on task ``tasks[r]``'s
  columns (the reference gathers each row's own slice)."""
  _, g = ref.ce_grad(P, x, y, class_mask[tasks], np.ones(len(x), bool))
  return ref.add(P, ref.scale(g, -lr))


def task_aware_accuracy(P, x, y, cols) -> float:
  logits, _ = ref.forward(P, x)
  pred = np.argmax(np.where(cols, logits, -np.inf), -1)
  return float(np.mean(pred == y))
