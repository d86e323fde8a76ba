"""The command line: a whole quick run, and each kind of bad input."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1",
           JAX_PLATFORMS="cpu")


def run_cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "bcl_jax.run", *args],
                        cwd=ROOT, env=ENV, capture_output=True, text=True,
                        timeout=timeout)


def test_quick_run_writes_every_output(tmp_path):
  wd = tmp_path / "run"
  p = run_cli("--config", "configs/mnist.py:quick", "--workdir", str(wd),
              "--config.progress=False", "--config.n_tasks=2")
  assert p.returncode == 0, p.stderr
  last = p.stdout.strip().splitlines()[-1]
  assert last.startswith("ACC ") and " FM " in last and " LA " in last
  res = json.loads((wd / "results.json").read_text())
  assert set(res["metrics"]) >= {"acc", "fm", "la", "bwt", "fwt"}
  assert len(res["accuracy_matrix"]) == 2
  assert set(res["timing"]) >= {"train_seconds", "compile_seconds",
                                "ms_per_step", "samples_per_second"}
  assert res["runs"][0]["seed"] == 0
  assert f"ACC {res['metrics']['acc']:.4f}" in last
  cfg = json.loads((wd / "config.json").read_text())
  assert cfg["method"] == "bcl_dual" and cfg["n_tasks"] == 2
  txt = (wd / "results.txt").read_text()
  assert "ACC FM LA:" in txt
  assert (wd / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,expect", [
    (["--config.lrr=0.1"], "unknown config field 'lrr'"),
    (["--config.lr=abc"], "could not convert"),
    (["--config.batch_size=0"], "batch_size must be >= "),
    (["--config.method=nope"], "method 'nope' is not one of"),
    (["--config.data_file=missing.pt"], "missing.pt: no such file"),
    (["--config.data_file=x.csv", "--config.data_path=" + ROOT],
     "x.csv"),
    (["--config.use=inf"], "use must be a finite number > 0"),
    (["--config.seed=-1"], "seed must be a non-negative integer, got -1"),
    (["--config.n_memories=10000000", "--config.checkpoint=False"],
     "reduce n_memories"),
    (["--config.chunk_size=1000000000"], "reduce chunk_size"),
], ids=["typo", "type", "value", "method", "missing", "format", "inf",
        "seed", "memories", "chunk"])
def test_bad_input_is_one_line_without_traceback(tmp_path, args, expect):
  p = run_cli("--config", "configs/mnist.py", "--workdir",
              str(tmp_path / "w"), *args)
  assert p.returncode != 0
  assert "Traceback" not in p.stderr
  lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
  assert len(lines) == 1 and expect in lines[0], p.stderr
  assert not (tmp_path / "w").exists()   # a failed run leaves no workdir


@pytest.mark.parametrize("text,expect", [
    ("def get_config(:\n", "cannot load config {}: line 1: SyntaxError: "),
    ("from bcl_jax.config import default_config\n\n"
     "def get_config():\n  return default_confg()\n",
     "cannot load config {}: line 4: NameError: name 'default_confg' is not "
     "defined"),
    ("x = 1\n", "config file {} defines no get_config()"),
], ids=["syntax", "undefined", "no-get_config"])
def test_broken_config_file_is_one_line(tmp_path, text, expect):
  path = tmp_path / "broken.py"
  path.write_text(text)
  p = run_cli("--config", str(path), "--workdir", str(tmp_path / "w"),
              timeout=120)
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "error: " + expect.format(path)), p.stderr


def test_xla_out_of_memory_is_recognised():
  from bcl_jax import run

  class XlaRuntimeError(RuntimeError):
    pass
  assert run._out_of_memory(XlaRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB."))
  assert not run._out_of_memory(XlaRuntimeError("INTERNAL: other"))
  assert not run._out_of_memory(RuntimeError("RESOURCE_EXHAUSTED"))


def test_unwritable_workdir_is_reported_before_training(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  p = run_cli("--config", "configs/mnist.py", "--workdir",
              str(blocker / "sub"))
  assert p.returncode == 2 and "not writable" in p.stderr
  assert "task 1/" not in p.stdout + p.stderr


def test_missing_config_file():
  p = run_cli("--config", "configs/nope.py")
  assert p.returncode == 2 and "configs/nope.py does not exist" in p.stderr


def test_help_says_how_to_list_the_fields():
  p = run_cli("--help", timeout=120)
  assert p.returncode == 0
  assert "--list_fields" in p.stdout


def test_list_fields_prints_every_field_with_its_value():
  from bcl_jax.config import default_config
  p = run_cli("--list_fields", timeout=120)
  assert p.returncode == 0, p.stderr
  lines = p.stdout.splitlines()[1:]
  fields = {ln.split(" = ")[0]: ln for ln in lines}
  assert set(fields) == set(default_config().keys())
  assert fields["lr"].startswith("lr = 0.03 ")
  assert "# fraction (<= 1) or count (> 1) per task" in fields["use"]
  # Another method's field: unset, and the line says who declares it.
  assert fields["ewc_gamma"].startswith("ewc_gamma = None ")
  assert "(ewc" in fields["ewc_gamma"]
  p = run_cli("--list_fields", "--config", "configs/mnist.py:quick",
              "--config.lr=0.5", timeout=120)
  assert p.returncode == 0, p.stderr
  got = {ln.split(" = ")[0]: ln.split(" = ")[1].split("  #")[0].strip()
         for ln in p.stdout.splitlines()[1:]}
  assert got["lr"] == "0.5" and got["n_tasks"] == "3"


def test_default_workdir_names_config_method_and_time():
  from bcl_jax import run
  wd = run.default_workdir("configs/mnist.py:val,quick", "er")
  head, stamp = wd.rsplit("-", 1)
  assert head.startswith(os.path.join("results", "mnist-val+quick-er-"))
  assert stamp.isdigit() and len(stamp) == 6


def test_console_scripts_resolve():
  import importlib
  import tomllib
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert set(scripts) == {"bcl-run", "bcl-evaluate", "bcl-report",
                          "bcl-grid"}
  for target in scripts.values():
    module, attr = target.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
