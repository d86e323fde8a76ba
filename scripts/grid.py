"""The grid tool (``bcl_jax.grid``) as a script: ``python scripts/grid.py -h``."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bcl_jax.grid import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
