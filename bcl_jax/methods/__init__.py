"""Continual-learning methods, one module each, found by name."""

from __future__ import annotations

import importlib

from bcl_jax.methods.base import Batch, Context, Method

_REGISTRY = {
    "single": "bcl_jax.methods.single",
    "er": "bcl_jax.methods.er",
    "bcl_dual": "bcl_jax.methods.bcl_dual",
    "bcl_single": "bcl_jax.methods.bcl_single",
}

# Methods that keep an episodic memory and so support test-time adaptation.
ADAPTABLE = ("er", "bcl_dual", "bcl_single")


def names() -> list[str]:
  return sorted(_REGISTRY)


def make(config, ctx: Context) -> Method:
  """Builds the method ``config.method`` for the benchmark in ``ctx``."""
  name = config.method
  if name not in _REGISTRY:
    raise ValueError(f"unknown method {name!r}; choose one of {names()}")
  if config.adapt and name not in ADAPTABLE:
    raise ValueError(f"adapt=True needs an episodic memory; method {name!r} "
                     f"has none (use one of {list(ADAPTABLE)})")
  return importlib.import_module(_REGISTRY[name]).make(config, ctx)


__all__ = ["Batch", "Context", "Method", "make", "names", "ADAPTABLE"]
