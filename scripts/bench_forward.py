#!/usr/bin/env python3
"""The model-alone ceilings a CAM job is measured against (scripts/gpu_check.sh):
a TorchScript model exported with forward_features / forward_head
(scripts/export_cam_model.py), random inputs of one batch on one device.

Prints two lines:
  forward-alone LABEL batch B DEVICE: M ms per call, X images/s
      model.forward under no_grad (the forward-pass ceiling);
  gradcam-alone LABEL batch B DEVICE: M ms per call, X images/s
      forward_features under no_grad, then forward_head on a leaf A that
      requires grad, and the gradient of the summed top-class scores to A
      (what tch-vis computes per Grad-CAM batch, maps excluded).
Each figure is the median of --iters timed calls after 5 warm-up calls.
IEEE float32 on CUDA unless NVIDIA_TF32_OVERRIDE says otherwise.
"""

import argparse
import statistics
import time

import torch


def timed(fn, iters, device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(5):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--label", default="")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="cuDNN's algorithm search on (tch-vis's batch engine turns it on)")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    model = torch.jit.load(args.model, map_location=device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.size, args.size, generator=g).to(device)

    def forward():
        with torch.no_grad():
            return model(x)

    def gradcam():
        with torch.no_grad():
            a = model.forward_features(x)
        a.requires_grad_(True)
        y = model.forward_head(a)
        s = y.max(dim=1).values.sum()
        (ga,) = torch.autograd.grad(s, a)
        return ga

    for name, fn in (("forward-alone", forward), ("gradcam-alone", gradcam)):
        t = timed(fn, args.iters, device)
        print(f"{name} {args.label} batch {args.batch} {args.device}{' (cudnn benchmark)' if args.cudnn_benchmark else ''}: {t * 1e3:.2f} ms per call, "
              f"{args.batch / t:.1f} images/s")


if __name__ == "__main__":
    main()
