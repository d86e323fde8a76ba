"""Milliseconds per BCL-Dual observe step on split-CIFAR shapes, vs FLOPs.

    python scripts/bench_cifar.py [--steps 20] [--chunk 10] [--task 1]

The step is the compiled chunk of ``bcl_jax.train.Program`` (the one the
training loop runs), with ``configs/cifar.py``'s paper hyper-parameters:
reduced ResNet-18 (nf = 20), batch 10, inner_steps 2, n_meta 1, n_memories
65 (``n_mem = 52`` episodic, ``n_val = 13`` generalisation slots per task),
replay batch ``min(52, 128) = 52``, outer batch ``min((t + 1) * 13, 128)``
real rows padded to ``min(17 * 13, 128) = 128``. Data: random uint8
``[N, 3072]`` images in 17 tasks of 5 classes, built in memory (no files).
Compile time is excluded: a first chunk compiles and fills task 0's memories,
then chunks of task ``--task`` (``>= 1``, so replay is on) are timed.

FLOP count (analytic, multiply-adds x 2):

* forward MACs per 32x32 sample of the reduced ResNet-18 are summed layer by
  layer from the architecture (:func:`reduced_resnet18_macs`): 14,085,760
  with 100 outputs (the ResNet-18 author's count for this net), 14,083,360
  with cifar-cl's 85;
* forward + backward ~= 3 x forward (the backward pass computes gradients
  with respect to activations and to weights, each about one forward);
* rows per step: ``inner_steps x (batch + replay) + outer``. We report it two
  ways: *useful* rows (the real outer rows at this task, ``(t + 1) * 13``)
  and *executed* rows (the padded outer batch of 128 the fixed-shape program
  computes). Memory writes, sampling, losses, BatchNorm and SGD updates are
  ignored (well under 1% of the convolutions).

The machine's reference speed is a 1024 x 1024 float32 ``jnp.dot`` timed in
the same run (``2 * 1024**3`` FLOPs), and, to separate the network from the
method's bookkeeping, one plain forward+backward of the network on a batch
of the same number of rows is timed too.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bcl_jax import train  # noqa: E402
from bcl_jax.data.benchmark import Task, make_benchmark  # noqa: E402
from bcl_jax.methods.bcl_dual import memory_sizes  # noqa: E402


def reduced_resnet18_macs(side: int = 32, nf: int = 20,
                          n_outputs: int = 100) -> int:
  """Forward multiply-adds of one sample through the reduced ResNet-18."""
  total = side * side * 9 * 3 * nf  # stem conv3x3, stride 1, pad 1
  s = (side + 2 - 3) // 2 + 1  # max-pool 3x3/2, pad 1
  cin = nf
  for stage, width in enumerate((nf, 2 * nf, 4 * nf, 8 * nf)):
    for block in range(2):
      stride = 2 if (stage > 0 and block == 0) else 1
      s = (s + 2 - 3) // stride + 1
      total += s * s * 9 * cin * width + s * s * 9 * width * width
      if stride != 1 or cin != width:
        total += s * s * cin * width  # 1x1 projection
      cin = width
  return total + cin * n_outputs


def load_config(path: str, variant: str = ""):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def synthetic_cifar(n_tasks: int, n_train: int, n_test: int, seed: int = 0):
  """Random uint8 CIFAR rows in ``n_tasks`` tasks of 5 classes."""
  rng = np.random.default_rng(seed)
  tasks = []
  for t in range(n_tasks):
    ys = [np.arange(5 * t, 5 * t + 5).repeat(math.ceil(n / 5))[:n]
          for n in (n_train, n_test)]
    tasks.append(Task(rng.integers(0, 256, (n_train, 3072), np.uint8),
                      rng.permutation(ys[0]),
                      rng.integers(0, 256, (n_test, 3072), np.uint8), ys[1]))
  return make_benchmark("cifar-synthetic", tasks, task_incremental=True)


def timed(fn, *args, reps: int) -> float:
  """Seconds per call of an already compiled ``fn`` (median of ``reps``)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def matmul_gflops(n: int = 1024, reps: int = 10) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  return 2 * n**3 / timed(jax.jit(jnp.dot), a, b, reps=reps) / 1e9


def network_fwd_bwd_seconds(model, variables, rows: int, reps: int) -> float:
  """One plain training-mode forward + backward on ``rows`` CIFAR rows."""
  x = jax.random.uniform(jax.random.key(2), (rows, 3072))

  @jax.jit
  def grad(params, stats):
    def loss(p):
      logits, _ = model.apply({"params": p, "batch_stats": stats}, x, True)
      return jnp.mean(jax.nn.logsumexp(logits, -1))
    return jax.grad(loss)(params)

  return timed(grad, variables["params"], variables["batch_stats"], reps=reps)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=20,
                      help="timed observe steps (default 20)")
  parser.add_argument("--chunk", type=int, default=10,
                      help="steps per compiled chunk (default 10)")
  parser.add_argument("--task", type=int, default=1,
                      help="task whose steps are timed, >= 1 (default 1)")
  parser.add_argument("--n-tasks", type=int, default=17,
                      help="tasks in the benchmark (cifar-cl: 17)")
  args = parser.parse_args(argv)
  if args.task < 1 or args.task >= args.n_tasks:
    parser.error("--task must be in [1, n_tasks - 1]")

  config = load_config(os.path.join(REPO, "configs", "cifar.py"))
  config.chunk_size = args.chunk
  config.progress = False
  n_chunks = max(1, math.ceil(args.steps / args.chunk))
  batch = int(config.batch_size)
  # Enough training rows for the timed chunks (and task 0's fill chunk).
  n_train = max(n_chunks * args.chunk, args.chunk) * batch
  bench = synthetic_cifar(args.n_tasks, n_train, 10)
  runs = train.expand_runs(config)
  prog = train.Program(config, bench, runs)
  state = prog.init()

  def chunk_args(task: int, c: int):
    idx, valid = train.task_order(n_train, 1.0, batch, runs[0].seed, task)
    sl = slice(c * args.chunk, (c + 1) * args.chunk)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(0), task),
                            idx.shape[0])
    return (jnp.asarray(bench.tasks[task].x_train),
            jnp.asarray(bench.tasks[task].y_train),
            jnp.asarray(idx[None, sl]), jnp.asarray(valid[None, sl]),
            keys[None, sl])

  # Compile, and fill task 0's memories so task >= 1 replays real samples.
  start = time.perf_counter()
  state = prog.begin_task(state, 0)
  a = chunk_args(0, 0)
  prog.compile_chunk(state, *a)
  compile_s = time.perf_counter() - start
  state, _ = prog.run_chunk(state, *a, 0)
  for t in range(1, args.task + 1):
    state = prog.begin_task(state, t)
  jax.block_until_ready(state)

  per_step = []
  for c in range(n_chunks):
    a = chunk_args(args.task, c)
    start = time.perf_counter()
    state, losses = prog.run_chunk(state, *a, args.task)
    jax.block_until_ready(losses)
    per_step.append((time.perf_counter() - start) / args.chunk)
  ms = 1000 * float(np.median(per_step))
  if not np.all(np.isfinite(np.asarray(losses))):
    print("warning: non-finite loss in the timed chunks", file=sys.stderr)

  n_mem, n_val = memory_sizes(config)
  inner, n_meta = int(config.inner_steps), int(config.n_meta)
  rbs = int(config.replay_batch_size)
  replay = min(n_mem, rbs)
  outer_real = min((args.task + 1) * n_val, rbs)
  outer_exec = min(bench.n_tasks * n_val, rbs)
  macs = reduced_resnet18_macs(n_outputs=bench.n_outputs)
  fwd_bwd = 3 * 2 * macs  # FLOPs per row, forward + backward
  rows_useful = n_meta * (inner * (batch + replay) + outer_real)
  rows_exec = n_meta * (inner * (batch + replay) + outer_exec)
  gflop_useful = rows_useful * fwd_bwd / 1e9
  gflop_exec = rows_exec * fwd_bwd / 1e9
  mm = matmul_gflops()
  net_s = network_fwd_bwd_seconds(prog.model, jax.tree_util.tree_map(
      lambda v: v[0], state.variables), rows_exec, reps=3)

  dev = jax.devices()[0]
  print(f"device: {dev.platform} ({dev.device_kind}), "
        f"{os.cpu_count()} CPUs visible, jax {jax.__version__}")
  print(f"bcl_dual on split-CIFAR shapes: batch {batch}, inner_steps {inner}, "
        f"n_meta {n_meta}, n_mem {n_mem}, n_val {n_val}, replay {replay}, "
        f"outer {outer_real} real / {outer_exec} executed rows (task "
        f"{args.task}); compile {compile_s:.1f}s")
  print(f"reduced ResNet-18 forward: {macs:,} MACs/sample "
        f"({bench.n_outputs} outputs); fwd+bwd = 3 x fwd = "
        f"{fwd_bwd / 1e6:.1f} MFLOP/row")
  rows = [
      ("observe step (useful rows)", ms, rows_useful, gflop_useful),
      ("observe step (executed rows)", ms, rows_exec, gflop_exec),
      (f"plain fwd+bwd, {rows_exec} rows", 1000 * net_s, rows_exec,
       gflop_exec),
  ]
  print(f"{'what':<32} {'ms':>9} {'rows':>6} {'GFLOP':>8} {'GFLOP/s':>8} "
        f"{'% of matmul':>11}")
  for name, t_ms, r, g in rows:
    rate = g / (t_ms / 1000)
    print(f"{name:<32} {t_ms:>9.1f} {r:>6d} {g:>8.2f} {rate:>8.2f} "
          f"{100 * rate / mm:>10.1f}%")
  print(f"{'1024x1024 f32 matmul':<32} {1000 * 2 * 1024**3 / mm / 1e9:>9.2f} "
        f"{'':>6} {2 * 1024**3 / 1e9:>8.2f} {mm:>8.2f} {100.0:>10.1f}%")
  return 0


if __name__ == "__main__":
  sys.exit(main())
