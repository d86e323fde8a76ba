"""``bcl_single``: BCL without a generalisation memory (spec section 7).

The whole batch is written into ``M[t]`` (ring buffer, no fill on first
write) before training; then from ``theta0`` ``inner_steps`` SGD steps
(gradients zeroed every step) on ``L_in`` (:mod:`bcl_jax.methods.distill`)
and the interpolation ``theta0 + beta * (theta - theta0)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bcl_jax import memory as mem
from bcl_jax.methods import adaptation, api, distill, steps
from bcl_jax.methods import hparams as H


class State(NamedTuple):
  variables: dict
  hp: dict
  memory: mem.RingBuffer
  soft: jax.Array


def make(hp: api.HParams, ctx: api.Context) -> api.Method:
  model = ctx.model
  class_mask = jnp.asarray(ctx.class_mask)
  n_mem = int(hp.n_memories)
  k_replay = min(n_mem, int(hp.replay_batch_size))
  inner_steps = int(hp.inner_steps)
  inner_loss = distill.inner_loss(model, class_mask, bool(hp.kl_mean))

  def init(key):
    return State(
        variables=model.init(key), hp=api.init_hp(SPEC, hp),
        memory=mem.ring_for(ctx, n_mem),
        soft=jnp.zeros((ctx.n_tasks, n_mem, ctx.n_outputs), jnp.float32))

  def begin_task(state, task, data):
    del data
    state = distill.refresh_soft_targets(model, class_mask, state, task)
    return state._replace(memory=mem.ring_reset_ptr(state.memory))

  def observe(state, batch: api.Batch, key):
    t = batch.task
    state = state._replace(memory=mem.ring_write(
        state.memory, t, batch.x, batch.y, batch.valid,
        drop_at_wrap=hp.drop_at_wrap, fill_on_first_write=False))

    def loss_fn(params, batch_stats, k):
      replay = distill.draw_replay(state.memory, state.soft, k, t, k_replay)
      return inner_loss(params, batch_stats, state.hp, batch.x, batch.y,
                        batch.valid, t, replay)

    theta0 = state.variables
    after, _, losses = steps.inner_loop(
        loss_fn, theta0, jax.random.split(key, inner_steps), state.hp["lr"])
    variables = steps.interpolate(theta0, after, state.hp["beta"])
    return state._replace(variables=variables), {"loss": losses[-1]}

  return api.Method(init, begin_task, observe, api.no_hook,
                    *adaptation.evaluation(model, bool(hp.adapt), inner_steps))


SPEC = api.MethodSpec(
    name="bcl_single",
    summary="BCL without the generalisation memory: inner steps on batch + "
    "replay + distillation, then interpolation with beta",
    hparams=(H.LR, H.BETA, H.MEMORY_STRENGTH, H.TEMPERATURE, H.N_MEMORIES,
             H.REPLAY_BATCH_SIZE, H.INNER_STEPS, H.ADAPT, H.ADAPT_LR,
             H.KL_MEAN, H.DROP_AT_WRAP),
    make=make)
