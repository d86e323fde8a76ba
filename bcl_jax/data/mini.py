"""Split miniImageNet (the reference's ``mini-cl.pt``; it ships no script).

Sources:

- a folder with the pickle caches ``mini-imagenet-cache-train.pkl``,
  ``-val.pkl`` and ``-test.pkl`` used by many few-shot repositories (each a
  dict with ``image_data`` uint8 ``[N, 84, 84, 3]`` and ``class_dict``
  ``{class name: [row indices]}``; 64 + 16 + 20 classes of 600 images);
- a folder of class subfolders of images (``<root>/<class>/*.jpg``), or of
  ``train`` / ``val`` / ``test`` folders of class subfolders; images are
  resized to ``size x size`` (84, Lanczos, as the common preparation script
  does) and files are taken in sorted name order.

All 100 classes are pooled and numbered in sorted class-name order (so
the result does not depend on which few-shot split a class came from). The
per-class train/test split is fixed: **the first ``n_train_per_class`` (500)
images of each class -> train, the remaining ones (100) -> test**, "first"
meaning the order of the class's ``class_dict`` index list (caches) or the
sorted file names (folders). Then the split of :mod:`bcl_jax.data.images`:
classes relabelled by ``torch_randperm(100, seed)``, 20 tasks of 5, tasks 0-2
-> ``mini-val`` (labels 0..14), tasks 3-19 -> ``mini-cl`` (labels 0..84).
x is uint8 ``[N, 3, size, size]``.
"""

from __future__ import annotations

import os

import numpy as np

from bcl_jax.data.benchmark import Benchmark
from bcl_jax.data.errors import DataError
from bcl_jax.data import images

CACHE_NAMES = tuple(f"mini-imagenet-cache-{s}.pkl"
                    for s in ("train", "val", "test"))
_FIX = ("put the miniImageNet pickle caches used by many few-shot "
        "repositories (e.g. the ones learn2learn downloads), "
        "mini-imagenet-cache-{train,val,test}.pkl, in one folder and pass "
        "it, or pass a folder of class subfolders of images")
_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp")

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _alloc(n_classes: int, n_train: int, n_test: int,
           size: int) -> Arrays:
  return (np.empty((n_classes * n_train, 3, size, size), np.uint8),
          np.repeat(np.arange(n_classes, dtype=np.int64), n_train),
          np.empty((n_test, 3, size, size), np.uint8),
          np.empty((n_test,), np.int64))


def _too_few(where: str, name: str, n: int, n_train: int) -> DataError:
  return DataError(f"{where}: class {name} has {n} images, but the split "
                   f"needs more than n_train_per_class={n_train} (the first "
                   f"{n_train} train, the rest test); the copy is incomplete")


def read_caches(folder: str, n_train_per_class: int = 500, size: int = 84,
                progress_bar: bool = True) -> tuple[Arrays, list[str]]:
  """Reads the three pickle caches in ``folder``.

  Returns:
    ``((x_tr, y_tr, x_te, y_te), class_names)``; label ``k`` is
    ``class_names[k]`` (sorted).
  """
  paths = [os.path.join(folder, n) for n in CACHE_NAMES]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise DataError(f"{missing[0]}: missing; put all of "
                    f"{', '.join(CACHE_NAMES)} (the miniImageNet pickle "
                    f"caches used by many few-shot repositories) in {folder}")
  # Load one cache at a time and keep only per-class copies of its rows, so
  # at most one cache plus the pieces (~1.3 GB in all) are held at once.
  pieces: dict[str, np.ndarray] = {}
  for path in paths:
    with open(path, "rb") as f:
      with images.ProgressReader(f, os.path.getsize(path),
                                 os.path.basename(path), progress_bar) as r:
        cache = images.load_data_pickle(r, path)
    data = np.asarray(images.get_key(cache, "image_data", path))
    class_dict = images.get_key(cache, "class_dict", path)
    if data.ndim != 4 or data.shape[-1] != 3 or data.dtype != np.uint8:
      raise DataError(f"{path}: image_data is {data.dtype} {data.shape}, "
                      "expected uint8 [N, H, W, 3]; is this a miniImageNet "
                      "cache?")
    if not isinstance(class_dict, dict):
      raise DataError(f"{path}: class_dict is a {type(class_dict).__name__}, "
                      "expected {class name: [indices]}")
    for name, rows in class_dict.items():
      name = name.decode() if isinstance(name, bytes) else str(name)
      if name in pieces:
        raise DataError(f"{path}: class {name} also appears in another cache; "
                        "the three caches must hold disjoint classes")
      rows = np.asarray(rows, np.int64).reshape(-1)
      if rows.size and (rows.min() < 0 or rows.max() >= len(data)):
        raise DataError(f"{path}: class_dict rows of {name} exceed the "
                        f"{len(data)} images; the cache is damaged")
      if rows.size <= n_train_per_class:
        raise _too_few(path, name, rows.size, n_train_per_class)
      pieces[name] = data[rows]
    del cache, data
  names = sorted(pieces)
  n_test = sum(len(pieces[n]) - n_train_per_class for n in names)
  x_tr, y_tr, x_te, y_te = _alloc(len(names), n_train_per_class, n_test, size)
  j = 0
  for k, name in enumerate(images.progress(names, desc="mini classes",
                                           enabled=progress_bar)):
    imgs = pieces.pop(name)
    if imgs.shape[1:3] != (size, size):
      from PIL import Image
      imgs = np.stack([np.asarray(Image.fromarray(im).resize(
          (size, size), Image.LANCZOS)) for im in imgs])
    imgs = imgs.transpose(0, 3, 1, 2)
    x_tr[k * n_train_per_class:(k + 1) * n_train_per_class] = (
        imgs[:n_train_per_class])
    rest = len(imgs) - n_train_per_class
    x_te[j:j + rest] = imgs[n_train_per_class:]
    y_te[j:j + rest] = k
    j += rest
  return (x_tr, y_tr, x_te, y_te), names


def _class_folders(root: str) -> dict[str, str]:
  """``{class name: folder}`` for ``root/<class>`` or ``root/<split>/<class>``."""
  subdirs = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d)))
  if subdirs and set(subdirs) <= {"train", "val", "test"}:
    out = {}
    for s in subdirs:
      for name, path in _class_folders(os.path.join(root, s)).items():
        if name in out:
          raise DataError(f"{path}: class {name} is in two split folders; "
                          "they must hold disjoint classes")
        out[name] = path
    return out
  return {d: os.path.join(root, d) for d in subdirs}


def read_image_folders(root: str, n_train_per_class: int = 500,
                       size: int = 84, progress_bar: bool = True
                       ) -> tuple[Arrays, list[str]]:
  """Reads a folder of class subfolders of images (see the module docstring)."""
  folders = _class_folders(root)
  if not folders:
    raise DataError(f"{root}: holds neither {', '.join(CACHE_NAMES)} nor "
                    "class subfolders; " + _FIX)
  names = sorted(folders)
  files = {}
  for name in names:
    fs = sorted(f for f in os.listdir(folders[name])
                if f.lower().endswith(_IMAGE_EXT))
    if len(fs) <= n_train_per_class:
      raise _too_few(folders[name], name, len(fs), n_train_per_class)
    files[name] = [os.path.join(folders[name], f) for f in fs]
  n_test = sum(len(files[n]) - n_train_per_class for n in names)
  x_tr, y_tr, x_te, y_te = _alloc(len(names), n_train_per_class, n_test, size)
  from PIL import Image
  todo = [(k, i, p) for k, n in enumerate(names)
          for i, p in enumerate(files[n])]
  j = 0
  for k, i, path in images.progress(todo, desc="mini images",
                                    enabled=progress_bar, unit="img"):
    img = images.decode_image(path, size, path, Image.LANCZOS)
    if i < n_train_per_class:
      x_tr[k * n_train_per_class + i] = img
    else:
      x_te[j], y_te[j] = img, k
      j += 1
  return (x_tr, y_tr, x_te, y_te), names


def read_mini(source: str | os.PathLike, n_train_per_class: int = 500,
              size: int = 84, progress_bar: bool = True
              ) -> tuple[Arrays, list[str]]:
  """Reads miniImageNet from the pickle caches or from image folders.

  Raises:
    DataError: missing or malformed source, saying what to put where.
  """
  path = os.fspath(source)
  if not os.path.exists(path):
    raise DataError(f"{path}: not found; {_FIX}")
  if os.path.isfile(path):
    if os.path.basename(path) in CACHE_NAMES:
      path = os.path.dirname(path) or "."
    else:
      raise DataError(f"{path}: is a file, not a folder; {_FIX}")
  present = [n for n in CACHE_NAMES if os.path.isfile(os.path.join(path, n))]
  if present:
    return read_caches(path, n_train_per_class, size, progress_bar)
  return read_image_folders(path, n_train_per_class, size, progress_bar)


def build_mini(source: str | os.PathLike, seed: int = 0, size: int = 84,
               n_train_per_class: int = 500, n_tasks: int = 20,
               n_val_tasks: int = 3,
               progress_bar: bool = True) -> tuple[Benchmark, Benchmark]:
  """Split miniImageNet: ``(mini-val, mini-cl)``.

  Args:
    source: see :func:`read_mini`.
    seed: seed of the class permutation.
    size: output height and width (84).
    n_train_per_class: the first this many images of each class are train,
      the rest test (500 of 600).
    n_tasks: tasks of ``n_classes // n_tasks`` classes (20 -> 5 each).
    n_val_tasks: leading tasks kept for cross-validation (3).
    progress_bar: show tqdm bars while reading.

  Returns:
    Task-incremental benchmarks, x uint8 ``[N, 3, size, size]``.
  """
  (x_tr, y_tr, x_te, y_te), names = read_mini(source, n_train_per_class,
                                              size, progress_bar)
  val, cl = images.split_tasks("mini", x_tr, y_tr, x_te, y_te,
                               n_classes=len(names), seed=seed,
                               n_tasks=n_tasks, n_val_tasks=n_val_tasks,
                               source=os.fspath(source))
  return val, cl
