"""The Python side of scripts/bench_cam.sh: the folder job a pytorch-grad-cam
user writes, timed.

Eager torchvision resnet18 with the seeded random weights that
scripts/export_cam_model.py exports (so both sides explain the same
network), target_layers=[model.layer4[-1]], a DataLoader with --workers
worker processes, PIL decode, Resize(256) + CenterCrop(224) + ToTensor +
Normalize (ImageNet), the predicted class (targets=None), and one heatmap
PNG per image (show_cam_on_image over the cropped image, jet, weight 0.5).
pytorch-grad-cam's defaults otherwise (Score-CAM: 16 masked inputs per
forward pass).

Prints one line:
    python-cam METHOD: N images in S s: X images/s
S runs from the first batch requested to the last PNG written (model
construction and imports are outside it, as on the Rust side).

Needs the reference environment of scripts/golden_env.sh (torch 2.11.0,
torchvision 0.26.0, grad-cam 1.5.7, pillow):

    python scripts/bench_cam.py --method gradcam --images DIR --list FILES --out OUT
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_cam_model  # noqa: E402


class Files(Dataset):
    def __init__(self, root, rels):
        self.root = root
        self.rels = rels
        self.crop = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
        self.norm = transforms.Normalize(export_cam_model.IMAGENET_MEAN, export_cam_model.IMAGENET_STD)

    def __len__(self):
        return len(self.rels)

    def __getitem__(self, i):
        img = Image.open(os.path.join(self.root, self.rels[i])).convert("RGB")
        rgb = self.crop(img)
        return self.norm(rgb), rgb, self.rels[i]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", required=True, choices=["gradcam", "gradcam++", "layercam", "scorecam"])
    ap.add_argument("--images", required=True, help="the folder the listed paths are relative to")
    ap.add_argument("--list", required=True, help="a text file with one relative image path a line")
    ap.add_argument("--out", required=True, help="where the heatmap PNGs go (REL.png)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (as the export)")
    args = ap.parse_args()

    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image

    cls = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM, "scorecam": ScoreCAM}[args.method]
    with open(args.list) as f:
        rels = [line.strip() for line in f if line.strip()]
    model = export_cam_model.torchvision_model("resnet18", seed=args.seed)
    loader = DataLoader(Files(args.images, rels), batch_size=args.batch_size, num_workers=args.workers)
    n = 0
    with cls(model=model, target_layers=[model.layer4[-1]]) as cam:
        start = time.perf_counter()
        for x, rgb, names in loader:
            maps = cam(input_tensor=x, targets=None)
            for m, img, rel in zip(maps, rgb, names):
                over = show_cam_on_image(img.permute(1, 2, 0).numpy().astype(np.float32), m, use_rgb=True)
                path = os.path.join(args.out, rel + ".png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(over).save(path)
                n += 1
        secs = time.perf_counter() - start
    print(f"python-cam {args.method}: {n} images in {secs:.2f} s: {n / secs:.3f} images/s")


if __name__ == "__main__":
    sys.exit(main())
