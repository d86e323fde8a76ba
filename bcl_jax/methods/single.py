"""``single``: plain fine-tuning, one SGD step per batch (spec section 9)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from bcl_jax.methods import api, losses, steps
from bcl_jax.methods import hparams as H


class State(NamedTuple):
  variables: dict
  hp: dict


def make(hp: api.HParams, ctx: api.Context) -> api.Method:
  model = ctx.model
  class_mask = jnp.asarray(ctx.class_mask)

  def init(key):
    return State(variables=model.init(key), hp=api.init_hp(SPEC, hp))

  def observe(state, batch: api.Batch, key):
    def loss_fn(params, batch_stats, key):
      del key
      (logits,), new = steps.apply_many(
          model, {"params": params, "batch_stats": batch_stats},
          [batch.x], True, masks=[batch.valid])
      return losses.masked_ce(logits, batch.y, class_mask[batch.task],
                              batch.valid), new["batch_stats"]

    v, loss, _ = steps.grad_step(loss_fn, state.variables, key,
                                 state.hp["lr"])
    return state._replace(variables=v), {"loss": loss}

  return api.Method(init, api.no_hook, observe, api.no_hook,
                    *api.plain_eval(model))


SPEC = api.MethodSpec(
    name="single",
    summary="fine-tuning: one SGD step per batch on the current task",
    hparams=(H.LR,),
    make=make)
