"""Hyper-parameter cross-validation on a benchmark's 3 ``-val`` tasks.

    python scripts/cross_validate.py --config configs/cifar.py \\
        --grid "lr=0.03,0.1,0.3;beta=0.1,0.3" [--seeds 3] \\
        [--set data_path=/big/data] [--out results/cv-cifar.txt]

Runs every point of the grid on the config's ``val`` variant (the ``-val``
file: ``configs/cifar.py`` -> ``configs/cifar.py:val``; other variants are
kept, e.g. ``configs/cifar.py:quick`` -> ``:val,quick``), prints one row per
setting with ACC, FM and LA (means over seeds) and writes the best setting
(highest ``--select`` metric, ACC by default) as a config override line::

    --config.lr=0.3 --config.beta=0.1

to stdout (last line) and to ``--out`` (default ``<workdir>/best.txt``), ready
for ``python -m bcl_jax.run --config configs/cifar.py $(cat best.txt)``.

Fields that do not change array shapes (``lr, beta, memory_strength,
temperature, adapt_lr``) are swept inside one vmapped program
(``config.sweep``); the others (``inner_steps``, ``n_meta``, ``n_memories``,
...) get one program per value. Each program writes its usual results into
``<workdir>/<i>``.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import itertools
import json
import os
import sys
import time
from typing import Any, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=wrong-import-position
from bcl_jax.methods.base import HP_FIELDS  # noqa: E402

METRICS = ("acc", "fm", "la")


def val_variant(config_arg: str) -> tuple[str, str]:
  """``file.py[:variants]`` -> ``(file.py, variants with 'val')``."""
  path, _, variant = config_arg.partition(":")
  parts = [v for v in variant.split(",") if v]
  if "val" not in parts:
    parts.insert(0, "val")
  return path, ",".join(parts)


def load_config(path: str, variant: str):
  if not os.path.isfile(path):
    raise SystemExit(f"error: config file {path} does not exist")
  spec = importlib.util.spec_from_file_location("cv_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    return module.get_config(variant)
  except ValueError as e:
    raise SystemExit(f"error: {path}:{variant}: {e}") from None


def _value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string, e.g. data_path=/big/data


def parse_grid(spec: str) -> list[tuple[str, list[Any]]]:
  """``"lr=0.1,0.3;inner_steps=1,2"`` -> ``[("lr", [0.1, 0.3]), ...]``."""
  axes = []
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    name, sep, values = part.partition("=")
    vals = [_value(v.strip()) for v in values.split(",") if v.strip()]
    if not sep or not vals:
      raise SystemExit(f"error: grid entry {part!r} is not 'field=v1,v2,...'")
    axes.append((name.strip(), vals))
  if not axes:
    raise SystemExit("error: --grid is empty")
  return axes


def set_field(config, name: str, value: Any) -> None:
  if name not in config:
    raise SystemExit(f"error: unknown config field {name!r}")
  old = config[name]
  if isinstance(old, float) and isinstance(value, int):
    value = float(value)
  try:
    config[name] = value
  except TypeError as e:
    raise SystemExit(f"error: {name}={value!r}: {e}") from None


def override_line(setting: dict[str, Any]) -> str:
  return " ".join(f"--config.{k}={v!r}" if isinstance(v, str) else
                  f"--config.{k}={v:g}" if isinstance(v, float) else
                  f"--config.{k}={v}" for k, v in setting.items())


def run_grid(config, axes, workdir: str, log=print) -> list[dict[str, Any]]:
  """Runs the grid; returns one row per setting with mean metrics."""
  from bcl_jax import experiment  # pylint: disable=import-outside-toplevel
  vmapped = [(k, v) for k, v in axes if k in HP_FIELDS]
  separate = [(k, v) for k, v in axes if k not in HP_FIELDS]
  names = [k for k, _ in axes]
  rows = []
  points = list(itertools.product(*[v for _, v in separate])) or [()]
  for i, point in enumerate(points):
    c = config.copy_and_resolve_references()
    for (name, _), value in zip(separate, point):
      set_field(c, name, value)
    for name, values in vmapped:  # validated, and the sweep's values
      set_field(c, name, float(values[0]))
    c.sweep = ";".join(f"{k}=" + ",".join(str(float(x)) for x in v)
                       for k, v in vmapped)
    sub = os.path.join(workdir, str(i))
    log(f"== program {i + 1}/{len(points)}: "
        + ", ".join(f"{k}={v}" for (k, _), v in zip(separate, point))
        + (f" sweep {c.sweep}" if c.sweep else "") + f" -> {sub}")
    res = experiment.run(c, sub, config_name="cross_validate", log=log)
    groups: dict[tuple, list[dict]] = {}
    for r in res["runs"]:
      key = tuple(float(r["hp"][k]) for k, _ in vmapped)
      groups.setdefault(key, []).append(r["metrics"])
    for key, metrics in groups.items():
      setting = dict(zip([k for k, _ in separate], point))
      setting.update(zip([k for k, _ in vmapped], key))
      row = {"setting": {k: setting[k] for k in names}, "seeds": len(metrics)}
      for m in METRICS:
        row[m] = sum(x[m] for x in metrics) / len(metrics)
      rows.append(row)
  return rows


def table(rows: Sequence[dict[str, Any]], best: int) -> str:
  names = list(rows[0]["setting"])
  head = [*names, "ACC", "FM", "LA", ""]
  body = [[f"{r['setting'][k]:g}" if isinstance(r["setting"][k], float)
           else str(r["setting"][k]) for k in names]
          + [f"{r[m]:.4f}" for m in METRICS] + ["<- best" if i == best else ""]
          for i, r in enumerate(rows)]
  widths = [max(len(x) for x in col) for col in zip(head, *body)]
  return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)).rstrip()
                   for line in [head, *body])


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      description="Grid search on a benchmark's -val tasks.")
  p.add_argument("--config", required=True,
                 help="configs/<benchmark>.py[:variants]; 'val' is added")
  p.add_argument("--grid", default="lr=0.03,0.1,0.3;beta=0.1,0.3",
                 help="'field=v1,v2;field=...' (default: %(default)s)")
  p.add_argument("--seeds", type=int, default=1,
                 help="seeds per setting, vmapped (default 1)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="other config overrides (repeatable)")
  p.add_argument("--select", choices=("acc", "la"), default="acc",
                 help="metric to maximise (default acc)")
  p.add_argument("--workdir", default=None,
                 help="output folder (default results/cv-<config>-<time>)")
  p.add_argument("--out", default=None,
                 help="file for the best override line "
                 "(default <workdir>/best.txt)")
  args = p.parse_args(argv)

  path, variant = val_variant(args.config)
  config = load_config(path, variant)
  for item in args.set:
    name, sep, value = item.partition("=")
    if not sep:
      p.error(f"--set {item!r} is not FIELD=VALUE")
    set_field(config, name.strip(), _value(value.strip()))
  config.num_seeds = args.seeds
  config.checkpoint = False
  config.progress = False
  axes = parse_grid(args.grid)
  for name, _ in axes:
    if name not in config:
      p.error(f"unknown config field {name!r} in --grid")
  name = os.path.splitext(os.path.basename(path))[0]
  workdir = args.workdir or os.path.join(
      "results", f"cv-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
  from bcl_jax import experiment  # pylint: disable=import-outside-toplevel
  try:
    rows = run_grid(config, axes, workdir)
  except experiment.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  best = max(range(len(rows)), key=lambda i: rows[i][args.select])
  line = override_line(rows[best]["setting"])
  print(f"\n{path}:{variant}, {args.seeds} seed(s) per setting, best by "
        f"{args.select.upper()}:")
  print(table(rows, best))
  out = args.out or os.path.join(workdir, "best.txt")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(line + "\n")
  with open(os.path.join(workdir, "cross_validation.json"), "w") as f:
    json.dump({"config": f"{path}:{variant}", "rows": rows, "best": best,
               "override": line}, f, indent=2)
  print(f"best setting written to {out}:")
  print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
