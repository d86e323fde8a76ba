"""``scripts/prepare_data.py`` subcommands for the split image benchmarks.

``cifar100``, ``cub`` and ``mini`` each write ``<out-dir>/<name>-val.npz``
and ``<name>-cl.npz``. This module imports the readers (``cifar``, ``cub``,
``mini``), which import :mod:`bcl_jax.data.images`; nothing imports it back,
so the data package has no import cycle.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

from bcl_jax.data.benchmark import Benchmark


def _save(benchmarks: Sequence[Benchmark], out_dir: str) -> None:
  """Writes ``<out_dir>/<benchmark.name>.npz`` for each benchmark."""
  from bcl_jax.data.npz import save_npz
  os.makedirs(out_dir, exist_ok=True)
  for b in benchmarks:
    path = os.path.join(out_dir, f"{b.name}.npz")
    print(f"writing {path} ({b.n_tasks} tasks, {b.n_outputs} outputs, "
          f"input {b.input_shape} {b.tasks[0].x_train.dtype})", flush=True)
    save_npz(b, path)


def _run_cifar100(args: argparse.Namespace) -> None:
  from bcl_jax.data.cifar import build_cifar100
  _save(build_cifar100(args.source, seed=args.seed,
                       progress_bar=not args.quiet), args.out_dir)


def _run_cub(args: argparse.Namespace) -> None:
  from bcl_jax.data.cub import build_cub
  _save(build_cub(args.source, seed=args.seed, size=args.size,
                  progress_bar=not args.quiet), args.out_dir)


def _run_mini(args: argparse.Namespace) -> None:
  from bcl_jax.data.mini import build_mini
  _save(build_mini(args.source, seed=args.seed, size=args.size,
                   n_train_per_class=args.train_per_class,
                   progress_bar=not args.quiet), args.out_dir)


def _common_args(p: argparse.ArgumentParser, source_help: str) -> None:
  p.add_argument("--source", required=True, help=source_help)
  p.add_argument("--out-dir", default="data",
                 help="folder for <name>-val.npz and <name>-cl.npz "
                 "(default: data)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the class permutation, as the reference's "
                 "torch.manual_seed (default: 0)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_subcommands(subparsers: Any) -> None:
  """Adds ``cifar100``, ``cub`` and ``mini`` to a ``prepare_data`` parser.

  Each subcommand sets ``func`` to a function of the parsed arguments that
  writes ``<out-dir>/<name>-val.npz`` and ``<name>-cl.npz`` and returns None.
  """
  def add(name, stem, title, source_help, func, size=None):
    p = subparsers.add_parser(
        name, help=f"Split {title} -> {stem}-val.npz, {stem}-cl.npz")
    _common_args(p, source_help)
    if size:
      p.add_argument("--size", type=int, default=size,
                     help=f"output height and width (default: {size})")
    p.set_defaults(func=func)
    return p

  add("cifar100", "cifar", "CIFAR-100", "cifar-100-python.tar.gz, the "
      "extracted cifar-100-python folder, GEM's raw cifar100.pt, or tfds:DIR "
      "(a TFDS data dir)", _run_cifar100)
  add("cub", "cub", "CUB-200-2011", "CUB_200_2011.tgz, the extracted "
      "CUB_200_2011 folder, or tfds:DIR", _run_cub, size=224)
  p = add("mini", "mini", "miniImageNet", "a folder with mini-imagenet-cache-"
          "{train,val,test}.pkl, or a folder of class subfolders of images",
          _run_mini, size=84)
  p.add_argument("--train-per-class", type=int, default=500,
                 help="the first N images of each class train, the rest "
                 "test (default: 500)")
