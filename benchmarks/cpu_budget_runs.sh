#!/usr/bin/env bash
# The stated, shortened budgets behind docs/models.md's rows for the report recipes too long for a 2-core CPU
# (hours to days in full), each trained into runs/<preset>/ by benchmarks/train_presets.sh; then
# `python benchmarks/model_table.py --print` reads them. One list per slot, so two slots can share the two cores:
#
#   THREADS=1 benchmarks/cpu_budget_runs.sh a & THREADS=1 benchmarks/cpu_budget_runs.sh b; wait
set -euo pipefail
cd "$(dirname "$0")"
threads=(${THREADS:+--threads "$THREADS"})
case "${1:-all}" in
  a|all)
    PRESETS=cityu-vgg16 ./train_presets.sh --epochs 2 --train-size 20000 "${threads[@]}"
    PRESETS=shake-shake-26-2x64d ./train_presets.sh --epochs 1 --train-size 5000 "${threads[@]}"
    ;;&
  b|all)
    PRESETS=tp3-simple-cnn ./train_presets.sh --epochs 2 "${threads[@]}"
    PRESETS=tp3-simple-cnn-plain ./train_presets.sh --epochs 5 "${threads[@]}"
    ;;
esac
