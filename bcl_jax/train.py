"""The continual loop: tasks in order, one compiled scan per chunk of a task.

Per task: ``begin_task``, then the task's single pass as one jitted
``lax.scan`` over batches, run in chunks of ``chunk_size`` steps so a progress
bar can advance; the last chunk and the short last batch are padded and
masked, so every chunk of every task runs the same executable. Then every
task's test set is evaluated, giving one row of the accuracy matrix.

Runs (seeds, and hyper-parameter settings of a sweep) are a leading axis of
the method state: the step is ``vmap``ped over it, so ``num_seeds`` runs are
one program. The task's data is placed on the device once and shared by all
runs; only the batch indices differ per run.

Randomness: run ``r`` has root key ``PRNGKey(seed_r)``; initialisation uses
``fold_in(root, 0)``; task ``t`` uses ``fold_in(fold_in(root, 1), t)`` split
into one key per step; the data order of task ``t`` is
``numpy.random.default_rng([seed_r, t])``. Resuming at a task boundary
therefore needs no stored keys.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bcl_jax import methods
from bcl_jax.data.benchmark import Benchmark
from bcl_jax.methods import base
from bcl_jax.models import build_model

# Incremented each time the chunk step is traced (tests check for retraces).
TRACE_COUNTS = {"chunk": 0, "evaluate": 0}


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss); the message says where."""


@dataclasses.dataclass
class Run:
  """One run of a program: a seed and its hyper-parameter values."""

  seed: int
  hp: dict[str, float]


def expand_runs(config) -> list[Run]:
  """The runs of a config: ``num_seeds`` seeds (x the sweep grid, if any)."""
  from bcl_jax import sweep  # local: sweep imports config helpers only
  grid = sweep.parse(config.sweep) if config.sweep else [{}]
  n = int(config.num_seeds)
  if n < 1:
    raise ValueError(f"num_seeds must be >= 1, got {n}")
  runs = []
  for point in grid:
    hp = {k: float(config[k]) for k in base.HP_FIELDS}
    hp.update(point)
    for s in range(n):
      runs.append(Run(seed=int(config.seed) + s, hp=hp))
  return runs


def task_order(n: int, use: float, batch_size: int, seed: int, task: int,
               n_epochs: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Batch indices of one task's pass (spec section 1).

  ``use`` keeps ``int(n * use)`` samples if ``use <= 1`` else ``int(use)``,
  chosen by a uniform permutation; they are cut into consecutive batches in
  that order, the last one possibly short.

  Returns:
    ``(index [steps, batch_size] int32, valid [steps, batch_size] bool)``.
  """
  keep = int(n * use) if use <= 1 else int(use)
  keep = max(1, min(keep, n))
  perm = np.random.default_rng([seed, task]).permutation(n)[:keep]
  # Each epoch is its own sequence of batches over the same order; an
  # epoch's short last batch is not merged with the next epoch's first.
  per_epoch = math.ceil(keep / batch_size)
  index = np.zeros((n_epochs, per_epoch * batch_size), np.int32)
  valid = np.zeros((n_epochs, per_epoch * batch_size), bool)
  index[:, :keep] = perm
  valid[:, :keep] = True
  shape = (n_epochs * per_epoch, batch_size)
  return index.reshape(shape), valid.reshape(shape)


def _stack_tests(bench: Benchmark, eval_bs: int):
  """All test sets as ``[T, N_max]`` arrays padded to a multiple of eval_bs."""
  n_max = max(t.x_test.shape[0] for t in bench.tasks)
  n_pad = max(1, math.ceil(n_max / eval_bs)) * eval_bs
  shape = bench.tasks[0].x_test.shape[1:]
  dtype = bench.tasks[0].x_test.dtype
  x = np.zeros((bench.n_tasks, n_pad) + shape, dtype)
  y = np.zeros((bench.n_tasks, n_pad), np.int32)
  valid = np.zeros((bench.n_tasks, n_pad), bool)
  for i, t in enumerate(bench.tasks):
    n = t.x_test.shape[0]
    x[i, :n], y[i, :n], valid[i, :n] = t.x_test, t.y_test, True
  return x, y, valid


class Program:
  """The compiled pieces of one experiment: chunk step, evaluation, init.

  Everything takes and returns run-batched states (leading axis = run).
  """

  def __init__(self, config, bench: Benchmark, runs: list[Run]):
    self.config = config
    self.bench = bench
    self.runs = runs
    model = build_model(config.model, bench.input_shape, bench.n_outputs,
                        tuple(config.hidden), pretrained=config.pretrained)
    x0 = bench.tasks[0].x_train
    self.ctx = base.Context(model=model, class_mask=bench.class_mask,
                            input_shape=bench.input_shape,
                            input_dtype=x0.dtype)
    self.method = methods.make(config, self.ctx)
    self.model = model
    self.chunk = int(config.chunk_size)
    self.eval_bs = int(config.eval_batch_size)
    self._compiled: dict[str, Any] = {}
    self.compile_seconds = 0.0
    self._setup_sharding()
    mode = config.get("run_batching", "auto")
    if mode not in ("auto", "vmap", "map"):
      raise ValueError(f"run_batching must be 'auto', 'vmap' or 'map', got "
                       f"{mode!r}")
    if mode == "auto":
      mode = "map" if (jax.default_backend() == "cpu"
                       and self.n_shards == 1) else "vmap"
    self.run_batching = mode

  # -- runs and devices -----------------------------------------------------
  def _setup_sharding(self):
    """Shards the run axis over the devices (all of them if they divide it).

    With one device (or one run) nothing is sharded. Otherwise the mesh has
    the largest number of devices that divides the number of runs; the
    per-task data and test sets are replicated, so each device holds its own
    runs' states and one copy of the data.
    """
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    devices = jax.devices()
    n = len(self.runs)
    k = max(d for d in range(1, len(devices) + 1) if n % d == 0)
    self.n_shards = k
    if k == 1:
      self.run_sharding = self.replicated = None
      return
    mesh = Mesh(np.array(devices[:k]), ("runs",))
    self.run_sharding = NamedSharding(mesh, PartitionSpec("runs"))
    self.replicated = NamedSharding(mesh, PartitionSpec())

  def place_runs(self, tree):
    """Puts run-batched arrays on the devices, split along the run axis."""
    if self.run_sharding is None:
      return jax.tree_util.tree_map(jnp.asarray, tree)
    return jax.device_put(tree, self.run_sharding)

  def place_shared(self, tree):
    """Puts arrays every run reads (task data) on the devices once."""
    if self.replicated is None:
      return jax.tree_util.tree_map(jnp.asarray, tree)
    return jax.device_put(tree, self.replicated)

  def over_runs(self, f, in_axes=0):
    """``f`` applied to every run (leading axis) of its ``in_axes == 0``
    arguments.

    One run: ``f`` itself on the squeezed arguments (the same maths, without
    batched kernels). Several: ``vmap`` (``run_batching = "vmap"``, the
    default on accelerators and whenever the runs are sharded), or a
    sequential ``lax.map`` inside the compiled step (``"map"``, the default
    on a single CPU device, where batched matmuls of small per-run weights
    run slower than the runs one after the other).
    """
    axes = tuple(in_axes) if isinstance(in_axes, (tuple, list)) else None

    def split(args):
      ax = axes or (in_axes,) * len(args)
      return ax, [x for x, a in zip(args, ax) if a == 0]

    def merge(args, ax, batched):
      it = iter(batched)
      return [next(it) if a == 0 else x for x, a in zip(args, ax)]

    if len(self.runs) == 1:
      def single(*args):
        ax, batched = split(args)
        batched = [jax.tree_util.tree_map(lambda a: a[0], b) for b in batched]
        return jax.tree_util.tree_map(lambda a: a[None],
                                      f(*merge(args, ax, batched)))
      return single
    if self.run_batching == "map":
      def mapped(*args):
        ax, batched = split(args)
        return jax.lax.map(lambda b: f(*merge(args, ax, b)), tuple(batched))
      return mapped
    return jax.vmap(f, in_axes=in_axes)

  # -- initial state --------------------------------------------------------
  def init(self):
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(r.seed), 0)
                      for r in self.runs])
    state = jax.jit(self.over_runs(self.method.init))(keys)
    hp = {k: jnp.asarray([r.hp[k] for r in self.runs], jnp.float32)
          for k in base.HP_FIELDS}
    return self.place_runs(state._replace(hp=hp))

  # -- compiled functions ---------------------------------------------------
  def _compile(self, name: str, fn: Callable, *args, donate=()):
    if name not in self._compiled:
      start = time.perf_counter()
      kw = {}
      if self.run_sharding is not None:
        # Every output (states, losses, accuracies) has the run axis first;
        # pinning it keeps the state's layout the same from call to call.
        kw["out_shardings"] = self.run_sharding
      self._compiled[name] = jax.jit(fn, donate_argnums=donate, **kw).lower(
          *args).compile()
      self.compile_seconds += time.perf_counter() - start
    return self._compiled[name]

  def _chunk_fn(self, state, x_all, y_all, index, valid, keys, task):
    TRACE_COUNTS["chunk"] += 1
    observe = self.method.observe

    def one_run(s, idx, v, k):
      batch = base.Batch(x=x_all[idx], y=y_all[idx], valid=v, task=task)
      new, m = observe(s, batch, k)
      return new, m["loss"]

    n_runs = index.shape[0]

    def skip_padding(step, s, idx, v, k, zeros):
      # Padding steps (after a task's last batch) are the same for every run,
      # so one un-batched predicate skips them: a real branch, which leaves
      # the state (memories included) untouched instead of selecting
      # between two copies of it.
      return jax.lax.cond(jnp.any(v), lambda s: step(s, idx, v, k),
                          lambda s: (s, zeros), s)

    if n_runs == 1 or self.run_batching == "map":
      # Each run scans its own chunk; runs (if several) one after another.
      def run_scan(s, index, valid, keys):
        def body(s, inp):
          return skip_padding(one_run, s, *inp, jnp.zeros((), jnp.float32))
        return jax.lax.scan(body, s, (index, valid, keys))
      return self.over_runs(run_scan)(state, index, valid, keys)

    # vmap: scan over time, all runs batched inside each step.
    step = self.over_runs(one_run)

    def body(s, inp):
      return skip_padding(step, s, *inp, jnp.zeros((n_runs,), jnp.float32))

    state, losses = jax.lax.scan(
        body, state, (jnp.swapaxes(index, 0, 1), jnp.swapaxes(valid, 0, 1),
                      jnp.swapaxes(keys, 0, 1)))
    return state, jnp.swapaxes(losses, 0, 1)

  def _begin_fn(self, state, task):
    return self.over_runs(self.method.begin_task, (0, None))(state, task)

  def _eval_fn(self, state, x, y, valid, seen):
    TRACE_COUNTS["evaluate"] += 1
    model, class_mask = self.model, jnp.asarray(self.bench.class_mask)
    n_chunks = x.shape[1] // self.eval_bs

    def one_run(s):
      variables, per_task = self.method.eval_variables(s, seen)

      def one_task(j):
        v = jax.tree_util.tree_map(lambda a: a[j], variables) if per_task \
            else variables
        xs = x[j].reshape((n_chunks, self.eval_bs) + x.shape[2:])

        def logits_of(xb):
          return model.apply(v, xb, False)[0]
        logits = jax.lax.map(logits_of, xs).reshape(
            (x.shape[1], class_mask.shape[1]))
        pred = jnp.argmax(jnp.where(class_mask[j], logits, -jnp.inf), -1)
        correct = jnp.sum((pred == y[j]) & valid[j])
        return correct / jnp.maximum(jnp.sum(valid[j]), 1)

      return jax.lax.map(one_task, jnp.arange(x.shape[0]))

    return self.over_runs(one_run)(state)

  def begin_task(self, state, task: int):
    t = jnp.asarray(task, jnp.int32)
    return self._compile("begin", self._begin_fn, state, t, donate=(0,))(
        state, t)

  def compile_chunk(self, state, x_all, y_all, index, valid, keys):
    return self._compile("chunk", self._chunk_fn, state, x_all, y_all, index,
                         valid, keys, jnp.zeros((), jnp.int32), donate=(0,))

  def run_chunk(self, state, x_all, y_all, index, valid, keys, task: int):
    fn = self.compile_chunk(state, x_all, y_all, index, valid, keys)
    return fn(state, x_all, y_all, index, valid, keys,
              jnp.asarray(task, jnp.int32))

  def evaluate(self, state, tests, seen: int) -> np.ndarray:
    s = jnp.asarray(seen, jnp.int32)
    fn = self._compile("eval", self._eval_fn, state, *tests, s)
    return np.asarray(fn(state, *tests, s))


def _progress(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, unit="step", leave=False,
              dynamic_ncols=True)


def train_and_evaluate(config, bench: Benchmark, *, on_task_end=None,
                       state=None, start_task: int = 0,
                       accuracy=None, init_accuracy=None, log=print) -> dict:
  """Learns the tasks of ``bench`` in order and evaluates after each.

  Args:
    config: the experiment config (see ``bcl_jax.config``).
    bench: the benchmark.
    on_task_end: optional ``f(task, state, accuracy, init_accuracy)`` called
      after each task's evaluation, with ``accuracy`` the ``[runs, task+1,
      T]`` rows so far (checkpointing hooks in here).
    state: a run-batched state to continue from (resume), with
      ``start_task`` the first task still to learn, ``accuracy`` the
      ``[runs, start_task, T]`` rows already computed and ``init_accuracy``
      the untrained model's ``[runs, T]`` accuracies (or None).
    log: where one-line progress messages go.

  Returns:
    A dict with ``accuracy`` (``[runs, T, T]``), ``init_accuracy``
    (``[runs, T]`` or None), ``runs``, ``timing`` and the final ``state``.
  """
  runs = expand_runs(config)
  prog = Program(config, bench, runs)
  n_runs, n_tasks, bsz = len(runs), bench.n_tasks, int(config.batch_size)
  state = prog.init() if state is None else prog.place_runs(state)
  tests = prog.place_shared(_stack_tests(bench, prog.eval_bs))
  init_acc = None if init_accuracy is None else np.asarray(init_accuracy)
  if config.eval_init and start_task == 0:
    init_acc = prog.evaluate(state, tests, -1)
  # rows[k] is [runs, T]: the evaluation after task k.
  rows = [] if accuracy is None else list(np.moveaxis(np.asarray(accuracy),
                                                      1, 0))
  per_task, train_seconds, total_steps, total_samples = [], 0.0, 0, 0
  for t in range(start_task, n_tasks):
    task = bench.tasks[t]
    t_start = time.perf_counter()
    order = [task_order(task.x_train.shape[0], float(config.use), bsz,
                        r.seed, t, int(config.n_epochs)) for r in runs]
    index = np.stack([o[0] for o in order])
    valid = np.stack([o[1] for o in order])
    # Every run sees the same number of batches (only their order differs),
    # which the chunk step relies on to skip padding for all runs at once.
    assert (valid == valid[:1]).all()
    n_steps = index.shape[1]
    n_chunks = math.ceil(n_steps / prog.chunk)
    pad = n_chunks * prog.chunk - n_steps
    index = np.pad(index, ((0, 0), (0, pad), (0, 0)))
    valid = np.pad(valid, ((0, 0), (0, pad), (0, 0)))
    keys = jnp.stack([
        jax.random.split(jax.random.fold_in(jax.random.fold_in(
            jax.random.PRNGKey(r.seed), 1), t), n_steps + pad)
        for r in runs])
    x_all, y_all = prog.place_shared((task.x_train, task.y_train))
    state = prog.begin_task(state, t)
    bar = _progress(n_steps, f"task {t + 1}/{n_tasks}", config.progress)
    task_train = 0.0
    for c in range(n_chunks):
      sl = slice(c * prog.chunk, (c + 1) * prog.chunk)
      args = (x_all, y_all, *prog.place_runs(
          (index[:, sl], valid[:, sl], keys[:, sl])))
      prog.compile_chunk(state, *args)  # no-op after the first chunk
      start = time.perf_counter()
      state, losses = prog.run_chunk(state, *args, t)
      losses = np.asarray(losses)  # blocks until the chunk is done
      task_train += time.perf_counter() - start
      chunk_valid = valid[:, sl].any(-1)
      bad = chunk_valid & ~np.isfinite(losses)
      if bad.any():
        r, k = map(int, np.argwhere(bad)[0])
        if bar is not None:
          bar.close()
        raise TrainingError(
            f"non-finite loss ({losses[r, k]}) at task {t}, step "
            f"{c * prog.chunk + k} (run {r}, seed {runs[r].seed}); try a "
            f"smaller lr (now {runs[r].hp['lr']})")
      if bar is not None:
        bar.update(min(prog.chunk, n_steps - c * prog.chunk))
    if bar is not None:
      bar.close()
    row = prog.evaluate(state, tests, t)
    rows.append(row)
    samples = int(valid.sum())
    train_seconds += task_train
    total_steps += n_steps * n_runs
    total_samples += samples
    per_task.append({"task": t, "train_seconds": task_train,
                     "seconds": time.perf_counter() - t_start,
                     "steps": n_steps, "samples": samples})
    mean_row = row.mean(0)
    log(f"task {t + 1}/{n_tasks}: {n_steps} steps in {task_train:.2f}s, "
        f"acc so far {mean_row[:t + 1].mean():.4f} "
        f"[{' '.join(f'{a:.3f}' for a in mean_row)}]")
    if on_task_end is not None:
      on_task_end(t, state, np.stack(rows, 1), init_acc)
  accuracy = np.stack(rows, 1)  # [runs, T, T]
  timing = {
      "train_seconds": train_seconds,
      "compile_seconds": prog.compile_seconds,
      # Wall time of one (run-batched) observe step.
      "ms_per_step": 1000 * train_seconds / max(total_steps // n_runs, 1),
      "samples_per_second": total_samples / max(train_seconds, 1e-9),
      "steps": total_steps,
      "per_task": per_task,
  }
  return {"accuracy": accuracy, "init_accuracy": init_acc, "runs": runs,
          "timing": timing, "state": state, "program": prog}

