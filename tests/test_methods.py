"""Compiled methods against the plain numpy versions of tests/np_reference.py.

A short continual sequence (3 tasks, a few batches each, buffers small enough
to wrap, a short last batch) is fed to the jitted ``observe`` and to the
numpy loop with the same keys; parameters and memories must agree after every
step, across task switches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcl_jax import methods
from bcl_jax.methods import api
from bcl_jax.models import build_model

import np_reference as ref
from helpers import batch as make_batch

from method_helpers import (BATCH, D, O, T, assert_params_close,  # noqa: F401
                            assert_ring_equal, make_config, make_ctx,
                            np_cfg, run_sequence, stream)


@pytest.mark.parametrize("kw", [
    dict(inner_steps=1, n_meta=2),
    dict(inner_steps=2, n_meta=1),
    dict(inner_steps=2, n_meta=1, grad_accumulation=False),
    dict(inner_steps=2, n_meta=1, fill_on_first_write=False),
    dict(inner_steps=2, n_meta=1, kl_mean=False),
    dict(inner_steps=2, n_meta=1, drop_at_wrap=False),
], ids=["k1", "k2", "no_accum", "no_fill", "no_klmean", "no_drop"])
def test_bcl_dual_matches_numpy(kw):
  c = make_config(method="bcl_dual", **kw)
  ctx = make_ctx()
  method = methods.make(c, ctx)
  cfg = np_cfg(c)
  npst = {"mem": ref.Ring(T, 8, D), "gen": ref.Ring(T, 2, D),
          "soft": np.zeros((T, 8, O))}

  def np_begin(s, t):
    if t > 0:
      s["soft"][t - 1] = ref.soft_targets(s["P"], s["mem"].x[t - 1],
                                          ctx.class_mask[t - 1], c.temperature)
    s["mem"].ptr = s["gen"].ptr = 0

  def np_step(s, x, y, t, k):
    s["P"] = ref.bcl_dual_observe(s["P"], s["mem"], s["gen"], s["soft"], x, y,
                                  t, k, cfg, ctx.class_mask)

  def check(state, s, what):
    assert_ring_equal(state.memory, s["mem"], what + " M")
    assert_ring_equal(state.gen, s["gen"], what + " G")
    np.testing.assert_allclose(np.asarray(state.soft), s["soft"], rtol=2e-4,
                               atol=1e-6, err_msg=what + " F")
    assert_params_close(state, s["P"], what)

  run_sequence(method, c, ctx, np_step, np_begin, npst, check)


@pytest.mark.parametrize("kw", [dict(inner_steps=1), dict(inner_steps=2),
                                dict(inner_steps=2, kl_mean=False,
                                     drop_at_wrap=False)],
                         ids=["k1", "k2", "quirks_off"])
def test_bcl_single_matches_numpy(kw):
  c = make_config(method="bcl_single", n_memories=6, **kw)
  ctx = make_ctx()
  method = methods.make(c, ctx)
  cfg = np_cfg(c)
  npst = {"mem": ref.Ring(T, 6, D), "soft": np.zeros((T, 6, O))}

  def np_begin(s, t):
    if t > 0:
      s["soft"][t - 1] = ref.soft_targets(s["P"], s["mem"].x[t - 1],
                                          ctx.class_mask[t - 1], c.temperature)
    s["mem"].ptr = 0

  def np_step(s, x, y, t, k):
    s["P"] = ref.bcl_single_observe(s["P"], s["mem"], s["soft"], x, y, t, k,
                                    cfg, ctx.class_mask)

  def check(state, s, what):
    assert_ring_equal(state.memory, s["mem"], what + " M")
    assert_params_close(state, s["P"], what)

  run_sequence(method, c, ctx, np_step, np_begin, npst, check)


@pytest.mark.parametrize("heads", ["task", "single"])
def test_er_matches_numpy(heads):
  c = make_config(method="er", n_memories=6, inner_steps=2)
  ctx = make_ctx(task_incremental=heads == "task")
  method = methods.make(c, ctx)
  cfg = np_cfg(c)
  npst = {"mem": ref.Ring(T, 6, D)}

  def np_step(s, x, y, t, k):  # the ring pointer is not reset (reference)
    s["P"] = ref.er_observe(s["P"], s["mem"], x, y, t, k, cfg, ctx.class_mask)

  def check(state, s, what):
    assert_ring_equal(state.memory, s["mem"], what + " M")
    assert_params_close(state, s["P"], what)

  run_sequence(method, c, ctx, np_step, lambda s, t: None, npst, check)


def test_single_matches_numpy():
  c = make_config(method="single")
  ctx = make_ctx()
  method = methods.make(c, ctx)
  cfg = np_cfg(c)

  def np_step(s, x, y, t, k):
    s["P"] = ref.single_observe(s["P"], x, y, t, cfg, ctx.class_mask)

  run_sequence(method, c, ctx, np_step, lambda s, t: None, {},
               lambda st, s, w: assert_params_close(st, s["P"], w))


def test_adaptation_matches_loop():
  """Each task's adapted copy = the same SGD steps written as a loop."""
  c = make_config(method="bcl_dual", adapt=True, inner_steps=2)
  ctx = make_ctx()
  method = methods.make(c, ctx)
  state = method.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  mx = rng.random(state.memory.x.shape).astype(np.float32)
  my = rng.integers(0, O, state.memory.y.shape).astype(np.int32)
  state = state._replace(memory=state.memory._replace(
      x=jnp.asarray(mx), y=jnp.asarray(my),
      filled=jnp.ones(state.memory.filled.shape, bool)))
  seen = 1
  variables = jax.jit(method.prepare_eval)(state, jnp.int32(seen))
  P0 = ref.from_flax(jax.device_get(state.variables["params"]))
  for t in range(T):
    expect = ref.adapt(P0, mx[t], my[t], c.adapt_lr, c.inner_steps) \
        if t <= seen else P0
    got = ref.from_flax(jax.tree_util.tree_map(
        lambda a: np.asarray(a)[t], variables["params"]))
    for lg, le in zip(got, expect):
      for a, b in zip(lg, le):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  # Unseen tasks really are unadapted, seen ones really moved.
  assert not np.allclose(got[0][0], P0[0][0]) or seen < T - 1


def test_unrolled_hypergradient_matches_finite_differences():
  """The method's unrolled meta-gradient = central differences of
  ``L_out(phi_K(theta0))`` computed by the numpy reference (float64).

  With ``beta = 1``, ``n_meta = 1`` and no gradient accumulation, one
  ``observe`` gives ``theta' = phi_K - lr * g``, so ``g = (phi_K - theta')/lr``
  reads the hypergradient back out of the update. Task 1 with filled
  memories, so the inner loss has replay and distillation terms.
  """
  c = make_config(method="bcl_dual", inner_steps=2, n_meta=1, beta=1.0,
                  lr=0.5, grad_accumulation=False, meta_gradient="unrolled")
  ctx = make_ctx()
  method = methods.make(c, ctx)
  cfg = np_cfg(c)
  t = 1
  rng = np.random.default_rng(0)
  mem, gen = ref.Ring(T, 8, D), ref.Ring(T, 2, D)
  mem.x[0] = rng.random((8, D))
  mem.y[0] = rng.choice([0, 1], 8)
  mem.filled[0] = True
  gen.x[0] = rng.random((2, D))
  gen.y[0] = [0, 1]
  gen.filled[0] = True
  soft = np.zeros((T, 8, O))
  soft[0, :, :2] = rng.dirichlet([1, 1], 8)
  x, y, valid = stream(ctx)[1][0]
  key = jax.random.PRNGKey(7)
  with jax.enable_x64(True):
    state = method.init(jax.random.PRNGKey(0))
    f64 = lambda a: jnp.asarray(a, jnp.float64)
    state = state._replace(
        variables=jax.tree_util.tree_map(f64, state.variables),
        memory=state.memory._replace(x=f64(mem.x), y=jnp.asarray(mem.y),
                                     filled=jnp.asarray(mem.filled)),
        gen=state.gen._replace(x=f64(gen.x), y=jnp.asarray(gen.y),
                               filled=jnp.asarray(gen.filled)),
        soft=f64(soft))
    theta0 = ref.from_flax(jax.device_get(state.variables["params"]))
    new, _ = jax.jit(method.observe)(state, make_batch(f64(x), y, valid, t),
                                     key)
    new_p = ref.from_flax(jax.device_get(new.variables["params"]))
  xs, ys = ref.bcl_dual_memories(mem, gen, x[valid], y[valid], t, cfg)
  keys = jax.random.split(jax.random.split(key, 1)[0], c.inner_steps + 1)

  def outer(P):
    return ref.bcl_dual_meta(P, mem, gen, soft, xs, ys, t, keys, cfg,
                             ctx.class_mask)

  phi, _, _, g_first_order = outer(theta0)
  eps = 1e-6
  checked = 0
  for layer in range(len(theta0)):
    for part in range(2):
      shape = theta0[layer][part].shape
      for flat in rng.choice(int(np.prod(shape)), 3, replace=False):
        idx = np.unravel_index(flat, shape)
        plus, minus = ref.copy.deepcopy(theta0), ref.copy.deepcopy(theta0)
        plus[layer][part][idx] += eps
        minus[layer][part][idx] -= eps
        fd = (outer(plus)[2] - outer(minus)[2]) / (2 * eps)
        got = (phi[layer][part][idx] - new_p[layer][part][idx]) / c.lr
        np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-8,
                                   err_msg=f"layer {layer} part {part} {idx}")
        checked += 1
  assert checked == 18
  # The second-order terms matter: the first-order gradient is different.
  diff = np.abs(g_first_order[0][0] - (phi[0][0] - new_p[0][0]) / c.lr).max()
  assert diff > 1e-6


def test_unrolled_observe_differs_from_first_order_and_is_finite():
  ctx = make_ctx()
  outs = {}
  for mg in ("first_order", "unrolled"):
    c = make_config(method="bcl_dual", inner_steps=2, n_meta=1,
                    meta_gradient=mg)
    method = methods.make(c, ctx)
    state = method.init(jax.random.PRNGKey(0))
    x, y, valid = stream(ctx)[0][0]
    batch = make_batch(x, y, valid, 0)
    for b in range(3):
      state, m = jax.jit(method.observe)(state, batch,
                                         jax.random.PRNGKey(b))
    assert np.isfinite(float(m["loss"]))
    outs[mg] = np.asarray(state.variables["params"]["Dense_0"]["kernel"])
  assert not np.allclose(outs["first_order"], outs["unrolled"])


def test_unknown_method_and_adapt_without_memory():
  ctx = make_ctx()
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    methods.make(make_config(method="nope"), ctx)
  # ``adapt`` needs an episodic memory: single does not declare it.
  with pytest.raises(ValueError, match="adapt is not a hyper-parameter of "
                     "method 'single'"):
    methods.make(make_config(method="single", adapt=True), ctx)
  with pytest.raises(ValueError, match="meta_gradient"):
    methods.make(make_config(method="bcl_dual", meta_gradient="exact"), ctx)


def test_bcl_dual_memories_slot_by_slot():
  """A hand-made sequence; labels double as sample ids.

  n_memories = 5 -> n_val = 1 generalisation slot, n_mem = 4 episodic slots.
  Task 0, batch [1,2,3]: G[0] <- 1 (first write fills the row); training
  batch [2,3]; M[0] filled with 2 then 2,3 written: [2,3,2,2], ptr 2.
  Task 0, batch [4,5,6]: 1 is evicted from G and rejoins: training batch
  [5,6,1]; G[0] = [4]; 5,6 fill slots 2,3 and 1 does not fit (drop_at_wrap):
  M[0] = [2,3,5,6], ptr back to 0.
  Task 1, batch [7,8,9]: pointers reset; G[1] = [7] (nothing to evict);
  M[1] = [8,9,8,8], ptr 2. Task 0's rows are untouched.
  """
  mask = np.ones((2, 10), bool)
  ctx = api.Context(model=build_model("mlp", (1,), 10, hidden=(3,)),
                    class_mask=mask, input_shape=(1,),
                    input_dtype=np.float32)
  c = make_config(method="bcl_dual", n_memories=5, replay_batch_size=4)
  method = methods.make(c, ctx)
  state = method.init(jax.random.PRNGKey(0))
  observe, begin = jax.jit(method.observe), jax.jit(method.begin_task)

  def feed(state, t, ids):
    x = jnp.asarray(ids, jnp.float32)[:, None]
    batch = make_batch(x, jnp.asarray(ids, jnp.int32), jnp.ones(3, bool), t)
    return observe(state, batch, jax.random.PRNGKey(sum(ids)))[0]

  def rows(buf):
    y = np.asarray(buf.y).tolist()
    x = np.asarray(buf.x)[..., 0].astype(int).tolist()
    assert x == y  # inputs moved together with their labels
    return [[v if f else None for v, f in zip(r, fr)]
            for r, fr in zip(y, np.asarray(buf.filled).tolist())]

  state = begin(state, jnp.int32(0), None)
  state = feed(state, 0, [1, 2, 3])
  assert rows(state.gen) == [[1], [None]]
  assert rows(state.memory) == [[2, 3, 2, 2], [None] * 4]
  assert int(state.memory.ptr) == 2
  state = feed(state, 0, [4, 5, 6])
  assert rows(state.gen) == [[4], [None]]
  assert rows(state.memory) == [[2, 3, 5, 6], [None] * 4]
  assert int(state.memory.ptr) == 0
  state = begin(state, jnp.int32(1), None)
  state = feed(state, 1, [7, 8, 9])
  assert rows(state.gen) == [[4], [7]]
  assert rows(state.memory) == [[2, 3, 5, 6], [8, 9, 8, 8]]
  assert int(state.memory.ptr) == 2 and int(state.gen.ptr) == 0
  # Soft targets for task 0 were made at the switch: rows sum to 1.
  np.testing.assert_allclose(np.asarray(state.soft)[0].sum(-1), 1, rtol=1e-5)
  assert not np.asarray(state.soft)[1].any()
