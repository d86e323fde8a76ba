"""One experiment end to end: config -> data -> training -> files.

``run`` is what ``python -m bcl_jax.run`` calls; it is importable so scripts
and notebooks can drive experiments without the CLI.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from bcl_jax import checkpoint
from bcl_jax import methods
from bcl_jax import results as results_lib
from bcl_jax import train
from bcl_jax.data.errors import DataError

USER_ERRORS = (DataError, train.TrainingError, results_lib.WorkdirError,
               checkpoint.CheckpointError, ValueError, FileNotFoundError)


def validate_config(config) -> None:
  """Rejects values that would fail later or silently mean nothing."""
  def need(cond, msg):
    if not cond:
      raise ValueError(f"config: {msg}")
  need(config.method in methods.names(),
       f"method {config.method!r} is not one of {methods.names()}")
  need(config.batch_size >= 1, f"batch_size must be >= 1, got "
       f"{config.batch_size}")
  need(config.lr > 0, f"lr must be > 0, got {config.lr}")
  need(0 < config.beta <= 1 or config.method not in ("bcl_dual", "bcl_single"),
       f"beta must be in (0, 1], got {config.beta}")
  need(config.inner_steps >= 1, "inner_steps must be >= 1")
  need(config.n_meta >= 1, "n_meta must be >= 1")
  need(config.n_memories >= 1, "n_memories must be >= 1")
  need(0 < config.n_val < 1, f"n_val is a fraction of n_memories in (0, 1), "
       f"got {config.n_val}")
  need(config.replay_batch_size >= 1, "replay_batch_size must be >= 1")
  need(config.use > 0, f"use must be > 0 (a fraction <= 1 or a count), got "
       f"{config.use}")
  need(config.n_epochs >= 1, "n_epochs must be >= 1")
  need(config.chunk_size >= 1, "chunk_size must be >= 1")
  need(config.eval_batch_size >= 1, "eval_batch_size must be >= 1")
  need(config.temperature > 0, "temperature must be > 0")
  need(config.get("keep", 0) >= 0, "keep must be >= 0 (0 keeps every "
       "checkpoint)")
  need(config.get("resume_from", -1) >= -1, "resume_from must be a task "
       "index >= 0, or -1 for the last checkpoint")
  if config.method == "bcl_dual":
    need(config.batch_size >= 2, "bcl_dual takes one sample of each batch for "
         "the generalisation memory; batch_size must be >= 2")


def load(config):
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
  """
  validate_config(config)
  results_lib.check_workdir(workdir)
  use_ckpt = bool(config.get("checkpoint", True))
  resume = checkpoint.plan_resume(workdir, config) if use_ckpt else None
  if not use_ckpt and checkpoint.available(workdir):
    log(f"checkpoint=False: ignoring the checkpoints in "
        f"{checkpoint.directory(workdir)}")
  t0 = time.perf_counter()
  if bench is None:
    bench = load(config)
  log(f"benchmark {bench.name}: {bench.n_tasks} tasks, input "
      f"{bench.input_shape}, {bench.n_outputs} outputs, "
      f"{'task-incremental' if bench.task_incremental else 'single-head'}; "
      f"method {config.method}; workdir {workdir}")
  runs = train.expand_runs(config)
  resume_kw, manager, on_task_end = {}, None, None
  if use_ckpt:
    template = jax.eval_shape(train.Program(config, bench, runs).init)
    warning = checkpoint.check_space(
        workdir, checkpoint.nbytes(template),
        bench.n_tasks if not config.get("keep", 0) else int(config.keep))
    if warning:
      log(f"warning: {warning}")
    if resume is not None:
      resume_kw = _resume(config, workdir, resume, template, runs, bench, log)
      done = _finished_results(workdir, resume_kw, bench)
      if done is not None:
        log(f"every task is already learned; the results in {workdir} "
            "stand (pass another --workdir to start a new run)")
        print(results_lib.summary_line(done), flush=True)
        return done
    manager = checkpoint.Manager(workdir, keep=int(config.get("keep", 0)))

    def on_task_end(task, state, accuracy, init_accuracy):
      seconds = manager.save(task, state, config=config, accuracy=accuracy,
                             init_accuracy=init_accuracy, runs=runs,
                             extra={"benchmark": bench.name})
      log(f"checkpoint {manager.path(task)} saved in {seconds:.2f}s")

  results_lib.atomic_write(f"{workdir}/config.json",
                           json.dumps(config.to_dict(), indent=2,
                                      sort_keys=True, default=str))
  try:
    out = train.train_and_evaluate(config, bench, log=log,
                                   on_task_end=on_task_end, **resume_kw)
  except train.TrainingError as e:
    raise train.TrainingError(f"{e}; {_last_checkpoint(workdir, use_ckpt)}") \
        from None
  except KeyboardInterrupt:
    log(f"interrupted; {_last_checkpoint(workdir, use_ckpt)}")
    raise
  finally:
    if manager is not None:
      manager.close()
  timing = dict(out["timing"])
  timing["total_seconds"] = time.perf_counter() - t0
  if manager is not None:
    timing["checkpoint_seconds"] = float(sum(manager.save_seconds))
    timing["checkpoint_seconds_per_task"] = list(manager.save_seconds)
  if resume_kw:
    timing["resumed_after_task"] = resume_kw["start_task"] - 1
  res = results_lib.build_results(out["accuracy"], out["init_accuracy"],
                                  out["runs"], timing)
  res["benchmark"] = {"name": bench.name, "n_tasks": bench.n_tasks,
                      "n_outputs": bench.n_outputs,
                      "input_shape": list(bench.input_shape),
                      "task_incremental": bench.task_incremental}
  results_lib.write_all(workdir, config.to_dict(), res,
                        title=f"{config.method} on {bench.name} ({config_name})",
                        heatmap=bool(config.heatmap))
  log(f"train {timing['train_seconds']:.1f}s, compile "
      f"{timing['compile_seconds']:.1f}s, {timing['ms_per_step']:.2f} ms/step, "
      f"{timing['samples_per_second']:.0f} samples/s; results in {workdir}")
  print(results_lib.summary_line(res), flush=True)
  return res


def _finished_results(workdir, resume_kw, bench):
  """results.json of a run whose last task is checkpointed, if it is there.

  Re-running a finished run must not overwrite its results (their timing in
  particular) with those of an empty resume.
  """
  path = f"{workdir}/results.json"
  if resume_kw.get("start_task") != bench.n_tasks:
    return None
  try:
    with open(path) as f:
      res = json.load(f)
  except (OSError, ValueError):
    return None
  saved = np.asarray(res.get("runs", [{}])[0].get("accuracy_matrix", []))
  ckpt = np.asarray(resume_kw["accuracy"])[0]
  if saved.shape != ckpt.shape or not np.array_equal(saved, ckpt):
    return None
  return res


def _resume(config, workdir, resume, template, runs, bench, log) -> dict:
  """Restores ``resume``'s checkpoint: the train_and_evaluate arguments."""
  if resume.meta.get("n_tasks") != bench.n_tasks:
    raise checkpoint.CheckpointError(
        f"checkpoint {workdir}/checkpoints/{resume.task} is of a run with "
        f"{resume.meta.get('n_tasks')} tasks; this benchmark has "
        f"{bench.n_tasks}")
  state = checkpoint.restore_state(workdir, resume.task, template,
                                   resume.meta)
  accuracy, init_accuracy = checkpoint.accuracy_of(resume.meta)
  diff = checkpoint.config_diff(resume.config, config)
  if diff:
    log("warning: force_resume: continuing although "
        + ", ".join(k for k, _, _ in diff) + " differ from the checkpoint")
    # Hyper-parameters live in the state: the new config's values apply.
    state = state._replace(hp={
        k: jnp.asarray([r.hp[k] for r in runs], jnp.float32)
        for k in state.hp})
  moved = checkpoint.set_aside(workdir, resume.later)
  if moved:
    log(f"resume_from={resume.task}: moved the later checkpoints "
        f"{resume.later} to {moved}")
  log(f"resuming after task {resume.task + 1}/{bench.n_tasks} from "
      f"{checkpoint.directory(workdir)}/{resume.task}")
  return {"state": state, "start_task": resume.task + 1,
          "accuracy": accuracy, "init_accuracy": init_accuracy}


def _last_checkpoint(workdir: str, enabled: bool) -> str:
  steps = checkpoint.available(workdir) if enabled else []
  if not steps:
    return "no checkpoint was saved"
  return (f"the last good checkpoint is {checkpoint.directory(workdir)}/"
          f"{steps[-1]} (after task {steps[-1] + 1}); run the same command "
          "to resume from it")
