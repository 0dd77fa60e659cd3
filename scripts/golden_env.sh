# shellcheck shell=bash
# Reference packages for golden generation and benchmarks only (never needed
# by scripts/test.sh or CI): torch 2.11.0, torchvision 0.26.0, captum,
# pytorch-grad-cam 1.5.7 (PyPI name grad-cam), numpy, scikit-learn, pillow,
# in their own virtual environment beside the test one. Source it:
#   . scripts/golden_env.sh && tch_vis_golden_setup
# then run "$TCH_VIS_GOLDEN_VENV/bin/python scripts/...".
# Override the location with TCH_VIS_GOLDEN_VENV.

TCH_VIS_GOLDEN_VENV="${TCH_VIS_GOLDEN_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tch-vis/golden-torch-2.11.0}"

tch_vis_golden_setup() {
    local stamp="$TCH_VIS_GOLDEN_VENV/.tch-vis-golden-ready"
    if [ -f "$stamp" ]; then
        echo "tch-vis golden setup: using $TCH_VIS_GOLDEN_VENV"
        return 0
    fi
    echo "tch-vis golden setup: installing the reference packages into $TCH_VIS_GOLDEN_VENV (first run only)"
    local py="${PYTHON:-python3}"
    [ -x "$TCH_VIS_GOLDEN_VENV/bin/python" ] || "$py" -m venv "$TCH_VIS_GOLDEN_VENV" || return 1
    "$TCH_VIS_GOLDEN_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "torch==2.11.0" "torchvision==0.26.0" "grad-cam==1.5.7" captum numpy scikit-learn pillow || {
        echo "tch-vis golden setup: error: could not install the reference packages from PyPI" >&2
        return 1
    }
    touch "$stamp"
}
