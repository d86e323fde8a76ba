"""``icarl``: iCaRL (Rebuffi et al. 2017) in the online, task-aware setting.

* Training (``observe``): one SGD step on ``CE(batch over the task's columns)
  + memory_strength * D``. ``D`` distils the stored outputs of the
  exemplars: one exemplar drawn uniformly per class of every earlier task,
  ``D = sum over those rows of KL(softmax(stored) || softmax(net)) / n_c``
  over the row's own task's ``n_c`` columns (temperature 1), which is the
  reference's ``reg * KLDivLoss(...) * nc_per_task`` summed over tasks.
* Exemplars (``end_task``): ``n_memories`` slots IN TOTAL shared by every
  class seen so far, ``m = n_memories // n_seen_classes`` per class. A class
  is a (task, column) pair of the benchmark's class mask, so the 10 digits
  of each permuted-MNIST task are 10 new classes. At the end of task ``t``
  each earlier class keeps the first ``m`` of its herding order (the sets
  shrink as classes arrive) and each of task ``t``'s classes gets the first
  ``m`` of a herding pass over its rows of the task's training data. Then the
  stored outputs (logits) of every exemplar are recomputed with the current
  network, the distillation targets of the next task.
* Herding on the L2-normalised penultimate features ``phi`` (the input of
  the last linear layer, :attr:`Model.features`, inference mode):
  ``mu`` = the mean of ``phi`` over the class's rows, then greedily
  ``p_k = argmin_x ||mu - (phi(x) + sum_{j<k} phi(p_j)) / k||`` over rows not
  yet taken (ties: the lowest row).
* Prediction (``prepare_eval`` / ``predict``): the nearest mean of
  exemplars. ``prepare_eval`` averages the normalised features of each
  class's exemplars and re-normalises; ``predict`` scores column ``c`` of
  task ``j`` with ``-||phi(x) - mu_(j, c)||``, and ``-1e30`` for columns of
  other tasks or classes without exemplars (the loop's argmax over the
  task's columns is then the nearest mean; with no exemplar at all, the
  task's first column, as the reference's uniform output).

Differences from the reference (``model/icarl.py``), on purpose:

* Features are the penultimate representation, normalised, as in the iCaRL
  paper; the reference uses the raw logits (the task's columns for herding,
  all columns for the means) and builds only image networks, so it crashes on
  MNIST. Ours runs on any model with ``features`` (the MLP and both ResNets).
* Herding runs over the task's whole training set as the loop passes it
  (``TaskData``; with ``use`` < 1 that includes rows the stream skipped); the
  reference herds over the first ``n_memories`` samples the stream showed.
* Classes are (task, column) pairs, so tasks sharing label columns (permuted
  MNIST) do not overwrite each other's exemplars; the reference keys them by
  label and divides the budget by ``nc_per_task + #labels stored``.
* Features, means and stored outputs use inference mode (BatchNorm running
  statistics, which they leave alone); the reference runs them in training
  mode. The distillation rows of all earlier tasks go through one forward
  pass (one BatchNorm batch) instead of one per task.

Fixed shapes: the memory is a flat ``[n_memories]`` buffer (inputs in their
stored dtype, class id, herding rank, a mask, stored logits). Costs, with
``S`` classes in all, ``M = n_memories``, ``O`` outputs, ``N`` rows of the
largest task, ``d`` feature width, ``C`` classes per task, ``m_max = M //
C_0`` (``C_0``: the first task's classes):

* memory: ``M`` inputs + ``M * O`` float32 logits + ``3 M`` ints/bools.
* ``observe``: the batch plus ``S`` distillation rows forward and backward
  (rows of tasks not yet finished are masked), and ``O(S * M)`` to draw them.
* ``end_task``: one inference pass over the ``N`` rows and one over the
  ``M`` exemplars; herding ``C * m_max`` steps of ``O(N * d)`` each.
* ``prepare_eval``: one inference pass over the ``M`` exemplars;
  ``predict``: a features pass plus ``O(N * O * d)`` distances.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bcl_jax.methods import api, losses, steps
from bcl_jax.methods import hparams as H

NO_SCORE = -1e30  # columns without a class mean (finite: no NaN downstream)
_CHUNK = 256      # rows per inference pass over a task's data or the memory


class Memory(NamedTuple):
  """The exemplar buffer (slots in no particular order).

  Attributes:
    x: ``[M, *input_shape]`` exemplars, stored dtype.
    cls: ``[M]`` int32 class id (index into the (task, column) pairs).
    rank: ``[M]`` int32 position in its class's herding order.
    filled: ``[M]`` bool, slots holding an exemplar.
    logits: ``[M, O]`` float32 outputs stored for distillation.
  """

  x: jax.Array
  cls: jax.Array
  rank: jax.Array
  filled: jax.Array
  logits: jax.Array


class State(NamedTuple):
  variables: dict
  hp: dict
  memory: Memory


def class_table(class_mask: np.ndarray):
  """Class ids of the (task, column) pairs of a class mask.

  Returns:
    ``(class_of [T, O] int32, -1 off the task; task_of [S] int32;
    columns [T, C] int32 each task's columns padded with 0;
    column_ok [T, C] bool)``.
  """
  mask = np.asarray(class_mask, bool)
  class_of = np.full(mask.shape, -1, np.int32)
  class_of[mask] = np.arange(mask.sum(), dtype=np.int32)
  task_of = np.nonzero(mask)[0].astype(np.int32)
  c = int(mask.sum(1).max())
  columns = np.zeros((mask.shape[0], c), np.int32)
  column_ok = np.zeros((mask.shape[0], c), bool)
  for t in range(mask.shape[0]):
    cols = np.nonzero(mask[t])[0]
    columns[t, :len(cols)] = cols
    column_ok[t, :len(cols)] = True
  return class_of, task_of, columns, column_ok


def normalize(f: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm (zero rows stay zero)."""
  n = jnp.sqrt(jnp.sum(jnp.square(f), -1, keepdims=True))
  return f / jnp.maximum(n, 1e-12)


def herding(feats: jax.Array, member: jax.Array, m: jax.Array, m_max: int):
  """iCaRL's greedy herding order of one class.

  Args:
    feats: ``[N, d]`` normalised features.
    member: ``[N]`` bool, the class's rows.
    m: traced int, exemplars wanted.
    m_max: static length of the order.

  Returns:
    ``(order [m_max] int32 row indices, count)``; the first
    ``count = min(m, #member)`` entries are the exemplars in order.
  """
  n = jnp.sum(member)
  mu = jnp.sum(jnp.where(member[:, None], feats, 0.0), 0) / jnp.maximum(n, 1)
  count = jnp.minimum(m, n).astype(jnp.int32)

  def step(carry, k):
    total, taken = carry
    cost = jnp.sum(jnp.square(mu - (total + feats) / (k + 1.0)), -1)
    i = jnp.argmin(jnp.where(member & ~taken, cost, jnp.inf))
    on = k < count
    taken = taken.at[i].set(taken[i] | on)
    total = total + jnp.where(on, feats[i], 0.0)
    return (total, taken), i.astype(jnp.int32)

  init = (jnp.zeros(feats.shape[1:], feats.dtype), jnp.zeros_like(member))
  _, order = jax.lax.scan(step, init, jnp.arange(m_max))
  return order, count


def chunked(fn, x: jax.Array, chunk: int = _CHUNK) -> jax.Array:
  """``fn`` over ``x``'s rows in chunks of ``chunk`` (bounded activations)."""
  n = x.shape[0]
  if n <= chunk:
    return fn(x)
  n_chunks = -(-n // chunk)
  pad = n_chunks * chunk - n
  xp = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
  out = jax.lax.map(fn, xp.reshape((n_chunks, chunk) + x.shape[1:]))
  return out.reshape((n_chunks * chunk,) + out.shape[2:])[:n]


def distill_loss(logits, stored, cols, valid):
  """``sum_rows KL(softmax(stored) || softmax(logits)) / n_cols(row)`` over
  each row's ``cols`` (temperature 1)."""
  p = losses.soft_targets(stored, cols, 1.0)
  z = jnp.where(cols, logits, -jnp.inf)
  logq = jnp.where(cols, z - jax.nn.logsumexp(z, -1, keepdims=True), 0.0)
  pos = (p > 0) & cols
  logp = jnp.log(jnp.where(pos, p, 1.0))
  per = jnp.sum(jnp.where(pos, p * (logp - logq), 0.0), -1)
  per = per / jnp.maximum(jnp.sum(cols, -1), 1)
  return jnp.sum(jnp.where(valid, per, 0.0))


def draw_per_class(memory: Memory, key: jax.Array, n_classes: int):
  """One exemplar per class, uniform among the class's exemplars.

  Class ``s`` with ``n_s`` exemplars takes herding rank
  ``min(floor(u_s * n_s), n_s - 1)``, ``u = uniform(key, [S])`` (float32).

  Returns:
    ``(slot [S] int32, has [S] bool)``.
  """
  same = (memory.cls[None, :] == jnp.arange(n_classes)[:, None]) & \
      memory.filled[None, :]
  counts = jnp.sum(same, 1)
  u = jax.random.uniform(key, (n_classes,), jnp.float32)
  r = jnp.minimum(jnp.floor(u * counts.astype(jnp.float32)).astype(jnp.int32),
                  counts - 1)
  match = same & (memory.rank[None, :] == r[:, None])
  return jnp.argmax(match, 1).astype(jnp.int32), jnp.any(match, 1)


def make(hp: api.HParams, ctx: api.Context) -> api.Method:
  model = ctx.model
  if model.features is None:
    raise ValueError(f"icarl needs the network's penultimate features; model "
                     f"{model.name!r} does not provide them (use 'mlp', "
                     "'resnet18_reduced' or 'resnet18')")
  class_mask = jnp.asarray(ctx.class_mask)
  table = class_table(ctx.class_mask)
  class_of, task_of, columns, column_ok = map(jnp.asarray, table)
  n_classes = int(table[1].shape[0])
  n_mem = int(hp.n_memories)
  if n_mem < n_classes:
    raise ValueError(f"icarl: n_memories ({n_mem}) is the total exemplar "
                     f"budget and must be at least the number of classes "
                     f"({n_classes}) so every class keeps one; raise "
                     "n_memories")
  m_max = n_mem // int(ctx.class_mask[0].sum())

  def init(key):
    return State(
        variables=model.init(key), hp=api.init_hp(SPEC, hp),
        memory=Memory(
            x=jnp.zeros((n_mem,) + tuple(ctx.input_shape), ctx.input_dtype),
            cls=jnp.full((n_mem,), -1, jnp.int32),
            rank=jnp.zeros((n_mem,), jnp.int32),
            filled=jnp.zeros((n_mem,), bool),
            logits=jnp.zeros((n_mem, ctx.n_outputs), jnp.float32)))

  def observe(state, batch: api.Batch, key):
    t = batch.task
    mem = state.memory
    slot, has = draw_per_class(mem, key, n_classes)
    dmask = has & (task_of < t)
    dx, stored, dcols = mem.x[slot], mem.logits[slot], class_mask[task_of]

    def loss_fn(params, batch_stats, key):
      del key
      (lc, ld), new = steps.apply_many(
          model, {"params": params, "batch_stats": batch_stats},
          [batch.x, dx], True, masks=[batch.valid, dmask])
      loss = (losses.masked_ce(lc, batch.y, class_mask[t], batch.valid)
              + state.hp["memory_strength"]
              * distill_loss(ld, stored, dcols, dmask))
      return loss, new["batch_stats"]

    v, loss, _ = steps.grad_step(loss_fn, state.variables, key,
                                 state.hp["lr"])
    return state._replace(variables=v), {"loss": loss}

  def end_task(state, task, data: api.TaskData):
    v, mem = state.variables, state.memory
    n_rows = data.x.shape[0]
    mm = min(m_max, n_rows)
    m = n_mem // jnp.sum(task_of <= task)
    feats = normalize(chunked(lambda x: model.features(v, x), data.x))
    cols, col_ok = columns[task], column_ok[task]
    member = (data.valid[None, :] & (data.y[None, :] == cols[:, None])
              & col_ok[:, None])
    order, count = jax.vmap(herding, (None, 0, None, None))(
        feats, member, m, mm)
    # Old classes keep the first m of their order; new exemplars follow;
    # the kept slots are packed to the front (they fit: S_seen * m <= M).
    new_ok = jnp.arange(mm)[None, :] < count[:, None]
    ok = jnp.concatenate([mem.filled & (mem.rank < m), new_ok.reshape(-1)])
    dest = jnp.where(ok, jnp.cumsum(ok) - 1, n_mem)
    d_old, d_new = dest[:n_mem], dest[n_mem:]
    new_cls = jnp.broadcast_to(class_of[task, cols][:, None], order.shape)
    new_rank = jnp.broadcast_to(jnp.arange(mm)[None, :], order.shape)

    def pack(empty, old, new):
      return empty.at[d_old].set(old, mode="drop").at[d_new].set(
          new.reshape((-1,) + new.shape[2:]).astype(empty.dtype), mode="drop")

    x = pack(jnp.zeros_like(mem.x), mem.x, data.x[order])
    cls = pack(jnp.full_like(mem.cls, -1), mem.cls, new_cls)
    rank = pack(jnp.zeros_like(mem.rank), mem.rank, new_rank)
    filled = jnp.zeros_like(mem.filled).at[dest].set(True, mode="drop")
    logits = chunked(lambda x: model.apply(v, x, False)[0], x)
    return state._replace(memory=Memory(x, cls, rank, filled, logits))

  def prepare_eval(state, seen):
    del seen  # only finished tasks have exemplars
    v, mem = state.variables, state.memory
    feats = normalize(chunked(lambda x: model.features(v, x), mem.x))
    onehot = ((mem.cls[:, None] == jnp.arange(n_classes)[None, :])
              & mem.filled[:, None]).astype(feats.dtype)
    counts = jnp.sum(onehot, 0)
    means = normalize((onehot.T @ feats) / jnp.maximum(counts, 1)[:, None])
    return v, means, counts > 0

  def predict(prepared, x, task):
    v, means, has = prepared
    f = normalize(model.features(v, x))
    s = class_of[task]
    mu = means[jnp.maximum(s, 0)]
    d2 = (jnp.sum(jnp.square(f), -1)[:, None]
          + jnp.sum(jnp.square(mu), -1)[None, :] - 2.0 * f @ mu.T)
    ok = (s >= 0) & has[jnp.maximum(s, 0)]
    return jnp.where(ok[None, :], -jnp.sqrt(jnp.maximum(d2, 0.0)), NO_SCORE)

  return api.Method(init, api.no_hook, observe, end_task, prepare_eval,
                    predict)


SPEC = api.MethodSpec(
    name="icarl",
    summary="iCaRL: herding exemplars (n_memories in total), distillation "
    "to their stored outputs, nearest-mean-of-exemplars prediction",
    hparams=(H.LR, H.MEMORY_STRENGTH, H.N_MEMORIES),
    make=make)
