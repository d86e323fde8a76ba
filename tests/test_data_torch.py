"""torch.save reader/writer and GEM files, without torch.

The ``*_zip.pt`` / ``*_legacy.pt`` fixtures were written by real PyTorch
(see tests/fixtures/make_torch_fixtures.py); expected values are in
tests/fixtures/torch_expected.npz.
"""

import io
import os
import pickle
import shutil
import struct
import sys
import zipfile

import numpy as np
import pytest

from bcl_jax.data import DataError
from bcl_jax.data import gem
from bcl_jax.data.torch_pickle import load_torch, save_torch_zip

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FORMATS = ("zip", "legacy")


@pytest.fixture(scope="module")
def expected():
  with np.load(os.path.join(FIXTURES, "torch_expected.npz")) as data:
    return dict(data)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_every_dtype_and_view(fmt, expected):
  obj = load_torch(os.path.join(FIXTURES, f"dtypes_{fmt}.pt"))
  assert list(obj)[:3] == ["uint8", "int64", "int32"]  # OrderedDict order
  for key, value in obj.items():
    if key == "nested":
      continue
    want = expected[f"dtypes/{key}"]
    assert value.dtype == want.dtype, key
    assert value.shape == want.shape, key
    np.testing.assert_array_equal(value, want, err_msg=key)
  first, second, third = obj["nested"]
  assert first == (1, "two", 3.0)
  np.testing.assert_array_equal(second["k"], [4, 5])
  assert second["k"].dtype == np.int64
  assert third is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_gem_real_torch_files(fmt, expected):
  bench = gem.load_gem(os.path.join(FIXTURES, f"gem_tiny_{fmt}.pt"))
  assert bench.name == f"gem_tiny_{fmt}"
  assert bench.n_tasks == 2 and not bench.task_incremental
  assert bench.n_outputs == 4  # 1 + max label (task 1 has labels 1..3)
  assert bench.input_shape == (5,)
  for t, task in enumerate(bench.tasks):
    for split, i in (("train", 0), ("test", 1)):
      x = getattr(task, f"x_{split}")
      assert x.dtype == np.float32
      np.testing.assert_array_equal(x, expected[f"gem_tiny/{i}/{t}/1"])
      np.testing.assert_array_equal(getattr(task, f"y_{split}"),
                                    expected[f"gem_tiny/{i}/{t}/2"])
  np.testing.assert_array_equal(bench.tasks[0].descriptor,
                                expected["gem_tiny/0/0/0"])
  assert bench.tasks[1].descriptor == 45.5


def test_task_incremental_rule_follows_file_name(tmp_path):
  src = os.path.join(FIXTURES, "gem_tiny_zip.pt")
  for name, want in (("cifar-cl.pt", True), ("cub-val.pt", True),
                     ("mini-cl.pt", True), ("mnist_rotations.pt", False)):
    shutil.copy(src, tmp_path / name)
    bench = gem.load_gem(tmp_path / name)
    assert bench.task_incremental is want, name
    assert bench.name == name[:-3]
  bench = gem.load_gem(tmp_path / "cifar-cl.pt", task_incremental=False,
                       name="x")
  assert not bench.task_incremental and bench.name == "x"
  mi = gem.load_gem(tmp_path / "mini-cl.pt")
  np.testing.assert_array_equal(mi.class_mask[0], [1, 1, 1, 0])
  np.testing.assert_array_equal(mi.class_mask[1], [0, 1, 1, 1])


def test_gem_raw_mnist(expected):
  x, y = gem.load_gem_mnist_raw(
      os.path.join(FIXTURES, "gem_raw_mnist", "mnist_train.pt"))
  assert x.dtype == np.uint8 and x.shape == (4, 28, 28)
  np.testing.assert_array_equal(x, expected["mnist_train/0"])
  np.testing.assert_array_equal(y, expected["mnist_train/1"])


def test_writer_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  base = rng.random((4, 6)).astype(np.float32)
  obj = [
      [["desc", base[:, ::2], np.arange(3)], [45.5, base.T, np.array([1])]],
      (1, -5, 2**40, -(2**70), 3.5, None, True, False, "é"),
      {"u8": np.arange(5, dtype=np.uint8), "i32": np.array(-7, np.int32),
       "f64": rng.random(3), "b": np.array([True, False]),
       "i16": np.arange(3, dtype=np.int16), "i8": np.arange(-2, 2,
                                                            dtype=np.int8),
       "f16": np.arange(3, dtype=np.float16), "empty": np.zeros((0, 3)),
       "scalar": np.float32(2.5), "big": np.arange(300, dtype=np.int64)},
      [], (), {}, (7,), (7, 8, 9, 10),
  ]
  path = tmp_path / "ours.pt"
  save_torch_zip(obj, path)
  back = load_torch(path)
  assert back[0][0][0] == "desc"
  np.testing.assert_array_equal(back[0][0][1], base[:, ::2])
  np.testing.assert_array_equal(back[0][1][1], base.T)
  assert back[0][1][0] == 45.5
  assert back[1] == obj[1]
  for key, value in obj[2].items():
    got = back[2][key]
    if isinstance(value, np.ndarray):
      assert got.dtype == value.dtype and got.shape == value.shape, key
      np.testing.assert_array_equal(got, value)
    else:
      assert got == value
  assert back[3:] == [[], (), {}, (7,), (7, 8, 9, 10)]
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    assert zf.read("archive/version") == b"3\n"
    for info in zf.infolist():
      if info.filename.startswith("archive/data/"):
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        assert start % 64 == 0
  assert "archive/data.pkl" in names and "archive/data/0" in names


def test_writer_refuses_unsupported(tmp_path):
  with pytest.raises(DataError, match="complex"):
    save_torch_zip([np.zeros(2, np.complex64)], tmp_path / "a.pt")
  with pytest.raises(DataError, match="set"):
    save_torch_zip({1, 2}, tmp_path / "b.pt")
  assert not list(tmp_path.iterdir())  # no temp files left behind


class _Evil:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_refuses_arbitrary_globals_zip(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps([_Evil(marker)], protocol=2))
    zf.writestr("archive/version", "3\n")
  with pytest.raises(DataError, match="refused"):
    load_torch(path)
  assert not marker.exists()


def test_refuses_arbitrary_globals_legacy(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pt"
  with open(path, "wb") as fh:
    pickle.dump(0x1950A86A20F9469CFC6C, fh, protocol=2)
    pickle.dump(1001, fh, protocol=2)
    pickle.dump({"little_endian": True}, fh, protocol=2)
    pickle.dump(_Evil(marker), fh, protocol=2)
  with pytest.raises(DataError, match="os.system|posix.system"):
    load_torch(path)
  assert not marker.exists()


def test_bad_files(tmp_path):
  with pytest.raises(DataError, match="no such file"):
    load_torch(tmp_path / "missing.pt")
  with pytest.raises(DataError, match="no such file.*prepare_data"):
    gem.load_gem(tmp_path / "missing.pt")
  garbage = tmp_path / "garbage.pt"
  garbage.write_bytes(bytes(range(256)) * 4)
  with pytest.raises(DataError, match="garbage.pt: .*not a readable"):
    gem.load_gem(garbage)
  for fmt in FORMATS:
    data = open(os.path.join(FIXTURES, f"gem_tiny_{fmt}.pt"), "rb").read()
    for cut in (len(data) // 2, len(data) - 10):
      short = tmp_path / f"short_{fmt}_{cut}.pt"
      short.write_bytes(data[:cut])
      with pytest.raises(DataError, match="truncated"):
        gem.load_gem(short)
  empty = tmp_path / "empty.pt"
  empty.write_bytes(b"")
  with pytest.raises(DataError, match="empty.pt"):
    load_torch(empty)
  with pytest.raises(DataError, match="folder"):
    gem.load_gem(tmp_path)


def test_zip_with_short_or_missing_storage(tmp_path):
  src = tmp_path / "ok.pt"
  save_torch_zip([np.arange(10, dtype=np.float32)], src)
  with zipfile.ZipFile(src) as zf:
    records = {n: zf.read(n) for n in zf.namelist()}
  for change, pattern in (("short", "bytes"), ("drop", "missing"),
                          ("nopkl", "data.pkl")):
    bad = dict(records)
    if change == "short":
      bad["archive/data/0"] = bad["archive/data/0"][:8]
    elif change == "drop":
      del bad["archive/data/0"]
    else:
      del bad["archive/data.pkl"]
    path = tmp_path / f"{change}.pt"
    with zipfile.ZipFile(path, "w") as zf:
      for name, data in bad.items():
        zf.writestr(name, data)
    with pytest.raises(DataError, match=pattern):
      load_torch(path)


def test_view_outside_storage_is_refused(tmp_path):
  # A tensor of 10 elements whose view claims 20: must not read past memory.
  out = io.BytesIO()
  out.write(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(")
  out.write(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
            b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\ntQ"
            b"K\x00K\x14\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR.")
  path = tmp_path / "view.pt"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", out.getvalue())
    zf.writestr("archive/data/0", struct.pack("<10f", *range(10)))
  with pytest.raises(DataError, match="outside its storage"):
    load_torch(path)


def _gem_file(tmp_path, obj, name="bad.pt"):
  path = tmp_path / name
  save_torch_zip(obj, path)
  return path


def _task(n=4, d=3, label=0, desc=0):
  return [desc, np.full((n, d), 0.5, np.float32), np.full(n, label, np.int64)]


@pytest.mark.parametrize("obj, pattern", [
    ([1, 2, 3], r"expected a GEM benchmark \[tasks_train, tasks_test\]"),
    ("text", "expected a GEM benchmark"),
    ([[_task()], [_task(), _task()]], "1 train tasks but 2 test tasks"),
    ([[_task()[:2]], [_task()]], r"task 0 of the train list .*\[descriptor, "
     r"x, y\]"),
    ([[_task()], 5], "test task list is a int"),
    ([[[0, "x", np.zeros(4, np.int64)]], [_task()]], "x is a str"),
    ([[_task(), _task(d=4)], [_task(), _task(d=4)]], "differs from task 0"),
    ([[_task(label=-1)], [_task()]], "labels must be >= 0"),
    ([[_task(n=0)], [_task()]], "empty"),
    ([[[0, np.zeros((4, 3), np.float32), np.zeros(5, np.int64)]], [_task()]],
     "same N"),
])
def test_bad_gem_nesting(tmp_path, obj, pattern):
  path = _gem_file(tmp_path, obj)
  with pytest.raises(DataError, match=pattern) as err:
    gem.load_gem(path)
  assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_gem_round_trip_via_writer(tmp_path):
  obj = [[_task(desc=np.arange(3)), _task(label=2, desc=12.5)],
         [_task(n=2), _task(n=3, label=1, desc="x")]]
  bench = gem.load_gem(_gem_file(tmp_path, obj, "mnist_rotations.pt"))
  assert bench.n_outputs == 3 and bench.n_tasks == 2
  again = gem.gem_object_from_benchmark(bench)
  bench2 = gem.load_gem(_gem_file(tmp_path, again, "again.pt"))
  for a, b in zip(bench.tasks, bench2.tasks):
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)


def test_torch_is_never_imported():
  assert "torch" not in sys.modules
