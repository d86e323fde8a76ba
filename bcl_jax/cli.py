"""What the argparse command lines (evaluate, report, grid) share."""

from __future__ import annotations

import os
import sys


def prog_name(script: str, module: str) -> str:
  """The name the user typed: the console script or ``python -m module``."""
  if os.path.basename(sys.argv[0]) == script:
    return script
  return f"python -m {module}"
