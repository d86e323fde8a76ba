"""Split CIFAR-100 / CUB / miniImageNet readers on tiny files in real formats."""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from bcl_jax.data import cifar, cub, images, mini, prepare
from bcl_jax.data.errors import DataError

from data_helpers import _py2_style_pickle

HAVE_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None

# ``torch.manual_seed(s); torch.randperm(10).tolist()`` as printed by PyTorch.
TORCH_RANDPERM10 = {
    0: [4, 1, 7, 5, 3, 9, 0, 8, 6, 2],
    1: [5, 6, 1, 2, 0, 8, 9, 3, 7, 4],
    42: [2, 6, 1, 8, 4, 5, 0, 9, 3, 7],
    (1 << 32) + 1: [5, 6, 1, 2, 0, 8, 9, 3, 7, 4],
    (1 << 53) - 1: [1, 4, 6, 2, 0, 5, 8, 7, 9, 3],
}


# ------------------------------------------------- an independent oracle --


def _mt19937(seed: int):
  """Plain-Python MT19937 (init_genrand), yielding raw 32-bit outputs."""
  mt = [seed & 0xFFFFFFFF]
  for i in range(1, 624):
    mt.append((1812433253 * (mt[-1] ^ (mt[-1] >> 30)) + i) & 0xFFFFFFFF)
  while True:
    for i in range(624):
      y = (mt[i] & 0x80000000) | (mt[(i + 1) % 624] & 0x7FFFFFFF)
      mt[i] = mt[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
    for y in mt:
      y ^= y >> 11
      y ^= (y << 7) & 0x9D2C5680
      y ^= (y << 15) & 0xEFC60000
      yield y ^ (y >> 18)


def _oracle_randperm(n: int, seed: int) -> list[int]:
  gen, r = _mt19937(seed), list(range(n))
  for i in range(n - 1):
    j = i + next(gen) % (n - i)
    r[i], r[j] = r[j], r[i]
  return r


def _expected_split(y_tr, y_te, n_classes, seed, n_tasks=20, n_val=3):
  """Per task: (train rows, train labels, test rows, test labels), by hand."""
  perm = _oracle_randperm(n_classes, seed)
  cpt = n_classes // n_tasks
  out = []
  for t in range(n_tasks):
    classes = [c for c in range(n_classes) if t * cpt <= perm[c] < (t + 1) * cpt]
    shift = 0 if t < n_val else n_val * cpt
    entry = []
    for y in (y_tr, y_te):
      rows = [i for i, c in enumerate(y) if c in classes]
      entry += [rows, [perm[y[i]] - shift for i in rows]]
    out.append(entry)
  return out[:n_val], out[n_val:]


def _check_against(bench, expected, x_tr, x_te):
  assert bench.n_tasks == len(expected)
  for task, (r_tr, l_tr, r_te, l_te) in zip(bench.tasks, expected):
    np.testing.assert_array_equal(task.y_train, l_tr)
    np.testing.assert_array_equal(task.y_test, l_te)
    np.testing.assert_array_equal(task.x_train, x_tr[r_tr])
    np.testing.assert_array_equal(task.x_test, x_te[r_te])


# ------------------------------------------------------ shared machinery --


@pytest.mark.parametrize("seed", sorted(TORCH_RANDPERM10))
def test_torch_randperm_matches_torch(seed):
  assert images.torch_randperm(10, seed).tolist() == TORCH_RANDPERM10[seed]
  assert _oracle_randperm(10, seed) == TORCH_RANDPERM10[seed]


@pytest.mark.parametrize("n,seed", [(100, 0), (100, 7), (200, 0), (1, 3)])
def test_torch_randperm_matches_oracle(n, seed):
  assert images.torch_randperm(n, seed).tolist() == _oracle_randperm(n, seed)


def test_split_tasks_hand_example():
  # Original class c gets label perm[c]: 3->0, 1->1 | 5->2, 4->3 | 0->4, 2->5.
  perm = [4, 1, 5, 0, 3, 2]
  y_tr = np.array([0, 1, 2, 3, 4, 5, 5, 3, 1])
  y_te = np.array([5, 4, 3, 2, 1, 0])
  x_tr = np.arange(len(y_tr), dtype=np.uint8)[:, None].repeat(2, 1)
  x_te = 100 + np.arange(len(y_te), dtype=np.uint8)[:, None].repeat(2, 1)
  val, cl = images.split_tasks("toy", x_tr, y_tr, x_te, y_te, n_classes=6,
                               n_tasks=3, n_val_tasks=1, permutation=perm)
  assert (val.name, cl.name) == ("toy-val", "toy-cl")
  assert (val.n_outputs, cl.n_outputs) == (2, 4)
  assert val.task_incremental and cl.task_incremental
  (t0,), (t1, t2) = val.tasks, cl.tasks
  # Task 0: classes 1 and 3 (rows 1, 3, 7, 8), labels 0..1 unshifted.
  np.testing.assert_array_equal(t0.x_train[:, 0], [1, 3, 7, 8])
  np.testing.assert_array_equal(t0.y_train, [1, 0, 0, 1])
  np.testing.assert_array_equal(t0.x_test[:, 0], [102, 104])
  np.testing.assert_array_equal(t0.y_test, [0, 1])
  # Task 1: classes 4 and 5 -> labels 2, 3, shifted by 2 -> 0, 1.
  np.testing.assert_array_equal(t1.x_train[:, 0], [4, 5, 6])
  np.testing.assert_array_equal(t1.y_train, [1, 0, 0])
  np.testing.assert_array_equal(t1.y_test, [0, 1])
  # Task 2: classes 0 and 2 -> labels 4, 5, shifted -> 2, 3.
  np.testing.assert_array_equal(t2.x_train[:, 0], [0, 2])
  np.testing.assert_array_equal(t2.y_train, [2, 3])
  np.testing.assert_array_equal(t2.y_test, [3, 2])
  assert [t.descriptor for t in (t0, t1, t2)] == [(0, 2), (2, 4), (4, 6)]
  np.testing.assert_array_equal(cl.class_mask, [[1, 1, 0, 0], [0, 0, 1, 1]])
  assert t0.x_train.dtype == np.uint8


def test_split_tasks_rejects_bad_input():
  x, y = np.zeros((4, 2), np.uint8), np.array([0, 1, 2, 3])
  with pytest.raises(DataError, match="cannot be cut into 3 equal tasks"):
    images.split_tasks("toy", x, y, x, y, n_classes=4, n_tasks=3)
  with pytest.raises(DataError, match="expected \\[0, 2\\)"):
    images.split_tasks("toy", x, y, x, y, n_classes=2, n_tasks=2,
                       n_val_tasks=1)


def test_data_unpickler_refuses_code():
  class Evil:
    def __reduce__(self):
      return (os.system, ("true",))
  blob = pickle.dumps({"data": Evil()})
  with pytest.raises(DataError, match="should not"):
    images.load_data_pickle(io.BytesIO(blob), "evil.pkl")


# --------------------------------------------------------------- CIFAR-100 --


def _cifar_arrays(n_train=3, n_test=1):
  rng = np.random.default_rng(0)
  y_tr = np.repeat(np.arange(100), n_train)
  y_te = np.repeat(np.arange(100), n_test)
  y_tr, y_te = rng.permutation(y_tr), rng.permutation(y_te)
  x_tr = rng.integers(0, 256, (len(y_tr), 3072), dtype=np.uint8)
  x_te = rng.integers(0, 256, (len(y_te), 3072), dtype=np.uint8)
  return x_tr, y_tr, x_te, y_te


@pytest.fixture(scope="module")
def cifar_src(tmp_path_factory):
  root = tmp_path_factory.mktemp("cifar")
  x_tr, y_tr, x_te, y_te = arrays = _cifar_arrays()
  folder = root / "cifar-100-python"
  folder.mkdir()
  for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
    d = {b"filenames": [b"x.png"] * len(y), b"batch_label": split.encode(),
         b"fine_labels": [int(v) for v in y],
         b"coarse_labels": [int(v) // 5 for v in y], b"data": x}
    (folder / split).write_bytes(_py2_style_pickle(d))
  (folder / "meta").write_bytes(_py2_style_pickle({b"fine_label_names": []}))
  tarball = root / "cifar-100-python.tar.gz"
  with tarfile.open(tarball, "w:gz") as tar:
    tar.add(folder, arcname="cifar-100-python")
  return root, folder, tarball, arrays


def test_cifar_pickle_folder_and_tarball(cifar_src):
  root, folder, tarball, (x_tr, y_tr, x_te, y_te) = cifar_src
  for src in (folder, tarball, root, folder / "train"):
    got = cifar.read_cifar100(src, progress_bar=False)
    for a, b in zip(got, (x_tr, y_tr, x_te, y_te)):
      np.testing.assert_array_equal(a, b)
    assert got[0].dtype == np.uint8 and got[0].shape == (300, 3072)


@pytest.mark.parametrize("seed", [0, 5])
def test_cifar_split_matches_reference_convention(cifar_src, seed):
  _, _, tarball, (x_tr, y_tr, x_te, y_te) = cifar_src
  val, cl = cifar.build_cifar100(tarball, seed=seed, progress_bar=False)
  exp_val, exp_cl = _expected_split(y_tr.tolist(), y_te.tolist(), 100, seed)
  _check_against(val, exp_val, x_tr, x_te)
  _check_against(cl, exp_cl, x_tr, x_te)
  assert (val.name, val.n_tasks, val.n_outputs) == ("cifar-val", 3, 15)
  assert (cl.name, cl.n_tasks, cl.n_outputs) == ("cifar-cl", 17, 85)
  for b in (val, cl):
    assert b.task_incremental
    for t in range(b.n_tasks):  # task t owns columns [5t, 5t + 5)
      np.testing.assert_array_equal(b.head_columns(t), range(5 * t, 5 * t + 5))
  assert cl.tasks[0].descriptor == (15, 20)
  assert cl.tasks[0].x_train.shape == (15, 3072)


def test_cifar_gem_raw_pt(cifar_src, tmp_path):
  tp = pytest.importorskip("bcl_jax.data.torch_pickle")
  if not hasattr(tp, "save_torch_zip"):
    pytest.skip("bcl_jax.data.torch_pickle has no save_torch_zip writer")
  _, folder, _, arrays = cifar_src
  x_tr, y_tr, x_te, y_te = arrays
  pt = tmp_path / "cifar100.pt"
  tp.save_torch_zip((x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64)),
                    pt)
  for src in (pt, tmp_path):
    got = cifar.read_cifar100(src, progress_bar=False)
    for a, b in zip(got, arrays):
      np.testing.assert_array_equal(a, b)
  a_val, a_cl = cifar.build_cifar100(pt, seed=3, progress_bar=False)
  b_val, b_cl = cifar.build_cifar100(folder, seed=3, progress_bar=False)
  for a, b in ((a_val, b_val), (a_cl, b_cl)):
    for ta, tb in zip(a.tasks, b.tasks):
      np.testing.assert_array_equal(ta.x_train, tb.x_train)
      np.testing.assert_array_equal(ta.y_test, tb.y_test)


def test_reference_style_cifar_cl_pt_is_task_incremental(cifar_src, tmp_path):
  """A cifar-cl.pt as the reference writes it (float x) reads multi-head."""
  tp = pytest.importorskip("bcl_jax.data.torch_pickle")
  gem = pytest.importorskip("bcl_jax.data.gem")
  if not hasattr(tp, "save_torch_zip"):
    pytest.skip("bcl_jax.data.torch_pickle has no save_torch_zip writer")
  _, folder, _, _ = cifar_src
  _, cl = cifar.build_cifar100(folder, progress_bar=False)
  tr, te = [], []
  for t in cl.tasks:
    tr.append([t.descriptor, t.x_train.astype(np.float32) / 255,
               t.y_train.astype(np.int64)])
    te.append([t.descriptor, t.x_test.astype(np.float32) / 255,
               t.y_test.astype(np.int64)])
  path = tmp_path / "cifar-cl.pt"
  tp.save_torch_zip([tr, te], path)
  loaded = gem.load_gem(path)
  assert loaded.task_incremental and loaded.n_outputs == 85
  np.testing.assert_array_equal(loaded.class_mask, cl.class_mask)
  import bcl_jax.data as data_pkg
  if hasattr(data_pkg, "load_benchmark"):
    config = argparse.Namespace(data_path=str(tmp_path),
                                data_file="cifar-cl.pt", n_tasks=0)
    via_loader = data_pkg.load_benchmark(config)
    assert via_loader.task_incremental and via_loader.n_outputs == 85
    np.testing.assert_array_equal(via_loader.class_mask, cl.class_mask)


def test_cifar_errors(tmp_path, cifar_src):
  with pytest.raises(DataError, match="cs.toronto.edu/~kriz/cifar.html"):
    cifar.read_cifar100(tmp_path / "nope")
  with pytest.raises(DataError, match="holds no CIFAR-100 copy"):
    cifar.read_cifar100(tmp_path)
  c10 = tmp_path / "c10"
  c10.mkdir()
  for split in ("train", "test"):
    (c10 / split).write_bytes(_py2_style_pickle(
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}))
  with pytest.raises(DataError, match="fine_labels.*CIFAR-10"):
    cifar.read_cifar100(c10, progress_bar=False)
  broken = tmp_path / "cifar-100-python.tar.gz"
  broken.write_bytes(cifar_src[2].read_bytes()[:2000])
  with pytest.raises(DataError, match="re-download"):
    cifar.read_cifar100(broken, progress_bar=False)


@pytest.mark.skipif(HAVE_TFDS, reason="tensorflow_datasets is installed")
def test_tfds_missing_says_how_to_install(tmp_path):
  for read in (cifar.read_cifar100, cub.read_cub):
    with pytest.raises(DataError, match=r'pip install -e "\.\[tfds\]"'):
      read(f"tfds:{tmp_path}")


def test_images_imports_no_reader():
  """images.py is what cifar/cub/mini share: it must not import them."""
  import ast
  tree = ast.parse(open(images.__file__, encoding="utf-8").read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      names |= {node.module or ""} | {f"{node.module}.{a.name}"
                                      for a in node.names}
    elif isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
  for reader in ("cifar", "cub", "mini", "prepare"):
    assert not any(n.endswith(f"data.{reader}") for n in names), names


@pytest.mark.skipif(not HAVE_TFDS, reason="needs tensorflow_datasets (the "
                    "tfds extra)")
def test_tfds_cifar_and_cub_mock():
  """TFDS without TensorFlow: tfds.data_source over mock ArrayRecord data."""
  import sys
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=40):
    ref = tfds.data_source("cifar100", split="train")
    x_tr, y_tr, x_te, y_te = cifar.read_cifar100("tfds:", progress_bar=False)
    assert x_tr.shape == (40, 3072) and x_tr.dtype == np.uint8
    assert y_te.shape == (40,) and y_te.max() < 100
    for k in (0, 17, 39):  # HWC -> the pickle's channel-major rows
      img = np.asarray(ref[k]["image"])
      np.testing.assert_array_equal(x_tr[k].reshape(3, 32, 32),
                                    img.transpose(2, 0, 1))
      assert y_tr[k] == int(ref[k]["label"])
    birds = tfds.data_source("caltech_birds2011", split="test")
    x_tr, y_tr, x_te, y_te = cub.read_cub("tfds:", size=16,
                                          progress_bar=False)
    assert x_tr.shape == (40, 3, 16, 16) and y_tr.max() < 200
    from PIL import Image
    img = np.asarray(birds[3]["image"])
    want = np.asarray(Image.fromarray(img).resize((16, 16), Image.BILINEAR))
    np.testing.assert_array_equal(x_te[3], want.transpose(2, 0, 1))
    np.testing.assert_array_equal(
        y_te, [int(birds[k]["label"]) for k in range(len(birds))])
  assert "tensorflow" not in sys.modules


# -------------------------------------------------------------------- CUB --


def _cub_color(c: int, train: bool) -> tuple[int, int, int]:
  return (c, 255 - c, 40 if train else 200)


@pytest.fixture(scope="module")
def cub_src(tmp_path_factory):
  root = tmp_path_factory.mktemp("cub") / "CUB_200_2011"
  lines = {"images.txt": [], "image_class_labels.txt": [],
           "train_test_split.txt": []}
  expected = {"train": [], "test": []}
  i = 0
  for c in range(200):
    cls = f"{c + 1:03d}.Bird_{c}"
    (root / "images" / cls).mkdir(parents=True)
    for train in (c % 2 == 0, c % 2 == 1):  # train/test order alternates
      i += 1
      rel = f"{cls}/Bird_{i:04d}.jpg"
      color = _cub_color(c, train)
      if c == 7 and train:  # CUB holds a few grey-scale JPEGs
        Image.new("L", (8, 6), 90).save(root / "images" / rel)
        color = (90, 90, 90)
      else:
        Image.new("RGB", (8, 6), color).save(root / "images" / rel,
                                             quality=95)
      lines["images.txt"].append(f"{i} {rel}")
      lines["image_class_labels.txt"].append(f"{i} {c + 1}")
      lines["train_test_split.txt"].append(f"{i} {int(train)}")
      expected["train" if train else "test"].append((c, color))
  for name, rows in lines.items():
    (root / name).write_text("\n".join(rows) + "\n")
  return root, expected


def test_cub_folder(cub_src):
  root, expected = cub_src
  x_tr, y_tr, x_te, y_te = cub.read_cub(root.parent, size=12,
                                        progress_bar=False)
  assert x_tr.shape == (200, 3, 12, 12) and x_tr.dtype == np.uint8
  for x, y, exp in ((x_tr, y_tr, expected["train"]),
                    (x_te, y_te, expected["test"])):
    np.testing.assert_array_equal(y, [c for c, _ in exp])
    centre = x[:, :, 6, 6].astype(int)
    assert np.abs(centre - np.array([col for _, col in exp])).max() <= 4


def test_cub_tgz_reads_like_the_folder(cub_src, tmp_path):
  root, _ = cub_src
  tgz = tmp_path / "CUB_200_2011.tgz"
  with tarfile.open(tgz, "w:gz") as tar:
    tar.add(root, arcname="CUB_200_2011")
  want = cub.read_cub(root, size=6, progress_bar=False)
  for src in (tgz, tmp_path):
    got = cub.read_cub(src, size=6, progress_bar=False)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)
  assert os.listdir(tmp_path) == ["CUB_200_2011.tgz"]  # extraction removed


def test_cub_split(cub_src):
  root, expected = cub_src
  val, cl = cub.build_cub(root, seed=1, size=4, progress_bar=False)
  y_tr = [c for c, _ in expected["train"]]
  y_te = [c for c, _ in expected["test"]]
  x_tr, _, x_te, _ = cub.read_cub(root, size=4, progress_bar=False)
  exp_val, exp_cl = _expected_split(y_tr, y_te, 200, seed=1)
  _check_against(val, exp_val, x_tr, x_te)
  _check_against(cl, exp_cl, x_tr, x_te)
  assert (val.n_outputs, cl.n_outputs, cl.n_tasks) == (30, 170, 17)
  np.testing.assert_array_equal(cl.head_columns(16), range(160, 170))
  assert val.input_shape == (3, 4, 4)


def test_cub_errors(tmp_path, cub_src):
  with pytest.raises(DataError, match="Caltech-UCSD Birds-200-2011"):
    cub.read_cub(tmp_path / "CUB_200_2011")
  with pytest.raises(DataError, match="holds no images.txt"):
    cub.read_cub(tmp_path)
  tgz = tmp_path / "CUB_200_2011.tgz"
  tgz.write_bytes(b"")
  with pytest.raises(DataError, match="not a readable tar archive"):
    cub.read_cub(tgz)
  assert os.listdir(tmp_path) == ["CUB_200_2011.tgz"]  # no extraction left
  other = tmp_path / "other.tgz"
  with tarfile.open(other, "w:gz") as tar:
    tar.add(cub_src[0] / "images.txt", arcname="images.txt")
  with pytest.raises(DataError, match="holds no CUB_200_2011/images.txt"):
    cub.read_cub(other)
  bad = tmp_path / "bad"
  bad.mkdir()
  root, _ = cub_src
  for name in ("images.txt", "image_class_labels.txt"):
    (bad / name).write_text((root / name).read_text())
  with pytest.raises(DataError, match="train_test_split.txt: missing"):
    cub.read_cub(bad)
  (bad / "train_test_split.txt").write_text(
      (root / "train_test_split.txt").read_text())
  with pytest.raises(DataError, match="image file missing"):
    cub.read_cub(bad, size=4, progress_bar=False)


# ----------------------------------------------------------- miniImageNet --


def _mini_names():
  rng = np.random.default_rng(1)
  return [f"n{v:08d}" for v in rng.choice(10**8, 100, replace=False)]


@pytest.fixture(scope="module")
def mini_caches(tmp_path_factory):
  """100 classes x 3 images of 8x8 in 64/16/20-class caches."""
  root = tmp_path_factory.mktemp("mini")
  names = _mini_names()
  rng = np.random.default_rng(2)
  per_class = {}
  for split, cls in (("train", names[:64]), ("val", names[64:80]),
                     ("test", names[80:])):
    n = 3 * len(cls)
    data = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    rows = rng.permutation(n).reshape(len(cls), 3)
    class_dict = {name: [int(r) for r in rows[k]] for k, name in
                  enumerate(cls)}
    for name in cls:
      per_class[name] = data[class_dict[name]].transpose(0, 3, 1, 2)
    with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
      pickle.dump({"image_data": data, "class_dict": class_dict}, f,
                  protocol=4)
  return root, per_class


def test_mini_caches(mini_caches):
  root, per_class = mini_caches
  (x_tr, y_tr, x_te, y_te), names = mini.read_mini(
      root, n_train_per_class=2, size=8, progress_bar=False)
  assert names == sorted(per_class)
  assert x_tr.shape == (200, 3, 8, 8) and x_te.shape == (100, 3, 8, 8)
  for k, name in enumerate(names):
    np.testing.assert_array_equal(x_tr[y_tr == k], per_class[name][:2])
    np.testing.assert_array_equal(x_te[y_te == k], per_class[name][2:])
  val, cl = mini.build_mini(root / "mini-imagenet-cache-val.pkl", seed=4,
                            n_train_per_class=2, size=8, progress_bar=False)
  exp_val, exp_cl = _expected_split(y_tr.tolist(), y_te.tolist(), 100, 4)
  _check_against(val, exp_val, x_tr, x_te)
  _check_against(cl, exp_cl, x_tr, x_te)
  assert (val.name, cl.name, cl.n_outputs) == ("mini-val", "mini-cl", 85)
  # The cache images are resized when --size differs.
  (x_small, *_), _ = mini.read_mini(root, n_train_per_class=2, size=4,
                                    progress_bar=False)
  assert x_small.shape == (200, 3, 4, 4)


def test_mini_image_folders(tmp_path):
  root = tmp_path / "mini"
  colors = {}
  for k in range(10):
    split = ("train", "val", "test")[k % 3]
    folder = root / split / f"n{k:08d}"
    folder.mkdir(parents=True)
    for i in range(4):
      colors[k, i] = (20 * k, 60 * i, 100)
      Image.new("RGB", (10, 10), colors[k, i]).save(folder / f"im_{i}.png")
  (x_tr, y_tr, x_te, y_te), names = mini.read_mini(
      root, n_train_per_class=3, size=8, progress_bar=False)
  assert names == [f"n{k:08d}" for k in range(10)]
  np.testing.assert_array_equal(y_tr, np.repeat(np.arange(10), 3))
  np.testing.assert_array_equal(y_te, np.arange(10))
  assert np.abs(x_tr[4, :, 4, 4].astype(int) - colors[1, 1]).max() <= 1
  assert np.abs(x_te[5, :, 4, 4].astype(int) - colors[5, 3]).max() <= 1
  val, cl = mini.build_mini(root, seed=0, size=8, n_train_per_class=3,
                            n_tasks=5, n_val_tasks=1, progress_bar=False)
  exp_val, exp_cl = _expected_split(y_tr.tolist(), y_te.tolist(), 10, 0,
                                    n_tasks=5, n_val=1)
  _check_against(val, exp_val, x_tr, x_te)
  _check_against(cl, exp_cl, x_tr, x_te)


def test_mini_errors(tmp_path, mini_caches):
  with pytest.raises(DataError, match="mini-imagenet-cache"):
    mini.read_mini(tmp_path / "nope")
  with pytest.raises(DataError, match="neither"):
    mini.read_mini(tmp_path)
  part = tmp_path / "part"
  part.mkdir()
  root, _ = mini_caches
  (part / "mini-imagenet-cache-train.pkl").write_bytes(
      (root / "mini-imagenet-cache-train.pkl").read_bytes())
  with pytest.raises(DataError, match="cache-val.pkl: missing"):
    mini.read_mini(part)
  with pytest.raises(DataError, match="has 3 images.*n_train_per_class=500"):
    mini.read_mini(root, progress_bar=False)


# -------------------------------------------------------------------- CLI --


def test_cli_subcommands(cifar_src, cub_src, mini_caches, tmp_path):
  npz = pytest.importorskip("bcl_jax.data.npz")
  parser = argparse.ArgumentParser()
  prepare.add_subcommands(parser.add_subparsers(dest="command"))
  out = tmp_path / "out"
  runs = [
      (["cifar100", "--source", str(cifar_src[2])], "cifar",
       cifar.build_cifar100(cifar_src[2], seed=2, progress_bar=False)),
      (["cub", "--source", str(cub_src[0]), "--size", "4"], "cub",
       cub.build_cub(cub_src[0], seed=2, size=4, progress_bar=False)),
      (["mini", "--source", str(mini_caches[0]), "--size", "8",
        "--train-per-class", "2"], "mini",
       mini.build_mini(mini_caches[0], seed=2, size=8, n_train_per_class=2,
                       progress_bar=False)),
  ]
  for argv, prefix, expected in runs:
    args = parser.parse_args(argv + ["--out-dir", str(out), "--seed", "2",
                                     "--quiet"])
    assert args.func(args) is None
    for part, exp in zip(("val", "cl"), expected):
      got = npz.load_npz(out / f"{prefix}-{part}.npz")
      assert got.name == exp.name and got.task_incremental
      assert got.n_outputs == exp.n_outputs
      np.testing.assert_array_equal(got.class_mask, exp.class_mask)
      for tg, te in zip(got.tasks, exp.tasks):
        assert tg.x_train.dtype == np.uint8
        np.testing.assert_array_equal(tg.x_train, te.x_train)
        np.testing.assert_array_equal(tg.y_test, te.y_test)
