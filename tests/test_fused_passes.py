"""bcl_dual's fused passes (issue 11): on a network with BatchNorm the inner
passes (batch + replay as two BatchNorm groups of one forward pass) and the
outer pass run as one scan through a few network instances of fixed row
counts. They compute what the separate passes compute (up to float
summation order), step by step, across task switches, with and without the
reference's gradient accumulation, on task 0's batch-only instance too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcl_jax import methods
from bcl_jax.methods import api, bcl_dual
from bcl_jax.models import from_flax
from bcl_jax.models.resnet import BatchNorm
import flax.linen as nn

from helpers import batch as make_batch
from method_helpers import make_config

T, O, D, BATCH = 3, 6, 12, 5


class _BNNet(nn.Module):
  """Dense -> masked BatchNorm -> ReLU, twice, then Dense: the layers whose
  statistics the fused passes group. (The reduced ResNet-18's group
  BatchNorm is checked in tests/test_resnet.py; on a few rows of tiny
  images its updates are too ill-conditioned for a tight comparison: float
  rounding alone, XLA's optimisation level, moves them by percents.)"""

  @nn.compact
  def __call__(self, x, train=False, mask=None):
    for _ in range(2):
      x = nn.relu(BatchNorm()(nn.Dense(16)(x), train, mask))
    return nn.Dense(O)(x)


def _ctx():
  mask = np.zeros((T, O), bool)
  for t in range(T):
    mask[t, 2 * t:2 * t + 2] = True
  return api.Context(model=from_flax(_BNNet(), (D,), "bn_mlp"),
                     class_mask=mask, input_shape=(D,),
                     input_dtype=np.float32)


def _close(a, b, what, tol=2e-5):
  """Leaves of ``a`` and ``b`` agree to ``tol`` of the tree's largest."""
  scale = max(float(np.abs(v).max()) for v in jax.tree_util.tree_leaves(b))
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(
        np.asarray(x) / scale, np.asarray(y) / scale, rtol=0, atol=tol,
        err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("accumulate", [True, False])
def test_fused_passes_match_separate_passes(monkeypatch, accumulate):
  ctx = _ctx()
  c = make_config(method="bcl_dual", inner_steps=2, n_meta=1,
                  grad_accumulation=accumulate)
  method = methods.make(c, ctx)
  # 8 episodic + 2 generalisation slots, replay 5: the inner passes hold
  # 5 + 5 rows, the outer draw at most 5, so the instances are 5 and 10
  # rows and task 0's inner passes run through the 5-row one.
  n_b, m_in = BATCH, BATCH + 5
  assert bcl_dual.plan_pass_buckets(ctx, 2, 5, n_b, m_in, 2) == (5, 10)

  def jitted(fused):
    monkeypatch.setattr(bcl_dual, "FUSED_PASSES", fused)
    # Traced now, under this setting (a new function: jax.jit caches traces
    # by the function it wraps).
    return jax.jit(lambda *a: method.observe(*a)).lower(*example).compile()

  key = jax.random.PRNGKey(3)
  state = method.init(key)
  rng = np.random.default_rng(0)
  d = D
  example = (state, make_batch(np.zeros((BATCH, d), np.float32),
                               np.zeros(BATCH, np.int32),
                               np.ones(BATCH, bool), 0), key)
  fused, separate = jitted(1), jitted(0)
  begin = jax.jit(method.begin_task)
  seen_loss = []
  for t in range(T):
    state = begin(state, jnp.int32(t), None)
    cols = np.nonzero(ctx.class_mask[t])[0]
    for b in range(4):
      # Each task's inputs on their own scale, so the batch's and the
      # replay's BatchNorm statistics differ.
      x = (rng.random((BATCH, d)) * (1 + 2 * t)).astype(np.float32)
      y = rng.choice(cols, BATCH).astype(np.int32)
      valid = np.arange(BATCH) < (BATCH if b < 3 else 3)
      k = jax.random.fold_in(key, 100 * t + b)
      batch = make_batch(x, y, valid, t)
      sf, mf = fused(state, batch, k)
      ss, ms = separate(state, batch, k)
      what = f"task {t} batch {b}"
      np.testing.assert_allclose(mf["loss"], ms["loss"], rtol=1e-4,
                                 err_msg=what)
      # What the step changed (parameters and running statistics).
      change = lambda s_: jax.tree_util.tree_map(  # noqa: E731
          jnp.subtract, s_.variables, state.variables)
      # Float rounding moves an update by ~1e-6 of its size, except where
      # BatchNorm over the batch's few rows makes it ill-conditioned (one
      # step here, without accumulation, is 40x the others and moves by
      # 3e-4); swapping the batch's and the replay's groups, or any other
      # change of the maths, moves it by percents.
      _close(change(sf)["params"], change(ss)["params"], what, tol=1e-3)
      _close(change(sf)["batch_stats"], change(ss)["batch_stats"], what)
      for a, b_ in zip((sf.memory, sf.gen), (ss.memory, ss.gen)):
        for u, v in zip(a, b_):
          np.testing.assert_array_equal(u, v)
      seen_loss.append(float(ms["loss"]))
      state = ss
  # The steps did move the parameters (the comparison is not vacuous).
  assert len(set(seen_loss)) > 1
  first = method.init(key).variables["params"]
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                 state.variables["params"], first)
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-3


def test_pass_buckets_cover_every_need():
  """The planned instances on CPU: split CIFAR's use=500 needs (17 tasks of
  50 steps; outer draws of 13 (t + 1) rows up to 128; inner passes of 10
  rows on task 0 and 62 after) get 13 (task 0), 62 and 128; a longer run
  gets more, always with one holding the inner passes' 62 rows."""
  mask = np.ones((17, 100), bool)
  def ctx(n):
    return api.Context(_ctx().model, mask, (3072,), np.float32, (n,) * 17)
  assert bcl_dual.plan_pass_buckets(ctx(50), 13, 128, 10, 62, 2) == (
      13, 62, 128)
  long = bcl_dual.plan_pass_buckets(ctx(250), 13, 128, 10, 62, 2)
  assert 62 in long and long[-1] == 128 and len(long) > 2
  # Unknown lengths: powers of two from 64 up to the draw, then m_in.
  short = api.Context(ctx(1).model, mask[:2], (3072,), np.float32)
  assert bcl_dual.plan_pass_buckets(short, 13, 128, 10, 62, 2) == (26, 62)
