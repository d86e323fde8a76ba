"""``ftml`` and ``offline`` against the numpy versions of np_reference_ftml.

ftml: a short 3-task sequence (task switches, a ring row that wraps, a short
last batch) fed to the jitted hooks/observe and to the numpy loop with the
same keys; parameters, memory, loss and the drawn meta tasks agree after
every step. offline: the loop's joint schedule feeds every kept sample of
every task once per epoch, each row is scored on its own task's columns, and
the accuracy rows before the last are the untrained network's.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcl_jax import methods, train
from bcl_jax.data import load_benchmark
from bcl_jax.data.benchmark import Task, make_benchmark
from bcl_jax.methods import api, ftml

import np_reference as ref
import np_reference_ftml as nref
from helpers import batch as make_batch, tiny_config
from data_helpers import _config
from method_helpers import (T, assert_params_close, assert_ring_equal,
                          make_config, make_ctx, np_cfg, stream)


# ------------------------------------------------------------------ ftml --

def run_ftml(c, ctx, check_step=None):
  """Feeds ``stream(ctx)`` to the compiled method and to the numpy loop;
  returns ``(state, numpy params, numpy ring, drawn meta tasks per task)``."""
  method = methods.make(c, ctx)
  cfg = np_cfg(c)
  key = jax.random.PRNGKey(3)
  state = method.init(key)
  P = ref.from_flax(jax.device_get(state.variables["params"]))
  ring = ref.Ring(T, int(c.n_memories), state.memory.x.shape[-1])
  observe, begin = jax.jit(method.observe), jax.jit(method.begin_task)
  chosen = {}
  for t, batches in enumerate(stream(ctx)):
    state = begin(state, jnp.int32(t), None)
    ring.ptr = 0  # the reference resets its pointer at a task switch
    chosen[t] = []
    for b, (x, y, valid) in enumerate(batches):
      k = jax.random.fold_in(key, 100 * t + b)
      state, m = observe(state, make_batch(x, y, valid, t), k)
      P, loss = nref.ftml_observe(P, ring, x[valid], y[valid], t, k, cfg,
                                  ctx.class_mask, chosen[t])
      what = f"task {t} batch {b}"
      assert_ring_equal(state.memory, ring, what)
      assert_params_close(state, P, what)
      np.testing.assert_allclose(float(m["loss"]), loss, rtol=1e-4,
                                 err_msg=what)
  return state, P, ring, chosen


@pytest.mark.parametrize("kw,heads", [
    (dict(inner_steps=1, n_meta=2), "task"),
    (dict(inner_steps=2, n_meta=3), "task"),
    (dict(inner_steps=2, n_meta=2, drop_at_wrap=False), "single"),
], ids=["k1_meta2", "k2_meta3", "no_drop_single_head"])
def test_ftml_matches_numpy(kw, heads):
  c = make_config(method="ftml", n_memories=6, **kw)
  ctx = make_ctx(task_incremental=heads == "task")
  _, _, ring, chosen = run_ftml(c, ctx)
  # The draws are uniform over the seen tasks 0..t, the current one included.
  assert chosen[0] == [0] * len(chosen[0])
  assert set(chosen[2]) <= {0, 1, 2} and len(set(chosen[2])) > 1
  assert any(2 in v for v in chosen.values())
  assert ring.filled.all()  # every row wrapped at least once


def test_ftml_meta_tasks_are_uniform_over_seen_tasks():
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  draws = np.asarray(jax.vmap(lambda k: ftml.meta_tasks(k, jnp.int32(2), 2))(
      keys)).ravel()
  counts = np.bincount(draws, minlength=4)
  assert counts[3] == 0
  np.testing.assert_allclose(counts[:3] / draws.size, 1 / 3, atol=0.02)


def test_ftml_adapt_on_each_seen_memory():
  """``adapt``: each seen task's copy = full-batch SGD on its filled memory
  (CE over every column); unseen tasks keep the trained network."""
  c = make_config(method="ftml", n_memories=6, adapt=True, inner_steps=2)
  ctx = make_ctx()
  state, P, ring, _ = run_ftml(c, ctx)
  method = methods.make(c, ctx)
  seen = 1
  per_task = jax.jit(method.prepare_eval)(state, jnp.int32(seen))
  for t in range(T):
    f = ring.filled[t]
    expect = (ref.adapt(P, ring.x[t][f], ring.y[t][f], c.adapt_lr,
                        c.inner_steps) if t <= seen else P)
    got = ref.from_flax(jax.tree_util.tree_map(lambda a: np.asarray(a)[t],
                                               per_task["params"]))
    for lg, le in zip(got, expect):
      for a, b in zip(lg, le):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


# --------------------------------------------------------------- offline --

def task_incremental_toy(sizes=(41, 30, 35), n_test=40, seed=0):
  """3 tasks of different sizes, 2 classes each (columns 2t, 2t+1)."""
  rng = np.random.default_rng(seed)
  tasks = []
  for t, n in enumerate(sizes):
    w = rng.normal(size=(8,))

    def make(n):
      x = rng.random((n, 8)).astype(np.float32)  # in [0, 1], as required
      return x, (2 * t + (x @ w > 0)).astype(np.int64)

    # Both classes occur in each task (the benchmark derives the heads).
    xtr, ytr = make(n)
    ytr[:2] = [2 * t, 2 * t + 1]
    xte, yte = make(n_test)
    yte[:2] = [2 * t, 2 * t + 1]
    tasks.append(Task(xtr, ytr, xte, yte, descriptor=t))
  return make_benchmark("toy_ti", tasks, task_incremental=True)


def offline_config(**kw):
  return tiny_config(method="offline", n_tasks=0, use=0.75, n_epochs=2,
                     batch_size=4, lr=0.5, **kw)


def test_joint_phase_covers_every_kept_sample_once_per_epoch():
  bench = task_incremental_toy()
  setup = train.build(offline_config(num_seeds=2), bench)
  sizes = [k.x_train.shape[0] for k in bench.tasks]
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  for t in range(T - 1):
    ph = train.phase(setup, t)
    assert ph.row == t and ph.data is None and ph.order == []
  ph = train.phase(setup, T - 1)
  data = ph.data
  np.testing.assert_array_equal(data.tasks, np.repeat(np.arange(T), sizes))
  np.testing.assert_array_equal(
      data.y, np.concatenate([k.y_train for k in bench.tasks]))
  orders = []
  for run, (index, valid) in zip(setup.runs, ph.order):
    # The samples each task's sequential pass would keep (use = 0.75).
    kept = []
    for t, (n, off) in enumerate(zip(sizes, offsets)):
      i, v = train.task_order(n, 0.75, 4, run.seed, t)
      assert v.sum() == int(0.75 * n)
      kept.append(off + i[v])
    kept = np.sort(np.concatenate(kept))
    per_epoch = int(np.ceil(kept.size / 4))
    assert index.shape == (2 * per_epoch, 4)
    epochs = []
    for e in range(2):
      rows = slice(e * per_epoch, (e + 1) * per_epoch)
      seen = index[rows][valid[rows]]
      np.testing.assert_array_equal(np.sort(seen), kept)  # each once
      epochs.append(seen)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled per epoch
    assert len(set(data.tasks[epochs[0][:4]])) > 1 or \
        len(set(data.tasks[epochs[0][4:8]])) > 1  # mixed across tasks
    orders.append(index)
  assert not np.array_equal(orders[0], orders[1])  # seeds differ


def test_offline_observe_scores_each_row_on_its_own_task():
  bench = task_incremental_toy()
  c = methods.hparams_of(offline_config())
  setup = train.build(offline_config(), bench)
  method = setup.method
  state = method.init(jax.random.PRNGKey(1))
  P = ref.from_flax(jax.device_get(state.variables["params"]))
  rng = np.random.default_rng(0)
  x = rng.random((6, 8)).astype(np.float32)
  tasks = np.array([0, 2, 1, 1, 0, 2], np.int32)
  y = (2 * tasks + rng.integers(0, 2, 6)).astype(np.int32)
  valid = np.arange(6) < 5  # a short batch
  b = api.Batch(jnp.asarray(x), jnp.asarray(y), jnp.asarray(valid),
                jnp.int32(T - 1), jnp.asarray(tasks))
  new, m = jax.jit(method.observe)(state, b, jax.random.PRNGKey(2))
  expect = nref.offline_step(P, x[valid], y[valid], tasks[valid], c.lr,
                             bench.class_mask)
  assert_params_close(new, expect, "offline step")
  # Scoring every row on the last task's columns would be another step.
  wrong = nref.offline_step(P, x[valid], y[valid],
                            np.full(5, T - 1), c.lr, bench.class_mask)
  assert not np.allclose(ref.from_flax(jax.device_get(
      new.variables["params"]))[0][0], wrong[0][0], atol=1e-6)
  assert np.isfinite(float(m["loss"]))


def test_offline_run_matches_numpy_joint_training():
  """The whole run: rows 0..T-2 are the untrained network's accuracies and
  the last row is the network trained on the joint phase's batches."""
  bench = task_incremental_toy()
  config = offline_config()
  out = train.train_and_evaluate(config, bench, log=lambda *_: None)
  setup = out["setup"]
  acc = out["accuracy"][0]
  P0 = ref.from_flax(jax.device_get(jax.tree_util.tree_map(
      lambda a: a[0], train.init_state(setup).variables["params"])))
  cm = bench.class_mask

  def row(P):
    return [nref.task_aware_accuracy(P, k.x_test, k.y_test, cm[j])
            for j, k in enumerate(bench.tasks)]

  untrained = row(P0)
  for r in range(T - 1):
    np.testing.assert_allclose(acc[r], untrained, atol=1e-6)
  np.testing.assert_allclose(out["init_accuracy"][0], untrained, atol=1e-6)
  ph = train.phase(setup, T - 1)
  index, valid = ph.order[0]
  P = copy.deepcopy(P0)
  for i, v in zip(index, valid):
    P = nref.offline_step(P, ph.data.x[i[v]], ph.data.y[i[v]],
                          ph.data.tasks[i[v]], config.lr, cm)
  np.testing.assert_allclose(acc[T - 1], row(P), atol=1e-6)
  final = jax.tree_util.tree_map(lambda a: a[0], out["state"])
  assert_params_close(final, P, "after the joint phase")
  assert out["timing"]["per_task"][T - 1]["steps"] == index.shape[0]
  assert all(p["steps"] == 0 for p in out["timing"]["per_task"][:T - 1])
  assert np.mean(acc[T - 1]) > np.mean(untrained) + 0.1  # it learned


# ------------------------------------------------- tiny split CIFAR (BN) --

@pytest.mark.slow
@pytest.mark.parametrize("name", ["ftml", "offline"])
def test_tiny_split_cifar_with_batchnorm(name, cifar_data):
  """Both methods end to end on a reduced ResNet-18 (BatchNorm), 2 tasks."""
  config = _config("cifar", data_path=str(cifar_data), method=name)
  bench = load_benchmark(config)
  out = train.train_and_evaluate(config, bench, log=lambda *_: None)
  setup = out["setup"]
  assert setup.ctx.model.name == "resnet18_reduced"
  acc = out["accuracy"][0]
  assert acc.shape == (2, 2) and np.all((acc >= 0) & (acc <= 1))
  start = train.init_state(setup).variables["batch_stats"]
  end = out["state"].variables["batch_stats"]
  for before, after in zip(jax.tree_util.tree_leaves(start),
                           jax.tree_util.tree_leaves(end)):
    assert np.all(np.isfinite(after))
    assert not np.allclose(before, after)  # every BN layer trained
  if name == "offline":  # nothing learned before the last task
    np.testing.assert_allclose(acc[0], out["init_accuracy"][0], atol=1e-6)
