#!/usr/bin/env bash
# One-shot accelerator check for whoever has a GPU: correctness of the
# vmapped runs, then the speed table (bcl_dual, permuted MNIST and split-CIFAR
# shapes, N = 1, 4, 16 runs). Fits in about 8 minutes on one H100.
#
#   bash scripts/gpu_check.sh 2>&1 | tee gpu_check.log
#
# Needs JAX with CUDA (pip install -e ".[cuda12]") on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python - <<'PY'
import jax
print("devices:", jax.devices())
assert jax.default_backend() == "gpu", "no GPU backend: install .[cuda12]"
PY
echo "== correctness: vmapped seeds and sweep points equal separate runs"
timeout 180 python -m pytest -q -p no:cacheprovider tests/test_runs.py \
  -k "vmapped_seeds or sweep_grid"
echo "== bcl_dual, permuted MNIST (embedded digits)"
timeout 150 python scripts/bench.py --benchmark mnist --runs 1,4,16 \
  --steps 200 --reps 5
echo "== bcl_dual, split-CIFAR shapes (reduced ResNet-18)"
timeout 200 python scripts/bench.py --benchmark cifar --runs 1,4,16 \
  --steps 50 --reps 3
