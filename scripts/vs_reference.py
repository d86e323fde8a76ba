"""Whole-run times of bcl_jax and the PyTorch reference, on this machine, run
one after the other (interleaved, so both see the same machine load).

    python scripts/vs_reference.py --ref-dir ~/Bilevel-Continual-Learning \
        --ref-python ~/torch-env/bin/python --methods single,ewc,gem,ftml

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


def timed(cmd: list[str], cwd: str, env=None) -> tuple[float, str]:
  start = time.perf_counter()
  out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if out.returncode:
    raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}\n"
                     f"{out.stderr[-2000:]}")
  return seconds, out.stdout


def ref_run(args, method: str) -> tuple[float, float]:
  cmd = ([args.ref_python, os.path.join(args.ref_dir, "cpu_shim.py")]
         + COMMON.split() + ["--model", method] + REF_ARGS[method].split())
  seconds, out = timed(cmd, args.ref_dir)
  # The last line ends with "# ACC BWT LA # seconds".
  acc = float(re.findall(r"# ([0-9.]+) [-0-9.]+ [0-9.]+ # [0-9.]+\s*$",
                         out)[-1])
  return seconds, acc


def our_run(method: str, cache: str, workdir: str) -> tuple[float, float]:
  cmd = [sys.executable, "-m", "bcl_jax.run", "--config",
         os.path.join(ROOT, "configs", "mnist.py"), f"--config.method={method}",
         f"--config.compile_cache={cache}", "--config.progress=False",
         "--workdir", workdir]
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
  p.add_argument("--methods", default="single,ewc,gem,ftml")
  p.add_argument("--rounds", type=int, default=2)
  args = p.parse_args()
  methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in methods if m not in REF_ARGS]
  if unknown:
    raise SystemExit(f"no reference flags for {unknown}; known: "
                     f"{sorted(REF_ARGS)}")
  data = os.path.join(args.ref_dir, "data", "mnist_permutations.pt")
  if not os.path.exists(data):
    print(f"writing {data}", file=sys.stderr)
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
          t, acc = our_run(m, cache, os.path.join(tmp, f"wd-{m}-{r}-{kind}"))
          times[m][kind].append(t)
          times[m]["acc"]["ours"] = acc
        print(f"round {r + 1}: {m} reference {times[m]['ref'][-1]:.1f} s, "
              f"bcl_jax cold {times[m]['cold'][-1]:.1f} s, warm "
              f"{times[m]['warm'][-1]:.1f} s", file=sys.stderr, flush=True)
  print(f"\nwhole command, seconds (median of {args.rounds} interleaved "
        "rounds), embedded 10-task permuted MNIST, seed 0\n")
  print("| method | reference s | ACC | bcl_jax cold s | bcl_jax warm s | ACC "
        "| reference / cold | reference / warm |")
  print("|---|---|---|---|---|---|---|---|")
  for m in methods:
    ref, cold, warm = (statistics.median(times[m][k])
                       for k in ("ref", "cold", "warm"))
    print(f"| {m} | {ref:.1f} | {times[m]['acc']['ref']:.4f} | {cold:.1f} | "
          f"{warm:.1f} | {times[m]['acc']['ours']:.4f} | {ref / cold:.2f}x | "
          f"{ref / warm:.2f}x |")


if __name__ == "__main__":
  main()
