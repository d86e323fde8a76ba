"""``ewc`` and ``lwf`` against the plain numpy versions of
tests/np_reference_ewc_lwf.py.

The short 3-task sequence of test_methods (a short last batch per task) goes
through the jitted hooks and ``observe`` and through the numpy loop;
parameters and losses must agree after every step, across task switches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcl_jax import methods
from bcl_jax.methods import ewc, lwf

import np_reference as ref
import np_reference_ewc_lwf as npr
from helpers import batch as make_batch
from method_helpers import (T, assert_params_close, make_config,
                          make_ctx, stream)


def _np(tree) -> list:
  return ref.from_flax(jax.device_get(tree))


def _run(method, ctx, np_model, check):
  """Feeds the stream to both sides; ``check(state, t, b)`` after each step."""
  key = jax.random.PRNGKey(3)
  state = method.init(key)
  np_model.P = _np(state.variables["params"])
  begin, observe = jax.jit(method.begin_task), jax.jit(method.observe)
  for t, batches in enumerate(stream(ctx)):
    state = begin(state, jnp.int32(t), None)
    for b, (x, y, valid) in enumerate(batches):
      state, m = observe(state, make_batch(x, y, valid, t),
                         jax.random.fold_in(key, 100 * t + b))
      loss = np_model.observe(x[valid], y[valid], t)
      what = f"task {t} batch {b}"
      assert_params_close(state, np_model.P, what)
      np.testing.assert_allclose(float(m["loss"]), loss, rtol=1e-4,
                                 err_msg=what)
      check(state, t, b)
  return state


# ------------------------------------------------------------------ ewc --
@pytest.mark.parametrize("task_incremental", [True, False])
@pytest.mark.parametrize("kw", [
    dict(n_memories=7),                      # cut inside the second batch
    dict(n_memories=40),                     # more slots than a task has
    dict(n_memories=7, ewc_online=True, ewc_gamma=0.5),
], ids=["first7", "all", "online"])
def test_ewc_matches_numpy(kw, task_incremental):
  c = make_config(method="ewc", memory_strength=50.0, **kw)
  ctx = make_ctx(task_incremental)
  method = methods.make(c, ctx)
  np_model = npr.EWC(None, c.n_memories, c.lr, c.memory_strength,
                     ctx.class_mask, online=c.ewc_online, gamma=c.ewc_gamma)

  def check(state, t, b):
    n = int(state.kept.count)
    assert n == len(np_model.memx)
    np.testing.assert_allclose(np.asarray(state.kept.x)[:n], np_model.memx)
    np.testing.assert_array_equal(np.asarray(state.kept.y)[:n],
                                  np_model.memy)
    if b == 0:  # the Fisher the numpy side took at this switch
      want = ref.zeros_like(np_model.P)
      for k in np_model.fisher:
        want = ref.add(want, np_model.fisher[k])
      for lg, lw in zip(_np(state.fisher), want):
        for a, w in zip(lg, lw):
          np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-9)

  state = _run(method, ctx, np_model, check)
  assert len(np_model.fisher) == (1 if c.ewc_online else T - 1)


def test_ewc_fisher_is_squared_gradient_on_first_samples():
  """At task 1's start: F = (grad of the mean CE on task 0's first 7
  samples, its own columns)^2, anchor = the parameters, const = 0."""
  c = make_config(method="ewc", n_memories=7)
  ctx = make_ctx(True)
  method = methods.make(c, ctx)
  state = method.init(jax.random.PRNGKey(0))
  observe = jax.jit(method.observe)
  task0 = stream(ctx)[0]
  for b, (x, y, valid) in enumerate(task0):
    state, _ = observe(state, make_batch(x, y, valid, 0),
                       jax.random.PRNGKey(b))
  P = _np(state.variables["params"])
  xs = np.concatenate([task0[0][0], task0[1][0][:2]])
  ys = np.concatenate([task0[0][1], task0[1][1][:2]])
  # By hand: the mean CE gradient on those 7 rows, columns 0-1 only.
  logits, hs = ref.forward(P, xs)
  z = np.where(ctx.class_mask[0], logits, -np.inf)
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  dz = (p - np.eye(logits.shape[1])[ys]) / len(xs)
  want = [[g * g for g in layer] for layer in ref.backward(P, hs, dz)]
  after = jax.jit(method.begin_task)(state, jnp.int32(1), None)
  for lg, lw in zip(_np(after.fisher), want):
    for a, w in zip(lg, lw):
      np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-10)
  # The anchor is a Fisher-weighted mean: it is the parameters wherever the
  # Fisher is not zero (elsewhere nothing is penalised; it stays 0).
  for la, lp, lw in zip(_np(after.anchor), P, want):
    for a, p_, w in zip(la, lp, lw):
      np.testing.assert_array_equal(a, np.where(w > 0, p_, 0.0))
  assert float(after.const) == 0.0 and int(after.kept.count) == 0
  assert np.abs(want[0][0]).max() > 0  # the check is not vacuous


def test_ewc_running_sum_is_the_sum_of_per_task_penalties():
  """A(theta - m)^2 + c equals sum_k F_k (theta - theta_k)^2, value and
  gradient, with zero Fisher entries and tiny ones."""
  rng = np.random.default_rng(0)
  shape = {"w": (3, 4), "b": (4,)}
  tree = lambda f: {k: f(s) for k, s in shape.items()}
  fs = [tree(lambda s: rng.random(s) * (rng.random(s) > 0.3) * 10.0 ** -k)
        for k in range(4)]
  thetas = [tree(lambda s: rng.normal(size=s)) for _ in range(4)]
  theta = tree(lambda s: rng.normal(size=s))
  a = m = tree(np.zeros)
  c = 0.0
  for f, th in zip(fs, thetas):
    a, m, c = ewc.consolidate(a, m, jnp.float32(c), f, th)

  def per_task(p):
    return sum(jnp.sum(f[k] * (p[k] - th[k]) ** 2)
               for f, th in zip(fs, thetas) for k in shape)

  f32 = lambda t: jax.tree_util.tree_map(lambda v: jnp.asarray(v,
                                                               jnp.float32), t)
  got, got_g = jax.value_and_grad(ewc.penalty)(f32(theta), a, m, c)
  want, want_g = jax.value_and_grad(per_task)(f32(theta))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for k in shape:
    np.testing.assert_allclose(got_g[k], want_g[k], rtol=1e-5, atol=1e-7)


def test_ewc_online_fisher_decays():
  """Online EWC: A = gamma * F_0 + F_1 at task 2, anchor = the parameters at
  task 2's start."""
  c = make_config(method="ewc", n_memories=7, ewc_online=True, ewc_gamma=0.25)
  ctx = make_ctx(False)
  method = methods.make(c, ctx)
  state = method.init(jax.random.PRNGKey(1))
  begin, observe = jax.jit(method.begin_task), jax.jit(method.observe)
  taken = []
  for t, batches in enumerate(stream(ctx)):
    if t > 0:
      P = _np(state.variables["params"])
      anchor = P
      taken.append(npr.fisher(P, np.asarray(state.kept.x)[:7],
                              np.asarray(state.kept.y)[:7],
                              ctx.class_mask[t - 1]))
    state = begin(state, jnp.int32(t), None)
    for b, (x, y, valid) in enumerate(batches):
      state, _ = observe(state, make_batch(x, y, valid, t),
                         jax.random.PRNGKey(b))
  want = ref.add(ref.scale(taken[0], 0.25), taken[1])
  # state is after task 2's batches; the Fisher was set at task 2's start.
  for lg, lw in zip(_np(state.fisher), want):
    for a, w in zip(lg, lw):
      np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-10)
  for la, lp in zip(_np(state.anchor), anchor):  # unchanged by observe
    for a, p_ in zip(la, lp):
      np.testing.assert_array_equal(a, p_)


def test_ewc_gamma_out_of_range_is_one_clear_error():
  with pytest.raises(ValueError, match=r"ewc_gamma must be in \[0, 1\], "
                     r"got 1.5"):
    methods.hparams_of(make_config(method="ewc", ewc_gamma=1.5))


# ------------------------------------------------------------------ lwf --
@pytest.mark.parametrize("task_incremental", [True, False])
def test_lwf_matches_numpy(task_incremental):
  c = make_config(method="lwf", memory_strength=2.0, temperature=3.0)
  ctx = make_ctx(task_incremental)
  method = methods.make(c, ctx)
  np_model = npr.LwF(None, c.lr, c.memory_strength, c.temperature,
                     ctx.class_mask)

  def check(state, t, b):
    if t > 0:  # the old model is the numpy side's snapshot, exactly
      for lg, lw in zip(_np(state.old), np_model.old):
        for a, w in zip(lg, lw):
          np.testing.assert_allclose(a, w, rtol=2e-4, atol=2e-5)

  _run(method, ctx, np_model, check)


def test_lwf_snapshot_at_switch_only():
  """begin_task(t > 0) copies the parameters; task 0 and observe keep it."""
  c = make_config(method="lwf")
  ctx = make_ctx(True)
  method = methods.make(c, ctx)
  s0 = method.init(jax.random.PRNGKey(0))
  x, y, valid = stream(ctx)[0][0]
  s1, _ = jax.jit(method.observe)(s0, make_batch(x, y, valid, 0),
                                  jax.random.PRNGKey(1))
  same = lambda a, b: all(np.array_equal(u, v) for u, v in zip(
      jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
  assert same(s1.old, s0.variables["params"])
  assert not same(s1.variables["params"], s0.variables["params"])
  assert same(method.begin_task(s1, jnp.int32(0), None).old, s1.old)
  assert same(method.begin_task(s1, jnp.int32(1), None).old,
              s1.variables["params"])


def test_lwf_old_columns():
  mask = np.zeros((3, 6), bool)
  for t in range(3):
    mask[t, 2 * t:2 * t + 2] = True
  cols = [np.asarray(lwf.old_columns(jnp.asarray(mask), t)) for t in range(3)]
  np.testing.assert_array_equal(cols[0], np.zeros(6, bool))
  np.testing.assert_array_equal(cols[1], [1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(cols[2], [1, 1, 1, 1, 0, 0])


# ------------------------------------------- reduced ResNet-18, BatchNorm --
@pytest.mark.slow
@pytest.mark.parametrize("name", ["ewc", "lwf"])
def test_tiny_split_cifar_resnet(name, cifar_data):
  """End to end on 2 tiny split-CIFAR tasks (task-incremental heads,
  BatchNorm): finite accuracies, a non-zero finite Fisher / a snapshot."""
  from bcl_jax import train
  from bcl_jax.data import load_benchmark
  from data_helpers import _config
  config = _config("cifar", data_path=str(cifar_data), method=name)
  out = train.train_and_evaluate(config, load_benchmark(config),
                                 log=lambda *_: None)
  assert out["setup"].ctx.model.name == "resnet18_reduced"
  assert out["accuracy"].shape == (1, 2, 2)
  assert np.all(np.isfinite(out["accuracy"]))
  state = out["state"]
  leaves = jax.tree_util.tree_leaves(
      state.fisher if name == "ewc" else state.old)
  assert all(np.all(np.isfinite(np.asarray(v))) for v in leaves)
  if name == "ewc":
    assert sum(float(np.sum(v)) for v in leaves) > 0
    assert np.isfinite(float(state.const[0]))
  else:
    now = jax.tree_util.tree_leaves(state.variables["params"])
    assert any(not np.array_equal(a, b) for a, b in zip(leaves, now))
