"""One experiment end to end: config -> data -> training -> files.

``run`` is what ``python -m bcl_jax.run`` calls; it is importable so scripts
and notebooks can drive experiments without the CLI. ``load`` reads a
checkpoint back for analysis.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import numpy as np

from bcl_jax import checkpoint
from bcl_jax import guard
from bcl_jax import logs
from bcl_jax import methods
from bcl_jax import resume as resume_lib
from bcl_jax import results as results_lib
from bcl_jax import runs as runs_lib
from bcl_jax import train
from bcl_jax.config import config_from_dict, resolve
from bcl_jax.data.errors import DataError

USER_ERRORS = (DataError, train.TrainingError, results_lib.WorkdirError,
               checkpoint.CheckpointError, guard.LockError,
               guard.ResourceError, ValueError, FileNotFoundError)


def validate_config(config):
  """The resolved config, or one ``ValueError`` naming the bad field.

  The loop's fields are checked here; the method's by its declaration.
  """
  def need(cond, msg):
    if not cond:
      raise ValueError(f"config: {msg}")
  need(config.method in methods.names(),
       f"method {config.method!r} is not one of {methods.names()}")
  try:
    config = resolve(config)
    methods.hparams_of(config)
  except ValueError as e:
    raise ValueError(f"config: {e}") from None
  need(config.batch_size >= 1, f"batch_size must be >= 1, got "
       f"{config.batch_size}")
  need(math.isfinite(config.use) and config.use > 0, f"use must be a finite "
       f"number > 0 (a fraction <= 1 or a count), got {config.use}")
  for name in ("seed", "data_seed"):
    need(config[name] >= 0, f"{name} must be a non-negative integer, got "
         f"{config[name]}")
  need(config.num_seeds >= 1, "num_seeds must be >= 1")
  need(config.get("memory_limit_gb", 0) >= 0, "memory_limit_gb must be >= 0 "
       "(0: the memory available)")
  need(config.n_epochs >= 1, "n_epochs must be >= 1")
  need(config.chunk_size >= 1, "chunk_size must be >= 1")
  need(config.eval_batch_size >= 1, "eval_batch_size must be >= 1")
  need(config.get("keep", 0) >= 0, "keep must be >= 0 (0 keeps every "
       "checkpoint)")
  need(config.get("resume_from", -1) >= -1, "resume_from must be a task "
       "index >= 0, or -1 for the last checkpoint")
  return config


def load_data(config):
  from bcl_jax.data import load_benchmark
  return load_benchmark(config)


def run(config, workdir: str, config_name: str = "run", log=print,
        bench=None) -> dict:
  """Trains, evaluates and writes ``workdir``; returns results.json's dict.

  With ``config.checkpoint`` (the default) the state is saved after every
  task under ``workdir/checkpoints/<task>``, and a workdir that already holds
  checkpoints is continued after the last one (or after task
  ``config.resume_from``), refusing a config that differs in a field that
  changes results unless ``config.force_resume``.

  The workdir is locked for the life of the run (a second run on it is
  refused, naming the first); SIGINT and SIGTERM stop the run at the next
  chunk boundary with :class:`bcl_jax.guard.Interrupted`, keeping the last
  checkpoint; the memory the run needs is estimated and refused before
  anything large is allocated. A workdir this call created is removed again
  if the run fails before writing anything into it.
  """
  config = validate_config(config)
  enable_compile_cache(config.get("compile_cache", "auto"), log)
  created = not os.path.exists(workdir)
  results_lib.check_workdir(workdir)
  lock = guard.WorkdirLock(workdir)
  try:
    lock.acquire()
  except guard.LockError:
    if created:   # both found no workdir; the other run holds it now
      created = False
    raise
  try:
    with guard.stop_on_signals():
      return _run(config, workdir, config_name, log, bench)
  finally:
    lock.release()
    if created:
      _remove_if_empty(workdir)


def enable_compile_cache(setting: str, log=print) -> str | None:
  """Turns on JAX's persistent compilation cache; returns its folder.

  A later run with the same shapes (another seed, an ablation of a dynamic
  field, a resumed run) loads its compiled programs instead of compiling
  them again: seconds on permuted MNIST, minutes on the ResNet benchmarks.
  Results are the same (the same executable runs). ``setting``: a folder,
  ``"auto"`` (``$BCL_JAX_COMPILE_CACHE``, else ``~/.cache/bcl_jax/xla``;
  a cache folder the user already gave JAX is kept) or ``""`` (off). A
  folder that cannot be created turns the cache off with a warning.
  """
  current = _jax_cache_dir()
  if setting == "auto":
    if current:
      return current
    setting = os.environ.get(
        "BCL_JAX_COMPILE_CACHE",
        os.path.join(os.path.expanduser("~"), ".cache", "bcl_jax", "xla"))
  if not setting:
    return None
  path = os.path.abspath(os.path.expanduser(str(setting)))
  if path == current:
    return path
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    log(f"warning: compile cache {path} unusable ({e.strerror}); "
        "compiling without it")
    return None
  _set_jax_cache_dir(path, reset=bool(current))
  return path


def _jax_cache_dir() -> str | None:
  import jax
  return jax.config.jax_compilation_cache_dir


def _set_jax_cache_dir(path: str, reset: bool) -> None:
  import jax
  if reset:  # this process used another folder before
    from jax.experimental.compilation_cache import compilation_cache
    compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", path)
  # JAX caches only programs that took >= 1 s to compile by default; a run
  # compiles ~20 small ones (init, evaluation, hooks) at 50-100 ms each,
  # which on permuted MNIST is a third of a short run's fixed cost.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _remove_if_empty(workdir: str) -> None:
  """Removes ``workdir`` if it holds nothing but the lock file."""
  try:
    if set(os.listdir(workdir)) <= {guard.LOCK_NAME}:
      lock_file = os.path.join(workdir, guard.LOCK_NAME)
      if os.path.exists(lock_file):
        os.remove(lock_file)
      os.rmdir(workdir)
  except OSError:
    pass  # another process wrote into it meanwhile: leave it


def _then_prefetch_plotting(on_task_end):
  """``on_task_end`` that also starts :func:`results.prefetch_plotting`
  after the first task it sees."""
  started = []

  def hook(task, *args):
    if not started:
      started.append(task)
      results_lib.prefetch_plotting()
    if on_task_end is not None:
      on_task_end(task, *args)

  return hook


def _run(config, workdir: str, config_name: str, log, bench) -> dict:
  limit = float(config.get("memory_limit_gb", 0) or 0)
  use_ckpt = bool(config.checkpoint)
  resume = resume_lib.plan_resume(workdir, config) if use_ckpt else None
  if not use_ckpt and checkpoint.available(workdir):
    log(f"checkpoint=False: ignoring the checkpoints in "
        f"{checkpoint.directory(workdir)}")
  t0 = time.perf_counter()
  if bench is None:
    guard.check_memory(guard.benchmark_parts(config), limit,
                       stage="the benchmark")
    bench = load_data(config)
  guard.check_stop()
  log(f"benchmark {bench.name}: {bench.n_tasks} tasks, input "
      f"{bench.input_shape}, {bench.n_outputs} outputs, "
      f"{'task-incremental' if bench.task_incremental else 'single-head'}; "
      f"method {config.method}; workdir {workdir}")
  setup = train.build(config, bench)
  template = train.state_template(setup)
  state_bytes = checkpoint.nbytes(template)
  guard.check_memory(guard.run_parts(
      config, bench, state_bytes, len(setup.runs),
      joint=setup.spec.schedule != "sequential",
      conv=not str(config.model).startswith("mlp") and
      len(bench.input_shape) > 1), limit)
  resume_kw, manager, on_task_end = {}, None, None
  if use_ckpt and resume is not None:
    resume_kw = _resume(setup, workdir, resume, template, log)
    done = resume_lib.finished_results(workdir, resume_kw["accuracy"],
                                       bench.n_tasks, resume_kw["start_task"])
    if done is not None:
      log(f"every task is already learned; the results in {workdir} "
          "stand (pass another --workdir to start a new run)")
      print(results_lib.summary_line(done), flush=True)
      return done
  if use_ckpt:
    warning = checkpoint.check_space(
        workdir, state_bytes,
        bench.n_tasks if not config.keep else int(config.keep))
    if warning:
      log(f"warning: {warning}")
  # Room for the results, so that they are not lost after all the training.
  guard.check_disk(workdir, _results_bytes(config, bench, len(setup.runs)),
                   "the results and logs")
  if use_ckpt:
    manager = checkpoint.Manager(workdir, keep=int(config.keep))

    def on_task_end(task, state, accuracy, init_accuracy, lca_curve):
      meta = resume_lib.task_meta(accuracy, init_accuracy, setup.runs,
                                  lca_curve, benchmark=bench.name)
      seconds = manager.save(task, state, meta=meta, config=config.to_dict())
      log(f"checkpoint {manager.path(task)} handed over in {seconds:.2f}s, "
          "written in the background")
      guard.check_stop()   # a signal during evaluation or the save

  results_lib.atomic_write(f"{workdir}/config.json",
                           json.dumps(config.to_dict(), indent=2,
                                      sort_keys=True, default=str))
  logger = logs.MetricLogger(workdir, enabled=bool(config.logs),
                             wandb=bool(config.wandb))
  if config.heatmap:
    # After the first task, when the loop waits on compiled code; at the
    # start the import would take the interpreter from the tracing.
    on_task_end = _then_prefetch_plotting(on_task_end)
  try:
    out = train.train_and_evaluate(config, bench, setup=setup, log=log,
                                   on_task_end=on_task_end, logger=logger,
                                   **resume_kw)
    if manager is not None:
      manager.wait()   # the last checkpoint on disk (or its error) first
  except train.TrainingError as e:
    _settle(manager)
    raise train.TrainingError(f"{e}; {_last_checkpoint(workdir, use_ckpt)}") \
        from None
  except KeyboardInterrupt:
    guard.drain()   # nothing may still run when the caller exits
    _settle(manager)
    log(f"interrupted; {_last_checkpoint(workdir, use_ckpt)}")
    raise
  finally:
    logger.close()
    if manager is not None:
      manager.close(quiet=True)
  timing = dict(out["timing"])
  timing["total_seconds"] = time.perf_counter() - t0
  if manager is not None:
    timing["checkpoint_seconds"] = float(sum(manager.save_seconds))
    timing["checkpoint_seconds_per_task"] = list(manager.save_seconds)
  if resume_kw:
    timing["resumed_after_task"] = resume_kw["start_task"] - 1
  res = results_lib.build_results(out["accuracy"], out["init_accuracy"],
                                  out["runs"], timing,
                                  lca_curve=out["lca_curve"])
  res["benchmark"] = {"name": bench.name, "n_tasks": bench.n_tasks,
                      "n_outputs": bench.n_outputs,
                      "input_shape": list(bench.input_shape),
                      "task_incremental": bench.task_incremental}
  _write_results(workdir, config, res, config_name)
  log(f"train {timing['train_seconds']:.1f}s, compile "
      f"{timing['compile_seconds']:.1f}s, {timing['ms_per_step']:.2f} ms/step, "
      f"{timing['samples_per_second']:.0f} samples/s; results in {workdir}")
  print(results_lib.summary_line(res), flush=True)
  return res


def _results_bytes(config, bench, n_runs: int) -> int:
  """A generous size of results.json/.txt, the heatmaps and the logs."""
  t = bench.n_tasks
  per_task = 1 + int(config.use if config.use > 1 else 10**4) // max(
      1, int(config.batch_size) * int(config.chunk_size))
  logs_bytes = 400 * n_runs * t * per_task * int(config.n_epochs) \
      if config.logs else 0
  return n_runs * t * (t + 16) * 60 + logs_bytes + (4 << 20)


def _write_results(workdir: str, config, res: dict, config_name: str):
  """Writes the result files; if that fails late (a full disk), saves
  results.json in the temp folder and says where, so nothing is lost."""
  try:
    results_lib.write_all(workdir, config.to_dict(), res,
                          title=f"{config.method} on {res['benchmark']['name']}"
                          f" ({config_name})", heatmap=bool(config.heatmap))
  except OSError as e:
    import tempfile  # pylint: disable=import-outside-toplevel
    print(results_lib.summary_line(res), flush=True)
    fd, path = tempfile.mkstemp(prefix="bcl_jax-results-", suffix=".json")
    try:
      with os.fdopen(fd, "w") as f:
        json.dump(res, f, indent=2, default=float)
      saved = f"the results were saved to {path} instead"
    except OSError:
      saved = "the line above is all that could be kept"
    raise results_lib.WorkdirError(
        f"could not write the results into {workdir} "
        f"({e.strerror or e}); {saved}") from None


def _resume(setup, workdir, resume, template, log) -> dict:
  """Restores ``resume``'s checkpoint: the train_and_evaluate arguments."""
  bench, config = setup.bench, setup.config
  if resume.meta.get("n_tasks") != bench.n_tasks:
    raise checkpoint.CheckpointError(
        f"checkpoint {workdir}/checkpoints/{resume.task} is of a run with "
        f"{resume.meta.get('n_tasks')} tasks; this benchmark has "
        f"{bench.n_tasks}")
  state = checkpoint.restore_state(workdir, resume.task, template,
                                   resume.meta)
  accuracy, init_accuracy = resume_lib.accuracy_of(resume.meta)
  lca_curve = resume_lib.lca_curve_of(resume.meta)
  diff = resume_lib.config_diff(resume.config, config)
  if diff:
    log("warning: force_resume: continuing although "
        + ", ".join(k for k, _, _ in diff) + " differ from the checkpoint")
    # Hyper-parameters live in the state: the new config's values apply.
    state = state._replace(hp=runs_lib.stacked_hp(setup.runs,
                                                  setup.spec.dynamic))
  moved = resume_lib.set_aside(workdir, resume.later)
  if moved:
    log(f"resume_from={resume.task}: moved the later checkpoints "
        f"{resume.later} to {moved}")
  log(f"resuming after task {resume.task + 1}/{bench.n_tasks} from "
      f"{checkpoint.directory(workdir)}/{resume.task}")
  return {"state": state, "start_task": resume.task + 1,
          "accuracy": accuracy, "init_accuracy": init_accuracy,
          "lca_curve": lca_curve}


def _settle(manager) -> None:
  """Lets a checkpoint still being written finish (or fail) quietly, so
  that :func:`_last_checkpoint` names what is on disk."""
  if manager is not None:
    manager.wait(quiet=True)


def _last_checkpoint(workdir: str, enabled: bool) -> str:
  steps = checkpoint.available(workdir) if enabled else []
  if not steps:
    return "no checkpoint was saved"
  return (f"the last good checkpoint is {checkpoint.directory(workdir)}/"
          f"{steps[-1]} (after task {steps[-1] + 1}); run the same command "
          "to resume from it")


# -- analysis -----------------------------------------------------------------

@dataclasses.dataclass
class Checkpoint:
  """What :func:`load` returns.

  Attributes:
    task: 0-based index of the last task trained before the save.
    state: the method state (its NamedTuple, leading run axis); with
      ``structured=False`` the nested dict of arrays as stored.
    config: the run's config (``ml_collections.ConfigDict``).
    accuracy: ``[runs, task + 1, T]``, the accuracy matrix rows so far.
    init_accuracy: ``[runs, T]`` accuracies of the untrained model, or None.
    meta: the JSON metadata as saved.
    path: the checkpoint's folder.
    setup: the rebuilt method and runs (``structured=True`` only), e.g. to
      evaluate the state with ``bcl_jax.evaluation.Evaluator``.
  """

  task: int
  state: Any
  config: Any
  accuracy: np.ndarray
  init_accuracy: np.ndarray | None
  meta: dict
  path: str
  setup: Any = None


def load(workdir: str, task: int | None = None, *, bench=None,
         structured: bool = True) -> Checkpoint:
  """Loads a checkpoint for analysis.

  Args:
    workdir: the run's workdir.
    task: 0-based index of the task after which the checkpoint was saved
      (None: the last one).
    bench: the run's benchmark, to shape the state; loaded from the saved
      config if None (not needed with ``structured=False``).
    structured: return the method's NamedTuple state; False returns the
      nested dict of arrays as stored (no benchmark needed).
  """
  steps = checkpoint.available(workdir)
  if not steps:
    raise checkpoint.CheckpointError(
        f"no checkpoints in {checkpoint.directory(workdir)}")
  task = steps[-1] if task is None or task < 0 else int(task)
  path = os.path.join(checkpoint.directory(workdir), str(task))
  if task not in steps:
    raise checkpoint.CheckpointError(f"no checkpoint {path}; available: "
                                     f"{steps}")
  meta, cfg = checkpoint.read_meta(workdir, task)
  config = resolve(config_from_dict(cfg))
  setup = template = None
  if structured:
    setup = train.build(config, bench if bench is not None
                        else load_data(config))
    template = train.state_template(setup)
  state = checkpoint.restore_state(workdir, task, template, meta)
  acc, init = resume_lib.accuracy_of(meta)
  return Checkpoint(task=task, state=state, config=config, accuracy=acc,
                    init_accuracy=init, meta=meta, path=path, setup=setup)
