"""Runs and devices: seeds x settings as a leading axis of the state.

Several runs (``num_seeds`` seeds, times the points of ``config.sweep``) are
one program: the method state carries a leading run axis. :class:`RunAxis`
owns everything about that axis: the mesh that shards it over devices, the
placement of per-run and shared arrays, how a per-run function is applied to
all runs (``over_runs``) and the compile cache of the run-batched
executables.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

BATCHING = ("auto", "vmap", "map")

@dataclasses.dataclass
class Run:
  """One run of a program: a seed and its dynamic hyper-parameter values."""

  seed: int
  hp: dict[str, float]


def parse_sweep(spec: str, dynamic: Sequence[str], method: str = "",
                fields: Sequence[str] = ()) -> list[dict[str, float]]:
  """The grid points of ``config.sweep`` (``"lr=0.01,0.03;beta=0.1,0.3"``),
  in row-major order.

  Only ``dynamic`` fields (they live in ``state.hp`` and keep array shapes)
  can be swept inside one program; the others (``fields``: every config
  field) need one program per value (``scripts/grid.py``).

  Raises:
    ValueError: naming the bad field or value and what to do instead.
  """
  axes, seen = [], set()
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    if "=" not in part:
      raise ValueError(f"sweep entry {part!r} is not 'field=v1,v2,...'")
    name, values = (s.strip() for s in part.split("=", 1))
    vmappable = "vmappable fields" + (f" of {method}" if method else "") \
        + ": " + ", ".join(dynamic)
    if name not in dynamic and name not in fields:
      raise ValueError(f"unknown sweep field {name!r}; {vmappable}")
    if name not in dynamic:
      raise ValueError(
          f"sweep field {name!r} changes array shapes or the program and "
          f"cannot be vmapped; run one program per value with "
          f"scripts/grid.py --grid '{name}=v1,v2' ({vmappable})")
    if name in seen:
      raise ValueError(f"sweep field {name!r} given twice")
    seen.add(name)
    try:
      vals = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
      raise ValueError(f"sweep field {name!r}: values must be numbers, got "
                       f"{values!r}") from None
    if not vals:
      raise ValueError(f"sweep field {name!r} has no values")
    axes.append([(name, v) for v in vals])
  return [dict(p) for p in itertools.product(*axes)]


def expand_runs(config, dynamic: Sequence[str]) -> list[Run]:
  """The runs of a resolved config: the sweep grid x ``num_seeds`` seeds,
  grid point by grid point, seeds inside."""
  grid = parse_sweep(config.sweep, dynamic, config.method,
                     tuple(config.keys())) if config.sweep else [{}]
  n = int(config.num_seeds)
  if n < 1:
    raise ValueError(f"num_seeds must be >= 1, got {n}")
  runs = []
  for point in grid:
    hp = {k: float(config[k]) for k in dynamic}
    hp.update(point)
    runs.extend(Run(seed=int(config.seed) + s, hp=dict(hp)) for s in range(n))
  return runs


def runs_of(config) -> list[Run]:
  """:func:`expand_runs` of any config (resolved here)."""
  from bcl_jax import methods
  from bcl_jax.config import resolve
  config = resolve(config)
  return expand_runs(config, methods.get(config.method).dynamic)


def stacked_hp(runs: Sequence[Run], names: Sequence[str]) -> dict:
  """``state.hp`` of the runs: ``{name: float32 [runs]}``."""
  return {k: jnp.asarray([r.hp[k] for r in runs], jnp.float32) for k in names}


class RunAxis:
  """The run axis of one experiment: mesh, placement, batching, compiles.

  With one device (or one run) nothing is sharded. Otherwise the mesh has
  the largest number of devices that divides the number of runs; shared
  arrays (task data, test sets) are replicated, so each device holds its own
  runs' states and one copy of the data.
  """

  def __init__(self, runs: Sequence[Run], batching: str = "auto",
               cpu_batching: str = "map", compiler_options=None):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    if batching not in BATCHING:
      raise ValueError(f"run_batching must be 'auto', 'vmap' or 'map', got "
                       f"{batching!r}")
    self.runs = list(runs)
    devices = jax.devices()
    n = len(self.runs)
    k = max(d for d in range(1, len(devices) + 1) if n % d == 0)
    self.n_shards = k
    if k == 1:
      self.run_sharding = self.replicated = None
    else:
      mesh = Mesh(np.array(devices[:k]), ("runs",))
      self.run_sharding = NamedSharding(mesh, PartitionSpec("runs"))
      self.replicated = NamedSharding(mesh, PartitionSpec())
    # One run is normally traced without a run axis; a method that asks
    # for batching on CPU (MethodSpec.cpu_batching) gets a run axis of one,
    # whose batched kernels are the fast ones there (A-GEM on permuted
    # MNIST: 4.5 ms per step against 22 ms unbatched).
    self.squeeze_single = True
    if batching == "auto":
      # Batched matmuls of small per-run weights mostly run slower on one
      # CPU device than the runs one after the other; the method says.
      on_cpu = jax.default_backend() == "cpu" and self.n_shards == 1
      batching = cpu_batching if on_cpu else "vmap"
      self.squeeze_single = not (on_cpu and cpu_batching == "vmap")
    self.batching = batching
    # XLA options of every program compiled here (``train.compiler_options``).
    self.compiler_options = dict(compiler_options or {})
    self._compiled: dict[str, Any] = {}
    self.compile_seconds = 0.0

  def __len__(self) -> int:
    return len(self.runs)

  def place_runs(self, tree):
    """Puts run-batched arrays on the devices, split along the run axis."""
    if self.run_sharding is None:
      return jax.tree_util.tree_map(jnp.asarray, tree)
    return jax.device_put(tree, self.run_sharding)

  def place_shared(self, tree):
    """Puts arrays every run reads (task data, test sets) on the devices."""
    if self.replicated is None:
      return jax.tree_util.tree_map(jnp.asarray, tree)
    return jax.device_put(tree, self.replicated)

  def over_runs(self, f: Callable, in_axes=0) -> Callable:
    """``f`` applied to every run (leading axis) of its ``in_axes == 0``
    arguments.

    One run: ``f`` itself on the squeezed arguments (the same maths, without
    batched kernels). Several: ``vmap``, or a sequential ``lax.map`` inside
    the compiled step (``batching == "map"``).
    """
    axes = tuple(in_axes) if isinstance(in_axes, (tuple, list)) else None

    def split(args):
      ax = axes or (in_axes,) * len(args)
      return ax, [x for x, a in zip(args, ax) if a == 0]

    def merge(args, ax, batched):
      it = iter(batched)
      return [next(it) if a == 0 else x for x, a in zip(args, ax)]

    if len(self.runs) == 1 and self.squeeze_single:
      def single(*args):
        ax, batched = split(args)
        batched = [jax.tree_util.tree_map(lambda a: a[0], b) for b in batched]
        return jax.tree_util.tree_map(lambda a: a[None],
                                      f(*merge(args, ax, batched)))
      return single
    if self.batching == "map":
      def mapped(*args):
        ax, batched = split(args)
        return jax.lax.map(lambda b: f(*merge(args, ax, b)), tuple(batched))
      return mapped
    return jax.vmap(f, in_axes=in_axes)

  @staticmethod
  def _key(name: str, args) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return (name, treedef, tuple(
        (tuple(getattr(a, "shape", np.shape(a))),
         str(getattr(a, "dtype", type(a))), bool(getattr(a, "weak_type", False)))
        for a in leaves))

  def _jit(self, fn: Callable, donate):
    kw = {}
    if self.run_sharding is not None:
      # Every output (states, losses, accuracies) has the run axis first;
      # pinning it keeps the state's layout the same from call to call.
      kw["out_shardings"] = self.run_sharding
    return jax.jit(fn, donate_argnums=donate, **kw)

  def _build(self, fn: Callable, args, donate):
    return self._compile(self._jit(fn, donate).lower(*args))

  def _compile(self, lowered):
    return lowered.compile(compiler_options=self.compiler_options or None)

  def compile_ahead(self, name: str, fn: Callable, *args, donate=()) -> bool:
    """Traces and lowers ``fn`` for ``args`` (arrays or
    ``jax.ShapeDtypeStruct``) here, then compiles it in a background thread
    and returns.

    A later :meth:`compile` with the same name, shapes, dtypes and weak
    types waits for it (and re-raises its error, a tracing error included);
    other shapes compile as usual. XLA compiles without holding the GIL, so
    the caller's own tracing and compiling runs meanwhile (on a cold
    split-CIFAR start the initial state, the evaluation and the first task
    hook, ~6 s). The tracing is done in the caller's thread, under its
    thread-local JAX settings, and before the caller's other tracing: in a
    background thread it shared the interpreter with that tracing and
    reached the compiler ~2 s later (split CIFAR: 5.4 s of tracing and
    lowering instead of 3.4). One device only (the sharded programs compile
    on demand). Returns whether a compilation was started.
    """
    if self.n_shards != 1:
      return False
    key = self._key(name, args)
    if key in self._compiled:
      return False
    future = concurrent.futures.Future()
    self._compiled[key] = future
    try:
      lowered = self._jit(fn, donate).lower(*args)
    except Exception as e:  # surfaces in compile(), where the loop asks
      future.set_exception(e)
      return True
    except BaseException:  # an interrupt: no future left for compile() to wait on
      del self._compiled[key]
      raise

    def work():
      try:
        future.set_result(self._compile(lowered))
      except BaseException as e:  # surfaces in compile(), in the caller
        future.set_exception(e)

    threading.Thread(target=work, name=f"bcl-jax-compile-{name}",
                     daemon=True).start()
    return True

  def compile(self, name: str, fn: Callable, *args, donate=()):
    """``jit(fn)`` lowered and compiled once per ``name`` and argument
    shapes; the wall time spent compiling (or waiting for a
    :meth:`compile_ahead`) is added to :attr:`compile_seconds`."""
    key = self._key(name, args)
    entry = self._compiled.get(key)
    if entry is None or isinstance(entry, concurrent.futures.Future):
      start = time.perf_counter()
      try:
        self._compiled[key] = (entry.result() if entry is not None
                               else self._build(fn, args, donate))
      except BaseException:
        self._compiled.pop(key, None)
        raise
      self.compile_seconds += time.perf_counter() - start
    return self._compiled[key]
