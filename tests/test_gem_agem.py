"""GEM and A-GEM against plain numpy (tests/np_reference_gem.py).

The QP solved in JAX (qpax, scaled and polished) is checked against
``quadprog``, the reference's solver, on random and degenerate instances;
each method's ``observe`` is fed the short 3-task sequence of
tests/test_methods.py (task switches, ring buffers that wrap, a short last
batch) next to the numpy step, parameters and memories compared after every
step.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcl_jax import methods
from bcl_jax.methods import agem, gem, qp

import np_reference as ref
import np_reference_gem as refg
from data_helpers import _check_results, _config
from method_helpers import (D, T, assert_params_close, assert_ring_equal,
                          make_config, make_ctx, run_sequence)

K_MAX, P_DIM = 6, 40


def _instance(rng, kind):
  """``(rows [k, P], g [P])`` of one kind of QP instance."""
  k = int(rng.integers(2, K_MAX + 1))
  rows = rng.normal(size=(k, P_DIM)) * rng.uniform(0.05, 5.0)
  g = rng.normal(size=P_DIM) * rng.uniform(0.05, 5.0)
  if kind == "duplicate":
    rows[1] = rows[0]
  elif kind == "zero_row":
    rows[0] = 0.0
  elif kind == "zero_g":
    g[:] = 0.0
  elif kind == "near_singular":
    rows[-1] = rows[0] + 1e-5 * rng.normal(size=P_DIM)
  elif kind == "feasible":  # every dot product positive already
    g = rows.sum(0) + 0.1 * rows[0]
    rows = np.abs(rows)
    g = np.abs(g)
  elif kind == "parallel":  # rank one: every row a multiple of one vector
    rows = rng.uniform(0.5, 2.0, size=(k, 1)) * rows[:1]
  return rows, g


def _padded(rng, rows):
  """Rows padded to ``K_MAX`` with garbage in rows the mask switches off."""
  k = len(rows)
  full = rng.normal(size=(K_MAX, P_DIM)) * 10
  full[:k] = rows
  return full, np.arange(K_MAX) < k


KINDS = ["random", "duplicate", "zero_row", "zero_g", "near_singular",
         "feasible", "parallel"]


@pytest.mark.parametrize("margin", [0.0, 0.5, 3.0])
@pytest.mark.parametrize("kind", KINDS)
def test_qp_matches_quadprog(kind, margin):
  rng = np.random.default_rng(KINDS.index(kind) * 10 + int(margin * 2))
  project = jax.jit(qp.project)
  for _ in range(6):
    rows, g = _instance(rng, kind)
    want = refg.gem_project(rows, g, margin)
    full, active = _padded(rng, rows)
    got = np.asarray(project(jnp.float32(g), jnp.float32(full),
                             jnp.asarray(active), margin))
    scale = max(np.abs(want).max(), 1e-6)
    np.testing.assert_allclose(got / scale, want / scale, atol=3e-5,
                               err_msg=kind)
    # The dual's optimality: M x = lambda - eps v with lambda >= 0, so no
    # past gradient's dot product with the step is below -eps v (0 but for
    # the ridge).
    v = refg.gem_dual(rows, g, margin)
    tol = 1e-4 * scale * np.linalg.norm(rows, axis=1).max() * np.sqrt(P_DIM)
    assert np.all(rows @ got + 1e-3 * v >= -tol), kind


@pytest.mark.parametrize("kind", ["random", "zero_row", "feasible"])
def test_qp_dual_variables_match_quadprog(kind):
  """Well-conditioned instances: the dual variables themselves agree, and
  masked rows sit at the margin."""
  rng = np.random.default_rng(7)
  for _ in range(6):
    rows, g = _instance(rng, kind)
    want = refg.gem_dual(rows, g, 0.5)
    full, active = _padded(rng, rows)
    m = np.where(active[:, None], full, 0.0)
    got = np.asarray(jax.jit(qp.solve_dual)(
        jnp.float32(m @ m.T), jnp.float32(m @ g), jnp.asarray(active), 0.5))
    np.testing.assert_allclose(got[:len(rows)], want, rtol=1e-3,
                               atol=1e-4 * max(1.0, np.abs(want).max()))
    np.testing.assert_array_equal(got[len(rows):], 0.5)


def test_qp_ignores_masked_rows_whatever_they_hold():
  rng = np.random.default_rng(3)
  rows, g = _instance(rng, "random")
  project = jax.jit(qp.project)
  outs = []
  for seed in (0, 1):
    full, active = _padded(np.random.default_rng(seed), rows)
    outs.append(np.asarray(project(jnp.float32(g), jnp.float32(full),
                                   jnp.asarray(active), 0.5)))
  np.testing.assert_array_equal(outs[0], outs[1])


def test_agem_projection_by_hand():
  p = jax.jit(agem.project)
  # conflict: g.g_ref = -2, |g_ref|^2 = 2 -> g + (1, 1) = (-2, 2), which is
  # orthogonal to g_ref.
  np.testing.assert_allclose(p(jnp.array([-3.0, 1.0]), jnp.array([1.0, 1.0])),
                             [-2.0, 2.0], rtol=1e-6)
  # conflict along an axis: the component against g_ref is removed.
  np.testing.assert_allclose(p(jnp.array([1.0, -1.0]), jnp.array([0.0, 2.0])),
                             [1.0, 0.0], rtol=1e-6)
  # no conflict (positive, then zero dot product): unchanged.
  np.testing.assert_array_equal(p(jnp.array([2.0, -1.0]),
                                  jnp.array([1.0, 1.0])), [2.0, -1.0])
  np.testing.assert_array_equal(p(jnp.array([1.0, 0.0]),
                                  jnp.array([0.0, 0.0])), [1.0, 0.0])


def test_windows_cover_every_past():
  assert gem.windows(1) == (0,)
  assert gem.windows(2) == (0, 1)
  assert gem.windows(10) == (0, 1, 2, 3, 4, 6, 8, 9)
  assert gem.windows(17) == (0, 1, 2, 3, 4, 6, 8, 12, 16)
  for n in range(2, 40):
    w = gem.windows(n)
    assert w[0] == 0 and w[-1] == n - 1 and list(w) == sorted(set(w))
    for t in range(1, n):  # the window of task t holds its t past tasks
      win = min(s for s in w if s >= t)
      assert win <= max(t + t // 2, 2)  # at most 1.5x (and 2 for t = 1)


def test_fold_stats_is_the_sequential_ema():
  old = {"mean": jnp.array([1.0, -2.0])}
  batch_means = np.array([[3.0, 0.0], [5.0, 1.0], [-1.0, 4.0]])
  m = gem.BN_MOMENTUM
  news = {"mean": jnp.asarray((1 - m) * np.asarray(old["mean"])
                              + m * batch_means)}
  updated = jnp.array([True, False, True])
  want = np.asarray(old["mean"])
  for k in (0, 2):
    want = (1 - m) * want + m * batch_means[k]
  got = gem.fold_stats(old, news, updated)["mean"]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  cur = (1 - m) * np.asarray(old["mean"]) + m * np.array([7.0, 7.0])
  np.testing.assert_allclose(
      gem.chain_after({"mean": got}, old, {"mean": jnp.asarray(cur)})["mean"],
      (1 - m) * want + m * 7.0, rtol=1e-6)


def _projections_against_numpy(c, ctx, np_observe):
  """Runs the method of config ``c`` and ``np_observe(P, mem, x, y, t, k)``
  (the numpy reference, returning ``(P, projected)``) over the 3-task stream,
  comparing memories and parameters after every step; returns whether each
  numpy step projected."""
  method = methods.make(c, ctx)
  npst = {"mem": ref.Ring(T, 6, D), "projected": []}

  def np_step(s, x, y, t, k):
    s["P"], proj = np_observe(s["P"], s["mem"], x, y, t, k)
    s["projected"].append(proj)

  def check(state, s, what):
    assert_ring_equal(state.memory, s["mem"], what + " M")
    assert_params_close(state, s["P"], what)

  run_sequence(method, c, ctx, np_step, lambda s, t: None, npst, check)
  return npst["projected"]


@pytest.mark.parametrize("heads", ["task", "single"])
@pytest.mark.parametrize("margin", [0.5, 0.0])
@pytest.mark.parametrize("factored", [True, False])
def test_gem_matches_numpy(heads, margin, factored):
  """Both GEM paths: the MLP's factored first-layer dot products
  (``Model.first_dense``) and the general one every network can take."""
  c = make_config(method="gem", n_memories=6, memory_strength=margin)
  ctx = make_ctx(task_incremental=heads == "task")
  assert ctx.model.first_dense is not None
  if not factored:
    ctx = dataclasses.replace(ctx, model=ctx.model._replace(first_dense=None))
  cfg = {"lr": c.lr, "ms": c.memory_strength, "drop_at_wrap": c.drop_at_wrap}
  projected = _projections_against_numpy(
      c, ctx, lambda P, mem, x, y, t, k: refg.gem_observe(
          P, mem, x, y, t, cfg, ctx.class_mask))
  assert any(projected), "the sequence never exercised the QP"


@pytest.mark.parametrize("heads", ["task", "single"])
def test_agem_matches_numpy(heads):
  c = make_config(method="agem", n_memories=6, replay_batch_size=7)
  ctx = make_ctx(task_incremental=heads == "task")
  cfg = {"lr": c.lr, "rbs": c.replay_batch_size,
         "drop_at_wrap": c.drop_at_wrap}
  projected = _projections_against_numpy(
      c, ctx, lambda P, mem, x, y, t, k: refg.agem_observe(
          P, mem, x, y, t, k, cfg, ctx.class_mask))
  assert any(projected), "the sequence never exercised the projection"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gem", "agem"])
def test_tiny_split_cifar_resnet_with_batchnorm(name, cifar_data, tmp_path):
  """End to end on the reduced ResNet-18 (BatchNorm): a 2-task run whose
  accuracy matrix and metrics are finite and in range."""
  from bcl_jax import experiment
  config = _config("cifar", data_path=str(cifar_data), method=name)
  res = experiment.run(config, str(tmp_path / "wd"))
  _check_results(res, 2)
