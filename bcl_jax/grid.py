"""A grid of settings: vmapped where it can be, one program per shape.

    python -m bcl_jax.grid --config configs/mnist.py \\
        --grid "n_memories=128,256;lr=0.01,0.03;beta=0.1,0.3" --seeds 3
    python -m bcl_jax.grid --config configs/cifar.py --val \\
        --grid "lr=0.03,0.1,0.3;beta=0.1,0.3"      # cross-validation

(also ``bcl-grid``, or ``python scripts/grid.py``). The grid is split
automatically: the method's *dynamic* fields (``lr``, ``beta``, ... as its
declaration says) run as one vmapped program per combination of the other
fields (``n_memories``, ``inner_steps``, ``method``, ...), with ``--seeds``
seeds per setting inside. Each program writes its usual results into
``<workdir>/<i>``. At the end a table prints one row per setting (mean ±
sample std over seeds of ACC, FM, LA), ``<workdir>/grid.json`` keeps the rows
and ``<workdir>/best.txt`` the best setting (``--select``, ACC by default) as
a config override line for ``python -m bcl_jax.run``::

    --config.lr=0.3 --config.beta=0.1

``--val`` runs on the benchmark's 3 cross-validation tasks (the config's
``val`` variant), as the paper selects hyper-parameters.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from bcl_jax import cli

METRICS = ("acc", "fm", "la")


def _value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string, e.g. method=er or data_path=/big/data


def parse_grid(spec: str) -> list[tuple[str, list[Any]]]:
  """``"lr=0.1,0.3;inner_steps=1,2"`` -> ``[("lr", [0.1, 0.3]), ...]``.

  Raises:
    ValueError: an entry that is not ``field=v1,v2,...`` or a field twice.
  """
  axes: list[tuple[str, list[Any]]] = []
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    name, sep, values = part.partition("=")
    vals = [_value(v.strip()) for v in values.split(",") if v.strip()]
    if not sep or not vals:
      raise ValueError(f"grid entry {part!r} is not 'field=v1,v2,...'")
    if any(name.strip() == k for k, _ in axes):
      raise ValueError(f"grid field {name.strip()!r} given twice")
    axes.append((name.strip(), vals))
  return axes


def set_field(config, name: str, value: Any) -> None:
  """``config[name] = value`` with one clear error for a bad field/value."""
  if name not in config:
    raise ValueError(f"unknown config field {name!r}")
  if isinstance(value, int) and not isinstance(value, bool) and \
      isinstance(config[name], float):
    value = float(value)
  if isinstance(value, list):
    value = tuple(value)
  try:
    config[name] = value
  except TypeError as e:
    raise ValueError(f"{name}={value!r}: {e}") from None


def programs(config, axes) -> list[tuple[dict[str, Any], str]]:
  """The programs of a grid: ``(fixed fields, config.sweep)`` each.

  Per method (a ``method`` axis gives several), the axes over its dynamic
  fields become one ``config.sweep``; the others are crossed, one program
  per combination.
  """
  from bcl_jax import methods
  method_axis = dict(axes).get("method", [config.method])
  out = []
  for m in method_axis:
    dynamic = methods.get(m).dynamic
    vm = [(k, v) for k, v in axes if k in dynamic]
    sep = [(k, v) for k, v in axes if k not in dynamic and k != "method"]
    sweep = ";".join(f"{k}=" + ",".join(str(float(x)) for x in v)
                     for k, v in vm)
    for point in itertools.product(*[v for _, v in sep]):
      fixed = {"method": m} if "method" in dict(axes) else {}
      fixed.update(zip([k for k, _ in sep], point))
      out.append((fixed, sweep))
  return out


def run_grid(config, axes, seeds: int, workdir: str, log=print,
             config_name: str = "grid") -> list[dict[str, Any]]:
  """Runs every program of the grid; one row per setting."""
  from bcl_jax import experiment
  from bcl_jax import runs as runs_lib
  names = [k for k, _ in axes]
  rows = []
  progs = programs(config, axes)
  for i, (fixed, sweep) in enumerate(progs):
    c = config.copy_and_resolve_references()
    for k, v in fixed.items():
      set_field(c, k, v)
    c.sweep = sweep
    c.num_seeds = seeds
    vm_names = [p.split("=")[0] for p in sweep.split(";") if p]
    for p in filter(None, sweep.split(";")):  # a valid first value
      k, v = p.split("=")
      set_field(c, k, float(v.split(",")[0]))
    sub = os.path.join(workdir, str(i))
    n_set = len(runs_lib.runs_of(c)) // seeds
    log(f"== program {i + 1}/{len(progs)}: "
        + ", ".join(f"{k}={v}" for k, v in fixed.items())
        + (f" vmapped {sweep}" if sweep else "")
        + f" ({n_set} setting(s) x {seeds} seed(s)) -> {sub}")
    res = experiment.run(c, sub, config_name=config_name,
                         log=lambda *_: None)
    groups: dict[tuple, list[dict]] = {}
    for r in res["runs"]:
      key = tuple(float(r["hp"][k]) for k in vm_names)
      groups.setdefault(key, []).append(r["metrics"])
    for key, ms in groups.items():
      setting = dict(fixed, **dict(zip(vm_names, key)))
      row = {"setting": {k: setting[k] for k in names if k in setting},
             "n": len(ms), "program": i,
             "seconds": res["timing"].get("total_seconds")}
      for m in METRICS:
        vals = np.asarray([x[m] for x in ms], float)
        row[m] = float(vals.mean())
        row[m + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
      rows.append(row)
  return rows


def override_line(setting: dict[str, Any]) -> str:
  return " ".join(f"--config.{k}={v}" if isinstance(v, str) else
                  f"--config.{k}={v:g}" if isinstance(v, float) else
                  f"--config.{k}={v}" for k, v in setting.items())


def table(rows: Sequence[dict[str, Any]], best: int) -> str:
  names = list(rows[0]["setting"])
  head = [*names, "n", *(m.upper() for m in METRICS), ""]
  fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
  body = [[fmt(r["setting"].get(k, "")) for k in names] + [str(r["n"])]
          + [f"{r[m]:.4f} ± {r[m + '_std']:.4f}" for m in METRICS]
          + ["<- best" if i == best else ""] for i, r in enumerate(rows)]
  widths = [max(len(x) for x in col) for col in zip(head, *body)]
  return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)).rstrip()
                   for line in [head, *body])


def with_val(config_arg: str) -> str:
  """``file.py[:variants]`` -> the same with the ``val`` variant added."""
  path, _, variant = config_arg.partition(":")
  parts = [v for v in variant.split(",") if v]
  if "val" not in parts:
    parts.insert(0, "val")
  return f"{path}:{','.join(parts)}"


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog=cli.prog_name("bcl-grid", "bcl_jax.grid"), description="A grid of settings: vmapped where it "
      "can be, one program per shape; prints the table and the best setting.")
  p.add_argument("--config", required=True, help="configs/<file>.py[:variants]")
  p.add_argument("--grid", required=True,
                 help="'field=v1,v2;field=...' (any config fields)")
  p.add_argument("--seeds", type=int, default=1, help="seeds per setting")
  p.add_argument("--val", action="store_true",
                 help="run on the cross-validation tasks (the val variant)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="other config overrides (repeatable)")
  p.add_argument("--select", choices=METRICS, default="acc",
                 help="metric that picks the best setting (default acc; "
                 "fm is minimised)")
  p.add_argument("--workdir", default=None,
                 help="output folder (default results/grid-<config>-<time>)")
  p.add_argument("--out", default=None,
                 help="file for the best override line "
                 "(default <workdir>/best.txt)")
  args = p.parse_args(argv)

  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from bcl_jax import experiment
  from bcl_jax.config import load_config_file
  config_arg = with_val(args.config) if args.val else args.config
  try:
    config = load_config_file(config_arg)
    for item in args.set:
      name, sep, value = item.partition("=")
      if not sep:
        raise ValueError(f"--set {item!r} is not FIELD=VALUE")
      set_field(config, name.strip(), _value(value.strip()))
    axes = parse_grid(args.grid)
    if not axes:
      raise ValueError("--grid is empty")
    for name, _ in axes:
      if name not in config:
        raise ValueError(f"unknown config field {name!r} in --grid")
    if args.seeds < 1:
      raise ValueError("--seeds must be >= 1")
    config.checkpoint = False
    config.progress = False
    stem = os.path.splitext(os.path.basename(config_arg.split(":")[0]))[0]
    workdir = args.workdir or os.path.join(
        "results", f"grid-{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    rows = run_grid(config, axes, args.seeds, workdir, config_name=config_arg)
  except experiment.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sign = -1 if args.select == "fm" else 1
  best = max(range(len(rows)), key=lambda i: sign * rows[i][args.select])
  line = override_line(rows[best]["setting"])
  print(f"\n{config_arg}: {args.seeds} seed(s) per setting, mean ± sample "
        f"std (ddof=1); best by {args.select.upper()}:")
  print(table(rows, best))
  from bcl_jax.results import atomic_write
  out = args.out or os.path.join(workdir, "best.txt")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  atomic_write(out, line + "\n")
  atomic_write(os.path.join(workdir, "grid.json"), json.dumps(
      {"config": config_arg, "rows": rows, "best": best, "override": line},
      indent=2))
  print(f"best setting written to {out}:")
  print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
