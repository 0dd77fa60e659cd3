#!/usr/bin/env bash
# Two or more tch-vis binaries (or wrapper scripts) on the same saliency job,
# alternating, ROUNDS times each: images/s on each run's job clock and the
# process's CPU seconds (user + system), then the mean of each. For changes
# of a few percent, where the machine's drift between separate runs is
# larger than the effect. Outputs go to a tmpfs folder, removed each run.
#
#   scripts/bench_ab.sh OLD_BINARY NEW_BINARY
#   ROUNDS=4 IMAGES=bench-data/alone-images-x25 MODEL=bench-data/trivial224_tv.pt scripts/bench_ab.sh a b
#
# IMAGES and MODEL default to bench_pipeline_alone.sh's 5,000 images and
# its torchvision-recipe trivial model (run that script once first);
# BATCH sets --batch-size (32); FLAGS adds flags to every run; CMD runs
# another command than `saliency` (`integrated-gradients`, `scores`).
cd "$(dirname "$0")/.." || exit 1
ROUNDS=${ROUNDS:-4}
IMAGES=${IMAGES:-bench-data/alone-images-x25}
MODEL=${MODEL:-bench-data/trivial224_tv.pt}
OUT=${OUT:-/dev/shm/tch-vis-ab}
[ $# -ge 2 ] || { echo "usage: scripts/bench_ab.sh BINARY BINARY [BINARY...]"; exit 2; }
[ -d "$IMAGES" ] && [ -f "$MODEL" ] || { echo "bench_ab: $IMAGES or $MODEL missing: run scripts/bench_pipeline_alone.sh (REPEAT=25) first"; exit 1; }
times=$(mktemp)
for r in $(seq 1 "$ROUNDS"); do
    for b in "$@"; do
        rm -rf "$OUT"
        # shellcheck disable=SC2086
        /usr/bin/time -o "$times" -f "%U %S" "$b" ${CMD:-saliency} --model "$MODEL" --images "$IMAGES" \
            --out "$OUT" --batch-size "${BATCH:-32}" --device cpu --score categorical:1 $FLAGS >/dev/null 2>&1
        ips=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(round(r['processed']/r['seconds'],1))" "$OUT/report.json")
        echo "$b $ips $(awk '{print $1 + $2}' "$times")"
    done
done | awk '{print "  run: " $0; s[$1] += $2; c[$1] += $3; n[$1]++}
    END {for (k in s) printf "%s: mean %.1f images/s, CPU %.2f s (%d runs)\n", k, s[k] / n[k], c[k] / n[k], n[k]}'
rm -rf "$OUT" "$times"
