"""Train and export the small TorchScript models bundled in models/, and write
the sample images in examples/images/.

What it generates
-----------------
models/NAME.pt     TorchScript modules (eval mode), loadable with tch::CModule.
models/NAME.json   sidecar: {"input_size": [32, 32], "channels": C,
                   "mean": [...], "std": [...], "labels": [...]} (labels
                   omitted for the regressor). The model expects the
                   normalised tensor (x - mean) / std, shape N x C x 32 x 32,
                   float32, where x is the image in [0, 1].
models/metrics.json exact held-out metrics of every model.
models/README.md   a short table of the models and their held-out metrics.
examples/images/   sample images drawn from the held-out digits, in nested
                   folders KIND/DIGIT/ (gray, rgb); mostly 32x32 8-bit
                   grayscale PNGs, plus RGB PNGs, two non-square sizes, one
                   16-bit PNG and one JPEG.

Models (all trained on the 8x8 digits data set that ships with scikit-learn,
sklearn.datasets.load_digits, upscaled to 32x32 with bilinear interpolation):
  digits_cnn        softmax probabilities (N, 10)
  digits_binary     sigmoid (N, 1) = P(digit is 0)
  digits_regressor  linear (N, 1) = the digit's value, 0..9
  digits_multi      tuple (class logits (N, 10), regression (N, 1))
  digits_dense      per-pixel logits (N, 11, 32, 32): 0 = background,
                    1 + d = ink pixel of digit d (ink = intensity > 0.3)
  digits_rgb        3-channel logits (N, 10), digits drawn in a random colour
                    on a random, different background colour

Everything is deterministic (fixed seeds; 2 CPU threads). No downloads.

How to run (from the repository root; needs torch==2.11.0, numpy,
scikit-learn and pillow, e.g. in the venv that scripts/env.sh creates):

    $VENV/bin/pip install scikit-learn pillow
    $VENV/bin/python scripts/make_models.py

Then regenerate the test goldens with scripts/make_goldens.py.
"""

import hashlib
import json
import os
import struct
import sys
import time
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from typing import Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")
IMAGES = os.path.join(ROOT, "examples", "images")

SIZE = 32
INK_THRESHOLD = 0.3
SPLIT_SEED = 0
TRAIN_FRACTION = 0.8
HELDOUT_COLOUR_SEED = 1
TRAIN_COLOUR_SEED = 2
DIGIT_LABELS = [str(d) for d in range(10)]


# --------------------------------------------------------------------------
# Data (shared with scripts/make_goldens.py)
# --------------------------------------------------------------------------


def load_data():
    """Return dict with the whole digits set: x8 (N,1,8,8) in [0,1],
    x (N,1,32,32) in [0,1] (bilinear upscale), y (N,) int64 labels, and the
    sorted train / held-out sklearn indices (fixed, seeded 80/20 split)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x8 = torch.from_numpy(d.images.astype(np.float32) / np.float32(16.0)).unsqueeze(1)
    x = upscale(x8, (SIZE, SIZE))
    y = torch.from_numpy(d.target.astype(np.int64))
    n = x.shape[0]
    perm = np.random.RandomState(SPLIT_SEED).permutation(n)
    n_train = int(round(n * TRAIN_FRACTION))
    train = np.sort(perm[:n_train])
    heldout = np.sort(perm[n_train:])
    return {"x8": x8, "x": x, "y": y, "train": train, "heldout": heldout}


def upscale(x8, size):
    """(N,C,8,8) -> (N,C,H,W), bilinear, align_corners=False."""
    return F.interpolate(x8, size=tuple(size), mode="bilinear", align_corners=False)


def random_colours(n, seed):
    """n (foreground, background) RGB colour pairs in [0,1], clearly different
    (euclidean distance >= 0.5), float32 arrays of shape (n, 3)."""
    rng = np.random.RandomState(seed)
    fg = np.empty((n, 3), dtype=np.float32)
    bg = np.empty((n, 3), dtype=np.float32)
    for i in range(n):
        while True:
            f = rng.uniform(0.0, 1.0, 3)
            b = rng.uniform(0.0, 1.0, 3)
            if np.linalg.norm(f - b) >= 0.5:
                break
        fg[i] = f
        bg[i] = b
    return fg, bg


def colourise(a, fg, bg):
    """a: (N,1,H,W) intensity in [0,1]; fg, bg: (N,3) -> (N,3,H,W) in [0,1]:
    bg * (1 - a) + fg * a."""
    fg = torch.as_tensor(fg, dtype=torch.float32)[:, :, None, None]
    bg = torch.as_tensor(bg, dtype=torch.float32)[:, :, None, None]
    return bg * (1.0 - a) + fg * a


def heldout_colours(data):
    """The fixed colours of the held-out digits, indexed like data['heldout']."""
    return random_colours(len(data["heldout"]), HELDOUT_COLOUR_SEED)


def channel_stats(x):
    """Per-channel mean and (population) std over N, H, W, rounded to 4 decimals."""
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3), unbiased=False).tolist()
    return [round(v, 4) for v in mean], [round(v, 4) for v in std]


def normalise(x, mean, std):
    """(x - mean) / std with per-channel float32 mean and std, as the sidecar says."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def dense_target(x, y):
    """(N,1,H,W) intensity + (N,) labels -> (N,H,W) int64: 0 background,
    1 + digit where intensity > 0.3."""
    ink = x[:, 0] > INK_THRESHOLD
    return torch.where(ink, (y + 1)[:, None, None], torch.zeros_like(y)[:, None, None])


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


# The CAM convention: forward_features(x) returns the feature maps of the
# last ReLU of the trunk, (N, 32, 8, 8) (features[7], or features[10] in
# digits_rgb: the layer to hook in pytorch-grad-cam), and forward_head(a) the
# rest of forward, so that forward(x) == forward_head(forward_features(x)).
# (TorchScript needs the slice bounds as literals.) digits_dense has no such
# split (its output mixes three feature levels) and no CAM methods.
CAM_LAYER = {"digits_cnn": 7, "digits_binary": 7, "digits_regressor": 7, "digits_multi": 7, "digits_rgb": 10}


def trunk(in_ch, widths=(8, 16, 32)):
    """32x32 -> (N, widths[2] * 4 * 4) features."""
    c1, c2, c3 = widths
    return nn.Sequential(
        nn.Conv2d(in_ch, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )


def head(n_in, n_out, hidden=64):
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


class DigitsCNN(nn.Module):
    """10-class classifier; forward returns softmax probabilities (N, 10)."""

    def __init__(self):
        super().__init__()
        self.features = trunk(1)
        self.classifier = head(32 * 16, 10)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.features):
            if i < 8:
                x = layer(x)
        return x

    @torch.jit.export
    def forward_head(self, a: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.features):
            if i >= 8:
                a = layer(a)
        return torch.softmax(self.classifier(a), dim=1)


class DigitsBinary(nn.Module):
    """forward returns sigmoid (N, 1) = P(digit is 0)."""

    def __init__(self):
        super().__init__()
        self.features = trunk(1)
        self.classifier = head(32 * 16, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.features):
            if i < 8:
                x = layer(x)
        return x

    @torch.jit.export
    def forward_head(self, a: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.features):
            if i >= 8:
                a = layer(a)
        return torch.sigmoid(self.classifier(a))


class DigitsRegressor(nn.Module):
    """forward returns the digit's value (N, 1), linear output (the head's
    raw output is scaled to the 0..9 range: 4.5 + 3 * raw)."""

    def __init__(self):
        super().__init__()
        self.features = trunk(1)
        self.regressor = head(32 * 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4.5 + 3.0 * self.regressor(self.features(x))

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.features):
            if i < 8:
                x = layer(x)
        return x

    @torch.jit.export
    def forward_head(self, a: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.features):
            if i >= 8:
                a = layer(a)
        return 4.5 + 3.0 * self.regressor(a)


class DigitsMulti(nn.Module):
    """forward returns (class logits (N, 10), value regression (N, 1))."""

    def __init__(self):
        super().__init__()
        self.features = trunk(1)
        self.classifier = head(32 * 16, 10)
        self.regressor = head(32 * 16, 1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.classifier(f), 4.5 + 3.0 * self.regressor(f)

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.features):
            if i < 8:
                x = layer(x)
        return x

    @torch.jit.export
    def forward_head(self, a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        for i, layer in enumerate(self.features):
            if i >= 8:
                a = layer(a)
        f = a
        return self.classifier(f), 4.5 + 3.0 * self.regressor(f)


class DigitsDense(nn.Module):
    """Dense prediction: forward returns per-pixel logits (N, 11, H, W):
    class 0 = background, class 1 + d = ink pixel of digit d.

    A small encoder (32 -> 16 -> 8 -> 4) gives a global digit logit vector
    (N, 10); a local branch on the full-resolution and upsampled 16x16
    features gives per-pixel background and ink logits. Output channel 0 is
    the background logit, channel 1 + d the ink logit plus digit logit d."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Conv2d(1, 16, 3, padding=1)
        self.enc2 = nn.Conv2d(16, 32, 3, padding=1)
        self.enc3 = nn.Conv2d(32, 32, 3, padding=1)
        self.classifier = head(32 * 16, 10)
        self.local1 = nn.Conv2d(16 + 32, 16, 1)
        self.local2 = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        w = x.shape[3]
        f1 = F.relu(self.enc1(x))
        f2 = F.relu(self.enc2(F.max_pool2d(f1, 2)))
        f3 = F.relu(self.enc3(F.max_pool2d(f2, 2)))
        digit = self.classifier(torch.flatten(F.max_pool2d(f3, 2), 1))
        up = F.interpolate(f2, size=[h, w], mode="bilinear", align_corners=False)
        local = self.local2(F.relu(self.local1(torch.cat([f1, up], dim=1))))
        background = local[:, 0:1]
        ink = local[:, 1:2] + digit[:, :, None, None]
        return torch.cat([background, ink], dim=1)


class DigitsRGB(nn.Module):
    """3-channel 10-class classifier; forward returns logits (N, 10).

    Each image is first centred per channel (minus its own spatial mean),
    which removes most of the background colour; the trunk has batch norm
    (folded into an affine map in eval mode)."""

    def __init__(self):
        super().__init__()
        w = (16, 32, 32)
        self.features = nn.Sequential(
            nn.Conv2d(3, w[0], 3, padding=1), nn.BatchNorm2d(w[0]), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w[0], w[1], 3, padding=1), nn.BatchNorm2d(w[1]), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w[1], w[2], 3, padding=1), nn.BatchNorm2d(w[2]), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = head(w[2] * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(dim=(2, 3), keepdim=True)
        return self.classifier(self.features(x))

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(dim=(2, 3), keepdim=True)
        for i, layer in enumerate(self.features):
            if i < 11:
                x = layer(x)
        return x

    @torch.jit.export
    def forward_head(self, a: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.features):
            if i >= 11:
                a = layer(a)
        return self.classifier(a)


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def fit(model, n, batch_fn, loss_fn, epochs, lr, batch_size=64, seed=0):
    """Adam over shuffled mini-batches. batch_fn(idx, epoch) -> (inputs, target)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            inputs, target = batch_fn(idx, epoch)
            opt.zero_grad()
            loss = loss_fn(model, inputs, target)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        print(f"    epoch {epoch + 1}/{epochs}: loss {total / n:.4f}", flush=True)
    model.eval()
    return model


def export(model, name, example, sidecar):
    """torch.jit.script the eval-mode model, check it against eager, save
    models/NAME.pt and models/NAME.json."""
    model.eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        a = model(example)
        b = scripted(example)
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    for u, v in zip(a, b):
        assert torch.allclose(u, v, rtol=1e-5, atol=1e-6), name
    path = os.path.join(MODELS, name + ".pt")
    torch.jit.save(scripted, path)
    pin_serialization_id(path)
    reloaded = torch.jit.load(path)
    with torch.no_grad():
        c = reloaded(example)
    c = c if isinstance(c, tuple) else (c,)
    for u, v in zip(b, c):
        assert torch.equal(u, v), name
    with open(os.path.join(MODELS, name + ".json"), "w") as f:
        json.dump(sidecar, f, indent=2)
        f.write("\n")
    print(f"    wrote models/{name}.pt ({os.path.getsize(path)} bytes) and models/{name}.json")


def pin_serialization_id(path):
    """torch.jit.save writes a random 40-digit .data/serialization_id; replace
    it in place (same length, stored uncompressed) with digits derived from
    the rest of the archive and fix its CRC-32 (local header or data
    descriptor, and central directory), so that rerunning this script
    reproduces the .pt byte for byte."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = [i for i in z.infolist() if i.filename.endswith("/.data/serialization_id")]
        assert len(info) == 1, path
        info = info[0]
        old = z.read(info)
    assert info.compress_type == zipfile.ZIP_STORED and info.file_size == 40, info
    blob = bytearray(open(path, "rb").read())
    pos = info.header_offset
    assert blob[pos:pos + 4] == b"PK\x03\x04"
    nlen, xlen = struct.unpack_from("<HH", blob, pos + 26)
    data_at = pos + 30 + nlen + xlen
    assert bytes(blob[data_at:data_at + 40]) == old
    old_crc = zlib.crc32(old) & 0xFFFFFFFF
    assert old_crc == info.CRC

    blob[data_at:data_at + 40] = b"0" * 40
    digest = int.from_bytes(hashlib.sha256(bytes(blob)).digest(), "big")
    new = str(digest % 10 ** 40).rjust(40, "0").encode()
    blob[data_at:data_at + 40] = new
    crc = zlib.crc32(new) & 0xFFFFFFFF

    patched = 0
    if struct.unpack_from("<I", blob, pos + 14)[0] == old_crc:
        struct.pack_into("<I", blob, pos + 14, crc)
        patched += 1
    if info.flag_bits & 0x08:  # data descriptor after the data
        dd = data_at + 40
        if blob[dd:dd + 4] == b"PK\x07\x08":
            dd += 4
        assert struct.unpack_from("<I", blob, dd)[0] == old_crc
        struct.pack_into("<I", blob, dd, crc)
        patched += 1
    cpos = 0
    while True:  # central directory entry of the same file
        cpos = blob.find(b"PK\x01\x02", cpos)
        assert cpos >= 0, "central directory entry not found"
        cn, = struct.unpack_from("<H", blob, cpos + 28)
        if bytes(blob[cpos + 46:cpos + 46 + cn]).decode() == info.filename:
            break
        cpos += 4
    assert struct.unpack_from("<I", blob, cpos + 16)[0] == old_crc
    struct.pack_into("<I", blob, cpos + 16, crc)
    assert patched >= 1
    with open(path, "wb") as f:
        f.write(bytes(blob))
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None and z.read(info.filename) == new


@torch.no_grad()
def predict(model, x, batch_size=256):
    outs = []
    for i in range(0, x.shape[0], batch_size):
        o = model(x[i:i + batch_size])
        outs.append(o if isinstance(o, tuple) else (o,))
    return tuple(torch.cat([o[k] for o in outs]) for k in range(len(outs[0])))


def ce_loss(model, inputs, target):
    return F.cross_entropy(model.logits(inputs) if hasattr(model, "logits") else model(inputs), target)


def main():
    # TorchScript writes module constants in set order, which depends on the
    # string hash seed: pin it so the .pt files are byte-for-byte reproducible.
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    np.random.seed(0)
    os.makedirs(MODELS, exist_ok=True)

    data = load_data()
    x, y = data["x"], data["y"]
    tr, ho = torch.from_numpy(data["train"]), torch.from_numpy(data["heldout"])
    print(f"digits: {x.shape[0]} images, {len(tr)} train, {len(ho)} held out")

    mean1, std1 = channel_stats(x[tr])
    xn = normalise(x, mean1, std1)
    x_tr, y_tr, x_ho, y_ho = xn[tr], y[tr], xn[ho], y[ho]
    n_tr = len(tr)

    def gray_sidecar(labels):
        s = {"input_size": [SIZE, SIZE], "channels": 1, "mean": mean1, "std": std1}
        if labels is not None:
            s["labels"] = labels
        return s

    metrics = {}
    timings = {}

    # ---- digits_cnn -------------------------------------------------------
    name = "digits_cnn"
    print(f"{name}:")
    t0 = time.time()
    model = fit(DigitsCNN(), n_tr, lambda i, e: (x_tr[i], y_tr[i]), ce_loss, epochs=8, lr=3e-3, seed=10)
    (probs,) = predict(model, x_ho)
    acc = (probs.argmax(1) == y_ho).float().mean().item()
    print(f"    held-out accuracy {acc:.4f}")
    assert acc >= 0.95, acc
    metrics[name] = {"output": "softmax probabilities (N, 10)", "accuracy": acc}
    export(model, name, x_ho[:4], gray_sidecar(DIGIT_LABELS))
    timings[name] = time.time() - t0

    # ---- digits_binary ----------------------------------------------------
    name = "digits_binary"
    print(f"{name}:")
    t0 = time.time()
    yb_tr = (y_tr == 0).float()[:, None]
    model = fit(
        DigitsBinary(), n_tr, lambda i, e: (x_tr[i], yb_tr[i]),
        lambda m, a, t: F.binary_cross_entropy_with_logits(m.logits(a), t),
        epochs=5, lr=3e-3, seed=11,
    )
    (p,) = predict(model, x_ho)
    acc = ((p[:, 0] > 0.5) == (y_ho == 0)).float().mean().item()
    print(f"    held-out accuracy {acc:.4f}")
    metrics[name] = {"output": "sigmoid (N, 1) = P(digit is 0)", "accuracy": acc}
    export(model, name, x_ho[:4], gray_sidecar(["not 0", "0"]))
    timings[name] = time.time() - t0

    # ---- digits_regressor -------------------------------------------------
    name = "digits_regressor"
    print(f"{name}:")
    t0 = time.time()
    yr_tr = y_tr.float()[:, None]
    model = fit(
        DigitsRegressor(), n_tr, lambda i, e: (x_tr[i], yr_tr[i]),
        lambda m, a, t: F.smooth_l1_loss(m(a), t),
        epochs=30, lr=3e-3, seed=12,
    )
    (v,) = predict(model, x_ho)
    mae = (v[:, 0] - y_ho.float()).abs().mean().item()
    print(f"    held-out MAE {mae:.4f}")
    metrics[name] = {"output": "linear (N, 1) = digit value", "mae": mae}
    export(model, name, x_ho[:4], gray_sidecar(None))
    timings[name] = time.time() - t0

    # ---- digits_multi -----------------------------------------------------
    name = "digits_multi"
    print(f"{name}:")
    t0 = time.time()

    def multi_loss(m, a, t):
        logits, value = m(a)
        return F.cross_entropy(logits, t) + F.smooth_l1_loss(value[:, 0], t.float())

    model = fit(DigitsMulti(), n_tr, lambda i, e: (x_tr[i], y_tr[i]), multi_loss, epochs=20, lr=3e-3, seed=13)
    logits, v = predict(model, x_ho)
    acc = (logits.argmax(1) == y_ho).float().mean().item()
    mae = (v[:, 0] - y_ho.float()).abs().mean().item()
    print(f"    held-out accuracy {acc:.4f}, MAE {mae:.4f}")
    metrics[name] = {"output": "tuple (logits (N, 10), value (N, 1))", "accuracy": acc, "mae": mae}
    export(model, name, x_ho[:4], gray_sidecar(DIGIT_LABELS))
    timings[name] = time.time() - t0

    # ---- digits_dense -----------------------------------------------------
    name = "digits_dense"
    print(f"{name}:")
    t0 = time.time()
    seg = dense_target(x, y)
    seg_tr, seg_ho = seg[tr], seg[ho]
    model = fit(
        DigitsDense(), n_tr, lambda i, e: (x_tr[i], seg_tr[i]),
        lambda m, a, t: F.cross_entropy(m(a), t),
        epochs=8, lr=3e-3, seed=14,
    )
    (out,) = predict(model, x_ho)
    pred = out.argmax(1)
    pix_acc = (pred == seg_ho).float().mean().item()
    ink = seg_ho > 0
    ink_acc = (pred[ink] == seg_ho[ink]).float().mean().item()
    print(f"    held-out pixel accuracy {pix_acc:.4f}, ink-pixel accuracy {ink_acc:.4f}")
    metrics[name] = {
        "output": "per-pixel logits (N, 11, 32, 32)",
        "pixel_accuracy": pix_acc,
        "ink_pixel_accuracy": ink_acc,
    }
    export(model, name, x_ho[:4], gray_sidecar(["background"] + DIGIT_LABELS))
    timings[name] = time.time() - t0

    # ---- digits_rgb -------------------------------------------------------
    name = "digits_rgb"
    print(f"{name}:")
    t0 = time.time()
    # Training colours: a fresh seeded draw every epoch (epoch 0's draw also
    # gives the channel statistics); held-out colours are fixed.
    epochs = 10
    train_colours = [random_colours(n_tr, TRAIN_COLOUR_SEED + 100 * e) for e in range(epochs)]
    a_tr = x[tr]
    rgb0 = colourise(a_tr, *train_colours[0])
    mean3, std3 = channel_stats(rgb0)
    fg_ho, bg_ho = heldout_colours(data)
    rgb_ho = normalise(colourise(x[ho], fg_ho, bg_ho), mean3, std3)

    def rgb_batch(i, e):
        fg, bg = train_colours[e]
        return normalise(colourise(a_tr[i], fg[i.numpy()], bg[i.numpy()]), mean3, std3), y_tr[i]

    model = fit(DigitsRGB(), n_tr, rgb_batch, ce_loss, epochs=epochs, lr=3e-3, seed=15)
    (logits,) = predict(model, rgb_ho)
    acc = (logits.argmax(1) == y_ho).float().mean().item()
    print(f"    held-out accuracy {acc:.4f}")
    metrics[name] = {"output": "logits (N, 10)", "accuracy": acc}
    export(
        model, name, rgb_ho[:4],
        {"input_size": [SIZE, SIZE], "channels": 3, "mean": mean3, "std": std3, "labels": DIGIT_LABELS},
    )
    timings[name] = time.time() - t0

    for k, t in timings.items():
        print(f"{k}: {t:.1f} s")

    meta = {
        "torch": torch.__version__.split("+")[0],
        "split": {"seed": SPLIT_SEED, "train": int(len(tr)), "heldout": int(len(ho))},
        "models": metrics,
    }
    with open(os.path.join(MODELS, "metrics.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    write_readme(metrics, len(tr), len(ho))
    write_images(data)


def write_readme(metrics, n_tr, n_ho):
    def fmt(m):
        parts = []
        if "accuracy" in m:
            parts.append(f"accuracy {100 * m['accuracy']:.2f}%")
        if "mae" in m:
            parts.append(f"MAE {m['mae']:.3f}")
        if "pixel_accuracy" in m:
            parts.append(f"pixel accuracy {100 * m['pixel_accuracy']:.2f}%")
            parts.append(f"ink-pixel accuracy {100 * m['ink_pixel_accuracy']:.2f}%")
        return ", ".join(parts)

    inputs = {
        "digits_rgb": "N x 3 x 32 x 32",
    }
    lines = [
        "# Bundled models",
        "",
        "Small TorchScript models (`torch.jit.script`, eval mode, torch 2.11.0) trained",
        "on the 8x8 digits data set from scikit-learn (`sklearn.datasets.load_digits`),",
        "upscaled to 32x32 (bilinear). Generated by `scripts/make_models.py`;",
        f"metrics are on a fixed held-out split ({n_ho} of {n_tr + n_ho} images, seed 0),",
        "exact values in `metrics.json`.",
        "",
        "Each `NAME.pt` has a sidecar `NAME.json` with `input_size`, `channels`,",
        "per-channel `mean` and `std`, and `labels`. The model takes",
        "`(x - mean) / std` where `x` is the image in [0, 1], float32.",
        "",
        "| model | output | input | held-out metric |",
        "|---|---|---|---|",
    ]
    for name, m in metrics.items():
        lines.append(f"| `{name}` | {m['output']} | {inputs.get(name, 'N x 1 x 32 x 32')} | {fmt(m)} |")
    lines += [
        "",
        "Notes:",
        "",
        "- `digits_binary` labels are `[\"not 0\", \"0\"]`; `digits_regressor` has no labels;",
        "  `digits_multi` labels describe its first output (the class logits).",
        "- `digits_dense`: class 0 = background, class 1 + d = ink pixel (upscaled",
        "  intensity > 0.3) of digit d; labels `[\"background\", \"0\", ..., \"9\"]`.",
        "- `digits_rgb`: each digit drawn in a random colour on a different random",
        "  background colour (`x = bg * (1 - a) + fg * a`); the model centres each",
        "  image per channel before its batch-normalised convolutions.",
        "- Class activation maps: every model but `digits_dense` also has the methods",
        "  `forward_features(x)` (the last ReLU of the trunk, N x 32 x 8 x 8) and",
        "  `forward_head(a)`, with `forward(x) == forward_head(forward_features(x))`",
        "  (`digits_dense` mixes three feature levels, so no single map feeds it).",
        "- Sample images from the held-out split are in `examples/images/KIND/DIGIT/`.",
        "",
    ]
    with open(os.path.join(MODELS, "README.md"), "w") as f:
        f.write("\n".join(lines))


# --------------------------------------------------------------------------
# Sample images
# --------------------------------------------------------------------------


def to_u8(a):
    """float [0,1] array -> uint8 via round(value * 255)."""
    return np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)


def write_images(data):
    from PIL import Image

    x8, x, y = data["x8"], data["x"], data["y"]
    heldout = data["heldout"]
    fg_ho, bg_ho = heldout_colours(data)
    pos = {int(idx): k for k, idx in enumerate(heldout)}

    # Held-out indices per digit, in sklearn order.
    by_digit = {d: [int(i) for i in heldout if int(y[i]) == d] for d in range(10)}
    used = set()

    def take(d):
        for i in by_digit[d]:
            if i not in used:
                used.add(i)
                return i
        raise RuntimeError(f"no held-out digit {d} left")

    files = []

    def save(img, kind, d, stem, ext, **kw):
        rel = f"{kind}/{d}/{stem}.{ext}"
        path = os.path.join(IMAGES, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img.save(path, **kw)
        files.append(rel)

    if os.path.isdir(IMAGES):
        for dirpath, _, names in os.walk(IMAGES):
            for n in names:
                os.remove(os.path.join(dirpath, n))

    # 13 gray 32x32 8-bit PNGs: one of each digit, a second 0, 4 and 8.
    for d in list(range(10)) + [0, 4, 8]:
        i = take(d)
        save(Image.fromarray(to_u8(x[i, 0].numpy()), mode="L"), "gray", d, f"heldout_{i:04d}", "png")

    # 6 RGB 32x32 PNGs, coloured as for digits_rgb.
    for d in [1, 2, 3, 5, 7, 9]:
        i = take(d)
        k = pos[i]
        rgb = colourise(x[i:i + 1], fg_ho[k:k + 1], bg_ho[k:k + 1])[0].permute(1, 2, 0).numpy()
        save(Image.fromarray(to_u8(rgb), mode="RGB"), "rgb", d, f"heldout_{i:04d}", "png")

    # Non-square sizes (upscaled from the 8x8 straight to W x H).
    for d, (w, h) in [(6, (40, 48)), (2, (24, 28))]:
        i = take(d)
        a = upscale(x8[i:i + 1], (h, w))[0, 0].numpy()
        save(Image.fromarray(to_u8(a), mode="L"), "gray", d, f"heldout_{i:04d}_w{w}h{h}", "png")
    d, (w, h) = 4, (48, 40)
    i = take(d)
    k = pos[i]
    a = upscale(x8[i:i + 1], (h, w))
    rgb = colourise(a, fg_ho[k:k + 1], bg_ho[k:k + 1])[0].permute(1, 2, 0).numpy()
    save(Image.fromarray(to_u8(rgb), mode="RGB"), "rgb", d, f"heldout_{i:04d}_w{w}h{h}", "png")

    # One 16-bit grayscale PNG, 32x32 (round(value * 65535)).
    d = 3
    i = take(d)
    a16 = np.clip(np.round(x[i, 0].numpy().astype(np.float64) * 65535.0), 0, 65535).astype(np.uint16)
    save(Image.fromarray(a16), "gray", d, f"heldout_{i:04d}_16bit", "png")

    # One grayscale JPEG, 64x64: the 8x8 digit upscaled by pixel repetition, so
    # every 8x8 JPEG block is constant; at quality 100 such blocks decode
    # exactly in any baseline decoder (DC only, quantiser 1).
    d = 5
    i = take(d)
    a = x8[i, 0].numpy().repeat(8, axis=0).repeat(8, axis=1)
    u8 = to_u8(a)
    jpg = Image.fromarray(u8, mode="L")
    save(jpg, "gray", d, f"heldout_{i:04d}_w64h64", "jpg", quality=100, subsampling=0)
    back = np.array(Image.open(os.path.join(IMAGES, files[-1])))
    assert np.array_equal(back, u8), "JPEG round trip not exact"

    total = sum(os.path.getsize(os.path.join(IMAGES, f)) for f in files)
    print(f"wrote {len(files)} images to examples/images ({total} bytes)")
    for f in sorted(files):
        print("    " + f)


if __name__ == "__main__":
    sys.exit(main())
