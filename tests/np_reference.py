"""Plain numpy versions of the methods' updates, written from the spec.

No jit, no scan, no autodiff: an MLP with hand-written backprop in float64
and the reference's memory bookkeeping as straight-line Python, so the
compiled methods can be checked against an independent computation. The only
shared piece is the random draw (``bcl_jax.memory.sample_without_replacement``,
tested on its own), so both sides see the same replay indices.
"""

from __future__ import annotations

import copy

import jax
import numpy as np

from bcl_jax.memory import sample_without_replacement


# ---------------------------------------------------------------- the MLP --
def from_flax(params) -> list[list[np.ndarray]]:
  n = len(params)
  return [[np.asarray(params[f"Dense_{i}"]["kernel"], np.float64),
           np.asarray(params[f"Dense_{i}"]["bias"], np.float64)]
          for i in range(n)]


def forward(P, x):
  hs = [np.asarray(x, np.float64).reshape(len(x), -1)]
  for i, (w, b) in enumerate(P):
    z = hs[-1] @ w + b
    hs.append(np.maximum(z, 0) if i < len(P) - 1 else z)
  return hs[-1], hs


def backward(P, hs, dz):
  grads = [None] * len(P)
  for i in range(len(P) - 1, -1, -1):
    grads[i] = [hs[i].T @ dz, dz.sum(0)]
    if i > 0:
      dz = (dz @ P[i][0].T) * (hs[i] > 0)
  return grads


def add(a, b):
  return [[x + y for x, y in zip(la, lb)] for la, lb in zip(a, b)]


def scale(a, s):
  return [[x * s for x in l] for l in a]


def zeros_like(P):
  return [[np.zeros_like(x) for x in l] for l in P]


def masked_softmax(z, cols):
  z = np.where(cols, z, -np.inf)
  z = z - z.max(-1, keepdims=True)
  e = np.where(cols, np.exp(z), 0.0)
  return e / e.sum(-1, keepdims=True)


def ce_grad(P, x, y, cols, valid):
  """Mean CE over valid rows (softmax over ``cols``) and its gradient."""
  valid = np.asarray(valid, bool)
  n = max(valid.sum(), 1)
  logits, hs = forward(P, x)
  p = masked_softmax(logits, cols)
  onehot = np.eye(logits.shape[1])[y]
  loss = -np.log(np.maximum((p * onehot).sum(-1), 1e-300))
  dz = (p - onehot) * valid[:, None] / n
  return float((loss * valid).sum() / n), backward(P, hs, dz)


def kl_grad(P, x, target, cols, valid, temp, kl_mean):
  """KL(target || softmax(z/T)) over ``cols``; ``kl_mean``: / (n * nc)."""
  valid = np.asarray(valid, bool)
  logits, hs = forward(P, x)
  q = masked_softmax(logits / temp, cols)
  denom = (cols.sum(-1) * valid).sum() if kl_mean else valid.sum()
  denom = max(denom, 1)
  pos = (target > 0) & cols
  term = np.where(pos, target * (np.log(np.where(pos, target, 1))
                                 - np.log(np.where(cols, q, 1))), 0)
  loss = (term.sum(-1) * valid).sum() / denom
  dz = (q - target) * cols / temp * valid[:, None] / denom
  return float(loss), backward(P, hs, dz)


# ------------------------------------------------------------ the buffers --
class Ring:
  """The reference's ring buffer, as it is written there."""

  def __init__(self, n_tasks, size, dim):
    self.x = np.zeros((n_tasks, size, dim))
    self.y = np.zeros((n_tasks, size), int)
    self.filled = np.zeros((n_tasks, size), bool)
    self.ptr = 0

  def write(self, t, xs, ys, drop_at_wrap, fill):
    size = self.y.shape[1]
    if len(xs) == 0:
      return
    if fill and not self.filled[t].any():
      self.x[t, :] = xs[0]
      self.y[t, :] = ys[0]
      self.filled[t, :] = True
    if drop_at_wrap:
      end = min(self.ptr + len(xs), size)
      eff = end - self.ptr
      self.x[t, self.ptr:end] = xs[:eff]
      self.y[t, self.ptr:end] = ys[:eff]
      self.filled[t, self.ptr:end] = True
      self.ptr = 0 if end >= size else end
    else:
      for i in range(len(xs)):
        self.x[t, self.ptr] = xs[i]
        self.y[t, self.ptr] = ys[i]
        self.filled[t, self.ptr] = True
        self.ptr = (self.ptr + 1) % size

  def draw(self, key, upto, k, n_draw=None):
    rows = np.arange(self.y.shape[0])[:, None] < upto
    index, mask = sample_without_replacement(key, self.filled & rows, k,
                                             n_draw)
    index, mask = np.asarray(index), np.asarray(mask)
    index = index[mask]
    size = self.y.shape[1]
    return index // size, index % size


# ----------------------------------------------------------- the methods --
def inner_grad(P, x, y, t, replay, class_mask, ms, temp, kl_mean):
  """Gradient of L_in = CE(batch) + CE(replay) + ms * KL(F || q)."""
  cols_t = np.broadcast_to(class_mask[t], (len(x), class_mask.shape[1]))
  loss, g = ce_grad(P, x, y, cols_t, np.ones(len(x), bool))
  if replay is not None and len(replay[0]):
    rx, ry, rt, rsoft = replay
    cols = class_mask[rt]
    l2, g2 = ce_grad(P, rx, ry, cols, np.ones(len(rx), bool))
    l3, g3 = kl_grad(P, rx, rsoft, cols, np.ones(len(rx), bool), temp,
                     kl_mean)
    loss += l2 + ms * l3
    g = add(add(g, g2), scale(g3, ms))
  return loss, g


def bcl_dual_memories(mem, gen, x, y, t, cfg):
  """Steps 2-3 of spec section 6; returns the training batch."""
  # Step 2: the generalisation memory takes the first sample; the evicted
  # one (if the slot was filled) rejoins the training batch.
  ptr = gen.ptr
  evict = gen.filled[t, ptr]
  ev_x, ev_y = gen.x[t, ptr].copy(), gen.y[t, ptr]
  gen.write(t, x[:1], y[:1], cfg["drop_at_wrap"], cfg["fill"])
  xs, ys = x[1:], y[1:]
  if evict:
    xs = np.concatenate([xs, ev_x[None]])
    ys = np.concatenate([ys, [ev_y]])
  # Step 3: episodic memory.
  mem.write(t, xs, ys, cfg["drop_at_wrap"], cfg["fill"])
  return xs, ys


def bcl_dual_sizes(mem, gen, t, cfg):
  n_tasks, n_mem = mem.y.shape
  n_val = gen.y.shape[1]
  return (min(n_mem, cfg["rbs"]), min(n_tasks * n_val, cfg["rbs"]),
          min((t + 1) * n_val, cfg["rbs"]))


def bcl_dual_meta(P, mem, gen, soft, xs, ys, t, keys, cfg, class_mask):
  """Inner loop from ``P``, then the outer loss at the adapted point.

  Returns ``(phi_K, summed inner gradients, L_out, dL_out/dphi_K)``.
  """
  k_rep, k_out, n_out = bcl_dual_sizes(mem, gen, t, cfg)
  acc = zeros_like(P)
  for i in range(cfg["inner_steps"]):
    rt, rs = mem.draw(keys[i], t, k_rep)
    replay = (mem.x[rt, rs], mem.y[rt, rs], rt, soft[rt, rs])
    _, g = inner_grad(P, xs, ys, t, replay, class_mask, cfg["ms"],
                      cfg["temp"], cfg["kl_mean"])
    acc = add(acc, g) if cfg["accumulate"] else g
    P = add(P, scale(acc, -cfg["lr"]))
  gt, gs = gen.draw(keys[-1], t + 1, k_out, n_out)
  l_out, g_out = ce_grad(P, gen.x[gt, gs], gen.y[gt, gs], class_mask[gt],
                         np.ones(len(gt), bool))
  return P, acc, l_out, g_out


def bcl_dual_observe(P, mem, gen, soft, x, y, t, key, cfg, class_mask):
  """One ``observe`` of spec section 6; returns the new parameters."""
  xs, ys = bcl_dual_memories(mem, gen, x, y, t, cfg)
  for km in jax.random.split(key, cfg["n_meta"]):
    keys = jax.random.split(km, cfg["inner_steps"] + 1)
    theta0 = copy.deepcopy(P)
    P, acc, _, g_out = bcl_dual_meta(P, mem, gen, soft, xs, ys, t, keys, cfg,
                                     class_mask)
    step = add(acc, g_out) if cfg["accumulate"] else g_out
    P = add(P, scale(step, -cfg["lr"]))
    P = add(theta0, scale(add(P, scale(theta0, -1)), cfg["beta"]))
  return P


def bcl_single_observe(P, mem, soft, x, y, t, key, cfg, class_mask):
  mem.write(t, x, y, cfg["drop_at_wrap"], False)
  k_rep = min(mem.y.shape[1], cfg["rbs"])
  theta0 = copy.deepcopy(P)
  for k in jax.random.split(key, cfg["inner_steps"]):
    rt, rs = mem.draw(k, t, k_rep)
    replay = (mem.x[rt, rs], mem.y[rt, rs], rt, soft[rt, rs])
    _, g = inner_grad(P, x, y, t, replay, class_mask, cfg["ms"], cfg["temp"],
                      cfg["kl_mean"])
    P = add(P, scale(g, -cfg["lr"]))
  return add(theta0, scale(add(P, scale(theta0, -1)), cfg["beta"]))


def er_observe(P, mem, x, y, t, key, cfg, class_mask):
  mem.write(t, x, y, cfg["drop_at_wrap"], False)
  k_rep = min(mem.y.shape[1], cfg["rbs"])
  cols_t = np.broadcast_to(class_mask[t], (len(x), class_mask.shape[1]))
  for k in jax.random.split(key, cfg["inner_steps"]):
    _, g = ce_grad(P, x, y, cols_t, np.ones(len(x), bool))
    rt, rs = mem.draw(k, t, k_rep)
    if len(rt):
      _, g2 = ce_grad(P, mem.x[rt, rs], mem.y[rt, rs], class_mask[rt],
                      np.ones(len(rt), bool))
      g = add(g, g2)
    P = add(P, scale(g, -cfg["lr"]))
  return P


def single_observe(P, x, y, t, cfg, class_mask):
  cols_t = np.broadcast_to(class_mask[t], (len(x), class_mask.shape[1]))
  _, g = ce_grad(P, x, y, cols_t, np.ones(len(x), bool))
  return add(P, scale(g, -cfg["lr"]))


def soft_targets(P, xs, cols, temp):
  logits, _ = forward(P, xs)
  return masked_softmax(logits / temp, np.broadcast_to(cols, logits.shape))


def adapt(P, xs, ys, lr, steps):
  """Test-time adaptation: full-batch SGD, CE over all logits."""
  cols = np.ones((len(xs), P[-1][1].shape[0]), bool)
  for _ in range(steps):
    _, g = ce_grad(P, xs, ys, cols, np.ones(len(xs), bool))
    P = add(P, scale(g, -lr))
  return P
