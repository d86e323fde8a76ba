"""Hostile files: every reader checks declared sizes before allocating.

Each bomb is a tiny file crafted here; the reader must refuse it with one
DataError line naming the file and the record, quickly and within a small
traced-memory peak. A fuzz test mutates valid .pt files and checks that the
reader returns the right arrays or its own DataError, within a memory bound.
"""

import gzip
import io
import json
import os
import pickle
import random
import resource
import struct
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

from bcl_jax import fileio, results
from bcl_jax.data import DataError, Task, benchmark, gem, make_benchmark
from bcl_jax.data import mnist, npz, safezip, torch_pickle
from bcl_jax.data.torch_pickle import load_torch, save_torch_zip

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MiB = 1 << 20


# ------------------------------------------------------------- crafting ----


def _int_op(v):
  return pickle.dumps(v, 2)[2:-1]  # the opcode that pushes int v


def tensor_pickle(size, stride, numel, stype="FloatStorage", offset=0):
  """A protocol-2 data.pkl holding one tensor view of storage '0'."""
  tup = lambda vals: b"(" + b"".join(_int_op(v) for v in vals) + b"t"
  return (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n("
          b"(X\x07\x00\x00\x00storagectorch\n" + stype.encode() +
          b"\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu" + _int_op(numel) +
          b"tQ" + _int_op(offset) + tup(size) + tup(stride) +
          b"\x89ccollections\nOrderedDict\n)RtR.")


def write_pt(path, pkl, storage):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pkl)
    zf.writestr("archive/data/0", storage)


def stride0_bomb(path):
  """834 bytes: one float seen as a [50000, 62500] tensor (12.5 GB)."""
  write_pt(path, tensor_pickle((50000, 62500), (0, 0), 1),
           struct.pack("<f", 1.0))


def patch_directory_size(path, name, size):
  """Overwrites the uncompressed size of ``name``'s central directory entry."""
  data = bytearray(open(path, "rb").read())
  i = data.find(b"PK\x01\x02")
  while i >= 0:
    n = struct.unpack_from("<H", data, i + 28)[0]
    if data[i + 46:i + 46 + n] == name.encode():
      struct.pack_into("<I", data, i + 24, size)
      open(path, "wb").write(bytes(data))
      return
    i = data.find(b"PK\x01\x02", i + 1)
  raise AssertionError(f"{name} not in {path}")


def overstated_bomb(path, claimed=0xE0000000):
  """A 10-float storage whose directory entry claims 3.76 GB."""
  save_torch_zip(np.arange(10, dtype=np.float32), path)
  patch_directory_size(path, "archive/data/0", claimed)


def deflate_bomb(path, nbytes):
  """A uint8 tensor of ``nbytes`` zeros, deflated (~1000x smaller)."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
    zf.writestr("archive/data.pkl",
                tensor_pickle((nbytes,), (1,), nbytes, "ByteStorage"))
    chunk = bytes(min(nbytes, 64 * MiB))
    with zf.open("archive/data/0", "w", force_zip64=True) as fh:
      for start in range(0, nbytes, len(chunk)):
        fh.write(chunk[:nbytes - start])


def label_file(path, label):
  """A one-task GEM file whose second label is ``label``."""
  x = np.full((2, 3), 0.5, np.float32)
  y = np.array([0, label], np.int64)
  save_torch_zip([[[0, x, y]], [[0, x, y]]], path)


def _peak(fn, *args):
  """(result or exception, traced peak bytes) of ``fn(*args)``."""
  tracemalloc.start()
  try:
    try:
      out = fn(*args)
    except Exception as err:  # pylint: disable=broad-except
      out = err
    return out, tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def _refused(fn, *args, match, peak=4 * MiB):
  err, used = _peak(fn, *args)
  assert isinstance(err, DataError), err
  msg = str(err)
  assert "\n" not in msg
  import re  # pylint: disable=import-outside-toplevel
  assert re.search(match, msg), msg
  assert used < peak, (used, msg)
  return msg


# ------------------------------------------------------- torch .pt bombs ----


def test_stride0_tensor_is_refused(tmp_path):
  path = tmp_path / "stride0.pt"
  stride0_bomb(path)
  assert os.path.getsize(path) < 1000
  msg = _refused(load_torch, path, match=r"record archive/data/0 \(1 elements"
                 r"\).* would copy 12\.5 GB; .*MAX_VIEW_COPY_BYTES")
  assert msg.startswith(f"{path}: ")


def test_small_expansions_and_views_still_load(tmp_path):
  path = tmp_path / "expand.pt"
  write_pt(path, tensor_pickle((3, 4), (0, 1), 4),
           struct.pack("<4f", 1, 2, 3, 4))
  np.testing.assert_array_equal(load_torch(path), [[1, 2, 3, 4]] * 3)
  write_pt(path, tensor_pickle((2, 3), (1, 2), 6, offset=0),
           struct.pack("<6f", *range(6)))  # a transpose: copied
  np.testing.assert_array_equal(load_torch(path), [[0, 2, 4], [1, 3, 5]])
  write_pt(path, tensor_pickle((2, 2), (2, 1), 6, offset=2),
           struct.pack("<6f", *range(6)))  # an offset slice: not copied
  np.testing.assert_array_equal(load_torch(path), [[2, 3], [4, 5]])


def test_view_copies_share_one_budget(tmp_path, monkeypatch):
  monkeypatch.setattr(torch_pickle, "MAX_VIEW_COPY_BYTES", 1000)
  path = tmp_path / "expand.pt"
  write_pt(path, tensor_pickle((300,), (0,), 1), struct.pack("<f", 7))
  assert (load_torch(path) == 7).all()  # 1200 B <= 2 * file size + 1000
  write_pt(path, tensor_pickle((3000,), (0,), 1), struct.pack("<f", 7))
  _refused(load_torch, path, match="would copy 12.0 kB")


def test_overstated_zip_directory_is_refused(tmp_path):
  path = tmp_path / "overstated.pt"
  overstated_bomb(path)
  assert os.path.getsize(path) < 1000
  _refused(load_torch, path, match=(
      "record archive/data/0 is stored uncompressed in 40 bytes but its "
      "directory entry says 3758096384 .*; the file is not a readable"))


def test_deflate_bomb_is_refused(tmp_path, monkeypatch):
  path = tmp_path / "bomb.pt"
  deflate_bomb(path, 4 * MiB)
  assert os.path.getsize(path) < 10_000
  assert load_torch(path).shape == (4 * MiB,)  # under the cap: fine
  monkeypatch.setattr(safezip, "MAX_INFLATED_BYTES", MiB)
  _refused(load_torch, path, peak=MiB // 2, match=(
      r"record archive/data/0 inflates .* to 4\.2 MB, past the cap of "
      r"1\.0 MB .*MAX_INFLATED_BYTES"))


def test_corrupt_compressed_record_is_a_data_error(tmp_path):
  path = tmp_path / "method.pt"
  save_torch_zip(np.arange(10, dtype=np.float32), path)
  data = bytearray(path.read_bytes())
  i = data.find(b"PK\x01\x02")
  while i >= 0:  # mark archive/data/0 deflated although it is stored
    n = struct.unpack_from("<H", data, i + 28)[0]
    if data[i + 46:i + 46 + n] == b"archive/data/0":
      struct.pack_into("<H", data, i + 10, zipfile.ZIP_DEFLATED)
    i = data.find(b"PK\x01\x02", i + 1)
  path.write_bytes(bytes(data))
  _refused(load_torch, path, match=r"record archive/data/0 cannot be read "
           r"\(error: Error -3 while decompressing")


def test_records_may_not_share_bytes(tmp_path):
  path = tmp_path / "ok.pt"
  save_torch_zip(np.zeros(1000, np.float32), path)
  with zipfile.ZipFile(path) as zf:
    records = safezip.BoundedZip(str(path), zf, "fix it")
    records.check("archive/data/0")
    with pytest.raises(DataError, match="data/0 reuses bytes of other"):
      records.check("archive/data/0")  # a second entry for the same bytes


def test_pickle_memo_and_length_bombs(tmp_path):
  # A PUT at memo index 2**30 makes the C unpickler zero-fill 8 GB.
  path = tmp_path / "memo.pt"
  write_pt(path, b"\x80\x02Nr\x00\x00\x00\x40.", b"")
  assert _peak(load_torch, path)[0] is None
  assert _peak(load_torch, path)[1] < MiB
  # BYTEARRAY8 of 2**33 bytes: refused before allocating.
  write_pt(path, b"\x80\x05\x96" + struct.pack("<Q", 1 << 33) + b".", b"")
  _refused(load_torch, path, match="protocol-5 buffers", peak=MiB)
  # numpy's own constructors may not allocate what the file names.
  write_pt(path, b"\x80\x02cnumpy\nndarray\n(J\x00\x00\x00\x40tR.", b"")
  _refused(load_torch, path, match="a call of numpy.ndarray", peak=MiB)


# ----------------------------------------------------------- huge labels ----


@pytest.mark.parametrize("label", [2**32, 2**40, 10**9])
def test_huge_label_is_refused(tmp_path, label):
  path = tmp_path / "labels.pt"
  label_file(path, label)
  _refused(gem.load_gem, path, match=(
      rf"^{path}: task 0 \(train\): label {label} implies {label + 1} "
      r"classes, more than MAX_CLASSES = 100000; labels must be class "))


def test_max_classes_is_configurable(tmp_path, monkeypatch):
  path = tmp_path / "labels.pt"
  label_file(path, 7)
  assert gem.load_gem(path).n_outputs == 8
  monkeypatch.setattr(benchmark, "MAX_CLASSES", 7)
  with pytest.raises(DataError, match="label 7 implies 8 classes"):
    gem.load_gem(path)
  x, y = np.zeros((2, 3), np.float32), np.zeros(2, np.int64)
  with pytest.raises(DataError, match="n_outputs 8 is outside 1..7"):
    make_benchmark("b", [Task(x, y, x, y)], False, n_outputs=8)


# ----------------------------------------------------------- input range ----


def _tasks(x):
  y = np.arange(len(x)) % 2
  return [Task(x, y, x[:1], y[:1]), Task(x, y, x[:1], y[:1])]


def test_float_inputs_outside_unit_range_are_refused():
  pixels = np.arange(12, dtype=np.float32).reshape(4, 3) * 20  # 0..220
  with pytest.raises(DataError) as err:
    make_benchmark("raw", _tasks(np.clip(pixels, 0, 1))[:1] + _tasks(pixels),
                   False, source="raw.pt")
  assert str(err.value) == (
      "raw.pt: task 1 (train): float inputs range over [0, 220], expected "
      "[0, 1]; divide them by 255 if they are raw pixels (or store them as "
      "uint8, which is scaled to [0, 1] automatically)")
  with pytest.raises(DataError, match=r"task 0 \(test\): .*\[-0.5, -0.5\]"):
    make_benchmark("neg", [Task(pixels / 255, np.zeros(4, int),
                                np.full((1, 3), -0.5), np.zeros(1, int))],
                   False, source="neg")
  # uint8 is scaled later; [0, 1] with rounding slack passes.
  assert make_benchmark("u8", _tasks(pixels.astype(np.uint8)), False).n_tasks
  near = np.clip(pixels / 220, 0, 1) * np.float32(1.0005)
  assert make_benchmark("ok", _tasks(near), False).n_tasks == 2


def test_raw_pixel_npz_is_refused(tmp_path):
  x = np.full((4, 3), 128.0, np.float32)
  bench = make_benchmark("ok", _tasks(x / 255), False)
  bench.tasks[1].x_test = bench.tasks[1].x_test * 255  # bypasses the check
  path = tmp_path / "raw.npz"
  npz.save_npz(bench, path)
  with pytest.raises(DataError, match=rf"^{path}: task 1 \(test\): float "
                     r"inputs range over \[128, 128\], expected \[0, 1\]"):
    npz.load_npz(path)


# ----------------------------------------------------------------- .npz ----


def _npz(tmp_path):
  path = tmp_path / "toy.npz"
  npz.save_npz(make_benchmark("t", _tasks(np.zeros((4, 3), np.uint8)),
                              False), path)
  return path


def test_npz_overstated_member_is_refused(tmp_path):
  path = _npz(tmp_path)
  patch_directory_size(path, "t0_x_train.npy", 0xE0000000)
  _refused(npz.load_npz, path, match=(
      r"record t0_x_train.npy is stored uncompressed in \d+ bytes but its "
      "directory entry says 3758096384"))


def test_npz_forged_header_shape_is_refused(tmp_path):
  path = tmp_path / "forged.npz"
  head = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      head, {"descr": "|u1", "fortran_order": False, "shape": (10**9,)})
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("t0_x_train.npy", head.getvalue() + bytes(10))
  n = len(head.getvalue())
  _refused(npz.load_npz, path, match=(
      rf"member t0_x_train.npy declares shape \(1000000000,\) of uint8 "
      rf"\({10**9 + n} bytes with its header\) but holds {n + 10} bytes"))


def test_npz_compressed_bomb_is_refused(tmp_path, monkeypatch):
  path = tmp_path / "bomb.npz"
  np.savez_compressed(path, meta=np.array("{}"), big=np.zeros(4 * MiB, "u1"))
  monkeypatch.setattr(safezip, "MAX_INFLATED_BYTES", MiB)
  _refused(npz.load_npz, path, peak=MiB // 2, match=(
      r"record big.npy inflates .* past the cap of 1.0 MB"))


# ------------------------------------------------------------------ IDX ----


def _gz_idx(path, dims, body):
  with gzip.open(path, "wb") as fh:
    fh.write(struct.pack(">i3i", 2051, *dims) + body)


def test_idx_header_is_checked_before_reading(tmp_path, monkeypatch):
  path = str(tmp_path / "train-images-idx3-ubyte.gz")
  _gz_idx(path, (1000, 28, 28), bytes(28 * 28 * 10))
  with pytest.raises(DataError, match=r"inflates to 7856 bytes but the "
                     r"header \(1000, 28, 28\) implies 784016"):
    mnist._read_idx(path, images=True)
  _gz_idx(path, (-1, 28, 28), b"")
  with pytest.raises(DataError, match="negative dimensions"):
    mnist._read_idx(path, images=True)
  _gz_idx(path, (4, 28, 28), bytes(28 * 28 * 4 + 1))
  with pytest.raises(DataError, match="inflates to more bytes"):
    mnist._read_idx(path, images=True)
  _gz_idx(path, (4096, 28, 28), bytes(28 * 28 * 4096))  # 3.2 MB in 4 kB
  assert mnist._read_idx(path, images=True).shape == (4096, 28, 28)
  monkeypatch.setattr(mnist, "MAX_IDX_BYTES", MiB)
  _refused(mnist._read_idx, path, True, peak=MiB // 4, match=(
      r"header \(4096, 28, 28\) implies 3211280 bytes, more than "
      "MAX_IDX_BYTES"))
  plain = str(tmp_path / "train-images-idx3-ubyte")
  open(plain, "wb").write(struct.pack(">i3i", 2051, 2**31 - 1, 28, 28))
  _refused(mnist._read_idx, plain, True, peak=MiB // 4,
           match="16 bytes but the header")


# --------------------------------------------------------------- fileio ----


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_mode_follows_umask(tmp_path, umask):
  old = os.umask(umask)
  try:
    for i, write in enumerate((
        lambda p: fileio.atomic_write(p, "text ±"),
        lambda p: results.atomic_write(str(p), b"bytes"),
        lambda p: save_torch_zip([np.zeros(2)], p),
        lambda p: npz.save_npz(make_benchmark(
            "t", _tasks(np.zeros((2, 3), np.uint8)), False), p))):
      path = tmp_path / f"f{i}"
      write(path)
      assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
  finally:
    os.umask(old)
  assert (tmp_path / "f0").read_text("utf-8") == "text ±"
  assert sorted(os.listdir(tmp_path)) == ["f0", "f1", "f2", "f3"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
  path = tmp_path / "results.json"
  fileio.atomic_write(path, "old")
  with pytest.raises(RuntimeError, match="mid-write"):
    with fileio.atomic_open(path) as fh:
      fh.write(b"new, half")
      raise RuntimeError("mid-write")
  monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(
      OSError("rename failed")))
  with pytest.raises(OSError, match="rename failed"):
    results.atomic_write(str(path), "new")
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["results.json"]  # no temp file left


# ------------------------------------------------------------ fuzz test ----


def _same(a, b):
  if isinstance(a, np.ndarray):
    return (isinstance(b, np.ndarray) and a.dtype == b.dtype and
            a.shape == b.shape and np.array_equal(a, b, equal_nan=True))
  if isinstance(a, dict):
    return (isinstance(b, dict) and list(a) == list(b) and
            all(_same(a[k], b[k]) for k in a))
  if isinstance(a, (list, tuple)):
    return (type(a) is type(b) and len(a) == len(b) and
            all(_same(x, y) for x, y in zip(a, b)))
  return type(a) is type(b) and (a == b or a != a and b != b)


def fuzz_main(out_dir, n_per_file, seed):
  """Mutates valid .pt files; prints a JSON tally (run in a subprocess)."""
  # Address-space cap: a bug that allocates gigabytes fails here instead of
  # swapping the machine; tracemalloc measures the precise peak.
  with open("/proc/self/statm") as fh:
    vm = int(fh.read().split()[0]) * resource.getpagesize()
  resource.setrlimit(resource.RLIMIT_AS, (vm + 768 * MiB, vm + 768 * MiB))
  torch_pickle.MAX_VIEW_COPY_BYTES = MiB  # makes the bound below tight
  rng = random.Random(seed)
  sources = [os.path.join(FIXTURES, n) for n in sorted(os.listdir(FIXTURES))
             if n.endswith(".pt")]
  sources += [os.path.join(FIXTURES, "gem_raw_mnist", "mnist_train.pt")]
  own = os.path.join(out_dir, "own.pt")
  save_torch_zip({"x": np.arange(60, dtype=np.float32).reshape(3, 4, 5),
                  "y": [np.arange(7), np.array(True), "s", 1.5, None],
                  "z": (np.zeros((0, 3), np.int8), np.float16(2))}, own)
  sources.append(own)
  tally = {"files": len(sources), "equal": 0, "different": 0, "refused": 0,
           "failures": [],
           "max_peak": 0}
  tracemalloc.start()
  for src in sources:
    good = open(src, "rb").read()
    want = load_torch(src)
    is_zip = good.startswith(b"PK")
    for case in range(n_per_file):
      data = bytearray(good)
      if case % 3 == 0:
        kind = "truncate"
        data = data[:rng.randrange(len(data))]
      else:
        kind = "flip"
        for _ in range(rng.randint(1, 4)):
          data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
      path = os.path.join(out_dir, f"case.pt")
      open(path, "wb").write(bytes(data))
      tracemalloc.reset_peak()
      try:
        got = load_torch(path)
        err = None
      except DataError as e:
        err = str(e)
      except BaseException as e:  # pylint: disable=broad-except
        tally["failures"].append(f"{src} {kind} {case}: {e!r}"[:300])
        continue
      peak = tracemalloc.get_traced_memory()[1]
      bound = 4 * len(data) + 2 * MiB  # copies: 2x size + 1 MiB; + overhead
      tally["max_peak"] = max(tally["max_peak"], peak)
      where = f"{os.path.basename(src)} {kind} {case}"
      if peak > bound:
        tally["failures"].append(f"{where}: peak {peak} > {bound}")
      if err is not None:
        tally["refused"] += 1
        if "MemoryError" in err or "\n" in err:
          tally["failures"].append(f"{where}: {err}")
      elif _same(want, got):
        tally["equal"] += 1
      else:
        tally["different"] += 1
        if kind == "truncate" or is_zip:  # zip records carry CRC-32s
          tally["failures"].append(f"{where}: wrong result, no error")
  print(json.dumps(tally))


def test_fuzzed_torch_files_are_right_or_refused(tmp_path):
  code = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "import test_hardening_readers as t; "
          "t.fuzz_main(sys.argv[2], 50, 1234)")
  env = dict(os.environ, OPENBLAS_NUM_THREADS="1", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-c", code, os.path.dirname(__file__), str(tmp_path)],
      capture_output=True, text=True, timeout=300, env=env, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  tally = json.loads(proc.stdout.strip().splitlines()[-1])
  assert tally["failures"] == [], tally["failures"][:10]
  total = tally["equal"] + tally["different"] + tally["refused"]
  assert tally["files"] == 6 and total == 6 * 50
  assert tally["refused"] > total // 2  # most mutations are caught
