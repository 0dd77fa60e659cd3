#!/usr/bin/env bash
# Class activation map benchmarks on the CPU: tch-vis's CAMs against the
# folder job a pytorch-grad-cam user writes, measured side by side in one run
# on one machine, on the same network (resnet18, random seeded weights) and
# the same images.
#
#   scripts/bench_cam.sh            about 5 minutes on 2 cores
#
# Rust side: examples/bench_cam.rs (the library's batch engine: decode
# threads, padded batches, writer threads; one heatmap PNG per image) on
# $DATA/resnet18_cam.pt from scripts/export_cam_model.py, and on the same
# model exported with --freeze ($DATA/resnet18_cam_frozen.pt: batch norms
# folded into the convolutions, channels-last constant weights), the form a
# CPU deployment of a TorchScript model takes. Python side:
# scripts/bench_cam.py (eager torchvision resnet18 with the same weights,
# target_layers=[model.layer4[-1]], DataLoader, PIL, Resize 256 + CenterCrop
# 224, show_cam_on_image PNGs). pytorch-grad-cam has no Faster-Score-CAM: ours
# is compared against our Score-CAM.
#
# Environment:
#   N_IMAGES  images for Grad-CAM, Grad-CAM++, Layer-CAM, Faster-Score-CAM (default 40)
#   N_SCORE   images for Score-CAM, 512 masked forward passes each (default 3)
#   BATCH     images per batch, both sides (default 8; Score-CAM: 1, so no
#             side computes padding or waits for a batch to fill)
#   WORKERS   DataLoader workers of the Python job (default 2)
#   ROUNDS    alternations of the two sides for every method but Score-CAM;
#             each side keeps its fastest round (default 3)
#   METHODS   which to run (default "gradcam gradcam++ layercam scorecam fasterscorecam")
#   DATA      data folder (default bench-data, git-ignored)
#   SKIP_BUILD  1 = use target/release/examples/bench_cam as it is
#   RUST_FLAGS  more flags for examples/bench_cam (e.g. --channels-last)
#
# One labelled line per method: ours, the baseline, the ratio and its target.
# Everything is also written to $DATA/bench-cam-<date>.txt.

cd "$(dirname "$0")/.." || exit 1

DATA=${DATA:-bench-data}
N_IMAGES=${N_IMAGES:-40}
N_SCORE=${N_SCORE:-3}
BATCH=${BATCH:-8}
WORKERS=${WORKERS:-2}
ROUNDS=${ROUNDS:-3}
METHODS=${METHODS:-gradcam gradcam++ layercam scorecam fasterscorecam}

mkdir -p "$DATA"
LOG="$DATA/bench-cam-$(date +%Y%m%d-%H%M%S).txt"
{

# shellcheck source=scripts/env.sh
. scripts/env.sh
tch_vis_setup || exit 1
# shellcheck source=scripts/golden_env.sh
. scripts/golden_env.sh
tch_vis_golden_setup || exit 1
PY="$TCH_VIS_GOLDEN_VENV/bin/python"

echo "== tch-vis CAM benchmarks $(date -Iseconds)"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(uname -sr)"
echo "git: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty tree)')"
echo "python: $("$PY" -c 'import torch, torchvision, importlib.metadata as m; print("torch", torch.__version__, "threads", torch.get_num_threads(), "torchvision", torchvision.__version__, "grad-cam", m.version("grad-cam"))')"
echo "settings: N_IMAGES=$N_IMAGES N_SCORE=$N_SCORE BATCH=$BATCH WORKERS=$WORKERS DATA=$DATA"

echo "== build"
if [ "${SKIP_BUILD:-0}" = 1 ]; then
    echo "bench_cam: SKIP_BUILD=1: using target/release/examples/bench_cam"
else
    cargo build --release --example bench_cam || echo "bench_cam: build failed (status $?)"
fi
RS=target/release/examples/bench_cam

echo "== data"
"$PY" scripts/make_bench_data.py --out "$DATA" --n-images "$N_IMAGES" --images-dir cam-images \
    --n-digits 0 --no-resnet18 || echo "bench_cam: make_bench_data failed (status $?)"
MODEL="$DATA/resnet18_cam.pt"
if [ ! -f "$MODEL" ] || [ ! -f "${MODEL%.pt}.json" ]; then
    "$PY" scripts/export_cam_model.py torchvision resnet18 --seed 0 --out "$MODEL" \
        || echo "bench_cam: export failed (status $?)"
fi
FROZEN="$DATA/resnet18_cam_frozen.pt"
if [ ! -f "$FROZEN" ] || [ ! -f "${FROZEN%.pt}.json" ]; then
    "$PY" scripts/export_cam_model.py torchvision resnet18 --seed 0 --freeze --out "$FROZEN" \
        || echo "bench_cam: frozen export failed (status $?)"
fi
IMAGES="$DATA/cam-images"
LIST="$DATA/cam-list.txt"
LIST_SCORE="$DATA/cam-list-score.txt"
(cd "$IMAGES" && find . -type f | sed 's|^\./||' | LC_ALL=C sort) >"$LIST"
head -n "$N_SCORE" "$LIST" >"$LIST_SCORE"
OUT="$DATA/cam-out"

# ips LINE: the number before " images/s" in LINE
ips() { sed -n 's/.*: \([0-9.]*\) images\/s.*/\1/p' <<<"$1" | head -n1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a == "" || b == "" || b + 0 == 0) print "n/a"; else printf "%.2f", a / b }'; }

# rust METHOD LIST BATCH: the Rust job's line (or why it failed)
# rust METHOD LIST BATCH MODEL
rust() {
    local out
    rm -rf "$OUT/rust/$1"
    if [ ! -x "$RS" ]; then echo "rust-cam $1: SKIPPED ($RS not built)"; return; fi
    # shellcheck disable=SC2086
    out=$("$RS" --model "$4" --images "$IMAGES" --list "$2" --method "$1" --batch-size "$3" \
        --out "$OUT/rust/$1" $RUST_FLAGS 2>&1)
    grep '^rust-cam' <<<"$out" | sed "s|\$| [$(basename "$4")]|" \
        || echo "rust-cam $1: FAILED: $(tail -n 2 <<<"$out" | tr '\n' ' ')"
}

# python METHOD LIST BATCH: the Python job's line (or why it failed)
python_job() {
    local out
    rm -rf "$OUT/python/$1"
    out=$("$PY" scripts/bench_cam.py --method "$1" --images "$IMAGES" --list "$2" --batch-size "$3" \
        --workers "$WORKERS" --out "$OUT/python/$1" 2>&1)
    grep '^python-cam' <<<"$out" || echo "python-cam $1: FAILED: $(tail -n 2 <<<"$out" | tr '\n' ' ')"
}

# busy: CPU seconds of the whole machine so far (user + nice + system +
# irq + softirq + steal, /proc/stat); mine: CPU seconds of this script's
# finished children. Their difference over the measurements is what other
# processes took: the load average counts waiting tasks of other containers
# too and says little here.
busy() { awk '/^cpu /{printf "%.2f", ($2 + $3 + $4 + $7 + $8 + $9) / 100}' /proc/stat; }
# (`times` runs in this shell: in a command substitution it would report the
# substitution's own, empty, children.)
TIMES="$DATA/.bench-cam-times"
mine() { tail -n 1 "$TIMES" | awk '{ t = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] } printf "%.2f", t }'; }
faster() { awk -v a="$1" -v b="$2" 'BEGIN{exit !(b == "" || (a != "" && a + 0 > b + 0))}'; }

echo "load average before measuring: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== measurements (tch-vis, then pytorch-grad-cam, per method; $ROUNDS rounds but Score-CAM, fastest kept)"
declare -A OURS FROZ PYTHON
# keep BEST LINE: prints this round's LINE, and keeps its images/s in the
# associative array BEST under the method $m when it is the fastest yet.
keep() {
    local -n best=$1
    local v
    echo "  round $r: $2"
    v=$(ips "$2")
    if faster "$v" "${best[$m]}"; then best[$m]=$v; fi
}
times >"$TIMES"
B0=$(busy) M0=$(mine) T0=$(date +%s.%N)
for m in $METHODS; do
    case "$m" in
    scorecam) list=$LIST_SCORE batch=1 rounds=1 ;;
    *) list=$LIST batch=$BATCH rounds=$ROUNDS ;;
    esac
    for r in $(seq "$rounds"); do
        keep OURS "$(rust "$m" "$list" "$batch" "$MODEL")"
        keep FROZ "$(rust "$m" "$list" "$batch" "$FROZEN")"
        [ "$m" != fasterscorecam ] && keep PYTHON "$(python_job "$m" "$list" "$batch")"
    done
done
times >"$TIMES"
B1=$(busy) M1=$(mine) T1=$(date +%s.%N)
rm -f "$TIMES"
echo "cpu taken by other processes while measuring: $(awk -v b0="$B0" -v b1="$B1" -v m0="$M0" -v m1="$M1" -v t0="$T0" -v t1="$T1" -v n="$(nproc)" 'BEGIN{ o = (b1 - b0) - (m1 - m0); if (o < 0) o = 0; printf "%.0f%% of %d cores over %.0f s", 100 * o / ((t1 - t0) * n), n, t1 - t0 }')"

echo "== results (cpu, resnet18 random weights, predicted class, heatmap PNGs written)"
for m in $METHODS; do
    case "$m" in
    gradcam | gradcam++ | layercam)
        echo "cam $m: tch-vis ${OURS[$m]:-n/a} images/s, pytorch-grad-cam ${PYTHON[$m]:-n/a} images/s, ratio $(ratio "${OURS[$m]}" "${PYTHON[$m]}"); frozen export ${FROZ[$m]:-n/a} images/s, ratio $(ratio "${FROZ[$m]}" "${PYTHON[$m]}") (target >= 4; $N_IMAGES images, batch $BATCH)" ;;
    scorecam)
        echo "cam scorecam: tch-vis ${OURS[$m]:-n/a} images/s, pytorch-grad-cam ${PYTHON[$m]:-n/a} images/s, ratio $(ratio "${OURS[$m]}" "${PYTHON[$m]}"); frozen export ${FROZ[$m]:-n/a} images/s, ratio $(ratio "${FROZ[$m]}" "${PYTHON[$m]}") (target >= 1.2; $N_SCORE images, batch 1)" ;;
    fasterscorecam)
        echo "cam fasterscorecam: tch-vis ${OURS[$m]:-n/a} images/s, tch-vis scorecam ${OURS[scorecam]:-n/a} images/s, ratio $(ratio "${OURS[$m]}" "${OURS[scorecam]}"); frozen export ${FROZ[$m]:-n/a} vs ${FROZ[scorecam]:-n/a}, ratio $(ratio "${FROZ[$m]}" "${FROZ[scorecam]}") (target >= 20; max_n 10, $N_IMAGES images, batch $BATCH)" ;;
    esac
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== done $(date -Iseconds); log: $LOG"

} 2>&1 | tee "$LOG"
