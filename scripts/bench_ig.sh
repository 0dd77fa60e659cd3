#!/usr/bin/env bash
# Integrated Gradients on resnet18 (random weights, TorchScript), 50 steps of
# Gauss-Legendre from the zero baseline, predicted class: `tch-vis
# integrated-gradients` against the captum job of scripts/bench_ig.py on the
# same images, batch and internal batch size, measured in the same run.
# Target: >= 1.1x (both sides are bound by the model's 50 forward and
# backward passes per image).
#
#   scripts/bench_ig.sh        (N=8 images, ROUNDS=1)
cd "$(dirname "$0")/.." || exit 1
DATA=${DATA:-bench-data}
N=${N:-8}
ROUNDS=${ROUNDS:-1}
STEPS=${STEPS:-50}
BATCH=${BATCH:-4}
IBS=${IBS:-50}
BIN=${BIN:-target/release/tch-vis}
# shellcheck source=scripts/golden_env.sh
. scripts/golden_env.sh && tch_vis_golden_setup >/dev/null || exit 1
PY="$TCH_VIS_GOLDEN_VENV/bin/python"
"$PY" -c "import matplotlib" 2>/dev/null || "$PY" -m pip install --quiet matplotlib
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    # shellcheck source=scripts/env.sh
    . scripts/env.sh && tch_vis_setup >/dev/null && cargo build --release --bin tch-vis -q || exit 1
fi
mkdir -p "$DATA"
[ -f "$DATA/resnet18.pt" ] && [ -d "$DATA/ig-images" ] || "$PY" scripts/make_bench_data.py --out "$DATA" \
    --n-images "$N" --images-dir ig-images --n-digits 0 >/dev/null || exit 1
best_rs="" best_py=""
for r in $(seq 1 "$ROUNDS"); do
    rm -rf "$DATA/ig-out-rs" "$DATA/ig-out-py"
    "$BIN" integrated-gradients --model "$DATA/resnet18.pt" --images "$DATA/ig-images" --out "$DATA/ig-out-rs" \
        --steps "$STEPS" --batch-size "$BATCH" --internal-batch-size "$IBS" --device cpu >/dev/null 2>&1
    rs=$("$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(round(r['processed']/r['seconds'],3))" "$DATA/ig-out-rs/report.json")
    py=$("$PY" scripts/bench_ig.py --model "$DATA/resnet18.pt" --images "$DATA/ig-images" --out "$DATA/ig-out-py" \
        --steps "$STEPS" --batch-size "$BATCH" --internal-batch-size "$IBS" 2>/dev/null | sed -n 's/.* s, \([0-9.]*\) images\/s/\1/p')
    echo "  round $r: tch-vis $rs images/s, captum $py images/s"
    if [ -z "$best_rs" ] || "$PY" -c "import sys; sys.exit(0 if $rs > $best_rs else 1)"; then best_rs=$rs; fi
    if [ -z "$best_py" ] || "$PY" -c "import sys; sys.exit(0 if ${py:-0} > $best_py else 1)"; then best_py=$py; fi
done
echo "integrated-gradients resnet18 ($N images, $STEPS steps, batch $BATCH, internal batch $IBS, cpu): tch-vis $best_rs images/s, captum $best_py images/s, ratio $("$PY" -c "print(round($best_rs/max(${best_py:-0},1e-9),3))") (target >= 1.1)"
"$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print('  tch-vis stage seconds:', json.dumps(r['timings_seconds']))" "$DATA/ig-out-rs/report.json"
