"""Ring buffers and sampling on hand-written cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcl_jax import memory as mem


def write(buf, task, xs, valid=None, **kw):
  xs = np.asarray(xs, np.float32)
  valid = np.ones(len(xs), bool) if valid is None else np.asarray(valid)
  return mem.ring_write(buf, jnp.int32(task), jnp.asarray(xs[:, None]),
                        jnp.asarray(xs.astype(np.int32)), jnp.asarray(valid),
                        **kw)


def row(buf, task):
  return [int(v) if f else None for v, f in
          zip(np.asarray(buf.y[task]), np.asarray(buf.filled[task]))]


def test_drop_at_wrap_loses_the_tail_of_the_batch():
  buf = mem.ring_init(2, 5, (1,), jnp.float32)
  buf = write(buf, 0, [1, 2, 3])
  assert row(buf, 0) == [1, 2, 3, None, None] and int(buf.ptr) == 3
  buf = write(buf, 0, [4, 5, 6])       # only 4, 5 fit; 6 is not stored
  assert row(buf, 0) == [1, 2, 3, 4, 5] and int(buf.ptr) == 0
  buf = write(buf, 0, [7, 8, 9])
  assert row(buf, 0) == [7, 8, 9, 4, 5] and int(buf.ptr) == 3
  assert row(buf, 1) == [None] * 5


def test_wrap_without_the_quirk():
  buf = mem.ring_init(1, 5, (1,), jnp.float32)
  buf = write(buf, 0, [1, 2, 3], drop_at_wrap=False)
  buf = write(buf, 0, [4, 5, 6], drop_at_wrap=False)
  assert row(buf, 0) == [6, 2, 3, 4, 5] and int(buf.ptr) == 1


def test_fill_on_first_write_and_masked_rows():
  buf = mem.ring_init(2, 4, (1,), jnp.float32)
  # Padding rows (valid False) are skipped; the first valid sample fills.
  buf = write(buf, 1, [9, 3, 4], valid=[False, True, True],
              fill_on_first_write=True)
  assert row(buf, 1) == [3, 4, 3, 3] and int(buf.ptr) == 2
  # Later writes do not fill again.
  buf = write(buf, 1, [5], fill_on_first_write=True)
  assert row(buf, 1) == [3, 4, 5, 3]
  np.testing.assert_array_equal(np.asarray(buf.x[1, :, 0]), [3, 4, 5, 3])
  # An all-padding batch changes nothing.
  before = jax.tree_util.tree_map(np.asarray, buf)
  buf = write(buf, 0, [1, 2], valid=[False, False], fill_on_first_write=True)
  for a, b in zip(before, buf):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_sampling_without_replacement_is_uniform_over_eligible():
  eligible = np.zeros((3, 4), bool)
  eligible[0] = True
  eligible[1, :2] = True            # 6 eligible slots in all
  counts = np.zeros(12)
  for s in range(600):
    idx, mask = mem.sample_without_replacement(jax.random.PRNGKey(s),
                                               jnp.asarray(eligible), 4)
    idx, mask = np.asarray(idx), np.asarray(mask)
    assert mask.all()
    assert len(set(idx.tolist())) == 4                 # no replacement
    assert eligible.reshape(-1)[idx].all()             # eligible only
    counts[idx] += 1
  got = counts[eligible.reshape(-1)] / 600
  np.testing.assert_allclose(got, 4 / 6, atol=0.07)    # uniform: 2/3 each


def test_sampling_masks_draws_beyond_the_eligible_count():
  eligible = jnp.asarray([True, False, True, False, False])
  idx, mask = mem.sample_without_replacement(jax.random.PRNGKey(0), eligible,
                                             4)
  assert np.asarray(mask).tolist() == [True, True, False, False]
  assert sorted(np.asarray(idx)[:2].tolist()) == [0, 2]
  idx, mask = mem.sample_without_replacement(jax.random.PRNGKey(0),
                                             jnp.ones(5, bool), 4, n_draw=3)
  assert np.asarray(mask).sum() == 3
  with pytest.raises(ValueError, match="cannot draw"):
    mem.sample_without_replacement(jax.random.PRNGKey(0), eligible, 6)


def test_draw_only_from_earlier_tasks():
  buf = mem.ring_init(3, 2, (1,), jnp.float32)
  buf = buf._replace(filled=jnp.ones((3, 2), bool))
  for s in range(20):
    t, slot, mask = mem.draw(buf, jax.random.PRNGKey(s), jnp.int32(2), 3)
    assert (np.asarray(t)[np.asarray(mask)] < 2).all()
