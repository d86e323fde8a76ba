"""Split CUB-200-2011 with the paper's BCL-Dual hyper-parameters (``presets``).

200 bird classes shuffled into 20 tasks of 10; the first 3 form ``cub-val``,
the other 17 ``cub-cl`` (task-incremental heads). Images 224x224, full
torchvision-layout ResNet-18 with a fresh ``n_outputs`` layer. lr 0.03,
beta 0.3, inner_steps 1, n_meta 2, n_memories 50, replay batch 128, batch
10, temperature 5, memory_strength 100 (spec section 11).

Data::

  python scripts/prepare_data.py cub --source CUB_200_2011 --out-dir data/

writes ``data/cub-val.npz`` and ``data/cub-cl.npz`` (``--size`` changes the
image size; 224 is the paper's).

ImageNet weights. The reference starts from torchvision's ImageNet-pretrained
ResNet-18, and so does this config (``pretrained = "torchvision"``: the
torchvision ``resnet18-f37072fd.pth`` is downloaded once, checked, and read
without torch; ``fc`` is skipped, the head stays fresh). ``pretrained = ''``
starts from a random init; a local ``.pth`` or converted ``.npz`` works too.

Variants (comma-separated, e.g. ``:val,quick``):
  ``val``: the 3 cross-validation tasks (``cub-val.npz``).
  ``quick``: 2 tasks of 20 samples, small memories, for a smoke run.
"""

from bcl_jax.config import split_benchmark


def get_config(variant: str = ""):  # a smoke run skips the ImageNet weights
  return split_benchmark(
      "cub", variant, model="resnet18", pretrained="torchvision",
      eval_batch_size=50, chunk_size=20, bcl_dual=dict(n_memories=50),
      quick=dict(n_tasks=2, use=20, chunk_size=2, eval_batch_size=20,
                 pretrained=""))
