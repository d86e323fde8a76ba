"""Shared pieces of the method tests: a tiny 3-task stream, configs, and
comparisons against the numpy references (tests/np_reference*.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bcl_jax.config import default_config, resolve
from bcl_jax.methods import api
from bcl_jax.models import build_model

import np_reference as ref
from helpers import batch as make_batch

T, O, D = 3, 6, 8
BATCH = 5


def make_ctx(task_incremental=True):
  mask = np.zeros((T, O), bool)
  if task_incremental:
    for t in range(T):
      mask[t, 2 * t:2 * t + 2] = True
  else:
    mask[:] = True
  model = build_model("mlp", (D,), O, hidden=(7, 5))
  return api.Context(model=model, class_mask=mask, input_shape=(D,),
                     input_dtype=np.float32)


def make_config(**kw):
  """A resolved config; shared values apply to the methods declaring them."""
  c = default_config()
  c.presets.all = dict(
      n_memories=10,     # bcl_dual: 8 episodic + 2 generalisation slots
      replay_batch_size=5, lr=0.1, beta=0.3, memory_strength=2.0,
      temperature=3.0, adapt_lr=0.05)
  for k, v in kw.items():
    c[k] = v
  return resolve(c)


def stream(ctx, n_batches=4, seed=0):
  """Batches per task: full ones and a short (masked) last one."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(T):
    cols = np.nonzero(ctx.class_mask[t])[0]
    batches = []
    for b in range(n_batches):
      x = rng.random((BATCH, D)).astype(np.float32)
      y = rng.choice(cols, BATCH).astype(np.int32)
      n_valid = BATCH if b < n_batches - 1 else 3
      valid = np.arange(BATCH) < n_valid
      batches.append((x, y, valid))
    out.append(batches)
  return out


def np_cfg(c):
  return {"lr": c.lr, "beta": c.beta, "ms": c.memory_strength,
          "temp": c.temperature, "rbs": c.replay_batch_size,
          "inner_steps": c.inner_steps, "n_meta": c.n_meta,
          "accumulate": c.grad_accumulation, "fill": c.fill_on_first_write,
          "drop_at_wrap": c.drop_at_wrap, "kl_mean": c.kl_mean}


def assert_params_close(state, P, what):
  got = ref.from_flax(jax.device_get(state.variables["params"]))
  for i, (lg, lr_) in enumerate(zip(got, P)):
    for a, b in zip(lg, lr_):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5,
                                 err_msg=f"{what}: layer {i}")


def assert_ring_equal(buf, ring, what):
  np.testing.assert_array_equal(np.asarray(buf.filled), ring.filled,
                                err_msg=f"{what}: filled")
  f = ring.filled
  np.testing.assert_allclose(np.asarray(buf.x)[f], ring.x[f], rtol=1e-6,
                             err_msg=f"{what}: x")
  np.testing.assert_array_equal(np.asarray(buf.y)[f], ring.y[f],
                                err_msg=f"{what}: y")
  assert int(buf.ptr) == ring.ptr, f"{what}: ptr {int(buf.ptr)} != {ring.ptr}"


def run_sequence(method, c, ctx, np_step, np_begin, np_state, check):
  key = jax.random.PRNGKey(3)
  state = method.init(key)
  np_state["P"] = ref.from_flax(jax.device_get(state.variables["params"]))
  observe = jax.jit(method.observe)
  begin = jax.jit(method.begin_task)
  for t, batches in enumerate(stream(ctx)):
    state = begin(state, jnp.int32(t), None)
    np_begin(np_state, t)
    for b, (x, y, valid) in enumerate(batches):
      k = jax.random.fold_in(key, 100 * t + b)
      state, m = observe(state, make_batch(x, y, valid, t), k)
      assert np.isfinite(float(m["loss"]))
      np_step(np_state, x[valid], y[valid], t, k)
      check(state, np_state, f"task {t} batch {b}")
  return state
