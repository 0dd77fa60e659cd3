#!/usr/bin/env bash
# Runs one tch-vis process per GPU of this node, each on its own shard,
# all writing into the same output folder, and waits for all of them.
#
#   scripts/all_gpus.sh saliency --model m.pt --images DIR --out OUT [options]
#
# Process K of N gets `--device cuda:K --shard K/N`. N is TCH_VIS_GPUS when
# set, else the number of GPUs `nvidia-smi -L` lists. TCH_VIS_BIN names the
# binary (default: target/release/tch-vis beside this script, else tch-vis
# on PATH). TCH_VIS_DEVICE=cpu runs the same recipe on the CPU (for tests).
# Exits with the highest exit status of the workers (0 when all finished).
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${TCH_VIS_BIN:-$here/target/release/tch-vis}"
[ -x "$bin" ] || bin="$(command -v tch-vis || true)"
if [ -z "$bin" ]; then
    echo "all_gpus: error: no tch-vis binary (build it, or set TCH_VIS_BIN)" >&2
    exit 2
fi
n="${TCH_VIS_GPUS:-}"
if [ -z "$n" ]; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
if ! [ "$n" -ge 1 ] 2>/dev/null; then
    echo "all_gpus: error: no GPU found (set TCH_VIS_GPUS=N to say how many)" >&2
    exit 2
fi
pids=()
for ((k = 0; k < n; k++)); do
    device="${TCH_VIS_DEVICE:-cuda:$k}"
    "$bin" "$@" --device "$device" --shard "$k/$n" &
    pids+=($!)
done
worst=0
for pid in "${pids[@]}"; do
    wait "$pid"
    st=$?
    [ "$st" -gt "$worst" ] && worst=$st
done
exit "$worst"
