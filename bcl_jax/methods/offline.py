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

from bcl_jax.methods import api, single
from bcl_jax.methods import hparams as H


def make(hp: api.HParams, ctx: api.Context) -> api.Method:
  # Fine-tuning's step, each row on its own task's columns; the joint
  # schedule (SPEC) is what makes it the offline bound.
  return single.fine_tuning(SPEC, hp, ctx, per_row=True)


SPEC = api.MethodSpec(
    name="offline",
    summary="upper bound: every task's data kept and trained jointly at the "
    "last task (n_epochs passes, shuffled across tasks)",
    hparams=(H.LR,),
    make=make,
    schedule="joint")
