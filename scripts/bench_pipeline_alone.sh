#!/usr/bin/env bash
# Everything but the model: `tch-vis saliency` with a trivial 224 x 224 model
# (global average pool + a 3 -> 10 linear layer, so the model costs ~0)
# over mixed JPEGs and PNGs up to 640 px, against the same job written in
# Python (scripts/baseline_saliency.py: PIL, DataLoader, heatmap PNGs) with
# the same TorchScript file, measured in the same run. Prints images/s of
# each, the ratio (target >= 15), and tch-vis's per-stage timings.
#
#   scripts/bench_pipeline_alone.sh        (N=200 images, ROUNDS=2, fastest kept)
cd "$(dirname "$0")/.." || exit 1
DATA=${DATA:-bench-data}
N=${N:-200}
ROUNDS=${ROUNDS:-2}
BATCH=${BATCH:-32}
WORKERS=${WORKERS:-$(nproc)}
BIN=${BIN:-target/release/tch-vis}
# shellcheck source=scripts/golden_env.sh
. scripts/golden_env.sh && tch_vis_golden_setup >/dev/null || exit 1
PY="$TCH_VIS_GOLDEN_VENV/bin/python"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    # shellcheck source=scripts/env.sh
    . scripts/env.sh && tch_vis_setup >/dev/null && cargo build --release --bin tch-vis -q || exit 1
fi
mkdir -p "$DATA"
[ -d "$DATA/alone-images" ] || "$PY" scripts/make_bench_data.py --out "$DATA" --n-images "$N" \
    --images-dir alone-images --n-digits 0 --no-resnet18 >/dev/null || exit 1
"$PY" - "$DATA/trivial224.pt" <<'PY' || exit 1
import json, sys, torch
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 10), torch.nn.Softmax(1)).eval()
torch.jit.script(m).save(sys.argv[1])
json.dump({"input_size": [224, 224], "channels": 3, "mean": [0.485, 0.456, 0.406],
           "std": [0.229, 0.224, 0.225]}, open(sys.argv[1][:-3] + ".json", "w"))
PY
best_ours="" best_py="" stages=""
for r in $(seq 1 "$ROUNDS"); do
    rm -rf "$DATA/alone-out-rs" "$DATA/alone-out-py"
    "$BIN" saliency --model "$DATA/trivial224.pt" --images "$DATA/alone-images" --out "$DATA/alone-out-rs" \
        --batch-size "$BATCH" --device cpu --score categorical:1 >/dev/null 2>&1
    ours=$("$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(round(r['processed']/r['seconds'],1))" "$DATA/alone-out-rs/report.json")
    py=$("$PY" scripts/baseline_saliency.py --model "$DATA/trivial224.pt" --images "$DATA/alone-images" \
        --out "$DATA/alone-out-py" --batch-size "$BATCH" --workers "$WORKERS" --class 1 2>/dev/null \
        | sed -n 's/^python-pipeline.* s, \([0-9.]*\) images\/s.*/\1/p')
    echo "  round $r: tch-vis $ours images/s, python $py images/s"
    if [ -z "$best_ours" ] || "$PY" -c "import sys; sys.exit(0 if float('$ours') > float('$best_ours') else 1)"; then
        best_ours=$ours
        stages=$("$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps(r['timings_seconds']))" "$DATA/alone-out-rs/report.json")
    fi
    if [ -z "$best_py" ] || "$PY" -c "import sys; sys.exit(0 if float('${py:-0}') > float('$best_py') else 1)"; then best_py=$py; fi
done
cores=$(nproc)
echo "pipeline-alone (trivial 224 model, $N images, $cores cores): tch-vis $best_ours images/s ($("$PY" -c "print(round($best_ours/$cores,1))") per core), python $best_py images/s, ratio $("$PY" -c "print(round($best_ours/max($best_py,1e-9),2))") (target >= 15)"
echo "  tch-vis stage seconds (fastest round): $stages"
