#!/usr/bin/env bash
# Renders a run's gallery, OUT/index.html, in headless Chromium and writes a
# screenshot of the first screen.
#
#   scripts/gallery_screenshot.sh OUT PNG [WIDTH,HEIGHT]
#
# WIDTH,HEIGHT defaults to 1400,1000. Chromium comes from the Debian package
# (`apt-get install chromium`); CHROMIUM=/path/to/binary picks another one.
# Exit status: 0 written, 2 bad usage, 3 no Chromium found, 1 it failed.
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 OUT PNG [WIDTH,HEIGHT]" >&2
    exit 2
fi
out=$1
png=$2
size=${3:-1400,1000}

if [ ! -f "$out/index.html" ]; then
    echo "gallery_screenshot: error: no gallery at $out/index.html" >&2
    exit 2
fi

browser=${CHROMIUM:-}
if [ -z "$browser" ]; then
    for name in chromium chromium-browser google-chrome google-chrome-stable; do
        if command -v "$name" >/dev/null 2>&1; then
            browser=$(command -v "$name")
            break
        fi
    done
fi
if [ -z "$browser" ]; then
    echo "gallery_screenshot: error: no chromium found (apt-get install chromium)" >&2
    exit 3
fi

# A file:// URL: every byte of the absolute path percent-encoded but
# A-Z a-z 0-9 - . _ ~ /.
urlencode() {
    local LC_ALL=C s=$1 out="" c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case $c in
            [A-Za-z0-9._~/-]) out+=$c ;;
            *) out+=$(printf '%%%02X' "'$c") ;;
        esac
    done
    printf '%s' "$out"
}
index=$(cd "$out" && pwd -P)/index.html
mkdir -p "$(dirname "$png")"
png_abs=$(cd "$(dirname "$png")" && pwd -P)/$(basename "$png")

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# --virtual-time-budget lets the data scripts and the thumbnails on screen
# load before the picture is taken. --no-sandbox: root in containers.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --no-first-run --no-default-browser-check --user-data-dir="$profile" \
    --virtual-time-budget=5000 --window-size="$size" \
    --screenshot="$png_abs" "file://$(urlencode "$index")" >/dev/null 2>&1 || {
    echo "gallery_screenshot: error: $browser failed" >&2
    exit 1
}
if [ ! -s "$png_abs" ]; then
    echo "gallery_screenshot: error: no screenshot written" >&2
    exit 1
fi
echo "$png_abs"
