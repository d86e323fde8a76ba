"""``single``: plain fine-tuning, one SGD step per batch (spec section 9)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from bcl_jax.methods import api, steps
from bcl_jax.methods import hparams as H


class State(NamedTuple):
  variables: dict
  hp: dict


def fine_tuning(spec: api.MethodSpec, hp: api.HParams, ctx: api.Context,
                per_row: bool = False) -> api.Method:
  """One SGD step per batch on its CE over the batch's task's columns, or
  (``per_row``) each row's own task's columns, as the joint schedule of
  ``offline`` mixes tasks in a batch."""
  model = ctx.model
  class_mask = jnp.asarray(ctx.class_mask)

  def init(key):
    return State(variables=model.init(key), hp=api.init_hp(spec, hp))

  observe = steps.ce_observe(model, lambda batch: class_mask[
      batch.tasks if per_row else batch.task])

  return api.Method(init, api.no_hook, observe, api.no_hook,
                    *api.plain_eval(model))


def make(hp: api.HParams, ctx: api.Context) -> api.Method:
  return fine_tuning(SPEC, hp, ctx)


SPEC = api.MethodSpec(
    name="single",
    summary="fine-tuning: one SGD step per batch on the current task",
    hparams=(H.LR,),
    make=make)
