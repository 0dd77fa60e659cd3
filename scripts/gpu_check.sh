#!/usr/bin/env bash
# One prepared check for a GPU machine without cargo (see BENCHMARKS.md).
#
# There is no cargo there: build here, copy the executables into .gpu/ (git-ignored)
# and carry it:
#
#   . /tmp/env.sh   # or: . scripts/env.sh && tch_vis_setup
#   cargo build --release --bin tch-vis --example bench_overhead
#   IT=$(cargo test --release --no-run --test it 2>&1 | grep -o 'target/release/deps/it-[a-z0-9]*' | head -n1)
#   mkdir -p .gpu/wheels && cp target/release/tch-vis target/release/examples/bench_overhead .gpu/ && cp "$IT" .gpu/it
#   pip download --no-deps captum==0.9.0 -d .gpu/wheels   # captum is not installed there
#
# then, with the `run` tool:  command "bash scripts/gpu_check.sh", carry [".gpu"].
#
# Steps (each under `timeout`, none stops the others; no `set -e`):
#   0. LD_LIBRARY_PATH from the machine's torch; captum from .gpu/wheels if missing
#   1. .gpu/it --test-threads 1   (CPU and CUDA parity tests)      -> $OUT/it.txt
#   2. .gpu/tch-vis --version
#   3. scripts/make_bench_data.py: resnet50 + 2000 mixed-size JPEGs
#   4. bench_overhead resnet50 batch 64 --device cuda, --precision fp32 / fp16 / bf16
#   5. scripts/bench_python.py, the same three precisions
#   6. tch-vis saliency on cuda, batch 64 (also per precision when the CLI has
#      --precision) vs scripts/baseline_saliency.py with 12 workers
#   7. Pearson r per image between fp32 and bf16/fp16 saliency maps
# Everything goes to $OUT/gpu.txt and stdout; the key lines are repeated at the end.
# Budget: under ~7 minutes on an H100/H200 with 16 cores.
#
# Testable here on the CPU with small sizes:
#   DEVICE=cpu GPU_CHECK_QUICK=1 OUT=/tmp/gpu-out bash scripts/gpu_check.sh
# Environment: DEVICE (cuda), GPU_CHECK_QUICK (0), GPU_CHECK_ARCH (resnet50; quick
# resnet18), N_IMAGES (2000; quick 24), BATCH (64; quick 4), WORKERS (12; quick 2),
# ITERS (50; quick 2), PRECISIONS (fp32 fp16 bf16; on cpu fp32 bf16), PYTHON (python3), GPU_DATA (bench-data/gpu[-quick]),
# BUILD_ROOT (/work/main: where the test executable was built), IT_FILTER (quick: parity).

cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
DEVICE=${DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:-0}
PY=${PYTHON:-python3}
BIN=.gpu
CLASS=1
if [ "$QUICK" = 1 ]; then
    ARCH=${GPU_CHECK_ARCH:-resnet18}; N_IMAGES=${N_IMAGES:-24}; BATCH=${BATCH:-4}
    WORKERS=${WORKERS:-2}; ITERS=${ITERS:-2}; GPU_DATA=${GPU_DATA:-bench-data/gpu-quick}
    IT_FILTER=${IT_FILTER-parity}; PEARSON_LIMIT=8
else
    ARCH=${GPU_CHECK_ARCH:-resnet50}; N_IMAGES=${N_IMAGES:-2000}; BATCH=${BATCH:-64}
    WORKERS=${WORKERS:-12}; ITERS=${ITERS:-50}; GPU_DATA=${GPU_DATA:-bench-data/gpu}
    IT_FILTER=${IT_FILTER-}; PEARSON_LIMIT=256
fi
# fp16 convolutions on a CPU are very slow: a CPU smoke test leaves fp16 out.
case "$DEVICE" in cpu) PRECISIONS=${PRECISIONS:-fp32 bf16} ;; *) PRECISIONS=${PRECISIONS:-fp32 fp16 bf16} ;; esac
OUTDIR=${OUT:-/tmp/tch-vis-gpu-out}
mkdir -p "$OUTDIR"
REPORT="$OUTDIR/gpu.txt"
SUMMARY=$(mktemp)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tch-vis-gpu.XXXXXX")
{
T_START=$(date +%s)

say() { echo "$*" | tee -a "$SUMMARY"; }
# step NAME SECONDS CMD...: runs CMD under timeout, output to stdout and $WORK/NAME.txt
step() {
    local name=$1 secs=$2 t0 st
    shift 2
    echo "--- $name: $*"
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$secs" "$@" >"$WORK/$name.txt" 2>&1
    st=$?
    cat "$WORK/$name.txt"
    echo "--- $name: status $st, $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s$([ $st -eq 124 ] || [ $st -eq 137 ] && echo " (TIMED OUT after $secs s)")"
    return $st
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a == "" || b == "" || b + 0 == 0) print "n/a"; else printf "%.3f", a / b }'; }

echo "== tch-vis gpu_check $(date -Iseconds) (QUICK=$QUICK DEVICE=$DEVICE ARCH=$ARCH N_IMAGES=$N_IMAGES BATCH=$BATCH WORKERS=$WORKERS ITERS=$ITERS)"
echo "machine: $(nproc) cores; $(nvidia-smi -L 2>/dev/null | head -n1 || echo 'no nvidia-smi')"

# 0. environment
# IEEE float32 everywhere (the CLI's default on CUDA), so the model-alone
# ceiling, the Python baselines and the pipeline compute the same thing.
export NVIDIA_TF32_OVERRIDE=${NVIDIA_TF32_OVERRIDE:-0}
TORCH_LIB=$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__)+"/lib")' 2>/dev/null)
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ! "$PY" -c 'import captum' 2>/dev/null; then
    if ls "$BIN"/wheels/captum-*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/tch-vis-site "$BIN"/wheels/captum-*.whl \
            && export PYTHONPATH="/tmp/tch-vis-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
say "python: $("$PY" -c '
import importlib.util as u, torch
v = lambda n: (__import__(n).__version__ if u.find_spec(n) else "MISSING")
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "threads", torch.get_num_threads(),
      "torchvision", v("torchvision"), "captum", v("captum"), "matplotlib", v("matplotlib"))' 2>&1)"
# The test executable looks for models/ and the CLI where it was built (BUILD_ROOT).
BUILD_ROOT=${BUILD_ROOT:-/work/main}
if [ "$ROOT" != "$BUILD_ROOT" ] && [ ! -e "$BUILD_ROOT" ]; then
    mkdir -p "$(dirname "$BUILD_ROOT")" && ln -s "$ROOT" "$BUILD_ROOT" && echo "linked $BUILD_ROOT -> $ROOT (test executable's build root)"
fi
if [ -x "$BIN/tch-vis" ] && [ ! -x target/release/tch-vis ]; then
    mkdir -p target/release && cp "$BIN/tch-vis" target/release/tch-vis
fi

# 1. tests (CPU and CUDA parity)
if [ -x "$BIN/it" ]; then
    echo "--- it: $BIN/it --test-threads 1 $IT_FILTER (full output in it.txt)"
    t0=$(date +%s)
    # shellcheck disable=SC2086
    timeout --kill-after=10 180 "$BIN/it" --test-threads 1 $IT_FILTER --nocapture >"$OUTDIR/it.txt" 2>&1
    st=$?
    grep -i -E 'parity|cuda|^test result|FAILED|panicked|error' "$OUTDIR/it.txt" | grep -v -E '\.\.\. ok$' | head -n 60
    say "tests: status $st in $(( $(date +%s) - t0 )) s; $(grep -E '^test result' "$OUTDIR/it.txt" | tail -n1)"
else
    say "tests: SKIPPED ($BIN/it missing)"
fi

# 2. CLI version and flags
CLI_PRECISION=0
if [ -x "$BIN/tch-vis" ]; then
    step version 20 "$BIN/tch-vis" --version
    say "cli: $(head -n1 "$WORK/version.txt")"
    if "$BIN/tch-vis" saliency --help 2>/dev/null | grep -q -- '--precision'; then CLI_PRECISION=1; fi
    say "cli --precision: $([ $CLI_PRECISION = 1 ] && echo yes || echo 'no (per-precision pipeline runs skipped; Pearson r from Python maps)')"
else
    say "cli: SKIPPED ($BIN/tch-vis missing)"
fi

# 3. data
MODEL="$GPU_DATA/$ARCH.pt"
ARCH_FLAGS=""
[ "$ARCH" = resnet50 ] && ARCH_FLAGS="--no-resnet18 --resnet50"
[ "$ARCH" = resnet18 ] || [ "$ARCH" = resnet50 ] || ARCH_FLAGS="--no-resnet18"
# shellcheck disable=SC2086
step data 180 "$PY" scripts/make_bench_data.py --out "$GPU_DATA" --n-images "$N_IMAGES" --png-every 0 \
    --n-digits 0 $ARCH_FLAGS
IMAGES="$GPU_DATA/images"
if [ -f "$MODEL" ]; then
    say "data: $MODEL, $(find "$IMAGES" -type f 2>/dev/null | wc -l) JPEGs in $IMAGES"
else
    say "data: $MODEL NOT made (torchvision missing or failed; see above); model steps skipped"
fi

# 4. overhead and model-alone ceiling per precision
declare -A CEIL OURS_MS
if [ -x "$BIN/bench_overhead" ] && [ -f "$MODEL" ]; then
    for p in $PRECISIONS; do
        if step "overhead-$p" 120 "$BIN/bench_overhead" --model "$MODEL" --label "$ARCH" --batch "$BATCH" \
            --size 224 --channels 3 --iters "$ITERS" --device "$DEVICE" --precision "$p" --class "$CLASS"; then
            grep -E '^(overhead|model-alone)' "$WORK/overhead-$p.txt" | while read -r l; do say "$l"; done
            CEIL[$p]=$(sed -n 's/^model-alone.*: \([0-9.]*\) images\/s.*/\1/p' "$WORK/overhead-$p.txt")
            OURS_MS[$p]=$(sed -n 's/^overhead.*: ours \([0-9.]*\) ms.*/\1/p' "$WORK/overhead-$p.txt")
        else
            say "overhead $ARCH $p: FAILED ($(tail -n1 "$WORK/overhead-$p.txt"))"
        fi
    done
    for p in $PRECISIONS; do
        [ "$p" = fp32 ] && continue
        say "speedup $ARCH batch $BATCH $p over fp32 (model-alone): ${CEIL[$p]:-n/a} vs ${CEIL[fp32]:-n/a} images/s, ratio $(ratio "${CEIL[$p]}" "${CEIL[fp32]}")"
    done
else
    say "overhead: SKIPPED (missing $BIN/bench_overhead or $MODEL)"
fi

# 5. Python autograd loop, same file, batch, score
if [ -f "$MODEL" ] && [ "${SKIP_PY_AUTOGRAD:-0}" != 1 ]; then
    for p in $PRECISIONS; do
        if step "python-$p" 120 "$PY" scripts/bench_python.py --model "$MODEL" --label "$ARCH" --batch "$BATCH" \
            --size 224 --channels 3 --iters "$ITERS" --device "$DEVICE" --precision "$p" --class "$CLASS"; then
            l=$(grep '^python-autograd' "$WORK/python-$p.txt"); say "$l"
            py=$(sed -n 's/.*: \([0-9.]*\) ms per call.*/\1/p' <<<"$l")
            say "vs-python $ARCH batch $BATCH $DEVICE $p: ours ${OURS_MS[$p]:-n/a} ms, python ${py:-n/a} ms, ratio $(ratio "${OURS_MS[$p]}" "$py") (ours/python; target <= 1.00)"
        else
            say "python-autograd $ARCH $p: FAILED ($(tail -n1 "$WORK/python-$p.txt"))"
        fi
    done
fi

# 6. pipeline
declare -A IPS
if [ -x "$BIN/tch-vis" ] && [ -f "$MODEL" ]; then
    PIPE_PRECISIONS=fp32
    [ $CLI_PRECISION = 1 ] && PIPE_PRECISIONS=$PRECISIONS
    for p in $PIPE_PRECISIONS; do
        extra=()
        [ $CLI_PRECISION = 1 ] && extra=(--precision "$p")
        if step "pipeline-$p" 180 "$BIN/tch-vis" saliency --model "$MODEL" --images "$IMAGES" --out "$WORK/cli-$p" \
            --batch-size "$BATCH" --overwrite --device "$DEVICE" --score "categorical:$CLASS" "${extra[@]}"; then
            read -r n s ips < <("$PY" -c "import json,sys;r=json.load(open(sys.argv[1]));print(r['processed'],f\"{r['seconds']:.2f}\",f\"{r['images_per_second']:.1f}\")" "$WORK/cli-$p/report.json")
            IPS[$p]=$ips
            say "  timings $p: $("$PY" -c "import json,sys;r=json.load(open(sys.argv[1]));print(', '.join(f'{k} {v:.2f}s' for k,v in r.get('timings_seconds',{}).items()))" "$WORK/cli-$p/report.json")"
            say "tch-vis-pipeline $ARCH batch $BATCH $DEVICE $p: $n images in $s s, $ips images/s; ceiling ${CEIL[$p]:-n/a} images/s, pipeline/ceiling $(ratio "$ips" "${CEIL[$p]}") (target >= 0.90)"
        else
            say "tch-vis-pipeline $ARCH $p: FAILED ($(tail -n1 "$WORK/pipeline-$p.txt"))"
        fi
    done
fi
if [ -f "$MODEL" ]; then
    if step python-pipeline 300 "$PY" scripts/baseline_saliency.py --model "$MODEL" --images "$IMAGES" \
        --out "$WORK/py-fp32" --batch-size "$BATCH" --workers "$WORKERS" --device "$DEVICE" --class "$CLASS" --label "$ARCH" \
        ${PY_LIMIT:+--limit "$PY_LIMIT"}; then
        l=$(grep '^python-pipeline' "$WORK/python-pipeline.txt"); say "$l"
        pips=$(sed -n 's/.* s, \([0-9.]*\) images\/s.*/\1/p' <<<"$l")
        say "pipeline $ARCH batch $BATCH $DEVICE fp32: tch-vis ${IPS[fp32]:-n/a} images/s, python ${pips:-n/a} images/s, ratio $(ratio "${IPS[fp32]}" "$pips") (target >= 20)"
    else
        say "python-pipeline $ARCH: FAILED ($(tail -n1 "$WORK/python-pipeline.txt"))"
    fi
fi

# 7. agreement of half-precision maps with fp32: Pearson r per image
pearson() {  # DIR_FP32 DIR_OTHER LABEL
    "$PY" - "$1" "$2" "$3" <<'EOF'
import os, sys
import numpy as np
a_dir, b_dir, label = sys.argv[1:4]
rs, bad = [], 0
for d, _, fs in os.walk(a_dir):
    for f in fs:
        if not f.endswith(".saliency.npy"):
            continue
        pa = os.path.join(d, f)
        pb = os.path.join(b_dir, os.path.relpath(pa, a_dir))
        if not os.path.exists(pb):
            bad += 1
            continue
        a = np.load(pa).astype(np.float64).ravel()
        b = np.load(pb).astype(np.float64).ravel()
        r = np.corrcoef(a, b)[0, 1] if a.std() > 0 and b.std() > 0 else float("nan")
        rs.append(r)
rs = np.array(rs)
if rs.size == 0:
    print(f"pearson {label}: no pairs ({bad} missing)")
else:
    ok = rs[np.isfinite(rs)]
    print(f"pearson {label}: {rs.size} images, r min {np.nanmin(rs):.4f}, mean {np.nanmean(rs):.4f}, "
          f"{(ok < 0.99).sum()} below 0.99, {rs.size - ok.size} undefined, {bad} missing (target r >= 0.99)")
EOF
}
if [ -f "$MODEL" ]; then
    for p in $PRECISIONS; do
        [ "$p" = fp32 ] && continue
        if [ $CLI_PRECISION = 1 ]; then
            if [ -d "$WORK/cli-fp32" ] && [ -d "$WORK/cli-$p" ]; then
                say "$(pearson "$WORK/cli-fp32" "$WORK/cli-$p" "tch-vis $ARCH fp32 vs $p" 2>&1 | tail -n1)"
            fi
        else
            # The CLI has no --precision: the same maps from the Python job (plain
            # autograd, half weights as tch-vis does), on the first $PEARSON_LIMIT images.
            for q in fp32 "$p"; do
                [ -d "$WORK/pyp-$q" ] && continue
                step "pyp-$q" 120 "$PY" scripts/baseline_saliency.py --model "$MODEL" --images "$IMAGES" \
                    --out "$WORK/pyp-$q" --batch-size "$BATCH" --workers "$WORKERS" --device "$DEVICE" \
                    --class "$CLASS" --label "$ARCH" --no-captum --precision "$q" --limit "$PEARSON_LIMIT" >/dev/null
            done
            say "$(pearson "$WORK/pyp-fp32" "$WORK/pyp-$p" "python-maps $ARCH fp32 vs $p (CLI lacks --precision)" 2>&1 | tail -n1)"
        fi
    done
fi

echo
echo "================ summary ($(( $(date +%s) - T_START )) s) ================"
cat "$SUMMARY"
rm -rf "$WORK" "$SUMMARY"
} 2>&1 | tee "$REPORT"
exit "${PIPESTATUS[0]}"
