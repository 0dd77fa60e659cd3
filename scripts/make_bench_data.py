#!/usr/bin/env python3
"""Deterministic benchmark data for scripts/bench.sh and scripts/gpu_check.sh.

Writes, under --out (default bench-data/, git-ignored):

  images/           --n-images (default 600) images in a few nested subfolders:
                    mostly JPEGs of mixed, non-square sizes (160-640 px a side),
                    plus some PNGs (RGB, grayscale, RGBA). Smooth random content
                    (gradients, blurred shapes): cheap to make, realistic to decode.
  digits/           --n-digits (default 2000; 0 = none) 32x32 grayscale PNGs
                    and JPEGs for the models/digits_cnn.pt pipeline.
  resnet18.pt/.json torchvision resnet18, random weights (seeded, no download),
                    eval mode, torch.jit.trace, with the tch-vis sidecar
                    (input_size [224, 224], channels 3, ImageNet mean/std).
  resnet50.pt/.json the same for resnet50, with --resnet50.

Everything is seeded (--seed, default 0): a rerun with the same library
versions writes the same bytes. Existing outputs are kept unless --force.
torchvision missing: the images are still written and the script says so
(exit status 3 when a requested model could not be made).
"""

import argparse
import json
import os
import random
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
SUBDIRS = ["", "a", "a/deep", "b", "c/d/e"]


def smooth_image(rng: random.Random, w: int, h: int, mode: str) -> Image.Image:
    """A random smooth RGB picture: two-colour gradient plus blurred shapes."""
    c0 = np.array([rng.randrange(256) for _ in range(3)], np.float32)
    c1 = np.array([rng.randrange(256) for _ in range(3)], np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    arr = c0 + (c1 - c0) * t[..., None]
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 8)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1 = x0 + rng.randint(w // 10, w // 2)
        y1 = y0 + rng.randint(h // 10, h // 2)
        fill = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(1.0, 4.0)))
    if mode == "L":
        return img.convert("L")
    if mode == "RGBA":
        a = Image.linear_gradient("L").resize((w, h))
        img = img.copy()
        img.putalpha(a)
    return img


def make_one_image(root: str, i: int, seed: int, png_every: int) -> None:
    # Each image has its own seed: the same bytes whatever --jobs is.
    rng = random.Random(seed * 1_000_003 + i)
    sub = SUBDIRS[i % len(SUBDIRS)]
    w, h = rng.randint(160, 640), rng.randint(160, 640)
    if w == h:
        h = max(160, h - 1)
    if png_every and i % png_every == png_every - 1:
        mode = ("RGB", "L", "RGBA")[(i // png_every) % 3]
        img = smooth_image(rng, w, h, mode)
        img.save(os.path.join(root, sub, f"img_{i:05d}.png"), optimize=False)
    else:
        img = smooth_image(rng, w, h, "RGB")
        q = rng.randint(75, 95)
        img.save(os.path.join(root, sub, f"img_{i:05d}.jpg"), quality=q)


def _one(a):
    make_one_image(*a)


def make_images(root: str, n: int, seed: int, png_every: int, jobs: int) -> None:
    for sub in SUBDIRS:
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    work = [(root, i, seed, png_every) for i in range(n)]
    if jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(jobs) as pool:
            pool.map(_one, work, chunksize=16)
    else:
        for a in work:
            _one(a)


def make_digits(root: str, n: int, seed: int) -> None:
    """32x32 grayscale pictures with a random digit-like stroke."""
    rng = random.Random(seed + 1)
    for sub in ("", "x", "x/y"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i in range(n):
        sub = ("", "x", "x/y")[i % 3]
        img = Image.new("L", (32, 32), 0)
        d = ImageDraw.Draw(img)
        pts = [(rng.randint(6, 26), rng.randint(4, 28)) for _ in range(rng.randint(3, 6))]
        d.line(pts, fill=255, width=rng.randint(2, 4))
        img = img.filter(ImageFilter.GaussianBlur(radius=0.7))
        if i % 2:
            img.save(os.path.join(root, sub, f"d_{i:05d}.jpg"), quality=90)
        else:
            img.save(os.path.join(root, sub, f"d_{i:05d}.png"))


def make_resnet(out: str, arch: str, seed: int) -> bool:
    try:
        import torch
        import torchvision
    except Exception as e:  # noqa: BLE001
        print(f"make_bench_data: torchvision not importable ({e}); {arch} NOT made", file=sys.stderr)
        return False
    torch.manual_seed(seed)
    ctor = getattr(torchvision.models, arch)
    model = ctor(weights=None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    example = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
        # Batch independence check: the trace must not bake in batch 1.
        y = traced(torch.randn(2, 3, 224, 224))
        assert tuple(y.shape) == (2, 1000), y.shape
    path = os.path.join(out, f"{arch}.pt")
    tmp = path + ".tmp"
    traced.save(tmp)
    os.replace(tmp, path)
    with open(os.path.join(out, f"{arch}.json"), "w") as f:
        json.dump({"input_size": [224, 224], "channels": 3,
                   "mean": IMAGENET_MEAN, "std": IMAGENET_STD}, f, indent=2)
    print(f"make_bench_data: {path} (torchvision {torchvision.__version__}, random weights, seed {seed})")
    return True


def count_files(d: str) -> int:
    return sum(len(fs) for _, _, fs in os.walk(d)) if os.path.isdir(d) else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-data")
    ap.add_argument("--n-images", type=int, default=600)
    ap.add_argument("--images-dir", default="images", help="folder name under --out")
    ap.add_argument("--png-every", type=int, default=10,
                    help="every k-th image is a PNG (RGB/L/RGBA in turn); 0 = JPEGs only")
    ap.add_argument("--n-digits", type=int, default=2000)
    ap.add_argument("--digits-dir", default="digits", help="folder name under --out")
    ap.add_argument("--no-resnet18", action="store_true")
    ap.add_argument("--resnet50", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="processes writing images (output does not depend on it)")
    ap.add_argument("--force", action="store_true", help="regenerate even when present")
    args = ap.parse_args()

    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    ok = True
    img_dir = os.path.join(args.out, args.images_dir)
    if args.n_images > 0:
        if args.force or count_files(img_dir) != args.n_images:
            if os.path.isdir(img_dir):
                import shutil
                shutil.rmtree(img_dir)
            make_images(img_dir, args.n_images, args.seed, args.png_every, args.jobs)
        print(f"make_bench_data: {img_dir}: {count_files(img_dir)} images")
    dig_dir = os.path.join(args.out, args.digits_dir)
    if args.n_digits > 0:
        if args.force or count_files(dig_dir) != args.n_digits:
            if os.path.isdir(dig_dir):
                import shutil
                shutil.rmtree(dig_dir)
            make_digits(dig_dir, args.n_digits, args.seed)
        print(f"make_bench_data: {dig_dir}: {count_files(dig_dir)} images")
    archs = ([] if args.no_resnet18 else ["resnet18"]) + (["resnet50"] if args.resnet50 else [])
    for arch in archs:
        if not args.force and os.path.exists(os.path.join(args.out, f"{arch}.pt")) \
                and os.path.exists(os.path.join(args.out, f"{arch}.json")):
            print(f"make_bench_data: {arch} present")
            continue
        ok &= make_resnet(args.out, arch, args.seed)
    print(f"make_bench_data: done in {time.time() - t0:.1f} s")
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
