"""Plain numpy EWC and LwF, written from the reference's ``model/ewc.py`` and
the standard online LwF, on the float64 MLP of ``np_reference``.

EWC here keeps what the reference keeps: per-task dictionaries of Fishers and
anchors (no running sum), the first ``n_memories`` samples as a growing
array, the Fisher taken at the first batch of the next task.
"""

from __future__ import annotations

import numpy as np

import np_reference as ref


def fisher(P, xs, ys, cols):
  """Squared gradient of the mean CE on ``(xs, ys)`` (one batch)."""
  b = np.broadcast_to(cols, (len(xs), len(cols)))
  _, g = ref.ce_grad(P, xs, ys, b, np.ones(len(xs), bool))
  return [[x * x for x in layer] for layer in g]


class EWC:
  """``model/ewc.py``'s bookkeeping; ``online``: Schwarz et al.'s variant
  (one Fisher ``gamma * F + F_k``, the latest parameters as anchor)."""

  def __init__(self, P, n_memories, lr, strength, class_mask, online=False,
               gamma=1.0):
    self.P, self.n, self.lr, self.ms = P, n_memories, lr, strength
    self.class_mask, self.online, self.gamma = class_mask, online, gamma
    self.current = 0
    self.fisher, self.optpar = {}, {}
    self.memx = self.memy = None

  def switch(self, t):
    """The reference's ``if t != self.current_task`` block."""
    f = fisher(self.P, self.memx, self.memy, self.class_mask[self.current])
    theta = [[x.copy() for x in layer] for layer in self.P]
    if self.online:
      old = self.fisher.get(0)
      self.fisher = {0: f if old is None else
                     ref.add(ref.scale(old, self.gamma), f)}
      self.optpar = {0: theta}
    else:
      self.fisher[self.current] = f
      self.optpar[self.current] = theta
    self.current = t
    self.memx = self.memy = None

  def penalty(self, P):
    """``(value, gradient)`` of ``sum_k sum F_k (theta - theta_k)^2``."""
    value, grad = 0.0, ref.zeros_like(P)
    for k in self.fisher:
      d = ref.add(P, ref.scale(self.optpar[k], -1.0))
      value += sum(float((f * x * x).sum()) for lf, ld in
                   zip(self.fisher[k], d) for f, x in zip(lf, ld))
      grad = ref.add(grad, [[2 * f * x for f, x in zip(lf, ld)]
                            for lf, ld in zip(self.fisher[k], d)])
    return value, grad

  def observe(self, x, y, t):
    """One batch (valid rows only); returns the loss."""
    if t != self.current:
      self.switch(t)
    if self.memx is None:
      self.memx, self.memy = x[:self.n].copy(), y[:self.n].copy()
    elif len(self.memx) < self.n:
      self.memx = np.concatenate([self.memx, x])[:self.n]
      self.memy = np.concatenate([self.memy, y])[:self.n]
    cols = np.broadcast_to(self.class_mask[t],
                           (len(x), self.class_mask.shape[1]))
    ce, g = ref.ce_grad(self.P, x, y, cols, np.ones(len(x), bool))
    pv, pg = self.penalty(self.P)
    self.P = ref.add(self.P, ref.scale(ref.add(g, ref.scale(pg, self.ms)),
                                       -self.lr))
    return ce + self.ms * pv


class LwF:
  """Online LwF: the parameters at each task switch distilled on the batch
  over the columns of the tasks before it."""

  def __init__(self, P, lr, strength, temp, class_mask):
    self.P, self.lr, self.ms, self.temp = P, lr, strength, temp
    self.class_mask = class_mask
    self.current, self.old = 0, None

  def observe(self, x, y, t):
    if t != self.current:
      self.old = [[w.copy() for w in layer] for layer in self.P]
      self.current = t
    ones = np.ones(len(x), bool)
    cols = np.broadcast_to(self.class_mask[t],
                           (len(x), self.class_mask.shape[1]))
    loss, g = ref.ce_grad(self.P, x, y, cols, ones)
    if t > 0:
      old_cols = self.class_mask[:t].any(0)
      target = ref.soft_targets(self.old, x, old_cols, self.temp)
      kl, gk = ref.kl_grad(self.P, x, target,
                           np.broadcast_to(old_cols, target.shape), ones,
                           self.temp, kl_mean=False)
      loss += self.ms * kl
      g = ref.add(g, ref.scale(gk, self.ms))
    self.P = ref.add(self.P, ref.scale(g, -self.lr))
    return loss
