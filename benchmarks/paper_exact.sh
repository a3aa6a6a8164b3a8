#!/usr/bin/env bash
# Paper-exact comparison on the synthetic set: the defaults vs the reference code's model (no
# missingness indicators) vs the paper's text (inclusive abnormal rule, no indicators), one reduced
# recipe for all three. Needs data/synth (ecglab synth-mimic data/synth --subjects 2000 --seed 1) and
# data/ds2000 (ecglab preprocess --mimic-root data/synth --out data/ds2000). About 10 min on 2 cores.
# Prints the planted targets' macro AUROC of each run (README "Deviations").
set -euo pipefail
cd "$(dirname "$0")/.."
E=${ECGLAB:-.venv/bin/ecglab}
OUT=data/paper-exact
[ -f data/ds2000-incl/dataset.json ] || $E preprocess --mimic-root data/synth --out data/ds2000-incl --workers 1 --abnormal-rule inclusive --no-progress --overwrite
COMMON="--device cpu --seed=1 --num_threads=1 --epochs=4 --model.d_model=128 --progress=false"
$E train --data data/ds2000 --out $OUT/default $COMMON
$E train --data data/ds2000 --out $OUT/no-indicators $COMMON --use_missing_indicators=false
$E train --data data/ds2000-incl --out $OUT/paper-exact $COMMON --use_missing_indicators=false
for r in default no-indicators paper-exact; do $E evaluate --run $OUT/$r --bootstrap 200; done
for r in default no-indicators paper-exact; do
  .venv/bin/python -c "import json,sys; g=json.load(open(sys.argv[1]))['planted']['groups']['planted']; print(f\"{sys.argv[2]}: planted macro AUROC {g['macro_auroc']:.3f} [{g['ci_low']:.3f}, {g['ci_high']:.3f}]\")" "$OUT/$r/metrics.json" "$r"
done
