"""Compose docs/demo.png, the README's figure, from `scripts/demo.sh` output.

Reads the saliency heatmaps that `tch-vis saliency` wrote into out/demo/
(32x32 overlays at the digits model's input size) next to their input images,
and tiles them, enlarged 6x with nearest-neighbour so pixels stay visible:
top row the inputs, bottom row tch-vis's heatmaps. The heatmaps themselves
are the tool's output, unchanged apart from the enlargement.

    scripts/demo.sh && python scripts/make_readme_figure.py   # needs pillow
"""
import pathlib

from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAMES = [
    "gray/0/heldout_0036.png",
    "gray/2/heldout_0057.png",
    "gray/3/heldout_0023.png",
    "gray/4/heldout_0041.png",
    "gray/5/heldout_0025.png",
    "gray/7/heldout_0043.png",
    "gray/8/heldout_0028.png",
    "gray/9/heldout_0069.png",
]
SCALE, PAD = 6, 4


def main() -> None:
    tiles = []
    for name in NAMES:
        src = Image.open(ROOT / "examples/images" / name).convert("RGB")
        heat = Image.open(ROOT / "out/demo" / (name + ".saliency.png")).convert("RGB")
        size = (heat.width * SCALE, heat.height * SCALE)
        tiles.append((src.resize(size, Image.NEAREST), heat.resize(size, Image.NEAREST)))
    w, h = tiles[0][0].size
    canvas = Image.new("RGB", (len(tiles) * (w + PAD) + PAD, 2 * (h + PAD) + PAD), "white")
    for i, (src, heat) in enumerate(tiles):
        x = PAD + i * (w + PAD)
        canvas.paste(src, (x, PAD))
        canvas.paste(heat, (x, 2 * PAD + h))
    out = ROOT / "docs/demo.png"
    canvas.save(out, optimize=True)
    print(f"wrote {out.relative_to(ROOT)} ({canvas.width}x{canvas.height})")


if __name__ == "__main__":
    main()
