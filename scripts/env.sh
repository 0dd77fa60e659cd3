# shellcheck shell=bash
# Shared setup for tch-vis scripts. Source it: `. scripts/env.sh`.
#
# Makes sure a Python virtual environment holding torch==2.11.0 (the libtorch
# that tch 0.24 builds against) and numpy exists outside the clone, creates it
# on first use, and exports what torch-sys needs to find it:
#   VIRTUAL_ENV, PATH, LIBTORCH_USE_PYTORCH=1.
# A second run finds the environment and downloads nothing.
#
# Override the location with TCH_VIS_VENV.

TCH_VIS_TORCH_VERSION="2.11.0"
TCH_VIS_VENV="${TCH_VIS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tch-vis/torch-${TCH_VIS_TORCH_VERSION}}"

tch_vis_setup() {
    local stamp="$TCH_VIS_VENV/.tch-vis-ready"
    if [ -f "$stamp" ]; then
        echo "tch-vis setup: using torch ${TCH_VIS_TORCH_VERSION} in $TCH_VIS_VENV"
    else
        echo "tch-vis setup: installing torch==${TCH_VIS_TORCH_VERSION} and numpy into $TCH_VIS_VENV (first run only, a few GB)"
        local py="${PYTHON:-python3}"
        if ! command -v "$py" >/dev/null 2>&1; then
            echo "tch-vis setup: error: $py not found; install Python 3.9+ with venv and pip" >&2
            return 1
        fi
        mkdir -p "$(dirname "$TCH_VIS_VENV")" || return 1
        if [ ! -x "$TCH_VIS_VENV/bin/python" ]; then
            "$py" -m venv "$TCH_VIS_VENV" || {
                echo "tch-vis setup: error: could not create a virtual environment at $TCH_VIS_VENV" >&2
                return 1
            }
        fi
        if ! "$TCH_VIS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            "torch==${TCH_VIS_TORCH_VERSION}" numpy; then
            echo "tch-vis setup: error: could not install torch==${TCH_VIS_TORCH_VERSION} from the Python package index." >&2
            echo "tch-vis setup: check network access to PyPI (or set PIP_INDEX_URL to a mirror) and run the script again." >&2
            return 1
        fi
        touch "$stamp"
    fi
    if ! command -v nasm >/dev/null 2>&1; then
        echo "tch-vis setup: note: nasm not found, so JPEG decoding builds without SIMD (about twice the time per JPEG);" \
            "install nasm (e.g. apt install nasm), then cargo clean -p mozjpeg-sys"
    fi
    export VIRTUAL_ENV="$TCH_VIS_VENV"
    export PATH="$TCH_VIS_VENV/bin:$PATH"
    export LIBTORCH_USE_PYTORCH=1
    unset LIBTORCH LIBTORCH_LIB LIBTORCH_INCLUDE
    if ! command -v cargo >/dev/null 2>&1; then
        if [ -x "$HOME/.cargo/bin/cargo" ]; then
            export PATH="$HOME/.cargo/bin:$PATH"
        else
            echo "tch-vis setup: error: cargo not found; install Rust (stable) with rustup" >&2
            return 1
        fi
    fi
}
