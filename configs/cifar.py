"""Split CIFAR-100 (BCL) with the paper's BCL-Dual hyper-parameters (``presets``).

Spec sections 10-11: 100 classes shuffled with a seeded permutation into 20
tasks of 5; the first 3 tasks form ``cifar-val`` (cross-validation), the other
17 ``cifar-cl``, each task with its own 5 head columns (task-incremental).
Reduced ResNet-18 (nf = 20, 1,109,240 parameters with 100 outputs; 85 here).
lr 0.3, beta 0.1, inner_steps 2, n_meta 1, n_memories 65 (13 of them the
generalisation memory), replay batch 128, batch 10, temperature 5,
memory_strength 100.

Data (``data_path`` / ``data_file``)::

  python scripts/prepare_data.py cifar100 \\
      --source cifar-100-python.tar.gz --out-dir data/

writes ``data/cifar-val.npz`` and ``data/cifar-cl.npz``. The reference's own
``cifar-cl.pt`` / ``cifar-val.pt`` load too (``--config.data_file=cifar-cl.pt``).

Variants (comma-separated, e.g. ``:val,quick``):
  ``val``: the 3 cross-validation tasks (``cifar-val.npz``).
  ``quick``: 2 tasks of 50 samples, small memories, for a smoke run.
"""

from bcl_jax.config import split_benchmark


def get_config(variant: str = ""):  # model auto: resnet18_reduced
  return split_benchmark(
      "cifar", variant, model="auto", eval_batch_size=500,
      bcl_dual=dict(lr=0.3, beta=0.1, inner_steps=2, n_meta=1, n_memories=65),
      quick=dict(n_tasks=2, use=50, chunk_size=5, eval_batch_size=100))
