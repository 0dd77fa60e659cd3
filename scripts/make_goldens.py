"""Write the PyTorch reference values ("goldens") that the Rust tests compare
against, so no Python is needed at Rust test time.

What it generates
-----------------
tests/golden/manifest.json    the score cases (schema below)
tests/golden/<case>/*.npy     per case: input_K.npy (model input K,
                              N x C x H x W), output_K.npy (model output K),
                              score_K.npy (score of output K, shape [N]),
                              grad_K.npy (gradient w.r.t. input K)
tests/golden/preprocess/      CLI preprocessing + saliency goldens for every
                              file in examples/images with models/digits_cnn.pt
                              (manifest.json: a list of {"path", "input",
                              "grad", "saliency", "class", "score"}).
All arrays are numpy .npy, float32, C order.

manifest.json:
  {"torch": "2.11.0", "seed": 0, "dtype": "float32", "rtol": 1e-5, "atol": 1e-5,
   "cases": [{"name", "model", "inputs", "scores", "outputs", "score_values",
              "grads"}, ...]}
"model" is relative to the repository root, the file lists are relative to
tests/golden/<name>/; "scores" holds one score spec per model output:
  {"kind": "categorical", "indices": [i] | [i0, ..., iN-1]}
      score[n] = mean over the axes after dim 1 of output[n, idx[n], ...]
  {"kind": "binary", "values": [b] | [b0, ..., bN-1]}
      output reshaped to (N,); true -> output, false -> -output
  {"kind": "regression", "mode": "increase" | "decrease"}
      output reshaped to (N,), negated for "decrease"
  {"kind": "regression", "mode": "maintain", "target": T}
      abs(1.0 / ((output - T) + 1e-7))
  {"kind": "inactive"}
      (output * 0) averaged over the non-batch axes
The gradient is d(sum over outputs k of score_k.sum())/d(input), computed with
torch.autograd on the TorchScript module as loaded from the .pt file.

Preprocessing golden (what the CLI does to an image file, digits_cnn sidecar):
decode with PIL; RGB float32 in [0, 1] (8-bit / 255, 16-bit / 65535); for
channels == 1 luma = (0.299 R + 0.587 G) + 0.114 B in float32; shape
1 x C x H x W; bilinear resize (align_corners=False, antialias=False) to
input_size only when the size differs; (x - mean) / std. Computed as the
CLI computes it: row 0 of a batch of 32 rows (the CLI's default batch size)
padded with zero images, one intra-op thread. Score "predicted": the output
(softmax probability) of the argmax class. Saliency: m = max over channels
of |grad|, then (m - min) / (max - min + 1e-7).

Inputs of the score cases are held-out digits (same split as
scripts/make_models.py), normalised as the sidecar says, plus a little
seeded noise. Deterministic (fixed seeds, 2 intra-op threads).

How to run (from the repository root, after scripts/make_models.py; needs
torch==2.11.0, numpy, scikit-learn and pillow):

    $VENV/bin/python scripts/make_goldens.py [--preprocess-only]

--preprocess-only rewrites tests/golden/preprocess/ alone. The score cases
are reproducible to the last bit only on the CPU that wrote them (another
x86-64 CPU moved them by up to 1e-6 relative, far inside their tolerances).
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_models as mm  # noqa: E402

ROOT = mm.ROOT
GOLDEN = os.path.join(ROOT, "tests", "golden")
IMAGES = mm.IMAGES
SEED = 0
NOISE = 0.02
RTOL = 1e-5
# atol 1e-5, not 1e-6: recomputing these goldens with 1, 3, 4 or 8 intra-op
# threads instead of 2 changes the dense logits near zero by up to 1.7e-6 and
# the digits_rgb logits by up to 1e-6 (the gradients by < 2e-8).
ATOL = 1e-5


# --------------------------------------------------------------------------
# Scores (the reference semantics)
# --------------------------------------------------------------------------


def per_sample(values, n):
    if len(values) == 1:
        return list(values) * n
    assert len(values) == n, (values, n)
    return list(values)


def score(spec, out):
    """Score tensor of shape [N] for one model output, per the spec."""
    n = out.shape[0]
    kind = spec["kind"]
    if kind == "categorical":
        idx = torch.tensor(per_sample(spec["indices"], n), dtype=torch.int64)
        picked = out[torch.arange(n), idx]  # (N, ...)
        if picked.dim() == 1:
            return picked
        return picked.reshape(n, -1).mean(dim=1)
    if kind == "binary":
        assert out.numel() == n, out.shape
        v = out.reshape(n)
        keep = torch.tensor(per_sample(spec["values"], n), dtype=torch.bool)
        return torch.where(keep, v, -v)
    if kind == "regression":
        assert out.numel() == n, out.shape
        v = out.reshape(n)
        mode = spec["mode"]
        if mode == "increase":
            return v
        if mode == "decrease":
            return -v
        if mode == "maintain":
            return torch.abs(1.0 / (v - spec["target"] + 1e-7))
        raise ValueError(mode)
    if kind == "inactive":
        return (out * 0).reshape(n, -1).mean(dim=1)
    raise ValueError(kind)


def flatten_outputs(outs):
    if isinstance(outs, (tuple, list)):
        res = []
        for o in outs:
            res.extend(flatten_outputs(o))
        return res
    return [outs]


def run_case(module, inputs, specs):
    """Forward + scores + gradient, the way the Rust side is expected to."""
    xs = [x.clone().requires_grad_(True) for x in inputs]
    outs = flatten_outputs(module(*xs))
    assert len(outs) == len(specs), (len(outs), len(specs))
    scores = [score(s, o) for s, o in zip(specs, outs)]
    objective = sum(s.sum() for s in scores)
    grads = torch.autograd.grad(objective, xs)
    return [o.detach() for o in outs], [s.detach() for s in scores], [g.detach() for g in grads]


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def load_sidecar(model):
    with open(os.path.join(ROOT, "models", model + ".json")) as f:
        return json.load(f)


class HeldOut:
    """Hands out held-out digits of a requested label, each at most once."""

    def __init__(self):
        self.data = mm.load_data()
        self.fg, self.bg = mm.heldout_colours(self.data)
        y = self.data["y"]
        self.positions = {d: [k for k, i in enumerate(self.data["heldout"]) if int(y[i]) == d] for d in range(10)}
        self.cursor = {d: 0 for d in range(10)}
        # digits_cnn's softmax saturates on most digits (p ~ 1 - 1e-6, so the
        # gradients are ~1e-6 and depend on the rounding of 1 - p); its cases
        # use the held-out digits it is least sure of, hardest first.
        side = load_sidecar("digits_cnn")
        module = torch.jit.load(os.path.join(ROOT, "models", "digits_cnn.pt"))
        x = mm.normalise(self.data["x"][torch.from_numpy(self.data["heldout"])], side["mean"], side["std"])
        with torch.no_grad():
            self.cnn_probs = module(x)
        conf = self.cnn_probs[torch.arange(len(x)), y[torch.from_numpy(self.data["heldout"])]]
        self.hard = {d: sorted(ps, key=lambda k: (float(conf[k]), k)) for d, ps in self.positions.items()}
        self.hard_cursor = {d: 0 for d in range(10)}

    def take(self, digits, hard=False):
        pos = []
        for d in digits:
            if hard:
                pos.append(self.hard[d][self.hard_cursor[d]])
                self.hard_cursor[d] += 1
            else:
                pos.append(self.positions[d][self.cursor[d]])
                self.cursor[d] += 1
        return pos

    def runner_up(self, n):
        """Positions of the n held-out digits with the lowest top-1 digits_cnn
        probability, and each one's second most likely class."""
        top = self.cnn_probs.topk(2, dim=1)
        order = sorted(range(len(top.values)), key=lambda k: (float(top.values[k, 0]), k))[:n]
        return order, [int(top.indices[k, 1]) for k in order]

    def batch(self, digits, channels, hard=False, positions=None):
        """[0,1] images (N, C, 32, 32) of held-out digits with these labels
        (or at these held-out positions)."""
        pos = positions if positions is not None else self.take(digits, hard)
        idx = torch.tensor([int(self.data["heldout"][k]) for k in pos])
        a = self.data["x"][idx]
        if channels == 1:
            return a
        return mm.colourise(a, self.fg[pos], self.bg[pos])


def save(path, t):
    a = np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))
    np.save(path, a)


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------

CAT = "categorical"


def cases():
    """(name, model, digits of the batch, score specs)."""
    return [
        ("cnn_categorical_broadcast", "digits_cnn", [3, 5, 8, 3], [{"kind": CAT, "indices": [3]}]),
        ("cnn_categorical_per_sample", "digits_cnn", [1, 7, 4, 9], [{"kind": CAT, "indices": [1, 7, 4, 9]}]),
        ("cnn_categorical_all_classes", "digits_cnn", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
         [{"kind": CAT, "indices": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}]),
        # digits and indices filled in by make_cases: the 5 hardest held-out
        # digits, each scored on its runner-up class.
        ("cnn_categorical_runner_up", "digits_cnn", None, None),
        ("rgb_categorical_broadcast", "digits_rgb", [2, 2, 6, 0], [{"kind": CAT, "indices": [2]}]),
        ("rgb_categorical_per_sample", "digits_rgb", [5, 3, 8, 0, 6], [{"kind": CAT, "indices": [5, 3, 8, 0, 6]}]),
        ("binary_true", "digits_binary", [0, 0, 6, 9], [{"kind": "binary", "values": [True]}]),
        ("binary_false", "digits_binary", [0, 8, 6, 0], [{"kind": "binary", "values": [False]}]),
        ("binary_per_sample", "digits_binary", [0, 0, 6, 8],
         [{"kind": "binary", "values": [True, False, True, False]}]),
        ("regressor_increase", "digits_regressor", [2, 4, 7, 9], [{"kind": "regression", "mode": "increase"}]),
        ("regressor_decrease", "digits_regressor", [1, 3, 6, 8], [{"kind": "regression", "mode": "decrease"}]),
        ("regressor_maintain", "digits_regressor", [4, 5, 0, 9, 4],
         [{"kind": "regression", "mode": "maintain", "target": 4.5}]),
        ("multi_categorical_regression", "digits_multi", [7, 1, 2, 7],
         [{"kind": CAT, "indices": [7]}, {"kind": "regression", "mode": "increase"}]),
        ("multi_inactive_regression", "digits_multi", [3, 6, 8, 5],
         [{"kind": "inactive"}, {"kind": "regression", "mode": "decrease"}]),
        ("multi_categorical_inactive", "digits_multi", [0, 4, 9, 2],
         [{"kind": CAT, "indices": [0, 4, 9, 2]}, {"kind": "inactive"}]),
        ("dense_categorical_broadcast", "digits_dense", [0, 0, 3, 6], [{"kind": CAT, "indices": [1]}]),
        ("dense_categorical_per_sample", "digits_dense", [2, 5, 7, 0], [{"kind": CAT, "indices": [3, 6, 0, 1]}]),
    ]


def make_cases(held):
    entries = []
    for k, (name, model, digits, specs) in enumerate(cases()):
        side = load_sidecar(model)
        if digits is None:
            pos, second = held.runner_up(5)
            specs = [{"kind": CAT, "indices": second}]
            x = held.batch(None, side["channels"], positions=pos)
        else:
            x = held.batch(digits, side["channels"], hard=(model == "digits_cnn"))
        x = mm.normalise(x, side["mean"], side["std"])
        gen = torch.Generator().manual_seed(SEED * 1000 + k)
        x = (x + NOISE * torch.randn(x.shape, generator=gen)).contiguous()

        # A fresh load per case, one forward/backward: what a Rust test does.
        module = torch.jit.load(os.path.join(ROOT, "models", model + ".pt"))
        module.eval()
        outs, scores, grads = run_case(module, [x], specs)

        # The same numbers again (warm executor) must agree.
        outs2, scores2, grads2 = run_case(module, [x], specs)
        for a, b in zip(outs + scores + grads, outs2 + scores2 + grads2):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)

        d = os.path.join(GOLDEN, name)
        os.makedirs(d)
        entry = {
            "name": name,
            "model": f"models/{model}.pt",
            "inputs": [],
            "scores": specs,
            "outputs": [],
            "score_values": [],
            "grads": [],
        }
        for i, t in enumerate([x]):
            save(os.path.join(d, f"input_{i}.npy"), t)
            entry["inputs"].append(f"input_{i}.npy")
        for i, t in enumerate(outs):
            save(os.path.join(d, f"output_{i}.npy"), t)
            entry["outputs"].append(f"output_{i}.npy")
        for i, t in enumerate(scores):
            save(os.path.join(d, f"score_{i}.npy"), t)
            entry["score_values"].append(f"score_{i}.npy")
        for i, t in enumerate(grads):
            save(os.path.join(d, f"grad_{i}.npy"), t)
            entry["grads"].append(f"grad_{i}.npy")
        entries.append(entry)
        shapes = ", ".join(str(tuple(o.shape)) for o in outs)
        gmax = max(g.abs().max().item() for g in grads)
        svals = "; ".join(np.array2string(s.numpy(), precision=4) for s in scores)
        print(f"{name}: outputs {shapes}, scores {svals}, max |grad| {gmax:.3g}")
    return entries


# --------------------------------------------------------------------------
# Preprocessing golden
# --------------------------------------------------------------------------


def decode(path):
    """PIL decode -> float32 RGB (H, W, 3) in [0, 1]."""
    from PIL import Image

    img = Image.open(path)
    img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        a = np.array(img).astype(np.float32) / np.float32(65535.0)
        return np.repeat(a[:, :, None], 3, axis=2)
    if img.mode not in ("L", "RGB"):
        raise ValueError(f"{path}: unexpected mode {img.mode}")
    a = np.array(img.convert("RGB")).astype(np.float32) / np.float32(255.0)
    return a


def preprocess(path, side):
    rgb = decode(path)
    if side["channels"] == 1:
        r, g, b = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
        luma = np.float32(0.299) * r + np.float32(0.587) * g + np.float32(0.114) * b
        chw = luma[None].astype(np.float32)
    else:
        chw = np.transpose(rgb, (2, 0, 1))
    x = torch.from_numpy(np.ascontiguousarray(chw))[None]
    h, w = side["input_size"]
    if tuple(x.shape[2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    return mm.normalise(x, side["mean"], side["std"]).contiguous()


# Rows of every model call in the CLI (its default --batch-size): short
# batches are padded with zero images.
CLI_BATCH = 32


def make_preprocess():
    # Computed the way the CLI computes it, not as a batch of one:
    # - in a batch of CLI_BATCH rows, the image in row 0 and zero images
    #   after it. libtorch's CPU convolution rounds differently for a batch
    #   of one than for larger batches (last bits only), and on images with
    #   flat regions (rgb/4/heldout_0087_w48h40.png: bilinear upscaling) the
    #   max-pool ties of digits_cnn then fall on other pixels, which moves the
    #   gradient by ~4e-3 in a block of ~20 pixels;
    # - with one intra-op thread, as the CLI uses for models with inputs of at
    #   most 64 x 64 x 3 values on the CPU.
    torch.set_num_threads(1)
    side = load_sidecar("digits_cnn")
    module = torch.jit.load(os.path.join(ROOT, "models", "digits_cnn.pt"))
    module.eval()
    d = os.path.join(GOLDEN, "preprocess")
    os.makedirs(d)
    files = []
    for dirpath, _, names in os.walk(IMAGES):
        for n in names:
            files.append(os.path.relpath(os.path.join(dirpath, n), IMAGES).replace(os.sep, "/"))
    files.sort()
    items = []
    for k, rel in enumerate(files):
        x = preprocess(os.path.join(IMAGES, rel), side)
        xb = torch.cat([x, torch.zeros((CLI_BATCH - 1,) + tuple(x.shape[1:]))]).contiguous()
        with torch.no_grad():
            classes = module(xb).argmax(dim=1).tolist()
        cls = int(classes[0])
        outs, scores, grads = run_case(module, [xb], [{"kind": CAT, "indices": classes}])
        g = grads[0][0]  # (C, H, W)
        m = g.abs().amax(dim=0)
        sal = (m - m.min()) / (m.max() - m.min() + 1e-7)
        item = {
            "path": rel,
            "input": f"{k}.input.npy",
            "grad": f"{k}.grad.npy",
            "saliency": f"{k}.saliency.npy",
            "class": cls,
            "score": float(scores[0][0]),
        }
        save(os.path.join(d, item["input"]), x)
        save(os.path.join(d, item["grad"]), g)
        save(os.path.join(d, item["saliency"]), sal)
        items.append(item)
        print(f"preprocess {k}: {rel} -> class {cls} p={item['score']:.4f} max |grad| {g.abs().max().item():.3g}")
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(items, f, indent=1)
        f.write("\n")


def main():
    preprocess_only = sys.argv[1:] == ["--preprocess-only"]
    if sys.argv[1:] and not preprocess_only:
        print(f"usage: {sys.argv[0]} [--preprocess-only]", file=sys.stderr)
        return 2
    if preprocess_only:
        # The score cases are left as they are (a rerun on another CPU can
        # change their last bits).
        shutil.rmtree(os.path.join(GOLDEN, "preprocess"), ignore_errors=True)
        make_preprocess()
        return 0
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    # Only what this script writes: tests/golden/cam and tests/golden/transforms
    # come from make_cam_goldens.py and make_preprocess_goldens.py.
    os.makedirs(GOLDEN, exist_ok=True)
    for name in [c[0] for c in cases()] + ["preprocess"]:
        if os.path.isdir(os.path.join(GOLDEN, name)):
            shutil.rmtree(os.path.join(GOLDEN, name))
    held = HeldOut()
    entries = make_cases(held)
    manifest = {
        "torch": torch.__version__.split("+")[0],
        "seed": SEED,
        "dtype": "float32",
        "rtol": RTOL,
        "atol": ATOL,
        "cases": entries,
    }
    with open(os.path.join(GOLDEN, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    make_preprocess()
    total = 0
    for dirpath, _, names in os.walk(GOLDEN):
        total += sum(os.path.getsize(os.path.join(dirpath, n)) for n in names)
    print(f"tests/golden: {total} bytes")


if __name__ == "__main__":
    sys.exit(main())
