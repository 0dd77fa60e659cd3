#!/usr/bin/env bash
# Peak memory of a long `tch-vis saliency` run at 224 x 224: the trivial
# 224 model of bench_pipeline_alone.sh over N hard-linked 32 x 32 PNGs (the
# images bench_scale.sh makes), each resized to 224 x 224 and written as a
# heatmap PNG and a (224, 224) float32 npy (~23 GB for 100,000 images).
# Samples the process's anonymous resident memory every 5 s and prints it
# against the images done, then the peak RSS (GNU time). The outputs are
# removed at the end.
#
#   N=100000 scripts/bench_rss.sh      (needs bench_scale.sh's data for N)
cd "$(dirname "$0")/.." || exit 1
DATA=${DATA:-bench-data}
N=${N:-100000}
BIN=${BIN:-target/release/tch-vis}
SRC="$DATA/scale-$N/imgs"
MODEL="$DATA/trivial224.pt"
[ -d "$SRC" ] || { echo "bench_rss: $SRC missing: run scripts/bench_scale.sh first"; exit 1; }
[ -f "$MODEL" ] || { echo "bench_rss: $MODEL missing: run scripts/bench_pipeline_alone.sh first"; exit 1; }
OUT="$DATA/rss-out-$N"
rm -rf "$OUT"
/usr/bin/time -v -o "$DATA/rss-$N.time" "$BIN" saliency --model "$MODEL" --images "$SRC" --out "$OUT" \
    --device cpu --score categorical:1 >/dev/null 2>"$DATA/rss-$N.log" &
tpid=$!
sleep 1
pid=$(pgrep -P "$tpid" | head -1)
echo "seconds images anon_MiB"
t=0
while kill -0 "$tpid" 2>/dev/null; do
    anon=$(awk '/RssAnon/{print int($2/1024)}' "/proc/$pid/status" 2>/dev/null)
    rows=$(cat "$OUT"/.tch-vis/rows/*.csv 2>/dev/null | wc -l)
    [ -n "$anon" ] && echo "$t $rows $anon"
    sleep 5
    t=$((t + 5))
done
wait "$tpid"
st=$?
rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$DATA/rss-$N.time")
ips=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(round(r['processed']/r['seconds'],1))" "$OUT/report.json" 2>/dev/null)
echo "saliency $N images at 224x224: status $st, ${ips:-n/a} images/s, peak RSS $((${rss:-0} / 1024)) MiB"
rm -rf "$OUT"
