"""Resume policy: what a checkpoint records, and whether a run may go on.

A run saves, after every task, the state and the metadata a resume needs
(:func:`task_meta`: accuracy rows, init accuracy, runs). Running the same
command on the same workdir continues after the last checkpoint
(:func:`plan_resume`); a config that differs in a field that changes
results is refused before any training, naming the fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np

from bcl_jax import checkpoint
from bcl_jax import metrics
from bcl_jax.checkpoint import CheckpointError

# Config fields that do not change what a run computes: a resume may differ
# from the checkpointed config in these without being refused.
NON_RESULT_FIELDS = frozenset({
    "progress", "heatmap", "logs", "wandb",  # display and outputs
    "chunk_size",                   # how the scan is cut; same steps, keys
    "eval_batch_size",              # evaluation chunking
    "checkpoint", "keep", "resume_from", "force_resume",
    "memory_limit_gb",              # the memory check's budget
    "compile_cache",                # where compiled programs are kept
    "download", "data_url", "data_sha256", "data_md5",  # where data came from
})

# Result-changing config fields added after checkpoints were first written,
# with the value that computes what the code before them did: a checkpoint
# whose config lacks such a field resumes under that value without refusal.
ABSENT_MEANS = {
    "compile_preset": "default",    # XLA's own options (no preset set)
}

RNG_NOTE = ("run r: PRNGKey(seed_r); init fold_in(root, 0); task t "
            "fold_in(fold_in(root, 1), t); data order numpy "
            "default_rng([seed_r, t]); data_seed in config")


def task_meta(accuracy, init_accuracy, runs, lca_curve=None,
              **extra) -> dict:
  """The metadata saved with a task's checkpoint."""
  accuracy = np.asarray(accuracy)
  meta = {
      "tasks_completed": int(accuracy.shape[1]),
      "n_tasks": int(accuracy.shape[-1]),
      "accuracy": accuracy.tolist(),
      "accuracy_dtype": accuracy.dtype.str,
      "init_accuracy": (None if init_accuracy is None
                        else np.asarray(init_accuracy).tolist()),
      "lca_curve": (None if lca_curve is None
                    else metrics.nan_to_none(np.asarray(lca_curve))),
      "runs": [{"seed": r.seed, "hp": dict(r.hp)} for r in runs],
      "rng": RNG_NOTE,
  }
  meta.update(extra)
  return meta


def accuracy_of(meta: dict) -> tuple[np.ndarray, np.ndarray | None]:
  """``(accuracy [runs, k+1, T], init_accuracy [runs, T] or None)``."""
  dtype = np.dtype(meta.get("accuracy_dtype", "<f4"))
  acc = np.asarray(meta["accuracy"], dtype)
  init = meta.get("init_accuracy")
  return acc, None if init is None else np.asarray(init, dtype)


def lca_curve_of(meta: dict) -> np.ndarray | None:
  """``[runs, k+1, lca_batches+1]`` learning curves (NaN: not measured)."""
  curve = meta.get("lca_curve")
  return None if curve is None else np.array(curve, np.float64)


def config_diff(saved: dict, config) -> list[tuple[str, Any, Any]]:
  """``(field, checkpointed value, current value)`` for result-changing
  fields that differ (a field present on one side only counts, unless
  :data:`ABSENT_MEANS` says what its absence stood for)."""
  now = checkpoint.jsonable(config.to_dict())
  saved = checkpoint.jsonable(saved)
  out = []
  for k in sorted(set(saved) | set(now)):
    if k in NON_RESULT_FIELDS:
      continue
    absent = ABSENT_MEANS.get(k, "<absent>")
    a, b = saved.get(k, absent), now.get(k, absent)
    if a != b:
      out.append((k, a, b))
  return out


@dataclasses.dataclass
class ResumePoint:
  task: int            # last task trained; training continues at task + 1
  meta: dict
  config: dict         # the checkpointed config
  later: list[int]     # newer checkpoints that resume_from supersedes


def plan_resume(workdir: str, config) -> ResumePoint | None:
  """Which checkpoint a run in ``workdir`` continues from (None: start).

  Reads only the JSON items, so a refused config costs no training.

  Raises:
    CheckpointError: ``resume_from`` names a missing checkpoint, or the
      (resolved) config differs in a field that changes results (unless
      ``force_resume``).
  """
  steps = checkpoint.available(workdir)
  want = int(config.get("resume_from", -1))
  if not steps:
    if want >= 0:
      raise CheckpointError(
          f"resume_from={want}, but {checkpoint.directory(workdir)} holds no "
          "checkpoints")
    return None
  task = steps[-1] if want < 0 else want
  if task not in steps:
    raise CheckpointError(
        f"resume_from={want}: no checkpoint "
        f"{os.path.join(checkpoint.directory(workdir), str(want))}; "
        f"available: {steps}")
  meta, saved = checkpoint.read_meta(workdir, task)
  diff = config_diff(saved, config)
  if diff and not config.get("force_resume", False):
    fields = "; ".join(f"{k} (checkpoint {a!r}, now {b!r})"
                       for k, a, b in diff)
    raise CheckpointError(
        f"config differs from the checkpointed run in {workdir} in fields "
        f"that change results: {fields}. Use the same config, another "
        "--workdir, or --config.force_resume=True to continue anyway")
  return ResumePoint(task=task, meta=meta, config=saved,
                     later=[s for s in steps if s > task])


def set_aside(workdir: str, steps: list[int]) -> str | None:
  """Moves checkpoints ``steps`` (superseded by a resume from an earlier
  one) into ``<workdir>/checkpoints.superseded-<time>/``; returns it."""
  if not steps:
    return None
  base = os.path.join(os.path.abspath(workdir),
                      f"{checkpoint.CHECKPOINT_DIR}.superseded-"
                      f"{time.strftime('%Y%m%d-%H%M%S')}")
  dest, n = base, 0
  while os.path.exists(dest):
    n += 1
    dest = f"{base}-{n}"
  os.makedirs(dest)
  for s in steps:
    os.replace(os.path.join(checkpoint.directory(workdir), str(s)),
               os.path.join(dest, str(s)))
  return dest


def finished_results(workdir: str, accuracy, n_tasks: int,
                     start_task: int) -> dict | None:
  """results.json of a run whose last task is checkpointed, if it is there.

  Re-running a finished run must not overwrite its results (their timing in
  particular) with those of an empty resume.
  """
  if start_task != n_tasks:
    return None
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      res = json.load(f)
  except (OSError, ValueError):
    return None
  saved = np.asarray(res.get("runs", [{}])[0].get("accuracy_matrix", []))
  ckpt = np.asarray(accuracy)[0]
  if saved.shape != ckpt.shape or not np.array_equal(saved, ckpt):
    return None
  return res
