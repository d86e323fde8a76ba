"""``single``: plain fine-tuning, one SGD step per batch (spec section 9)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bcl_jax.methods import base


class State(NamedTuple):
  variables: dict
  hp: dict


def make(config, ctx: base.Context) -> base.Method:
  model = ctx.model
  class_mask = jnp.asarray(ctx.class_mask)

  def init(key):
    return State(variables=model.init(key), hp=base.init_hp(config))

  def begin_task(state, task):
    del task
    return state

  def observe(state, batch: base.Batch, key):
    del key
    v = state.variables

    def loss_fn(params):
      (logits,), new = base.apply_many(
          model, {"params": params, "batch_stats": v["batch_stats"]},
          [batch.x], True, masks=[batch.valid])
      return base.masked_ce(logits, batch.y, class_mask[batch.task],
                            batch.valid), new["batch_stats"]

    (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
    v = {"params": base.sgd(v["params"], g, state.hp["lr"]), "batch_stats": bs}
    return state._replace(variables=v), {"loss": loss}

  eval_variables = base.make_eval_variables(model, adapt=False)

  return base.Method("single", init, begin_task, observe, eval_variables)
