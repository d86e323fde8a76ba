"""torchvision ResNet-18 weights (``.pth``) -> ``.npz`` for bcl_jax.

Usage::

  python scripts/convert_torchvision_resnet18.py resnet18-5c106cde.pth OUT.npz

The ``.npz`` keeps PyTorch's key names and layouts (OIHW convs, ``[out, in]``
linear); ``bcl_jax.models.resnet.load_pretrained_npz`` transposes on load.
``num_batches_tracked`` counters are dropped. This is the only place in the
project that imports torch, and only inside :func:`main`.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

import numpy as np


def state_dict_to_arrays(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Tensors (or arrays) by key -> float32 numpy arrays, counters dropped."""
  out = {}
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    if hasattr(value, "detach"):  # a torch tensor
      value = value.detach().cpu().numpy()
    out[key] = np.asarray(value, dtype=np.float32)
  return out


def main(argv: list[str]) -> int:
  if len(argv) != 3:
    print(__doc__.strip(), file=sys.stderr)
    return 2
  import torch  # pylint: disable=g-import-not-at-top

  src, dst = argv[1], argv[2]
  try:
    obj = torch.load(src, map_location="cpu", weights_only=True)
  except TypeError:  # torch < 1.13 has no weights_only
    obj = torch.load(src, map_location="cpu")
  if hasattr(obj, "state_dict"):  # a pickled module
    obj = obj.state_dict()
  if isinstance(obj, Mapping) and "state_dict" in obj:  # a training checkpoint
    obj = obj["state_dict"]
  arrays = state_dict_to_arrays(obj)
  np.savez(dst, **arrays)
  print(f"wrote {len(arrays)} arrays to {dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
