"""``bcl_single``: BCL without a generalisation memory (spec section 7).

The whole batch is written into ``M[t]`` (ring buffer, no fill on first
write) before training; then from ``theta0`` ``inner_steps`` SGD steps
(gradients zeroed every step) on ``L_in`` of :mod:`bcl_dual` and the
interpolation ``theta0 + beta * (theta - theta0)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bcl_jax import memory as mem
from bcl_jax.methods import base
from bcl_jax.methods import bcl_dual


class State(NamedTuple):
  variables: dict
  hp: dict
  memory: mem.RingBuffer
  soft: jax.Array


def make(config, ctx: base.Context) -> base.Method:
  model = ctx.model
  class_mask = jnp.asarray(ctx.class_mask)
  n_mem = int(config.n_memories)
  k_replay = min(n_mem, int(config.replay_batch_size))
  inner_steps = int(config.inner_steps)
  inner_loss = bcl_dual.make_inner_loss(model, class_mask, bool(config.kl_mean))

  def init(key):
    return State(
        variables=model.init(key), hp=base.init_hp(config),
        memory=mem.ring_init(ctx.n_tasks, n_mem, ctx.input_shape,
                             ctx.input_dtype),
        soft=jnp.zeros((ctx.n_tasks, n_mem, ctx.n_outputs), jnp.float32))

  def begin_task(state, task):
    state = bcl_dual.refresh_soft_targets(model, class_mask, state, task)
    return state._replace(memory=mem.ring_reset_ptr(state.memory))

  def observe(state, batch: base.Batch, key):
    t = batch.task
    state = state._replace(memory=mem.ring_write(
        state.memory, t, batch.x, batch.y, batch.valid,
        drop_at_wrap=config.drop_at_wrap, fill_on_first_write=False))
    hp = state.hp

    def step(v, k):
      replay = bcl_dual.draw_replay(state, k, t, k_replay)
      (loss, bs), g = jax.value_and_grad(inner_loss, has_aux=True)(
          v["params"], v["batch_stats"], hp, batch.x, batch.y, batch.valid,
          t, replay)
      return {"params": base.sgd(v["params"], g, hp["lr"]),
              "batch_stats": bs}, loss

    theta0 = state.variables
    after, losses = jax.lax.scan(step, theta0,
                                 jax.random.split(key, inner_steps))
    variables = base.interpolate(theta0, after, hp["beta"])
    return state._replace(variables=variables), {"loss": losses[-1]}

  eval_variables = base.make_eval_variables(model, bool(config.adapt),
                                            inner_steps)

  return base.Method("bcl_single", init, begin_task, observe, eval_variables)
