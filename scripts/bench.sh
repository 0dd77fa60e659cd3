#!/usr/bin/env bash
# Benchmarks for tch-vis, as ratios measured side by side in one run, on one
# machine, on the same TorchScript files (see BENCHMARKS.md).
#
#   scripts/bench.sh                 full run (about 10-15 minutes on 2 cores)
#   QUICK=1 scripts/bench.sh         smoke test: small sizes and counts (~2 min)
#
# Environment:
#   DEVICE      cpu (default) | cuda | cuda:N
#   QUICK       1 = small sizes and counts
#   N_IMAGES    images in the generated pipeline folder (default 600; quick 40)
#   N_DIGITS    images in the generated digits folder (default 2000; quick 200)
#   BATCH       resnet18 batch size, overhead and pipeline (default 8)
#   DIGITS_BATCH digits_cnn batch size (default 32)
#   WORKERS     DataLoader workers of the Python pipeline (default: nproc)
#   ITERS       timed calls per overhead measurement (default 100 digits / 20 resnet18)
#   MEM_CALLS   calls in the memory check (default 10000; quick 300)
#   ROUNDS      alternations of the Rust and Python loops in 1-2 (default 3; quick 1)
#   PIPE_ROUNDS alternations of tch-vis and the Python job in 3 (default 2; quick 1)
#   DIGITS_PIPE_ROUNDS the same for the (short) digits pipeline (default 4; quick 1)
#   WAIT_QUIET  wait up to this many seconds for a 1-minute load average < 1 (default 0)
#   CLASS       class scored everywhere (default 1)
#   DATA        data folder (default bench-data, git-ignored)
#   SKIP_BUILD  1 = use the binaries already in target/release
#   CAM         0 = leave out the CAM lines of scripts/bench_cam.sh (default 1;
#               it needs the reference packages of scripts/golden_env.sh)
#   RSS         0 = leave out section 9 (a 100,000-image 224 x 224 saliency
#               run writing ~23 GB, removed at the end; default 1)
#
# One labelled line per comparison: ours, baseline, ratio. Everything is also
# written to $DATA/bench-<date>.txt. No step stops the others.

cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)

DEVICE=${DEVICE:-cpu}
QUICK=${QUICK:-0}
DATA=${DATA:-bench-data}
CLASS=${CLASS:-1}
BATCH=${BATCH:-8}
DIGITS_BATCH=${DIGITS_BATCH:-32}
WORKERS=${WORKERS:-$(nproc)}
CAM=${CAM:-1}
if [ "$QUICK" = 1 ]; then
    N_IMAGES=${N_IMAGES:-40}
    N_DIGITS=${N_DIGITS:-200}
    ITERS_DIGITS=${ITERS:-20}
    ITERS_RESNET=${ITERS:-3}
    MEM_CALLS=${MEM_CALLS:-300}
    MEM_WARMUP=50
    ROUNDS=${ROUNDS:-1}
    PIPE_ROUNDS=${PIPE_ROUNDS:-1}
    DIGITS_PIPE_ROUNDS=${DIGITS_PIPE_ROUNDS:-1}
    IMG_DIR=images-quick
    DIG_DIR=digits-quick
else
    N_IMAGES=${N_IMAGES:-600}
    N_DIGITS=${N_DIGITS:-2000}
    ITERS_DIGITS=${ITERS:-100}
    ITERS_RESNET=${ITERS:-20}
    MEM_CALLS=${MEM_CALLS:-10000}
    MEM_WARMUP=500
    ROUNDS=${ROUNDS:-3}
    PIPE_ROUNDS=${PIPE_ROUNDS:-2}
    DIGITS_PIPE_ROUNDS=${DIGITS_PIPE_ROUNDS:-4}
    IMG_DIR=images
    DIG_DIR=digits
fi
case "$DEVICE" in cuda*) DEV_NAME=cuda ;; *) DEV_NAME=$DEVICE ;; esac

mkdir -p "$DATA"
LOG="$DATA/bench-$(date +%Y%m%d-%H%M%S).txt"
{

# shellcheck source=scripts/env.sh
. scripts/env.sh
tch_vis_setup || exit 1

# torchvision (paired with torch 2.11.0) and captum for the Python side,
# installed into the same venv with torch pinned so pip cannot move it.
TORCH_PIN="torch==${TCH_VIS_TORCH_VERSION}"
if ! python -c 'import torchvision' 2>/dev/null; then
    echo "bench: installing torchvision==0.26.0 (paired with torch 2.11.0)"
    python -m pip install --quiet --disable-pip-version-check "torchvision==0.26.0" "$TORCH_PIN" \
        || echo "bench: could not install torchvision; resnet18 steps will be skipped"
fi
if ! python -c 'import captum' 2>/dev/null; then
    echo "bench: installing captum"
    python -m pip install --quiet --disable-pip-version-check captum "$TORCH_PIN" \
        || echo "bench: could not install captum; the Python pipeline falls back to plain autograd"
fi

echo "== tch-vis benchmarks $(date -Iseconds)"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
echo "git: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty tree)')"
echo "python: $(python -c 'import torch,sys;import importlib.util as u;print("torch",torch.__version__,"threads",torch.get_num_threads(),"torchvision",(__import__("torchvision").__version__ if u.find_spec("torchvision") else "missing"),"captum",(__import__("captum").__version__ if u.find_spec("captum") else "missing"))')"
echo "settings: ROUNDS=$ROUNDS PIPE_ROUNDS=$PIPE_ROUNDS DIGITS_PIPE_ROUNDS=$DIGITS_PIPE_ROUNDS DEVICE=$DEVICE QUICK=$QUICK N_IMAGES=$N_IMAGES N_DIGITS=$N_DIGITS BATCH=$BATCH DIGITS_BATCH=$DIGITS_BATCH WORKERS=$WORKERS MEM_CALLS=$MEM_CALLS CLASS=$CLASS"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

echo "== build"
if [ "${SKIP_BUILD:-0}" = 1 ]; then
    echo "bench: SKIP_BUILD=1: using the binaries already in target/release"
elif ! cargo build --release --bin tch-vis --example bench_overhead --example memory; then
    echo "bench: building all three failed; trying the examples alone"
    cargo build --release --example bench_overhead --example memory
fi
BO=target/release/examples/bench_overhead
MEM=target/release/examples/memory
CLI=target/release/tch-vis

echo "== data"
python scripts/make_bench_data.py --out "$DATA" --n-images "$N_IMAGES" --images-dir "$IMG_DIR" \
    --n-digits "$N_DIGITS" --digits-dir "$DIG_DIR" || echo "bench: make_bench_data failed (status $?)"
R18="$DATA/resnet18.pt"
DIGITS=models/digits_cnn.pt

# value LINE KEY: the number after KEY in LINE ("ours 12.3 ms" -> 12.3)
value() { sed -n "s/.*$2 \([0-9.eE+-]*\).*/\1/p" <<<"$1" | head -n1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a == "" || b == "" || b + 0 == 0) print "n/a"; else printf "%.3f", a / b }'; }

declare -A OURS_MS CEILING PY_MS OVH_LINE CEIL_LINE PY_LINE RATIOS PY_ALL OURS_ALL
lt() { awk -v a="$1" -v b="$2" 'BEGIN{exit !(a < b)}'; }
# measure LABEL MODEL BATCH SIZE CHANNELS ITERS: ROUNDS alternations of
# bench_overhead (ours and hand-written tch, interleaved call by call) and
# bench_python; each side keeps its fastest round (the machine is shared).
measure() {
    local label=$1 model=$2 batch=$3 size=$4 ch=$5 iters=$6 out l ms r
    if [ ! -f "$model" ]; then echo "measure $label: SKIPPED (missing $model)"; return; fi
    for r in $(seq "$ROUNDS"); do
        if [ -x "$BO" ]; then
            out=$("$BO" --model "$model" --label "$label" --batch "$batch" --size "$size" --channels "$ch" \
                --iters "$iters" --device "$DEVICE" --precision fp32 --class "$CLASS" 2>&1)
            l=$(grep '^overhead' <<<"$out")
            ms=$(value "$l" ours)
            echo "  round $r: ${l:-bench_overhead FAILED: $(tail -n1 <<<"$out")}"
            RATIOS[$label]+=" $(value "$l" ratio)"
            OURS_ALL[$label]+=" $ms"
            if [ -n "$ms" ] && { [ -z "${OURS_MS[$label]}" ] || lt "$ms" "${OURS_MS[$label]}"; }; then
                OURS_MS[$label]=$ms
                OVH_LINE[$label]=$l
                CEIL_LINE[$label]=$(grep '^model-alone' <<<"$out")
                CEILING[$label]=$(sed -n 's/.*: \([0-9.]*\) images\/s.*/\1/p' <<<"${CEIL_LINE[$label]}")
            fi
        fi
        out=$(python scripts/bench_python.py --model "$model" --label "$label" --batch "$batch" --size "$size" \
            --channels "$ch" --iters "$iters" --device "$DEVICE" --class "$CLASS" 2>&1)
        l=$(grep '^python-autograd' <<<"$out")
        ms=$(sed -n 's/.*: \([0-9.]*\) ms per call.*/\1/p' <<<"$l")
        echo "  round $r: ${l:-bench_python FAILED: $(tail -n1 <<<"$out")}"
        PY_ALL[$label]+=" $ms"
        if [ -n "$ms" ] && { [ -z "${PY_MS[$label]}" ] || lt "$ms" "${PY_MS[$label]}"; }; then
            PY_MS[$label]=$ms
            PY_LINE[$label]=$l
        fi
    done
}

if [ "${WAIT_QUIET:-0}" -gt 0 ]; then
    for _ in $(seq "$WAIT_QUIET"); do
        awk '{exit !($1 < 1.0)}' /proc/loadavg && break
        sleep 1
    done
fi
echo "load average before measuring: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== measurements for 1 and 2 ($ROUNDS rounds, alternating; each side keeps its fastest round)"
measure digits_cnn "$DIGITS" "$DIGITS_BATCH" 32 1 "$ITERS_DIGITS"
measure resnet18 "$R18" "$BATCH" 224 3 "$ITERS_RESNET"
# Batch 1: where per-call overhead (Python's included) is a visible share.
measure digits_cnn-b1 "$DIGITS" 1 32 1 $((ITERS_DIGITS * 5))

echo "== 1. overhead: Model::gradients vs hand-written tch forward_ts + run_backward (median of interleaved calls)"
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{v[NR]=$1} END{if (NR) print v[int((NR+1)/2)]}'; }
for label in digits_cnn resnet18 digits_cnn-b1; do
    if [ -n "${OVH_LINE[$label]}" ]; then
        echo "${OVH_LINE[$label]} (fastest round; target ratio <= 1.03)"
        echo "overhead $label: ratio per round:${RATIOS[$label]}; median $(median <<<"${RATIOS[$label]}") (target <= 1.03)"
        echo "${CEIL_LINE[$label]}"
    else
        echo "overhead $label: n/a (bench_overhead failed or missing)"
    fi
done

echo "== 2. vs PyTorch in Python: torch.autograd.grad loop on the same file, batch and score"
for label in digits_cnn resnet18 digits_cnn-b1; do
    b=$BATCH
    [ "$label" = digits_cnn ] && b=$DIGITS_BATCH
    [ "$label" = digits_cnn-b1 ] && b=1
    [ -n "${PY_LINE[$label]}" ] && echo "${PY_LINE[$label]}"
    if [ -n "${OURS_MS[$label]}" ] && [ -n "${PY_MS[$label]}" ]; then
        echo "vs-python $label batch $b $DEV_NAME fp32: ours ${OURS_MS[$label]} ms, python ${PY_MS[$label]} ms, ratio $(ratio "${OURS_MS[$label]}" "${PY_MS[$label]}") (ours/python, fastest rounds; target <= 1.00$([ "${label%-b1}" = digits_cnn ] && echo ', < 1 on digits_cnn'))"
        echo "vs-python $label: ms per round: ours${OURS_ALL[$label]}; python${PY_ALL[$label]}"
    else
        echo "vs-python $label: n/a (a side failed)"
    fi
done

echo "== 3. pipeline: tch-vis saliency vs scripts/baseline_saliency.py (same folder, model, batch, class $CLASS; $PIPE_ROUNDS rounds for resnet18, $DIGITS_PIPE_ROUNDS for digits_cnn, fastest kept)"
now() { date +%s.%N; }
# pipeline LABEL MODEL DIR BATCH TARGET: PIPE_ROUNDS alternations of tch-vis and
# the Python job over the same folder; each side keeps its fastest round.
pipeline() {
    local label=$1 model=$2 dir=$3 batch=$4 target=$5 rounds=$6 tmp t0 t1 st n r ips s wall py_out
    local ours_ips="" ours_wall="" py_ips="" py_wall=""
    if [ ! -f "$model" ] || [ ! -d "$dir" ]; then echo "pipeline $label: SKIPPED (missing $model or $dir)"; return; fi
    n=$(find "$dir" -type f | wc -l)
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/tch-vis-bench.XXXXXX")
    for r in $(seq "$rounds"); do
        if [ -x "$CLI" ]; then
            t0=$(now)
            "$CLI" saliency --model "$model" --images "$dir" --out "$tmp/ours" --batch-size "$batch" \
                --overwrite --device "$DEVICE" --score "categorical:$CLASS" >"$tmp/ours.log" 2>&1
            st=$?
            t1=$(now)
            wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')
            if [ $st -eq 0 ] && [ -f "$tmp/ours/report.json" ]; then
                read -r ips s < <(python -c "import json,sys;r=json.load(open(sys.argv[1]));print(f\"{r['images_per_second']:.1f} {r['seconds']:.2f}\")" "$tmp/ours/report.json")
                echo "  round $r: tch-vis-pipeline $label: $n images in $s s (report.json), $ips images/s; process wall $wall s"
                if [ -z "$ours_ips" ] || lt "$ours_ips" "$ips"; then ours_ips=$ips; ours_wall=$wall; fi
            else
                echo "  round $r: tch-vis-pipeline $label: FAILED (status $st): $(tail -n 3 "$tmp/ours.log" | tr '\n' ' ')"
            fi
        elif [ "$r" = 1 ]; then
            echo "  tch-vis-pipeline $label: SKIPPED ($CLI not built)"
        fi
        rm -rf "$tmp/ours" "$tmp/python"
        t0=$(now)
        py_out=$(python scripts/baseline_saliency.py --model "$model" --images "$dir" --out "$tmp/python" \
            --batch-size "$batch" --workers "$WORKERS" --device "$DEVICE" --class "$CLASS" --label "$label" 2>&1)
        t1=$(now)
        wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')
        echo "  round $r: $(grep '^python-pipeline' <<<"$py_out" || tail -n 2 <<<"$py_out" | tr '\n' ' '); process wall $wall s"
        ips=$(sed -n 's/^python-pipeline.* s, \([0-9.]*\) images\/s.*/\1/p' <<<"$py_out")
        if [ -n "$ips" ] && { [ -z "$py_ips" ] || lt "$py_ips" "$ips"; }; then py_ips=$ips; py_wall=$wall; fi
        rm -rf "$tmp/ours" "$tmp/python"
    done
    local c=${CEILING[$label]}
    echo "pipeline $label batch $batch $DEV_NAME: tch-vis ${ours_ips:-n/a} images/s, python ${py_ips:-n/a} images/s, ratio $(ratio "$ours_ips" "$py_ips") (target >= $target); process wall ${ours_wall:-n/a} s vs ${py_wall:-n/a} s, ratio $(ratio "$py_wall" "$ours_wall")"
    echo "pipeline/ceiling $label batch $batch $DEV_NAME: tch-vis ${ours_ips:-n/a} images/s, model-alone ${c:-n/a} images/s, ratio $(ratio "$ours_ips" "$c")$([ "$label" = resnet18 ] && echo ' (target >= 0.80)')"
    rm -rf "$tmp"
}
pipeline resnet18 "$R18" "$DATA/$IMG_DIR" "$BATCH" 2 "$PIPE_ROUNDS"
pipeline digits_cnn "$DIGITS" "$DATA/$DIG_DIR" "$DIGITS_BATCH" 3 "$DIGITS_PIPE_ROUNDS"

echo "== 4. memory: peak RSS growth over many Model::gradients calls (digits_cnn, cpu)"
if [ -x "$MEM" ]; then
    "$MEM" --model "$DIGITS" --calls "$MEM_CALLS" --warmup "$MEM_WARMUP" 2>&1 || echo "memory: FAILED (status $?)"
else
    echo "memory: SKIPPED ($MEM not built)"
fi

echo "== 5. class activation maps vs pytorch-grad-cam (scripts/bench_cam.sh, cpu)"
if [ "$CAM" = 1 ]; then
    if [ "$QUICK" = 1 ]; then
        N_IMAGES=8 N_SCORE=1 DATA="$DATA" SKIP_BUILD="${SKIP_BUILD:-0}" scripts/bench_cam.sh | grep -v '^== tch-vis CAM'
    else
        DATA="$DATA" SKIP_BUILD="${SKIP_BUILD:-0}" scripts/bench_cam.sh | grep -v '^== tch-vis CAM'
    fi
else
    echo "cam: SKIPPED (CAM=0)"
fi

echo "== 6. pipeline alone: trivial 224 x 224 model, tch-vis saliency vs the Python job (scripts/bench_pipeline_alone.sh)"
if [ "$QUICK" = 1 ]; then
    N=40 REPEAT=1 ROUNDS=1 DATA="$DATA" SKIP_BUILD=1 scripts/bench_pipeline_alone.sh
else
    DATA="$DATA" SKIP_BUILD=1 scripts/bench_pipeline_alone.sh
fi

echo "== 7. scale: scores over 100,000 and 1,000,000 tiny images (scripts/bench_scale.sh; SCALE=0 skips)"
if [ "${SCALE:-1}" = 1 ]; then
    if [ "$QUICK" = 1 ]; then
        SIZES="10000 100000" DATA="$DATA" SKIP_BUILD=1 scripts/bench_scale.sh
    else
        DATA="$DATA" SKIP_BUILD=1 scripts/bench_scale.sh
    fi
else
    echo "scale: SKIPPED (SCALE=0)"
fi

echo "== 8. integrated gradients vs captum, resnet18 (scripts/bench_ig.sh)"
if [ "$QUICK" = 1 ]; then
    N=2 STEPS=8 DATA="$DATA" SKIP_BUILD=1 scripts/bench_ig.sh
else
    DATA="$DATA" SKIP_BUILD=1 scripts/bench_ig.sh
fi

echo "== 9. memory of a long 224 x 224 saliency run (scripts/bench_rss.sh; needs section 7's images; RSS=0 skips)"
if [ "${SCALE:-1}" = 1 ] && [ "${RSS:-1}" = 1 ]; then
    if [ "$QUICK" = 1 ]; then
        N=10000 DATA="$DATA" scripts/bench_rss.sh | tail -n 1
    else
        N=100000 DATA="$DATA" scripts/bench_rss.sh | awk 'NR == 1 || NR % 6 == 2 || /^saliency/'
    fi
else
    echo "rss: SKIPPED (SCALE=0 or RSS=0)"
fi

echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== done $(date -Iseconds); log: $LOG"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
