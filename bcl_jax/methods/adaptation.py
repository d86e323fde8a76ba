"""Test-time adaptation (the reference's ``adapt``), as an evaluation pair.

Before evaluating task ``t`` (seen so far), a copy of the network takes
``steps`` full-batch SGD steps at ``hp["adapt_lr"]`` on the task's episodic
memory ``state.memory`` (cross-entropy over all logits with absolute labels,
the copy in inference mode so BatchNorm uses its running statistics); unseen
tasks use the unadapted network. The copies come from one ``vmap`` over
tasks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bcl_jax.methods import api, losses, steps as steps_lib
from bcl_jax.models import Model


def adapt_variables(model: Model, variables, x, y, valid, lr, steps: int):
  """``steps`` full-batch SGD steps on ``(x, y)`` in inference mode."""
  def step(v, _):
    def loss(p):
      logits, _ = model.apply({"params": p,
                               "batch_stats": v["batch_stats"]}, x, False)
      all_cols = jnp.ones(logits.shape[-1:], bool)
      return losses.masked_ce(logits, y, all_cols, valid)
    g = jax.grad(loss)(v["params"])
    return {"params": steps_lib.sgd(v["params"], g, lr),
            "batch_stats": v["batch_stats"]}, None

  variables, _ = jax.lax.scan(step, variables, None, length=steps)
  return variables


def adapted_per_task(model: Model, variables, memory, seen, lr, steps: int):
  """One adapted copy per task (leading task axis); tasks ``> seen`` keep
  the unadapted variables."""
  n_tasks = memory.y.shape[0]

  def one(t):
    adapted = adapt_variables(model, variables, memory.x[t], memory.y[t],
                              memory.filled[t], lr, steps)
    return steps_lib.select(t <= seen, adapted, variables)

  return jax.vmap(one)(jnp.arange(n_tasks))


def evaluation(model: Model, adapt: bool, steps: int = 1):
  """``(prepare_eval, predict)`` of a method with an episodic memory
  ``state.memory``: plain, or with test-time adaptation."""
  if not adapt:
    return api.plain_eval(model)

  def prepare_eval(state, seen):
    return adapted_per_task(model, state.variables, state.memory, seen,
                            state.hp["adapt_lr"], steps)

  def predict(per_task, x, task):
    v = jax.tree_util.tree_map(lambda a: a[task], per_task)
    return model.apply(v, x, False)[0]

  return prepare_eval, predict
