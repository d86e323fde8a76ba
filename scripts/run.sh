#!/usr/bin/env bash
# BCL-Dual on the paper's benchmarks with the paper's hyper-parameters: our
# version of the reference's scripts/run.sh (permuted MNIST, split CIFAR-100,
# split CUB, split miniImageNet; spec section 11). The hyper-parameters live
# in configs/{mnist,cifar,cub,mini}.py.
#
#   scripts/run.sh                         # data in ./data, results in ./results
#   DATA=/big/data scripts/run.sh --config.num_seeds=5
#   BENCHMARKS="cifar mini" scripts/run.sh
#
# Data folder ($DATA, default data/; README "Benchmarks of the paper"):
#   mnist_permutations.npz or .pt    prepare_data.py permuted --n-tasks 20
#   mnist_rotations.npz or .pt       prepare_data.py rotated --n-tasks 20
#   cifar-cl.npz (or the reference's cifar-cl.pt)   prepare_data.py cifar100
#   cub-cl.npz or .pt                prepare_data.py cub
#   mini-cl.npz or .pt               prepare_data.py mini
#   resnet18.npz (optional)          ImageNet weights for CUB, made by
#                                    scripts/convert_torchvision_resnet18.py
# BENCHMARKS (default "mnist cifar cub mini", the reference's four; "rotated"
# adds rotated MNIST). Extra arguments go to every run (--config.FIELD=...).
# A benchmark whose data file is missing is skipped with a warning; the
# script then exits with status 1 after running the others.
# Environment: DATA, RESULTS (default results), PYTHON (default python).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${DATA:-data}"
RESULTS="${RESULTS:-results}"
PYTHON="${PYTHON:-python}"
BENCHMARKS="${BENCHMARKS:-mnist cifar cub mini}"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"

skipped=()
failed=()

# find_data STEM: prints $DATA/STEM.npz or $DATA/STEM.pt, whichever exists.
find_data() {
  local ext
  for ext in npz pt; do
    if [[ -f "${DATA}/$1.${ext}" ]]; then
      echo "$1.${ext}"
      return 0
    fi
  done
  return 1
}

# run_benchmark NAME CONFIG STEM HOW [FLAGS...]
run_benchmark() {
  local name=$1 config=$2 stem=$3 how=$4
  shift 4
  local file
  if ! file=$(find_data "${stem}"); then
    echo "warning: skipping ${name}: neither ${DATA}/${stem}.npz nor" \
         "${DATA}/${stem}.pt exists; create it with" \
         "'python scripts/prepare_data.py ${how}'" >&2
    skipped+=("${name}")
    return 0
  fi
  local workdir="${RESULTS}/${name}-bcl_dual-$(date +%Y%m%d-%H%M%S)"
  echo "== ${name}: ${DATA}/${file} -> ${workdir}"
  if ! "${PYTHON}" -m bcl_jax.run --config "${REPO}/configs/${config}" \
      --config.method=bcl_dual --config.data_path="${DATA}" \
      --config.data_file="${file}" --workdir "${workdir}" \
      "$@" "${EXTRA[@]}"; then
    failed+=("${name}")
  fi
}

EXTRA=("$@")
PRETRAINED=()
if [[ -f "${DATA}/resnet18.npz" ]]; then
  PRETRAINED=(--config.pretrained="${DATA}/resnet18.npz")
fi

for b in ${BENCHMARKS}; do
  case "${b}" in
    mnist)
      run_benchmark mnist mnist.py mnist_permutations \
        "permuted --source embedded|DIR --n-tasks 20 --out ${DATA}/mnist_permutations.npz" \
        --config.n_tasks=0 ;;
    rotated)
      run_benchmark rotated rotated_mnist.py mnist_rotations \
        "rotated --source embedded|DIR --n-tasks 20 --out ${DATA}/mnist_rotations.npz" \
        --config.n_tasks=0 ;;
    cifar)
      run_benchmark cifar cifar.py cifar-cl \
        "cifar100 --source cifar-100-python.tar.gz --out-dir ${DATA}" ;;
    cub)
      run_benchmark cub cub.py cub-cl \
        "cub --source CUB_200_2011 --out-dir ${DATA}" \
        ${PRETRAINED[@]+"${PRETRAINED[@]}"} ;;
    mini)
      run_benchmark mini mini.py mini-cl \
        "mini --source DIR_WITH_MINI_IMAGENET_CACHES --out-dir ${DATA}" ;;
    *)
      echo "error: unknown benchmark '${b}' in BENCHMARKS; choose from" \
           "mnist rotated cifar cub mini" >&2
      exit 2 ;;
  esac
done

status=0
if (( ${#skipped[@]} )); then
  echo "warning: skipped (data missing): ${skipped[*]}" >&2
  status=1
fi
if (( ${#failed[@]} )); then
  echo "error: failed: ${failed[*]}" >&2
  status=1
fi
exit "${status}"
