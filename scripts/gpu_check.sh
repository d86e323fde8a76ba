#!/usr/bin/env bash
# One-shot accelerator check for whoever has a GPU: correctness of the
# vmapped runs, then scripts/bench.py's tables (bcl_dual; permuted MNIST and
# split-CIFAR shapes at N = 1, 4, 16 runs; miniImageNet at N = 1), then every
# method's step on permuted MNIST at N = 16 (the baselines' summary table).
# Fits in about 10 minutes on one H100.
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
echo "== bcl_dual, permuted MNIST shapes (MLP), N = 1, 4, 16 runs"
timeout 150 python scripts/bench.py --benchmark mnist --runs 1,4,16 \
  --steps 100 --reps 3
echo "== bcl_dual, split-CIFAR shapes (reduced ResNet-18): the issue-11 table"
timeout 200 python scripts/bench.py --benchmark cifar --runs 1,4,16 \
  --steps 20 --reps 2
echo "== bcl_dual, miniImageNet shapes (84x84)"
timeout 100 python scripts/bench.py --benchmark mini --runs 1 --steps 20 \
  --reps 2
echo "== every method, permuted MNIST shapes, N = 16 runs (summary table)"
timeout 150 python scripts/bench.py --benchmark mnist --method all --runs 16 \
  --steps 40 --reps 1 | sed -n '/^summary/,$p'
