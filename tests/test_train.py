"""The continual loop: batching, chunked scan, retracing, evaluation, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcl_jax import evaluation
from bcl_jax import train
from bcl_jax.data.benchmark import Task, make_benchmark

from helpers import batch as make_batch, tiny_config, toy_benchmark


def test_task_order_use_and_short_last_batch():
  index, valid = train.task_order(23, 1.0, 5, seed=0, task=1)
  assert index.shape == (5, 5) and valid.sum() == 23
  assert valid[-1].tolist() == [True, True, True, False, False]
  assert sorted(index[valid].tolist()) == list(range(23))
  again, _ = train.task_order(23, 1.0, 5, seed=0, task=1)
  np.testing.assert_array_equal(index, again)              # reproducible
  other, _ = train.task_order(23, 1.0, 5, seed=0, task=2)
  assert not np.array_equal(index, other)                  # per-task order
  _, v = train.task_order(100, 0.5, 10, seed=0, task=0)
  assert v.sum() == 50                                     # fraction
  _, v = train.task_order(100, 37, 10, seed=0, task=0)
  assert v.sum() == 37 and v.shape == (4, 10)              # count
  i2, v2 = train.task_order(7, 1.0, 5, seed=0, task=0, n_epochs=2)
  assert i2.shape == (4, 5) and v2.sum() == 14             # epochs


@pytest.mark.parametrize("method", ["single", "er", "bcl_dual"])
def test_chunked_scan_equals_a_python_loop(method):
  """Program's chunks (scan + vmap + padding) = observe called step by step."""
  bench = toy_benchmark()
  setup = train.build(tiny_config(method=method), bench)
  run = setup.runs[0]
  state = train.init_state(setup)
  loop_state = jax.tree_util.tree_map(lambda a: a[0], state)
  observe = jax.jit(setup.method.observe)
  begin = jax.jit(setup.method.begin_task)
  for t in range(2):
    task = bench.tasks[t]
    index, valid = train.task_order(task.x_train.shape[0], 1.0, 5, run.seed, t)
    n = index.shape[0]
    keys = jax.random.split(jax.random.PRNGKey(t), 12)
    pad = 12 - n
    idx_p = np.pad(index, ((0, pad), (0, 0)))[None]
    val_p = np.pad(valid, ((0, pad), (0, 0)))[None]
    x_all, y_all = jnp.asarray(task.x_train), jnp.asarray(task.y_train)
    data = train.phase(setup, t).data
    state = train.run_hook(setup, "begin_task", state, t, data)
    for c0 in range(0, 12, 4):
      state, _, _ = train.run_chunk(setup, state, data,
                                 jnp.asarray(idx_p[:, c0:c0 + 4]),
                                 jnp.asarray(val_p[:, c0:c0 + 4]),
                                 keys[None, c0:c0 + 4], t)
    loop_state = begin(loop_state, jnp.int32(t), data)
    for s in range(n):
      loop_state, _ = observe(loop_state, make_batch(
          x_all[index[s]], y_all[index[s]], valid[s], t), keys[s])
  flat_a = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a: np.asarray(a)[0], state))
  flat_b = jax.tree_util.tree_leaves(loop_state)
  assert len(flat_a) == len(flat_b)
  for a, b in zip(flat_a, flat_b):
    np.testing.assert_allclose(a, np.asarray(b), rtol=1e-5, atol=1e-6)


def test_no_retrace_across_tasks_and_learning_happens():
  bench = toy_benchmark(n_tasks=4, n_train=200)
  before = dict(train.TRACE_COUNTS)
  out = train.train_and_evaluate(tiny_config(method="er", lr=0.3), bench,
                                 log=lambda *_: None)
  assert train.TRACE_COUNTS["chunk"] - before["chunk"] == 1
  assert train.TRACE_COUNTS["evaluate"] - before["evaluate"] == 1
  acc = out["accuracy"]
  assert acc.shape == (1, 4, 4)
  assert np.all((acc >= 0) & (acc <= 1))
  # Each task is learned well above chance (4 classes) right after training.
  assert np.diag(acc[0]).mean() > 0.5
  assert out["init_accuracy"].shape == (1, 4)
  t = out["timing"]
  assert t["train_seconds"] > 0 and t["compile_seconds"] > 0
  assert t["steps"] == 4 * 40 and len(t["per_task"]) == 4


def test_same_seed_same_numbers_and_seeds_differ():
  bench = toy_benchmark()
  runs = [train.train_and_evaluate(tiny_config(method="bcl_dual", seed=s),
                                   bench, log=lambda *_: None)["accuracy"]
          for s in (0, 0, 1)]
  np.testing.assert_array_equal(runs[0], runs[1])
  assert not np.array_equal(runs[0], runs[2])


def test_non_finite_loss_names_task_and_step():
  bench = toy_benchmark()
  with pytest.raises(train.TrainingError,
                     match=r"non-finite loss .* at task 0, step \d+ .*lr"):
    train.train_and_evaluate(tiny_config(method="single", lr=1e30), bench,
                             log=lambda *_: None)


def test_task_incremental_evaluation_masks_other_columns():
  """An untrained-but-biased model still scores within its task's columns."""
  rng = np.random.default_rng(0)
  tasks = [Task(rng.random((10, 4)).astype(np.float32),
                np.full(10, 2 * t), rng.random((6, 4)).astype(np.float32),
                np.full(6, 2 * t)) for t in range(2)]
  bench = make_benchmark("ti", tasks, task_incremental=True, n_outputs=4)
  assert bench.class_mask.tolist() == [[True, False, False, False],
                                       [False, False, True, False]]
  # One column per task: every prediction is right whatever the weights.
  setup = train.build(tiny_config(method="single"), bench)
  evaluate = evaluation.Evaluator(setup.method, bench, setup.axis, 1000)
  np.testing.assert_array_equal(evaluate(train.init_state(setup), 0),
                                [[1.0, 1.0]])


def test_learning_curve_points_equal_evaluations_between_steps():
  """lca_curve[t][b] = the accuracy on task t's test set after b of its
  batches, as a step-by-step loop with the evaluator measures it."""
  bench = toy_benchmark(n_tasks=2, n_train=23)
  c = tiny_config(method="er", lca_batches=3, chunk_size=2)
  out = train.train_and_evaluate(c, bench, log=lambda *_: None)
  curve = out["lca_curve"]
  assert curve.shape == (1, 2, 4)
  setup = train.build(c, bench)
  evaluate = evaluation.Evaluator(setup.method, bench, setup.axis,
                                  int(c.eval_batch_size))
  state = train.init_state(setup)
  one = lambda s: jax.tree_util.tree_map(lambda a: a[0], s)
  observe = jax.jit(setup.method.observe)
  for t in range(2):
    ph = train.phase(setup, t)
    index, valid = ph.order[0]
    keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(
        jax.random.PRNGKey(0), 1), t), 6)  # 5 steps, padded to 6
    s = one(state)
    for b in range(4):
      acc = evaluate(jax.tree_util.tree_map(lambda a: a[None], s), t)[0, t]
      np.testing.assert_allclose(curve[0, t, b], acc, atol=1e-6)
      s, _ = observe(s, make_batch(ph.data.x[index[b]], ph.data.y[index[b]],
                                   valid[b], t), keys[b])
    for b in range(4, len(index)):
      s, _ = observe(s, make_batch(ph.data.x[index[b]], ph.data.y[index[b]],
                                   valid[b], t), keys[b])
    state = jax.tree_util.tree_map(lambda a: a[None], s)
  from bcl_jax import metrics
  assert metrics.lca(curve[0]) == pytest.approx(curve[0].mean())


@pytest.mark.parametrize("model, shape", [("mlp", (12,)),
                                          ("resnet18_reduced", (3072,))])
def test_cheaply_compiled_initial_state_is_bit_identical(model, shape):
  # init_state compiles at INIT_COMPILER_OPTIONS on CPU; the values must be
  # those of the fully optimised program, bit for bit (every result starts
  # from them).
  rng = np.random.default_rng(0)
  tasks = [Task(x_train=rng.integers(0, 255, (4,) + shape).astype(np.uint8),
                y_train=np.arange(4) % 2 + 2 * t,
                x_test=rng.integers(0, 255, (2,) + shape).astype(np.uint8),
                y_test=np.arange(2) + 2 * t) for t in range(2)]
  bench = make_benchmark("toy", tasks, n_outputs=4, task_incremental=True)
  setup = train.build(tiny_config(method="bcl_dual", model=model,
                                  num_seeds=2), bench)
  state = train.init_state(setup)
  keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(r.seed), 0)
                    for r in setup.runs])
  full = jax.jit(setup.axis.over_runs(setup.method.init)).lower(keys).compile(
      compiler_options={"xla_backend_optimization_level": 3,
                        "xla_llvm_disable_expensive_passes": False})(keys)
  full = full._replace(hp=state.hp)
  for a, b in zip(jax.tree_util.tree_leaves(state),
                  jax.tree_util.tree_leaves(full)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Two seeds, so the comparison covers more than one key.
  kernel = jax.tree_util.tree_leaves(state.variables["params"])[-1]
  assert not np.array_equal(kernel[0], kernel[1])


def test_compile_preset_values_and_typo():
  assert train.compiler_options("default") == {}
  assert train.compiler_options("fast_compile") == {
      "xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE"}
  assert train.build(tiny_config(), toy_benchmark()).axis.compiler_options \
      == {}
  with pytest.raises(ValueError, match="compile_preset must be one of "
                     "default, fast_compile, fast_runtime; got 'fast'"):
    train.build(tiny_config(compile_preset="fast"), toy_benchmark())


def test_compile_preset_reaches_every_program():
  """The setup's XLA options are those its programs compile with: a value
  XLA refuses fails the run's first compilation."""
  setup = train.build(tiny_config(compile_preset="fast_runtime"),
                      toy_benchmark())
  assert setup.axis.compiler_options == {
      "xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_RUNTIME"}
  setup.axis.compiler_options["xla_cpu_opt_preset"] = "CPU_OPT_PRESET_NONE"
  with pytest.raises(Exception, match="not a valid enum value"):
    train.train_and_evaluate(setup.config, setup.bench, setup=setup,
                             log=lambda *_: None)


@pytest.mark.parametrize("method", ["bcl_dual", "icarl"])
def test_chunk_compiled_ahead_is_used_and_changes_nothing(method, monkeypatch):
  """The first task's chunk step compiles in a background thread from the
  state's shapes alone; the loop must then use that executable (one chunk
  trace, one chunk program) and produce the same numbers as without it."""
  bench = toy_benchmark()
  started = []
  compile_ahead = train.RunAxis.compile_ahead

  def spy(self, name, *a, **k):
    started.append((name, compile_ahead(self, name, *a, **k)))
    return started[-1][1]

  monkeypatch.setattr(train.RunAxis, "compile_ahead", spy)
  before = train.TRACE_COUNTS["chunk"]
  out = train.train_and_evaluate(tiny_config(method=method), bench,
                                 log=lambda *_: None)
  assert started == [("chunk", True)]
  assert train.TRACE_COUNTS["chunk"] - before == 1
  programs = [k[0] for k in out["setup"].axis._compiled]
  assert programs.count("chunk") == 1
  monkeypatch.setattr(train, "COMPILE_AHEAD", False)
  plain = train.train_and_evaluate(tiny_config(method=method), bench,
                                   log=lambda *_: None)
  assert len(started) == 1
  np.testing.assert_array_equal(out["accuracy"], plain["accuracy"])
  for a, b in zip(jax.tree_util.tree_leaves(out["state"]),
                  jax.tree_util.tree_leaves(plain["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
