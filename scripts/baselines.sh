#!/usr/bin/env bash
# Every method on one benchmark, N seeds each (one vmapped program per
# method), then one table: method | ACC ± std | FM ± std | LA ± std | wall s.
# The per-method hyper-parameters are the benchmark config's presets (the
# paper's / the reference's values; configs/<benchmark>.py).
#
#   scripts/baselines.sh                        # permuted MNIST, 3 seeds
#   BENCHMARK=cifar SEEDS=5 scripts/baselines.sh --config.data_path=/big/data
#   METHODS="er gem agem" scripts/baselines.sh
#
# TABLE_ONLY=1 RESULTS=dir scripts/baselines.sh reprints the table of an
# earlier results folder without running anything.
#
# Environment: BENCHMARK (a configs/ file stem, default mnist), SEEDS
# (default 3), METHODS (default: every registered method), RESULTS (default
# results/baselines-<benchmark>-<time>), PYTHON (default python). Extra
# arguments go to every run. The table is also written to
# $RESULTS/baselines.md, and bcl_jax.report's tables and figures to
# $RESULTS/report/. Exits 1 if any method failed (the others still run).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
PYTHON="${PYTHON:-python}" BENCHMARK="${BENCHMARK:-mnist}" SEEDS="${SEEDS:-3}"
RESULTS="${RESULTS:-results/baselines-${BENCHMARK}-$(date +%Y%m%d-%H%M%S)}"
if [[ -z "${METHODS:-}" ]]; then
  METHODS="$("$PYTHON" -c 'from bcl_jax import methods; print(*methods.names())')"
fi
mkdir -p "$RESULTS"
failed=()
for m in $METHODS; do
  [[ "${TABLE_ONLY:-0}" == 1 ]] && break
  echo "== $m on $BENCHMARK, $SEEDS seed(s) -> $RESULTS/$m" >&2
  start=$EPOCHREALTIME
  if "$PYTHON" -m bcl_jax.run --config "$REPO/configs/${BENCHMARK}.py" \
      --config.method="$m" --config.num_seeds="$SEEDS" \
      --config.progress=False --workdir "$RESULTS/$m" "$@" \
      > "$RESULTS/$m.log" 2>&1; then
    awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { print b - a }' \
      > "$RESULTS/$m.wall"
    tail -n 1 "$RESULTS/$m.log" >&2
  else
    failed+=("$m")
    tail -n 3 "$RESULTS/$m.log" >&2
  fi
done
"$PYTHON" - "$RESULTS" $METHODS <<'PY' | tee "$RESULTS/baselines.md"
import json, os, sys
root, names = sys.argv[1], sys.argv[2:]
print("| method | ACC | FM | LA | wall s |")
print("|---|---|---|---|---|")
for m in names:
  try:
    res = json.load(open(os.path.join(root, m, "results.json")))
    wall = float(open(os.path.join(root, f"{m}.wall")).read())
  except (OSError, ValueError):
    print(f"| {m} | failed | | | |")
    continue
  mm, sd = res["metrics"], res["metrics_std"]
  cell = lambda k: f"{mm[k]:.4f} ± {sd[k]:.4f}"
  print(f"| {m} | {cell('acc')} | {cell('fm')} | {cell('la')} | {wall:.1f} |")
n = len(json.load(open(os.path.join(root, names[0], "results.json")))["runs"]) \
    if os.path.exists(os.path.join(root, names[0], "results.json")) else 0
print(f"\n(mean ± sample std over {n} seed(s); wall: the whole command, "
      "start-up and compilation included)")
PY
[[ "${TABLE_ONLY:-0}" == 1 ]] || "$PYTHON" -m bcl_jax.report "$RESULTS" \
  --out "$RESULTS/report" --plot > /dev/null || true
if (( ${#failed[@]} )); then
  echo "failed: ${failed[*]} (logs in $RESULTS)" >&2
  exit 1
fi
