"""What keeps a run from harming its workdir or its machine.

* :class:`WorkdirLock`: one run per workdir. An exclusive ``flock`` on
  ``<workdir>/.bcl-run.lock`` held for the life of the run; the kernel drops
  it when the process ends however it ends, so a lock left by a dead process
  never blocks. The file records the holder's pid, host and start time so a
  refusal can name it. Readers (``bcl_jax.evaluate``) take no lock.
* :func:`stop_on_signals` / :func:`check_stop`: SIGINT and SIGTERM set a flag
  that the training loop checks between chunks, where no computation is in
  flight; the run then stops with :class:`Interrupted`. Raising
  ``KeyboardInterrupt`` at an arbitrary bytecode instead can leave an XLA
  computation running while the interpreter shuts down (a segfault at exit)
  or be swallowed by a garbage-collection callback (the run goes on and
  exits 0). A second signal stops at once.
* :func:`estimate_memory` / :func:`check_memory`: the memory a run needs,
  from shapes only, refused before anything large is allocated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from typing import Iterator

LOCK_NAME = ".bcl-run.lock"
GiB = float(1 << 30)


# -- one run per workdir -------------------------------------------------

class LockError(RuntimeError):
  """The workdir is in use by another run; the message names it."""


class WorkdirLock:
  """An exclusive advisory lock on a workdir, for the life of a run."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock at once or raises :class:`LockError` naming the
    holder."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise LockError(
          f"workdir {os.path.dirname(self.path)} is in use by another run "
          f"({holder(self.path)}); wait for it to finish, or pass another "
          "--workdir") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the last descriptor drops the flock
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def holder(path: str) -> str:
  """``pid N on host H since T`` from a lock file (or what is known)."""
  try:
    with open(path) as f:
      info = json.loads(f.read() or "{}")
    return (f"pid {info['pid']} on host {info['host']} since "
            f"{info['started']}")
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that has not yet recorded its pid"


# -- signals ----------------------------------------------------------------

class Interrupted(KeyboardInterrupt):
  """The run was stopped by SIGINT or SIGTERM (``signum``)."""

  def __init__(self, signum: int = signal.SIGINT):
    super().__init__(signal.Signals(signum).name)
    self.signum = int(signum)

  @property
  def exit_code(self) -> int:
    """The shell's convention: 128 + the signal (130 SIGINT, 143 SIGTERM)."""
    return 128 + self.signum


_requested: list[int] = []   # signals received since stop_on_signals began


def _handler(signum, frame):  # pylint: disable=unused-argument
  _requested.append(signum)
  if len(_requested) > 1:       # asked twice: stop now, wherever we are
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
  """SIGINT/SIGTERM request a stop at the next :func:`check_stop` (a
  second one raises :class:`Interrupted` at once). Outside the main thread
  (where Python cannot install handlers) it does nothing."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  sigs = (signal.SIGINT, signal.SIGTERM)
  previous = {s: signal.getsignal(s) for s in sigs}
  _requested.clear()
  for s in sigs:
    signal.signal(s, _handler)
  try:
    yield   # a signal after the last check changes nothing: the run is done
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    _requested.clear()


def exit_on_signals() -> None:
  """Makes SIGINT/SIGTERM end the process at once with one line and
  128 + the signal, for the stretches where nothing is worth saving
  (imports, parsing flags, read-only work). ``os._exit`` skips the
  interpreter's shutdown, which can crash under a running XLA computation
  or print the traceback of an interrupted import."""
  def handler(signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    os.write(2, ("error: interrupted\n" if signum == signal.SIGINT
                 else f"error: stopped by {name}\n").encode())
    os._exit(128 + signum)
  for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, handler)


def check_stop() -> None:
  """Raises :class:`Interrupted` if a stop was requested."""
  if _requested:
    raise Interrupted(_requested[0])


def drain() -> None:
  """Waits for every dispatched computation, so that the interpreter never
  shuts down under a running XLA computation."""
  if "jax" not in sys.modules:
    return
  import jax  # pylint: disable=import-outside-toplevel
  for a in jax.live_arrays():
    try:
      a.block_until_ready()
    except Exception:  # pylint: disable=broad-except
      pass  # a failed or deleted buffer: nothing to wait for


# -- memory -----------------------------------------------------------------

def available_memory() -> int:
  """Bytes this process may still allocate: ``MemAvailable`` of
  /proc/meminfo (or free pages), capped by a cgroup limit if any."""
  avail = None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          avail = int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  if avail is None:
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  for path in ("/sys/fs/cgroup/memory.max",
               "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    try:
      with open(path) as f:
        limit = f.read().strip()
      if limit.isdigit() and int(limit) < avail:
        avail = int(limit)
    except OSError:
      pass
  return avail


@dataclasses.dataclass
class Part:
  """One term of a memory estimate: bytes, what it is, the knob."""

  nbytes: int
  what: str
  knob: str


def fmt_bytes(n: float) -> str:
  return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2**20:.0f} MiB"


def check_memory(parts: list[Part], limit_gb: float = 0.0,
                 stage: str = "this run") -> int:
  """Raises :class:`ResourceError` naming the biggest part's knob if
  ``parts`` exceed the memory available (``limit_gb`` > 0: that many GiB
  instead); returns the total."""
  total = sum(p.nbytes for p in parts)
  limit = limit_gb * GiB if limit_gb and limit_gb > 0 else available_memory()
  if total > limit:
    big = max(parts, key=lambda p: p.nbytes)
    terms = ", ".join(f"{p.what} {fmt_bytes(p.nbytes)}"
                      for p in sorted(parts, key=lambda p: -p.nbytes)
                      if p.nbytes >= total / 100)
    source = (f"allowed (memory_limit_gb={limit_gb:g})"
              if limit_gb and limit_gb > 0 else "available now")
    raise ResourceError(
        f"{stage} needs about {fmt_bytes(total)} of memory ({terms}), more "
        f"than the {fmt_bytes(limit)} {source}; {big.knob} (or set "
        "--config.memory_limit_gb if the estimate is wrong)")
  return total


class ResourceError(RuntimeError):
  """Not enough memory or disk for a run; the message says which knob."""


def _ceil_to(n: int, k: int) -> int:
  return max(1, -(-int(n) // int(k))) * int(k)


def _steps(n: int, config) -> int:
  """Observe steps of one task's pass (as ``train.task_order`` cuts it)."""
  use = float(config.use)
  keep = max(1, min(int(n * use) if use <= 1 else int(use), n))
  return int(config.n_epochs) * -(-keep // int(config.batch_size))


_STATE_KNOB = ("reduce n_memories (memory slots per task), the model "
               "(hidden), or the runs (num_seeds, sweep)")


def benchmark_parts(config) -> list[Part]:
  """The benchmark's arrays, before it is built: ``n_tasks`` x one task
  of the base digits (the embedded ones or a base MNIST folder); [] for a
  prepared file, whose size the file itself bounds."""
  from bcl_jax.data import mnist  # pylint: disable=import-outside-toplevel
  data_file = str(config.get("data_file", "") or "")
  path = os.path.join(str(config.get("data_path", "")), data_file)
  if data_file and not os.path.isdir(path):
    return []
  base = (mnist.load_mnist_embedded() if not data_file
          else mnist.load_mnist_folder(path))
  n_tasks = int(config.n_tasks) if int(config.n_tasks) > 0 else 10
  pixels = int(math.prod(base.x_train.shape[1:]))
  per_task = (len(base.x_train) + len(base.x_test)) * (pixels * 4 + 8)
  # The tasks, then the test sets stacked for evaluation (host and device).
  tests = n_tasks * _ceil_to(len(base.x_test), int(config.eval_batch_size)) \
      * (pixels * 4 + 5)
  return [Part(n_tasks * per_task, f"{n_tasks} tasks of data",
               "reduce n_tasks"),
          Part(2 * tests, "stacked test sets", "reduce eval_batch_size "
               "(or n_tasks)")]


def run_parts(config, bench, state_bytes: int, n_runs: int, joint: bool,
              conv: bool) -> list[Part]:
  """What training ``bench`` allocates beyond the benchmark itself.

  Rough but from the config's own numbers: the state (x3: the state, the
  donated step's output, a host copy while saving), one phase's training
  arrays (x2: host and device), the batch order and keys of a phase padded
  to whole chunks, the test sets stacked per ``eval_batch_size``, and the
  activations of a step and of an evaluation batch.
  """
  tasks = bench.tasks
  n_train = [t.x_train.shape[0] for t in tasks]
  sample = int(math.prod(bench.input_shape)) * tasks[0].x_train.itemsize
  phase_rows = sum(n_train) if joint else max(n_train)
  steps = (sum(_steps(n, config) for n in n_train) if joint
           else max(_steps(n, config) for n in n_train))
  chunk = int(config.chunk_size)
  padded = _ceil_to(steps, chunk)
  bsz = int(config.batch_size)
  n_test = max(t.x_test.shape[0] for t in tasks)
  ebs = int(config.eval_batch_size)
  # Activations per sample: the input and hidden widths (x16 for the conv
  # nets' feature maps), forward and backward, over batch and replay.
  width = int(math.prod(bench.input_shape)) * (16 if conv else 1) + \
      sum(int(h) for h in (config.get("hidden") or ()))
  replay = int(config.get("replay_batch_size") or 0)
  return [
      Part(3 * state_bytes, f"state of {n_runs} run(s) x3", _STATE_KNOB),
      Part(2 * phase_rows * (sample + 9), "one phase's training data",
           "reduce the data per task (use)"),
      Part(n_runs * steps * bsz * 8 * 3, "batch order of a phase",
           "reduce n_epochs or use"),
      Part(n_runs * padded * (bsz * 5 + 8 + 4), f"chunks of {chunk} steps",
           "reduce chunk_size" if padded > 2 * steps
           else "reduce n_epochs or use"),
      Part(2 * len(tasks) * _ceil_to(n_test, ebs) * (sample + 5),
           "stacked test sets", "reduce eval_batch_size"),
      Part(n_runs * ebs * width * 4 * 2, "evaluation activations",
           "reduce eval_batch_size"),
      Part(n_runs * (bsz + replay) * width * 4 * 8, "step activations",
           "reduce batch_size or replay_batch_size"),
  ]


def check_disk(folder: str, need: int, what: str) -> None:
  """Raises :class:`ResourceError` if ``folder`` has less than ``need``
  bytes free for ``what``."""
  import shutil  # pylint: disable=import-outside-toplevel
  free = shutil.disk_usage(os.path.abspath(folder)).free
  if free < need:
    raise ResourceError(
        f"workdir {folder} has {fmt_bytes(free)} free; {what} need about "
        f"{fmt_bytes(need)}. Free space or pick another --workdir")
