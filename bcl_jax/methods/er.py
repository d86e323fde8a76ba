"""``er``: experience replay with a ring buffer per task (spec section 9).

Each batch is written into ``M[t]`` first; then ``inner_steps`` SGD steps on
``CE(batch) + CE(replay)``, the replay batch drawn anew at every step from
``M[0..t-1]`` (``min(n_memories, replay_batch_size)`` slots, uniform, without
replacement). As in the reference, the ring pointer is not reset at a task
switch: task ``t`` starts writing where task ``t-1`` stopped.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bcl_jax import memory as mem
from bcl_jax.methods import base


class State(NamedTuple):
  variables: dict
  hp: dict
  memory: mem.RingBuffer


def make(config, ctx: base.Context) -> base.Method:
  model = ctx.model
  class_mask = jnp.asarray(ctx.class_mask)
  n_mem = int(config.n_memories)
  k_replay = min(n_mem, int(config.replay_batch_size))
  inner_steps = int(config.inner_steps)

  def init(key):
    return State(variables=model.init(key), hp=base.init_hp(config),
                 memory=mem.ring_init(ctx.n_tasks, n_mem, ctx.input_shape,
                                      ctx.input_dtype))

  def begin_task(state, task):
    del task
    return state

  def observe(state, batch: base.Batch, key):
    t = batch.task
    memory = mem.ring_write(state.memory, t, batch.x, batch.y, batch.valid,
                            drop_at_wrap=config.drop_at_wrap,
                            fill_on_first_write=False)

    def step(v, k):
      rt, rs, rmask = mem.draw(memory, k, t, k_replay)
      rx, ry = memory.x[rt, rs], memory.y[rt, rs]

      def loss_fn(params):
        (lc, lr_), new = base.apply_many(
            model, {"params": params, "batch_stats": v["batch_stats"]},
            [batch.x, rx], True, masks=[batch.valid, rmask])
        loss = (base.masked_ce(lc, batch.y, class_mask[t], batch.valid)
                + base.masked_ce(lr_, ry, class_mask[rt], rmask))
        return loss, new["batch_stats"]

      (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
      return {"params": base.sgd(v["params"], g, state.hp["lr"]),
              "batch_stats": bs}, loss

    v, losses = jax.lax.scan(step, state.variables,
                             jax.random.split(key, inner_steps))
    return state._replace(variables=v, memory=memory), {"loss": losses[-1]}

  eval_variables = base.make_eval_variables(model, bool(config.adapt),
                                            inner_steps)

  return base.Method("er", init, begin_task, observe, eval_variables)
