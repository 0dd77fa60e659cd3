#!/usr/bin/env python3
"""The `tch-vis saliency` job written the way a Python user would write it.

Same inputs and outputs as `tch-vis saliency` (see the README), the idiomatic way:

  * reads the model's sidecar M.json (input_size, channels, mean, std);
  * a torch Dataset over every file under --images (recursive, sorted),
    decoded with PIL, torchvision transforms: Resize to the input size,
    Grayscale when channels is 1, ToTensor, Normalize;
  * a DataLoader with --workers worker processes and --batch-size;
  * captum's `Saliency` (|input gradient| of the class score); when captum is
    not importable, plain `torch.autograd.grad` doing the same, and it says so;
  * the map: max over channels of |grad|, per-image min-max normalisation;
  * a jet heatmap (matplotlib's colormap when available) blended over the
    resized image, written as REL.saliency.png with PIL, plus REL.saliency.npy.

Score: --class K scores class K for every image (what scripts/bench.sh uses
for both sides, `--score categorical:K` on the CLI); --class -1 scores each
image's predicted class (the CLI's default `predicted`; with captum that
costs one extra no-grad forward to find the targets, as a user would write it).

Prints

  python-pipeline L: N images in S s, R images/s (...)

where S is the wall time from the DataLoader's creation to the last file
written (model load and imports excluded; bench.sh also times the whole
process from outside).
"""

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


class Folder(Dataset):
    def __init__(self, root, size, channels, mean, std):
        self.root = root
        files = []
        for d, _, fs in os.walk(root):
            for f in fs:
                files.append(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
        self.files = sorted(files, key=lambda s: s.encode("utf-8"))
        self.channels = channels
        self.resize = transforms.Resize(tuple(size))
        tail = [transforms.ToTensor(), transforms.Normalize(mean, std)]
        if channels == 1:
            tail.insert(0, transforms.Grayscale(num_output_channels=1))
        self.to_input = transforms.Compose(tail)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        rel = self.files[i]
        try:
            with Image.open(os.path.join(self.root, rel)) as im:
                im = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - undecodable: recorded, run goes on
            return None, None, rel, str(e)
        im = self.resize(im)
        shown = np.asarray(im.convert("L") if self.channels == 1 else im)
        return self.to_input(im), torch.from_numpy(shown.copy()), rel, None


def collate(items):
    ok = [it for it in items if it[0] is not None]
    failed = [(it[2], it[3]) for it in items if it[0] is None]
    if not ok:
        return None, None, [], failed
    x = torch.stack([it[0] for it in ok])
    shown = [it[1] for it in ok]
    return x, shown, [it[2] for it in ok], failed


def jet_colormap():
    try:
        from matplotlib import colormaps
        cmap = colormaps["jet"]
        return lambda m: (cmap(m)[..., :3] * 255.0).astype(np.float32), "matplotlib jet"
    except Exception:  # noqa: BLE001
        def jet(m):
            r = np.clip(1.5 - np.abs(4.0 * m - 3.0), 0, 1)
            g = np.clip(1.5 - np.abs(4.0 * m - 2.0), 0, 1)
            b = np.clip(1.5 - np.abs(4.0 * m - 1.0), 0, 1)
            return np.stack([r, g, b], -1).astype(np.float32) * 255.0
        return jet, "numpy jet"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--class", dest="klass", type=int, default=-1, help="-1 = predicted class")
    ap.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity")
    ap.add_argument("--no-captum", action="store_true", help="plain autograd even when captum is there")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                    help="weights and input in this dtype (as tch-vis --precision); maps in float32")
    ap.add_argument("--limit", type=int, default=0, help="only the first N files (0 = all)")
    ap.add_argument("--label", default="")
    args = ap.parse_args()

    # captum warns on every batch that it set requires_grad on the input.
    warnings.filterwarnings("ignore", message="Input Tensor .* did not already require gradients")
    sidecar = os.path.splitext(args.model)[0] + ".json"
    with open(sidecar) as f:
        meta = json.load(f)
    size, channels = meta["input_size"], meta["channels"]
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = torch.jit.load(args.model, map_location=dev).eval()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    if dtype != torch.float32:
        model = model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)

    saliency, how = None, "plain autograd (--no-captum)"
    if not args.no_captum:
        try:
            from captum.attr import Saliency
            import captum
            saliency, how = Saliency(model), f"captum {captum.__version__} Saliency"
        except Exception as e:  # noqa: BLE001
            how = f"plain autograd (captum not importable: {type(e).__name__}: {e})"
            print(f"baseline_saliency: captum not importable ({e}); using plain torch.autograd.grad",
                  file=sys.stderr)
    jet, cmap_name = jet_colormap()

    def abs_grad(x):
        if saliency is not None:
            if args.klass >= 0:
                target = args.klass
            else:
                with torch.no_grad():
                    target = model(x).argmax(1).tolist()
            return saliency.attribute(x, target=target, abs=True)
        x = x.detach().requires_grad_(True)
        out = model(x)
        idx = out.argmax(1, keepdim=True) if args.klass < 0 else \
            torch.full((out.shape[0], 1), args.klass, device=out.device)
        (g,) = torch.autograd.grad(out.gather(1, idx).float().sum(), x)
        return g.abs()

    data = Folder(args.images, size, channels, meta["mean"], meta["std"])
    if args.limit > 0:
        data.files = data.files[:args.limit]
    t0 = time.perf_counter()
    loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=collate, pin_memory=dev.type == "cuda",
                        persistent_workers=False)
    done, failed = 0, []
    for x, shown, rels, bad in loader:
        failed += bad
        if x is None:
            continue
        g = abs_grad(x.to(dev, non_blocking=True).to(dtype)).float()
        m = g.amax(dim=1)
        lo = m.flatten(1).min(1).values[:, None, None]
        hi = m.flatten(1).max(1).values[:, None, None]
        m = ((m - lo) / (hi - lo + 1e-7)).float().cpu().numpy()
        for k, rel in enumerate(rels):
            base = os.path.join(args.out, rel)
            os.makedirs(os.path.dirname(base), exist_ok=True)
            np.save(base + ".saliency.npy", m[k])
            img = shown[k].numpy().astype(np.float32)
            if img.ndim == 2:
                img = np.repeat(img[..., None], 3, -1)
            blend = (1 - args.alpha) * img + args.alpha * jet(m[k])
            Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8)).save(base + ".saliency.png")
        done += len(rels)
    secs = time.perf_counter() - t0
    label = args.label or os.path.basename(args.model)
    print(f"python-pipeline {label}: {done} images in {secs:.2f} s, {done / secs:.1f} images/s "
          f"({how}; {cmap_name}; {args.workers} workers; batch {args.batch_size}; {dev.type}; "
          f"{args.precision}; {len(failed)} failed; main threads {torch.get_num_threads()})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
