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
ResNet-18; ``pretrained = ''`` (the default) starts from a random init. To use
the ImageNet weights, on a machine with torch and torchvision::

  python -c "import torchvision; torchvision.models.resnet18(weights='IMAGENET1K_V1')"
  python scripts/convert_torchvision_resnet18.py \\
      ~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth data/resnet18.npz

then ``--config.pretrained=data/resnet18.npz`` (bcl_jax itself never needs
torch; ``fc`` is skipped, the head stays fresh).

Variants (comma-separated, e.g. ``:val,quick``):
  ``val``: the 3 cross-validation tasks (``cub-val.npz``).
  ``quick``: 2 tasks of 20 samples, small memories, for a smoke run.
"""

from bcl_jax.config import apply_variants, default_config


def get_config(variant: str = ""):
  c = default_config()
  c.data_path = "data/"
  c.data_file = "cub-cl.npz"
  c.n_tasks = 0
  # The paper's BCL-Dual values (the other methods' defaults apply as is).
  c.presets.bcl_dual = dict(n_memories=50)
  c.model = "resnet18"
  c.pretrained = ""  # path to a converted torchvision .npz, see above
  c.eval_batch_size = 50  # 224x224 activations: keep evaluation chunks small
  c.chunk_size = 20
  return apply_variants(
      c, variant, "configs/cub.py",
      val=dict(data_file="cub-val.npz"),
      quick=dict(n_tasks=2, use=20, chunk_size=2, eval_batch_size=20,
                 presets={"all": dict(n_memories=20, replay_batch_size=16)}))
