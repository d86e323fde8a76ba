"""``ftml``: the reference's MER-style meta-experience replay (spec section 9).

Per batch of task ``t`` (the reference's ``model/ftml.py``):

1. Write: the batch's valid rows go into ``M[t]``, a ring buffer per task
   whose pointer starts at 0 for every task (``drop_at_wrap``: a batch
   reaching the row's end is cut and the pointer goes back to 0, as there).
   The write comes first, so the current batch is already in memory.
2. Batch step: from ``theta0``, ``inner_steps`` SGD steps on the batch's
   cross-entropy over task ``t``'s columns (gradients zeroed every step),
   then ``theta0 + beta * (theta - theta0)``.
3. ``n_meta`` times: a task ``i`` drawn uniformly among the seen tasks
   ``0..t`` (the reference's ``np.random.choice(t + 1)``; here
   ``jax.random.randint`` on the step's key), ``inner_steps`` full-batch SGD
   steps on ``M[i]``'s filled slots (CE over task ``i``'s columns), then the
   same interpolation from the weights before those steps.

The interpolation covers the whole state: parameters and BatchNorm running
statistics (the reference interpolates its ``state_dict``). Forward passes
are in training mode; a memory row's BatchNorm statistics are those of its
filled slots. ``metrics["loss"]`` is the last meta step's loss, the value the
reference returns. ``adapt`` is the reference's test-time adaptation
(:mod:`bcl_jax.methods.adaptation`, ``inner_steps`` full-batch steps at
``adapt_lr`` on each seen task's memory).

Differs from the reference: a memory row is always used through its filled
mask. The reference does so only for the current task during training; for
a past task's meta step, and for every task in test-time adaptation, it
takes the whole row, so a task with fewer than ``n_memories`` samples would
train on uninitialised slots (never the case on the paper's benchmarks,
where every task fills its row).
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


def meta_tasks(key: jax.Array, task: jax.Array, n_meta: int) -> jax.Array:
  """The ``n_meta`` memory rows one observe trains on, uniform in
  ``0..task`` (one draw per meta iteration, from ``split(key, n_meta)``)."""
  return jax.vmap(lambda k: jax.random.randint(k, (), 0, task + 1))(
      jax.random.split(key, n_meta))


def make(hp: api.HParams, ctx: api.Context) -> api.Method:
  model = ctx.model
  class_mask = jnp.asarray(ctx.class_mask)
  n_mem = int(hp.n_memories)
  inner_steps = int(hp.inner_steps)
  n_meta = int(hp.n_meta)

  def init(key):
    return State(variables=model.init(key), hp=api.init_hp(SPEC, hp),
                 memory=mem.ring_for(ctx, n_mem))

  def begin_task(state, task, data):
    del task, data
    # The reference resets its write pointer at every task switch.
    return state._replace(memory=mem.ring_reset_ptr(state.memory))

  def fit(variables, x, y, valid, task, lr, beta):
    """``inner_steps`` SGD steps on CE(x, y), then the interpolation."""
    def loss_fn(params, batch_stats, k):
      del k
      (logits,), new = steps.apply_many(
          model, {"params": params, "batch_stats": batch_stats}, [x], True,
          masks=[valid])
      return losses.masked_ce(logits, y, class_mask[task], valid), \
          new["batch_stats"]

    # The loss draws nothing: the keys only count the steps.
    keys = jnp.zeros((inner_steps, 2), jnp.uint32)
    after, _, losses_ = steps.inner_loop(loss_fn, variables, keys, lr)
    return steps.interpolate(variables, after, beta), losses_[-1]

  def observe(state, batch: api.Batch, key):
    t = batch.task
    lr, beta = state.hp["lr"], state.hp["beta"]
    memory = mem.ring_write(state.memory, t, batch.x, batch.y, batch.valid,
                            drop_at_wrap=hp.drop_at_wrap,
                            fill_on_first_write=False)
    variables, _ = fit(state.variables, batch.x, batch.y, batch.valid, t, lr,
                       beta)

    def meta(v, i):
      return fit(v, memory.x[i], memory.y[i], memory.filled[i], i, lr, beta)

    variables, meta_losses = jax.lax.scan(meta, variables,
                                          meta_tasks(key, t, n_meta))
    return state._replace(variables=variables, memory=memory), \
        {"loss": meta_losses[-1]}

  return api.Method(init, begin_task, observe, api.no_hook,
                    *adaptation.evaluation(model, bool(hp.adapt), inner_steps))


SPEC = api.MethodSpec(
    name="ftml",
    summary="MER-style meta-experience replay: inner steps on the batch, "
    "then n_meta times on a random seen task's memory, each interpolated "
    "with beta",
    hparams=(H.LR, H.BETA, H.N_MEMORIES, H.INNER_STEPS, H.N_META, H.ADAPT,
             H.ADAPT_LR, H.DROP_AT_WRAP),
    make=make)
