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
    --overwrite "$@"
echo "demo: saliency maps and scores are in out/demo/ (open out/demo/**/*.saliency.png)"
