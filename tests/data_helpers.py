"""Shared pieces of the data and end-to-end tests: configs of the shipped
benchmark files, the prepare_data script, and small files written in the
exact formats of the real sources (CIFAR pickles, CUB folders, miniImageNet
caches, the reference's cifar-cl.pt)."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import struct

import numpy as np
from PIL import Image

from bcl_jax.config import load_config_file, resolve
from bcl_jax.data import torch_pickle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name: str):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(REPO, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config(benchmark: str, variant: str = "quick", **overrides):
  """A benchmark config, resolved (the method's fields filled in)."""
  c = load_config_file(os.path.join(REPO, "configs", f"{benchmark}.py")
                       + (f":{variant}" if variant else ""))
  c.progress = False
  c.heatmap = False
  c.checkpoint = False
  if variant == "quick":  # smaller still: 2 batches per task, tiny test sets
    overrides = {"use": 20, "eval_batch_size": 10, **overrides}
  for k, v in overrides.items():
    c[k] = v
  return resolve(c)


def _prepare(*argv: str) -> None:
  quiet = ["--quiet"] if argv[0] in ("cifar100", "cub", "mini") else []
  assert _script("prepare_data").main([*argv, *quiet]) == 0


def _check_results(res: dict, n_tasks: int) -> None:
  acc = np.asarray(res["accuracy_matrix"])
  assert acc.shape == (n_tasks, n_tasks)
  assert np.all((acc >= 0) & (acc <= 1))
  for k in ("acc", "fm", "la"):
    assert np.isfinite(res["metrics"][k])


# ----------------------------------------------------------- generators --


def write_cifar_pickles(root, n_train: int = 10, n_test: int = 2):
  """``cifar-100-python/{train,test}``: uint8 [N, 3072] + fine labels."""
  folder = root / "cifar-100-python"
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for split, n in (("train", n_train), ("test", n_test)):
    y = rng.permutation(np.repeat(np.arange(100), n))
    x = rng.integers(0, 256, (len(y), 3072), np.uint8)
    x[:, :1024] = (y * 2)[:, None]  # a learnable red plane
    with open(folder / split, "wb") as f:
      pickle.dump({"data": x, "fine_labels": y.tolist(),
                   "coarse_labels": (y // 5).tolist()}, f, protocol=2)
  return folder


def write_cub_folder(root, n_per_split: int = 2):
  """``CUB_200_2011`` with the three index files and tiny JPEGs."""
  cub = root / "CUB_200_2011"
  lines = {"images.txt": [], "image_class_labels.txt": [],
           "train_test_split.txt": []}
  i = 0
  for c in range(200):
    cls = f"{c + 1:03d}.Bird_{c}"
    (cub / "images" / cls).mkdir(parents=True)
    for train in [1] * n_per_split + [0] * n_per_split:
      i += 1
      rel = f"{cls}/Bird_{i:05d}.jpg"
      Image.new("RGB", (12, 9), (c, 255 - c, 60 + 100 * train)).save(
          cub / "images" / rel, quality=90)
      lines["images.txt"].append(f"{i} {rel}")
      lines["image_class_labels.txt"].append(f"{i} {c + 1}")
      lines["train_test_split.txt"].append(f"{i} {train}")
  for name, rows in lines.items():
    (cub / name).write_text("\n".join(rows) + "\n")
  return cub


def write_mini_caches(root, per_class: int = 3, side: int = 84):
  """``mini-imagenet-cache-{train,val,test}.pkl`` (64 / 16 / 20 classes)."""
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(3)
  names = [f"n{k:08d}" for k in range(100)]
  for split, cls in (("train", names[:64]), ("val", names[64:80]),
                     ("test", names[80:])):
    n = per_class * len(cls)
    data = rng.integers(0, 256, (n, side, side, 3), np.uint8)
    class_dict = {name: list(range(k * per_class, (k + 1) * per_class))
                  for k, name in enumerate(cls)}
    with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
      pickle.dump({"image_data": data, "class_dict": class_dict}, f,
                  protocol=4)
  return root


def write_reference_cifar_cl_pt(bench, path) -> None:
  """``cifar-cl.pt`` as the reference writes it: float x [N, 3072] in [0, 1]."""
  tr, te = [], []
  for t in bench.tasks:
    tr.append([t.descriptor, t.x_train.astype(np.float32) / 255,
               t.y_train.astype(np.int64)])
    te.append([t.descriptor, t.x_test.astype(np.float32) / 255,
               t.y_test.astype(np.int64)])
  torch_pickle.save_torch_zip([tr, te], path)


class _Py2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes ``bytes`` as Python 2 ``str`` opcodes, as cPickle did."""

  dispatch = pickle._Pickler.dispatch.copy()  # pylint: disable=protected-access

  def _save_py2_str(self, obj):
    if len(obj) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
    self.memoize(obj)

  dispatch[bytes] = _save_py2_str


def _py2_style_pickle(obj) -> bytes:
  """A Python 2 / numpy 1.x protocol-2 pickle, as the official files are."""
  buf = io.BytesIO()
  _Py2Pickler(buf, protocol=2).dump(obj)
  blob = buf.getvalue().replace(b"numpy._core.multiarray",
                                b"numpy.core.multiarray")
  assert b"_codecs" not in blob
  return blob
