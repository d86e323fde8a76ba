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
# Data folder ($DATA, default data/; README "Run the paper's benchmarks"):
#   mnist        mnist_permutations.npz or .pt if there (prepare_data.py
#                permuted), else 20 tasks built from the embedded digits
#   rotated      mnist_rotations.npz or .pt if there, else embedded digits
#   cifar        cifar-cl.npz or .pt; a missing cifar-cl.npz is prepared from
#                cifar-100-python.tar.gz, downloaded (161 MiB) if absent
#   cub          cub-cl.npz or .pt; likewise from CUB_200_2011.tgz (1.1 GiB);
#                ImageNet ResNet-18 weights: $DATA/resnet18.npz if there,
#                else PRETRAINED (default "torchvision": downloaded once,
#                45 MiB, into ~/.cache/bcl_jax; PRETRAINED= for random init)
#   mini         mini-cl.npz or .pt, or made from mini-imagenet-cache-*.pkl
#                in $DATA (no official download: skipped when neither is)
# BENCHMARKS (default "mnist cifar cub mini", the reference's four; "rotated"
# adds rotated MNIST). Extra arguments go to every run (--config.FIELD=...;
# --config.download=False never downloads). A skipped or failed benchmark
# makes the script exit with status 1 after running the others.
# Environment: DATA, RESULTS (default results), PYTHON (default python),
# PRETRAINED (see cub).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${DATA:-data}"
RESULTS="${RESULTS:-results}"
PYTHON="${PYTHON:-python}"
BENCHMARKS="${BENCHMARKS:-mnist cifar cub mini}"
PRETRAINED="${PRETRAINED-torchvision}"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"

skipped=()
failed=()

# find_data STEM: prints STEM.npz or STEM.pt, whichever is in $DATA.
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

# run_benchmark NAME CONFIG DATA_FILE [FLAGS...]   (DATA_FILE '' = embedded)
run_benchmark() {
  local name=$1 config=$2 file=$3
  shift 3
  local workdir="${RESULTS}/${name}-bcl_dual-$(date +%Y%m%d-%H%M%S)"
  echo "== ${name}: ${file:+${DATA}/}${file:-embedded digits} -> ${workdir}"
  if ! "${PYTHON}" -m bcl_jax.run --config "${REPO}/configs/${config}" \
      --config.method=bcl_dual --config.data_path="${DATA}" \
      --config.data_file="${file}" --workdir "${workdir}" \
      "$@" "${EXTRA[@]}"; then
    failed+=("${name}")
  fi
}

# mnist_benchmark NAME CONFIG STEM: the prepared file, else embedded digits.
mnist_benchmark() {
  local file
  if file=$(find_data "$3"); then
    run_benchmark "$1" "$2" "${file}" --config.n_tasks=0
  else
    echo "note: no ${DATA}/$3.npz or .pt: using 20 tasks of the embedded" \
         "digits (GEM's full MNIST: python scripts/prepare_data.py" \
         "${4} --source DIR_WITH_MNIST --out ${DATA}/$3.npz)"
    run_benchmark "$1" "$2" "" --config.n_tasks=20
  fi
}

EXTRA=("$@")
CUB_WEIGHTS=()
if [[ -f "${DATA}/resnet18.npz" ]]; then
  CUB_WEIGHTS=(--config.pretrained="${DATA}/resnet18.npz")
else
  # Empty PRETRAINED: a random init (configs/cub.py defaults to torchvision).
  CUB_WEIGHTS=(--config.pretrained="${PRETRAINED}")
fi

for b in ${BENCHMARKS}; do
  case "${b}" in
    mnist)
      mnist_benchmark mnist mnist.py mnist_permutations permuted ;;
    rotated)
      mnist_benchmark rotated rotated_mnist.py mnist_rotations rotated ;;
    cifar)
      run_benchmark cifar cifar.py \
        "$(find_data cifar-cl || echo cifar-cl.npz)" ;;
    cub)
      run_benchmark cub cub.py "$(find_data cub-cl || echo cub-cl.npz)" \
        ${CUB_WEIGHTS[@]+"${CUB_WEIGHTS[@]}"} ;;
    mini)
      if file=$(find_data mini-cl) || \
          [[ -f "${DATA}/mini-imagenet-cache-train.pkl" ]]; then
        run_benchmark mini mini.py "${file:-mini-cl.npz}"
      else
        echo "warning: skipping mini: no ${DATA}/mini-cl.npz and no" \
             "mini-imagenet-cache-{train,val,test}.pkl in ${DATA}" \
             "(miniImageNet has no official download; put the caches there" \
             "or run 'python scripts/prepare_data.py mini --source DIR" \
             "--out-dir ${DATA}')" >&2
        skipped+=("mini")
      fi ;;
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
