"""Our .npz format, load_benchmark dispatch and the prepare_data CLI."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from bcl_jax.data import DataError, Task, load_benchmark, make_benchmark
from bcl_jax.data import npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SCRIPT = os.path.join(ROOT, "scripts", "prepare_data.py")


def _bench(task_incremental=True, dtype=np.uint8):
  rng = np.random.default_rng(0)
  tasks = []
  descriptors = [np.arange(4), 12.5, "split", None]
  for t, desc in enumerate(descriptors):
    x_tr = rng.integers(0, 256, (5, 3, 2, 2)).astype(dtype)
    x_te = rng.integers(0, 256, (3, 3, 2, 2)).astype(dtype)
    if dtype != np.uint8:
      x_tr, x_te = x_tr / 255, x_te / 255
    tasks.append(Task(x_tr, np.arange(5) % 2 + 2 * t, x_te,
                      np.arange(3) % 2 + 2 * t, descriptor=desc))
  return make_benchmark("toy", tasks, task_incremental)


def _config(**kw):
  cfg = dict(data_path="", data_file="", benchmark="permuted_mnist",
             n_tasks=0, data_seed=0)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


@pytest.mark.parametrize("task_incremental, dtype",
                         [(True, np.uint8), (False, np.float32)])
def test_round_trip(tmp_path, task_incremental, dtype):
  bench = _bench(task_incremental, dtype)
  path = tmp_path / "toy.npz"
  npz.save_npz(bench, path)
  back = npz.load_npz(path)
  assert back.name == "toy" and back.n_tasks == 4
  assert back.task_incremental is task_incremental
  assert back.n_outputs == bench.n_outputs == 8
  np.testing.assert_array_equal(back.class_mask, bench.class_mask)
  for a, b in zip(bench.tasks, back.tasks):
    for key in ("x_train", "y_train", "x_test", "y_test"):
      got, want = getattr(b, key), getattr(a, key)
      assert got.dtype == want.dtype, key
      np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(back.tasks[0].descriptor, np.arange(4))
  assert [t.descriptor for t in back.tasks[1:]] == [12.5, "split", None]
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_save_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / "toy.npz"
  npz.save_npz(_bench(), path)
  before = path.read_bytes()

  def boom(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez", boom)
  with pytest.raises(OSError):
    npz.save_npz(_bench(False, np.float32), path)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["toy.npz"]


def _write_raw(path, meta, arrays):
  np.savez(path, meta=np.array(meta if isinstance(meta, str)
                               else json.dumps(meta)), **arrays)


def _good_parts(tmp_path):
  path = tmp_path / "good.npz"
  npz.save_npz(_bench(), path)
  with np.load(path) as data:
    arrays = dict(data)
  meta = json.loads(str(arrays.pop("meta")))
  return meta, arrays


@pytest.mark.parametrize("change, pattern", [
    ("drop_key", "missing t3_y_test"),
    ("bad_json", "not valid JSON"),
    ("wrong_format", "does not describe"),
    ("wrong_version", "format version 99"),
    ("no_name", "lacks or garbles"),
    ("no_meta", "no 'meta' entry"),
    ("negative", "labels must be >= 0"),
    ("empty", "empty"),
    ("shapes", "differs from task 0"),
])
def test_bad_npz(tmp_path, change, pattern):
  meta, arrays = _good_parts(tmp_path)
  if change == "drop_key":
    del arrays["t3_y_test"]
  elif change == "bad_json":
    meta = "{not json"
  elif change == "wrong_format":
    meta["format"] = "other"
  elif change == "wrong_version":
    meta["version"] = 99
  elif change == "no_name":
    del meta["name"]
  elif change == "negative":
    arrays["t1_y_train"] = arrays["t1_y_train"] - 5
  elif change == "empty":
    arrays["t2_x_test"] = arrays["t2_x_test"][:0]
    arrays["t2_y_test"] = arrays["t2_y_test"][:0]
  elif change == "shapes":
    arrays["t1_x_train"] = arrays["t1_x_train"][:, :2]
  path = tmp_path / "bad.npz"
  if change == "no_meta":
    np.savez(path, **arrays)
  else:
    _write_raw(path, meta, arrays)
  with pytest.raises(DataError, match=pattern) as err:
    npz.load_npz(path)
  assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_not_an_npz(tmp_path):
  with pytest.raises(DataError, match="no such file.*prepare_data"):
    npz.load_npz(tmp_path / "missing.npz")
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"\x00garbage" * 100)
  with pytest.raises(DataError, match="garbage.npz: not a readable"):
    npz.load_npz(garbage)
  single = tmp_path / "single.npz"
  with open(single, "wb") as fh:
    np.save(fh, np.zeros(3))
  with pytest.raises(DataError, match="single .npy"):
    npz.load_npz(single)


def test_load_benchmark_dispatch(tmp_path):
  bench = load_benchmark(_config(n_tasks=2, data_seed=3))
  assert bench.n_tasks == 2 and bench.tasks[0].x_train.shape == (4000, 784)
  assert bench.name == "mnist_permutations" and bench.n_outputs == 10

  bench = load_benchmark(_config(data_path=FIXTURES,
                                 data_file="gem_tiny_zip.pt", n_tasks=1))
  assert bench.n_tasks == 1 and bench.input_shape == (5,)
  assert load_benchmark(_config(data_path=FIXTURES,
                                data_file="gem_tiny_legacy.pt")).n_tasks == 2

  npz.save_npz(_bench(), tmp_path / "toy.npz")
  bench = load_benchmark(_config(data_path=str(tmp_path), data_file="toy.npz",
                                 n_tasks=3))
  assert bench.n_tasks == 3 and bench.class_mask.shape == (3, 8)
  assert bench.task_incremental

  bench = load_benchmark(_config(data_path=FIXTURES, data_file="gem_raw_mnist",
                                 benchmark="rotated_mnist", n_tasks=3))
  assert bench.n_tasks == 3 and bench.tasks[0].x_train.shape == (4, 784)
  assert all(0 <= t.descriptor < 180 for t in bench.tasks)


def test_load_benchmark_errors(tmp_path):
  (tmp_path / "data.csv").write_text("1,2\n")
  with pytest.raises(DataError, match=r"'\.csv'.*\.pt, \.npz"):
    load_benchmark(_config(data_path=str(tmp_path), data_file="data.csv"))
  with pytest.raises(DataError, match="no such file"):
    load_benchmark(_config(data_path=str(tmp_path), data_file="nope.pt"))
  with pytest.raises(DataError, match=r"no such file or folder.*\.pt"):
    load_benchmark(_config(data_path=str(tmp_path), data_file="nope"))
  with pytest.raises(DataError, match="permuted_mnist, rotated_mnist"):
    load_benchmark(_config(benchmark="split_cifar"))
  with pytest.raises(DataError, match="neither"):
    load_benchmark(_config(data_path=str(tmp_path.parent),
                           data_file=tmp_path.name))


def _cli(*args, cwd):
  return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=cwd,
                        capture_output=True, text=True, timeout=120,
                        check=False)


def test_cli_convert_round_trip_and_errors(tmp_path):
  npz.save_npz(_bench(), tmp_path / "toy.npz")
  res = _cli("convert", "toy.npz", "toy.pt", cwd=tmp_path)
  assert res.returncode == 0, res.stderr
  assert "wrote toy.pt: 4 tasks, 20 train + 12 test samples" in res.stdout
  bench = load_benchmark(_config(data_path=str(tmp_path), data_file="toy.pt"))
  ref = _bench()
  for a, b in zip(ref.tasks, bench.tasks):
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)

  res = _cli("convert", "missing.pt", "out.npz", cwd=tmp_path)
  assert res.returncode == 2
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and "missing.pt: no such file" in lines[0]
  assert "Traceback" not in res.stderr
  res = _cli("permuted", "--source", "no_such_dir", "--n-tasks", "2",
             "--out", "p.npz", cwd=tmp_path)
  assert res.returncode == 2 and "no_such_dir: no such folder" in res.stderr
  res = _cli("convert", "toy.npz", "toy.txt", cwd=tmp_path)
  assert res.returncode == 2 and "use one of .pt, .npz" in res.stderr


def test_cli_builds_rotated_from_folder(tmp_path):
  res = _cli("rotated", "--source", os.path.join(FIXTURES, "gem_raw_mnist"),
             "--n-tasks", "2", "--min-rot", "10", "--max-rot", "20",
             "--out", "rot.npz", cwd=tmp_path)
  assert res.returncode == 0, res.stderr
  bench = npz.load_npz(tmp_path / "rot.npz")
  assert bench.n_tasks == 2 and bench.name == "mnist_rotations"
  assert 10 <= bench.tasks[0].descriptor < 15 <= bench.tasks[1].descriptor < 20
