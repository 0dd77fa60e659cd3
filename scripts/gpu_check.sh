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
#   LIB=$(cargo test --release --lib --no-run 2>&1 | grep -o 'target/release/deps/tch_vis-[a-z0-9]*' | head -n1)
#   cp "$LIB" .gpu/lib-tests   # optional: the library's unit tests (CUDA ones among them)
#   pip download --no-deps captum==0.9.0 -d .gpu/wheels   # captum is not installed there
#
# then, with the `run` tool:  command "bash scripts/gpu_check.sh", carry [".gpu"].
#
# Steps (each under `timeout`, none stops the others; no `set -e`):
#   0. LD_LIBRARY_PATH from the machine's torch; captum from .gpu/wheels if missing
#   1. .gpu/it --test-threads $IT_THREADS (CPU and CUDA tests)     -> $OUT/it.txt
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
# BUILD_ROOT (/work/main: where the test executable was built), IT_FILTER (quick: parity),
# DICT_LAYER (the camdict node; resnet18/34 layer4.1.relu_1, else layer4.2.relu_2).

cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
DEVICE=${DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:-0}
PY=${PYTHON:-python3}
BIN=.gpu
CLASS=1
REPEAT=${REPEAT:-1}
if [ "$QUICK" = 1 ]; then
    ARCH=${GPU_CHECK_ARCH:-resnet18}; N_IMAGES=${N_IMAGES:-24}; BATCH=${BATCH:-4}
    WORKERS=${WORKERS:-2}; ITERS=${ITERS:-2}; GPU_DATA=${GPU_DATA:-bench-data/gpu-quick}
    IT_FILTER=${IT_FILTER-parity}; PEARSON_LIMIT=8; IT_THREADS=${IT_THREADS:-1}
    CAM_LIMIT=${CAM_LIMIT:-8}; SCORECAM_LIMIT=${SCORECAM_LIMIT:-1}
else
    ARCH=${GPU_CHECK_ARCH:-resnet50}; N_IMAGES=${N_IMAGES:-2000}; BATCH=${BATCH:-64}
    WORKERS=${WORKERS:-12}; ITERS=${ITERS:-50}; GPU_DATA=${GPU_DATA:-bench-data/gpu}
    IT_FILTER=${IT_FILTER-}; PEARSON_LIMIT=256; IT_THREADS=${IT_THREADS:-8}
    CAM_LIMIT=${CAM_LIMIT:-0}; SCORECAM_LIMIT=${SCORECAM_LIMIT:-16}; PY_LIMIT=${PY_LIMIT:-640}
fi
# The dict form's node: the last residual block's output (the methods
# export's features).
case $ARCH in
resnet18 | resnet34) DICT_LAYER=${DICT_LAYER:-layer4.1.relu_1} ;;
*) DICT_LAYER=${DICT_LAYER:-layer4.2.relu_2} ;;
esac
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
# STEPS: the sections to run (default all): tests profile overhead python
# pipeline pypipeline pearson cam camold camfrozen camdict scorecam camceil tv tvold digits
# (camold, tvold: the Grad-CAM and torchvision-recipe jobs again with
# $BIN/tch-vis-old, a previous binary, for a same-machine A/B; camceil: the
# CAM export's own model-alone ceiling per precision). REPEAT=N runs the
# pipeline and tv jobs N times in turn (default 1); every timed job starts
# after a `sync`, so no earlier step's writeback lands in it.
want() { case " ${STEPS:-tests profile overhead python pipeline pypipeline pearson cam camold camfrozen camdict scorecam camceil tv tvold digits} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# ips_of DIR: processed, seconds, images/s, steady images/s (after the
# startup: model load, CUDA start, probe), startup seconds, from report.json
ips_of() { "$PY" -c "import json,sys;r=json.load(open(sys.argv[1]));n=r['processed'];s=r['seconds'];u=r.get('startup_seconds',0.0);fb=r.get('steady_images_per_second');print(n,f'{s:.2f}',f\"{r['images_per_second']:.1f}\",f'{n/max(s-u,1e-9):.1f}',f'{u:.2f}',f'{fb:.1f}' if fb else 'n/a')" "$1/report.json"; }
timings_of() { "$PY" -c "import json,sys;r=json.load(open(sys.argv[1]));print(', '.join(f'{k} {v:.2f}s' for k,v in r.get('timings_seconds',{}).items()))" "$1/report.json"; }
# same_files DIR_A DIR_B SUFFIX LABEL: how many of A's SUFFIX files B has byte for byte
same_files() {
    local total=0 same=0 f
    while IFS= read -r f; do
        total=$((total + 1))
        cmp -s "$1/$f" "$2/$f" && same=$((same + 1))
    done < <(cd "$1" && find . -name "*$3" | LC_ALL=C sort)
    echo "identical $4: $same of $total $3 files byte for byte"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a == "" || a == "n/a" || b == "" || b == "n/a" || b + 0 == 0) print "n/a"; else printf "%.3f", a / b }'; }
# pearson DIR_FP32 DIR_OTHER LABEL [SUFFIX]: Pearson r per image between
# the SUFFIX arrays of two runs
pearson() {
    "$PY" - "$1" "$2" "$3" "${4:-.saliency.npy}" <<'EOF'
import os, sys
import numpy as np
a_dir, b_dir, label, suffix = sys.argv[1:5]
rs, bad = [], 0
for d, _, fs in os.walk(a_dir):
    for f in fs:
        if not f.endswith(suffix):
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

echo "== tch-vis gpu_check $(date -Iseconds) (QUICK=$QUICK DEVICE=$DEVICE ARCH=$ARCH N_IMAGES=$N_IMAGES BATCH=$BATCH WORKERS=$WORKERS ITERS=$ITERS)"
echo "machine: $(nproc) cores; $(nvidia-smi -L 2>/dev/null | head -n1 || echo 'no nvidia-smi')"

# 0. environment
# IEEE float32 everywhere (the CLI's default on CUDA), so the model-alone
# ceiling, the Python baselines and the pipeline compute the same thing.
# NVIDIA_TF32_OVERRIDE=unset runs without it (as a user's shell would).
if [ "${NVIDIA_TF32_OVERRIDE:-}" = unset ]; then
    unset NVIDIA_TF32_OVERRIDE
else
    export NVIDIA_TF32_OVERRIDE=${NVIDIA_TF32_OVERRIDE:-0}
fi
say "NVIDIA_TF32_OVERRIDE: ${NVIDIA_TF32_OVERRIDE-unset}"
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
if want tests && [ -x "$BIN/it" ]; then
    echo "--- it: $BIN/it --test-threads $IT_THREADS $IT_FILTER (full output in it.txt)"
    t0=$(date +%s)
    # shellcheck disable=SC2086
    timeout --kill-after=10 ${IT_TIMEOUT:-240} "$BIN/it" --test-threads "$IT_THREADS" $IT_FILTER --nocapture >"$OUTDIR/it.txt" 2>&1
    st=$?
    grep -i -E 'parity|cuda|^test result|FAILED|panicked|error' "$OUTDIR/it.txt" | grep -v -E '\.\.\. ok$' | head -n 60
    grep -E '^parity .*Cuda' "$OUTDIR/it.txt" | while read -r l; do say "$l"; done
    # Failures again with libtorch, oneDNN and MKL held to AVX2 kernels (the
    # instruction set the CPU goldens were computed with): tells float-sum
    # order effects of a wider vector unit from real differences.
    mapfile -t FAILED_TESTS < <(sed -n 's/^test \(.*\) \.\.\. FAILED$/\1/p' "$OUTDIR/it.txt")
    if [ ${#FAILED_TESTS[@]} -gt 0 ]; then
        timeout --kill-after=10 120 env ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 DNNL_MAX_CPU_ISA=AVX2 \
            MKL_ENABLE_INSTRUCTIONS=AVX2 MKL_CBWR=AVX2 "$BIN/it" --exact --test-threads 4 "${FAILED_TESTS[@]}" \
            >"$OUTDIR/it-avx2.txt" 2>&1
        say "tests failed (${FAILED_TESTS[*]}) rerun with AVX2 kernels: $(grep -E '^test result' "$OUTDIR/it-avx2.txt" | tail -n1)"
        grep -E 'max \|diff\||not close' "$OUTDIR/it-avx2.txt" | head -n 5 | while read -r l; do say "  $l"; done
    fi
    say "tests: status $st in $(( $(date +%s) - t0 )) s; $(grep -E '^test result' "$OUTDIR/it.txt" | tail -n1)"
    # The engine's tests again with its experimental CUDA overlaps on.
    timeout --kill-after=10 120 env TCH_VIS_CUDA_OVERLAP=1 "$BIN/it" --test-threads "$IT_THREADS" saliency:: \
        >"$OUTDIR/it-overlap.txt" 2>&1
    say "tests saliency:: with TCH_VIS_CUDA_OVERLAP=1: status $?; $(grep -E '^test result' "$OUTDIR/it-overlap.txt" | tail -n1)"
    # The library's own unit tests (the engine's CUDA ones among them: the
    # copy stream, its device twins), when built and copied as lib-tests.
    if [ -x "$BIN/lib-tests" ]; then
        timeout --kill-after=10 120 "$BIN/lib-tests" --test-threads 4 >"$OUTDIR/lib-tests.txt" 2>&1
        say "library unit tests: status $?; $(grep -E '^test result' "$OUTDIR/lib-tests.txt" | tail -n1)"
        grep -E 'FAILED|panicked' "$OUTDIR/lib-tests.txt" | head -n 5 | while read -r l; do say "  $l"; done
    fi
elif want tests; then
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
# The data's dirty pages written back now, not while a timed run writes.
sync
if [ -f "$MODEL" ]; then
    say "data: $MODEL, $(find "$IMAGES" -type f 2>/dev/null | wc -l) JPEGs in $IMAGES"
else
    say "data: $MODEL NOT made (torchvision missing or failed; see above); model steps skipped"
fi

# 3b. per-stage CPU profile on this machine's cores (one thread, ms per image)
if want profile && [ -x "$BIN/profile_stages" ] && [ -d "$IMAGES" ]; then
    PROFILE_DIR="$IMAGES/b"; [ -d "$PROFILE_DIR" ] || PROFILE_DIR="$IMAGES"
    for r in plain torchvision; do
        if step "profile-$r" 90 "$BIN/profile_stages" --images "$PROFILE_DIR" --recipe $r --passes 2 --no-png-sweep; then
            head -n 12 "$WORK/profile-$r.txt" | while read -r l; do say "  profile $r: $l"; done
        fi
    done
fi

# 4. overhead and model-alone ceiling per precision
# ceiling_step NAME MODEL LABEL P: bench_overhead on MODEL in precision P
# (step NAME), its lines to the summary; model_alone NAME: its images/s.
ceiling_step() {
    step "$1" 120 "$BIN/bench_overhead" --model "$2" --label "$3" --batch "$BATCH" \
        --size 224 --channels 3 --iters "$ITERS" --device "$DEVICE" --precision "$4" --class "$CLASS" || return
    grep -E '^(overhead|model-alone)' "$WORK/$1.txt" | while read -r l; do say "$l"; done
}
model_alone() { sed -n 's/^model-alone.*: \([0-9.]*\) images\/s.*/\1/p' "$WORK/$1.txt"; }
declare -A CEIL OURS_MS
if want overhead && [ -x "$BIN/bench_overhead" ] && [ -f "$MODEL" ]; then
    for p in $PRECISIONS; do
        if ceiling_step "overhead-$p" "$MODEL" "$ARCH" "$p"; then
            CEIL[$p]=$(model_alone "overhead-$p")
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
if want python && [ -f "$MODEL" ] && [ "${SKIP_PY_AUTOGRAD:-0}" != 1 ]; then
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
# THREAD_CPU=1: each pipeline job under scripts/thread_cpu.py (CPU seconds
# and preemptions by thread group, in the summary).
TC=()
# THREAD_CPU_FLAGS=--wchan adds where each thread group waits.
read -r -a TC_FLAGS <<< "${THREAD_CPU_FLAGS:-}"
[ "${THREAD_CPU:-0}" = 1 ] && TC=("$PY" scripts/thread_cpu.py "${TC_FLAGS[@]}" --label LABEL --)
if want pipeline && [ -x "$BIN/tch-vis" ] && [ -f "$MODEL" ]; then
    PIPE_PRECISIONS=fp32
    [ $CLI_PRECISION = 1 ] && PIPE_PRECISIONS=$PRECISIONS
    for rep in $(seq "$REPEAT"); do
        RUN_TAG=""; [ "$REPEAT" -gt 1 ] && RUN_TAG=" (run $rep of $REPEAT)"
        for p in $PIPE_PRECISIONS; do
            # PIPE_FLAGS: more CLI flags for these runs (e.g. --fast-jpeg).
            read -r -a extra <<< "${PIPE_FLAGS:-}"
            [ $CLI_PRECISION = 1 ] && extra+=(--precision "$p")
            sync
            if step "pipeline-$p" 180 "${TC[@]/LABEL/$p}" "$BIN/tch-vis" saliency --model "$MODEL" --images "$IMAGES" --out "$WORK/cli-$p" \
                --batch-size "$BATCH" --overwrite --device "$DEVICE" --score "categorical:$CLASS" "${extra[@]}"; then
                read -r n s ips steady up fb < <(ips_of "$WORK/cli-$p")
                grep -E '^thread-(cpu|wait)' "$WORK/pipeline-$p.txt" | while read -r l; do say "  $l"; done
                IPS[$p]=$ips
                say "  timings $p: $(timings_of "$WORK/cli-$p")"
                say "tch-vis-pipeline$RUN_TAG $ARCH batch $BATCH $DEVICE $p: $n images in $s s, $ips images/s (steady $steady after $up s of startup; past the first batch $fb); ceiling ${CEIL[$p]:-n/a} images/s, pipeline/ceiling $(ratio "$ips" "${CEIL[$p]}"), steady $(ratio "$steady" "${CEIL[$p]}"), past the first batch $(ratio "$fb" "${CEIL[$p]}") (target >= $([ "$p" = fp32 ] && echo 0.90 || echo 0.80))"
            else
                say "tch-vis-pipeline$RUN_TAG $ARCH $p: FAILED ($(tail -n1 "$WORK/pipeline-$p.txt"))"
            fi
        done
        # Same-machine A/Bs: an older binary ($BIN/tch-vis-old: old in fp32,
        # old16 in fp16, oldbf16 in bf16), two malloc arenas in fp32 (the
        # setting before one arena per core), and this binary with its
        # experimental CUDA overlaps on (TCH_VIS_CUDA_OVERLAP=1: ov32, ov16,
        # ovbf16; ovcopy16 and ovqueue16 one at a time, in fp16) or named
        # off (TCH_VIS_CUDA_OVERLAP=0: noov32, noov16, noovbf16, against a run
        # of the whole script with TCH_VIS_CUDA_OVERLAP=1 exported).
        for v in ${AB_VARIANTS:-old arena2}; do
            exe="$BIN/tch-vis"; envs=(); vp=fp32
            case $v in old*) [ -x "$BIN/tch-vis-old" ] || continue; exe="$BIN/tch-vis-old" ;; esac
            case $v in *16) vp=fp16 ;; esac
            case $v in *bf16) vp=bf16 ;; esac
            [ $v = arena2 ] && envs=(MALLOC_ARENA_MAX=2)
            case $v in ov32 | ov16 | ovbf16) envs=(TCH_VIS_CUDA_OVERLAP=1) ;; ovcopy16) envs=(TCH_VIS_CUDA_OVERLAP=copy) ;; ovqueue16) envs=(TCH_VIS_CUDA_OVERLAP=queue) ;; noov*) envs=(TCH_VIS_CUDA_OVERLAP=0) ;; esac
            sync
            if step "pipeline-$v" 120 env "${envs[@]}" "${TC[@]/LABEL/$v}" "$exe" saliency --model "$MODEL" --images "$IMAGES" --out "$WORK/cli-$v" \
                --batch-size "$BATCH" --overwrite --device "$DEVICE" --score "categorical:$CLASS" --precision $vp; then
                read -r n s ips steady up fb < <(ips_of "$WORK/cli-$v")
                grep -E '^thread-(cpu|wait)' "$WORK/pipeline-$v.txt" | while read -r l; do say "  $l"; done
                say "  timings $v: $(timings_of "$WORK/cli-$v")"
                say "tch-vis-pipeline-$v$RUN_TAG $ARCH batch $BATCH $DEVICE $vp: $n images in $s s, $ips images/s (steady $steady after $up s of startup; past the first batch $fb); pipeline/ceiling $(ratio "$ips" "${CEIL[$vp]}")"
                case $v in old* | ov* | noov*) [ -d "$WORK/cli-$vp" ] && say "$(same_files "$WORK/cli-$vp" "$WORK/cli-$v" .saliency.npy "saliency $ARCH $vp this binary vs $v")" ;; esac
                case $v in old16 | oldbf16 | ov* | noov*) [ -d "$WORK/cli-$vp" ] && say "$(pearson "$WORK/cli-$vp" "$WORK/cli-$v" "saliency $ARCH $vp this binary vs $v" 2>&1 | tail -n1)" ;; esac
            fi
        done
    done
fi
if want pypipeline && [ -f "$MODEL" ]; then
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
if want pearson && [ -f "$MODEL" ]; then
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

# 8. CAMs on resnet50 (random weights, torchvision recipe), against the model alone
CAM_MODEL="$GPU_DATA/${ARCH}_cam.pt"
if { want cam || want camfrozen || want camdict || want scorecam || want camceil || { want tv && [ "${TV_ON:-traced}" = cam ]; }; } && [ ! -f "$CAM_MODEL" ]; then
    step cam-export 120 "$PY" scripts/export_cam_model.py torchvision "$ARCH" --out "$CAM_MODEL"
fi
declare -A CAM_CEIL
if { want cam || want camfrozen || want camdict || want scorecam; } && [ -f "$CAM_MODEL" ]; then
    if step cam-ceiling 120 "$PY" scripts/bench_forward.py --model "$CAM_MODEL" --label "$ARCH" --batch "$BATCH" \
        --iters "$((ITERS < 30 ? ITERS : 30))" --device "$DEVICE"; then
        grep -E '^(forward|gradcam)-alone' "$WORK/cam-ceiling.txt" | while read -r l; do say "$l"; done
        CAM_CEIL[forward]=$(sed -n 's/^forward-alone.*, \([0-9.]*\) images\/s/\1/p' "$WORK/cam-ceiling.txt")
        CAM_CEIL[gradcam]=$(sed -n 's/^gradcam-alone.*, \([0-9.]*\) images\/s/\1/p' "$WORK/cam-ceiling.txt")
    fi
    find "$IMAGES" -type f | LC_ALL=C sort >"$WORK/all.txt"
    [ "$CAM_LIMIT" -gt 0 ] && head -n "$CAM_LIMIT" "$WORK/all.txt" >"$WORK/cam.txt" || cp "$WORK/all.txt" "$WORK/cam.txt"
    head -n 256 "$WORK/all.txt" >"$WORK/fsc.txt"
    head -n "$SCORECAM_LIMIT" "$WORK/all.txt" >"$WORK/sc.txt"
    for m in gradcam gradcam++ layercam fasterscorecam scorecam; do
        case $m in *scorecam) want scorecam || continue ;; *) want cam || continue ;; esac
        list="$WORK/cam.txt"
        [ $m = fasterscorecam ] && list="$WORK/fsc.txt"
        [ $m = scorecam ] && list="$WORK/sc.txt"
        d="$WORK/cam-$m"
        if step "cam-$m" 150 "$BIN/tch-vis" cam --model "$CAM_MODEL" --images-from "$list" --root "$IMAGES" --out "$d" \
            --batch-size "$BATCH" --overwrite --device "$DEVICE" --method "$m" --cam-batch "$BATCH"; then
            read -r n s ips steady up fb < <(ips_of "$d")
            say "  cam timings $m: $(timings_of "$d")"
            say "tch-vis-cam $m $ARCH batch $BATCH $DEVICE fp32: $n images in $s s, $ips images/s (steady $steady after $up s of startup; past the first batch $fb); forward-pass ceiling ${CAM_CEIL[forward]:-n/a}: ratio $(ratio "$ips" "${CAM_CEIL[forward]}"), steady $(ratio "$steady" "${CAM_CEIL[forward]}"), past the first batch $(ratio "$fb" "${CAM_CEIL[forward]}") (target >= 0.90 for the Grad-CAM family); gradcam-alone ${CAM_CEIL[gradcam]:-n/a}: steady $(ratio "$steady" "${CAM_CEIL[gradcam]}")"
        else
            say "tch-vis-cam $m $ARCH: FAILED ($(tail -n1 "$WORK/cam-$m.txt"))"
        fi
    done
    # The same Grad-CAM job with the previous binary ($BIN/tch-vis-old), for
    # a same-machine A/B.
    if want camold && [ -x "$BIN/tch-vis-old" ]; then
        d="$WORK/cam-old-gradcam"
        if step cam-old-gradcam 150 "$BIN/tch-vis-old" cam --model "$CAM_MODEL" --images-from "$WORK/cam.txt" \
            --root "$IMAGES" --out "$d" --batch-size "$BATCH" --overwrite --device "$DEVICE" --method gradcam; then
            read -r n s ips steady up fb < <(ips_of "$d")
            say "  cam timings old gradcam: $(timings_of "$d")"
            say "tch-vis-old-cam gradcam $ARCH batch $BATCH $DEVICE fp32: $n images in $s s, $ips images/s (steady $steady after $up s of startup; past the first batch $fb); forward-pass ceiling ${CAM_CEIL[forward]:-n/a}: steady $(ratio "$steady" "${CAM_CEIL[forward]}")"
            [ -d "$WORK/cam-gradcam" ] && say "$(same_files "$WORK/cam-gradcam" "$d" .cam.npy "gradcam $ARCH this binary vs the old one")"
        fi
    fi
    # cam_variant NAME FILE CEIL: Grad-CAM with another export of the same
    # network, against its own forward ceiling CEIL (if measured), the
    # methods export's, and the methods export's maps.
    cam_variant() {
        local name=$1 file=$2 ceil=$3 d="$WORK/cam-$1-gradcam"
        if step "cam-$name-gradcam" 150 "$BIN/tch-vis" cam --model "$file" --images-from "$WORK/cam.txt" \
            --root "$IMAGES" --out "$d" --batch-size "$BATCH" --overwrite --device "$DEVICE" --method gradcam; then
            read -r n s ips steady up fb < <(ips_of "$d")
            say "  cam timings $name gradcam: $(timings_of "$d")"
            say "tch-vis-cam gradcam $ARCH-$name batch $BATCH $DEVICE fp32: $n images in $s s, $ips images/s (steady $steady after $up s of startup; past the first batch $fb); its forward ceiling ${ceil:-n/a}: steady $(ratio "$steady" "$ceil"); the methods export's forward ceiling ${CAM_CEIL[forward]:-n/a}: steady $(ratio "$steady" "${CAM_CEIL[forward]}"), past the first batch $(ratio "$fb" "${CAM_CEIL[forward]}")"
            [ -d "$WORK/cam-gradcam" ] && say "$(pearson "$WORK/cam-gradcam" "$d" "gradcam $ARCH methods export vs $name" .cam.npy 2>&1 | tail -n1)"
        else
            say "tch-vis-cam gradcam $ARCH-$name: FAILED ($(tail -n1 "$WORK/cam-$name-gradcam.txt"))"
        fi
    }
    # The frozen export (export_cam_model.py --freeze: batch norms folded,
    # channels-last constant weights), against its own forward ceiling.
    FROZEN="$GPU_DATA/${ARCH}_cam_frozen.pt"
    if want camfrozen && { [ -f "$FROZEN" ] || step cam-frozen-export 120 "$PY" scripts/export_cam_model.py \
        torchvision "$ARCH" --freeze --out "$FROZEN"; }; then
        fceil=""
        if step cam-frozen-ceiling 120 "$PY" scripts/bench_forward.py --model "$FROZEN" --label "$ARCH-frozen" \
            --batch "$BATCH" --iters "$((ITERS < 30 ? ITERS : 30))" --device "$DEVICE"; then
            grep -E '^(forward|gradcam)-alone' "$WORK/cam-frozen-ceiling.txt" | while read -r l; do say "$l"; done
            fceil=$(sed -n 's/^forward-alone.*, \([0-9.]*\) images\/s/\1/p' "$WORK/cam-frozen-ceiling.txt")
        fi
        cam_variant frozen "$FROZEN" "$fceil"
    fi
    # The dict form (export_cam_model.py --layer: forward returns the
    # features and the output, run with a graph from the input) at the node
    # whose output is the methods export's features: same maps, and what
    # the graph through the trunk costs on the device.
    DICT_MODEL="$GPU_DATA/${ARCH}_cam_dict.pt"
    if want camdict && { [ -f "$DICT_MODEL" ] || step cam-dict-export 120 "$PY" scripts/export_cam_model.py \
        torchvision "$ARCH" --layer "$DICT_LAYER" --out "$DICT_MODEL"; }; then
        cam_variant dict "$DICT_MODEL" ""
    fi
elif want cam || want camfrozen || want camdict || want scorecam; then
    say "cam: SKIPPED ($CAM_MODEL not made)"
fi

# 8b. The torchvision recipe for input gradients (resize 256, crop 224): by
# default on the very file whose model-alone ceiling step 4 measured (the
# traced export, with a torchvision-recipe sidecar beside a link to it), so
# pipeline/ceiling compares like with like; TV_ON=cam runs the CAM export
# instead, against its own ceiling when step camceil measured it.
declare -A CAMM_CEIL
if want camceil && [ -x "$BIN/bench_overhead" ] && [ -f "$CAM_MODEL" ]; then
    for p in $PRECISIONS; do
        ceiling_step "camceil-$p" "$CAM_MODEL" "$ARCH-cam-export" "$p" && CAMM_CEIL[$p]=$(model_alone "camceil-$p")
    done
fi
TV_MODEL="$GPU_DATA/${ARCH}_tv.pt"
if [ "${TV_ON:-traced}" = cam ]; then
    TV_MODEL=$CAM_MODEL
elif want tv && [ -f "$MODEL" ]; then
    ln -sf "$ARCH.pt" "$TV_MODEL"
    "$PY" -c 'import json,sys;s=json.load(open(sys.argv[1]));s.update(resize=256,crop=[224,224],interpolation="bilinear",antialias=True);json.dump(s,open(sys.argv[2],"w"),indent=2)' \
        "$GPU_DATA/$ARCH.json" "$GPU_DATA/${ARCH}_tv.json"
fi
declare -A TV_CEIL
for p in $PRECISIONS; do
    TV_CEIL[$p]=${CEIL[$p]}
    [ "${TV_ON:-traced}" = cam ] && TV_CEIL[$p]=${CAMM_CEIL[$p]:-${CEIL[$p]}}
done
if want tv && [ -x "$BIN/tch-vis" ] && [ -f "$TV_MODEL" ]; then
    say "torchvision recipe on $TV_MODEL"
    TV_EXES="tch-vis"
    want tvold && [ -x "$BIN/tch-vis-old" ] && TV_EXES="tch-vis tch-vis-old"
    for rep in $(seq "$REPEAT"); do
    RUN_TAG=""; [ "$REPEAT" -gt 1 ] && RUN_TAG=" (run $rep of $REPEAT)"
    for exe in $TV_EXES; do
    for p in $PRECISIONS; do
        [ "$exe" = tch-vis-old ] && [ "$p" = bf16 ] && continue
        d="$WORK/tv-$p"
        [ "$exe" = tch-vis-old ] && d="$WORK/tv-old-$p"
        tag=""; [ "$exe" = tch-vis-old ] && tag="-old"
        sync
        if step "tv-pipeline$tag-$p" 150 "$BIN/$exe" saliency --model "$TV_MODEL" --images "$IMAGES" --out "$d" \
            --batch-size "$BATCH" --overwrite --device "$DEVICE" --score "categorical:$CLASS" --precision "$p"; then
            read -r n s ips steady up fb < <(ips_of "$d")
            say "  timings tv$tag $p: $(timings_of "$d")"
            say "tch-vis$tag-pipeline-torchvision-recipe$RUN_TAG $ARCH batch $BATCH $DEVICE $p: $n images in $s s, $ips images/s (steady $steady after $up s of startup; past the first batch $fb); ceiling ${TV_CEIL[$p]:-n/a} images/s, pipeline/ceiling $(ratio "$ips" "${TV_CEIL[$p]}"), steady $(ratio "$steady" "${TV_CEIL[$p]}"), past the first batch $(ratio "$fb" "${TV_CEIL[$p]}") (target >= $([ "$p" = fp32 ] && echo 0.90 || echo 0.80))"
            [ -n "$tag" ] && [ -d "$WORK/tv-$p" ] && say "$(same_files "$WORK/tv-$p" "$d" .saliency.npy "tv saliency $ARCH $p this binary vs the old one")" && say "$(same_files "$WORK/tv-$p" "$d" .saliency.png "tv saliency $ARCH $p this binary vs the old one")"
        else
            say "tch-vis$tag-pipeline-torchvision-recipe$RUN_TAG $ARCH $p: FAILED ($(tail -n1 "$WORK/tv-pipeline$tag-$p.txt"))"
        fi
    done
    done
    done
fi

# 9. half precision on a trained model: models/digits_rgb.pt, held-out digits
DIGITS_RGB=${DIGITS_RGB:-$BIN/digits-rgb}
if ! want digits; then
    :
elif [ -x "$BIN/tch-vis" ] && [ -d "$DIGITS_RGB" ]; then
    for p in fp32 $PRECISIONS; do
        [ -d "$WORK/drgb-sal-$p" ] && continue
        step "drgb-sal-$p" 60 "$BIN/tch-vis" saliency --model models/digits_rgb.pt --images "$DIGITS_RGB" \
            --out "$WORK/drgb-sal-$p" --overwrite --device "$DEVICE" --precision "$p" --batch-size 64 >/dev/null
        step "drgb-cam-$p" 60 "$BIN/tch-vis" cam --model models/digits_rgb.pt --images "$DIGITS_RGB" \
            --out "$WORK/drgb-cam-$p" --overwrite --device "$DEVICE" --precision "$p" --batch-size 64 \
            --method gradcam >/dev/null
    done
    for p in $PRECISIONS; do
        [ "$p" = fp32 ] && continue
        say "$(pearson "$WORK/drgb-sal-fp32" "$WORK/drgb-sal-$p" "digits_rgb saliency fp32 vs $p" .saliency.npy 2>&1 | tail -n1)"
        say "$(pearson "$WORK/drgb-cam-fp32" "$WORK/drgb-cam-$p" "digits_rgb gradcam fp32 vs $p" .cam.npy 2>&1 | tail -n1)"
    done
else
    say "digits_rgb pearson: SKIPPED ($DIGITS_RGB missing: scripts/make_heldout_rgb.py --out $DIGITS_RGB)"
fi

echo
echo "================ summary ($(( $(date +%s) - T_START )) s) ================"
cat "$SUMMARY"
rm -rf "$WORK" "$SUMMARY"
} 2>&1 | tee "$REPORT"
exit "${PIPESTATUS[0]}"
