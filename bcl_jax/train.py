"""The continual loop: phases in order, one compiled scan per chunk.

A run's data arrives in *phases*, one per row of the accuracy matrix. The
method's schedule decides what a phase trains on:

* ``sequential`` (every method but the offline bound): phase ``t`` is task
  ``t``'s single pass (``n_epochs`` passes).
* ``joint`` (the offline upper bound): phases ``0..T-2`` train nothing (their
  rows are the untrained model's accuracies) and phase ``T-1`` trains on
  every task's data together, shuffled across tasks.

Per phase: ``begin_task``; the pass as chunks of one jitted ``lax.scan`` over
batches (``chunk_size`` steps, so a progress bar can advance; the last chunk
and a short last batch are padded and masked, so every chunk of every task
runs the same executable); ``end_task``; evaluation of every task's test set.

Randomness: run ``r`` has root key ``PRNGKey(seed_r)``; initialisation uses
``fold_in(root, 0)``; phase ``t`` uses ``fold_in(fold_in(root, 1), t)`` split
into one key per step; the data order of task ``t`` is
``numpy.random.default_rng([seed_r, t])``. Resuming at a task boundary
therefore needs no stored keys.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bcl_jax import evaluation
from bcl_jax import guard
from bcl_jax import logs
from bcl_jax import methods
from bcl_jax.config import resolve
from bcl_jax.data.benchmark import Benchmark
from bcl_jax.evaluation import TRACE_COUNTS, Evaluator
from bcl_jax.methods import api, steps
from bcl_jax.models import build_model
from bcl_jax.runs import Run, RunAxis, expand_runs, stacked_hp

TRACE_COUNTS["chunk"] = 0  # chunk traces (tests check for retraces)


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss); the message says where."""


@dataclasses.dataclass
class Setup:
  """Everything one experiment builds once: method, runs, devices."""

  config: object          # the resolved config
  bench: Benchmark
  spec: api.MethodSpec
  ctx: api.Context
  method: api.Method
  axis: RunAxis
  # state_template's shapes (immutable), filled on first use.
  template: object = dataclasses.field(default=None, repr=False,
                                       compare=False)

  @property
  def runs(self) -> list[Run]:
    return self.axis.runs


def build(config, bench: Benchmark) -> Setup:
  """Resolves ``config`` and builds the model, the method and the run axis."""
  config = resolve(config)
  spec = methods.get(config.method)
  hp = methods.hparams_of(config)
  model = build_model(config.model, bench.input_shape, bench.n_outputs,
                      tuple(config.hidden), pretrained=config.pretrained)
  ctx = api.Context(model=model, class_mask=bench.class_mask,
                    input_shape=bench.input_shape,
                    input_dtype=bench.tasks[0].x_train.dtype,
                    steps_per_task=steps_per_task(config, bench))
  axis = RunAxis(expand_runs(config, spec.dynamic), config.run_batching,
                 spec.cpu_batching,
                 compiler_options(config.get("compile_preset", "default")))
  return Setup(config, bench, spec, ctx, spec.make(hp, ctx), axis)


COMPILE_PRESETS = {
    "default": None,
    "fast_compile": "CPU_OPT_PRESET_FAST_COMPILE",
    "fast_runtime": "CPU_OPT_PRESET_FAST_RUNTIME",
}


def compiler_options(preset: str) -> dict:
  """XLA options of the run's programs (chunks, hooks, evaluation, initial
  state) from the ``compile_preset`` config field.

  ``"default"``: XLA's own defaults (no option set). ``"fast_compile"`` /
  ``"fast_runtime"``: that ``xla_cpu_opt_preset`` on CPU; off CPU nothing.
  Measured on split CIFAR (``use=500``, 2-core AMD EPYC Zen 4):
  ``fast_compile`` compiles the first task's chunk in 22-24 s instead of
  26-29 s, but its steps ran 0-9% slower depending on the measurement
  (17 tasks' chunks in one process from the same states: 0.991x;
  ``scripts/bench.py``'s 10-step program, two interleaved pairs: early
  +5-9%, late +3%), and on permuted MNIST's MLP ~10% slower with no
  compile saved; so it is an opt-in for runs where compiling dominates
  (short runs, many shapes), not the default.
  """
  if preset not in COMPILE_PRESETS:
    raise ValueError(
        f"compile_preset must be one of {', '.join(COMPILE_PRESETS)}; "
        f"got {preset!r}")
  name = COMPILE_PRESETS[preset]
  if name is None or jax.default_backend() != "cpu":
    return {}
  return {"xla_cpu_opt_preset": name}


# XLA options of the initial state's program on CPU. It runs once per run:
# its ~50 parameter initialisers' random bits (threefry) compile in half the
# time at LLVM's O1 (split CIFAR: 2.7 -> 1.3 s of every cold start) and give
# the same bits (tests/test_train.py compares the two).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def init_state(setup: Setup):
  """The run-batched initial state (hyper-parameters per run), placed."""
  return _init_state(setup, cheap_compile=jax.default_backend() == "cpu")


def _init_state(setup: Setup, cheap_compile: bool):
  axis = setup.axis
  keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(r.seed), 0)
                    for r in axis.runs])
  init = jax.jit(axis.over_runs(setup.method.init))
  if cheap_compile:
    init = init.lower(keys).compile(compiler_options={
        **axis.compiler_options, **INIT_COMPILER_OPTIONS})
  state = init(keys)
  return axis.place_runs(state._replace(
      hp=stacked_hp(axis.runs, setup.spec.dynamic)))


def state_template(setup: Setup):
  """The initial state's shapes and dtypes (restore target), no compute;
  traced once per setup (the experiment's memory check and the loop's
  background compile both ask, on the start-up's critical path)."""
  if setup.template is None:
    setup.template = jax.eval_shape(
        lambda: _init_state(setup, cheap_compile=False))
  return setup.template


# -- data order ------------------------------------------------------------

def steps_per_task(config, bench: Benchmark) -> tuple[int, ...]:
  """Observe steps of each task's sequential pass (any seed)."""
  bsz, use = int(config.batch_size), float(config.use)
  return tuple(math.ceil(_keep_count(t.x_train.shape[0], use) / bsz)
               * int(config.n_epochs) for t in bench.tasks)


def _keep_count(n: int, use: float) -> int:
  keep = int(n * use) if use <= 1 else int(use)
  return max(1, min(keep, n))


def _kept(n: int, use: float, seed: int, task: int) -> np.ndarray:
  return np.random.default_rng([seed, task]).permutation(n)[
      :_keep_count(n, use)]


def _batches(order: np.ndarray, batch_size: int):
  """``[epochs, keep]`` sample order -> batch index and mask arrays.

  Each epoch is its own sequence of batches; an epoch's short last batch is
  not merged with the next epoch's first.
  """
  n_epochs, keep = order.shape
  per_epoch = math.ceil(keep / batch_size)
  index = np.zeros((n_epochs, per_epoch * batch_size), np.int32)
  valid = np.zeros((n_epochs, per_epoch * batch_size), bool)
  index[:, :keep] = order
  valid[:, :keep] = True
  shape = (n_epochs * per_epoch, batch_size)
  return index.reshape(shape), valid.reshape(shape)


def task_order(n: int, use: float, batch_size: int, seed: int, task: int,
               n_epochs: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Batch indices of one task's pass (spec section 1).

  ``use`` keeps ``int(n * use)`` samples if ``use <= 1`` else ``int(use)``,
  chosen by a uniform permutation; they are cut into consecutive batches in
  that order, the last one possibly short; every epoch repeats the order.

  Returns:
    ``(index [steps, batch_size] int32, valid [steps, batch_size] bool)``.
  """
  perm = _kept(n, use, seed, task)
  return _batches(np.tile(perm, (n_epochs, 1)), batch_size)


def joint_order(sizes, use: float, batch_size: int, seed: int,
                n_epochs: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Batch indices into the concatenation of every task's training data.

  Each task keeps the samples its sequential pass would (``use``); the
  union is shuffled anew every epoch (``default_rng([seed, T, epoch])``).
  """
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  kept = np.concatenate([off + _kept(n, use, seed, t)
                         for t, (n, off) in enumerate(zip(sizes, offsets))])
  order = np.stack([np.random.default_rng([seed, len(sizes), e])
                    .permutation(kept) for e in range(n_epochs)])
  return _batches(order, batch_size)


# -- phases ----------------------------------------------------------------

@dataclasses.dataclass
class Phase:
  """What the loop does before accuracy row ``row`` is measured."""

  row: int
  data: api.TaskData | None   # numpy arrays; None: nothing to train
  order: list                 # per run: (index, valid), or [] (no training)


def _task_data(x, y, tasks, n_rows: int) -> api.TaskData:
  """Training arrays padded to ``n_rows`` (one executable for all tasks)."""
  n = x.shape[0]
  valid = np.zeros(n_rows, bool)
  valid[:n] = True
  if n < n_rows:
    x = np.concatenate([x, np.zeros((n_rows - n,) + x.shape[1:], x.dtype)])
    y = np.concatenate([y, np.zeros(n_rows - n, y.dtype)])
    tasks = np.concatenate([tasks, np.zeros(n_rows - n, tasks.dtype)])
  return api.TaskData(x=x, y=y, valid=valid, tasks=tasks)


def phase(setup: Setup, t: int) -> Phase:
  """Phase ``t`` of ``setup``'s schedule."""
  c, tasks = setup.config, setup.bench.tasks
  bsz, use, epochs = int(c.batch_size), float(c.use), int(c.n_epochs)
  if setup.spec.schedule == "sequential":
    task = tasks[t]
    n_rows = max(k.x_train.shape[0] for k in tasks)
    data = _task_data(task.x_train, task.y_train,
                      np.full(task.x_train.shape[0], t, np.int32), n_rows)
    return Phase(t, data, [task_order(task.x_train.shape[0], use, bsz,
                                      r.seed, t, epochs) for r in setup.runs])
  if t < len(tasks) - 1:
    return Phase(t, None, [])
  data = api.TaskData(
      x=np.concatenate([k.x_train for k in tasks]),
      y=np.concatenate([k.y_train for k in tasks]),
      valid=np.ones(sum(k.x_train.shape[0] for k in tasks), bool),
      tasks=np.concatenate([np.full(k.x_train.shape[0], i, np.int32)
                            for i, k in enumerate(tasks)]))
  sizes = [k.x_train.shape[0] for k in tasks]
  return Phase(t, data, [joint_order(sizes, use, bsz, r.seed, epochs)
                         for r in setup.runs])


# -- compiled pieces -------------------------------------------------------

def _chunk_fn(setup: Setup, state, data, index, valid, keys, task, pos,
              tests):
  """``chunk_size`` observe steps of every run (leading run axis).

  ``pos`` (``[chunk]``, shared by the runs) is each step's batch index in
  the task. With ``lca_batches = beta > 0`` the step first measures the
  accuracy on the task's test set (``tests``) when ``pos <= beta``: the
  learning curve after 0..beta batches (LCA); -1 elsewhere.

  Returns:
    ``(state, metrics, lca)``: the method's metrics per step (``[runs,
    chunk]`` each; zeros on padding steps) and ``lca`` ``[runs, chunk]``.
  """
  TRACE_COUNTS["chunk"] += 1
  observe, axis, method = setup.method.observe, setup.axis, setup.method
  beta = lca_batches(setup)
  class_mask = jnp.asarray(setup.bench.class_mask)
  eval_bs = evaluation.batch_size(setup.bench,
                                  int(setup.config.eval_batch_size))

  def curve_point(s, p):
    if not beta:
      return jnp.float32(-1)

    def measure(s):
      x, y, v = (a[task] for a in tests)
      return evaluation.task_accuracy(
          method, class_mask, eval_bs, method.prepare_eval(s, task), x, y, v,
          task).astype(jnp.float32)
    return jax.lax.cond(p <= beta, measure, lambda s: jnp.float32(-1), s)

  def one_run(s, idx, v, k, p):
    lca = curve_point(s, p)
    batch = api.Batch(x=data.x[idx], y=data.y[idx], valid=v, task=task,
                      tasks=data.tasks[idx])
    new, m = observe(s, batch, k)
    return new, (m, lca)

  n_runs = index.shape[0]

  def skip_padding(step, s, idx, v, k, p):
    # Padding steps (after a task's last batch) are the same for every run,
    # so one un-batched predicate skips them: a real branch, which leaves
    # the state (memories included) untouched instead of selecting
    # between two copies of it.
    def zeros(shapes, s):
      return s, jax.tree_util.tree_map(
          lambda a: jnp.zeros(a.shape, a.dtype), shapes[1])
    return steps.cond_or_skip(jnp.any(v), lambda s: step(s, idx, v, k, p),
                              zeros, s)

  if (n_runs == 1 and axis.squeeze_single) or axis.batching == "map":
    # Each run scans its own chunk; runs (if several) one after another.
    def run_scan(s, index, valid, keys):
      def body(s, inp):
        return skip_padding(one_run, s, *inp)
      return jax.lax.scan(body, s, (index, valid, keys, pos))
    state, (m, lca) = axis.over_runs(run_scan)(state, index, valid, keys)
    return state, m, lca

  # vmap: scan over time, all runs batched inside each step.
  step = axis.over_runs(one_run, (0, 0, 0, 0, None))

  def body(s, inp):
    return skip_padding(step, s, *inp)

  state, (m, lca) = jax.lax.scan(
      body, state, (jnp.swapaxes(index, 0, 1), jnp.swapaxes(valid, 0, 1),
                    jnp.swapaxes(keys, 0, 1), pos))
  return state, *jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1),
                                        (m, lca))


def lca_batches(setup: Setup) -> int:
  """``beta`` of the learning curve area (0: off; the joint schedule has
  no per-task learning curve)."""
  if setup.spec.schedule != "sequential":
    return 0
  return max(0, int(setup.config.get("lca_batches", 0)))


def chunk_executable(setup: Setup, state, data, index, valid, keys, pos,
                     tests, *, ahead: bool = False):
  """The compiled chunk step for these shapes (compiled on first use;
  ``state`` is donated): ``f(state, data, index, valid, keys, task, pos,
  tests)``. ``ahead``: trace it here and compile it in a background thread
  (:meth:`RunAxis.compile_ahead`; the arguments may be
  ``jax.ShapeDtypeStruct``); returns whether that started."""
  compile_ = setup.axis.compile_ahead if ahead else setup.axis.compile
  return compile_(
      "chunk", lambda *a: _chunk_fn(setup, *a), state, data, index, valid,
      keys, jax.ShapeDtypeStruct((), jnp.int32), pos, tests, donate=(0,))


def run_chunk(setup: Setup, state, data, index, valid, keys, task: int,
              pos=None, tests=None):
  """One compiled chunk of observe steps; returns ``(state, metrics,
  lca)``. ``pos`` defaults to no learning-curve point (``-1``... beyond
  ``lca_batches``); ``tests`` to the evaluator's test sets."""
  if pos is None:
    pos = jnp.full((index.shape[1],), 1 << 30, jnp.int32)
  if tests is None:
    tests = Evaluator(setup.method, setup.bench, setup.axis,
                      int(setup.config.eval_batch_size)).tests
  fn = chunk_executable(setup, state, data, index, valid, keys, pos, tests)
  return fn(state, data, index, valid, keys, jnp.asarray(task, jnp.int32),
            pos, tests)


def run_hook(setup: Setup, name: str, state, task: int, data):
  """``begin_task`` / ``end_task`` of every run (``state`` is donated)."""
  hook = getattr(setup.method, name)
  if hook is api.no_hook:
    return state
  t = jnp.asarray(task, jnp.int32)
  fn = setup.axis.compile(
      name, lambda s, t, d: setup.axis.over_runs(hook, (0, None, None))(
          s, t, d), state, t, data, donate=(0,))
  return fn(state, t, data)


# -- the loop --------------------------------------------------------------

def _progress(total: int, desc: str, enabled: bool):
  """A tqdm bar (``enabled``: see ``logs.show_progress``)."""
  if not enabled:
    return None
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, unit="step", leave=False,
              dynamic_ncols=True)


@dataclasses.dataclass
class PhaseResult:
  seconds: float = 0.0        # training wall time (compilation excluded)
  steps: int = 0              # observe steps (per run)
  samples: int = 0            # real samples over all runs
  curve: np.ndarray | None = None  # [runs, lca_batches + 1] (NaN: none)


def _phase_steps(setup: Setup, ph: Phase):
  """``(index, valid, pos, n_steps)``: the phase's batches of every run
  (``[runs, steps, batch]``) padded to whole chunks, each step's position
  and the number of real steps."""
  chunk = int(setup.config.chunk_size)
  index = np.stack([o[0] for o in ph.order])
  valid = np.stack([o[1] for o in ph.order])
  # Every run sees the same number of batches (only their order differs),
  # which the chunk step relies on to skip padding for all runs at once.
  assert (valid == valid[:1]).all()
  n_steps = index.shape[1]
  pad = math.ceil(n_steps / chunk) * chunk - n_steps
  index = np.pad(index, ((0, 0), (0, pad), (0, 0)))
  valid = np.pad(valid, ((0, 0), (0, pad), (0, 0)))
  return index, valid, np.arange(n_steps + pad, dtype=np.int32), n_steps


# Compile the first phase's chunk step in a background thread while the
# initial state, the evaluation and the task hooks trace and compile
# (RunAxis.compile_ahead). Split CIFAR, cold, five interleaved pairs: the
# first step 33.0 -> 31.6 s after start (the ~8 s compiled meanwhile share
# the two cores and XLA's compile pool with the chunk's compile). The chunk
# is traced first, in the caller's thread, then compiled in the background
# (three interleaved pairs of cold starts: the chunk's compile began ~3 s
# sooner but, sharing the cores with the rest for longer, ended 34.8 ->
# 34.1 s after start on average, within noise). Env BCL_JAX_COMPILE_AHEAD=0
# turns it off.
COMPILE_AHEAD = os.environ.get("BCL_JAX_COMPILE_AHEAD", "1") != "0"


def compile_chunk_ahead(setup: Setup, ph: Phase, state, tests) -> bool:
  """Starts compiling phase ``ph``'s chunk step in a background thread
  (:meth:`RunAxis.compile_ahead`; ``state`` may be shapes only:
  :func:`state_template`); returns whether it started."""
  if not COMPILE_AHEAD or ph.data is None or not ph.order or not len(
      ph.order[0][0]):
    return False
  chunk = int(setup.config.chunk_size)
  index, valid, _, _ = _phase_steps(setup, ph)
  n_runs = len(setup.runs)
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.PRNGKey(0),
                                                 chunk))

  def spec(a):
    return jax.ShapeDtypeStruct(
        np.shape(a), jax.dtypes.canonicalize_dtype(a.dtype),
        weak_type=bool(getattr(a, "weak_type", False)))

  state, data, index, valid, tests = jax.tree_util.tree_map(spec, (
      state, ph.data, index[:, :chunk], valid[:, :chunk], tests))
  return chunk_executable(
      setup, state, data, index, valid,
      jax.ShapeDtypeStruct((n_runs,) + keys.shape, keys.dtype),
      jax.ShapeDtypeStruct((chunk,), jnp.int32), tests, ahead=True)


def _train_phase(setup: Setup, state, ph: Phase, data, tests, *,
                 desc: str, progress: bool, logger=None, step0: int = 0):
  """The chunks of one phase; returns ``(state, PhaseResult)``."""
  axis, runs = setup.axis, setup.runs
  chunk = int(setup.config.chunk_size)
  beta = lca_batches(setup)
  index, valid, pos, n_steps = _phase_steps(setup, ph)
  n_chunks = len(pos) // chunk
  keys = jnp.stack([
      jax.random.split(jax.random.fold_in(jax.random.fold_in(
          jax.random.PRNGKey(r.seed), 1), ph.row), len(pos))
      for r in runs])
  curve = np.full((len(runs), beta + 1), np.nan)
  out = PhaseResult(steps=n_steps, samples=int(valid.sum()))
  bar = _progress(n_steps, desc, progress)
  try:
    for c in range(n_chunks):
      sl = slice(c * chunk, (c + 1) * chunk)
      args = axis.place_runs((index[:, sl], valid[:, sl], keys[:, sl]))
      p = jnp.asarray(pos[sl])
      chunk_executable(setup, state, data, *args, p, tests)  # untimed
      start = time.perf_counter()
      state, metrics, lca = run_chunk(setup, state, data, *args, ph.row, p,
                                      tests)
      metrics = jax.tree_util.tree_map(np.asarray, metrics)  # blocks
      out.seconds += time.perf_counter() - start
      # SIGINT/SIGTERM stop here, where no computation is in flight.
      guard.check_stop()
      real = valid[0, sl].any(-1)
      losses = metrics["loss"]
      bad = real & ~np.isfinite(losses)
      if bad.any():
        r, k = map(int, np.argwhere(bad)[0])
        raise TrainingError(
            f"non-finite loss ({losses[r, k]}) at task {ph.row}, step "
            f"{c * chunk + k} (run {r}, seed {runs[r].seed}); try a "
            f"smaller lr (now {runs[r].hp.get('lr')})")
      lca = np.asarray(lca)
      for k in np.nonzero(real & (pos[sl] <= beta))[0] if beta else ():
        curve[:, pos[sl][k]] = lca[:, k]
      if logger is not None:
        logger.scalars(step0 + min((c + 1) * chunk, n_steps) - 1,
                       {k: v[:, real].mean(1) for k, v in metrics.items()},
                       prefix="train", task=ph.row)
      if bar is not None:
        bar.update(min(chunk, n_steps - c * chunk))
  finally:
    if bar is not None:
      bar.close()
  out.curve = curve if beta else None
  return state, out


def train_and_evaluate(config, bench: Benchmark, *, setup: Setup | None = None,
                       on_task_end=None, state=None, start_task: int = 0,
                       accuracy=None, init_accuracy=None, lca_curve=None,
                       logger=None, log=print) -> dict:
  """Learns the benchmark phase by phase and evaluates after each.

  Args:
    config: the experiment config (see ``bcl_jax.config``).
    bench: the benchmark.
    setup: ``build(config, bench)``, if the caller has it already.
    on_task_end: optional ``f(task, state, accuracy, init_accuracy,
      lca_curve)`` called after each phase's evaluation, with ``accuracy``
      the ``[runs, task+1, T]`` rows so far and ``lca_curve`` the ``[runs,
      task+1, lca_batches+1]`` learning curves or None (checkpointing hooks
      in here).
    state: a run-batched state to continue from (resume), with
      ``start_task`` the first phase still to run, ``accuracy`` the
      ``[runs, start_task, T]`` rows already computed, ``init_accuracy``
      the untrained model's ``[runs, T]`` accuracies (or None) and
      ``lca_curve`` the curves so far.
    logger: a ``bcl_jax.logs.MetricLogger`` (per-chunk mean metrics, per-task
      accuracies and timing), or None.
    log: where one-line progress messages go.

  Returns:
    A dict with ``accuracy`` (``[runs, T, T]``), ``init_accuracy``
    (``[runs, T]`` or None), ``lca_curve`` (``[runs, T, lca_batches + 1]``
    or None), ``runs``, ``timing``, the final ``state`` and the ``setup``.
  """
  setup = setup or build(config, bench)
  config, axis = setup.config, setup.axis
  n_runs, n_tasks = len(axis), bench.n_tasks
  evaluate = Evaluator(setup.method, bench, axis, int(config.eval_batch_size))
  first = phase(setup, start_task) if start_task < n_tasks else None
  if first is not None:
    compile_chunk_ahead(setup, first, state_template(setup) if state is None
                        else state, evaluate.tests)
  state = init_state(setup) if state is None else axis.place_runs(state)
  init_acc = None if init_accuracy is None else np.asarray(init_accuracy)
  if config.eval_init and start_task == 0:
    init_acc = evaluate(state, -1)
  # rows[k] is [runs, T]: the evaluation after phase k; curves[k] likewise.
  rows = [] if accuracy is None else list(np.moveaxis(np.asarray(accuracy),
                                                      1, 0))
  curves = [] if lca_curve is None else list(np.moveaxis(
      np.asarray(lca_curve), 1, 0))
  progress = logs.show_progress(config)
  step = sum(len(o[0]) for k in range(start_task)
             for o in phase(setup, k).order[:1])
  per_task, train_seconds, total_steps, total_samples = [], 0.0, 0, 0
  for t in range(start_task, n_tasks):
    t_start = time.perf_counter()
    ph = first if t == start_task else phase(setup, t)
    res = PhaseResult()
    if ph.data is not None:
      data = axis.place_shared(ph.data)
      state = run_hook(setup, "begin_task", state, t, data)
      state, res = _train_phase(setup, state, ph, data, evaluate.tests,
                                desc=f"task {t + 1}/{n_tasks}",
                                progress=progress, logger=logger, step0=step)
      state = run_hook(setup, "end_task", state, t, data)
    row = evaluate(state, t)
    rows.append(row)
    if res.curve is not None:
      curves.append(res.curve)
    step += res.steps
    train_seconds += res.seconds
    total_steps += res.steps * n_runs
    total_samples += res.samples
    per_task.append({"task": t, "train_seconds": res.seconds,
                     "seconds": time.perf_counter() - t_start,
                     "steps": res.steps, "samples": res.samples})
    if logger is not None:
      logger.task_end(t, row, {k: v for k, v in per_task[-1].items()
                               if k != "task"})
    mean_row = row.mean(0)
    log(f"task {t + 1}/{n_tasks}: {res.steps} steps in {res.seconds:.2f}s, "
        f"acc so far {mean_row[:t + 1].mean():.4f} "
        f"[{' '.join(f'{a:.3f}' for a in mean_row)}]")
    if on_task_end is not None:
      on_task_end(t, state, np.stack(rows, 1), init_acc,
                  np.stack(curves, 1) if curves else None)
  accuracy = np.stack(rows, 1)  # [runs, T, T]
  timing = {
      "train_seconds": train_seconds,
      "compile_seconds": axis.compile_seconds,
      # Wall time of one (run-batched) observe step.
      "ms_per_step": 1000 * train_seconds / max(total_steps // n_runs, 1),
      "samples_per_second": total_samples / max(train_seconds, 1e-9),
      "steps": total_steps,
      "per_task": per_task,
  }
  return {"accuracy": accuracy, "init_accuracy": init_acc,
          "lca_curve": np.stack(curves, 1) if curves else None,
          "runs": list(axis.runs), "timing": timing, "state": state,
          "setup": setup}
