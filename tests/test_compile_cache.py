"""The persistent compilation cache (config.compile_cache): a second run of
the same shapes loads the first run's compiled programs and gives the same
numbers; off with ''; an unusable folder warns and runs without it."""

import json
import os
import subprocess
import sys

import pytest

from bcl_jax import experiment

HERE = os.path.dirname(__file__)

# One tiny run in a fresh process (the cache folder is process-wide JAX
# state); every program is written to the cache, however fast it compiled.
SCRIPT = """
import json, sys
sys.path.insert(0, {here!r})
import jax
from helpers import tiny_config, toy_benchmark
from bcl_jax import experiment
c = tiny_config(method="er", n_tasks=0, use=12, checkpoint=False, logs=False,
                compile_cache={cache!r})
res = experiment.run(c, {workdir!r}, log=lambda *a: None, bench=toy_benchmark())
print(json.dumps(res["accuracy_matrix"]))
"""


def _run(tmp_path, cache, name):
  env = dict(os.environ)
  env.pop("BCL_JAX_COMPILE_CACHE", None)
  out = subprocess.run(
      [sys.executable, "-c", SCRIPT.format(here=HERE, cache=str(cache),
                                           workdir=str(tmp_path / name))],
      capture_output=True, text=True, env=env, timeout=600, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_run_loads_the_first_runs_programs(tmp_path):
  cache = tmp_path / "xla"
  first = _run(tmp_path, cache, "a")
  entries = set(os.listdir(cache))
  assert entries, "the first run wrote nothing into the cache"
  second = _run(tmp_path, cache, "b")
  assert second == first
  assert set(os.listdir(cache)) == entries  # all hits: nothing new compiled


def test_off_and_unusable_settings(tmp_path, monkeypatch):
  updates = []
  monkeypatch.setattr(experiment, "_jax_cache_dir", lambda: None)
  monkeypatch.setattr(experiment, "_set_jax_cache_dir",
                      lambda path, reset: updates.append((path, reset)))
  assert experiment.enable_compile_cache("") is None
  blocker = tmp_path / "file"
  blocker.write_text("x")
  said = []
  assert experiment.enable_compile_cache(str(blocker / "xla"),
                                         log=said.append) is None
  assert "unusable" in said[0] and str(blocker) in said[0]
  assert updates == []
  # auto: the environment variable names the folder.
  monkeypatch.setenv("BCL_JAX_COMPILE_CACHE", str(tmp_path / "env"))
  assert experiment.enable_compile_cache("auto") == str(tmp_path / "env")
  assert updates == [(str(tmp_path / "env"), False)]
  assert os.path.isdir(tmp_path / "env")
  # A folder the user already gave JAX is kept by auto.
  monkeypatch.setattr(experiment, "_jax_cache_dir", lambda: "/theirs")
  assert experiment.enable_compile_cache("auto") == "/theirs"
  assert len(updates) == 1
