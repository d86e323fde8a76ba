"""Parsing of ``--config.sweep``: a grid of shape-preserving hyper-parameters.

``"lr=0.01,0.03;beta=0.1,0.3"`` is the 2x2 grid of those values. Only the
fields that live in ``state.hp`` (they do not change array shapes) can be
swept inside one program; the others need one program per value
(``scripts/sweep.py``).
"""

from __future__ import annotations

import itertools

from bcl_jax.methods.base import HP_FIELDS

SHAPE_CHANGING = ("n_memories", "inner_steps", "n_meta", "replay_batch_size",
                  "method", "batch_size", "n_val", "model", "hidden")


def parse(spec: str) -> list[dict[str, float]]:
  """The grid points of a sweep spec, in row-major order.

  Raises:
    ValueError: naming the bad field or value and what to do instead.
  """
  axes = []
  seen = set()
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    if "=" not in part:
      raise ValueError(f"sweep entry {part!r} is not 'field=v1,v2,...'")
    name, values = (s.strip() for s in part.split("=", 1))
    if name in SHAPE_CHANGING:
      raise ValueError(
          f"sweep field {name!r} changes array shapes and cannot be vmapped; "
          f"run one program per value with scripts/sweep.py "
          f"(vmappable fields: {', '.join(HP_FIELDS)})")
    if name not in HP_FIELDS:
      raise ValueError(f"unknown sweep field {name!r}; vmappable fields: "
                       f"{', '.join(HP_FIELDS)}")
    if name in seen:
      raise ValueError(f"sweep field {name!r} given twice")
    seen.add(name)
    try:
      vals = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
      raise ValueError(f"sweep field {name!r}: values must be numbers, got "
                       f"{values!r}") from None
    if not vals:
      raise ValueError(f"sweep field {name!r} has no values")
    axes.append([(name, v) for v in vals])
  return [dict(p) for p in itertools.product(*axes)]
