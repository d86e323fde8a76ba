"""``ewc``: elastic weight consolidation (spec section 9).

Each task keeps its **first** ``n_memories`` samples (in the order it sees
them). At the switch to the next task, the gradient of the mean CE on those
samples (one batch, the task's own columns, training-mode forward) is squared
elementwise: that is the task's Fisher estimate ``F_k``; the parameters are
the anchor ``theta_k``. Every batch then takes one SGD step on::

  CE(batch) + memory_strength * sum_{k < t} sum F_k * (theta - theta_k)^2

(no 1/2: the reference's constant). Every trainable parameter is penalised
(BatchNorm scales and offsets included), running statistics are not.

Storage: instead of per-task stacks ``[n_tasks, ...]`` of Fishers and anchors
(``2 * n_tasks`` copies of the network: 20 tasks of a ResNet-18 are 40
copies per run), one running sum. A sum of quadratics is a quadratic::

  sum_k F_k (theta - theta_k)^2 = A (theta - m)^2 + c,
  A = sum_k F_k,  m = sum_k F_k theta_k / A,  c = sum_k F_k (theta_k - m)^2

so the state holds ``A`` (``fisher``), the Fisher-weighted mean anchor ``m``
(``anchor``) and the scalar ``c`` (``const``): two copies of the network
whatever the number of tasks, with the same penalty value and gradient.
``m`` is updated as a convex combination (``m += F / (A + F) * (theta_k -
m)``), which stays exact where ``A`` is tiny or zero.

``ewc_online`` (off by default) is online EWC (Schwarz et al. 2018,
"Progress & Compress"): one running Fisher ``A = ewc_gamma * A + F_k`` and
the latest parameters as the only anchor; the penalty is
``memory_strength * sum A (theta - theta_{t-1})^2``.

Timing: the reference computes the Fisher at the next task's first
``observe``, after the previous task's evaluation. ``begin_task`` of task
``t > 0`` does the same (the kept samples stay in the state until then), so
BatchNorm's running statistics, which that training-mode forward moves as in
the reference, are moved after the evaluation of task ``t - 1`` too, and the
last task needs no Fisher. (Done in ``end_task`` instead, the evaluation
would see the moved statistics.)

Differences from the reference: when the first batch is larger than
``n_memories`` the reference keeps all of it; here at most ``n_memories``
samples are kept.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bcl_jax.methods import api, losses, steps
from bcl_jax.methods import hparams as H

EWC_ONLINE = api.HParam("ewc_online", False, "online EWC (Schwarz et al. "
                        "2018): one running Fisher decayed by ewc_gamma, "
                        "anchored at the last task's parameters")
EWC_GAMMA = api.HParam("ewc_gamma", 1.0, "online EWC: decay of the running "
                       "Fisher at each task switch, in [0, 1]", dynamic=True)


class Kept(NamedTuple):
  """The current task's first ``n_memories`` samples."""

  x: jax.Array      # [n_memories, *input_shape]
  y: jax.Array      # [n_memories] int32
  count: jax.Array  # int32 scalar, slots filled


class State(NamedTuple):
  variables: dict
  hp: dict
  kept: Kept
  fisher: dict      # A: summed (or online) Fisher, shaped like params
  anchor: dict      # m: Fisher-weighted mean of the anchors
  const: jax.Array  # c: the penalty's constant part (loss value only)


def keep_first(kept: Kept, x, y, valid) -> Kept:
  """Appends the batch's valid rows while fewer than ``n`` are kept."""
  n = kept.y.shape[0]
  valid = valid.astype(bool)
  slot = kept.count + jnp.cumsum(valid).astype(jnp.int32) - 1
  slot = jnp.where(valid & (slot < n), slot, n)  # n: dropped by the scatter
  return Kept(x=kept.x.at[slot].set(x.astype(kept.x.dtype), mode="drop"),
              y=kept.y.at[slot].set(y.astype(jnp.int32), mode="drop"),
              count=jnp.minimum(kept.count + jnp.sum(valid), n)
              .astype(jnp.int32))


def penalty(params, fisher, anchor, const):
  """``sum A (theta - m)^2 + c`` (= ``sum_k sum F_k (theta - theta_k)^2``)."""
  terms = jax.tree_util.tree_map(
      lambda p, a, m: jnp.sum(a * jnp.square(p - m)), params, fisher, anchor)
  return sum(jax.tree_util.tree_leaves(terms)) + const


def consolidate(fisher, anchor, const, f, theta):
  """Adds ``F (theta_k - theta)^2`` to ``A (theta - m)^2 + c``.

  Returns the new ``(A, m, c)`` with ``A' = A + F``, ``m'`` the
  ``A``/``F``-weighted mean of ``m`` and ``theta``, and ``c' = c +
  sum A (m - m')^2 + sum F (theta - m')^2``.
  """
  tm = jax.tree_util.tree_map
  new_a = tm(jnp.add, fisher, f)
  w = tm(lambda fa, na: jnp.where(na > 0, fa / jnp.where(na > 0, na, 1.0),
                                  0.0), f, new_a)
  new_m = tm(lambda m, th, w: m + w * (th - m), anchor, theta, w)
  moved = tm(lambda a, m, nm, fa, th, nmm: jnp.sum(a * jnp.square(m - nm))
             + jnp.sum(fa * jnp.square(th - nmm)),
             fisher, anchor, new_m, f, theta, new_m)
  return new_a, new_m, const + sum(jax.tree_util.tree_leaves(moved))


def make(hp: api.HParams, ctx: api.Context) -> api.Method:
  model = ctx.model
  class_mask = jnp.asarray(ctx.class_mask)
  n_mem = int(hp.n_memories)
  online = bool(hp.ewc_online)

  def init(key):
    variables = model.init(key)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, variables["params"])
    kept = Kept(x=jnp.zeros((n_mem,) + tuple(ctx.input_shape),
                            ctx.input_dtype),
                y=jnp.zeros((n_mem,), jnp.int32),
                count=jnp.zeros((), jnp.int32))
    return State(variables=variables, hp=api.init_hp(SPEC, hp), kept=kept,
                 fisher=zeros, anchor=zeros,
                 const=jnp.zeros((), jnp.float32))

  def fisher_of(variables, kept, task):
    """Squared gradient of the mean CE on the kept samples, in train mode."""
    valid = jnp.arange(n_mem) < kept.count

    def loss_fn(params):
      (logits,), new = steps.apply_many(
          model, {"params": params, "batch_stats": variables["batch_stats"]},
          [kept.x], True, masks=[valid])
      return losses.masked_ce(logits, kept.y, class_mask[task], valid), new

    g, new = jax.grad(loss_fn, has_aux=True)(variables["params"])
    return jax.tree_util.tree_map(jnp.square, g), new

  def begin_task(state, task, data):
    """Consolidates task ``task - 1`` (nothing at task 0)."""
    del data
    prev = jnp.maximum(task - 1, 0)
    f, variables = fisher_of(state.variables, state.kept, prev)
    theta = state.variables["params"]
    if online:
      gamma = state.hp["ewc_gamma"]
      fisher = jax.tree_util.tree_map(lambda a, b: gamma * a + b,
                                      state.fisher, f)
      anchor, const = theta, jnp.zeros((), jnp.float32)
    else:
      fisher, anchor, const = consolidate(state.fisher, state.anchor,
                                          state.const, f, theta)
    switched = task > 0
    new = state._replace(
        variables=steps.select(switched, variables, state.variables),
        fisher=steps.select(switched, fisher, state.fisher),
        anchor=steps.select(switched, anchor, state.anchor),
        const=jnp.where(switched, const, state.const))
    return new._replace(kept=new.kept._replace(
        count=jnp.zeros((), jnp.int32)))

  def observe(state, batch: api.Batch, key):
    kept = keep_first(state.kept, batch.x, batch.y, batch.valid)

    def loss_fn(params, batch_stats, key):
      del key
      (logits,), new = steps.apply_many(
          model, {"params": params, "batch_stats": batch_stats},
          [batch.x], True, masks=[batch.valid])
      ce = losses.masked_ce(logits, batch.y, class_mask[batch.task],
                            batch.valid)
      reg = penalty(params, state.fisher, state.anchor, state.const)
      return ce + state.hp["memory_strength"] * reg, new["batch_stats"]

    v, loss, _ = steps.grad_step(loss_fn, state.variables, key,
                                 state.hp["lr"])
    return state._replace(variables=v, kept=kept), {"loss": loss}

  return api.Method(init, begin_task, observe, api.no_hook,
                    *api.plain_eval(model))


def validate(hp: api.HParams, config) -> None:
  del config
  api.check(0.0 <= hp.ewc_gamma <= 1.0,
            f"ewc_gamma must be in [0, 1], got {hp.ewc_gamma}")


SPEC = api.MethodSpec(
    name="ewc",
    summary="elastic weight consolidation: CE plus a Fisher-weighted "
    "quadratic penalty towards each past task's parameters",
    hparams=(H.LR, H.MEMORY_STRENGTH, H.N_MEMORIES, EWC_ONLINE, EWC_GAMMA),
    make=make, validate=validate)
