"""Write captum's Integrated Gradients attributions ("IG goldens") that the
Rust tests in tests/it/ig.rs compare against, so no Python is needed at Rust
test time.

What it generates
-----------------
tests/golden_ig/manifest.json        the cases (schema below)
tests/golden_ig/<model>.input.npy    the batch of model inputs, N x C x H x W
tests/golden_ig/<case>.attr.npy      captum's attributions, same shape
tests/golden_ig/<case>.delta.npy     captum's convergence delta, shape [N]
All arrays are numpy .npy, float32, C order.

manifest.json:
  {"torch": "2.11.0", "captum": "...", "dtype": "float32", "threads": 2,
   "rtol": 1e-5, "atol_scale": ...,
   "cases": [{"name", "model", "input", "target", "classes", "method",
              "n_steps", "attributions", "delta"}, ...]}
"model" is relative to the repository root, files relative to
tests/golden_ig/. "target" is {"kind": "categorical", "index": I} (class I
for every sample) or {"kind": "predicted"} (each sample's argmax of
model(x), computed here without gradient); "classes" is the class each
sample was scored on, as passed to captum.

Each case is
    IntegratedGradients(module).attribute(x, baselines=0, target=classes,
        n_steps=n_steps, method=method, return_convergence_delta=True)
on the TorchScript module as loaded from the .pt file, for every rule
(gausslegendre, riemann_left, riemann_right, riemann_middle,
riemann_trapezoid), on models/digits_cnn.pt (softmax output) and
models/digits_rgb.pt (logits), for a fixed class and for the predicted class.

Inputs are files of examples/images preprocessed exactly as
scripts/make_goldens.py (and the CLI) do: decoded, luma or RGB, resized
bilinearly to the sidecar's input size when it differs, (x - mean) / std.

How to run (from the repository root; needs torch==2.11.0, captum, numpy,
pillow — the golden environment of scripts/golden_env.sh):

    . scripts/golden_env.sh && tch_vis_golden_setup
    "$TCH_VIS_GOLDEN_VENV/bin/python" scripts/make_ig_goldens.py
"""

import json
import os
import shutil
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_goldens as mg  # noqa: E402

ROOT = mg.ROOT
OUT = os.path.join(ROOT, "tests", "golden_ig")  # not under tests/golden, which make_goldens.py rewrites whole
RTOL = 1e-5
# atol = ATOL_SCALE x the case's largest |attribution|: see tests/it/ig.rs.
# 1e-5: on a CPU with AVX-512 (libtorch's kernels then sum in wider
# vectors than the AVX2 machine these goldens come from) one attribution of
# digits_cnn was 7.7e-6 x max off; with the kernels held to AVX2 it matched.
ATOL_SCALE = 1e-5
METHODS = ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]
# (model, images, fixed class, steps)
MODELS = [
    ("digits_cnn", ["gray/3/heldout_0023.png", "gray/5/heldout_0033_w64h64.jpg", "gray/8/heldout_0123.png"], 3, 32),
    ("digits_rgb", ["rgb/2/heldout_0084.png", "rgb/4/heldout_0087_w48h40.png"], 7, 24),
]


def main():
    from captum.attr import IntegratedGradients
    import captum

    torch.set_num_threads(2)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    cases = []
    for model, images, fixed, steps in MODELS:
        side = mg.load_sidecar(model)
        x = torch.cat([mg.preprocess(os.path.join(mg.IMAGES, p), side) for p in images]).contiguous()
        module = torch.jit.load(os.path.join(ROOT, "models", model + ".pt"))
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        mg.save(os.path.join(OUT, f"{model}.input.npy"), x)
        with torch.no_grad():
            predicted = module(x).argmax(dim=1).tolist()
        ig = IntegratedGradients(module)
        for target in [{"kind": "categorical", "index": fixed}, {"kind": "predicted"}]:
            classes = [fixed] * len(images) if target["kind"] == "categorical" else predicted
            for method in METHODS:
                before = x.clone()
                attr, delta = ig.attribute(x, baselines=0, target=classes, n_steps=steps, method=method,
                                           return_convergence_delta=True)
                assert torch.equal(before, x), "captum changed the input"
                # The same again (warm executor) must agree.
                attr2, _ = ig.attribute(x, baselines=0, target=classes, n_steps=steps, method=method,
                                        return_convergence_delta=True)
                torch.testing.assert_close(attr, attr2, rtol=RTOL, atol=ATOL_SCALE * float(attr.abs().max()))
                name = f"{model}_{'class' if target['kind'] == 'categorical' else 'predicted'}_{method}"
                mg.save(os.path.join(OUT, f"{name}.attr.npy"), attr)
                mg.save(os.path.join(OUT, f"{name}.delta.npy"), delta)
                cases.append({
                    "name": name,
                    "model": f"models/{model}.pt",
                    "input": f"{model}.input.npy",
                    "target": target,
                    "classes": classes,
                    "method": method,
                    "n_steps": steps,
                    "attributions": f"{name}.attr.npy",
                    "delta": f"{name}.delta.npy",
                })
                print(f"{name}: classes {classes}, max |attr| {attr.abs().max().item():.3g}, "
                      f"delta {np.array2string(delta.numpy(), precision=3)}")
    manifest = {
        "torch": torch.__version__.split("+")[0],
        "captum": captum.__version__,
        "dtype": "float32",
        "threads": 2,
        "rtol": RTOL,
        "atol_scale": ATOL_SCALE,
        "cases": cases,
    }
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"tests/golden_ig: {len(cases)} cases, {total} bytes")


if __name__ == "__main__":
    sys.exit(main())
