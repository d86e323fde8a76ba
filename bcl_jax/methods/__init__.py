"""Continual-learning methods: one module each, found by name.

Adding a method is one file (a module with ``SPEC``, see
:mod:`bcl_jax.methods.api`) plus one line in :data:`_REGISTRY`. Everything
else (config fields, sweeps, validation, the loop, checkpoints, benchmarks)
reads the declaration.
"""

from __future__ import annotations

import functools
import importlib

from bcl_jax.methods.api import (Batch, Context, HParam, HParams, Method,
                                 MethodSpec, TaskData)

_REGISTRY = {
    "single": "bcl_jax.methods.single",
    "er": "bcl_jax.methods.er",
    "bcl_dual": "bcl_jax.methods.bcl_dual",
    "bcl_single": "bcl_jax.methods.bcl_single",
    "ewc": "bcl_jax.methods.ewc",
    "lwf": "bcl_jax.methods.lwf",
    "gem": "bcl_jax.methods.gem",
    "agem": "bcl_jax.methods.agem",
    "icarl": "bcl_jax.methods.icarl",
    "ftml": "bcl_jax.methods.ftml",
    "offline": "bcl_jax.methods.offline",
}


def names() -> list[str]:
  return sorted(_REGISTRY)


@functools.lru_cache(maxsize=None)
def get(name: str) -> MethodSpec:
  """The declaration of method ``name``.

  Raises:
    ValueError: an unknown name, listing the known ones.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown method {name!r}; choose one of {names()}")
  return importlib.import_module(_REGISTRY[name]).SPEC


def all_hparams() -> dict[str, HParam]:
  """Every registered method's hyper-parameters by name: the shared
  declaration (``methods/hparams.py``) where there is one, else the first
  method's. Methods sharing a field agree on its type (a test checks it).
  """
  from bcl_jax.methods import hparams as shared
  out: dict[str, HParam] = {h.name: h for h in vars(shared).values()
                            if isinstance(h, HParam)}
  declared = {h.name for n in names() for h in get(n).hparams}
  out = {k: v for k, v in out.items() if k in declared}
  for n in names():
    for h in get(n).hparams:
      out.setdefault(h.name, h)
  return out


def hparams_of(config) -> HParams:
  """The resolved hyper-parameters of ``config.method``, validated."""
  from bcl_jax.config import resolve
  from bcl_jax.methods import hparams as shared
  config = resolve(config)
  spec = get(config.method)
  hp = spec.hparams_of(config)
  shared.check_common(hp)
  spec.validate(hp, config)
  return hp


def make(config, ctx: Context) -> Method:
  """Builds the method ``config.method`` for the benchmark in ``ctx``."""
  return get(config.method).make(hparams_of(config), ctx)


__all__ = ["Batch", "Context", "HParam", "HParams", "Method", "MethodSpec",
           "TaskData", "get", "names", "make", "hparams_of", "all_hparams"]
