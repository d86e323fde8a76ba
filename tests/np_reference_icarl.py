"""iCaRL in plain numpy (float64), written from the method's description.

Exemplars are kept as Python lists per class in herding order (no flat
buffer, no masks), herding is a straight greedy loop, and the gradient is the
hand-written MLP backprop of ``np_reference``. The only shared piece is the
uniform draw ``jax.random.uniform(key, [S])`` that picks each class's
distillation exemplar, so both sides use the same rows.
"""

from __future__ import annotations

import jax
import numpy as np

import np_reference as ref


def classes(class_mask):
  """``[(task, column), ...]`` in class-id order (row-major over the mask)."""
  return [tuple(map(int, tc)) for tc in np.argwhere(np.asarray(class_mask))]


def features(P, x):
  """The MLP's last hidden layer (the input of its last linear layer)."""
  _, hs = ref.forward(P, x)
  return hs[-2]


def normalize(f):
  n = np.sqrt((f ** 2).sum(-1, keepdims=True))
  return f / np.maximum(n, 1e-12)


def herding(feats, m):
  """Greedy herding order (row indices into ``feats``) of length
  ``min(m, len(feats))``; ties go to the lowest row."""
  mu = feats.mean(0)
  total = np.zeros(feats.shape[1])
  order = []
  for k in range(min(m, len(feats))):
    best, best_cost = None, np.inf
    for i in range(len(feats)):
      if i in order:
        continue
      cost = ((mu - (total + feats[i]) / (k + 1)) ** 2).sum()
      if cost < best_cost:
        best, best_cost = i, cost
    order.append(best)
    total = total + feats[best]
  return order


class Exemplars:
  """Per-class exemplar lists and their stored logits."""

  def __init__(self, class_mask, n_memories):
    self.class_mask = np.asarray(class_mask, bool)
    self.classes = classes(class_mask)
    self.n_memories = n_memories
    self.x = {}       # class id -> [m, D] in herding order
    self.logits = {}  # class id -> [m, O]

  def end_task(self, P, task, x, y):
    """Shrinks the old sets, herds the task's classes, refreshes logits."""
    n_seen = sum(1 for t, _ in self.classes if t <= task)
    m = self.n_memories // n_seen
    for s in self.x:
      self.x[s] = self.x[s][:m]
    for s, (t, c) in enumerate(self.classes):
      if t != task:
        continue
      rows = x[y == c]
      if not len(rows):  # a class without training rows keeps nothing
        continue
      order = herding(normalize(features(P, rows)), m)
      self.x[s] = rows[order]
    for s in self.x:
      self.logits[s] = ref.forward(P, self.x[s])[0]

  def draw(self, key, task):
    """One exemplar per class of tasks before ``task``: ``(x, stored,
    cols)``."""
    u = np.asarray(jax.random.uniform(key, (len(self.classes),)))
    xs, st, cols = [], [], []
    for s, (t, _) in enumerate(self.classes):
      n = len(self.x.get(s, []))
      if t >= task or n == 0:
        continue
      r = min(int(np.floor(np.float32(u[s]) * np.float32(n))), n - 1)
      xs.append(self.x[s][r])
      st.append(self.logits[s][r])
      cols.append(self.class_mask[t])
    return np.array(xs), np.array(st), np.array(cols)

  def nme_scores(self, P, x, task):
    """``-||phi(x) - mu_c||`` per column of ``task``; None elsewhere."""
    f = normalize(features(P, x))
    out = np.full((len(x), self.class_mask.shape[1]), np.nan)
    for s, (t, c) in enumerate(self.classes):
      if t == task and len(self.x.get(s, [])):
        mu = normalize(normalize(features(P, self.x[s])).mean(0)[None])[0]
        out[:, c] = -np.sqrt(((f - mu) ** 2).sum(-1))
    return out


def observe(P, ex: Exemplars, x, y, t, key, lr, ms):
  """One SGD step on CE(batch) + ms * sum_rows KL(stored || net) / n_c."""
  _, g = ref.ce_grad(P, x, y, ex.class_mask[t], np.ones(len(x), bool))
  dx, stored, cols = ex.draw(key, t)
  if len(dx):
    logits, hs = ref.forward(P, dx)
    p = ref.masked_softmax(stored, cols)
    q = ref.masked_softmax(logits, cols)
    dz = ms * (q - p) * cols / cols.sum(-1, keepdims=True)
    g = ref.add(g, ref.backward(P, hs, dz))
  return ref.add(P, ref.scale(g, -lr))
