"""Split miniImageNet with the paper's BCL-Dual hyper-parameters (``presets``).

100 classes shuffled into 20 tasks of 5; the first 3 form ``mini-val``, the
other 17 ``mini-cl`` (task-incremental heads). 84x84 images, reduced
ResNet-18 (nf = 20, global average pool). lr 0.05, beta 0.1, inner_steps 2,
n_meta 1, n_memories 65, replay batch 128, batch 10, temperature 5,
memory_strength 100 (spec section 11).

Data::

  python scripts/prepare_data.py mini --source DIR_WITH_PICKLE_CACHES \\
      --out-dir data/

(``DIR`` holds ``mini-imagenet-cache-{train,val,test}.pkl``, or class
sub-folders of images) writes ``data/mini-val.npz`` and ``data/mini-cl.npz``
(per class the first 500 images train, the other 100 test).

Variants (comma-separated, e.g. ``:val,quick``):
  ``val``: the 3 cross-validation tasks (``mini-val.npz``).
  ``quick``: 2 tasks of 50 samples, small memories, for a smoke run.
"""

from bcl_jax.config import split_benchmark


def get_config(variant: str = ""):  # model auto: resnet18_reduced
  return split_benchmark(
      "mini", variant, model="auto", eval_batch_size=100, chunk_size=50,
      bcl_dual=dict(lr=0.05, beta=0.1, inner_steps=2, n_meta=1, n_memories=65),
      quick=dict(n_tasks=2, use=50, chunk_size=5, eval_batch_size=50))
