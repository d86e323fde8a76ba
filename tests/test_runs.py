"""Seeds and sweeps as one vmapped program; sharding over devices."""

import json
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from bcl_jax import runs as runs_lib
from bcl_jax import train

from helpers import tiny_config, toy_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quiet(*_):
  pass


def params_of(state, r):
  return jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a: np.asarray(a)[r], state.variables))


@pytest.mark.parametrize("method", ["er", "bcl_dual"])
def test_vmapped_seeds_equal_separate_runs(method):
  bench = toy_benchmark()
  one_task = bench.subset(1)
  together = train.train_and_evaluate(
      tiny_config(method=method, num_seeds=3, seed=5), one_task, log=quiet)
  assert [r.seed for r in together["runs"]] == [5, 6, 7]
  for r, seed in enumerate((5, 6, 7)):
    alone = train.train_and_evaluate(tiny_config(method=method, seed=seed),
                                     one_task, log=quiet)
    for a, b in zip(params_of(together["state"], r),
                    params_of(alone["state"], 0)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # And over the whole (tiny) sequence, final ACC within 0.01.
  full = train.train_and_evaluate(
      tiny_config(method=method, num_seeds=2, seed=5), bench, log=quiet)
  for r, seed in enumerate((5, 6)):
    alone = train.train_and_evaluate(tiny_config(method=method, seed=seed),
                                     bench, log=quiet)
    assert abs(full["accuracy"][r, -1].mean()
               - alone["accuracy"][0, -1].mean()) <= 0.01


def test_sweep_grid_entries_equal_separate_runs():
  bench = toy_benchmark().subset(1)
  c = tiny_config(method="bcl_dual", sweep="lr=0.05,0.2;beta=0.3,1.0")
  grid = train.train_and_evaluate(c, bench, log=quiet)
  points = [(r.hp["lr"], r.hp["beta"]) for r in grid["runs"]]
  assert points == [(0.05, 0.3), (0.05, 1.0), (0.2, 0.3), (0.2, 1.0)]
  for r, (lr, beta) in enumerate(points):
    alone = train.train_and_evaluate(
        tiny_config(method="bcl_dual", lr=lr, beta=beta), bench, log=quiet)
    for a, b in zip(params_of(grid["state"], r), params_of(alone["state"], 0)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The grid points really differ.
  assert not np.allclose(params_of(grid["state"], 0)[0],
                         params_of(grid["state"], 3)[0])


def test_sweep_times_seeds_order():
  c = tiny_config(sweep="lr=0.1,0.2", num_seeds=2, seed=3)
  runs = runs_lib.runs_of(c)
  assert [(r.hp["lr"], r.seed) for r in runs] == [
      (0.1, 3), (0.1, 4), (0.2, 3), (0.2, 4)]


DYNAMIC = ("lr", "beta", "memory_strength", "temperature", "adapt_lr")


@pytest.mark.parametrize("spec,msg", [
    ("n_memories=10,20", "changes array shapes"),
    ("inner_steps=1,2", "changes array shapes"),
    ("method=er", "changes array shapes"),
    ("lrr=0.1", "unknown sweep field 'lrr'"),
    ("lr=abc", "values must be numbers"),
    ("lr", "is not 'field=v1,v2"),
    ("lr=0.1;lr=0.2", "given twice"),
])
def test_sweep_parser_rejects(spec, msg):
  fields = tuple(tiny_config().keys())
  with pytest.raises(ValueError, match=msg):
    runs_lib.parse_sweep(spec, DYNAMIC, "bcl_dual", fields)


def test_sweep_names_the_methods_own_vmappable_fields():
  with pytest.raises(ValueError, match="beta.* cannot be vmapped.*"
                     "vmappable fields of er: lr, adapt_lr"):
    runs_lib.runs_of(tiny_config(method="er", sweep="beta=0.1,0.2"))


def test_sweep_parser_grid():
  assert runs_lib.parse_sweep("lr=0.1,0.3; temperature=2",
                              ("lr", "temperature")) == [
      {"lr": 0.1, "temperature": 2.0}, {"lr": 0.3, "temperature": 2.0}]


SHARDED = r"""
import json, sys
sys.path.insert(0, "tests")
import jax
from helpers import tiny_config, toy_benchmark
from bcl_jax import train
out = train.train_and_evaluate(tiny_config(method="bcl_dual", num_seeds=4),
                               toy_benchmark(), log=lambda *_: None)
leaf = out["state"].variables["params"]["Dense_0"]["kernel"]
print(json.dumps({"devices": len(jax.devices()),
                  "shards": len(leaf.sharding.device_set),
                  "acc": out["accuracy"].tolist(),
                  "w": leaf.tolist()}))
"""


def test_sharded_equals_unsharded_on_four_cpu_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1", JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", SHARDED], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr
  got = json.loads(p.stdout.strip().splitlines()[-1])
  assert got["devices"] == 4 and got["shards"] == 4
  here = train.train_and_evaluate(tiny_config(method="bcl_dual", num_seeds=4),
                                  toy_benchmark(), log=quiet)
  np.testing.assert_allclose(
      np.asarray(got["w"]),
      np.asarray(here["state"].variables["params"]["Dense_0"]["kernel"]),
      rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got["acc"]), here["accuracy"],
                             atol=1e-6)


def test_grid_tool_one_program_per_shape(tmp_path, capsys):
  from bcl_jax import grid
  rc = grid.main([
      "--config", os.path.join(ROOT, "configs/mnist.py:quick"),
      "--grid", "n_memories=20,30;lr=0.03,0.1", "--seeds", "2",
      "--set", "n_tasks=2", "--set", "use=40", "--workdir", str(tmp_path)])
  assert rc == 0
  saved = json.loads((tmp_path / "grid.json").read_text())
  rows = saved["rows"]
  assert [(r["setting"]["n_memories"], r["setting"]["lr"]) for r in rows] == [
      (20, 0.03), (20, 0.1), (30, 0.03), (30, 0.1)]
  assert [r["program"] for r in rows] == [0, 0, 1, 1]  # lr vmapped
  assert all(r["n"] == 2 for r in rows)
  # Each row is the mean of its two seeds' runs in the program's results.
  res = json.loads((tmp_path / "0" / "results.json").read_text())
  accs = [r["metrics"]["acc"] for r in res["runs"] if r["hp"]["lr"] == 0.1]
  assert rows[1]["acc"] == pytest.approx(np.mean(accs))
  assert rows[1]["acc_std"] == pytest.approx(np.std(accs, ddof=1))
  best = max(range(4), key=lambda i: rows[i]["acc"])
  assert saved["best"] == best
  out = capsys.readouterr().out
  assert "ACC" in out and "±" in out and "<- best" in out
  assert (tmp_path / "best.txt").read_text().strip() == saved["override"]
  assert saved["override"].startswith(
      f"--config.n_memories={rows[best]['setting']['n_memories']} ")
  assert grid.main(["--config", os.path.join(ROOT, "configs/mnist.py"),
                    "--grid", "lrr=1,2"]) == 2
  assert "unknown config field 'lrr'" in capsys.readouterr().err


# -- compiling ahead ---------------------------------------------------------

def test_compile_ahead_is_waited_for_and_used():
  axis = runs_lib.RunAxis([runs_lib.Run(0, {})])
  traced = []

  def double(x):
    traced.append(x.shape)
    return 2 * x

  spec = jax.ShapeDtypeStruct((3,), np.float32)
  assert axis.compile_ahead("f", double, spec)
  assert not axis.compile_ahead("f", double, spec)   # already under way
  fn = axis.compile("f", double, jax.numpy.ones(3))
  np.testing.assert_array_equal(fn(jax.numpy.arange(3.0)), [0.0, 2.0, 4.0])
  assert traced == [(3,)]                             # traced once, ahead
  assert axis.compile("f", double, jax.numpy.zeros(3)) is fn
  assert axis.compile_seconds > 0
  # Other shapes (or a weak type) are another program, compiled on demand.
  axis.compile("f", double, jax.numpy.ones(4))
  axis.compile("f", double, jax.numpy.asarray([1.0, 2.0, 3.0]) * 1.0)
  assert traced == [(3,), (4,)]


def test_compile_ahead_error_surfaces_in_compile_and_is_not_cached():
  axis = runs_lib.RunAxis([runs_lib.Run(0, {})])

  def broken(x):
    raise ValueError("shape trouble in the method")

  assert axis.compile_ahead("g", broken, jax.ShapeDtypeStruct((2,), np.int32))
  with pytest.raises(ValueError, match="shape trouble in the method"):
    axis.compile("g", broken, jax.numpy.zeros(2, jax.numpy.int32))
  fn = axis.compile("g", lambda x: x + 1, jax.numpy.zeros(2, jax.numpy.int32))
  np.testing.assert_array_equal(fn(jax.numpy.zeros(2, jax.numpy.int32)), [1, 1])


def test_compile_ahead_interrupted_while_tracing_leaves_nothing_pending():
  axis = runs_lib.RunAxis([runs_lib.Run(0, {})])

  def interrupted(x):
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    axis.compile_ahead("k", interrupted, jax.ShapeDtypeStruct((2,), np.int32))
  # compile() builds the program itself instead of waiting on a future that
  # nothing would ever complete.
  fn = axis.compile("k", lambda x: x + 1, jax.numpy.zeros(2, jax.numpy.int32))
  np.testing.assert_array_equal(fn(jax.numpy.zeros(2, jax.numpy.int32)), [1, 1])


def test_compile_ahead_traces_in_the_callers_thread_and_settings():
  """The trace is made in the caller's thread, so its thread-local JAX
  settings (here matmul precision) apply; only the compile runs in the
  background."""
  axis = runs_lib.RunAxis([runs_lib.Run(0, {})])
  traced = []

  def f(x):
    traced.append((threading.current_thread() is threading.main_thread(),
                   jax.config.jax_default_matmul_precision))
    return x @ x

  spec = jax.ShapeDtypeStruct((4, 4), np.float32)
  with jax.default_matmul_precision("highest"):
    assert axis.compile_ahead("h", f, spec)
    assert traced == [(True, "highest")]
    fn = axis.compile("h", f, jax.numpy.eye(4))
  np.testing.assert_array_equal(fn(jax.numpy.eye(4)), np.eye(4))
  assert traced == [(True, "highest")]  # the ahead compile was used


def test_compile_ahead_off_when_sharded():
  axis = runs_lib.RunAxis([runs_lib.Run(0, {})])
  axis.n_shards = 2
  assert not axis.compile_ahead("f", lambda x: x,
                                jax.ShapeDtypeStruct((2,), np.float32))
