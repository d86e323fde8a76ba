"""Test-wide settings: compile fast, keep tests importable from tests/."""

import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))

# Most tests compile small programs once and run them a few times: XLA's
# optimisation passes would dominate their run time.
jax.config.update("jax_disable_most_optimizations", True)
