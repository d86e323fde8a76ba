"""Speed of the compiled observe step, against FLOPs and the machine's matmul.

    python scripts/bench.py                       # bcl_dual, permuted MNIST, N=1,4,16
    python scripts/bench.py --runs 1 --method er
    python scripts/bench.py --benchmark cifar     # reduced ResNet-18 shapes

For each number of vmapped runs N it builds the program of
``bcl_jax.train`` (the same code ``python -m bcl_jax.run`` executes), compiles
the chunk step, then times whole chunks of ``--steps`` observe steps on a
middle task (replay active) and reports: compile time, ms per (run-batched)
observe step, samples/s over all runs, achieved GFLOP/s and its ratio to this
machine's f32 matmul rate measured in the same process, plus the FLOP floor
(the step's FLOPs at the matmul rate) and how far the step is from it.

FLOPs are counted analytically from the layer shapes (see ``step_flops``):
only matmuls/convolutions, forward ``2*MAC`` per row, backward ``2*MAC`` for
the weight gradients plus ``2*MAC`` for the input gradients of every layer but
the first. Rows are what the compiled step really computes (padding rows of
the fixed-shape replay and outer batches included).

A correctness check: run 0 of each N-run program must match the same seed
run alone (N=1) after the first chunk (relative L2 difference < 1e-4; batched
kernels may round differently, and training amplifies rounding over long
horizons, so the check is made early).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bcl_jax import train  # noqa: E402
from bcl_jax.config import default_config  # noqa: E402
from bcl_jax.methods import bcl_dual  # noqa: E402


def matmul_gflops(n: int = 1024, reps: int = 20) -> float:
  """Best-of f32 ``n x n`` matmul rate of this backend, in GFLOP/s."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e9


def mlp_macs(dims) -> tuple[int, int]:
  """(MACs per row, MACs of the first layer) of an MLP."""
  macs = [a * b for a, b in zip(dims[:-1], dims[1:])]
  return sum(macs), macs[0]


def step_flops(config, n_tasks: int, input_dim: int, n_out: int,
               macs_row: int | None = None, first_macs: int = 0) -> float:
  """Analytic FLOPs of one observe step (one run)."""
  if macs_row is None:
    macs_row, first_macs = mlp_macs([input_dim, *config.hidden, n_out])
  fwd_bwd = 2 * macs_row + 2 * macs_row + 2 * (macs_row - first_macs)
  fwd = 2 * macs_row
  b = config.batch_size
  if config.method == "bcl_dual":
    n_mem, n_val = bcl_dual.memory_sizes(config)
    rep = min(n_mem, config.replay_batch_size)
    outer = min(n_tasks * n_val, config.replay_batch_size)
    rows = config.n_meta * (config.inner_steps * (b + rep) + outer)
    extra = 0
    if config.meta_gradient == "unrolled":  # second reverse pass, roughly
      extra = config.n_meta * config.inner_steps * (b + rep) * 2 * fwd_bwd
    return rows * fwd_bwd + extra
  if config.method in ("er", "bcl_single"):
    rep = min(config.n_memories, config.replay_batch_size)
    return config.inner_steps * (b + rep) * fwd_bwd
  del fwd
  return b * fwd_bwd


def mnist_bench(n_tasks=10):
  from bcl_jax.data import load_benchmark
  c = default_config()
  c.n_tasks = n_tasks
  return load_benchmark(c)


def cifar_like(n_tasks=17, n_per_task=500):
  from bcl_jax.data.benchmark import Task, make_benchmark
  rng = np.random.default_rng(0)
  tasks = []
  for t in range(n_tasks):
    x = rng.integers(0, 256, (n_per_task, 3072), dtype=np.uint8)
    y = rng.integers(5 * t, 5 * t + 5, n_per_task)
    tasks.append(Task(x, y, x[:100], y[:100]))
  return make_benchmark("cifar-like", tasks, task_incremental=True)


def time_program(config, bench, n_runs: int, steps: int, reps: int):
  config = config.copy_and_resolve_references()
  config.num_seeds = n_runs
  config.chunk_size = steps
  runs = train.expand_runs(config)
  prog = train.Program(config, bench, runs)
  state = prog.init()
  # Put a few tasks' worth of memory in place so replay is active: learn
  # task 0 briefly, then time on task 1.
  task_id = 1
  state = prog.begin_task(state, 0)
  x0 = jnp.asarray(bench.tasks[0].x_train)
  y0 = jnp.asarray(bench.tasks[0].y_train)
  x1 = jnp.asarray(bench.tasks[task_id].x_train)
  y1 = jnp.asarray(bench.tasks[task_id].y_train)

  def chunk_args(task, x, y, offset):
    order = [train.task_order(x.shape[0], 1.0, config.batch_size, r.seed, task)
             for r in runs]
    index = np.stack([np.resize(o[0], (steps, config.batch_size))
                      for o in order])
    valid = np.ones_like(index, bool)
    keys = jnp.stack([jax.random.split(jax.random.PRNGKey(r.seed + offset),
                                       steps) for r in runs])
    return (x, y, jnp.asarray(index), jnp.asarray(valid), keys)

  args0 = chunk_args(0, x0, y0, 0)
  t0 = time.perf_counter()
  prog.compile_chunk(state, *args0)
  compile_s = time.perf_counter() - t0
  state, _ = prog.run_chunk(state, *args0, 0)
  # For the correctness check: run 0's parameters after the first chunk.
  first = jax.tree_util.tree_map(lambda a: np.asarray(a)[0],
                                 state.variables["params"])
  state = prog.begin_task(state, task_id)
  times = []
  for r in range(reps):
    args = chunk_args(task_id, x1, y1, 1000 + r)
    t = time.perf_counter()
    state, losses = prog.run_chunk(state, *args, task_id)
    jax.block_until_ready(losses)
    times.append(time.perf_counter() - t)
  return compile_s, times, first


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--benchmark", default="mnist", choices=["mnist", "cifar"])
  ap.add_argument("--method", default="bcl_dual")
  ap.add_argument("--runs", default="1,4,16")
  ap.add_argument("--steps", type=int, default=100,
                  help="observe steps per timed chunk")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--meta-gradient", default="first_order")
  ap.add_argument("--run-batching", default="auto",
                  choices=["auto", "vmap", "map"])
  ap.add_argument("--no-check", action="store_true")
  ap.add_argument("--full-run", action="store_true",
                  help="also time a whole N=1 run over every task")
  args = ap.parse_args()

  c = default_config()
  c.method = args.method
  c.meta_gradient = args.meta_gradient
  c.progress = False
  if args.benchmark == "mnist":
    from configs.mnist import get_config
    c = get_config()
    c.method, c.meta_gradient, c.progress = (args.method, args.meta_gradient,
                                             False)
    bench = mnist_bench()
    macs = None
    first = 0
  else:
    from bcl_jax.models.resnet import make_resnet  # noqa: F401
    c.lr, c.beta, c.inner_steps, c.n_meta, c.n_memories = 0.3, 0.1, 2, 1, 65
    bench = cifar_like()
    macs, first = 14_085_760, 3 * 20 * 9 * 32 * 32
  c.run_batching = args.run_batching
  flops = step_flops(c, bench.n_tasks, bench.n_inputs, bench.n_outputs,
                     macs, first)
  peak = matmul_gflops()
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPUs; f32 matmul 1024^3: {peak:.1f} GFLOP/s")
  print(f"runs batched by: {args.run_batching} "
        f"(auto = map on one CPU device, vmap otherwise)")
  print(f"{args.method} on {bench.name}: {flops / 1e6:.1f} MFLOP per observe "
        f"step per run (analytic)")
  runs = [int(r) for r in args.runs.split(",")]
  header = (f"{'N':>3} {'compile s':>9} {'ms/step':>8} {'ms/step/run':>11} "
            f"{'samples/s':>10} {'GFLOP/s':>8} {'% matmul':>8} "
            f"{'x floor':>7}")
  print(header)
  print("-" * len(header))
  finals = {}
  for n in runs:
    comp, times, state = time_program(c, bench, n, args.steps, args.reps)
    best = min(times)
    ms = 1000 * best / args.steps
    gflops = n * flops * args.steps / best / 1e9
    floor_ms = 1000 * n * flops / (peak * 1e9)
    print(f"{n:>3} {comp:>9.2f} {ms:>8.3f} {ms / n:>11.3f} "
          f"{n * c.batch_size * args.steps / best:>10.0f} {gflops:>8.2f} "
          f"{100 * gflops / peak:>7.1f}% {ms / floor_ms:>7.2f}", flush=True)
    finals[n] = state
  if args.full_run:
    full = c.copy_and_resolve_references()
    full.num_seeds = 1
    t0 = time.perf_counter()
    out = train.train_and_evaluate(full, bench, log=lambda *_: None)
    wall = time.perf_counter() - t0
    t = out["timing"]
    acc = float(out["accuracy"][0, -1].mean())
    print(f"full run, N=1, {bench.n_tasks} tasks: wall {wall:.1f}s (train "
          f"{t['train_seconds']:.1f}s, compile {t['compile_seconds']:.1f}s), "
          f"{t['ms_per_step']:.3f} ms/step, {t['samples_per_second']:.0f} "
          f"samples/s, ACC {acc:.4f}")
  if not args.no_check and 1 in finals:
    ref = np.concatenate([a.ravel() for a in
                          jax.tree_util.tree_leaves(finals[1])])
    for n, first in finals.items():
      got = np.concatenate([a.ravel() for a in
                            jax.tree_util.tree_leaves(first)])
      err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
      print(f"check: run 0 of N={n} vs N=1 (same seed), after {args.steps} "
            f"steps: relative L2 difference {err:.1e} "
            f"{'OK' if err < 1e-4 else 'MISMATCH'}")


if __name__ == "__main__":
  main()
