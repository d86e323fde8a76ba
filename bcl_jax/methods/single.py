"""``single``: plain fine-tuning, one SGD step per batch (spec section 9)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from bcl_jax.methods import api, steps
from bcl_jax.methods import hparams as H


class State(NamedTuple):
  variables: dict
  hp: dict


def make(hp: api.HParams, ctx: api.Context) -> api.Method:
  model = ctx.model
  class_mask = jnp.asarray(ctx.class_mask)

  def init(key):
    return State(variables=model.init(key), hp=api.init_hp(SPEC, hp))

  observe = steps.ce_observe(model, lambda batch: class_mask[batch.task])

  return api.Method(init, api.no_hook, observe, api.no_hook,
                    *api.plain_eval(model))


SPEC = api.MethodSpec(
    name="single",
    summary="fine-tuning: one SGD step per batch on the current task",
    hparams=(H.LR,),
    make=make)
