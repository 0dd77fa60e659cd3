#!/usr/bin/env bash
# Where the GPU machine's fp32 pipeline runs lose time when their outputs go
# to its disk (BENCHMARKS.md: 0.71-0.82 of the ceiling past the first batch
# on disk, 0.94-0.99 on tmpfs, with the writers' time 10x the tmpfs one).
# Built and carried as scripts/gpu_check.sh says; then, with the `run` tool:
#   command "bash scripts/gpu_disk_check.sh", carry [".gpu"]
#
#   1. the file systems, the kernel's writeback settings, the block devices
#   2. scripts/gpu_check.sh's pipeline step (resnet50, batch 64, 1,000 JPEGs,
#      --overwrite into one folder per precision), fp32 and bf16, 3 runs,
#      each under scripts/thread_cpu.py --wchan: where each thread group
#      waits, and the peaks of Dirty and Writeback memory
#   3. VARIANTS (below): fp32 / fp16 runs with other settings (writer
#      threads, malloc arenas) or into a fresh folder per run, interleaved;
#      then fp32 once on tmpfs
#   4. the disk's sequential write speed (dd, 2 GiB, with and without
#      fdatasync)
# Output: $OUT/disk.txt (and gpu_check.sh's $OUT/gpu.txt).
cd "$(dirname "$0")/.." || exit 1
OUTDIR=${OUT:-/tmp/tch-vis-gpu-out}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
RUNS=${RUNS:-3}
export NVIDIA_TF32_OVERRIDE=${NVIDIA_TF32_OVERRIDE:-0}
TORCH_LIB=$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__)+"/lib")' 2>/dev/null)
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
echo "== gpu_disk_check $(date -Iseconds): $(uname -r), $(nproc) cores, $(free -g | awk '/^Mem/{print $2}') GiB"
for d in "${TMPDIR:-/tmp}" /dev/shm "$PWD"; do echo "$d: $(findmnt -no FSTYPE,SOURCE,OPTIONS -T "$d" 2>&1)"; done
for k in dirty_ratio dirty_background_ratio dirty_bytes dirty_background_bytes dirty_expire_centisecs dirty_writeback_centisecs; do
    echo "vm.$k = $(cat /proc/sys/vm/$k 2>&1)"
done
echo "jbd2: $(ls /proc/fs/jbd2 2>&1 | tr '\n' ' ')"
for f in /proc/fs/ext4/*/options; do [ -f "$f" ] && echo "$f: $(tr '\n' ' ' <"$f")"; done
lsblk -o NAME,ROTA,SIZE,TYPE,MOUNTPOINT 2>&1 | head -n 20
} | tee "$OUTDIR/disk.txt"

if [ "${SKIP_CHECK:-0}" != 1 ]; then
    THREAD_CPU=1 THREAD_CPU_FLAGS=--wchan N_IMAGES=${N_IMAGES:-1000} REPEAT=$RUNS AB_VARIANTS="" STEPS="pipeline" \
        PRECISIONS="${PRECISIONS:-fp32 bf16}" OUT="$OUTDIR" bash scripts/gpu_check.sh >"$OUTDIR/check.txt" 2>&1
    grep -E '^  (thread-|timings)|^tch-vis-pipeline' "$OUTDIR/gpu.txt" | tee -a "$OUTDIR/disk.txt"
else
    # Only the data (gpu_check.sh's step 3 always runs).
    N_IMAGES=${N_IMAGES:-1000} STEPS=none OUT="$OUTDIR" bash scripts/gpu_check.sh >"$OUTDIR/check.txt" 2>&1
fi

DEVICE=${DEVICE:-cuda}
GPU_DATA=${GPU_DATA:-bench-data/gpu}
MODEL=$GPU_DATA/${GPU_CHECK_ARCH:-resnet50}.pt
IMAGES=$GPU_DATA/images
one() { # LABEL OUT PRECISION [VAR=VALUE...]: one run into OUT (--overwrite), its waits and figures
    local label=$1 out=$2 p=$3 bin=.gpu/tch-vis a
    shift 3
    # TCH_VIS_BIN=PATH among the variables: another build of tch-vis.
    for a in "$@"; do case $a in TCH_VIS_BIN=*) bin=${a#TCH_VIS_BIN=} ;; esac; done
    sync
    env "$@" "$PY" scripts/thread_cpu.py --wchan --label "$label" -- "$bin" saliency --model "$MODEL" --images "$IMAGES" \
        --out "$out" --batch-size 64 --device "$DEVICE" --score categorical:1 --precision "$p" --overwrite 2>&1 \
        | grep -E '^thread-(cpu|wait) [^ ]* (tch-vis-write|tch-vis:|process|machine)'
    "$PY" -c "import json,sys;r=json.load(open(sys.argv[1]));t=r.get('timings_seconds',{})
print(sys.argv[2], r['processed'], 'images', round(r['seconds'],2), 's; past the first batch', r.get('steady_images_per_second'), 'images/s;',
      ', '.join(f'{k} {v:.2f}s' for k,v in t.items()))" "$out/report.json" "$label"
}
{
W=$(mktemp -d "${TMPDIR:-/tmp}/tch-vis-disk.XXXXXX")
# VARIANTS: NAME=PRECISION:VAR=VALUE,... run in turn, RUNS rounds, each
# into a folder of its own overwritten every round (fresh-*: a new folder
# every round). "-" for no variable.
# (2026-11-28: MALLOC_ARENA_MAX=2 and 4 won in one call and lost in the
# next; the writer-thread counts are the next question, and per-image files
# linked into place (the default since 04ccd76) against the temporary
# names before it (TCH_VIS_LINKED_WRITES=0).)
# TCH_VIS_BIN=PATH runs another build: .gpu/tch-vis-ahead, when present, is
# c163b96's decoding (the next batch's parallel decode started before the
# batch ahead of it ends, reverted in 7d13ad4 as neutral on 2 cores; its
# case is 16 decode threads waiting at each batch's end) on top of the
# checked-out tree. Build it with (cherry-picks cleanly; the shell set up
# as for gpu_check.sh's build)
#   git worktree add --detach /tmp/ahead HEAD && git -C /tmp/ahead cherry-pick c163b96
#   (cd /tmp/ahead && cargo build --release --bin tch-vis --target-dir /work/main/target-ahead)
#   cp target-ahead/release/tch-vis .gpu/tch-vis-ahead && git worktree remove --force /tmp/ahead
AHEAD=""
[ -x .gpu/tch-vis-ahead ] && AHEAD="fp16-ahead=fp16:TCH_VIS_BIN=.gpu/tch-vis-ahead fresh-fp16-ahead=fp16:TCH_VIS_BIN=.gpu/tch-vis-ahead"
VARIANTS=${VARIANTS:-"fp32=fp32:- fp16=fp16:- fp16-temp=fp16:TCH_VIS_LINKED_WRITES=0 fp16-w8=fp16:TCH_VIS_WRITER_THREADS=8 fresh-fp16=fp16:- fresh-fp16-temp=fp16:TCH_VIS_LINKED_WRITES=0 $AHEAD"}
for r in $(seq "$RUNS"); do
    for v in $VARIANTS; do
        name=${v%%=*}; rest=${v#*=}; p=${rest%%:*}; vars=${rest#*:}
        envs=(); [ "$vars" != - ] && IFS=, read -r -a envs <<< "$vars"
        d="$W/$name"; case $name in fresh*) d="$W/$name-$r" ;; esac
        one "$name-$r" "$d" "$p" "${envs[@]}"
    done
done
S=$(mktemp -d /dev/shm/tch-vis-disk.XXXXXX)
one fresh-tmpfs "$S/fresh" fp32
rm -rf "$S"
sync
echo "dd 2 GiB with fdatasync: $(dd if=/dev/zero of="$W/dd" bs=1M count=2048 conv=fdatasync 2>&1 | tail -n1)"
rm -f "$W/dd"; sync
echo "dd 2 GiB buffered: $(dd if=/dev/zero of="$W/dd" bs=1M count=2048 2>&1 | tail -n1)"
rm -rf "$W"
if command -v perf >/dev/null; then echo "perf: $(perf --version 2>&1)"; else echo "perf: none"; fi
}  2>&1 | tee -a "$OUTDIR/disk.txt"
