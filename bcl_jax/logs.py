"""Metric logs in the workdir, for the training loop to call.

Following the flax examples' habit (metric writers that put their files in
the workdir), :class:`MetricLogger` writes, under ``workdir``:

* ``metrics.csv``: long format, one row per value:
  ``step,task,run,name,value``. ``step`` is the loop's global observe-step
  index, ``task`` the 0-based task index (as in ``results.json`` and the
  checkpoint folders), ``run`` the run index in ``results.json``'s ``runs``
  (empty for a value of the whole program, such as a timing).
* ``tb/``: TensorBoard event files, one folder per run (``tb/run0``, ...)
  and ``tb/all`` for the program's values, so TensorBoard draws one line per
  run. The event-file format (TFRecord framing around ``Event`` protocol
  buffers) is written here directly: neither TensorFlow nor tensorboard is
  needed to write it, and :func:`read_events` reads it back.
* optionally Weights & Biases (``wandb=True``; ``pip install
  'bcl_jax[wandb]'``), which honours ``WANDB_MODE=offline``.

``show_progress(config)`` says whether to draw progress bars.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from typing import Any, Iterator

import numpy as np

CSV_HEADER = "step,task,run,name,value\n"


def show_progress(config, stream=None) -> bool:
  """Progress bars only when ``config.progress`` and stderr is a terminal.

  ``progress=True`` (the default) means "when it can be seen": bars written
  to a log file or a pipe are noise.
  """
  stream = sys.stderr if stream is None else stream
  if not bool(config.get("progress", True)):
    return False
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # closed or not a real stream
    return False


# ------------------------------------------------------- event-file format --

def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # negative int64 as protobuf does: two's complement
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field(num: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field."""
  return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def encode_event(step: int, wall_time: float,
                 scalars: dict[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
  """A serialised ``tensorflow.Event`` with simple-value summaries."""
  out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(int(step))
  if file_version is not None:
    out += _field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _field(1, _field(1, tag.encode()) + b"\x15"
               + struct.pack("<f", float(v)))
        for tag, v in scalars.items())
    out += _field(5, values)
  return out


def _record(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", _masked_crc(length)) + data
          + struct.pack("<I", _masked_crc(data)))


class EventFileWriter:
  """Appends scalar events to one ``events.out.tfevents.*`` file."""

  def __init__(self, folder: str):
    os.makedirs(folder, exist_ok=True)
    name = (f"events.out.tfevents.{int(time.time())}."
            f"{socket.gethostname()}.{os.getpid()}")
    self.path = os.path.join(folder, name)
    self._f = open(self.path, "ab")
    self._f.write(_record(encode_event(0, time.time(),
                                       file_version="brain.Event:2")))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._f.write(_record(encode_event(step, time.time(), values)))

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
  shift = n = 0
  while True:
    b = buf[i]
    i += 1
    n |= (b & 0x7F) << shift
    shift += 7
    if not b & 0x80:
      return n, i


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
  """``(field number, wire type, value)`` of a serialised message."""
  i = 0
  while i < len(buf):
    key, i = _read_varint(buf, i)
    num, wire = key >> 3, key & 7
    if wire == 0:
      val, i = _read_varint(buf, i)
    elif wire == 1:
      val, i = buf[i:i + 8], i + 8
    elif wire == 2:
      n, i = _read_varint(buf, i)
      val, i = buf[i:i + n], i + n
    elif wire == 5:
      val, i = buf[i:i + 4], i + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    yield num, wire, val


def read_events(path: str) -> list[tuple[int, str, float]]:
  """The ``(step, tag, value)`` scalars of an event file, in file order.

  Raises:
    ValueError: for a truncated record or a checksum that does not match.
  """
  with open(path, "rb") as f:
    data = f.read()
  out, i = [], 0
  while i < len(data):
    if i + 12 > len(data):
      raise ValueError(f"{path}: truncated record header at byte {i}")
    header = data[i:i + 8]
    (n,) = struct.unpack("<Q", header)
    (crc,) = struct.unpack("<I", data[i + 8:i + 12])
    body = data[i + 12:i + 12 + n]
    if crc != _masked_crc(header) or len(body) != n:
      raise ValueError(f"{path}: corrupt record at byte {i}")
    (crc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
    if crc != _masked_crc(body):
      raise ValueError(f"{path}: data checksum mismatch at byte {i}")
    i += 16 + n
    step = 0
    for num, _, val in _fields(body):
      if num == 2:
        step = val
      elif num == 5:
        for vnum, _, value in _fields(val):
          if vnum != 1:
            continue
          tag, simple = "", None
          for fnum, _, fval in _fields(value):
            if fnum == 1:
              tag = fval.decode()
            elif fnum == 2:
              (simple,) = struct.unpack("<f", fval)
          if simple is not None:
            out.append((step, tag, simple))
  return out


# ---------------------------------------------------------------- logger --

class MetricLogger:
  """Writes a run's scalars to ``metrics.csv``, TensorBoard and W&B.

  Args:
    workdir: the run's folder (created if needed).
    enabled: False makes every method a no-op (nothing is written).
    wandb: also log to Weights & Biases (``WANDB_MODE=offline`` works).
    run_names: TensorBoard folder per run (default ``run0``, ``run1``, ...).

  Raises:
    ImportError: ``wandb=True`` without the ``wandb`` package installed.
  """

  def __init__(self, workdir: str, enabled: bool = True, wandb: bool = False,
               run_names: list[str] | None = None):
    self.workdir, self.enabled = workdir, enabled
    self._run_names = run_names
    self._tb: dict[str, EventFileWriter] = {}
    self._task, self._step = 0, 0
    self._wandb = None
    if not enabled:
      return
    if wandb:  # checked first: a missing package must not leave files open
      try:
        import wandb as wandb_lib
      except ImportError:
        raise ImportError("wandb=True needs the wandb package: pip install "
                          "'bcl_jax[wandb]' (or log without wandb)") from None
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.csv")
    fresh = not os.path.exists(path) or os.path.getsize(path) == 0
    self._csv = open(path, "a")
    if fresh:
      self._csv.write(CSV_HEADER)
    if wandb:
      self._wandb = wandb_lib.init(dir=workdir, project="bcl_jax",
                                   name=os.path.basename(
                                       os.path.abspath(workdir)))

  def _writer(self, run: int | None) -> EventFileWriter:
    if run is None:
      name = "all"
    elif self._run_names is not None and run < len(self._run_names):
      # A folder name: no separators, nothing a shell would trip on.
      name = "".join(c if c.isalnum() or c in "._=-" else "_"
                     for c in self._run_names[run])
    else:
      name = f"run{run}"
    if name not in self._tb:
      self._tb[name] = EventFileWriter(os.path.join(self.workdir, "tb", name))
    return self._tb[name]

  def scalars(self, step: int, values: dict[str, Any], prefix: str = "",
              task: int | None = None) -> None:
    """Logs ``values`` at ``step`` under ``prefix/name``.

    A value is a float (of the whole program), a ``[runs]`` array (one per
    run) or a ``[runs, k]`` array (k consecutive steps from ``step``, as a
    compiled chunk returns them). ``task`` defaults to the task after the
    last ``task_end``.
    """
    if not self.enabled:
      return
    task = self._task if task is None else int(task)
    # rows[(step, run)] -> {name: value}
    rows: dict[tuple[int, int | None], dict[str, float]] = {}
    for name, v in values.items():
      full = f"{prefix}/{name}" if prefix else name
      a = np.asarray(v, dtype=np.float64)
      if a.ndim == 0:
        rows.setdefault((step, None), {})[full] = float(a)
      elif a.ndim == 1:
        for r, x in enumerate(a):
          rows.setdefault((step, r), {})[full] = float(x)
      elif a.ndim == 2:
        for r in range(a.shape[0]):
          for k in range(a.shape[1]):
            rows.setdefault((step + k, r), {})[full] = float(a[r, k])
      else:
        raise ValueError(f"{full}: a value must be a float, a [runs] or a "
                         f"[runs, steps] array, got shape {a.shape}")
    for (s, run), named in sorted(rows.items(),
                                  key=lambda kv: (kv[0][0], -1 if kv[0][1] is None
                                                  else kv[0][1])):
      for name, x in named.items():
        self._csv.write(f"{s},{task},{'' if run is None else run},{name},"
                        f"{x!r}\n")
      self._writer(run).scalars(s, named)
      self._step = max(self._step, s)
    if self._wandb is not None:
      self._log_wandb(rows)

  def _log_wandb(self, rows) -> None:
    by_step: dict[int, dict[str, float]] = {}
    for (s, run), named in rows.items():
      for name, x in named.items():
        key = name if run is None else f"{name}/run{run}"
        by_step.setdefault(s, {})[key] = x
    for s in sorted(by_step):
      self._wandb.log(by_step[s], step=s)

  def task_end(self, task: int, row, timing: dict | None = None) -> None:
    """Logs the evaluation after ``task`` (0-based) and its timing.

    Args:
      task: the task just learned.
      row: ``[runs, T]`` (or ``[T]`` for one run) accuracies on every task.
      timing: numbers of the whole program (e.g. ``train_seconds``); other
        entries are skipped.
    """
    if not self.enabled:
      return
    a = np.asarray(row, dtype=np.float64)
    a = a[None] if a.ndim == 1 else a
    per_run = {f"acc_task{j}": a[:, j] for j in range(a.shape[1])}
    per_run["acc_seen"] = a[:, :task + 1].mean(1)
    per_run["acc_all"] = a.mean(1)
    self.scalars(self._step, per_run, prefix="eval", task=task)
    nums = {k: float(v) for k, v in (timing or {}).items()
            if isinstance(v, (int, float, np.number))
            and not isinstance(v, bool)}
    if nums:
      self.scalars(self._step, nums, prefix="time", task=task)
    self._task = task + 1
    self.flush()

  def flush(self) -> None:
    if not self.enabled:
      return
    self._csv.flush()
    for w in self._tb.values():
      w.flush()

  def close(self) -> None:
    """Flushes and closes every file (and finishes the W&B run)."""
    if not self.enabled or self._csv.closed:
      return
    self.flush()
    self._csv.close()
    for w in self._tb.values():
      w.close()
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None

  def __enter__(self) -> "MetricLogger":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_csv(path: str) -> list[dict[str, Any]]:
  """The rows of a ``metrics.csv``: ``step``, ``task`` (int), ``run`` (int or
  None), ``name`` (str), ``value`` (float)."""
  out = []
  with open(path) as f:
    header = f.readline()
    if header != CSV_HEADER:
      raise ValueError(f"{path} is not a metrics.csv (header {header!r})")
    for line in f:
      step, task, run, name, value = line.rstrip("\n").split(",")
      out.append({"step": int(step), "task": int(task),
                  "run": int(run) if run else None, "name": name,
                  "value": float(value)})
  return out
