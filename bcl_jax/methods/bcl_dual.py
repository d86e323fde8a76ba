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

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bcl_jax import memory as mem
from bcl_jax.methods import base


class State(NamedTuple):
  variables: dict
  hp: dict
  memory: mem.RingBuffer   # episodic M, n_mem slots per task
  gen: mem.RingBuffer      # generalisation G, n_val slots per task
  soft: jax.Array          # F, [n_tasks, n_mem, n_outputs], zero off-task


def memory_sizes(config) -> tuple[int, int]:
  """``(n_mem, n_val)``: episodic and generalisation slots per task."""
  n_val = int(int(config.n_memories) * float(config.n_val))
  n_mem = int(config.n_memories) - n_val
  if n_val < 1 or n_mem < 1:
    raise ValueError(
        f"n_memories={config.n_memories} with n_val={config.n_val} gives "
        f"{n_mem} episodic and {n_val} generalisation slots; both must be "
        ">= 1 (raise n_memories or change n_val)")
  return n_mem, n_val


def refresh_soft_targets(model, class_mask, state, task):
  """At a task switch, ``F[p] = softmax(logits(M[p])[:, cols(p)] / T)``.

  ``p = task - 1``; the forward runs in training mode, as the reference's does
  (so BatchNorm running statistics move). No-op for ``task == 0``.
  """
  p = jnp.maximum(task - 1, 0)
  (logits,), new_vars = base.apply_many(
      model, state.variables, [state.memory.x[p]], True,
      masks=[jnp.ones(state.memory.y.shape[1], bool)])
  f = base.soft_targets(logits, class_mask[p], state.hp["temperature"])
  switched = task > 0
  soft = jnp.where(switched, state.soft.at[p].set(f), state.soft)
  variables = base.select(switched, new_vars, state.variables)
  return state._replace(soft=soft, variables=variables)


def make_inner_loss(model, class_mask, kl_mean: bool):
  """``L_in`` on the current batch plus a replay batch with distillation.

  Returns ``loss(params, batch_stats, hp, x, y, valid, task, replay) ->
  (loss, batch_stats)`` with ``replay = (rx, ry, rtask, rsoft, rmask)``.
  """

  def loss(params, batch_stats, hp, x, y, valid, task, replay):
    rx, ry, rt, rsoft, rmask = replay
    (lc, lr_), new = base.apply_many(
        model, {"params": params, "batch_stats": batch_stats}, [x, rx], True,
        masks=[valid, rmask])
    cols = class_mask[rt]
    total = (base.masked_ce(lc, y, class_mask[task], valid)
             + base.masked_ce(lr_, ry, cols, rmask)
             + hp["memory_strength"] * base.masked_kl(
                 lr_, rsoft, cols, rmask, hp["temperature"], kl_mean))
    return total, new["batch_stats"]

  return loss


def draw_replay(state, key, task, k):
  """A replay batch from ``M[0..task-1]`` with its soft targets."""
  rt, rs, rmask = mem.draw(state.memory, key, task, k)
  return (state.memory.x[rt, rs], state.memory.y[rt, rs], rt,
          state.soft[rt, rs], rmask)


def make(config, ctx: base.Context) -> base.Method:
  model = ctx.model
  class_mask = jnp.asarray(ctx.class_mask)
  n_tasks, n_out = ctx.n_tasks, ctx.n_outputs
  n_mem, n_val = memory_sizes(config)
  rbs = int(config.replay_batch_size)
  k_replay = min(n_mem, rbs)
  k_outer = min(n_tasks * n_val, rbs)
  inner_steps, n_meta = int(config.inner_steps), int(config.n_meta)
  accumulate = bool(config.grad_accumulation)
  drop, fill = bool(config.drop_at_wrap), bool(config.fill_on_first_write)
  if config.meta_gradient not in ("first_order", "unrolled"):
    raise ValueError(f"meta_gradient must be 'first_order' or 'unrolled', "
                     f"got {config.meta_gradient!r}")
  unrolled = config.meta_gradient == "unrolled"
  inner_loss = make_inner_loss(model, class_mask, bool(config.kl_mean))

  def init(key):
    return State(
        variables=model.init(key), hp=base.init_hp(config),
        memory=mem.ring_init(n_tasks, n_mem, ctx.input_shape, ctx.input_dtype),
        gen=mem.ring_init(n_tasks, n_val, ctx.input_shape, ctx.input_dtype),
        soft=jnp.zeros((n_tasks, n_mem, n_out), jnp.float32))

  def begin_task(state, task):
    state = refresh_soft_targets(model, class_mask, state, task)
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

  def observe(state, batch: base.Batch, key):
    t = batch.task
    state, (x, y, valid) = update_memories(state, batch)
    hp = state.hp
    n_outer = jnp.minimum((t + 1) * n_val, rbs)

    def inner_loop(params, batch_stats, keys):
      """K SGD steps from ``params``; returns (params, bs, grad sum)."""

      def step(carry, k):
        p, bs, acc = carry
        replay = draw_replay(state, k, t, k_replay)
        (loss, bs), g = jax.value_and_grad(inner_loss, has_aux=True)(
            p, bs, hp, x, y, valid, t, replay)
        acc = jax.tree_util.tree_map(jnp.add, acc, g) if accumulate else g
        return (base.sgd(p, acc, hp["lr"]), bs, acc), loss

      zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
      (p, bs, acc), losses = jax.lax.scan(step, (params, batch_stats, zeros),
                                          keys)
      return p, bs, acc, losses

    def outer_loss(params, batch_stats, key):
      gt, gs, gmask = mem.draw(state.gen, key, t + 1, k_outer, n_outer)
      (logits,), new = base.apply_many(
          model, {"params": params, "batch_stats": batch_stats},
          [state.gen.x[gt, gs]], True, masks=[gmask])
      return base.masked_ce(logits, state.gen.y[gt, gs], class_mask[gt],
                            gmask), new["batch_stats"]

    def meta_iteration(variables, key):
      keys = jax.random.split(key, inner_steps + 1)
      theta0 = variables
      if unrolled:
        def through(p0):
          pk, bsk, acc, _ = inner_loop(p0, theta0["batch_stats"], keys[:-1])
          lo, bs_out = outer_loss(pk, jax.lax.stop_gradient(bsk), keys[-1])
          return lo, (bs_out, pk, acc)
        (lout, (bs, p, acc)), g_out = jax.value_and_grad(
            through, has_aux=True)(theta0["params"])
      else:
        p, bs, acc, _ = inner_loop(theta0["params"], theta0["batch_stats"],
                                   keys[:-1])
        (lout, bs), g_out = jax.value_and_grad(outer_loss, has_aux=True)(
            p, bs, keys[-1])
      step = jax.tree_util.tree_map(jnp.add, acc, g_out) if accumulate \
          else g_out
      after = {"params": base.sgd(p, step, hp["lr"]), "batch_stats": bs}
      return base.interpolate(theta0, after, hp["beta"]), lout

    variables, louts = jax.lax.scan(meta_iteration, state.variables,
                                    jax.random.split(key, n_meta))
    return state._replace(variables=variables), {"loss": louts[-1]}

  eval_variables = base.make_eval_variables(model, bool(config.adapt),
                                            inner_steps)

  return base.Method("bcl_dual", init, begin_task, observe, eval_variables)
