"""Test-wide settings (compile fast, tests/ importable) and shared fixtures."""

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(__file__))

# The ResNets' CPU default (im2col convolutions) compiles slower than XLA's
# convolutions; tests/test_resnet.py checks both against each other, and the
# rest of the suite (and its subprocesses) uses the faster-compiling one.
os.environ.setdefault("BCL_JAX_CONV", "conv")

# No persistent compilation cache in ~/.cache from the tests (and their
# subprocesses); tests/test_compile_cache.py turns it on in a folder of its own.
os.environ.setdefault("BCL_JAX_COMPILE_CACHE", "")

# Most tests compile small programs once and run them a few times: XLA's
# optimisation passes would dominate their run time.
jax.config.update("jax_disable_most_optimizations", True)

from data_helpers import _prepare, write_cifar_pickles  # noqa: E402


@pytest.fixture(scope="module")
def cifar_data(tmp_path_factory):
  """A tiny split CIFAR-100 (``cifar-{val,cl}.npz``) prepared from pickles
  in the official format; its folder."""
  root = tmp_path_factory.mktemp("cifar")
  src = write_cifar_pickles(root)
  _prepare("cifar100", "--source", str(src), "--out-dir", str(root / "data"))
  return root / "data"
