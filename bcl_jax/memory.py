"""Fixed-shape per-task replay buffers as pytrees of arrays.

A :class:`RingBuffer` holds ``n_tasks`` rows of ``size`` slots. Everything is
sized up front and every operation is masked rather than sliced, so a buffer
can live in a ``lax.scan`` carry, be ``vmap``ped over runs and be saved by
orbax as it is.

The reference's ring buffers (BCL's and GEM's alike) have two quirks that
change which samples are kept, reproduced here behind switches:

* ``drop_at_wrap``: a batch that reaches the end of the buffer is cut; only
  the samples that fit are written, the rest of the batch is not stored, and
  the pointer goes back to 0. Off: the batch wraps around.
* ``fill_on_first_write``: the first write of a task first copies its first
  sample into every slot of that task's row, so the row counts as full from
  then on (sampling draws from every slot). Off: only written slots are
  valid and sampling draws from those alone.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RingBuffer(NamedTuple):
  """Per-task ring buffers.

  Attributes:
    x: ``[n_tasks, size, *input_shape]`` stored inputs (input dtype kept, so
      uint8 images stay uint8).
    y: ``[n_tasks, size]`` int32 labels.
    filled: ``[n_tasks, size]`` bool, slots holding a real sample.
    ptr: int32 scalar, the next slot to write in the current task's row.
  """

  x: jax.Array
  y: jax.Array
  filled: jax.Array
  ptr: jax.Array


def ring_init(n_tasks: int, size: int, input_shape, dtype) -> RingBuffer:
  return RingBuffer(
      x=jnp.zeros((n_tasks, size) + tuple(input_shape), dtype),
      y=jnp.zeros((n_tasks, size), jnp.int32),
      filled=jnp.zeros((n_tasks, size), bool),
      ptr=jnp.zeros((), jnp.int32))


def ring_for(ctx, size: int) -> RingBuffer:
  """Empty per-task ring buffers of ``size`` slots for a method's context
  (``ctx.n_tasks`` rows of ``ctx.input_shape`` in ``ctx.input_dtype``)."""
  return ring_init(ctx.n_tasks, size, ctx.input_shape, ctx.input_dtype)


def ring_reset_ptr(buf: RingBuffer) -> RingBuffer:
  return buf._replace(ptr=jnp.zeros((), jnp.int32))


def ring_write(buf: RingBuffer, task: jax.Array, x: jax.Array, y: jax.Array,
               valid: jax.Array, *, drop_at_wrap: bool = True,
               fill_on_first_write: bool = False) -> RingBuffer:
  """Writes the valid rows of a batch, in order, into row ``task``.

  Args:
    buf: the buffer.
    task: traced int, the row to write.
    x: ``[B, *input_shape]`` batch; rows where ``valid`` is False are skipped
      (the remaining rows are written consecutively, as if compacted).
    y: ``[B]`` labels.
    valid: ``[B]`` bool mask.
    drop_at_wrap: see the module docstring.
    fill_on_first_write: see the module docstring.

  Returns:
    The updated buffer.
  """
  size = buf.y.shape[1]
  valid = valid.astype(bool)
  n_valid = jnp.sum(valid).astype(jnp.int32)
  rank = jnp.cumsum(valid).astype(jnp.int32) - 1
  bx, by, bf = buf.x, buf.y, buf.filled

  if fill_on_first_write:
    first = jnp.argmax(valid)  # index of the first valid row
    do_fill = jnp.logical_and(~jnp.any(bf[task]), n_valid > 0)

    def fill(arrays):
      bx, by, bf = arrays
      return (bx.at[task].set(jnp.broadcast_to(x[first].astype(bx.dtype),
                                               bx.shape[1:])),
              by.at[task].set(y[first].astype(jnp.int32)),
              bf.at[task].set(True))

    # A real branch: the copy happens once per task, not every step.
    bx, by, bf = jax.lax.cond(do_fill, fill, lambda a: a, (bx, by, bf))

  ptr = buf.ptr
  if drop_at_wrap:
    n_write = jnp.minimum(n_valid, size - ptr)
    slot = jnp.where(valid & (rank < n_write), ptr + rank, size)
    new_ptr = ptr + n_write
    new_ptr = jnp.where(new_ptr >= size, 0, new_ptr)
  else:
    slot = jnp.where(valid, (ptr + rank) % size, size)
    new_ptr = (ptr + n_valid) % size
  # Slot ``size`` is out of range: those rows are dropped by the scatter,
  # which writes only the batch's rows into the (donated) buffer.
  return RingBuffer(x=bx.at[task, slot].set(x.astype(bx.dtype), mode="drop"),
                    y=by.at[task, slot].set(y.astype(jnp.int32), mode="drop"),
                    filled=bf.at[task, slot].set(True, mode="drop"),
                    ptr=new_ptr.astype(jnp.int32))


def sample_without_replacement(key: jax.Array, eligible: jax.Array, k: int,
                               n_draw: jax.Array | int | None = None):
  """Uniform draw of up to ``k`` distinct flat indices among ``eligible``.

  Each eligible slot gets an i.i.d. uniform priority and the ``k`` smallest
  win, which is a uniform sample without replacement. Fixed output shape;
  ``mask`` marks the real draws: the first ``min(n_draw, #eligible)``.

  Args:
    key: PRNG key.
    eligible: bool array of any shape; indices refer to its flattening.
    k: static number of slots returned.
    n_draw: traced or static number actually wanted (<= k); default k.

  Returns:
    ``(index [k] int32, mask [k] bool)``.
  """
  flat = eligible.reshape(-1)
  if k > flat.shape[0]:
    raise ValueError(f"cannot draw {k} of {flat.shape[0]} slots")
  prio = jax.random.uniform(key, flat.shape, jnp.float32)
  prio = jnp.where(flat, prio, 2.0)
  _, index = jax.lax.top_k(-prio, k)
  n_eligible = jnp.sum(flat)
  n = n_eligible if n_draw is None else jnp.minimum(n_draw, n_eligible)
  mask = jnp.arange(k) < jnp.minimum(n, k)
  return index.astype(jnp.int32), mask


def draw(buf: RingBuffer, key: jax.Array, upto: jax.Array, k: int,
         n_draw=None):
  """Draws slots among the filled slots of rows ``0 .. upto-1`` of ``buf``.

  Returns:
    ``(task [k], slot [k], mask [k])``; entries with ``mask`` False are
    padding and must be ignored by the caller.
  """
  n_tasks, size = buf.y.shape
  eligible = buf.filled & (jnp.arange(n_tasks)[:, None] < upto)
  index, mask = sample_without_replacement(key, eligible, k, n_draw)
  return index // size, index % size, mask
