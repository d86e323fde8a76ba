"""steps.rare_cond: lax.cond's values, run by run, and a real branch under
vmap (the rarely needed branch runs only when some run needs it)."""

import jax
import jax.numpy as jnp
import numpy as np

from bcl_jax.methods import steps


def _t(x, y):
  return 2.0 * x + y


def _f(x, y):
  return x - y


def _reference(pred, x, y):
  return np.where(np.asarray(pred)[:, None], 2.0 * x + y, x - y)


def test_values_are_lax_conds_run_by_run():
  x = np.arange(8.0, dtype=np.float32).reshape(4, 2)
  y = np.array([1.0, -1.0], np.float32)
  pred = np.array([True, False, True, False])
  f = jax.jit(jax.vmap(lambda p, x: steps.rare_cond(p, _t, _f, x, y)))
  np.testing.assert_array_equal(f(pred, x), _reference(pred, x, y))
  none = np.zeros(4, bool)
  np.testing.assert_array_equal(f(none, x), _reference(none, x, y))
  # A batch of one, and no vmap at all.
  np.testing.assert_array_equal(f(pred[:1], x[:1]), _reference(pred[:1],
                                                               x[:1], y))
  g = jax.jit(lambda p, x: steps.rare_cond(p, _t, _f, x, y))
  np.testing.assert_array_equal(g(False, x[1]), x[1] - y)
  np.testing.assert_array_equal(g(True, x[1]), 2 * x[1] + y)


def test_inside_scan_and_vmap():
  x = np.arange(6.0, dtype=np.float32).reshape(3, 2)
  y = np.ones(2, np.float32)
  preds = np.array([[True, False], [False, True], [False, False]])

  def run(c, ps):
    return jax.lax.scan(lambda c, p: (steps.rare_cond(p, _t, _f, c, y), None),
                        c, ps)[0]

  want = x.copy()
  for k in range(2):
    want = _reference(preds[:, k], want, y)
  np.testing.assert_array_equal(jax.jit(jax.vmap(run))(x, preds), want)


def _conds(jaxpr):
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "cond":
      out.append(eqn)
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else (v,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out.extend(_conds(inner))
  return out


def test_stays_a_branch_under_vmap():
  """A plain lax.cond under vmap becomes a select (no cond left); rare_cond
  keeps a cond, on an unbatched predicate for a batch of several runs and
  on the squeezed run for a batch of one."""
  y = jnp.ones(2)
  x = jnp.zeros((3, 2))
  pred = jnp.array([True, False, False])
  plain = jax.make_jaxpr(jax.vmap(
      lambda p, x: jax.lax.cond(p, _t, _f, x, y)))(pred, x)
  assert not _conds(plain.jaxpr)
  for n in (3, 1):
    rare = jax.make_jaxpr(jax.vmap(
        lambda p, x: steps.rare_cond(p, _t, _f, x, y)))(pred[:n], x[:n])
    conds = _conds(rare.jaxpr)
    assert conds and all(c.invars[0].aval.shape == () for c in conds)
