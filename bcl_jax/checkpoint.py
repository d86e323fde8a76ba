"""Orbax checkpoints at task boundaries: save, resume, load for analysis.

Layout (README "Checkpoints and resuming")::

    <workdir>/checkpoints/<k>/      k = 0-based index of the last task trained
        state/    the method state: nested dicts of arrays, leading run axis
        meta/     JSON: task, accuracy rows R[0..k], init accuracy, runs
                  (seed, hyper-parameters), how RNG and data order derive,
                  a SHA-256 fingerprint of the state, versions
        config/   JSON: the full config

``k`` is the row of the accuracy matrix the checkpoint ends with (``R[k]``,
printed as ``task k+1/T`` during training). Each is one step of an orbax
``CheckpointManager`` made of standard items (``StandardSave`` +
``JsonSave``), so plain orbax reads it back without bcl_jax::

    ocp.StandardCheckpointer().restore(f"{workdir}/checkpoints/{k}/state")

Saves are synchronous and orbax writes each step into a temporary folder that
is renamed into place once complete, so a crash during a save leaves the
previous checkpoints as they were. The fingerprint is checked on every
restore: a damaged checkpoint is refused by name instead of restoring to
something wrong.

Nothing about randomness is stored as state: run ``r``'s keys and data order
derive from ``(seed_r, task)`` (``bcl_jax.train``), so a run resumed after
task ``k`` draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any

import jax
import numpy as np

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1

# Config fields that do not change what a run computes: a resume may differ
# from the checkpointed config in these without being refused.
NON_RESULT_FIELDS = frozenset({
    "progress", "heatmap",          # display and outputs
    "chunk_size",                   # how the scan is cut; same steps, keys
    "eval_batch_size",              # evaluation chunking
    "checkpoint", "keep", "resume_from", "force_resume",
})


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written, read or used; the message says which."""


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
  """

  task: int
  state: Any
  config: Any
  accuracy: np.ndarray
  init_accuracy: np.ndarray | None
  meta: dict
  path: str


# -- state <-> plain pytree ----------------------------------------------------

def state_to_tree(state) -> Any:
  """NamedTuples (the method state, ring buffers) -> nested dicts of arrays."""
  if isinstance(state, tuple) and hasattr(state, "_asdict"):
    return {k: state_to_tree(v) for k, v in state._asdict().items()}
  if isinstance(state, dict):
    return {k: state_to_tree(v) for k, v in state.items()}
  if isinstance(state, (list, tuple)):
    return {str(i): state_to_tree(v) for i, v in enumerate(state)}
  return state


def tree_to_state(template, tree) -> Any:
  """Inverse of :func:`state_to_tree`, shaped like ``template``."""
  if isinstance(template, tuple) and hasattr(template, "_asdict"):
    return type(template)(**{k: tree_to_state(v, tree[k])
                             for k, v in template._asdict().items()})
  if isinstance(template, dict):
    return {k: tree_to_state(v, tree[k]) for k, v in template.items()}
  if isinstance(template, (list, tuple)):
    return type(template)(tree_to_state(v, tree[str(i)])
                          for i, v in enumerate(template))
  return tree


def fingerprint(tree) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|"
             .encode())
    h.update(a.tobytes())
  return h.hexdigest()


def nbytes(tree) -> int:
  return int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape))
                 for a in jax.tree_util.tree_leaves(tree)))


# -- config ---------------------------------------------------------------

def _jsonable(d: dict) -> dict:
  return json.loads(json.dumps(d, sort_keys=True, default=str))


def config_diff(saved: dict, config) -> list[tuple[str, Any, Any]]:
  """``(field, checkpointed value, current value)`` for result-changing
  fields that differ (a field present on one side only counts)."""
  now = _jsonable(config.to_dict())
  saved = _jsonable(saved)
  out = []
  for k in sorted(set(saved) | set(now)):
    if k in NON_RESULT_FIELDS:
      continue
    a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
    if a != b:
      out.append((k, a, b))
  return out


def config_from_dict(d: dict):
  """A ConfigDict from a saved config (tuples restored where the defaults
  have them)."""
  from bcl_jax.config import default_config
  c = default_config()
  for k, v in d.items():
    if k in c and isinstance(c[k], tuple) and isinstance(v, list):
      v = tuple(v)
    c[k] = v
  return c


# -- listing ----------------------------------------------------------------

def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def available(workdir: str) -> list[int]:
  """Committed checkpoints (task indices), ascending.

  Orbax writes a step under a temporary name and renames it when complete,
  so a folder named by a bare integer is a finished save.
  """
  d = directory(workdir)
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d)
                if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def _earlier_hint(workdir: str, task: int) -> str:
  earlier = [s for s in available(workdir) if s < task]
  if not earlier:
    return "no earlier checkpoint exists; start again in a new workdir"
  return (f"resume from an earlier one with --config.resume_from="
          f"{earlier[-1]} (earlier checkpoints: {earlier})")


def _read_json_item(workdir: str, task: int, item: str) -> dict:
  import orbax.checkpoint as ocp
  path = os.path.join(directory(workdir), str(task), item)
  try:
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)
  except Exception as e:  # orbax and tensorstore raise many types
    raise CheckpointError(
        f"checkpoint {os.path.dirname(path)} is corrupt or unreadable "
        f"({item}: {_short(e)}); {_earlier_hint(workdir, task)}") from None


def read_meta(workdir: str, task: int) -> tuple[dict, dict]:
  """``(meta, config dict)`` of one checkpoint, without touching arrays."""
  meta = _read_json_item(workdir, task, "meta")
  cfg = _read_json_item(workdir, task, "config")
  if not isinstance(meta, dict) or meta.get("task") != task:
    raise CheckpointError(
        f"checkpoint {os.path.join(directory(workdir), str(task))} has "
        f"metadata for task {meta.get('task') if isinstance(meta, dict) else meta!r}"
        f"; {_earlier_hint(workdir, task)}")
  return meta, cfg


def _short(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  msg = msg[0] if msg else type(e).__name__
  return msg if len(msg) < 300 else msg[:300] + "..."


# -- saving and restoring ------------------------------------------------------

def abstract_state(template):
  """``ShapeDtypeStruct`` leaves on the default device (restore target)."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      template)


class Manager:
  """Saves and restores the checkpoints of one workdir (wraps orbax's
  ``CheckpointManager``; ``keep`` > 0 keeps only the newest ``keep``)."""

  def __init__(self, workdir: str, keep: int = 0):
    import orbax.checkpoint as ocp
    self.workdir = workdir
    self.dir = directory(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(keep) if keep and int(keep) > 0 else None,
        enable_async_checkpointing=False,   # complete before the next task
        cleanup_tmp_directories=True,       # leftovers of interrupted saves
        create=True)
    self._ocp = ocp
    self._mgr = ocp.CheckpointManager(
        self.dir, options=options, item_names=("state", "meta", "config"))
    self.save_seconds: list[float] = []

  def path(self, task: int) -> str:
    return os.path.join(self.dir, str(task))

  def save(self, task: int, state, *, config, accuracy, init_accuracy,
           runs, extra: dict | None = None) -> float:
    """Writes checkpoint ``task``; returns the seconds it took."""
    ocp = self._ocp
    start = time.perf_counter()
    tree = state_to_tree(state)
    accuracy = np.asarray(accuracy)
    meta = {
        "format": FORMAT_VERSION,
        "task": int(task),
        "tasks_completed": int(task) + 1,
        "n_tasks": int(accuracy.shape[-1]),
        "accuracy": accuracy.tolist(),
        "accuracy_dtype": accuracy.dtype.str,
        "init_accuracy": (None if init_accuracy is None
                          else np.asarray(init_accuracy).tolist()),
        "runs": [{"seed": r.seed, "hp": dict(r.hp)} for r in runs],
        "rng": ("run r: PRNGKey(seed_r); init fold_in(root, 0); task t "
                "fold_in(fold_in(root, 1), t); data order "
                "numpy default_rng([seed_r, t]); data_seed in config"),
        "state_type": f"{type(state).__module__}.{type(state).__qualname__}",
        "state_bytes": nbytes(tree),
        "fingerprint": fingerprint(tree),
        "versions": _versions(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    meta.update(extra or {})
    try:
      if task in self._mgr.all_steps():
        # An explicit re-save of the same task (resume_from replays it).
        self._mgr.delete(task)
      self._mgr.save(task, args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree),
          meta=ocp.args.JsonSave(meta),
          config=ocp.args.JsonSave(_jsonable(config.to_dict()))))
      self._mgr.wait_until_finished()
    except Exception as e:
      prev = [s for s in available(self.workdir) if s < task]
      raise CheckpointError(
          f"could not write checkpoint {self.path(task)} ({_short(e)}); "
          + (f"the previous checkpoint {self.path(prev[-1])} is intact"
             if prev else "no earlier checkpoint exists")) from None
    seconds = time.perf_counter() - start
    self.save_seconds.append(seconds)
    return seconds

  def restore_state(self, task: int, template):
    """The state of checkpoint ``task``, shaped like ``template`` (a state
    of the same method and config, e.g. ``Program.init()`` or its
    ``jax.eval_shape``); the fingerprint is checked."""
    meta, _ = read_meta(self.workdir, task)
    return restore_state(self.workdir, task, template, meta)

  def close(self):
    self._mgr.close()


def restore_state(workdir: str, task: int, template, meta: dict):
  import orbax.checkpoint as ocp
  path = os.path.join(directory(workdir), str(task))
  target = abstract_state(state_to_tree(template))
  tree, error = _restore_arrays(os.path.join(path, "state"), target)
  if error is not None:
    raise CheckpointError(
        f"checkpoint {path} is corrupt or does not fit this config's state "
        f"({error}); {_earlier_hint(workdir, task)}")
  if fingerprint(tree) != meta.get("fingerprint"):
    raise CheckpointError(
        f"checkpoint {path} is corrupt: its arrays do not match the "
        f"fingerprint saved with them; {_earlier_hint(workdir, task)}")
  return tree_to_state(template, tree)


def _restore_arrays(path: str, target):
  """``(tree, None)`` or ``(None, short error message)``.

  A failed tensorstore read leaves orbax coroutines that were never awaited;
  they are collected here, quietly, so the one-line error is all the user
  sees.
  """
  import gc
  import sys
  import orbax.checkpoint as ocp
  try:
    return ocp.StandardCheckpointer().restore(path, target), None
  except Exception as e:  # orbax and tensorstore raise many types
    error = _short(e).split(" See full TensorStore details")[0]
  hook = sys.unraisablehook
  sys.unraisablehook = lambda *_: None
  try:
    gc.collect()
  finally:
    sys.unraisablehook = hook
  return None, error


def accuracy_of(meta: dict) -> tuple[np.ndarray, np.ndarray | None]:
  """``(accuracy [runs, k+1, T], init_accuracy [runs, T] or None)``."""
  dtype = np.dtype(meta.get("accuracy_dtype", "<f4"))
  acc = np.asarray(meta["accuracy"], dtype)
  init = meta.get("init_accuracy")
  return acc, None if init is None else np.asarray(init, dtype)


def _versions() -> dict:
  from bcl_jax import results
  v = results.versions()
  v.pop("devices", None)
  return v


# -- resuming ---------------------------------------------------------------

@dataclasses.dataclass
class ResumePoint:
  task: int            # last task trained; training continues at task + 1
  meta: dict
  config: dict         # the checkpointed config
  later: list[int]     # newer checkpoints that resume_from supersedes


def plan_resume(workdir: str, config) -> ResumePoint | None:
  """Which checkpoint a run in ``workdir`` continues from (None: start).

  Reads only the JSON items, so a refused config costs no training. Raises
  :class:`CheckpointError` if ``resume_from`` names a missing checkpoint or
  the config differs in a field that changes results (unless
  ``force_resume``).
  """
  steps = available(workdir)
  want = int(config.get("resume_from", -1))
  if not steps:
    if want >= 0:
      raise CheckpointError(
          f"resume_from={want}, but {directory(workdir)} holds no "
          "checkpoints")
    return None
  task = steps[-1] if want < 0 else want
  if task not in steps:
    raise CheckpointError(
        f"resume_from={want}: no checkpoint {os.path.join(directory(workdir), str(want))}; "
        f"available: {steps}")
  meta, saved = read_meta(workdir, task)
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
  base = os.path.join(os.path.abspath(workdir), f"{CHECKPOINT_DIR}.superseded-"
                      f"{time.strftime('%Y%m%d-%H%M%S')}")
  dest, n = base, 0
  while os.path.exists(dest):
    n += 1
    dest = f"{base}-{n}"
  os.makedirs(dest)
  for s in steps:
    os.replace(os.path.join(directory(workdir), str(s)),
               os.path.join(dest, str(s)))
  return dest


def check_space(workdir: str, state_bytes: int, n_saves: int) -> str | None:
  """Raises if the workdir cannot hold one more checkpoint; returns a
  warning if it cannot hold ``n_saves`` of them."""
  need = int(state_bytes * 1.05) + (1 << 20)   # arrays + metadata
  free = shutil.disk_usage(os.path.abspath(workdir)).free
  if free < 2 * need:
    raise CheckpointError(
        f"workdir {workdir} has {free / 2**20:.1f} MiB free; a checkpoint "
        f"needs about {need / 2**20:.1f} MiB (and room for the next while "
        "the last is kept). Free space, pick another --workdir, or "
        "--config.checkpoint=False")
  if free < n_saves * need:
    return (f"workdir {workdir} has {free / 2**20:.0f} MiB free, fewer than "
            f"the {n_saves * need / 2**20:.0f} MiB that {n_saves} checkpoints "
            "need; consider --config.keep=N")
  return None


# -- analysis -----------------------------------------------------------------

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

  Returns:
    A :class:`Checkpoint`.
  """
  steps = available(workdir)
  if not steps:
    raise CheckpointError(f"no checkpoints in {directory(workdir)}")
  task = steps[-1] if task is None or task < 0 else int(task)
  if task not in steps:
    raise CheckpointError(f"no checkpoint {os.path.join(directory(workdir), str(task))}; "
                          f"available: {steps}")
  meta, cfg = read_meta(workdir, task)
  config = config_from_dict(cfg)
  path = os.path.join(directory(workdir), str(task))
  if structured:
    from bcl_jax import train
    if bench is None:
      from bcl_jax.data import load_benchmark
      bench = load_benchmark(config)
    prog = train.Program(config, bench, train.expand_runs(config))
    template = jax.eval_shape(prog.init)
    state = restore_state(workdir, task, template, meta)
  else:
    state, error = _restore_arrays(os.path.join(path, "state"), None)
    if error is not None:
      raise CheckpointError(f"checkpoint {path} is corrupt or unreadable "
                            f"({error}); {_earlier_hint(workdir, task)}")
    if fingerprint(state) != meta.get("fingerprint"):
      raise CheckpointError(f"checkpoint {path} is corrupt: its arrays do "
                            "not match the fingerprint saved with them")
  acc, init = accuracy_of(meta)
  return Checkpoint(task=task, state=state, config=config, accuracy=acc,
                    init_accuracy=init, meta=meta, path=path)
