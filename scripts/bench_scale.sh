#!/usr/bin/env bash
# `tch-vis scores` over 100,000 and 1,000,000 tiny images: images/s and peak
# RSS of each, and the ratio of the two rates (target: the 1M rate within
# 10% of the 100k rate, i.e. a constant cost per image as the folder grows).
#
#   scripts/bench_scale.sh            100k and 1M
#   SIZES="10000 100000" scripts/bench_scale.sh
#
# The images are hard links to 32x32 PNGs (made by this script), 1,000
# per folder, under $DATA/scale-N (git-ignored bench-data by default); they
# cost inodes only once. Needs GNU time (/usr/bin/time) for the peak RSS.
cd "$(dirname "$0")/.." || exit 1
DATA=${DATA:-bench-data}
SIZES=${SIZES:-"100000 1000000"}
BATCH=${BATCH:-256}
BIN=${BIN:-target/release/tch-vis}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    # shellcheck source=scripts/env.sh
    . scripts/env.sh && tch_vis_setup >/dev/null && cargo build --release --bin tch-vis -q || exit 1
fi
[ -x /usr/bin/time ] || { echo "bench_scale: needs /usr/bin/time (apt-get install time)"; exit 1; }
mkdir -p "$DATA"
first=""
for n in $SIZES; do
    dir="$DATA/scale-$n"
    if [ ! -f "$dir/.complete" ]; then
        rm -rf "$dir"
        python3 - "$dir" "$n" <<'PY'
import os, struct, sys, zlib
root, n = sys.argv[1], int(sys.argv[2])
os.makedirs(root, exist_ok=True)
# One 32x32 gray PNG with a diagonal stroke.
raw = b"".join(b"\0" + bytes(255 if abs(x - y) < 3 else 0 for x in range(32)) for y in range(32))
def chunk(t, d):
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 0, 0, 0, 0)) \
    + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
for i in range(n):
    # ext4 allows 65,000 links to one inode: a fresh source every 50,000.
    if i % 50000 == 0:
        src = os.path.join(root, f"source-{i // 50000:03d}.png.img")
        with open(src, "wb") as f:
            f.write(png)
    d = os.path.join(root, "imgs", f"{i // 1000:04d}")
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    os.link(src, os.path.join(d, f"{i:07d}.png"))
open(os.path.join(root, ".complete"), "w").close()
PY
    fi
    out="$DATA/scale-$n-out"
    rm -rf "$out"
    /usr/bin/time -v "$BIN" scores --model models/digits_cnn.pt --images "$dir/imgs" --out "$out" \
        --batch-size "$BATCH" --device cpu >"$DATA/scale-$n.log" 2>"$DATA/scale-$n.time"
    st=$?
    rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$DATA/scale-$n.time")
    ips=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(round(r['processed']/r['seconds'],1))" "$out/report.json" 2>/dev/null)
    rows=$(($(wc -l <"$out/scores.csv") - 1))
    echo "scores $n tiny images: status $st, ${ips:-n/a} images/s, peak RSS $((${rss:-0} / 1024)) MiB, $rows rows in scores.csv"
    [ -z "$first" ] && first=$ips
    last=$ips
done
if [ -n "$first" ] && [ -n "$last" ]; then
    echo "scale ratio (largest / smallest folder images/s): $(python3 -c "print(round($last/$first,3))") (target >= 0.90)"
fi
