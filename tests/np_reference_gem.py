"""Plain numpy GEM and A-GEM steps, written from the reference and the paper.

Float64 throughout, the MLP and ring buffer of ``np_reference``; GEM's QP is
solved by ``quadprog`` exactly as the reference's ``project2cone2`` does.
"""

from __future__ import annotations

import numpy as np
import quadprog

import np_reference as ref


def flat(grads) -> np.ndarray:
  return np.concatenate([a.ravel() for layer in grads for a in layer])


def unflat(v, like):
  out, i = [], 0
  for layer in like:
    row = []
    for a in layer:
      row.append(v[i:i + a.size].reshape(a.shape))
      i += a.size
    out.append(row)
  return out


def gem_dual(rows: np.ndarray, g: np.ndarray, margin: float,
             eps: float = 1e-3) -> np.ndarray:
  """The reference's ``project2cone2``: v of min 1/2 v'Pv + (Mg)'v, v >= m."""
  p = rows @ rows.T
  p = 0.5 * (p + p.T) + np.eye(len(rows)) * eps
  return quadprog.solve_qp(p, -(rows @ g), np.eye(len(rows)),
                           np.zeros(len(rows)) + margin)[0]


def gem_project(rows, g, margin, eps=1e-3):
  return gem_dual(rows, g, margin, eps) @ rows + g


def gem_observe(P, mem, x, y, t, cfg, class_mask):
  """One reference GEM step (memories written first, pointer kept)."""
  mem.write(t, x, y, cfg["drop_at_wrap"], False)
  rows = []
  for k in range(t):
    f = mem.filled[k]
    _, gk = ref.ce_grad(P, mem.x[k][f], mem.y[k][f],
                        np.broadcast_to(class_mask[k], (f.sum(), len(
                            class_mask[k]))), np.ones(f.sum(), bool))
    rows.append(flat(gk))
  cols = np.broadcast_to(class_mask[t], (len(x), class_mask.shape[1]))
  _, g = ref.ce_grad(P, x, y, cols, np.ones(len(x), bool))
  g = flat(g)
  projected = False
  if rows:
    rows = np.stack(rows)
    if (rows @ g < 0).any():
      g = gem_project(rows, g, cfg["ms"])
      projected = True
  return ref.add(P, ref.scale(unflat(g, P), -cfg["lr"])), projected


def agem_project(g: np.ndarray, g_ref: np.ndarray) -> np.ndarray:
  d = g @ g_ref
  return g - d / (g_ref @ g_ref) * g_ref if d < 0 else g


def agem_observe(P, mem, x, y, t, key, cfg, class_mask):
  """One A-GEM step; the replay draw shares ``memory.draw``'s indices."""
  mem.write(t, x, y, cfg["drop_at_wrap"], False)
  cols = np.broadcast_to(class_mask[t], (len(x), class_mask.shape[1]))
  _, g = ref.ce_grad(P, x, y, cols, np.ones(len(x), bool))
  g = flat(g)
  projected = False
  if t > 0:
    k = min(cfg["rbs"], mem.y.size)
    rt, rs = mem.draw(key, t, k)
    _, gr = ref.ce_grad(P, mem.x[rt, rs], mem.y[rt, rs], class_mask[rt],
                        np.ones(len(rt), bool))
    gr = flat(gr)
    projected = bool(g @ gr < 0)
    g = agem_project(g, gr)
  return ref.add(P, ref.scale(unflat(g, P), -cfg["lr"])), projected
