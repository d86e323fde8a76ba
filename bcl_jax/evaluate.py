"""Re-evaluates a checkpoint on every task.

    python -m bcl_jax.evaluate --workdir results/mnist-... --task 3

Rebuilds the benchmark from the checkpointed config, restores the state
saved after task ``k`` (0-based; default: the last checkpoint), evaluates it
on every task's test set with the training loop's own evaluation, and prints
the row ``R[k]`` (per run when there are several) and whether it equals the
row recorded during training. Exit code 0 if it does, 1 if it differs, 2 on
bad input (no such workdir or checkpoint, a corrupt checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from bcl_jax import cli


def evaluate(workdir: str, task: int | None = None, bench=None) -> dict:
  """Evaluates checkpoint ``task`` of ``workdir`` on every task.

  Returns:
    ``{"task", "row" [runs, T], "saved_row" [runs, T], "path", "runs"}``.
  """
  from bcl_jax import experiment
  from bcl_jax.evaluation import Evaluator

  ck = experiment.load(workdir, task, bench=bench)
  setup = ck.setup
  evaluator = Evaluator(setup.method, setup.bench, setup.axis,
                        int(ck.config.eval_batch_size))
  row = evaluator(setup.axis.place_runs(ck.state), ck.task)
  return {"task": ck.task, "row": row, "saved_row": ck.accuracy[:, ck.task],
          "path": ck.path, "runs": ck.meta["runs"]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog=cli.prog_name("bcl-evaluate", "bcl_jax.evaluate"),
      description="Re-evaluate the state saved after a task on every task.")
  parser.add_argument("--workdir", required=True, help="the run's workdir")
  parser.add_argument("--task", type=int, default=None,
                      help="0-based task index of the checkpoint (default: "
                      "the last)")
  if argv is None:   # the command line: read-only, nothing to save
    from bcl_jax import guard
    guard.exit_on_signals()
  args = parser.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from bcl_jax import checkpoint
  from bcl_jax.data.errors import DataError
  try:
    out = evaluate(args.workdir, args.task)
  except (checkpoint.CheckpointError, DataError, FileNotFoundError,
          ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except MemoryError:
    print(f"error: out of memory while evaluating {args.workdir}; free "
          "memory and try again", file=sys.stderr)
    return 2
  row, saved = out["row"], out["saved_row"]
  k, n_tasks = out["task"], row.shape[1]
  print(f"{out['path']}: after task {k + 1}/{n_tasks} (R[{k}])")
  fmt = lambda r: " ".join(f"{a:.4f}" for a in r)
  if row.shape[0] > 1:
    for r, run in enumerate(out["runs"]):
      print(f"run {r} (seed {run['seed']}): {fmt(row[r])}")
    print(f"mean: {fmt(row.mean(0))}")
  else:
    print(fmt(row[0]))
  if np.array_equal(row, saved):
    print("equal to the row recorded during training")
    return 0
  print(f"differs from the row recorded during training (max |diff| "
        f"{np.max(np.abs(row - saved)):.3g}): {fmt(saved.mean(0))}")
  return 1


if __name__ == "__main__":
  sys.exit(main())
