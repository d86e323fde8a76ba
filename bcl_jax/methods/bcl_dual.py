r"""``bcl_dual``: Bilevel Continual Learning with two memories (spec section 6).

Each task ``t`` has an episodic memory ``M[t]`` (``n_mem`` slots) used for
replay and distillation, and a generalisation memory ``G[t]`` (``n_val``
slots) the outer objective is measured on; ``n_val = int(n_memories * n_val)``
and ``n_mem = n_memories - n_val``.

The bilevel problem
-------------------
.. math::
   \min_\theta\; L_{out}(\phi^*(\theta); G_{0..t}) \quad\text{s.t.}\quad
   \phi^*(\theta) = \operatorname{argmin}_\phi L_{in}(\phi; B \cup M_{0..t-1}),

with ``L_in = CE(batch) + CE(replay) + memory_strength * KL(F || q_T)`` and
``L_out = CE`` on a draw from the generalisation memories. One meta iteration
approximates ``phi*`` by ``K = inner_steps`` SGD steps from ``theta0``:
``phi_k = phi_{k-1} - lr * g_k`` with ``phi_0 = theta0``.

``meta_gradient = "first_order"`` (the reference): the outer gradient is taken
at the adapted point, ``g_out = dL_out/dphi (phi_K)``, i.e. the Jacobian
``dphi_K/dtheta0`` is replaced by the identity. Then one SGD step
``theta' = phi_K - lr * g_out`` (with the reference's ``grad_accumulation``
quirk, ``lr * (sum_k g_k + g_out)``, since gradients are zeroed only once per
meta iteration), and the Reptile-style interpolation
``theta <- theta0 + beta * (theta' - theta0)`` plays the role of an outer
learning rate. Cost: ``K + 1`` gradient evaluations.

``meta_gradient = "unrolled"``: the exact hypergradient
``d L_out(phi_K(theta0)) / d theta0 = (prod_k (I - lr * H_k))^T g_out``
(``H_k`` the Hessian of ``L_in`` at ``phi_{k-1}``; with ``grad_accumulation``
the recursion is that of the accumulated update, differentiated as written),
obtained by differentiating through the unrolled inner ``lax.scan`` with
reverse-mode autodiff. It replaces ``g_out`` in the step above, before the
interpolation. The replay draws and BatchNorm statistics are held fixed
(they are not functions of ``theta0`` we differentiate). Cost: one extra
reverse pass through the ``K`` inner steps, i.e. Hessian-vector products:
roughly 2-3x the first-order step's FLOPs, and memory for the ``K``
intermediate parameter sets and activations.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bcl_jax import memory as mem
from bcl_jax.methods import adaptation, api, distill, losses, steps
from bcl_jax.methods import hparams as H

N_VAL = api.HParam("n_val", 0.2, "fraction of n_memories for the "
                   "generalisation memory G")
META_GRADIENT = api.HParam("meta_gradient", "first_order", "first_order "
                           "(the reference) or unrolled (exact hypergradient "
                           "through the inner loop)")


class State(NamedTuple):
  variables: dict
  hp: dict
  memory: mem.RingBuffer   # episodic M, n_mem slots per task
  gen: mem.RingBuffer      # generalisation G, n_val slots per task
  soft: jax.Array          # F, [n_tasks, n_mem, n_outputs], zero off-task


def memory_sizes(hp) -> tuple[int, int]:
  """``(n_mem, n_val)``: episodic and generalisation slots per task."""
  n_val = int(int(hp.n_memories) * float(hp.n_val))
  n_mem = int(hp.n_memories) - n_val
  return n_mem, n_val


def validate(hp: api.HParams, config) -> None:
  api.check(config.batch_size >= 2, "bcl_dual takes one sample of each batch "
            "for the generalisation memory; batch_size must be >= 2")
  api.check(0 < hp.n_val < 1, f"n_val is a fraction of n_memories in (0, 1), "
            f"got {hp.n_val}")
  n_mem, n_val = memory_sizes(hp)
  api.check(n_val >= 1 and n_mem >= 1,
            f"n_memories={hp.n_memories} with n_val={hp.n_val} gives {n_mem} "
            f"episodic and {n_val} generalisation slots; both must be >= 1 "
            "(raise n_memories or change n_val)")
  api.check(hp.meta_gradient in ("first_order", "unrolled"),
            f"meta_gradient must be 'first_order' or 'unrolled', got "
            f"{hp.meta_gradient!r}")


# The cost model of the row buckets on CPU (split CIFAR's reduced ResNet-18
# inside the training step, 2-core AVX-512 CPUs): a row of a pass, forward +
# backward, costs ~0.6 ms per step per 3,072 input values on one machine,
# 1.0-1.3 ms on another (task 0 of the fused passes: 245 -> 61 ms per step
# with its 186 rows in 3 x 13-row passes instead of 3 x 62); each more
# bucket is one more compiled forward + backward pass, 6-8 s there. The
# constants sit in between; they pick 65 and 128 for the separate passes
# and 13, 62 and 128 for the fused ones at use=500.
BUCKET_ROW_SECONDS = 1.0e-3
BUCKET_COMPILE_SECONDS = 7.0


def plan_outer_buckets(ctx: api.Context, n_val: int,
                       rbs: int) -> tuple[int, ...]:
  """Row buckets of the outer draw (image networks) of ``min(n_tasks *
  n_val, rbs)`` rows, of which task ``t`` uses ``min((t + 1) * n_val,
  rbs)``.

  On CPU, with the steps per task known, :func:`steps.plan_row_buckets`
  picks the buckets (each some task's real row count) that minimise the
  modelled rows plus compile time: split CIFAR at ``use=500`` (50 steps per
  task) gets 65 and 128 (task 4's 65 rows no longer pad to 128: measured,
  same process, interleaved, 212.9 -> 161.9 ms per step there; tasks 0-3
  up to 6 ms slower at 65 rows than at 64), at its full size (250 steps)
  26, 52, 78, 104 and 128. Elsewhere (GPUs, unknown lengths) the powers of
  two from 64.
  """
  k_outer = min(ctx.n_tasks * n_val, rbs)
  if not ctx.steps_per_task or jax.default_backend() != "cpu":
    return steps.row_buckets(k_outer)
  return _planned(ctx, k_outer, _outer_needs(ctx, n_val, rbs),
                  ctx.steps_per_task)


def _outer_needs(ctx: api.Context, n_val: int, rbs: int) -> list[int]:
  """Real rows of the outer draw on each task."""
  return [min((t + 1) * n_val, rbs) for t in range(len(ctx.steps_per_task))]


def _planned(ctx: api.Context, k: int, needs, counts) -> tuple[int, ...]:
  """:func:`steps.plan_row_buckets` with this module's cost model."""
  per_row = BUCKET_ROW_SECONDS * int(np.prod(ctx.input_shape)) / 3072
  return steps.plan_row_buckets(k, needs, counts, per_row,
                                BUCKET_COMPILE_SECONDS)


def plan_pass_buckets(ctx: api.Context, n_val: int, rbs: int, n_b: int,
                      m_in: int, inner_steps: int) -> tuple[int, ...]:
  """Row counts of the network instances the fused passes run through
  (:data:`FUSED_PASSES`).

  Each step runs ``inner_steps`` inner passes of ``m_in`` rows (the
  batch's ``n_b`` plus the replay's; ``n_b`` on task 0, which has no
  replay) and one outer pass of :func:`plan_outer_buckets`'s rows; a pass
  runs through the smallest instance that holds its rows. On CPU, with the
  steps per task known, :func:`steps.plan_row_buckets` picks the instances
  for all these needs at once (split CIFAR at ``use=500``: 13, 62 and
  128, where the separate passes compiled instances of 10, 52, 65 and 128
  rows; the 13-row one runs task 0, whose passes hold 10 and 13 rows).
  Elsewhere the powers of two from 64 up to the outer draw, and
  ``m_in`` if that is larger.
  """
  k_outer = min(ctx.n_tasks * n_val, rbs)
  if not ctx.steps_per_task or jax.default_backend() != "cpu":
    sizes = steps.row_buckets(k_outer)
    return sizes if sizes[-1] >= m_in else sizes + (m_in,)
  per_task = list(ctx.steps_per_task)
  needs = _outer_needs(ctx, n_val, rbs) + [n_b, m_in]
  counts = per_task + [inner_steps * per_task[0],
                       inner_steps * sum(per_task[1:])]
  return _planned(ctx, max(k_outer, m_in), needs, counts)


def fused_pass_sizes(hp, ctx: api.Context, n_b: int,
                     batch_norm: bool) -> tuple[int, ...] | None:
  """Row counts of the network instances the fused passes
  (:data:`FUSED_PASSES`) run through for batches of ``n_b`` rows
  (:func:`plan_pass_buckets`), or None where the separate passes run: the
  fused passes off, a network without BatchNorm (``batch_norm``) or the
  unrolled meta-gradient."""
  if not (FUSED_PASSES and batch_norm and hp.meta_gradient != "unrolled"):
    return None
  n_mem, n_val = memory_sizes(hp)
  rbs = int(hp.replay_batch_size)
  return plan_pass_buckets(ctx, n_val, rbs, n_b, n_b + min(n_mem, rbs),
                           int(hp.inner_steps))


def _rows(a, r):
  """The first ``r`` rows of ``a``, zero-padded to ``r`` if it has fewer."""
  if a.shape[0] >= r:
    return a[:r]
  return jnp.concatenate([a, jnp.zeros((r - a.shape[0],) + a.shape[1:],
                                       a.dtype)])


# Fused passes (issue 11), for networks with BatchNorm and the first-order
# meta-gradient: one meta iteration's K inner passes and its outer pass run
# as one ``lax.scan`` over K + 1 passes, each through the smallest of a few
# network instances of fixed row counts (plan_pass_buckets), with the same
# update rule (``acc += g; params -= lr * acc``; with grad_accumulation off,
# ``acc = g``). An inner pass puts the batch and the replay in one forward
# pass as two BatchNorm groups (resnet.BatchNorm with a [G, N] mask). The
# maths is that of the separate passes; only the float summation order
# differs. On split CIFAR at use=500 the chunk compiles three network
# instances (13, 62 and 128 rows) instead of four (10, 52, 65, 128). 0 (env
# BCL_JAX_FUSED_PASSES=0) restores the separate passes.
FUSED_PASSES = int(os.environ.get("BCL_JAX_FUSED_PASSES", "1"))


def make(hp: api.HParams, ctx: api.Context) -> api.Method:
  model = ctx.model
  class_mask = jnp.asarray(ctx.class_mask)
  n_tasks, n_out = ctx.n_tasks, ctx.n_outputs
  n_mem, n_val = memory_sizes(hp)
  rbs = int(hp.replay_batch_size)
  k_replay = min(n_mem, rbs)
  k_outer = min(n_tasks * n_val, rbs)
  inner_steps, n_meta = int(hp.inner_steps), int(hp.n_meta)
  accumulate = bool(hp.grad_accumulation)
  drop, fill = bool(hp.drop_at_wrap), bool(hp.fill_on_first_write)
  unrolled = hp.meta_gradient == "unrolled"
  kl_mean = bool(hp.kl_mean)
  inner_loss = distill.inner_loss(model, class_mask, kl_mean)
  outer_buckets = plan_outer_buckets(ctx, n_val, rbs)

  def init(key):
    return State(
        variables=model.init(key), hp=api.init_hp(SPEC, hp),
        memory=mem.ring_init(n_tasks, n_mem, ctx.input_shape, ctx.input_dtype),
        gen=mem.ring_init(n_tasks, n_val, ctx.input_shape, ctx.input_dtype),
        soft=jnp.zeros((n_tasks, n_mem, n_out), jnp.float32))

  def begin_task(state, task, data):
    del data
    state = distill.refresh_soft_targets(model, class_mask, state, task)
    return state._replace(memory=mem.ring_reset_ptr(state.memory),
                          gen=mem.ring_reset_ptr(state.gen))

  def update_memories(state, batch):
    """Steps 2-3 of spec section 6; returns the state and training batch."""
    t, gen = batch.task, state.gen
    # The slot about to be overwritten rejoins the training batch; on the
    # task's first batch nothing is filled yet, so nothing is evicted.
    ev_x, ev_y = gen.x[t, gen.ptr], gen.y[t, gen.ptr]
    ev_valid = gen.filled[t, gen.ptr] & batch.valid[0]
    gen = mem.ring_write(gen, t, batch.x[:1], batch.y[:1], batch.valid[:1],
                         drop_at_wrap=drop, fill_on_first_write=fill)
    x = jnp.concatenate([batch.x[1:], ev_x[None].astype(batch.x.dtype)])
    y = jnp.concatenate([batch.y[1:], ev_y[None]])
    valid = jnp.concatenate([batch.valid[1:], ev_valid[None]])
    memory = mem.ring_write(state.memory, t, x, y, valid, drop_at_wrap=drop,
                            fill_on_first_write=fill)
    return state._replace(gen=gen, memory=memory), (x, y, valid)

  def fused_pass(r, n_b, m_in, t, x, y, valid, hp_):
    """One pass of the fused meta iteration through the ``r``-row network
    instance: ``(params, batch_stats, gen, replay, outer draw, on_outer) ->
    ((loss, batch_stats), grad)``.

    An inner pass puts the batch's ``n_b`` rows and the replay's
    ``k_replay`` rows in one forward pass as two BatchNorm groups (each
    normalised with its own statistics, the running averages updated batch
    first, then replay: what the two separate passes of
    :func:`distill.inner_loss` compute); an instance with fewer than ``m_in
    = n_b + k_replay`` rows holds the batch only, which is used on task 0,
    where the replay is empty and its loss terms are zero. The outer pass
    puts the draw's first ``r`` rows in one group. Rows beyond are padding
    (in no group: zero output, no gradient, no statistics).
    """
    def run(params, batch_stats, gen, replay, outer, on_outer):
      gt, gs, gmask = (_rows(a, r) for a in outer)
      xo, yo = gen.x[gt, gs], gen.y[gt, gs]
      none = jnp.zeros_like(gmask)
      rx, rmask = replay[0], replay[4]
      if r >= m_in:
        xi = _rows(jnp.concatenate([x, rx.astype(x.dtype)]), r)
        gi = [_rows(valid, r), _rows(jnp.concatenate(
            [jnp.zeros_like(valid), rmask]), r)]
      elif r >= n_b:
        xi, gi = _rows(x, r), [_rows(valid, r), none]
      else:
        xi = None
      if xi is None:     # only outer draws use this size
        xr, member = xo, jnp.stack([gmask, none])
      else:
        xr = jnp.where(on_outer, xo, xi.astype(xo.dtype))
        member = jnp.where(on_outer, jnp.stack([gmask, none]), jnp.stack(gi))

      def loss_fn(p_):
        logits, new = model.apply({"params": p_, "batch_stats": batch_stats},
                                  xr, True, member)
        loss = losses.masked_ce(logits, yo, class_mask[gt], gmask)
        if r >= m_in:
          inner = distill.inner_loss_of_logits(
              class_mask, kl_mean, hp_, logits[:n_b], y, valid, t,
              logits[n_b:m_in], replay)
        elif xi is not None:   # task 0: the replay's terms are zero
          inner = losses.masked_ce(logits[:n_b], y, class_mask[t], valid)
        if xi is not None:
          loss = jnp.where(on_outer, loss, inner)
        return loss, new["batch_stats"]

      return jax.value_and_grad(loss_fn, has_aux=True)(params)

    return run

  def observe(state, batch: api.Batch, key):
    t = batch.task
    state, (x, y, valid) = update_memories(state, batch)
    hp_ = state.hp
    n_outer = jnp.minimum((t + 1) * n_val, rbs)

    def in_loss(params, batch_stats, k):
      replay = distill.draw_replay(state.memory, state.soft, k, t, k_replay)
      return inner_loss(params, batch_stats, hp_, x, y, valid, t, replay)

    def outer_on(b, params, batch_stats, gt, gs, gmask):
      gt, gs, gmask = gt[:b], gs[:b], gmask[:b]
      (logits,), new = steps.apply_many(
          model, {"params": params, "batch_stats": batch_stats},
          [state.gen.x[gt, gs]], True, masks=[gmask])
      return losses.masked_ce(logits, state.gen.y[gt, gs], class_mask[gt],
                              gmask), new["batch_stats"]

    # The outer draw has n_outer real rows: on an image network only the
    # smallest bucket holding them is computed (issue 11; the buckets:
    # outer_buckets below). Networks without BatchNorm run the full draw:
    # their step is cheap, and summing fewer padding rows would move the
    # float rounding of the permuted-MNIST numbers.
    buckets = (outer_buckets if steps.has_batch_stats(state.variables)
               else (k_outer,))

    def on_outer_draw(fn, params, batch_stats, key):
      gt, gs, gmask = mem.draw(state.gen, key, t + 1, k_outer, n_outer)
      return steps.first_rows(n_outer, buckets, fn, params, batch_stats, gt,
                              gs, gmask)

    def outer_loss(params, batch_stats, key):
      return on_outer_draw(outer_on, params, batch_stats, key)

    def outer_value_and_grad(params, batch_stats, key):
      # ``value_and_grad(outer_loss)`` with the gradient taken inside each
      # bucket's branch: differentiating through the switch instead makes
      # every branch return zeros for the other branches' residuals (each
      # activation of their passes), tens of MB written per step.
      return on_outer_draw(jax.value_and_grad(outer_on, 1, has_aux=True),
                           params, batch_stats, key)

    def meta_iteration(variables, key):
      keys = jax.random.split(key, inner_steps + 1)
      theta0 = variables
      if unrolled:
        def through(p0):
          vk, acc, _ = steps.inner_loop(
              in_loss, {"params": p0, "batch_stats": theta0["batch_stats"]},
              keys[:-1], hp_["lr"], accumulate)
          lo, bs_out = outer_loss(vk["params"],
                                  jax.lax.stop_gradient(vk["batch_stats"]),
                                  keys[-1])
          return lo, (bs_out, vk["params"], acc)
        (lout, (bs, p, acc)), g_out = jax.value_and_grad(
            through, has_aux=True)(theta0["params"])
      else:
        vk, acc, _ = steps.inner_loop(in_loss, theta0, keys[:-1], hp_["lr"],
                                      accumulate)
        p = vk["params"]
        (lout, bs), g_out = outer_value_and_grad(p, vk["batch_stats"],
                                                 keys[-1])
      step = steps.add(acc, g_out) if accumulate else g_out
      after = {"params": steps.sgd(p, step, hp_["lr"]), "batch_stats": bs}
      return steps.interpolate(theta0, after, hp_["beta"]), lout

    def fused_meta_iteration(variables, key):
      # The K inner passes and the outer pass as one scan over K + 1 passes
      # through a few network instances of fixed row counts (FUSED_PASSES).
      n_b = x.shape[0]
      m_in = n_b + k_replay
      keys = jax.random.split(key, inner_steps + 1)
      on_outer = jnp.arange(inner_steps + 1) == inner_steps
      # Task 0 has no replay (no past task): its inner passes need the
      # batch's rows only.
      need_in = jnp.where(t == 0, n_b, m_in)
      index = jnp.where(on_outer, *(
          jnp.minimum(jnp.searchsorted(jnp.asarray(sizes), n), len(sizes) - 1)
          for n in (n_outer, need_in)))
      branches = [fused_pass(r, n_b, m_in, t, x, y, valid, hp_)
                  for r in sizes]
      # The outer pass's draw (its key is the last); the inner passes draw
      # their replay in the scan, each with its own key.
      outer = mem.draw(state.gen, keys[-1], t + 1, k_outer, n_outer)

      def one_pass(carry, xs):
        p, bs, acc = carry
        k, outer_pass, i = xs
        replay = distill.draw_replay(state.memory, state.soft, k, t, k_replay)
        (loss, bs), g = jax.lax.switch(i, branches, p, bs, state.gen, replay,
                                       outer, outer_pass)
        acc = steps.add(acc, g) if accumulate else g
        return (steps.sgd(p, acc, hp_["lr"]), bs, acc), loss

      zeros = jax.tree_util.tree_map(jnp.zeros_like, variables["params"])
      (p, bs, _), louts = jax.lax.scan(
          one_pass, (variables["params"], variables["batch_stats"], zeros),
          (keys, on_outer, index))
      after = {"params": p, "batch_stats": bs}
      return steps.interpolate(variables, after, hp_["beta"]), louts[-1]

    sizes = fused_pass_sizes(hp, ctx, x.shape[0],
                             steps.has_batch_stats(state.variables))
    variables, louts = jax.lax.scan(
        meta_iteration if sizes is None else fused_meta_iteration,
        state.variables,
        jax.random.split(key, n_meta))
    return state._replace(variables=variables), {"loss": louts[-1]}

  return api.Method(init, begin_task, observe, api.no_hook,
                    *adaptation.evaluation(model, bool(hp.adapt), inner_steps))


SPEC = api.MethodSpec(
    name="bcl_dual",
    summary="BCL-Dual: episodic + generalisation memory; n_meta x (inner "
    "steps on batch + replay + distillation, one outer step on G, "
    "interpolation with beta)",
    hparams=(H.LR, H.BETA, H.MEMORY_STRENGTH, H.TEMPERATURE, H.N_MEMORIES,
             N_VAL, H.REPLAY_BATCH_SIZE, H.INNER_STEPS, H.N_META, H.ADAPT,
             H.ADAPT_LR, META_GRADIENT, H.GRAD_ACCUMULATION,
             H.FILL_ON_FIRST_WRITE, H.KL_MEAN, H.DROP_AT_WRAP),
    make=make,
    validate=validate)
