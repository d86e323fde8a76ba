"""Whole-run times of bcl_jax and the PyTorch reference, on this machine, run
one after the other (interleaved, so both see the same machine load).

    python scripts/vs_reference.py --ref-dir ~/Bilevel-Continual-Learning \
        --ref-python ~/torch-env/bin/python --methods single,ewc,gem,ftml
    python scripts/vs_reference.py --benchmark cifar --ref-dir ... \
        --ref-python ... --rounds 3        # issue 11's split-CIFAR figure

The reference (github.com/phquang/Bilevel-Continual-Learning, with torch,
quadprog, tqdm and pillow in ``--ref-python``; ``higher`` too for bcl_dual)
runs unmodified on CPU: a shim (written as ``cpu_shim.py`` into ``--ref-dir``)
makes its ``.cuda()`` calls no-ops. Its data
is our embedded 10-task permuted MNIST, written once as the reference's
``data/mnist_permutations.pt`` (same permutations, same 4,000 / 1,000 digits
per task). Both sides: the paper protocol, seed 0, one run, the whole
command timed (interpreter start-up, imports, compilation, outputs). Ours
runs twice per round: with an empty compilation cache (cold) and again with
it warm (the default ``compile_cache`` keeps every program). Prints one
markdown table: the median over rounds of each time, ACC, and the ratio
reference / bcl_jax.

``--benchmark cifar``: bcl_dual on a reference-format split CIFAR
``data/cifar-cl.pt`` (17 tasks), written once by the reference's own
``data/cifar100.py`` from a random raw file of CIFAR-100's format and a
tenth of its size (100 classes, 100 train / 20 test 3x32x32 images each,
``torch.manual_seed(0)``), the paper's flags (lr 0.3, beta 0.1, inner_steps
2, n_meta 1, n_memories 65, temperature 5, memory_strength 100) and
``--use`` (default 500: 50 steps per task); ours ``configs/cifar.py`` with
the same file and ``use``, ``lca_batches=0`` (the reference's default
``--lca -1`` measures no learning curve).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The reference's flags for each method (its scripts/run.sh protocol and the
# values of configs/mnist.py's presets).
REF_ARGS = {
    "single": "--lr 0.03",
    "ewc": "--lr 0.03 --memory_strength 100 --n_memories 256",
    "gem": "--lr 0.03 --memory_strength 0.5 --n_memories 256",
    "ftml": "--lr 0.03 --beta 0.3 --n_meta 2 --inner_steps 1 "
            "--n_memories 256",
    "bcl_dual": "--lr 0.03 --beta 0.3 --inner_steps 1 --n_meta 2 "
                "--n_memories 256 --temperature 5 --memory_strength 100",
}
# Split CIFAR (scripts/run.sh of the reference, --model bcl_dual).
REF_ARGS_CIFAR = {
    "bcl_dual": "--lr 0.3 --beta 0.1 --inner_steps 2 --n_meta 1 "
                "--n_memories 65 --temperature 5 --memory_strength 100",
}
COMMON_CIFAR = ("--save_path results/ --batch_size 10 --data_path data/ "
                "--cuda no --n_epochs 1 --data_file cifar-cl.pt --seed 0")

# A random raw CIFAR-100 file in the format the reference's data/cifar100.py
# reads: (x_train uint8 [N, 3, 32, 32], y_train, x_test, y_test).
RAW_CIFAR = """import sys, torch
torch.manual_seed(0)
ytr = torch.arange(100).repeat_interleave(100)
yte = torch.arange(100).repeat_interleave(20)
xtr = torch.randint(0, 256, (10000, 3, 32, 32), dtype=torch.uint8)
xte = torch.randint(0, 256, (2000, 3, 32, 32), dtype=torch.uint8)
torch.save([xtr, ytr, xte, yte], sys.argv[1])
"""

COMMON = ("--save_path results/ --batch_size 10 --data_path data/ --cuda no "
          "--n_epochs 1 --use 1.0 --data_file mnist_permutations.pt --seed 0")

SHIM = """import runpy, sys, torch
torch.Tensor.cuda = lambda self, *a, **k: self
torch.nn.Module.cuda = lambda self, *a, **k: self
torch.cuda.LongTensor = torch.LongTensor
torch.cuda.FloatTensor = torch.FloatTensor
sys.argv = ["main.py"] + sys.argv[1:]
runpy.run_path("main.py", run_name="__main__")
"""

TO_PT = """import sys, numpy as np, torch
z = np.load(sys.argv[1])
n = len([k for k in z.files if k.startswith("xtr")])
def task(s, i):
  return [i, torch.from_numpy(z[f"x{s}{i}"]),
          torch.from_numpy(z[f"y{s}{i}"].astype(np.int64))]
torch.save([[task("tr", i) for i in range(n)],
            [task("te", i) for i in range(n)]], sys.argv[2])
"""


def export_benchmark(ref_python: str, out: str) -> None:
  """Our embedded permuted MNIST as the reference's ``.pt`` file."""
  import numpy as np
  sys.path.insert(0, ROOT)
  from bcl_jax.config import load_config_file
  from bcl_jax.data import load_benchmark
  bench = load_benchmark(load_config_file(os.path.join(ROOT, "configs",
                                                       "mnist.py")))
  arrays = {}
  for i, t in enumerate(bench.tasks):
    for s, x, y in (("tr", t.x_train, t.y_train), ("te", t.x_test, t.y_test)):
      arrays[f"x{s}{i}"] = x.reshape(len(x), -1).astype("float32")
      arrays[f"y{s}{i}"] = y
  with tempfile.TemporaryDirectory() as tmp:
    npz = os.path.join(tmp, "mnist.npz")
    np.savez(npz, **arrays)
    script = os.path.join(tmp, "to_pt.py")
    with open(script, "w") as f:
      f.write(TO_PT)
    subprocess.run([ref_python, script, npz, out], check=True)


def export_cifar(ref_python: str, ref_dir: str) -> None:
  """``data/cifar-cl.pt`` (and ``cifar-val.pt``) by the reference's own data
  script, from a random raw file (:data:`RAW_CIFAR`)."""
  data = os.path.join(ref_dir, "data")
  script = os.path.join(data, "cifar100.py")
  if not os.path.exists(script):
    raise SystemExit(f"{script} not found: --ref-dir must be a checkout of "
                     "the reference repository")
  os.makedirs(os.path.join(data, "raw"), exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    maker = os.path.join(tmp, "raw_cifar.py")
    with open(maker, "w") as f:
      f.write(RAW_CIFAR)
    subprocess.run([ref_python, maker, os.path.join("raw", "cifar100.pt")],
                   cwd=data, check=True)
  subprocess.run([ref_python, "cifar100.py", "--i", "raw/cifar100.pt"],
                 cwd=data, check=True)


def timed(cmd: list[str], cwd: str, env=None) -> tuple[float, str]:
  start = time.perf_counter()
  out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if out.returncode:
    raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}\n"
                     f"{out.stderr[-2000:]}")
  return seconds, out.stdout


def ref_run(args, method: str) -> tuple[float, float]:
  if args.benchmark == "cifar":
    flags = (COMMON_CIFAR.split() + ["--use", str(args.use)]
             + REF_ARGS_CIFAR[method].split())
  else:
    flags = COMMON.split() + REF_ARGS[method].split()
  cmd = ([args.ref_python, os.path.join(args.ref_dir, "cpu_shim.py")]
         + flags + ["--model", method])
  seconds, out = timed(cmd, args.ref_dir)
  # The last line ends with "# ACC BWT LA # seconds".
  acc = float(re.findall(r"# ([0-9.]+) [-0-9.]+ [0-9.]+ # [0-9.]+\s*$",
                         out)[-1])
  return seconds, acc


def our_run(args, method: str, cache: str,
            workdir: str) -> tuple[float, float]:
  cmd = [sys.executable, "-m", "bcl_jax.run", "--config",
         os.path.join(ROOT, "configs", f"{args.benchmark}.py"),
         f"--config.method={method}", f"--config.compile_cache={cache}",
         "--config.progress=False", "--workdir", workdir]
  if args.benchmark == "cifar":
    cmd += [f"--config.data_path={os.path.join(args.ref_dir, 'data')}",
            "--config.data_file=cifar-cl.pt", f"--config.use={args.use}",
            "--config.lca_batches=0"]
  seconds, out = timed(cmd, ROOT)
  acc = float(re.findall(r"^ACC ([0-9.]+)", out, re.M)[-1])
  shutil.rmtree(workdir, ignore_errors=True)
  return seconds, acc


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--ref-dir", required=True,
                 help="a checkout of the reference repository")
  p.add_argument("--ref-python", required=True,
                 help="a Python with torch, quadprog, tqdm, pillow")
  p.add_argument("--benchmark", default="mnist", choices=["mnist", "cifar"],
                  help="mnist: the embedded permuted MNIST; cifar: split "
                  "CIFAR on a random reference-format cifar-cl.pt")
  p.add_argument("--methods", default=None,
                 help="comma-separated (default: single,ewc,gem,ftml on "
                 "mnist, bcl_dual on cifar)")
  p.add_argument("--use", type=int, default=500,
                 help="cifar: training images per task (the reference's "
                 "--use; 500 = 50 steps)")
  p.add_argument("--rounds", type=int, default=2)
  args = p.parse_args()
  cifar = args.benchmark == "cifar"
  known = REF_ARGS_CIFAR if cifar else REF_ARGS
  methods = [m for m in (args.methods or ("bcl_dual" if cifar else
                                          "single,ewc,gem,ftml")).split(",")
             if m]
  unknown = [m for m in methods if m not in known]
  if unknown:
    raise SystemExit(f"no reference flags for {unknown} on {args.benchmark}; "
                     f"known: {sorted(known)}")
  if args.use < 1:
    raise SystemExit(f"--use must be >= 1, got {args.use}")
  if args.rounds < 1:
    raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
  data = os.path.join(args.ref_dir, "data",
                      "cifar-cl.pt" if cifar else "mnist_permutations.pt")
  if not os.path.exists(data):
    print(f"writing {data}", file=sys.stderr)
    if cifar:
      export_cifar(args.ref_python, args.ref_dir)
    else:
      export_benchmark(args.ref_python, data)
  with open(os.path.join(args.ref_dir, "cpu_shim.py"), "w") as f:
    f.write(SHIM)
  os.makedirs(os.path.join(args.ref_dir, "results"), exist_ok=True)
  times = {m: {"ref": [], "cold": [], "warm": [], "acc": {}} for m in methods}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):
      for m in methods:
        t, acc = ref_run(args, m)
        times[m]["ref"].append(t)
        times[m]["acc"]["ref"] = acc
        cache = os.path.join(tmp, f"xla-{m}-{r}")  # empty: cold
        for kind in ("cold", "warm"):
          t, acc = our_run(args, m, cache,
                           os.path.join(tmp, f"wd-{m}-{r}-{kind}"))
          times[m][kind].append(t)
          times[m]["acc"]["ours"] = acc
        print(f"round {r + 1}: {m} reference {times[m]['ref'][-1]:.1f} s, "
              f"bcl_jax cold {times[m]['cold'][-1]:.1f} s, warm "
              f"{times[m]['warm'][-1]:.1f} s", file=sys.stderr, flush=True)
  what = (f"reference-format split CIFAR (17 tasks, use={args.use})"
          if cifar else "embedded 10-task permuted MNIST")
  print(f"\nwhole command, seconds (median of {args.rounds} interleaved "
        f"rounds), {what}, seed 0\n")
  print("| method | reference s | ACC | bcl_jax cold s | bcl_jax warm s | ACC "
        "| reference / cold | reference / warm |")
  print("|---|---|---|---|---|---|---|---|")
  for m in methods:
    ref, cold, warm = (statistics.median(times[m][k])
                       for k in ("ref", "cold", "warm"))
    print(f"| {m} | {ref:.1f} | {times[m]['acc']['ref']:.4f} | {cold:.1f} | "
          f"{warm:.1f} | {times[m]['acc']['ours']:.4f} | {ref / cold:.2f}x | "
          f"{ref / warm:.2f}x |")
  print("\nper round (reference / cold / warm, s):")
  for m in methods:
    rounds = zip(*(times[m][k] for k in ("ref", "cold", "warm")))
    print(f"  {m}: " + "; ".join(f"{a:.1f} / {b:.1f} / {c:.1f}"
                                 for a, b, c in rounds))


if __name__ == "__main__":
  main()
