"""steps.cond_or_skip: lax.cond's values, with the skip branch built from the
run branch's shapes, and the run branch traced once (not again by
jax.eval_shape): the start-up cost it exists to save."""

import jax
import jax.numpy as jnp
import numpy as np

from bcl_jax.methods import steps


def _zeros_like_out(shapes, x):
  return x, jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                   shapes[1])


def test_values_match_a_plain_cond():
  def run(x):
    return x + 1.0, {"loss": jnp.sum(x), "n": jnp.int32(3)}

  f = jax.jit(lambda p, x: steps.cond_or_skip(p, run, _zeros_like_out, x))
  x = np.array([1.0, 2.0], np.float32)
  out, m = f(True, x)
  np.testing.assert_array_equal(out, x + 1.0)
  assert float(m["loss"]) == 3.0 and int(m["n"]) == 3
  out, m = f(False, x)
  np.testing.assert_array_equal(out, x)
  assert float(m["loss"]) == 0.0 and int(m["n"]) == 0
  assert m["n"].dtype == jnp.int32


def test_run_is_traced_once():
  calls = []

  def run(x):
    calls.append(1)
    return x * 2.0, x[0]

  jax.jit(lambda p, x: steps.cond_or_skip(p, run, _zeros_like_out, x)).trace(
      True, jnp.ones(3))
  assert len(calls) == 1


def test_skip_first_falls_back_to_eval_shape(monkeypatch):
  # Should lax.cond trace the skip branch first, the shapes still come.
  real_cond = jax.lax.cond

  def skip_first(pred, t, f, *ops):
    jax.eval_shape(f, *ops)
    return real_cond(pred, t, f, *ops)

  monkeypatch.setattr(jax.lax, "cond", skip_first)
  f = jax.jit(lambda p, x: steps.cond_or_skip(
      p, lambda x: (x, x.sum()), _zeros_like_out, x))
  _, s = f(False, jnp.ones(3))
  assert float(s) == 0.0


def test_inside_scan_under_grad():
  # The training loop's use: a skipped step inside scan, differentiated.
  def loss(w, preds):
    def body(c, p):
      return steps.cond_or_skip(
          p, lambda c: (c * w, c.sum()), _zeros_like_out, c)
    c, ys = jax.lax.scan(body, jnp.ones(2), preds)
    return c.sum() + ys.sum()

  preds = jnp.array([True, False, True])
  g = jax.grad(loss)(3.0, preds)
  # Each entry of c: 1 -> w -> w (skipped) -> w^2; each y is the sum of c
  # before its step: ys = [2, 0, 2w]. loss = 2w^2 + 2 + 2w, d/dw = 4w + 2.
  assert float(g) == 4 * 3.0 + 2.0
