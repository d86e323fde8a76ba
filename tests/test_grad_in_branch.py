"""Gradients taken inside a branch instead of through it (issue 11: the
branch not taken wrote zeros for every residual of the other).

* steps.first_rows: the smallest bucket holding the real rows is computed,
  and its gradient, taken inside each bucket's branch (bcl_dual's outer
  step), equals that bucket's gradient computed directly, the full rows'
  (padding masked) and the gradient taken through the switch.
"""

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

