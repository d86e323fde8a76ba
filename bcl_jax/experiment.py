"""One experiment end to end: config -> data -> training -> files.

``run`` is what ``python -m bcl_jax.run`` calls; it is importable so scripts
and notebooks can drive experiments without the CLI.
"""

from __future__ import annotations

import json
import time

import numpy as np

from bcl_jax import methods
from bcl_jax import results as results_lib
from bcl_jax import train
from bcl_jax.data.errors import DataError

USER_ERRORS = (DataError, train.TrainingError, results_lib.WorkdirError,
               ValueError, FileNotFoundError)


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
  if config.method == "bcl_dual":
    need(config.batch_size >= 2, "bcl_dual takes one sample of each batch for "
         "the generalisation memory; batch_size must be >= 2")


def load(config):
  from bcl_jax.data import load_benchmark
  return load_benchmark(config)


def run(config, workdir: str, config_name: str = "run", log=print,
        bench=None) -> dict:
  """Trains, evaluates and writes ``workdir``; returns results.json's dict."""
  validate_config(config)
  results_lib.check_workdir(workdir)
  t0 = time.perf_counter()
  if bench is None:
    bench = load(config)
  log(f"benchmark {bench.name}: {bench.n_tasks} tasks, input "
      f"{bench.input_shape}, {bench.n_outputs} outputs, "
      f"{'task-incremental' if bench.task_incremental else 'single-head'}; "
      f"method {config.method}; workdir {workdir}")
  results_lib.atomic_write(f"{workdir}/config.json",
                           json.dumps(config.to_dict(), indent=2,
                                      sort_keys=True, default=str))
  out = train.train_and_evaluate(config, bench, log=log)
  timing = dict(out["timing"])
  timing["total_seconds"] = time.perf_counter() - t0
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
