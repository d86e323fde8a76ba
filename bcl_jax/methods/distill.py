"""Replay with distillation to soft targets, shared by the BCL methods.

Each task ``p``'s episodic memory ``M[p]`` has soft targets
``F[p] = softmax(logits(M[p])[:, cols(p)] / T)`` taken with the parameters
of the moment the next task starts. The inner loss on a batch plus a replay
batch drawn from ``M[0..t-1]`` is
``CE(batch) + CE(replay on own columns) + memory_strength * KL(F || q_T)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bcl_jax import memory as mem
from bcl_jax.methods import losses, steps


def refresh_soft_targets(model, class_mask, state, task):
  """At a task switch, ``F[p] = softmax(logits(M[p])[:, cols(p)] / T)``.

  ``p = task - 1``; the forward runs in training mode, as the reference's does
  (so BatchNorm running statistics move). No-op for ``task == 0``. ``state``
  has ``variables``, ``memory``, ``soft`` and ``hp["temperature"]``.
  """
  p = jnp.maximum(task - 1, 0)
  (logits,), new_vars = steps.apply_many(
      model, state.variables, [state.memory.x[p]], True,
      masks=[jnp.ones(state.memory.y.shape[1], bool)])
  f = losses.soft_targets(logits, class_mask[p], state.hp["temperature"])
  switched = task > 0
  soft = jnp.where(switched, state.soft.at[p].set(f), state.soft)
  variables = steps.select(switched, new_vars, state.variables)
  return state._replace(soft=soft, variables=variables)


def draw_replay(memory: mem.RingBuffer, soft, key, task, k):
  """A replay batch from ``M[0..task-1]`` with its soft targets:
  ``(x, y, task, soft, mask)``."""
  rt, rs, rmask = mem.draw(memory, key, task, k)
  return memory.x[rt, rs], memory.y[rt, rs], rt, soft[rt, rs], rmask


def inner_loss(model, class_mask, kl_mean: bool):
  """``L_in`` on the current batch plus a replay batch with distillation.

  Returns ``loss(params, batch_stats, hp, x, y, valid, task, replay) ->
  (loss, batch_stats)`` with ``replay = (rx, ry, rtask, rsoft, rmask)``.
  """

  def loss(params, batch_stats, hp, x, y, valid, task, replay):
    rx, _, _, _, rmask = replay
    (lc, lr_), new = steps.apply_many(
        model, {"params": params, "batch_stats": batch_stats}, [x, rx], True,
        masks=[valid, rmask], skippable=(False, True))
    return (inner_loss_of_logits(class_mask, kl_mean, hp, lc, y, valid, task,
                                 lr_, replay), new["batch_stats"])

  return loss


def inner_loss_of_logits(class_mask, kl_mean: bool, hp, lc, y, valid, task,
                         lr_, replay):
  """``L_in`` from the batch's logits ``lc`` and the replay's ``lr_`` (what
  :func:`inner_loss` computes after its forward passes)."""
  _, ry, rt, rsoft, rmask = replay
  cols = class_mask[rt]
  return (losses.masked_ce(lc, y, class_mask[task], valid)
          + losses.masked_ce(lr_, ry, cols, rmask)
          + hp["memory_strength"] * losses.masked_kl(
              lr_, rsoft, cols, rmask, hp["temperature"], kl_mean))
