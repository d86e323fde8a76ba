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
  path = _config_path().split(":")[0]
  if path == "run":
    fail("--config is required, e.g. --config configs/mnist.py")
  if not os.path.exists(path):
    fail(f"config file {path} does not exist; the shipped ones are in "
         "configs/ (e.g. configs/mnist.py)")
  try:
    config = _CONFIG.value
    config.method  # forces loading: a broken config file fails here
  except (OSError, AttributeError) as e:
    fail(f"cannot load config {path}: {str(e).splitlines()[0]}")
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


def _parse_flags(argv):
  """absl's flag parsing, with config errors as one line instead of a trace."""
  try:
    return flags.FLAGS(argv)
  except AttributeError as e:
    # A misspelt --config.FIELD: ml_collections says which and suggests one.
    msg = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
    msg = msg.replace("\\'", "'").replace("\\\"", '"')
    fail(f"unknown config field {msg}")
  except (flags.Error, KeyError, TypeError, ValueError) as e:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    head = lines[0].split(":", 1)[0]  # "flag --config=...": names the flag
    fail(f"{head}: {lines[-1]}" if len(lines) > 1 else lines[0])


def cli() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
