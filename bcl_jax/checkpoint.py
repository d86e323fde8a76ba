"""Orbax checkpoints at task boundaries: plain save / restore / list / verify.

Layout (README "Checkpoints and resuming")::

    <workdir>/checkpoints/<k>/      k = 0-based index of the last task trained
        state/    the method state: nested dicts of arrays, leading run axis
        meta/     JSON: what the caller records (accuracy rows, runs, ...),
                  plus a SHA-256 fingerprint of the state, versions, and
                  a SHA-256 digest of this meta and the config
        config/   JSON: the full config

Each checkpoint is one step of an orbax ``CheckpointManager`` made of
standard items (``StandardSave`` + ``JsonSave``), so plain orbax reads it back
without bcl_jax::

    ocp.StandardCheckpointer().restore(f"{workdir}/checkpoints/{k}/state")

Saves run in the background (orbax's asynchronous checkpointing) while the
next task trains: :meth:`Manager.save` returns once orbax holds host copies
of the state, and the next save, :meth:`Manager.wait` or
:meth:`Manager.close` waits for it, so at most one save is in flight and a
failed one is reported by its checkpoint's name. Orbax writes each step into
a temporary folder that is renamed into place once complete, so a crash
during a save leaves the previous checkpoints as they were. Everything a resume reads is covered by
an integrity check: the digest (over the canonical JSON of meta without the
digest, of the config, and so of the state's fingerprint) on every
:func:`read_meta`, the fingerprint on every restore; a damaged or edited
checkpoint is refused by name instead of resuming to something wrong. What to save when, and whether a run may resume from a
checkpoint, is decided by :mod:`bcl_jax.resume`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any

import jax
import numpy as np

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 2

class CheckpointError(RuntimeError):
  """A checkpoint cannot be written, read or used; the message says which."""


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


def jsonable(d: dict) -> dict:
  """``d`` as JSON would give it back (tuples as lists, others as str)."""
  return json.loads(json.dumps(d, sort_keys=True, default=str))


def digest(meta: dict, config: dict) -> str:
  """SHA-256 over the canonical JSON of ``meta`` (its ``digest`` field
  left out) and of ``config``, both as JSON gives them back."""
  body = {k: v for k, v in jsonable(meta).items() if k != "digest"}
  h = hashlib.sha256()
  for part in (body, jsonable(config)):
    h.update(json.dumps(part, sort_keys=True, separators=(",", ":"))
             .encode())
    h.update(b"\n")
  return h.hexdigest()


def nbytes(tree) -> int:
  return int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape))
                 for a in jax.tree_util.tree_leaves(tree)))


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
  """``(meta, config dict)`` of one checkpoint, without touching arrays;
  both checked against the digest saved in meta."""
  meta = _read_json_item(workdir, task, "meta")
  cfg = _read_json_item(workdir, task, "config")
  path = os.path.join(directory(workdir), str(task))
  if isinstance(meta, dict) and "digest" not in meta and \
      meta.get("format") == 1:
    raise CheckpointError(
        f"checkpoint {path} was written by an older bcl_jax (format "
        f"{meta.get('format', 1)}) without an integrity digest; start again "
        "in a new workdir")
  if (not isinstance(meta, dict) or not isinstance(cfg, dict)
      or meta.get("digest") != digest(meta, cfg)):
    raise CheckpointError(
        f"checkpoint {path} is corrupt: its metadata or config does not "
        "match the digest saved with them (edited or damaged); "
        f"{_earlier_hint(workdir, task)}")
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
  ``CheckpointManager``; ``keep`` > 0 keeps only the newest ``keep``).

  With ``background`` (the default) a save is written while the caller goes
  on: :meth:`save` returns once the state is handed over, and the save is
  complete when the next :meth:`save`, :meth:`wait` or :meth:`close`
  returns. ``save_seconds`` counts the time the caller waited, per save.
  """

  def __init__(self, workdir: str, keep: int = 0, background: bool = True):
    import orbax.checkpoint as ocp
    self.workdir = workdir
    self.dir = directory(workdir)
    self.background = bool(background)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(keep) if keep and int(keep) > 0 else None,
        enable_async_checkpointing=self.background,
        cleanup_tmp_directories=True,       # leftovers of interrupted saves
        create=True)
    self._ocp = ocp
    self._mgr = ocp.CheckpointManager(
        self.dir, options=options, item_names=("state", "meta", "config"))
    self.save_seconds: list[float] = []
    self._pending: int | None = None    # the task whose save is in flight

  def path(self, task: int) -> str:
    return os.path.join(self.dir, str(task))

  def _failed(self, task: int, e: BaseException) -> CheckpointError:
    prev = [s for s in available(self.workdir) if s < task]
    return CheckpointError(
        f"could not write checkpoint {self.path(task)} ({_short(e)}); "
        + (f"the previous checkpoint {self.path(prev[-1])} is intact"
           if prev else "no earlier checkpoint exists"))

  def wait(self, quiet: bool = False) -> None:
    """Blocks until the save in flight, if any, is on disk.

    ``quiet``: a failed save is not raised (an error is already on its
    way; :func:`available` tells what was written).

    Raises:
      CheckpointError: that save failed (the message names it; the
        checkpoints before it are intact).
    """
    if self._pending is None:
      return
    task, self._pending = self._pending, None
    start = time.perf_counter()
    try:
      self._mgr.wait_until_finished()
    except Exception as e:  # orbax and tensorstore raise many types
      if not quiet:
        raise self._failed(task, e) from None
    finally:
      if self.save_seconds:
        self.save_seconds[-1] += time.perf_counter() - start

  def save(self, task: int, state, *, meta: dict, config: dict) -> float:
    """Writes checkpoint ``task``: the state, ``meta`` (plus format, task,
    fingerprint, versions) and ``config``; returns the seconds the caller
    waited (in the background mode: for the previous save to finish and
    for this one to be handed over).

    The state may be donated to a computation as soon as this returns:
    orbax copies the arrays to host memory before its ``save`` returns
    (tests/test_checkpoint.py overwrites them in place right after).
    """
    ocp = self._ocp
    start = time.perf_counter()
    self.wait()
    tree = state_to_tree(state)
    meta = dict(meta)
    meta.update({
        "format": FORMAT_VERSION,
        "task": int(task),
        "state_type": f"{type(state).__module__}.{type(state).__qualname__}",
        "state_bytes": nbytes(tree),
        "fingerprint": fingerprint(tree),
        "versions": _versions(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    config = jsonable(config)
    meta["digest"] = digest(meta, config)
    try:
      if task in self._mgr.all_steps():
        # An explicit re-save of the same task (resume_from replays it).
        self._mgr.delete(task)
      self._mgr.save(task, args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree),
          meta=ocp.args.JsonSave(meta),
          config=ocp.args.JsonSave(config)))
      if not self.background:
        self._mgr.wait_until_finished()
    except Exception as e:  # orbax and tensorstore raise many types
      raise self._failed(task, e) from None
    self._pending = task if self.background else None
    seconds = time.perf_counter() - start
    self.save_seconds.append(seconds)
    return seconds

  def close(self, quiet: bool = False):
    """Waits for the save in flight (``quiet`` as in :meth:`wait`), then
    releases orbax's manager."""
    try:
      self.wait(quiet)
    finally:
      self._mgr.close()


def restore_state(workdir: str, task: int, template, meta: dict):
  """The state of checkpoint ``task``, fingerprint checked against ``meta``.

  Args:
    template: a state of the same method and config (or its
      ``jax.eval_shape``) to restore into; None returns the nested dicts of
      arrays as stored.
  """
  path = os.path.join(directory(workdir), str(task))
  target = None if template is None else abstract_state(
      state_to_tree(template))
  tree, error = _restore_arrays(os.path.join(path, "state"), target)
  if error is not None:
    raise CheckpointError(
        f"checkpoint {path} is corrupt or does not fit this config's state "
        f"({error}); {_earlier_hint(workdir, task)}")
  if fingerprint(tree) != meta.get("fingerprint"):
    raise CheckpointError(
        f"checkpoint {path} is corrupt: its arrays do not match the "
        f"fingerprint saved with them; {_earlier_hint(workdir, task)}")
  return tree if template is None else tree_to_state(template, tree)


def _restore_arrays(path: str, target):
  """``(tree, None)`` or ``(None, short error message)``.

  A failed tensorstore read leaves orbax coroutines that were never awaited;
  they are collected here, quietly, so the one-line error is all the user
  sees.
  """
  import gc
  import sys
  import orbax.checkpoint as ocp
  error = _bad_json(path)
  if error is not None:
    # Orbax would fail on it too, but with its tensorstore reads still
    # running: their callbacks then hit a closed event loop and print
    # tracebacks after our error line.
    return None, error
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


_JSON_FILES = ("_METADATA", "_sharding", "array_metadatas")


def _bad_json(path: str) -> str | None:
  """The first of the state's JSON metadata files that does not parse."""
  for name in _JSON_FILES:
    p = os.path.join(path, name)
    files = ([os.path.join(p, f) for f in sorted(os.listdir(p))]
             if os.path.isdir(p) else [p] if os.path.exists(p) else [])
    for f in files:
      try:
        with open(f, "rb") as fh:
          json.loads(fh.read())
      except (OSError, ValueError) as e:
        return f"{os.path.relpath(f, path)}: {_short(e)}"
  return None


def _versions() -> dict:
  from bcl_jax import results
  v = results.versions()
  v.pop("devices", None)
  return v


# -- disk space ----------------------------------------------------------

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
