"""``offline``: the joint-training upper bound (spec section 9).

Every task's training data is kept and the network is trained on all of it
together once the last task has arrived, as the reference's
``model/offline.py`` does (2 epochs, batch 10, shuffled across tasks). Here
that is the loop's ``joint`` schedule (``MethodSpec(schedule="joint")``):
phases ``0..T-2`` train nothing and phase ``T-1`` feeds the union of every
task's kept samples (``use``), reshuffled every epoch, in batches of
``batch_size`` for ``n_epochs`` passes. ``observe`` is one plain SGD step on
the batch's cross-entropy where each row is scored on its own task's
columns (``batch.tasks``), as the reference gathers each row's own slice.

Accuracy matrix: rows ``0..T-2`` are the untrained (initial) network's
accuracies, since nothing is learned before the last task; only the last
row is the trained model's. ACC (the mean of the last row) is the figure to
read; backward transfer and forgetting computed from the earlier rows are
meaningless for this method.

Epochs and network: the reference trains 2 epochs and, on MNIST, uses a
784-400-400-10 MLP; those are the loop's ``n_epochs`` and ``hidden`` fields,
set per benchmark in the config's ``presets["offline"]``.
"""

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

  # [B, O]: each row is scored on its own task's columns.
  observe = steps.ce_observe(model, lambda batch: class_mask[batch.tasks])

  return api.Method(init, api.no_hook, observe, api.no_hook,
                    *api.plain_eval(model))


SPEC = api.MethodSpec(
    name="offline",
    summary="upper bound: every task's data kept and trained jointly at the "
    "last task (n_epochs passes, shuffled across tasks)",
    hparams=(H.LR,),
    make=make,
    schedule="joint")
