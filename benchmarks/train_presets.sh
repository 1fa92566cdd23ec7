#!/usr/bin/env bash
# Train each report preset on the JPEG CIFAR-10 copy into runs/<preset> and print its best validation accuracy.
# Then `python benchmarks/model_table.py` writes those figures into docs/models.md.
#
#   benchmarks/train_presets.sh                                   # every report preset, full recipes (days of CPU)
#   PRESETS="blocknet-fast tp3-simple-cnn" benchmarks/train_presets.sh
#   RUNS=/tmp/check PRESETS=qmul-blocknet-small benchmarks/train_presets.sh --epochs 1 --train-size 512  # quick check
#
# Extra arguments go to every `cifarx train` (they override the preset; a shortened budget then shows in the
# docs table as the epochs actually run). An interrupted preset resumes where it stopped when run again.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-$HOME/cifar10-jpeg}"
RUNS="${RUNS:-runs}"
PRESETS="${PRESETS:-tp3-simple-cnn-fast blocknet-fast qmul-blocknet-small qmul-blocknet tp3-simple-cnn-plain tp3-simple-cnn cityu-vgg16 shake-shake-26-2x64d}"

for preset in $PRESETS; do
  out="$RUNS/$preset"
  if [[ -f "$out/summary.json" ]]; then
    echo "== $preset: already done ($out/summary.json)"
  elif [[ -f "$out/last.pt" ]]; then
    echo "== $preset: resuming $out"
    cifarx train --resume "$out"
  else
    echo "== $preset: cifarx train --preset $preset --data $DATA --out $out $*"
    cifarx train --preset "$preset" --data "$DATA" --out "$out" "$@"
  fi
  python - "$out/summary.json" "$preset" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]}: best validation accuracy {s['best_val_accuracy']:.2%} after {s['epochs_run']} epochs, "
      f"{s['train_seconds'] / 3600:.2f} h")
PY
done
python benchmarks/model_table.py --runs "$RUNS" --print
