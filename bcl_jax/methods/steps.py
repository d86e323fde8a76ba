"""Gradient steps and forward passes the methods compose.

* :func:`sgd`: one plain SGD step through optax (``optax.sgd``: no momentum,
  no weight decay, the reference's optimiser; its state is empty, so nothing
  is stored).
* :func:`inner_loop`: ``K`` SGD steps as one ``lax.scan``, with the
  reference's ``grad_accumulation`` quirk as a switch.
* :func:`apply_many`: forward passes of several batches with the reference's
  BatchNorm semantics.
* :func:`interpolate` (the Reptile step) and :func:`select`.
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


def has_batch_stats(variables) -> bool:
  return bool(jax.tree_util.tree_leaves(variables["batch_stats"]))


def apply_many(model: Model, variables, xs, train: bool, masks=None):
  """Forward passes of several batches, in order.

  Networks without BatchNorm run them as one concatenated batch (the same
  maths, one matmul); with BatchNorm each batch is its own forward pass, as in
  the reference, each updating the running statistics in turn. A batch whose
  mask is all False leaves the statistics alone.
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
    logits, new = model.apply(variables, x, train) if mask is None else \
        model.apply(variables, x, train, mask)
    if mask is not None and train:
      new = select(jnp.any(mask), new, variables)
    variables = new
    outs.append(logits)
  return outs, variables


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
