"""GEM's dual quadratic programme, solved inside the compiled step.

GEM (Lopez-Paz & Ranzato 2017) projects the current gradient ``g`` onto the
cone of directions that do not increase any past task's loss. With the past
gradients as the rows of ``M`` (``[K, P]``) the reference solves the dual

    min_v  1/2 v^T (M M^T + eps I) v + (M g)^T v    s.t.  v >= margin

with ``quadprog`` on the host and steps along ``g + M^T v``. Here the same
programme is solved in JAX by ``qpax`` (a primal-dual interior-point QP
solver written in JAX: ``lax.while_loop``, Cholesky solves), so the step stays
one compiled program with no host callback. Two things make float32 enough:

* scaling: ``v = margin + sigma * D w`` with ``D = diag(P)^(-1/2)``, so the
  programme qpax sees has a unit diagonal, a linear term of unit size and the
  plain bound ``w >= 0``;
* polishing: qpax stalls near a residual of ``sqrt(float32 eps)`` (it floors
  its slacks there), which is plenty to tell the active bounds; one linear
  solve on the free variables then gives the exact solution of that active
  set, kept when it satisfies the optimality conditions (else the
  interior-point point is kept).

Rows with ``active`` False (tasks not seen yet) are zeroed: their variable
decouples (``P_ii = eps``, no off-diagonal terms, no linear term) and
multiplies a zero row, so they change nothing, exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qpax

EPS = 1e-3  # the reference's ridge on the Gram matrix's diagonal


def solve_dual(gram: jax.Array, gdots: jax.Array, active: jax.Array,
               margin: jax.Array | float, eps: float = EPS,
               max_iter: int = 30) -> jax.Array:
  """The dual variables ``v`` of GEM's projection.

  Args:
    gram: ``[K, K]`` ``M M^T`` (rows of inactive tasks ignored).
    gdots: ``[K]`` ``M g``.
    active: ``[K]`` bool, the constraints that exist (past tasks).
    margin: lower bound on ``v`` (the reference's ``memory_strength``).
    eps: added to the Gram matrix's diagonal, as in the reference.
    max_iter: interior-point iterations at most.

  Returns:
    ``v [K]``, equal to ``margin`` on inactive rows.
  """
  k = gram.shape[0]
  act = active.astype(gram.dtype)
  p = 0.5 * (gram + gram.T) * act[:, None] * act[None, :]
  p = p + eps * jnp.eye(k, dtype=gram.dtype)
  q = gdots * act
  margin = jnp.asarray(margin, gram.dtype)
  # v = margin + sigma * d * w, w >= 0.
  d = jax.lax.rsqrt(jnp.diagonal(p))
  qq = d[:, None] * p * d[None, :]
  c = d * (p @ jnp.full((k,), margin) + q)
  sigma = jnp.maximum(jnp.max(jnp.abs(c)), 1e-30)
  c = c / sigma
  dt = gram.dtype
  # No equality constraints; -w <= 0.
  w, s, z = qpax.solve_qp(qq, c, jnp.zeros((0, k), dt), jnp.zeros((0,), dt),
                          -jnp.eye(k, dtype=dt), jnp.zeros((k,), dt),
                          solver_tol=1e-4, max_iter=max_iter)[:3]
  w = polish(qq, c, jnp.maximum(w, 0.0), s < z)
  return margin + sigma * d * w


def polish(q: jax.Array, c: jax.Array, w: jax.Array,
           at_bound: jax.Array, tol: float = 1e-5) -> jax.Array:
  """Exact minimiser of ``1/2 w'Qw + c'w`` with ``w[at_bound] = 0``.

  Returns it when it is optimal for ``w >= 0`` (free part >= 0, gradient on
  the bound >= 0, up to ``tol``), else ``w`` unchanged.
  """
  free = ~at_bound
  both = free[:, None] & free[None, :]
  q_free = jnp.where(both, q, jnp.eye(q.shape[0], dtype=q.dtype))
  w_new = jnp.linalg.solve(q_free, jnp.where(free, -c, 0.0))
  w_new = jnp.where(free, w_new, 0.0)
  grad = q @ w_new + c
  ok = (jnp.all(w_new >= -tol) & jnp.all(jnp.where(at_bound, grad, 0.0) >= -tol)
        & jnp.all(jnp.isfinite(w_new)))
  return jnp.where(ok, jnp.maximum(w_new, 0.0), w)


def project(g: jax.Array, rows: jax.Array, active: jax.Array,
            margin: jax.Array | float, eps: float = EPS) -> jax.Array:
  """GEM's projected gradient ``g + M^T v`` (flat vectors).

  Args:
    g: ``[P]`` the current gradient.
    rows: ``[K, P]`` the past tasks' gradients.
    active: ``[K]`` bool, rows that are constraints.
    margin: the dual bound (``memory_strength``).
    eps: the Gram matrix's ridge.
  """
  return project_with(g, rows, rows @ rows.T, rows @ g, active, margin, eps)


def project_with(g: jax.Array, rows: jax.Array, gram: jax.Array,
                 gdots: jax.Array, active: jax.Array,
                 margin: jax.Array | float, eps: float = EPS) -> jax.Array:
  """:func:`project` given ``gram = rows rows^T`` and ``gdots = rows g``.

  Inactive rows are masked in the small ``[K]``/``[K, K]`` quantities only,
  so ``rows`` (``[K, P]``, the big one) is read once and never copied.
  """
  v = solve_dual(gram, gdots, active, margin, eps)
  return g + jnp.where(active, v, 0.0) @ rows
