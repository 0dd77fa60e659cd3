#!/usr/bin/env python3
"""PyTorch-in-Python baseline for the tch-vis overhead benchmark.

Loads the same TorchScript file examples/bench_overhead.rs loads, feeds the
same random batch shape, and times, per call,

    x = input.detach().requires_grad_(True)
    g, = torch.autograd.grad(model(x)[:, K].sum(), x)

(median of --iters calls after --warmup calls; CUDA synchronised). Prints

    python-autograd L batch B dev prec: X ms per call, N images/s (threads T)

Threads: torch's default intra-op thread count, the same default libtorch
uses in the Rust binaries (one per physical core); --threads overrides it.
Precision fp16/bf16 casts the weights and the input, as tch-vis does.
"""

import argparse
import statistics
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--label", default="")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--class", dest="klass", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="0 = torch default")
    args = ap.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    model = torch.jit.load(args.model, map_location=dev).eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    x0 = torch.randn(args.batch, args.channels, args.size, args.size, device=dev)
    k = args.klass

    def call():
        x = x0.to(dtype).detach().requires_grad_(True)
        out = model(x)
        (g,) = torch.autograd.grad(out[:, k].sum(dtype=torch.float32), x)
        return g.float()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(args.warmup):
        call()
    sync()
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    label = args.label or args.model
    devname = "cuda" if dev.type == "cuda" else "cpu"
    print(f"python-autograd {label} batch {args.batch} {devname} {args.precision}: "
          f"{med * 1e3:.3f} ms per call, {args.batch / med:.1f} images/s "
          f"(threads {torch.get_num_threads()}, torch {torch.__version__})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
