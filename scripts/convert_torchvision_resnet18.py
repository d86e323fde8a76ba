"""torchvision ResNet-18 weights (``.pth``) -> ``.npz`` for bcl_jax.

Usage::

  python scripts/convert_torchvision_resnet18.py resnet18-f37072fd.pth OUT.npz

No torch needed: the ``.pth`` is read by bcl_jax's own torch-pickle reader
(an allow-list, nothing executed). The ``.npz`` keeps PyTorch's key names
and layouts (OIHW convs, ``[out, in]`` linear);
``bcl_jax.models.resnet.load_pretrained_npz`` transposes on load.
``num_batches_tracked`` counters are dropped. Converting is optional:
``--config.pretrained`` takes the ``.pth`` itself, or ``torchvision`` to
download it (see ``bcl_jax.data.download.resolve_pretrained``).

Bad input prints one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
  # pylint: disable=import-outside-toplevel
  from bcl_jax.models.resnet import read_torchvision_pth
  src, dst = argv[1], argv[2]
  try:
    arrays = state_dict_to_arrays(read_torchvision_pth(src))
    np.savez(dst, **arrays)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {len(arrays)} arrays to {dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
