"""A grid of settings: vmapped where it can be, one program per shape.

    python scripts/sweep.py --config configs/mnist.py \
        --grid "n_memories=128,256" --vmap "lr=0.01,0.03;beta=0.1,0.3" \
        --seeds 3 --workdir results/sweep-mnist

``--vmap`` takes hyper-parameters that keep array shapes (``lr``, ``beta``,
``memory_strength``, ``temperature``, ``adapt_lr``): their grid times
``--seeds`` runs as ONE compiled, vmapped program (``config.sweep``).
``--grid`` takes any config field, shape-changing ones included
(``n_memories``, ``inner_steps``, ``replay_batch_size``, ``method``, ...):
one program per combination, each in ``<workdir>/<setting>``. At the end a
table prints one row per setting with mean +- std over seeds of ACC, FM, LA,
and ``<workdir>/sweep.json`` keeps the rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bcl_jax import experiment  # noqa: E402
from bcl_jax import sweep as sweep_lib  # noqa: E402


def load_config(spec: str):
  path, _, variant = spec.partition(":")
  if not os.path.exists(path):
    raise SystemExit(f"error: config file {path} does not exist")
  mod_spec = importlib.util.spec_from_file_location("sweep_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(variant) if variant else mod.get_config()


def coerce(config, field: str, value: str):
  if field not in config:
    raise SystemExit(f"error: unknown config field {field!r}")
  old = config[field]
  if isinstance(old, bool):
    return value.lower() in ("1", "true", "yes")
  if isinstance(old, int):
    return int(value)
  if isinstance(old, float):
    return float(value)
  if isinstance(old, tuple):
    return tuple(int(v) for v in value.split("/"))
  return value


def parse_grid(config, spec: str) -> list[dict]:
  axes = []
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    if "=" not in part:
      raise SystemExit(f"error: grid entry {part!r} is not 'field=v1,v2'")
    name, values = (s.strip() for s in part.split("=", 1))
    axes.append([(name, coerce(config, name, v.strip()))
                 for v in values.split(",") if v.strip()])
  return [dict(p) for p in itertools.product(*axes)] or [{}]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--grid", default="", help="any fields, one program each")
  ap.add_argument("--vmap", default="", help="shape-preserving fields")
  ap.add_argument("--seeds", type=int, default=1)
  ap.add_argument("--set", action="append", default=[],
                  help="fixed override FIELD=VALUE (repeatable)")
  ap.add_argument("--workdir", default="results/sweep")
  args = ap.parse_args(argv)

  base = load_config(args.config)
  for item in args.set:
    k, _, v = item.partition("=")
    base[k] = coerce(base, k, v)
  if args.vmap:
    try:
      sweep_lib.parse(args.vmap)
    except ValueError as e:
      raise SystemExit(f"error: --vmap: {e}")
  points = parse_grid(base, args.grid)
  rows = []
  for point in points:
    c = base.copy_and_resolve_references()
    for k, v in point.items():
      c[k] = v
    c.num_seeds = args.seeds
    c.sweep = args.vmap
    c.progress = False
    name = "-".join(f"{k}{v}" for k, v in point.items()) or "base"
    wd = os.path.join(args.workdir, name)
    print(f"== {name}: {len(sweep_lib.parse(args.vmap)) if args.vmap else 1}"
          f" setting(s) x {args.seeds} seed(s) in one program -> {wd}",
          flush=True)
    try:
      res = experiment.run(c, wd, config_name=args.config,
                           log=lambda *_: None)
    except experiment.USER_ERRORS as e:
      raise SystemExit(f"error: {name}: {e}")
    groups: dict[tuple, list] = {}
    for run in res["runs"]:
      key = tuple(sorted(run["hp"].items()))
      groups.setdefault(key, []).append(run["metrics"])
    vm_fields = [p.split("=")[0].strip() for p in args.vmap.split(";")
                 if "=" in p]
    for key, ms in groups.items():
      hp = dict(key)
      setting = dict(point, **{k: hp[k] for k in vm_fields})
      row = {"setting": setting, "n": len(ms)}
      for m in ("acc", "fm", "la"):
        vals = [x[m] for x in ms]
        row[m] = float(np.mean(vals))
        row[m + "_std"] = float(np.std(vals))
      rows.append(row)
  width = max(len(json.dumps(r["setting"])) for r in rows)
  print(f"\n{'setting':<{width}}  {'ACC':>15}  {'FM':>15}  {'LA':>15}")
  for r in rows:
    print(f"{json.dumps(r['setting']):<{width}}  " + "  ".join(
        f"{r[m]:.4f} ± {r[m + '_std']:.4f}" for m in ("acc", "fm", "la")))
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "sweep.json"), "w") as f:
    json.dump(rows, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
