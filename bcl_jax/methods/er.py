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
from bcl_jax.methods import adaptation, api, losses, steps
from bcl_jax.methods import hparams as H


class State(NamedTuple):
  variables: dict
  hp: dict
  memory: mem.RingBuffer


def make(hp: api.HParams, ctx: api.Context) -> api.Method:
  model = ctx.model
  class_mask = jnp.asarray(ctx.class_mask)
  n_mem = int(hp.n_memories)
  k_replay = min(n_mem, int(hp.replay_batch_size))

  def init(key):
    return State(variables=model.init(key), hp=api.init_hp(SPEC, hp),
                 memory=mem.ring_for(ctx, n_mem))

  def observe(state, batch: api.Batch, key):
    t = batch.task
    memory = mem.ring_write(state.memory, t, batch.x, batch.y, batch.valid,
                            drop_at_wrap=hp.drop_at_wrap,
                            fill_on_first_write=False)

    def loss_fn(params, batch_stats, k):
      rt, rs, rmask = mem.draw(memory, k, t, k_replay)
      rx, ry = memory.x[rt, rs], memory.y[rt, rs]
      (lc, lr_), new = steps.apply_many(
          model, {"params": params, "batch_stats": batch_stats},
          [batch.x, rx], True, masks=[batch.valid, rmask],
          skippable=(False, True))
      loss = (losses.masked_ce(lc, batch.y, class_mask[t], batch.valid)
              + losses.masked_ce(lr_, ry, class_mask[rt], rmask))
      return loss, new["batch_stats"]

    v, _, losses_ = steps.inner_loop(
        loss_fn, state.variables, jax.random.split(key, int(hp.inner_steps)),
        state.hp["lr"])
    return state._replace(variables=v, memory=memory), {"loss": losses_[-1]}

  return api.Method(init, api.no_hook, observe, api.no_hook,
                    *adaptation.evaluation(model, bool(hp.adapt),
                                           int(hp.inner_steps)))


SPEC = api.MethodSpec(
    name="er",
    summary="experience replay: CE on the batch plus a replay batch from a "
    "ring buffer per task",
    hparams=(H.LR, H.N_MEMORIES, H.REPLAY_BATCH_SIZE, H.INNER_STEPS,
             H.ADAPT, H.ADAPT_LR, H.DROP_AT_WRAP),
    make=make)
