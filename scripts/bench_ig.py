#!/usr/bin/env python3
"""The Integrated Gradients job a captum user writes, for scripts/bench_ig.sh.

PIL decode and the sidecar's resize + normalise in a DataLoader, captum's
IntegratedGradients(model).attribute(x, baselines=0, target=argmax,
n_steps=N, internal_batch_size=R) per batch, and per image an .npy of the
attributions and a jet heatmap PNG of their channel-max magnitude.
Prints `python-ig: N images in S s, R images/s`.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
from captum.attr import IntegratedGradients
from PIL import Image


class Folder(torch.utils.data.Dataset):
    def __init__(self, root, side):
        self.files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
        self.side = side

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        h, w = self.side["input_size"]
        img = Image.open(self.files[i]).convert("RGB").resize((w, h), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.side["mean"]).view(3, 1, 1)
        std = torch.tensor(self.side["std"]).view(3, 1, 1)
        return (x - mean) / std, x, i


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--internal-batch-size", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    side = json.load(open(a.model[:-3] + ".json"))
    model = torch.jit.load(a.model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ig = IntegratedGradients(model)
    ds = Folder(a.images, side)
    dl = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, num_workers=a.workers)
    import matplotlib

    jet = matplotlib.colormaps["jet"]
    os.makedirs(a.out, exist_ok=True)
    t = time.time()
    n = 0
    for x, img, idx in dl:
        with torch.no_grad():
            target = model(x).argmax(1)
        attr = ig.attribute(x, baselines=0, target=target, n_steps=a.steps,
                            internal_batch_size=a.internal_batch_size)
        for k in range(x.shape[0]):
            rel = os.path.relpath(ds.files[int(idx[k])], a.images).replace(os.sep, "_")
            np.save(os.path.join(a.out, rel + ".ig.npy"), attr[k].numpy())
            m = attr[k].abs().amax(0)
            m = ((m - m.min()) / (m.max() - m.min() + 1e-7)).numpy()
            heat = jet(m)[..., :3]
            over = 0.5 * heat + 0.5 * img[k].permute(1, 2, 0).numpy()
            Image.fromarray((over * 255).clip(0, 255).astype(np.uint8)).save(
                os.path.join(a.out, rel + ".ig.png"))
            n += 1
    s = time.time() - t
    print(f"python-ig: {n} images in {s:.2f} s, {n / s:.3f} images/s")


if __name__ == "__main__":
    main()
