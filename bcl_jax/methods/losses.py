"""Losses every method builds on: masked cross-entropy and distillation.

Masks instead of slices keep shapes fixed: a task-incremental benchmark's
task owns some logit columns (``col_mask``), padding rows are ``valid=False``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_ce(logits: jax.Array, y: jax.Array, col_mask: jax.Array,
              valid: jax.Array) -> jax.Array:
  """Mean cross-entropy over valid rows, softmax over ``col_mask`` columns.

  Equal to the reference's CE on the sliced logits with shifted labels.
  ``col_mask`` is ``[O]`` or ``[B, O]``.
  """
  z = jnp.where(col_mask, logits, -jnp.inf)
  lse = jax.nn.logsumexp(z, axis=-1)
  picked = jnp.take_along_axis(logits, y[:, None].astype(jnp.int32), -1)[:, 0]
  per = jnp.where(valid, lse - picked, 0.0)
  return jnp.sum(per) / jnp.maximum(jnp.sum(valid), 1)


def masked_kl(logits: jax.Array, target: jax.Array, col_mask: jax.Array,
              valid: jax.Array, temperature: jax.Array,
              kl_mean: bool) -> jax.Array:
  """``KL(target || softmax(logits / T))`` over each row's own columns.

  ``kl_mean`` (the reference's ``KLDivLoss()`` default) divides the sum by
  the number of (row, column) terms, ``batch * nc_per_task``; otherwise by
  the number of rows (``batchmean``).
  """
  z = jnp.where(col_mask, logits / temperature, -jnp.inf)
  logq = z - jax.nn.logsumexp(z, axis=-1, keepdims=True)
  logq = jnp.where(col_mask, logq, 0.0)
  pos = (target > 0) & col_mask
  logt = jnp.log(jnp.where(pos, target, 1.0))
  per = jnp.sum(jnp.where(pos, target * (logt - logq), 0.0), axis=-1)
  per = jnp.where(valid, per, 0.0)
  if kl_mean:
    denom = jnp.sum(jnp.where(valid, jnp.sum(col_mask, -1), 0))
  else:
    denom = jnp.sum(valid)
  return jnp.sum(per) / jnp.maximum(denom, 1)


def soft_targets(logits: jax.Array, col_mask: jax.Array,
                 temperature: jax.Array) -> jax.Array:
  """softmax(logits / T) over the task's columns, zero elsewhere."""
  z = jnp.where(col_mask, logits / temperature, -jnp.inf)
  return jnp.where(col_mask, jax.nn.softmax(z, axis=-1), 0.0)
