"""Gradient steps and forward passes the methods compose.

* :func:`sgd`: one plain SGD step through optax (``optax.sgd``: no momentum,
  no weight decay, the reference's optimiser; its state is empty, so nothing
  is stored).
* :func:`inner_loop`: ``K`` SGD steps as one ``lax.scan``, with the
  reference's ``grad_accumulation`` quirk as a switch.
* :func:`apply_many`: forward passes of several batches with the reference's
  BatchNorm semantics.
* :func:`interpolate` (the Reptile step) and :func:`select`.
* :func:`rare_cond`: a ``lax.cond`` that stays a real branch under ``vmap``.
* :func:`cond_or_skip`: a ``lax.cond`` whose skip branch is built from the
  run branch's output shapes without tracing it twice.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bcl_jax.models import Model


def sgd(params, grads, lr):
  """``params - lr * grads`` as an optax SGD update."""
  tx = optax.sgd(lr)
  updates, _ = tx.update(grads, tx.init(params), params)  # state is empty
  return optax.apply_updates(params, updates)


def interpolate(before, after, beta):
  """``before + beta * (after - before)`` leaf by leaf (Reptile step)."""
  return jax.tree_util.tree_map(lambda a, b: a + beta * (b - a), before, after)


def select(pred, on_true, on_false):
  return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b),
                                on_true, on_false)


def add(a, b):
  return jax.tree_util.tree_map(jnp.add, a, b)


def rare_cond(pred, true_fn: Callable, false_fn: Callable, *operands):
  """``lax.cond(pred, true_fn, false_fn, *operands)`` for a branch that is
  needed rarely, which stays a real branch when vmapped over runs.

  ``vmap`` turns a ``lax.cond`` with a batched predicate into a select: both
  branches run every step. Here, under ``vmap``, ``true_fn`` runs (batched,
  its results selected run by run) only when some run's ``pred`` holds, and
  a batch of one run is squeezed so the plain, unbatched ``lax.cond`` runs
  (XLA:CPU's kernels for a batch dimension of 1 are the slower ones: a
  9 x 89,610 Gram matrix takes 0.6 ms batched, 0.24 ms unbatched). The
  values are those of ``lax.cond``, run by run. Not differentiable.
  """

  @jax.custom_batching.custom_vmap
  def cond(pred, operands):
    return jax.lax.cond(pred, true_fn, false_fn, *operands)

  @cond.def_vmap
  def batched(axis_size, in_batched, pred, operands):
    def full(x, b):
      return x if b else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))
    pred, operands = jax.tree_util.tree_map(full, (pred, operands),
                                            tuple(in_batched))
    if axis_size == 1:
      out = cond(pred[0], jax.tree_util.tree_map(lambda x: x[0], operands))
      out = jax.tree_util.tree_map(lambda x: x[None], out)
    else:
      otherwise = jax.vmap(false_fn)(*operands)
      out = jax.lax.cond(
          jnp.any(pred),
          lambda: select_rows(pred, jax.vmap(true_fn)(*operands), otherwise),
          lambda: otherwise)
    return out, jax.tree_util.tree_map(lambda _: True, out)

  return cond(pred, tuple(operands))


def select_rows(pred, on_true, on_false):
  """Per leading-axis row: ``on_true``'s row where ``pred[row]``."""
  def pick(a, b):
    return jnp.where(pred.reshape(pred.shape + (1,) * (a.ndim - 1)), a, b)
  return jax.tree_util.tree_map(pick, on_true, on_false)


def has_batch_stats(variables) -> bool:
  return bool(jax.tree_util.tree_leaves(variables["batch_stats"]))


def apply_many(model: Model, variables, xs, train: bool, masks=None,
               skippable=()):
  """Forward passes of several batches, in order.

  Networks without BatchNorm run them as one concatenated batch (the same
  maths, one matmul); with BatchNorm each batch is its own forward pass, as in
  the reference, each updating the running statistics in turn. A batch whose
  mask is all False leaves the statistics alone; where ``skippable[i]`` is
  True (a replay batch, all padding for a whole task) such a batch is not
  computed at all (:func:`_apply_if_any`). Only there: a ``lax.cond``
  around every pass would cost ~6% of a full-row split-CIFAR step (fusion
  stops at the branch) for batches that are never empty.
  """
  if not has_batch_stats(variables):
    if len(xs) == 1:
      return [model.apply(variables, xs[0], train)[0]], variables
    sizes = [x.shape[0] for x in xs]
    logits, _ = model.apply(variables, jnp.concatenate(
        [x.astype(jnp.result_type(*[x.dtype for x in xs])) for x in xs]),
                            train)
    return list(jnp.split(logits, np.cumsum(sizes)[:-1])), variables
  outs = []
  for i, x in enumerate(xs):
    mask = None if masks is None else masks[i]
    if mask is None:
      logits, variables = model.apply(variables, x, train)
    elif not train:
      logits, variables = model.apply(variables, x, train, mask)
    elif i < len(skippable) and skippable[i]:
      logits, variables = _apply_if_any(model, variables, x, mask)
    else:
      logits, new = model.apply(variables, x, train, mask)
      variables = select(jnp.any(mask), new, variables)
    outs.append(logits)
  return outs, variables


def _apply_if_any(model: Model, variables, x, mask):
  """A training-mode forward pass of a masked batch, skipped (``lax.cond``)
  when no row is real: zero logits, statistics unchanged.

  The maths is unchanged: an all-padding batch adds zeros to every masked
  loss and gradient and leaves BatchNorm's running statistics alone, so
  running it only costs time. (XLA compiles a branch on its own, so the
  passes that do run may round differently from before the cond existed:
  ~1e-7 relative after a step on the tiny split-CIFAR runs.) The replay
  batch before task 1 is such a batch, and on an image network it is most
  of task 0's step (issue 11: dead rows). Under ``vmap`` (batched runs) the
  cond becomes a select and both branches run.
  """

  def run(v):
    return model.apply(v, x, True, mask)

  def skip(shapes, v):
    return jnp.zeros(shapes[0].shape, shapes[0].dtype), v

  return cond_or_skip(jnp.any(mask), run, skip, variables)


def cond_or_skip(pred, run: Callable, skip: Callable, *operands):
  """``lax.cond(pred, run, skip)`` where ``skip(shapes, *operands)`` gets
  ``run``'s output shapes (``jax.ShapeDtypeStruct`` leaves) to build zeros of.

  The shapes come from the trace ``lax.cond`` makes of ``run`` anyway: asking
  ``jax.eval_shape`` for them instead traces ``run`` a second time, which for
  a training step with its gradients is seconds of every run's start-up
  (3.4 s of 6.8 s for split CIFAR's chunk). Should ``lax.cond`` ever trace
  ``skip`` first, ``skip`` falls back to ``jax.eval_shape``.
  """
  seen = {}

  def run_(*ops):
    out = run(*ops)
    seen["shapes"] = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), out)
    return out

  def skip_(*ops):
    shapes = seen.get("shapes")
    if shapes is None:
      shapes = jax.eval_shape(run, *ops)
    return skip(shapes, *ops)

  return jax.lax.cond(pred, run_, skip_, *operands)


def row_buckets(k: int, smallest: int = 64) -> tuple[int, ...]:
  """Powers of two from ``smallest`` below ``k``, then ``k``: the static
  row counts :func:`first_rows` chooses among.

  Each bucket is one more compiled copy of the network's forward and
  backward pass (~5 s of compilation for the reduced ResNet-18 on 2 CPU
  cores), so the default keeps them few: 64 and 128 for split CIFAR's
  outer draw of 128; :func:`plan_row_buckets` chooses them from the run's
  length where that is known.
  """
  sizes, b = [], smallest
  while b < k:
    sizes.append(b)
    b *= 2
  return tuple(sizes) + (k,)


def plan_row_buckets(k: int, needs, steps, row_seconds: float,
                     compile_seconds: float) -> tuple[int, ...]:
  """The row buckets that minimise the run's modelled time.

  A draw of ``k`` rows has ``needs[t]`` real rows in phase ``t``, which
  runs ``steps[t]`` observe steps; phase ``t`` computes the smallest bucket
  ``>= needs[t]``. The modelled time of a set of buckets is
  ``sum_t steps[t] * bucket(t) * row_seconds`` plus ``compile_seconds``
  per bucket (one more compiled forward + backward pass each). Every
  optimal set is made of need values (a bucket between two needs computes
  rows no phase uses), so a dynamic programme over the sorted distinct
  needs finds the optimum exactly: ``cost[j]``, the cheapest way to serve
  the ``j`` smallest needs with ``needs_j`` the largest bucket, is
  ``min_i cost[i] + needs_j * (steps of needs i+1..j) * row_seconds +
  compile_seconds``. A short run gets few buckets; a long one more, each
  exactly the real rows of some phase.
  """
  need_steps: dict[int, int] = {}
  for n, st in zip(needs, steps):
    n = min(max(int(n), 1), k)
    need_steps[n] = need_steps.get(n, 0) + int(st)
  if not need_steps:
    return (k,)
  sizes = sorted(need_steps)
  cum = np.concatenate([[0], np.cumsum([need_steps[n] for n in sizes])])
  cost = [0.0] + [np.inf] * len(sizes)
  prev = [0] * (len(sizes) + 1)
  for j in range(1, len(sizes) + 1):
    for i in range(j):
      c = (cost[i] + sizes[j - 1] * (cum[j] - cum[i]) * row_seconds
           + compile_seconds)
      if c < cost[j]:
        cost[j], prev[j] = c, i
  chosen, j = [], len(sizes)
  while j > 0:
    chosen.append(sizes[j - 1])
    j = prev[j]
  return tuple(sorted(chosen))


def first_rows(n_needed, buckets: tuple[int, ...], fn: Callable, *args):
  """``fn(b, *args)`` for the smallest bucket ``b >= n_needed``
  (``lax.switch`` over the static sizes).

  For a draw whose real rows come first (:func:`bcl_jax.memory.draw`) and
  whose count is at most ``n_needed``: ``fn(b, ...)`` computes on the first
  ``b`` rows only, so the padding beyond the bucket costs nothing. Each
  bucket is its own compiled branch. ``n_needed`` should not depend on the
  run (e.g. a function of the task), or under ``vmap`` the switch becomes a
  select that runs every bucket.
  """
  if len(buckets) == 1:
    return fn(buckets[0], *args)
  index = jnp.searchsorted(jnp.asarray(buckets), n_needed, side="left")
  index = jnp.minimum(index, len(buckets) - 1)
  return jax.lax.switch(index, [
      lambda *a, b=b: fn(b, *a) for b in buckets], *args)


LossFn = Callable  # (params, batch_stats, key) -> (loss, batch_stats)


def grad_step(loss_fn: LossFn, variables, key, lr):
  """One SGD step on ``loss_fn``; returns ``(variables, loss, grads)``."""
  (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(
      variables["params"], variables["batch_stats"], key)
  return {"params": sgd(variables["params"], g, lr), "batch_stats": bs}, \
      loss, g


def inner_loop(loss_fn: LossFn, variables, keys, lr, accumulate: bool = False):
  """``len(keys)`` SGD steps on ``loss_fn`` as one ``lax.scan``.

  Args:
    loss_fn: ``(params, batch_stats, key) -> (loss, new batch_stats)``; the
      key is the step's own (replay draws).
    variables: ``{"params", "batch_stats"}`` to start from.
    keys: ``[K, 2]`` one key per step.
    lr: learning rate.
    accumulate: the reference's ``grad_accumulation`` quirk: gradients are
      not zeroed between steps, so step ``k`` applies the sum of the
      gradients of steps ``1..k``.

  Returns:
    ``(variables, grad_sum, losses [K])``; ``grad_sum`` is the sum of the
    applied gradients' last value (with ``accumulate``, the sum over steps;
    without, the last step's gradient).
  """

  def step(carry, k):
    v, acc = carry
    (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(
        v["params"], v["batch_stats"], k)
    acc = add(acc, g) if accumulate else g
    return ({"params": sgd(v["params"], acc, lr), "batch_stats": bs},
            acc), loss

  zeros = jax.tree_util.tree_map(jnp.zeros_like, variables["params"])
  (v, acc), losses = jax.lax.scan(step, (variables, zeros), keys)
  return v, acc, losses


def ce_observe(model: Model, columns: Callable):
  """``observe`` of plain fine-tuning: one SGD step on the batch's masked CE.

  ``columns(batch)`` is the column mask (``[O]`` for the batch's task, or
  ``[B, O]`` per row); the state has ``variables`` and ``hp["lr"]``.
  """
  from bcl_jax.methods import losses

  def observe(state, batch, key):
    def loss_fn(params, batch_stats, k):
      del k
      (logits,), new = apply_many(
          model, {"params": params, "batch_stats": batch_stats},
          [batch.x], True, masks=[batch.valid])
      return losses.masked_ce(logits, batch.y, columns(batch),
                              batch.valid), new["batch_stats"]

    v, loss, _ = grad_step(loss_fn, state.variables, key, state.hp["lr"])
    return state._replace(variables=v), {"loss": loss}

  return observe
