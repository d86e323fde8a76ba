"""End to end: the paper's benchmarks from files in their real formats.

Each test writes a tiny copy of a dataset in its distribution format (CIFAR-100
python pickles, a CUB_200_2011 folder of JPEGs, miniImageNet pickle caches,
the reference's float ``cifar-cl.pt``, MNIST digits), prepares it with
``scripts/prepare_data.py`` where the real workflow does, and runs
``bcl_dual`` through ``configs/<benchmark>.py:quick``. Sample counts are
scaled down; formats, shapes (but CUB's image size, see below) and the code
path are the real ones. The default suite keeps one ResNet run end to end
(CIFAR-100 pickles); the reference's ``cifar-cl.pt``, miniImageNet, CUB (at
32x32 and at its real 224x224) and ``scripts/run.sh`` on all four benchmarks
compile a ResNet each (40-70 s on 2 cores) and are marked slow; their
readers are covered by tests/test_data_*.py in the default suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcl_jax import experiment, methods, train
from bcl_jax.data import load_benchmark, npz

from data_helpers import (REPO, _check_results, _config, _prepare,
                          write_cub_folder, write_mini_caches,
                          write_reference_cifar_cl_pt)


# --------------------------------------------------------------- tests --


def test_cifar_pickles_prepare_and_run(cifar_data, tmp_path):
  assert sorted(os.listdir(cifar_data)) == ["cifar-cl.npz", "cifar-val.npz"]
  config = _config("cifar", data_path=str(cifar_data))
  assert (config.lr, config.beta, config.inner_steps, config.n_meta) == (
      0.3, 0.1, 2, 1)
  res = experiment.run(config, str(tmp_path / "wd"))
  _check_results(res, 2)
  assert res["benchmark"]["n_outputs"] == 85  # the file's, not the 2 tasks'
  assert res["benchmark"]["input_shape"] == [3072]
  on_disk = json.loads((tmp_path / "wd" / "results.json").read_text())
  assert on_disk["metrics"]["acc"] == pytest.approx(res["metrics"]["acc"])


@pytest.mark.slow
@pytest.mark.parametrize("method", methods.names())
def test_every_method_on_tiny_split_cifar(method, cifar_data, tmp_path):
  """Each registered method end to end on split CIFAR with the reduced
  ResNet-18 (BatchNorm, task-incremental heads), two seeds."""
  config = _config("cifar", data_path=str(cifar_data), method=method,
                   num_seeds=2, checkpoint=True)
  res = experiment.run(config, str(tmp_path / "wd"), log=lambda *a: None)
  _check_results(res, 2)
  assert len(res["runs"]) == 2


@pytest.mark.slow
def test_reference_cifar_cl_pt_batchnorm_train_and_eval(cifar_data, tmp_path):
  """The reference's float ``cifar-cl.pt``; BatchNorm moves in training only."""
  path = tmp_path / "cifar-cl.pt"
  write_reference_cifar_cl_pt(npz.load_npz(cifar_data / "cifar-cl.npz"), path)
  config = _config("cifar", data_path=str(tmp_path), data_file="cifar-cl.pt")
  bench = load_benchmark(config)
  assert bench.task_incremental and bench.n_tasks == 2
  assert bench.tasks[0].x_train.dtype == np.float32
  for t in range(2):  # the first 2 of 17 tasks keep their own 5 columns
    np.testing.assert_array_equal(bench.head_columns(t),
                                  range(5 * t, 5 * t + 5))
  out = train.train_and_evaluate(config, bench, log=lambda *_: None)
  setup = out["setup"]
  model = setup.ctx.model
  assert model.name == "resnet18_reduced"
  acc = out["accuracy"]
  assert acc.shape == (1, 2, 2) and np.all(np.isfinite(acc))

  start = train.init_state(setup)
  for path_, before, after in zip(
      jax.tree_util.tree_leaves_with_path(start.variables["batch_stats"]),
      jax.tree_util.tree_leaves(start.variables["batch_stats"]),
      jax.tree_util.tree_leaves(out["state"].variables["batch_stats"])):
    assert not np.allclose(before, after), path_[0]  # every BN layer trained

  # Evaluation is inference mode: running statistics are used and kept, so
  # a sample's logits do not depend on the rest of its batch.
  variables = jax.tree_util.tree_map(lambda a: a[0], out["state"].variables)
  x = jnp.asarray(bench.tasks[1].x_test)
  logits, after_eval = model.apply(variables, x, False)
  for a, b in zip(jax.tree_util.tree_leaves(after_eval),
                  jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)
  alone, _ = model.apply(variables, x[:3], False)
  np.testing.assert_allclose(alone, logits[:3], rtol=1e-4, atol=1e-4)
  train_logits, _ = model.apply(variables, x[:3], True)
  assert not np.allclose(train_logits, alone, atol=1e-3)


@pytest.mark.slow
def test_mini_pickle_caches_prepare_and_run(tmp_path):
  src = write_mini_caches(tmp_path / "mini")
  _prepare("mini", "--source", str(src), "--out-dir", str(tmp_path / "data"),
           "--train-per-class", "2")
  config = _config("mini", data_path=str(tmp_path / "data"))
  res = experiment.run(config, str(tmp_path / "wd"))
  _check_results(res, 2)
  assert res["benchmark"]["input_shape"] == [3, 84, 84]
  assert res["benchmark"]["n_outputs"] == 85


@pytest.mark.slow
def test_cub_jpegs_prepare_and_run_small_images(tmp_path):
  """CUB at 32x32 (``--size 32``): the full ResNet-18 at 224 is slow on CPU;
  ``test_cub_224`` (slow) runs the real size."""
  src = write_cub_folder(tmp_path)
  _prepare("cub", "--source", str(src), "--out-dir", str(tmp_path / "data"),
           "--size", "32")
  config = _config("cub", data_path=str(tmp_path / "data"))
  res = experiment.run(config, str(tmp_path / "wd"))
  _check_results(res, 2)
  assert res["benchmark"]["input_shape"] == [3, 32, 32]
  assert res["benchmark"]["n_outputs"] == 170


@pytest.mark.slow
def test_cub_224(tmp_path):
  src = write_cub_folder(tmp_path)
  _prepare("cub", "--source", str(src), "--out-dir", str(tmp_path / "data"))
  config = _config("cub", data_path=str(tmp_path / "data"))
  res = experiment.run(config, str(tmp_path / "wd"))
  _check_results(res, 2)
  assert res["benchmark"]["input_shape"] == [3, 224, 224]


def test_rotated_mnist_embedded_and_prepared(tmp_path):
  config = _config("rotated_mnist", use=100, eval_batch_size=500)
  res = experiment.run(config, str(tmp_path / "wd"))
  _check_results(res, 3)
  assert res["benchmark"]["n_outputs"] == 10
  assert not res["benchmark"]["task_incremental"]
  # GEM's layout from prepare_data: 20 tasks, 0-180 degrees.
  _prepare("rotated", "--source", "embedded", "--n-tasks", "20", "--out",
           str(tmp_path / "mnist_rotations.npz"))
  bench = load_benchmark(_config("rotated_mnist", "", data_path=str(tmp_path),
                                 data_file="mnist_rotations.npz", n_tasks=0))
  angles = [t.descriptor for t in bench.tasks]
  assert len(angles) == 20 and 0 <= angles[0] < 9 and 171 <= angles[-1] < 180


@pytest.mark.parametrize("name", ["rotated_mnist", "cifar", "cub", "mini"])
def test_configs_paper_values_and_variants(name, tmp_path):
  paper = {"cifar": (0.3, 0.1, 2, 1, 65), "cub": (0.03, 0.3, 1, 2, 50),
           "mini": (0.05, 0.1, 2, 1, 65),
           "rotated_mnist": (0.03, 0.3, 1, 2, 256)}[name]
  c = _config(name, "")
  assert (c.lr, c.beta, c.inner_steps, c.n_meta, c.n_memories) == paper
  assert (c.batch_size, c.replay_batch_size, c.temperature,
          c.memory_strength, c.method) == (10, 128, 5.0, 100.0, "bcl_dual")
  val = _config(name, "val")
  if name != "rotated_mnist":
    assert c.data_file == f"{name}-cl.npz"
    assert val.data_file == f"{name}-val.npz"
    # A missing file says how to make it (download=False: no network here).
    with pytest.raises(Exception, match=r"no such file.*prepare_data\.py "):
      load_benchmark(_config(name, "val,quick", data_path=str(tmp_path),
                             download=False))
    assert c.download and not (c.data_url or c.data_md5 or c.data_sha256)
  with pytest.raises(ValueError, match="unknown variant"):
    _config(name, "nope")


def _env():
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return env


def test_run_sh_embedded_mnist_and_missing_data(tmp_path):
  """No files at all: MNIST runs on the embedded digits, CIFAR (download
  off) fails naming the prepare command, mini is skipped; exit status 1."""
  data = tmp_path / "data"
  data.mkdir()
  env = _env()
  env.update(DATA=str(data), RESULTS=str(tmp_path / "results"),
             PYTHON=sys.executable, BENCHMARKS="mnist cifar mini")
  proc = subprocess.run(
      ["bash", os.path.join(REPO, "scripts", "run.sh"), "--config.use=50",
       "--config.n_tasks=2", "--config.progress=False",
       "--config.heatmap=False", "--config.checkpoint=False",
       "--config.download=False"],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr
  assert "using 20 tasks of the embedded digits" in proc.stdout
  assert "prepare_data.py cifar100" in proc.stderr
  assert "error: failed: cifar" in proc.stderr
  assert "skipping mini" in proc.stderr and "mini-imagenet-cache" in \
      proc.stderr
  # The failed cifar run wrote nothing, so its workdir was removed.
  runs = sorted(os.listdir(tmp_path / "results"))
  assert [r.split("-")[0] for r in runs] == ["mnist"]
  mnist = [r for r in runs if r.startswith("mnist-bcl_dual-")][0]
  res = json.loads((tmp_path / "results" / mnist / "results.json")
                   .read_text())
  assert np.asarray(res["accuracy_matrix"]).shape == (2, 2)
  assert res["benchmark"]["input_shape"] == [784]
  assert "ACC" in proc.stdout
  assert os.listdir(data) == []  # nothing downloaded or half-written


def test_prepare_permuted_uint8_creates_folder(tmp_path):
  out = tmp_path / "new" / "dir" / "mnist_permutations.npz"
  _prepare("permuted", "--source", "embedded", "--n-tasks", "3", "--out",
           str(out))
  got = npz.load_npz(out)
  ref = load_benchmark(_config("mnist", "", n_tasks=3, data_file=""))
  for tg, tr in zip(got.tasks, ref.tasks):
    assert tg.x_train.dtype == np.uint8
    # The digits themselves: float x == uint8 / 255 exactly (numpy).
    np.testing.assert_array_equal(tg.x_train.astype(np.float32) / 255,
                                  tr.x_train)
    np.testing.assert_array_equal(tg.y_test, tr.y_test)
  # 4,000 + 1,000 digits x 784 bytes x 3 tasks, plus a little zip overhead.
  assert 3 * 5000 * 784 < os.path.getsize(out) < 3 * 5000 * 784 * 1.01
  rot = tmp_path / "rot.npz"
  _prepare("rotated", "--source", "embedded", "--n-tasks", "2", "--out",
           str(rot))
  ref = load_benchmark(_config("rotated_mnist", "", n_tasks=2,
                               data_file=""))
  got = npz.load_npz(rot)
  assert got.tasks[1].x_test.dtype == np.uint8
  diff = np.abs(got.tasks[1].x_test / 255 - ref.tasks[1].x_test)
  assert diff.max() <= 0.5 / 255 + 1e-7  # rounded to the nearest level
  _prepare("rotated", "--source", "embedded", "--n-tasks", "2", "--out",
           str(rot), "--dtype", "float32")
  np.testing.assert_array_equal(npz.load_npz(rot).tasks[1].x_test,
                                ref.tasks[1].x_test)


def test_grid_val_cross_validation(tmp_path):
  from bcl_jax import grid
  out = tmp_path / "best.txt"
  rc = grid.main(["--config", "configs/rotated_mnist.py:quick", "--val",
                  "--grid", "lr=0.03,0.1;inner_steps=1,2", "--set", "use=40",
                  "--set", "n_tasks=2", "--workdir", str(tmp_path / "cv"),
                  "--out", str(out)])
  assert rc == 0
  line = out.read_text().strip()
  summary = json.loads((tmp_path / "cv" / "grid.json").read_text())
  assert summary["config"].endswith("rotated_mnist.py:val,quick")
  assert len(summary["rows"]) == 4
  best = summary["rows"][summary["best"]]
  assert best["acc"] == max(r["acc"] for r in summary["rows"])
  assert line == summary["override"]
  assert f"--config.lr={best['setting']['lr']:g}" in line


@pytest.mark.slow
def test_run_sh_four_benchmarks(tmp_path, cifar_data):
  data = tmp_path / "data"
  data.mkdir()
  _prepare("permuted", "--source", "embedded", "--n-tasks", "2", "--out",
           str(data / "mnist_permutations.npz"))
  os.symlink(cifar_data / "cifar-cl.npz", data / "cifar-cl.npz")
  _prepare("cub", "--source", str(write_cub_folder(tmp_path)), "--out-dir",
           str(data), "--size", "32")
  _prepare("mini", "--source", str(write_mini_caches(tmp_path / "mini")),
           "--out-dir", str(data), "--train-per-class", "2")
  env = _env()
  # PRETRAINED='': CUB from a random init; the default downloads the
  # ImageNet weights (the loader has its own tests on local files).
  env.update(DATA=str(data), RESULTS=str(tmp_path / "results"),
             PYTHON=sys.executable, PRETRAINED="")
  proc = subprocess.run(
      ["bash", os.path.join(REPO, "scripts", "run.sh"), "--config.n_tasks=2",
       "--config.use=20", "--config.n_memories=20",
       "--config.replay_batch_size=16", "--config.progress=False",
       "--config.heatmap=False", "--config.checkpoint=False"],
      env=env, capture_output=True, text=True, timeout=1800, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  runs = sorted(os.listdir(tmp_path / "results"))
  assert [r.split("-")[0] for r in runs] == ["cifar", "cub", "mini", "mnist"]
  for r in runs:
    res = json.loads((tmp_path / "results" / r / "results.json").read_text())
    assert np.asarray(res["accuracy_matrix"]).shape == (2, 2)
