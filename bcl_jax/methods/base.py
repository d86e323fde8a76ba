"""The method interface and the pieces every method shares.

A method is a factory ``make(config, ctx) -> Method`` returning pure
functions over an arrays-only state (a NamedTuple of arrays), so the state can
be a ``lax.scan`` carry, be ``vmap``ped over runs and be saved by orbax:

* ``init(key) -> state``
* ``begin_task(state, task) -> state``: called once before a task's first
  batch (the reference does this work at the first ``observe`` of a new task).
* ``observe(state, batch, key) -> (state, metrics)``: one online step.
* ``eval_variables(state, seen) -> (variables, per_task)``: the variables to
  evaluate with; ``per_task`` (static) says they carry a leading task axis
  (test-time adaptation makes one copy per task).

Hyper-parameters that do not change shapes live in ``state.hp`` as float32
scalars, so a sweep over them is a ``vmap`` over states.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bcl_jax.models import Model

HP_FIELDS = ("lr", "beta", "memory_strength", "temperature", "adapt_lr")


class Batch(NamedTuple):
  """One online batch: ``valid`` masks padding rows (short last batch)."""

  x: jax.Array
  y: jax.Array
  valid: jax.Array
  task: jax.Array


@dataclasses.dataclass(frozen=True)
class Context:
  """Static facts about the benchmark a method is built for."""

  model: Model
  class_mask: np.ndarray  # bool [n_tasks, n_outputs]
  input_shape: tuple[int, ...]
  input_dtype: Any

  @property
  def n_tasks(self) -> int:
    return int(self.class_mask.shape[0])

  @property
  def n_outputs(self) -> int:
    return int(self.class_mask.shape[1])


class Method(NamedTuple):
  name: str
  init: Callable
  begin_task: Callable
  observe: Callable
  eval_variables: Callable


def init_hp(config) -> dict[str, jax.Array]:
  return {k: jnp.asarray(float(config[k]), jnp.float32) for k in HP_FIELDS}


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
      any_valid = jnp.any(mask)
      new = jax.tree_util.tree_map(lambda a, b: jnp.where(any_valid, a, b),
                                   new, variables)
    variables = new
    outs.append(logits)
  return outs, variables


def masked_ce(logits: jax.Array, y: jax.Array, col_mask: jax.Array,
              valid: jax.Array) -> jax.Array:
  """Mean cross-entropy over valid rows, softmax over ``col_mask`` columns.

  Equal to the reference's CE on the sliced logits with shifted labels.
  ``col_mask`` is ``[O]`` or ``[B, O]``.
  """
  z = jnp.where(col_mask, logits, -jnp.inf)
  lse = jax.nn.logsumexp(z, axis=-1)
  picked = jnp.take_along_axis(logits, y[:, None].astype(jnp.int32), -1)[:, 0]
  per = jnp.where(valid, lse - picked, 0.0)
  return jnp.sum(per) / jnp.maximum(jnp.sum(valid), 1)


def masked_kl(logits: jax.Array, target: jax.Array, col_mask: jax.Array,
              valid: jax.Array, temperature: jax.Array,
              kl_mean: bool) -> jax.Array:
  """``KL(target || softmax(logits / T))`` over each row's own columns.

  ``kl_mean`` (the reference's ``KLDivLoss()`` default) divides the sum by
  the number of (row, column) terms, ``batch * nc_per_task``; otherwise by
  the number of rows (``batchmean``).
  """
  z = jnp.where(col_mask, logits / temperature, -jnp.inf)
  logq = z - jax.nn.logsumexp(z, axis=-1, keepdims=True)
  logq = jnp.where(col_mask, logq, 0.0)
  pos = (target > 0) & col_mask
  logt = jnp.log(jnp.where(pos, target, 1.0))
  per = jnp.sum(jnp.where(pos, target * (logt - logq), 0.0), axis=-1)
  per = jnp.where(valid, per, 0.0)
  if kl_mean:
    denom = jnp.sum(jnp.where(valid, jnp.sum(col_mask, -1), 0))
  else:
    denom = jnp.sum(valid)
  return jnp.sum(per) / jnp.maximum(denom, 1)


def soft_targets(logits: jax.Array, col_mask: jax.Array,
                 temperature: jax.Array) -> jax.Array:
  """softmax(logits / T) over the task's columns, zero elsewhere."""
  z = jnp.where(col_mask, logits / temperature, -jnp.inf)
  return jnp.where(col_mask, jax.nn.softmax(z, axis=-1), 0.0)


def sgd(params, grads, lr):
  return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)


def interpolate(before, after, beta):
  """``before + beta * (after - before)`` leaf by leaf (Reptile step)."""
  return jax.tree_util.tree_map(lambda a, b: a + beta * (b - a), before, after)


def select(pred, on_true, on_false):
  return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b),
                                on_true, on_false)


def adapt_variables(model: Model, variables, x, y, valid, lr, steps: int):
  """Test-time adaptation (spec section 8).

  ``steps`` full-batch SGD steps on the memory ``(x, y)`` with cross-entropy
  over all logits and absolute labels, the network in inference mode.
  """
  def step(v, _):
    def loss(p):
      logits, _ = model.apply({"params": p,
                               "batch_stats": v["batch_stats"]}, x, False)
      all_cols = jnp.ones(logits.shape[-1:], bool)
      return masked_ce(logits, y, all_cols, valid)
    g = jax.grad(loss)(v["params"])
    return {"params": sgd(v["params"], g, lr),
            "batch_stats": v["batch_stats"]}, None

  variables, _ = jax.lax.scan(step, variables, None, length=steps)
  return variables


def adapted_per_task(model: Model, variables, memory, seen, lr, steps: int):
  """One adapted copy per task, made by a ``vmap`` over tasks.

  Tasks ``> seen`` (not learned yet) keep the unadapted variables.
  """
  n_tasks = memory.y.shape[0]

  def one(t):
    adapted = adapt_variables(model, variables, memory.x[t], memory.y[t],
                              memory.filled[t], lr, steps)
    return select(t <= seen, adapted, variables)

  return jax.vmap(one)(jnp.arange(n_tasks))


def make_eval_variables(model: Model, adapt: bool, steps: int = 1):
  """``eval_variables`` of a method: the state's variables, or with test-time
  adaptation one adapted copy per task made from the episodic memory
  ``state.memory`` (``steps`` SGD steps at ``hp["adapt_lr"]``)."""

  def eval_variables(state, seen):
    if adapt:
      return adapted_per_task(model, state.variables, state.memory, seen,
                              state.hp["adapt_lr"], steps), True
    return state.variables, False

  return eval_variables
