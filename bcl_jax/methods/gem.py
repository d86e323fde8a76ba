"""``gem``: Gradient Episodic Memory (Lopez-Paz & Ranzato 2017; spec section 9).

Each batch is written into task ``t``'s ring buffer first (``n_memories``
slots, the reference's ``drop_at_wrap`` quirk; the pointer is not reset at a
task switch, as the reference's ``mem_cnt`` is not). Then the gradient of
every past task's loss on its whole memory (its own logit columns) is taken
in one batched pass (``vmap`` over tasks), and the current batch's gradient
``g``. If ``g`` has a negative dot product with any past gradient it is
replaced by the solution of GEM's dual QP (margin ``memory_strength``,
``eps = 1e-3`` on the Gram diagonal; :mod:`bcl_jax.methods.qp`, solved in
JAX inside the step). One SGD step follows.

Cost: the past-task pass covers a static window of the first ``W`` task rows,
``W`` the smallest of :func:`windows` holding all past tasks
(picked by ``lax.switch`` on the task, which is the same for every run, so
only one window runs); rows of unseen tasks in the window are masked out of
the QP exactly. Task 0 has no past and skips the pass. The window's rows,
Gram matrix and dot products leave the switch padded to ``n_tasks - 1``
rows, so the QP (a ``lax.while_loop``) is compiled once, not once per window
(this halved the step's compile time on permuted MNIST: 10.6 s to 5.5 s).

Differences from the reference (which is otherwise reproduced):

* a past task's loss averages over its *filled* slots; the reference reads
  every slot, uninitialised ones included, for a task with fewer samples than
  ``n_memories`` (a full memory, the usual case, is the same).
* BatchNorm networks: each past task's memory is one forward pass with its
  own batch statistics, as in the reference; the running averages are folded
  in the reference's order (past tasks in order, then the batch) in closed
  form from the batched pass (PyTorch momentum 0.1).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bcl_jax import memory as mem
from bcl_jax.methods import api, losses, qp, steps
from bcl_jax.methods import hparams as H

MARGIN = H.MEMORY_STRENGTH._replace(
    default=0.5, help="GEM's margin: lower bound of the dual QP's variables "
    "(the reference's memory_strength)")

BN_MOMENTUM = 0.1  # bcl_jax.models.resnet.BatchNorm's (PyTorch's) default


class State(NamedTuple):
  variables: dict
  hp: dict
  memory: mem.RingBuffer


def windows(n_tasks: int) -> tuple[int, ...]:
  """Static sizes of the past-task pass: ``0, 1, 2, 3, 4, 6, 8, 12, 16,
  ..., n_tasks - 1`` (powers of two and 1.5 times them).

  Between powers of two alone, the window at task ``t`` computes up to
  ``2t`` rows (10 tasks: 52 task passes over a run where 45 are needed,
  15% wasted); the half steps bring that to 47 (4%) for two more branches
  of the switch to compile.
  """
  out, w = [0], 1
  while w < n_tasks - 1:
    out.append(w)
    if w >= 2 and w + w // 2 < n_tasks - 1:
      out.append(w + w // 2)
    w *= 2
  if n_tasks > 1:
    out.append(n_tasks - 1)
  return tuple(out)


def fold_stats(old, news, updated):
  """Running statistics after EMA updates applied one after another.

  ``news[k]`` is what update ``k`` alone makes of ``old``
  (``(1 - m) old + m s_k``); only rows with ``updated`` True happen, in
  order. Returns ``(1 - m)^n old + sum_k (1 - m)^(#later) (news[k] - (1 - m)
  old)``.
  """
  a = 1.0 - BN_MOMENTUM
  u = updated.astype(jnp.float32)
  later = jnp.sum(u) - jnp.cumsum(u)  # updates after row k
  w = u * a ** later

  def leaf(o, n):
    delta = n - a * o[None]
    return a ** jnp.sum(u) * o + jnp.tensordot(w, delta, axes=1)

  return jax.tree_util.tree_map(leaf, old, news)


def projected_step(state, memory, params, grads, bs_past, bs, bs_cur, loss):
  """The step GEM and A-GEM end with: SGD along the (projected) gradient,
  BatchNorm statistics folded after the memory passes, the new memory."""
  variables = {"params": steps.sgd(params, grads, state.hp["lr"]),
               "batch_stats": chain_after(bs_past, bs, bs_cur)}
  return state._replace(variables=variables, memory=memory), {"loss": loss}


def chain_after(first_new, old, then_new):
  """Stats of update ``then`` applied after ``first`` (both computed from
  ``old``): ``then_new + (1 - m)(first_new - old)``."""
  a = 1.0 - BN_MOMENTUM
  return jax.tree_util.tree_map(lambda f, o, t: t + a * (f - o), first_new,
                                old, then_new)


def ce_grad_of(model, params, batch_stats, x, y, cols, valid):
  """``(loss, grads, batch_stats)`` of the masked CE of one training-mode
  forward pass (``valid`` rows; BatchNorm statistics from them alone)."""
  def loss_fn(p):
    logits, new = model.apply({"params": p, "batch_stats": batch_stats}, x,
                              True, valid)
    return losses.masked_ce(logits, y, cols, valid), new["batch_stats"]
  (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, g, bs


def without(tree, path):
  """``tree`` (nested dicts) without the leaf at ``path``."""
  if len(path) == 1:
    return {k: v for k, v in tree.items() if k != path[0]}
  return {k: without(v, path[1:]) if k == path[0] else v
          for k, v in tree.items()}


def with_leaf(tree, path, leaf):
  """``tree`` with ``leaf`` put at ``path`` (the inverse of ``without``)."""
  out = dict(tree)
  out[path[0]] = leaf if len(path) == 1 else with_leaf(tree[path[0]],
                                                       path[1:], leaf)
  return out


def _write_batch(memory, batch: api.Batch, hp):
  """The batch into its task's ring buffer, before the step (the pointer
  is not reset at a task switch, as the reference's ``mem_cnt`` is not)."""
  return mem.ring_write(memory, batch.task, batch.x, batch.y, batch.valid,
                        drop_at_wrap=hp.drop_at_wrap,
                        fill_on_first_write=False)


def _init(hp, ctx):
  def init(key):
    return State(variables=ctx.model.init(key), hp=api.init_hp(SPEC, hp),
                 memory=mem.ring_for(ctx, int(hp.n_memories)))
  return init


def make(hp: api.HParams, ctx: api.Context) -> api.Method:
  model = ctx.model
  class_mask = jnp.asarray(ctx.class_mask)
  sizes = windows(ctx.n_tasks)
  k_max = max(sizes[-1], 1)  # the QP's size: every past task
  if model.first_dense is not None:
    return _make_factored(hp, ctx, sizes, k_max)

  def ce_grad(*args):
    return ce_grad_of(model, *args)

  def past_pass(w, params, batch_stats, memory, t, g):
    """Tasks ``0..w-1``'s flat gradients (rows ``>= t`` masked), padded
    with zero rows to ``K``; their dot products with ``g`` (padded
    likewise); and the running statistics after their passes."""
    def one(x, y, cols, filled):
      _, g, bs = ce_grad(params, batch_stats, x, y, cols, filled)
      return ravel_pytree(g)[0], bs

    rows, news = jax.vmap(one)(memory.x[:w], memory.y[:w], class_mask[:w],
                               memory.filled[:w])
    active = (jnp.arange(w) < t) & jnp.any(memory.filled[:w], axis=1)
    pad = k_max - w
    return (jnp.pad(rows, ((0, pad), (0, 0))), jnp.pad(rows @ g, (0, pad)),
            jnp.pad(active, (0, pad)), fold_stats(batch_stats, news, active))

  def observe(state, batch: api.Batch, key):
    del key
    t = batch.task
    memory = _write_batch(state.memory, batch, hp)
    params, bs = state.variables["params"], state.variables["batch_stats"]
    loss, g_tree, bs_cur = ce_grad(params, bs, batch.x, batch.y,
                                   class_mask[t], batch.valid)
    g, unravel = ravel_pytree(g_tree)

    def branch(w):
      def run(_):
        if w == 0:
          return (jnp.zeros((k_max, g.shape[0]), g.dtype),
                  jnp.zeros((k_max,), g.dtype), jnp.zeros((k_max,), bool), bs)
        return past_pass(w, params, bs, memory, t, g)
      return run

    # The task is one value for every run: the switch is a real branch, and
    # only the window's gradients are computed. The QP is outside it, so it
    # is compiled once, not once per window.
    which = jnp.searchsorted(jnp.asarray(sizes), t, side="left")
    rows, dots, active, bs_past = jax.lax.switch(
        which, [branch(w) for w in sizes], None)
    violated = jnp.any(active & (dots < 0))

    def project(g, rows, dots, active, margin):
      return qp.project_with(g, rows, rows @ rows.T, dots, active, margin)

    # Most steps violate nothing (permuted MNIST: 55-83% of them): the Gram
    # matrix, the QP and the projection run only on the others, also when
    # the runs are vmapped.
    x = steps.rare_cond(violated, project, lambda g, *_: g, g, rows, dots,
                        active, state.hp["memory_strength"])
    return projected_step(state, memory, params, unravel(x), bs_past, bs,
                          bs_cur, loss)

  return api.Method(_init(hp, ctx), api.no_hook, observe, api.no_hook,
                    *api.plain_eval(model))


def _make_factored(hp, ctx, sizes, k_max) -> api.Method:
  """GEM on a network with a :class:`~bcl_jax.models.FirstDense` (the MLP).

  The same method as :func:`make`'s, computed in another order. The
  violation test needs only the dot products ``<g, g_k>``, and for the
  first layer's kernel ``<X^T dZ, X_k^T dZ_k> = sum((X X_k^T) * (dZ dZ_k^T))``
  with the batch's ``X`` a few rows: so the past-task pass forms every
  gradient but that kernel's (784 x 100 of the MLP's 89,610 parameters per
  past task on permuted MNIST: 40 of ~97 MFLOP of the pass), and the kernel
  rows ``X_k^T dZ_k`` are formed only on the steps that violate a
  constraint, for the Gram matrix and the projection. Dot products sum in
  another order than ``rows @ g``: the results move by float rounding.
  """
  model = ctx.model
  fd = model.first_dense
  class_mask = jnp.asarray(ctx.class_mask)
  n_mem = int(hp.n_memories)

  def grads(params, x, y, cols, valid):
    """``(loss, grads, dZ)``: ``dZ`` the gradient at the first layer's
    output; XLA drops the kernel's gradient where it goes unused."""
    def loss_fn(p, dz):
      return losses.masked_ce(fd.apply({"params": p}, x, dz), y, cols, valid)
    node = params
    for k in fd.kernel:
      node = node[k]
    dz0 = jnp.zeros((x.shape[0], node.shape[-1]), jnp.float32)
    loss, (g, dz) = jax.value_and_grad(loss_fn, (0, 1))(params, dz0)
    return loss, g, dz

  def observe(state, batch: api.Batch, key):
    del key
    t = batch.task
    memory = _write_batch(state.memory, batch, hp)
    params = state.variables["params"]
    loss, g_tree, dz_b = grads(params, batch.x, batch.y, class_mask[t],
                               batch.valid)
    g, unravel = ravel_pytree(g_tree)
    g_rest, unravel_rest = ravel_pytree(without(g_tree, fd.kernel))
    x_b = fd.inputs(batch.x)
    inputs = jax.vmap(fd.inputs)     # [k, n_mem, ...] -> [k, n_mem, D]
    n_rest, n_dz = g_rest.shape[0], dz_b.shape[1]

    def branch(w):
      def run(_):
        if w == 0:
          return (jnp.zeros((k_max, n_rest)), jnp.zeros((k_max, n_mem, n_dz)),
                  jnp.zeros((k_max,)), jnp.zeros((k_max,), bool))
        def one(x, y, cols, filled):
          _, gk, dz = grads(params, x, y, cols, filled)
          return ravel_pytree(without(gk, fd.kernel))[0], dz
        rests, dzs = jax.vmap(one)(memory.x[:w], memory.y[:w],
                                   class_mask[:w], memory.filled[:w])
        # <X_b^T dZ_b, X_k^T dZ_k> through the [B, n_mem] products.
        gram_x = jnp.einsum("id,kad->kia", x_b, inputs(memory.x[:w]))
        gram_z = jnp.einsum("ih,kah->kia", dz_b, dzs)
        dots = jnp.sum(gram_x * gram_z, axis=(1, 2)) + rests @ g_rest
        active = (jnp.arange(w) < t) & jnp.any(memory.filled[:w], axis=1)
        pad = k_max - w
        return (jnp.pad(rests, ((0, pad), (0, 0))),
                jnp.pad(dzs, ((0, pad), (0, 0), (0, 0))),
                jnp.pad(dots, (0, pad)), jnp.pad(active, (0, pad)))
      return run

    which = jnp.searchsorted(jnp.asarray(sizes), t, side="left")
    rests, dzs, dots, active = jax.lax.switch(
        which, [branch(w) for w in sizes], None)
    violated = jnp.any(active & (dots < 0))

    def project(g, rests, dzs, dots, active, margin, x_mem):
      # The full rows, in ravel_pytree's order: the kernel rows X_k^T dZ_k,
      # for the window's tasks only (``which`` is the same for every run).
      def kernels_of(w):
        def f():
          if w == 0:
            return jnp.zeros((k_max, x_b.shape[1], n_dz), dzs.dtype)
          k = jnp.einsum("kad,kah->kdh", inputs(x_mem[:w]), dzs[:w])
          return jnp.pad(k, ((0, k_max - w), (0, 0), (0, 0)))
        return f
      kernels = jax.lax.switch(which, [kernels_of(w) for w in sizes])
      rest_tree = jax.vmap(unravel_rest)(rests)
      rows = jax.vmap(lambda r, k: ravel_pytree(
          with_leaf(r, fd.kernel, k))[0])(rest_tree, kernels)
      return qp.project_with(g, rows, rows @ rows.T, dots, active, margin)

    x = steps.rare_cond(violated, project, lambda g, *_: g, g, rests, dzs,
                        dots, active, state.hp["memory_strength"],
                        memory.x)
    variables = {"params": steps.sgd(params, unravel(x), state.hp["lr"]),
                 "batch_stats": state.variables["batch_stats"]}
    return state._replace(variables=variables, memory=memory), {"loss": loss}

  return api.Method(_init(hp, ctx), api.no_hook, observe, api.no_hook,
                    *api.plain_eval(model))


SPEC = api.MethodSpec(
    name="gem",
    summary="gradient episodic memory: the batch's gradient projected by "
    "GEM's dual QP so no past task's memory loss rises",
    hparams=(H.LR, MARGIN, H.N_MEMORIES, H.DROP_AT_WRAP),
    make=make,
    # Permuted MNIST, 3 seeds, whole run on the 2-core CPU: 127 s of
    # training batched, 310 s one run after another (lax.map).
    cpu_batching="vmap")
