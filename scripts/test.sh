#!/usr/bin/env bash
# Set up what is missing (torch venv), then run the whole tch-vis test suite:
# unit, integration, CLI and doc tests, and a crate of a user's own that
# depends on tch-vis (examples/user-crate), run without LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
tch_vis_setup
cargo test --release --all-targets "$@"
cargo test --release --doc "$@"
echo "docs: cargo doc --no-deps --lib, warnings (broken or private links) are errors"
RUSTDOCFLAGS="-D warnings" cargo doc --release --no-deps --lib --quiet
echo "user crate: examples/user-crate, built against tch-vis by path, run with LD_LIBRARY_PATH unset"
(cd examples/user-crate && env -u LD_LIBRARY_PATH cargo run --release --quiet --target-dir ../../target)
