#!/usr/bin/env bash
# Set up what is missing, build, and run saliency over the bundled sample
# images with the bundled digits classifier into out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
tch_vis_setup
cargo build --release --bin tch-vis
target/release/tch-vis saliency \
    --model models/digits_cnn.pt \
    --images examples/images \
    --out out/demo \
    --save-npy \
    --overwrite "$@"
example="$(find out/demo -name '*.saliency.png' | LC_ALL=C sort | head -n 1)"
echo
echo "demo: outputs are in out/demo/"
echo "  heatmaps (jet over the resized image): out/demo/**/*.saliency.png, e.g. ${example}"
echo "  maps (float32 HxW, min-max normalised): out/demo/**/*.saliency.npy"
echo "  signed gradients (float32 CxHxW):       out/demo/**/*.grad.npy"
echo "  one score per image:                    out/demo/scores.csv"
echo "  run summary and failed inputs:          out/demo/report.json"
