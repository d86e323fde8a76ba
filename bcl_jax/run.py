"""Command-line entry point.

    python -m bcl_jax.run --config configs/mnist.py --config.lr=0.1 \
        --workdir results/mnist-lr0.1

Bad input (missing data, a config typo, a non-finite loss, an unwritable
workdir) ends with one line on stderr and a non-zero exit, no traceback.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py[:variant]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder (default results/<config>-<timestamp>).")


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  variant = config_path.split(":", 1)[1] if ":" in config_path else ""
  stamp = time.strftime("%Y%m%d-%H%M%S")
  return os.path.join("results", "-".join(filter(None, [name, variant, stamp])))


def fail(msg: str, code: int = 2):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(code)


def main(argv) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; use --config.FIELD=VALUE")
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    fail("--config is required, e.g. --config configs/mnist.py")
  from bcl_jax import experiment  # heavy imports after flag parsing
  workdir = _WORKDIR.value or default_workdir(_config_path())
  try:
    experiment.run(config, workdir, config_name=_config_path())
  except experiment.USER_ERRORS as e:
    fail(str(e))
  except KeyboardInterrupt:
    fail("interrupted", code=130)


def _config_path() -> str:
  for arg in sys.argv[1:]:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  for i, arg in enumerate(sys.argv[1:-1], 1):
    if arg == "--config":
      return sys.argv[i + 1]
  return "run"


def cli() -> None:
  try:
    app.run(main)
  except flags.Error as e:  # pragma: no cover - absl prints usage itself
    fail(str(e))


if __name__ == "__main__":
  cli()
