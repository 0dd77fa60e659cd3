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
# digits_cnn is the grayscale model: it sees the colour samples as luma and
# takes most of them for other digits. Their own model, digits_rgb (which
# outputs logits), gets every one.
target/release/tch-vis saliency \
    --model models/digits_rgb.pt \
    --images examples/images/rgb \
    --out out/demo-rgb \
    --overwrite "$@"
example="$(find out/demo -name '*.saliency.png' | LC_ALL=C sort | head -n 1)"
echo
echo "demo: outputs are in out/demo/"
echo "  a gallery of every map and score:       out/demo/index.html (open it in a browser)"
echo "  heatmaps (jet over the resized image): out/demo/**/*.saliency.png, e.g. ${example}"
echo "  maps (float32 HxW, normalised per image to [0, 1)): out/demo/**/*.saliency.npy"
echo "  signed gradients (float32 CxHxW):       out/demo/**/*.grad.npy"
echo "  one score per image:                    out/demo/scores.csv"
echo "  run summary and failed inputs:          out/demo/report.json"
echo "and the colour samples through their own colour model in out/demo-rgb/ (index.html)"
