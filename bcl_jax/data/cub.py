"""Split CUB-200-2011 (the reference's ``cub-cl.pt``; it ships no script).

Sources:

- the official ``CUB_200_2011.tgz`` (extracted to a temporary folder), or
  the extracted ``CUB_200_2011`` folder (``images.txt``,
  ``image_class_labels.txt``, ``train_test_split.txt``,
  ``images/<class>/<file>.jpg``) from the Caltech-UCSD Birds-200-2011 page,
  https://www.vision.caltech.edu/datasets/cub_200_2011/ (the official
  train/test split: 5994 / 5794 images);
- ``tfds:DIR``, a TensorFlow Datasets data dir holding ``caltech_birds2011``
  (needs the ``tfds`` extra).

Every image is converted to RGB and resized to ``size x size`` (224, bilinear,
aspect ratio not kept), stored uint8 ``[N, 3, size, size]``. Images are decoded
one by one into preallocated arrays, so the full dataset peaks at about twice
its uint8 size (~3.6 GB at 224: the arrays plus the per-task copies).
Samples keep ``images.txt`` order (image id). The split is the one of
:mod:`bcl_jax.data.images`: 200 classes relabelled by
``torch_randperm(200, seed)``, 20 tasks of 10, tasks 0-2 -> ``cub-val``
(labels 0..29), tasks 3-19 -> ``cub-cl`` (labels 0..169).
"""

from __future__ import annotations

import os
import tarfile
from typing import Any

import numpy as np

from bcl_jax.data.benchmark import Benchmark
from bcl_jax.data.errors import DataError
from bcl_jax.data import images

CUB_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
_FIX = ("download CUB_200_2011.tgz from the Caltech-UCSD Birds-200-2011 "
        f"page {CUB_URL} and pass it, or the CUB_200_2011 folder it extracts "
        "to (with images.txt, image_class_labels.txt, train_test_split.txt, "
        "images/), or tfds:DIR for a TFDS data dir holding caltech_birds2011")
_META = ("images.txt", "image_class_labels.txt", "train_test_split.txt")

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _read_table(path: str) -> dict[int, str]:
  """Reads ``<id> <value>`` lines into ``{id: value}``."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: missing; extract CUB_200_2011.tgz from "
                    f"{CUB_URL} completely")
  table = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = line.split(maxsplit=1)
      try:
        table[int(parts[0])] = parts[1].strip()
      except (ValueError, IndexError):
        raise DataError(f"{path}:{n}: expected '<image id> <value>', got "
                        f"{line.strip()!r}; re-extract it from {CUB_URL}"
                        ) from None
  return table


def read_cub_folder(folder: str, size: int = 224,
                    progress_bar: bool = True) -> Arrays:
  """Reads the official ``CUB_200_2011`` folder.

  Returns:
    ``(x_tr uint8 [N, 3, size, size], y_tr int64, x_te, y_te)``, labels
    ``class id - 1`` in ``[0, 200)``, samples in image-id order.
  """
  paths, labels, is_train = (_read_table(os.path.join(folder, name))
                             for name in _META)
  ids = sorted(paths)
  if set(labels) != set(ids) or set(is_train) != set(ids):
    raise DataError(f"{folder}: images.txt, image_class_labels.txt and "
                    "train_test_split.txt list different image ids; "
                    f"re-extract CUB_200_2011.tgz from {CUB_URL}")
  try:
    y = np.array([int(labels[i]) - 1 for i in ids], np.int64)
    train = np.array([int(is_train[i]) == 1 for i in ids])
  except ValueError:
    raise DataError(f"{folder}: non-integer class or split entries; "
                    f"re-extract CUB_200_2011.tgz from {CUB_URL}") from None
  if y.min() < 0:
    raise DataError(f"{folder}: image_class_labels.txt has class ids < 1")
  x = {s: np.empty((int(m.sum()), 3, size, size), np.uint8)
       for s, m in (("train", train), ("test", ~train))}
  slot = {"train": 0, "test": 0}
  image_dir = os.path.join(folder, "images")
  for k in images.progress(range(len(ids)), total=len(ids), desc="cub images",
                           enabled=progress_bar, unit="img"):
    path = os.path.join(image_dir, paths[ids[k]])
    s = "train" if train[k] else "test"
    x[s][slot[s]] = images.decode_image(path, size, path)
    slot[s] += 1
  return x["train"], y[train], x["test"], y[~train]


def read_cub_tfds(data_dir: str | None, size: int = 224,
                  progress_bar: bool = True) -> Arrays:
  """Reads ``caltech_birds2011`` from a TFDS data dir (no download)."""
  from PIL import Image
  where = data_dir or "the default TFDS data dir"
  out = []
  for split in ("train", "test"):
    n, examples = images.tfds_examples(
        "caltech_birds2011", split, data_dir,
        f"pass the CUB_200_2011 folder from {CUB_URL}")
    x = np.empty((n, 3, size, size), np.uint8)
    y = np.empty((n,), np.int64)
    k = 0
    for ex in images.progress(examples, total=n, desc=f"cub {split}",
                              enabled=progress_bar, unit="img"):
      img = np.asarray(ex["image"])
      if img.ndim == 2:
        img = img[..., None]
      if img.ndim != 3 or k >= n:
        raise DataError(f"{where}: a caltech_birds2011/{split} image has "
                        f"shape {img.shape}, expected [H, W, C]")
      if img.shape[-1] == 1:  # grey-scale -> RGB, as decode_image does
        img = np.repeat(img, 3, axis=-1)
      im = Image.fromarray(img[..., :3].astype(np.uint8))
      if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
      x[k] = np.asarray(im).transpose(2, 0, 1)
      y[k] = int(ex["label"])
      k += 1
    if not k:
      raise DataError(f"{where}: caltech_birds2011/{split} is empty")
    out += [x[:k], y[:k]]
  return tuple(out)


def _extract_member(tar: Any, member: Any, dest: str, path: str) -> None:
  """Extracts one regular file or folder of ``tar`` safely under ``dest``."""
  if hasattr(tarfile, "data_filter"):
    # The 'data' filter refuses absolute paths, links out of the folder and
    # device files.
    tar.extract(member, dest, filter="data")
    return
  # Pythons without extraction filters: only plain files and folders with
  # relative names that stay inside ``dest``.
  target = os.path.realpath(os.path.join(dest, member.name))
  if (not (member.isfile() or member.isdir()) or os.path.isabs(member.name)
      or not target.startswith(os.path.realpath(dest) + os.sep)):
    raise DataError(f"{path}: refusing member {member.name!r} (a link, "
                    "device or path outside the archive's folder); is this "
                    f"CUB_200_2011.tgz from {CUB_URL}?")
  tar.extract(member, dest)


def read_cub_archive(path: str, size: int = 224,
                     progress_bar: bool = True) -> Arrays:
  """Reads the official ``CUB_200_2011.tgz``.

  The archive is extracted into a temporary folder beside it (about 1.2 GB
  for the real one), read, and the folder is removed whatever happens.
  """
  import shutil
  import tempfile
  folder = os.path.dirname(os.path.abspath(path))
  tmp = tempfile.mkdtemp(prefix=".cub-extract-", dir=folder)
  try:
    try:
      with tarfile.open(path, "r:*") as tar:
        members = tar.getmembers()
        for m in images.progress(members, total=len(members),
                                 desc="extracting CUB", enabled=progress_bar,
                                 unit="file"):
          _extract_member(tar, m, tmp, path)
    except (tarfile.TarError, OSError, EOFError) as e:
      raise DataError(f"{path}: not a readable tar archive ({e}); "
                      f"re-download CUB_200_2011.tgz from {CUB_URL}") from None
    inner = os.path.join(tmp, "CUB_200_2011")
    if not os.path.isfile(os.path.join(inner, "images.txt")):
      raise DataError(f"{path}: holds no CUB_200_2011/images.txt; is this "
                      f"CUB_200_2011.tgz from {CUB_URL}?")
    return read_cub_folder(inner, size, progress_bar)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def read_cub(source: str | os.PathLike, size: int = 224,
             progress_bar: bool = True) -> Arrays:
  """Reads CUB-200-2011 from the archive, the folder or ``tfds:DIR``.

  A folder without ``images.txt`` is searched for a ``CUB_200_2011``
  subfolder, then ``CUB_200_2011.tgz``, then a TFDS ``caltech_birds2011``
  subfolder.

  Raises:
    DataError: missing or malformed source, saying what to put where.
  """
  is_tfds, path = images.split_tfds_source(source)
  if is_tfds:
    return read_cub_tfds(path, size, progress_bar)
  if not os.path.exists(path):
    raise DataError(f"{path}: not found; {_FIX}")
  if os.path.isfile(path):
    if path.endswith((".tgz", ".tar.gz", ".tar")):
      return read_cub_archive(path, size, progress_bar)
    raise DataError(f"{path}: is a file, not the CUB_200_2011 folder; {_FIX}")
  if os.path.isfile(os.path.join(path, "images.txt")):
    return read_cub_folder(path, size, progress_bar)
  if os.path.isdir(os.path.join(path, "CUB_200_2011")):
    return read_cub(os.path.join(path, "CUB_200_2011"), size, progress_bar)
  if os.path.isfile(os.path.join(path, "CUB_200_2011.tgz")):
    return read_cub_archive(os.path.join(path, "CUB_200_2011.tgz"), size,
                            progress_bar)
  if os.path.isdir(os.path.join(path, "caltech_birds2011")):
    return read_cub_tfds(path, size, progress_bar)
  raise DataError(f"{path}: holds no images.txt; {_FIX}")


def build_cub(source: str | os.PathLike, seed: int = 0, size: int = 224,
              n_tasks: int = 20, n_val_tasks: int = 3,
              progress_bar: bool = True) -> tuple[Benchmark, Benchmark]:
  """Split CUB-200-2011: ``(cub-val, cub-cl)``.

  Args:
    source: see :func:`read_cub`.
    seed: seed of the class permutation.
    size: output height and width (224 as in the paper; tests use less).
    n_tasks: tasks of ``n_classes // n_tasks`` classes (20 -> 10 each).
    n_val_tasks: leading tasks kept for cross-validation (3).
    progress_bar: show a tqdm bar while decoding.

  Returns:
    Task-incremental benchmarks, x uint8 ``[N, 3, size, size]``.
  """
  x_tr, y_tr, x_te, y_te = read_cub(source, size, progress_bar)
  n_classes = int(max(y_tr.max(), y_te.max())) + 1
  return images.split_tasks("cub", x_tr, y_tr, x_te, y_te,
                            n_classes=n_classes, seed=seed, n_tasks=n_tasks,
                            n_val_tasks=n_val_tasks, source=os.fspath(source))
