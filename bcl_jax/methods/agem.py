"""``agem``: Averaged GEM (Chaudhry et al. 2019, "Efficient Lifelong Learning
with A-GEM").

Memories as in :mod:`bcl_jax.methods.gem` (a ring buffer per task of
``n_memories`` slots, batch written first, ``drop_at_wrap``, pointer not
reset at a task switch). Instead of one constraint per past task, one
reference gradient ``g_ref`` is taken on a replay batch of
``replay_batch_size`` samples drawn uniformly without replacement from all
past tasks' filled slots (each sample scored on its own task's columns), and
the batch's gradient ``g`` is projected in closed form when it conflicts:

    g <- g - (g . g_ref / g_ref . g_ref) g_ref    if g . g_ref < 0

then one SGD step. Task 0 has no memory to replay and takes plain steps.
The reference repository has no A-GEM. The paper's permuted-MNIST setting
(as the ContinualAI reproduction lists it) is an MLP 784-256-256-10, batch
10, one epoch, 250 memory slots per task, lr 0.1 and 256 memory samples per
reference gradient; we take the last (``replay_batch_size`` defaults to 256
here) and keep the benchmark's network, lr and ``n_memories``. With
BatchNorm, the replay pass updates the running averages before the batch's
pass (the paper's order: reference gradient first).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bcl_jax import memory as mem
from bcl_jax.methods import api, gem, steps
from bcl_jax.methods import hparams as H

REPLAY = H.REPLAY_BATCH_SIZE._replace(
    default=256, help="samples drawn from all past memories for A-GEM's "
    "reference gradient")


class State(NamedTuple):
  variables: dict
  hp: dict
  memory: mem.RingBuffer


def project(g: jax.Array, g_ref: jax.Array) -> jax.Array:
  """A-GEM's projection of flat gradient ``g`` against ``g_ref``."""
  dot = jnp.dot(g, g_ref)
  ref2 = jnp.dot(g_ref, g_ref)
  conflict = dot < 0  # implies ref2 > 0
  return jnp.where(conflict, g - dot / jnp.where(conflict, ref2, 1.0) * g_ref,
                   g)


def make(hp: api.HParams, ctx: api.Context) -> api.Method:
  model = ctx.model
  class_mask = jnp.asarray(ctx.class_mask)
  n_mem = int(hp.n_memories)
  k_replay = min(int(hp.replay_batch_size), ctx.n_tasks * n_mem)

  def init(key):
    return State(variables=model.init(key), hp=api.init_hp(SPEC, hp),
                 memory=mem.ring_for(ctx, n_mem))

  def ce_grad(*args):
    return gem.ce_grad_of(model, *args)

  def observe(state, batch: api.Batch, key):
    t = batch.task
    params, bs = state.variables["params"], state.variables["batch_stats"]
    loss, g_tree, bs_cur = ce_grad(params, bs, batch.x, batch.y,
                                   class_mask[t], batch.valid)
    g, unravel = ravel_pytree(g_tree)

    def with_replay(_):
      # Rows 0..t-1 only: the batch's write into row t (below) changes
      # none of them, so reading the memory before it is the same draw.
      old = state.memory
      rt, rs, rmask = mem.draw(old, key, t, k_replay)
      _, gr, bs_ref = ce_grad(params, bs, old.x[rt, rs], old.y[rt, rs],
                              class_mask[rt], rmask)
      bs_ref = steps.select(jnp.any(rmask), bs_ref, bs)
      return project(g, ravel_pytree(gr)[0]), bs_ref

    # The task is one value for every run: a real branch, skipped on task 0.
    # It runs before the write, so the memory is read, then updated in
    # place, and never copied.
    x, bs_ref = jax.lax.cond(t > 0, with_replay, lambda _: (g, bs), None)
    memory = mem.ring_write(state.memory, t, batch.x, batch.y, batch.valid,
                            drop_at_wrap=hp.drop_at_wrap,
                            fill_on_first_write=False)
    return gem.projected_step(state, memory, params, unravel(x), bs_ref, bs,
                              bs_cur, loss)

  return api.Method(init, api.no_hook, observe, api.no_hook,
                    *api.plain_eval(model))


SPEC = api.MethodSpec(
    name="agem",
    summary="averaged GEM: the batch's gradient projected against one "
    "replay gradient from all past memories when they conflict",
    hparams=(H.LR, H.N_MEMORIES, REPLAY, H.DROP_AT_WRAP),
    make=make,
    # Measured on permuted MNIST, 3 seeds, 2 tasks, 2-core CPU: 6.0 ms per
    # step of the 3 runs batched, 112 ms one after another (lax.map).
    cpu_batching="vmap")
