"""Gradients taken inside a branch instead of through it (issue 11: the
branch not taken wrote zeros for every residual of the other).

* steps.first_rows: the smallest bucket holding the real rows is computed,
  and its gradient, taken inside each bucket's branch (bcl_dual's outer
  step), equals that bucket's gradient computed directly, the full rows'
  (padding masked) and the gradient taken through the switch.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcl_jax.methods import steps
from bcl_jax.models.resnet import BatchNorm

import flax.linen as nn


class _Net(nn.Module):
  """Dense -> masked BatchNorm -> ReLU -> Dense: BatchNorm makes the padding
  rows matter unless masked, as in the image networks."""

  @nn.compact
  def __call__(self, x, mask):
    h = nn.Dense(6)(x)
    h = nn.relu(BatchNorm()(h, True, mask))
    return nn.Dense(3)(h)


BUCKETS = (4, 8, 12)


def _setup():
  net = _Net()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 12))
  v = net.init(jax.random.PRNGKey(0), x, jnp.ones(12, bool))

  def on_rows(b, params, stats, mask):
    logits, new = net.apply({"params": params, "batch_stats": stats}, x[:b],
                            mask[:b], mutable=["batch_stats"])
    ce = -jax.nn.log_softmax(logits)[jnp.arange(b), y[:b]]
    loss = jnp.sum(jnp.where(mask[:b], ce, 0.0)) / jnp.sum(mask[:b])
    return loss, new["batch_stats"]

  return v, on_rows


@pytest.mark.parametrize("n", [1, 4, 5, 8, 11, 12])
def test_gradient_inside_branches(n):
  v, on_rows = _setup()
  mask = jnp.arange(12) < n
  bucket = min(b for b in BUCKETS if b >= n)
  grad_fn = jax.value_and_grad(on_rows, 1, has_aux=True)

  (loss, stats), g = jax.jit(lambda p, s, m: steps.first_rows(
      jnp.sum(m), BUCKETS, grad_fn, p, s, m))(v["params"], v["batch_stats"],
                                              mask)
  # The chosen bucket directly, and the full 12 rows (padding masked): the
  # rows beyond the bucket are padding, so all three agree.
  (loss_b, stats_b), g_b = grad_fn(bucket, v["params"], v["batch_stats"], mask)
  (loss_f, _), g_f = grad_fn(12, v["params"], v["batch_stats"], mask)
  # Through the switch (what bcl_dual's unrolled meta-gradient still does).
  (loss_t, _), g_t = jax.jit(jax.value_and_grad(
      lambda p, s, m: steps.first_rows(jnp.sum(m), BUCKETS, on_rows, p, s, m),
      has_aux=True))(v["params"], v["batch_stats"], mask)

  for other in (loss_b, loss_f, loss_t):
    np.testing.assert_allclose(loss, other, rtol=1e-6)
  for other in (g_b, g_f, g_t):
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        g, other)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), stats,
      stats_b)
  # The gradient is not trivially zero (with one real row BatchNorm's output,
  # and so the first layer's gradient, is zero; the last layer's is not).
  assert float(jnp.abs(g["Dense_1"]["bias"]).max()) > 1e-4
  if n > 1:
    assert float(jnp.abs(g["Dense_0"]["kernel"]).max()) > 1e-4


def test_row_buckets():
  assert steps.row_buckets(128) == (64, 128)
  assert steps.row_buckets(221) == (64, 128, 221)
  assert steps.row_buckets(40) == (40,)
  assert steps.row_buckets(64) == (64,)



def test_plan_row_buckets_minimises_the_modelled_time():
  # Split CIFAR's outer draw: 13 more real rows per task, at most 128.
  needs = [min(13 * (t + 1), 128) for t in range(17)]
  # 50 steps: a row in one phase costs 50 x 0.6 ms = 0.03 s, a bucket 5 s.
  # {65, 128}: (5 x 65 + 12 x 128) x 0.03 + 10 = 65.83 s; {128}: 2176 x
  # 0.03 + 5 = 70.28; {52, 128}: 1872 x 0.03 + 10 = 66.16; {78, 128}:
  # 1876 x 0.03 + 10 = 66.28; the best three, {39, 91, 128}: 1761 x 0.03
  # + 15 = 67.83.
  assert steps.plan_row_buckets(128, needs, [50] * 17, 0.6e-3, 5.0) == (
      65, 128)
  # 2 steps: rows are cheap, one compile is not -> one bucket.
  assert steps.plan_row_buckets(128, needs, [2] * 17, 0.6e-3, 5.0) == (128,)
  # 250 steps (0.15 s a row-phase): every other need.
  assert steps.plan_row_buckets(128, needs, [250] * 17, 0.6e-3, 5.0) == (
      26, 52, 78, 104, 128)
  # Free compilation: every distinct need.
  assert steps.plan_row_buckets(128, needs, [250] * 17, 0.6e-3, 0.0) == (
      13, 26, 39, 52, 65, 78, 91, 104, 117, 128)
  # One need: one bucket, whatever it costs.
  assert steps.plan_row_buckets(40, [40] * 5, [1000] * 5, 1.0, 0.0) == (40,)


def test_plan_row_buckets_is_the_brute_force_optimum():
  rng = np.random.default_rng(0)
  for _ in range(30):
    k = int(rng.integers(8, 60))
    n = int(rng.integers(1, 9))
    needs = [int(v) for v in rng.integers(1, k + 1, n)]
    needs[-1] = k
    st = [int(v) for v in rng.integers(1, 300, n)]
    row_s, comp_s = float(rng.uniform(1e-4, 1e-2)), float(rng.uniform(0, 3))

    def cost(bs):
      return sum(min(b for b in bs if b >= m) * s * row_s
                 for m, s in zip(needs, st)) + len(bs) * comp_s

    cands = sorted(set(needs))
    best = min(cost(set(sub) | {k}) for r in range(len(cands) + 1)
               for sub in itertools.combinations(cands, r))
    got = steps.plan_row_buckets(k, needs, st, row_s, comp_s)
    assert k in got and np.isclose(cost(set(got)), best)


def test_bcl_dual_plans_its_outer_buckets_from_the_run_length():
  from bcl_jax.methods import api, bcl_dual
  from bcl_jax.models import build_model
  mask = np.zeros((17, 85), bool)
  for t in range(17):
    mask[t, 5 * t:5 * t + 5] = True
  model = build_model("mlp", (3072,), 85, hidden=(4,))
  ctx = lambda n: api.Context(model, mask, (3072,), np.uint8,  # noqa: E731
                              steps_per_task=(n,) * 17)
  assert bcl_dual.plan_outer_buckets(ctx(50), 13, 128) == (65, 128)
  assert bcl_dual.plan_outer_buckets(ctx(250), 13, 128) == (
      26, 52, 78, 104, 128)
  # Unknown lengths: the powers of two.
  assert bcl_dual.plan_outer_buckets(api.Context(model, mask, (3072,),
                                                 np.uint8), 13,
                                     128) == (64, 128)
