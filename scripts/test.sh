#!/usr/bin/env bash
# Set up what is missing (torch venv), then run the whole tch-vis test suite:
# formatting, unit, integration, CLI and doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
tch_vis_setup
cargo test --release --all-targets "$@"
cargo test --release --doc "$@"
