#!/usr/bin/env bash
# Everything but the model: `tch-vis saliency` with a trivial 224 x 224 model
# (global average pool + a 3 -> 10 linear layer, so the model costs ~0)
# over mixed JPEGs and PNGs up to 640 px, against the same job written in
# Python (scripts/baseline_saliency.py: PIL, DataLoader, heatmap PNGs) with
# the same TorchScript file, measured in the same run. Prints images/s of
# each on its job clock, the ratio (target >= 15), the same jobs timed as
# whole processes (start to exit: libtorch's load and the light model's
# restart on our side, imports and model load on Python's), and tch-vis's
# per-stage timings.
#
# Two sidecars for the same model:
#   plain        input_size only: tch-vis stretches in float, without
#                antialiasing (what a sidecar without resize keys means);
#   torchvision  "resize": [224, 224] + "crop": [224, 224], antialiased
#                bilinear on the 8-bit pixels: the resize the Python job does
#                (torchvision's Resize on a PIL image), so both sides compute
#                the same inputs.
#
# Every round writes into folders of its own, removed at the end: removing a
# folder of many files and writing the same names again at once makes ext4
# scan for recently deleted inodes, which cost both sides a third of their
# speed in the first version of this script.
#
#   scripts/bench_pipeline_alone.sh   (200 images x REPEAT=5, ROUNDS=2, fastest kept)
#   RUNS=/dev/shm/alone-runs scripts/bench_pipeline_alone.sh   (outputs on tmpfs)
cd "$(dirname "$0")/.." || exit 1
DATA=${DATA:-bench-data}
N=${N:-200}
ROUNDS=${ROUNDS:-2}
REPEAT=${REPEAT:-5}
BATCH=${BATCH:-32}
WORKERS=${WORKERS:-$(nproc)}
BIN=${BIN:-target/release/tch-vis}
# Recipes run: plain and torchvision as below; NAME-fastjpeg is NAME with
# --fast-jpeg (zune-jpeg instead of libjpeg-turbo's decoder, which is
# built without SIMD where nasm is missing), NAME-storedpng NAME with
# --png-compression none (heatmap PNGs stored: ~151 KB instead of ~28 for
# these smooth pictures).
RECIPES=${RECIPES:-torchvision plain torchvision-fastjpeg torchvision-storedpng}
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
IMAGES="$DATA/alone-images-x$REPEAT"
if [ ! -d "$IMAGES" ]; then
    # The same files REPEAT times (hard links), in folders 0..REPEAT-1.
    for k in $(seq 0 $((REPEAT - 1))); do
        mkdir -p "$IMAGES/$k" && cp -rl "$DATA/alone-images/." "$IMAGES/$k/" || exit 1
    done
fi
n_images=$(find "$IMAGES" -type f | wc -l)
# The torchvision recipe: the same weights, another sidecar.
cp "$DATA/trivial224.pt" "$DATA/trivial224_tv.pt"
"$PY" - "$DATA/trivial224_tv.json" <<'PY' || exit 1
import json, sys
json.dump({"input_size": [224, 224], "channels": 3, "mean": [0.485, 0.456, 0.406],
           "std": [0.229, 0.224, 0.225], "resize": [224, 224], "interpolation": "bilinear",
           "antialias": True, "crop": [224, 224]}, open(sys.argv[1], "w"))
PY
# RUNS: where both sides write (default under DATA; a tmpfs such as
# /dev/shm/alone-runs takes the file system's cost out of both).
RUNS=${RUNS:-"$DATA/alone-runs"}
rm -rf "$RUNS"
mkdir -p "$RUNS"
FSTYPE=$(df --output=fstype "$RUNS" 2>/dev/null | tail -n1)
ips() { "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(round(r['processed']/r['seconds'],1))" "$1/report.json"; }
gt() { "$PY" -c "import sys; sys.exit(0 if float('${1:-0}') > float('${2:-0}') else 1)"; }
declare -A best stages wall
best_py=""
best_py_wall=""
now() { date +%s.%N; }
elapsed() { "$PY" -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 3))" "$1" "$2"; }
for r in $(seq 1 "$ROUNDS"); do
    for recipe in $RECIPES; do
        base=${recipe%-fastjpeg}
        base=${base%-storedpng}
        model="$DATA/trivial224.pt"
        [ "$base" = torchvision ] && model="$DATA/trivial224_tv.pt"
        flags=()
        [ "${recipe%-fastjpeg}" != "$recipe" ] && flags=(--fast-jpeg)
        [ "${recipe%-storedpng}" != "$recipe" ] && flags=(--png-compression none)
        out="$RUNS/rs-$recipe-$r"
        t0=$(now)
        "$BIN" saliency --model "$model" --images "$IMAGES" --out "$out" "${flags[@]}" \
            --batch-size "$BATCH" --device cpu --score categorical:1 >/dev/null 2>&1
        w=$(elapsed "$t0" "$(now)")
        ours=$(ips "$out")
        echo "  round $r: tch-vis ($recipe) $ours images/s (whole process $w s)"
        if [ -z "${best[$recipe]}" ] || gt "$ours" "${best[$recipe]}"; then
            best[$recipe]=$ours
            wall[$recipe]=$w
            stages[$recipe]=$("$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps({k: round(v, 3) for k, v in r['timings_seconds'].items()}))" "$out/report.json")
        fi
        # Each run's outputs go before the next run: on a tmpfs they are
        # memory (1.1 GB a run at 5,000 images), which slowed later runs.
        rm -rf "$out"
    done
    t0=$(now)
    py=$("$PY" scripts/baseline_saliency.py --model "$DATA/trivial224.pt" --images "$IMAGES" \
        --out "$RUNS/py-$r" --batch-size "$BATCH" --workers "$WORKERS" --class 1 2>/dev/null \
        | sed -n 's/^python-pipeline.* s, \([0-9.]*\) images\/s.*/\1/p')
    w=$(elapsed "$t0" "$(now)")
    echo "  round $r: python $py images/s (whole process $w s)"
    rm -rf "$RUNS/py-$r"
    if [ -z "$best_py" ] || gt "$py" "$best_py"; then best_py=$py; best_py_wall=$w; fi
done
rm -rf "$RUNS"
cores=$(nproc)
for recipe in $RECIPES; do
    o=${best[$recipe]}
    echo "pipeline-alone $recipe (trivial 224 model, $n_images images, $cores cores, outputs on $FSTYPE): tch-vis $o images/s ($("$PY" -c "print(round($o/$cores,1))") per core), python $best_py images/s, ratio $("$PY" -c "print(round($o/max($best_py,1e-9),2))") (target >= 15)"
    echo "  whole processes (start to exit, fastest rounds): tch-vis ${wall[$recipe]} s, python $best_py_wall s, ratio $("$PY" -c "print(round($best_py_wall/max(${wall[$recipe]},1e-9),2))")"
    echo "  tch-vis stage seconds ($recipe, fastest round): ${stages[$recipe]}"
done
