"""bcl_jax.report on real (tiny) runs; the heatmap and sweep outputs."""

import collections
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from bcl_jax import experiment
from bcl_jax import methods
from bcl_jax import report
from bcl_jax import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**kw):
  spec = importlib.util.spec_from_file_location(
      "mnist_config", os.path.join(ROOT, "configs", "mnist.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("quick")
  c.update(dict(n_tasks=3, use=50, hidden=(32,), checkpoint=False,
                progress=False, eval_batch_size=500, heatmap=False,
                eval_init=False))
  c.update(kw)
  # Memory sizes only for a method that has them ('single' refuses them).
  declared = {h.name for h in methods.get(c.method).hparams}
  c.update({k: v for k, v in (("n_memories", 20), ("replay_batch_size", 8))
            if k in declared})
  return c


def _train(root):
  quiet = lambda *_: None
  for seed in (0, 1):
    experiment.run(tiny(method="single", seed=seed, heatmap=seed == 0),
                   str(root / f"single-s{seed}"),
                   config_name=os.path.join(ROOT, "configs/mnist.py:quick"),
                   log=quiet)
  experiment.run(tiny(method="er", num_seeds=2, sweep="lr=0.01,0.1",
                      heatmap=True), str(root / "sweeps" / "er-lr"),
                 config_name="configs/mnist.py:quick", log=quiet)


def _write(root):
  """The same layout without training: accuracy matrices drawn at random,
  written by the writer the training run uses."""
  rng = np.random.default_rng(0)
  Run = collections.namedtuple("Run", "seed hp")
  hp = {"lr": 0.03, "beta": 0.3, "memory_strength": 100.0,
        "temperature": 5.0, "adapt_lr": 0.001}
  jobs = [("single", f"single-s{s}", [Run(s, hp)], {"seed": s})
          for s in (0, 1)]
  jobs.append(("er", "sweeps/er-lr",
               [Run(s, dict(hp, lr=lr)) for lr in (0.01, 0.1) for s in (0, 1)],
               {"num_seeds": 2, "sweep": "lr=0.01,0.1"}))
  for method, name, runs_, kw in jobs:
    acc = rng.uniform(0.1, 0.9, (len(runs_), 3, 3))
    res = results.build_results(acc, None, runs_,
                                {"total_seconds": float(rng.uniform(5, 9))})
    res["benchmark"] = {"name": "mnist_permutations", "n_tasks": 3}
    (root / name).mkdir(parents=True)
    results.write_all(str(root / name), tiny(method=method, **kw).to_dict(),
                      res, title=f"{method} on mnist_permutations",
                      heatmap=method == "er")


@pytest.fixture(scope="module", params=[
    "written", pytest.param("trained", marks=pytest.mark.slow)])
def runs(request, tmp_path_factory):
  """single with seeds 0 and 1 in two workdirs; er as a 2-setting x 2-seed
  sweep in one workdir, one folder deeper. ``trained`` makes them by tiny
  experiments (~30 s on a busy 2-core CPU, hence slow), ``written`` by the
  results writer alone."""
  root = tmp_path_factory.mktemp(request.param)
  (_train if request.param == "trained" else _write)(root)
  return root


def load(path):
  with open(path) as f:
    return json.load(f)


def test_rows_match_the_results_files(runs):
  rows = report.collect([str(runs)])
  assert [(r.method, r.label, r.n) for r in rows] == [
      ("er", "lr=0.01", 2), ("er", "lr=0.1", 2), ("single", "", 2)]
  single = rows[2]
  accs = [load(runs / f"single-s{s}" / "results.json")["metrics"]["acc"]
          for s in (0, 1)]
  assert sorted(x["seed"] for x in single.runs) == [0, 1]
  assert single.stat("acc")[0] == pytest.approx(np.mean(accs))
  assert single.stat("acc")[1] == pytest.approx(np.std(accs, ddof=1))
  times = [load(runs / f"single-s{s}" / "results.json")["timing"]
           ["total_seconds"] for s in (0, 1)]
  assert single.stat("time")[0] == pytest.approx(np.mean(times))
  sweep = load(runs / "sweeps" / "er-lr" / "results.json")
  for row, lr in zip(rows[:2], (0.01, 0.1)):
    fms = [r["metrics"]["fm"] for r in sweep["runs"] if r["hp"]["lr"] == lr]
    assert row.stat("fm")[0] == pytest.approx(np.mean(fms))
    assert row.stat("fm")[1] == pytest.approx(np.std(fms, ddof=1))
  # A workdir given directly is the same as found below its parent.
  alone = report.collect([str(runs / "single-s0")])
  assert len(alone) == 1 and alone[0].n == 1


def test_cli_writes_tables_and_figures(runs, tmp_path):
  out = tmp_path / "rep"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "bcl_jax.report", str(runs),
                      "--out", str(out), "--plot"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr
  assert "sample std (ddof=1)" in p.stdout
  rows = report.collect([str(runs)])
  for r in rows:
    acc = r.stat("acc")
    assert f"{acc[0]:.4f} ± {acc[1]:.4f}" in p.stdout
  names = sorted(os.listdir(out))
  assert names == sorted(
      ["table.md", "table.csv", "table.tex"]
      + [f"mnist_permutations-T3-{k}.{e}" for k in ("seen", "final")
         for e in ("png", "pdf")])
  with open(out / "table.csv") as f:
    table = list(csv.DictReader(f))
  assert [(t["method"], t["setting"], t["n"]) for t in table] == [
      ("er", "lr=0.01", "2"), ("er", "lr=0.1", "2"), ("single", "", "2")]
  assert float(table[0]["acc_mean"]) == pytest.approx(rows[0].stat("acc")[0])
  assert table[0]["std_ddof"] == "1"
  tex = (out / "table.tex").read_text()
  assert r"\begin{tabular}" in tex and r"\pm" in tex and "single" in tex
  assert "\\mathbf{" in tex
  md = (out / "table.md").read_text()
  assert md.count("\n| mnist_permutations |") == 3
  for name in names:
    data = (out / name).read_bytes()
    if name.endswith(".png"):
      assert data[:4] == b"\x89PNG"
    elif name.endswith(".pdf"):
      assert data[:5] == b"%PDF-"


def test_cli_help_and_errors(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  run = lambda *a: subprocess.run([sys.executable, "-m", "bcl_jax.report",
                                   *a], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=120)
  p = run("--help")
  assert p.returncode == 0 and "--plot" in p.stdout
  p = run(str(tmp_path))
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert p.stderr.startswith(f"error: no run under {tmp_path}")
  p = run(str(tmp_path), "--plot")
  assert p.returncode == 2 and "add --out DIR" in p.stderr


def test_seen_accuracy_hand_worked():
  r = [[0.9, 0.1, 0.0], [0.8, 0.7, 0.2], [0.6, 0.5, 0.4]]
  np.testing.assert_allclose(report.seen_accuracy(r), [0.9, 0.75, 0.5])


def test_sweep_outputs_one_row_per_setting(runs):
  wd = runs / "sweeps" / "er-lr"
  res = load(wd / "results.json")
  assert res["std_ddof"] == 1 and len(res["settings"]) == 2
  accs = {lr: [r["metrics"]["acc"] for r in res["runs"]
               if r["hp"]["lr"] == lr] for lr in (0.01, 0.1)}
  best = max(accs, key=lambda k: np.mean(accs[k]))
  assert res["settings"][res["best_setting"]]["hp"] == {"lr": best}
  lines = results.summary_line(res).splitlines()
  assert len(lines) == 3 and lines[-1] == f"best by ACC: lr={best:g}"
  for line, lr in zip(lines, (0.01, 0.1)):
    m, s = np.mean(accs[lr]), np.std(accs[lr], ddof=1)
    assert line.startswith(f"lr={lr:g}:")
    assert f"ACC {m:.4f} ± {s:.4f}" in line and line.endswith("(n=2)")
  txt = (wd / "results.txt").read_text()
  assert txt.count("# setting lr=") == 2 and f"best by ACC: lr={best:g}" in txt
  # The pooled mean over both settings is not reported as a result.
  pooled = np.mean(accs[0.01] + accs[0.1])
  assert f"{pooled:.4f}" not in results.summary_line(res)
  assert (wd / "accuracy.png").exists() and (wd / "accuracy.pdf").exists()


def test_single_run_line_is_unchanged(runs):
  res = load(runs / "single-s0" / "results.json")
  m = res["metrics"]
  assert results.summary_line(res) == (
      f"ACC {m['acc']:.4f} FM {m['fm']:.4f} LA {m['la']:.4f}")


def _tick_labels(fig):
  ax = fig.axes[0]
  fig.canvas.draw()
  lo, hi = sorted(ax.get_xlim())
  return [t.get_text() for t in ax.get_xticklabels()
          if lo <= t.get_position()[0] <= hi]


@pytest.mark.parametrize("t,expect", [
    (3, [str(k) for k in range(1, 4)]), (20, [str(k) for k in range(1, 21)]),
    (40, None)])
def test_heatmap_ticks_are_integer_task_numbers(t, expect):
  import matplotlib.pyplot as plt
  m = np.random.default_rng(0).uniform(0.2, 0.6, (t, t))
  fig = results.heatmap_figure([(m, "caption")], "er on /abs/path/x.py:quick")
  try:
    labels = _tick_labels(fig)
    assert all(lab.isdigit() and 1 <= int(lab) <= t for lab in labels), labels
    if expect is not None:
      assert labels == expect
    else:
      assert 4 <= len(labels) <= 12
    ax = fig.axes[0]
    assert ax.get_xlabel() == "evaluated on task"
    # Cell labels up to 15 tasks only; the colour scale fits the data.
    assert (len(ax.texts) == t * t) == (t <= 15)
    lo, hi = ax.images[0].get_clim()
    assert lo == pytest.approx(0.2) and hi == pytest.approx(0.6)
    assert fig.axes[1].get_ylabel() == "test accuracy"
    assert fig._suptitle.get_text() == "er on x.py:quick"
  finally:
    plt.close(fig)


def test_clean_title():
  assert results.clean_title("bcl_dual on m (/a/b/configs/mnist.py:quick)") \
      == "bcl_dual on m (mnist.py:quick)"
  assert results.clean_title("er on x (configs/c.py)") == "er on x (configs/c.py)"


def readme_python_blocks(section: str) -> list[str]:
  """The ```python blocks of one README section, in order."""
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  start = text.index(f"\n## {section}\n")
  end = text.find("\n## ", start + 1)
  body = text[start:end if end > 0 else None]
  return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_readme_python_api_section_has_its_examples():
  blocks = readme_python_blocks("Python API")
  assert len(blocks) == 2
  assert "experiment.run(" in blocks[0] and "report.collect(" in blocks[1]


@pytest.mark.slow
def test_readme_python_api_examples_run(tmp_path):
  """Executes the section's blocks as one script from a scratch folder."""
  script = "\n".join(readme_python_blocks("Python API"))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  res = load(tmp_path / "results" / "api-demo" / "results.json")
  assert len(res["runs"]) == 2 and len(res["accuracy_matrix"]) == 2
  assert "sample std (ddof=1)" in p.stdout
  made = os.listdir(tmp_path / "results" / "api-report")
  assert {"table.md", "table.csv", "table.tex"} <= set(made)
  assert any(n.endswith("-seen.pdf") for n in made)
