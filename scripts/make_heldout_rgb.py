#!/usr/bin/env python3
"""Writes every held-out digit of models/digits_rgb.pt's split as a 32x32 RGB PNG,
coloured as the model was evaluated (scripts/make_models.py), under
OUT/DIGIT/heldout_NNNN.png. scripts/gpu_check.sh uses them for the Pearson r
between fp32 and half-precision maps on a trained model. Needs scikit-learn
(the golden environment: scripts/golden_env.sh).

    python scripts/make_heldout_rgb.py --out .gpu/digits-rgb
"""

import argparse
import os
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_models as mm  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    data = mm.load_data()
    ho = data["heldout"]
    fg, bg = mm.heldout_colours(data)
    rgb = mm.colourise(data["x"][ho], fg, bg).permute(0, 2, 3, 1).numpy()
    for k, i in enumerate(ho):
        d = int(data["y"][i])
        path = os.path.join(args.out, str(d), f"heldout_{i:04d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(mm.to_u8(rgb[k]), mode="RGB").save(path)
    print(f"wrote {len(ho)} held-out RGB digits to {args.out}")


if __name__ == "__main__":
    main()
