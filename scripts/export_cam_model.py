"""Export a PyTorch classifier as a TorchScript model that tch-vis can explain
with class activation maps (Grad-CAM, Grad-CAM++, Layer-CAM, Score-CAM).

What it generates
-----------------
OUT.pt    a TorchScript module (eval mode) with three methods:
            forward(x)          the model, unchanged
            forward_features(x) the feature maps A of the target layer, (N, K, h, w)
            forward_head(a)     the rest of the model, from A to the outputs
          such that forward(x) == forward_head(forward_features(x)).
OUT.json  the sidecar tch-vis reads: input_size, channels, mean, std (and
          resize / crop / interpolation / antialias for torchvision models,
          labels when given).

--freeze writes the frozen form (torch.jit.freeze, the three methods kept):
batch norms folded into the convolutions, weights as constants in
channels-last order, the order oneDNN's CPU convolutions run fastest in
(tch-vis hands it contiguous batches unless `--channels-last` is given;
oneDNN reorders them). Its forward pass is 10-20% faster there; its outputs are checked to
be within 1e-4 of their size of the unfrozen model's (resnet18: 4e-7). Its
weights stay float32: tch-vis refuses it in fp16/bf16. Not for the digits
re-export, whose goldens need the unfrozen weights bit for bit.

--layer NODE writes the second form instead, for any layer of a torchvision
model, also one the outputs reach by other paths too (inside a residual
block), which no forward_features/forward_head split can express:
OUT.pt    forward(x) returns {"features": A, "output": the model's output},
          A the output of graph node NODE (a name from torchvision's
          get_graph_node_names: "layer4.1.conv2", "features.denseblock3",
          "layer3.0.add"); torchvision's create_feature_extractor, scripted.
          Checked: A equals the node's output computed alone (no later
          in-place op writes into it) and takes a gradient from the output.
tch-vis runs such a model with a graph from the input and backpropagates
from the scores to A only. dict_form(model, NODE) and export_dict(...) do the
same for an eager model of your own (from Python, importing this file).

Every methods-form export is checked before it is written: forward equals
forward_head(forward_features(x)) on a random input, forward_head leaves its
argument untouched and accepts a leaf that requires grad (no in-place op on
A), and the reloaded file gives the same values.

Sources
-------
torchvision NAME    a torchvision classifier (resnet18, densenet121,
                    mobilenet_v3_small, ...), random weights unless --weights
                    FILE (a state_dict saved with torch.save) is given; no
                    downloads. The target layer is the one pytorch-grad-cam
                    recommends for the family:
                      resnet*, resnext*, wide_resnet*  layer4[-1]
                      densenet*        features (its head starts with an
                                       in-place ReLU; forward_head uses an
                                       out-of-place one)
                      mobilenet_v2/v3  features[-1]
                      vgg*             features[-1]
                      efficientnet*    features[-1]
                      convnext*        features[-1]
                      regnet*          trunk_output
                    The architecture is torchvision's; --num-classes N for
                    another class count. Tried with random weights: resnet18,
                    densenet121, mobilenet_v3_small, mobilenet_v2,
                    efficientnet_b0, convnext_tiny, regnet_y_400mf.
torchscript IN.pt   an existing TorchScript classifier whose forward is
                    head(features(x)) for known submodules: --features P ...
                    and --head P ..., each a dotted submodule path
                    ("layer4", "features.7"), a slice of a Sequential
                    ("features[:8]"), or one of the functions relu, flatten,
                    avgpool (adaptive average pool to 1x1), softmax, sigmoid.
                    They run in the order given. forward stays the original
                    forward. --input-size H W sets the check input.
digits              re-export the bundled models/digits_*.pt with the CAM
                    methods of scripts/make_models.py (the last ReLU of the
                    trunk, (N, 32, 8, 8)), keeping their weights and forward:
                    outputs are checked to be bit-identical. digits_dense is
                    left as it is (its output mixes three feature levels, so
                    no single feature map feeds all of it).

Examples (from the repository root, in the golden venv of
scripts/golden_env.sh, which has torchvision):

    python scripts/export_cam_model.py torchvision resnet18 --out /tmp/resnet18_cam.pt
    python scripts/export_cam_model.py torchvision resnet18 --freeze --out /tmp/resnet18_frozen.pt
    python scripts/export_cam_model.py torchvision resnet50 --weights resnet50.pth --out r50.pt
    python scripts/export_cam_model.py torchvision resnet18 --layer layer4.1.conv2 --out /tmp/r18_inner.pt
    python scripts/export_cam_model.py torchscript model.pt --features backbone \\
        --head avgpool flatten fc --input-size 224 224 --out model_cam.pt
    python scripts/export_cam_model.py digits
"""

import argparse
import json
import os
import sys
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class Relu(nn.Module):
    """Out-of-place ReLU (an in-place one would modify the feature maps)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)


class AvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1)


class Softmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=1)


class Sigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)


FUNCTIONS = {"relu": Relu, "flatten": Flatten, "avgpool": AvgPool, "softmax": Softmax, "sigmoid": Sigmoid}


class CamSplit(nn.Module):
    """forward = head(features(x)), with both halves exported."""

    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    @torch.jit.export
    def forward_head(self, a: torch.Tensor) -> torch.Tensor:
        return self.head(a)


class ScriptedSplit(nn.Module):
    """Keeps a TorchScript module's own forward and adds the two halves."""

    def __init__(self, model: nn.Module, features: nn.Module, head: nn.Module):
        super().__init__()
        self.model = model
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    @torch.jit.export
    def forward_head(self, a: torch.Tensor) -> torch.Tensor:
        return self.head(a)


# --------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------


def torchvision_split(name, model):
    """(features, head, target layer description) for a torchvision classifier."""
    seq = nn.Sequential
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        m = model
        features = seq(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
        return features, seq(m.avgpool, Flatten(), m.fc), "layer4[-1]"
    if name.startswith("densenet"):
        # torchvision: relu(features(x), inplace=True) -> pool -> classifier.
        # The in-place ReLU would write into A (a leaf that requires grad):
        # the head uses an out-of-place one, same values.
        return model.features, seq(Relu(), AvgPool(), Flatten(), model.classifier), "features"
    if name.startswith("mobilenet_v2"):
        return model.features, seq(AvgPool(), Flatten(), model.classifier), "features[-1]"
    if name.startswith("mobilenet_v3") or name.startswith("efficientnet") or name.startswith("vgg"):
        return model.features, seq(model.avgpool, Flatten(), model.classifier), "features[-1]"
    if name.startswith("convnext"):
        return model.features, seq(model.avgpool, model.classifier), "features[-1]"
    if name.startswith("regnet"):
        return seq(model.stem, model.trunk_output), seq(model.avgpool, Flatten(), model.fc), "trunk_output"
    raise SystemExit(
        f"export_cam_model: no known CAM split for torchvision model {name!r}; "
        "use the torchscript source with --features/--head"
    )


def torchvision_model(name, weights=None, num_classes=None, seed=0):
    """The eval-mode eager torchvision model (random weights, seeded, unless
    a state_dict file is given)."""
    import torchvision

    torch.manual_seed(seed)
    kwargs = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = torchvision.models.get_model(name, **kwargs)
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.eval()


def torchvision_sidecar(labels=None):
    s = {
        "input_size": [224, 224],
        "channels": 3,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "resize": 256,
        "crop": [224, 224],
        "interpolation": "bilinear",
        "antialias": True,
    }
    if labels:
        s["labels"] = labels
    return s


def export_torchvision(name, out, weights=None, num_classes=None, seed=0, labels=None, frozen=False, layer=None):
    model = torchvision_model(name, weights, num_classes, seed)
    if layer is not None:
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
        export_dict(model, layer, out, x, torchvision_sidecar(labels), frozen=frozen)
        print(f"{name}: target layer {layer} (dict form); wrote {out} ({os.path.getsize(out)} bytes)")
        return model
    features, head, target = torchvision_split(name, model)
    split = CamSplit(features, head).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = model(x)
    save_checked(split, out, x, torchvision_sidecar(labels), eager_output=want, frozen=frozen)
    print(f"{name}: target layer {target}; wrote {out} ({os.path.getsize(out)} bytes)")
    return model


# --------------------------------------------------------------------------
# The dict form: any layer, also inside a residual block
# --------------------------------------------------------------------------


def dict_form(model, layer):
    """torchvision's feature extractor of an eager `model`: forward(x)
    returns {"features": the output of graph node `layer`, "output": the
    model's output}. `layer` is a node name of
    torchvision.models.feature_extraction.get_graph_node_names: a module
    path ("layer4.1.conv2") or a function node ("layer4.1.add")."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    nodes = get_graph_node_names(model.eval())[1]
    if layer not in nodes:
        inside = [n for n in nodes if n.startswith(layer + ".")][-6:]
        near = inside or [n for n in nodes if n.startswith(layer.rsplit(".", 1)[0] + ".")][:12] or nodes[-12:]
        raise SystemExit(f"export_cam_model: no graph node {layer!r}; nodes such as {near}")
    if layer == nodes[-1]:
        raise SystemExit(f"export_cam_model: {layer!r} is the model's output, not a feature map")
    return create_feature_extractor(model, return_nodes={layer: "features", nodes[-1]: "output"}).eval()


def check_dict(scripted, alone, x, name, frozen=False):
    """The dict form's checks: "features" is (N, K, h, w), equals the node's
    output computed alone (so nothing after it writes into it in place),
    and takes a gradient from the output."""
    with torch.no_grad():
        d = scripted(x)
        want = alone(x)["features"]
    if list(d.keys()) != ["features", "output"]:
        raise SystemExit(f"{name}: forward returns the keys {list(d.keys())}, expected features, output")
    a = d["features"]
    if a.dim() != 4:
        raise SystemExit(f"{name}: the features have shape {tuple(a.shape)}, expected (N, K, h, w)")
    if frozen and not torch.allclose(a, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()):
        raise SystemExit(
            f"{name}: freezing changed the features by more than float rounding: "
            "export without --freeze, or pick another node"
        )
    if not frozen and not torch.equal(a, want):
        raise SystemExit(
            f"{name}: an operation after the layer modifies its output in place "
            "(an in-place ReLU?), so the dict would hold other values: pick another node"
        )
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        g = scripted(xg)
        (grad,) = torch.autograd.grad(g["output"].sum(), g["features"], allow_unused=True)
    if grad is None:
        raise SystemExit(f"{name}: no gradient reaches the features from the output")
    return flat(d["output"]), a


def export_dict(model, layer, out, x, sidecar, frozen=False):
    """Writes the dict form of an eager `model` at node `layer` (checked)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    extractor = dict_form(model, layer)
    alone = create_feature_extractor(model, return_nodes={layer: "features"}).eval()
    scripted = torch.jit.script(extractor)
    y, a = check_dict(scripted, alone, x, out)
    with torch.no_grad():
        want = flat(model(x))
    for u, v in zip(want, y):
        assert torch.allclose(u, v, rtol=1e-4, atol=1e-5), "scripted differs from eager"
    outputs = lambda m, v: flat(m(v)["output"])  # noqa: E731
    if frozen:
        scripted = freeze(scripted, x, y, out, preserved=(), outputs=outputs)
        y, a = check_dict(scripted, alone, x, out, frozen=True)
    write(scripted, out, x, y, sidecar, outputs)
    print(f"    dict form: features {tuple(a.shape)} at {layer}, output {tuple(y[0].shape)}")


# --------------------------------------------------------------------------
# TorchScript with a known split
# --------------------------------------------------------------------------


def resolve(model, path):
    """A submodule by dotted path, a Sequential slice 'a.b[i:j]', or a function name."""
    if path in FUNCTIONS:
        return FUNCTIONS[path]()
    base, _, rest = path.partition("[")
    m = model
    for part in base.split("."):
        if not part:
            continue
        if not hasattr(m, part):
            raise SystemExit(f"export_cam_model: no submodule {part!r} in {path!r}")
        m = getattr(m, part)
    if rest:
        spec = rest.rstrip("]")
        lo, _, hi = spec.partition(":")
        children = list(m.children())
        if ":" in spec:
            children = children[int(lo) if lo else None:int(hi) if hi else None]
        else:
            children = [children[int(spec)]]
        return nn.Sequential(*children)
    return m


def export_torchscript(src, out, features, head, input_size, channels, sidecar, frozen=False):
    model = torch.jit.load(src, map_location="cpu").eval()
    f = nn.Sequential(*[resolve(model, p) for p in features])
    h = nn.Sequential(*[resolve(model, p) for p in head])
    split = ScriptedSplit(model, f, h).eval()
    x = torch.randn(2, channels, *input_size, generator=torch.Generator().manual_seed(0))
    save_checked(split, out, x, sidecar, frozen=frozen)
    print(f"wrote {out} ({os.path.getsize(out)} bytes)")


# --------------------------------------------------------------------------
# Checks and saving
# --------------------------------------------------------------------------


def flat(o):
    if isinstance(o, (tuple, list)):
        return [t for v in o for t in flat(v)]
    if isinstance(o, dict):
        return [t for v in o.values() for t in flat(v)]
    return [o]


def check_split(scripted, x, name):
    """forward == forward_head(forward_features) exactly; the head neither
    writes into A nor fails on a leaf that requires grad."""
    with torch.no_grad():
        y = flat(scripted(x))
        a = scripted.forward_features(x)
        a0 = a.clone()
        z = flat(scripted.forward_head(a))
    if a.dim() != 4:
        raise SystemExit(f"{name}: forward_features gives shape {tuple(a.shape)}, expected (N, K, h, w)")
    if not torch.equal(a, a0):
        raise SystemExit(f"{name}: forward_head modifies its argument in place")
    for u, v in zip(y, z):
        if not torch.equal(u, v):
            raise SystemExit(
                f"{name}: forward differs from forward_head(forward_features) "
                f"(max |diff| {(u - v).abs().max().item():.3g}); the split is wrong"
            )
    leaf = a.detach().requires_grad_(True)
    with torch.enable_grad():
        out = flat(scripted.forward_head(leaf))
        sum(o.sum() for o in out).backward()
    if leaf.grad is None:
        raise SystemExit(f"{name}: no gradient reaches the feature maps")
    return y, a


def freeze(scripted, x, before, name, preserved=("forward_features", "forward_head"), outputs=None):
    """The frozen form of a checked export whose outputs on `x` are `before`
    (`outputs(module, x)` reads them; default: flat(module(x))): batch norms
    folded into the convolutions, weights as constants in channels-last
    order (oneDNN's fastest on a CPU), the methods
    `preserved` kept."""
    outputs = outputs or (lambda m, v: flat(m(v)))
    with torch.no_grad():
        for p in scripted.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    try:
        frozen = torch.jit.freeze(scripted, preserved_attrs=list(preserved))
    except Exception as e:  # noqa: BLE001 - any failure of the pass
        raise SystemExit(f"{name}: torch.jit.freeze failed ({e}); export without --freeze")
    with torch.no_grad():
        after = outputs(frozen, x)
    worst = 0.0
    for u, v in zip(before, after):
        scale = max(u.abs().max().item(), 1e-30)
        worst = max(worst, (u - v).abs().max().item() / scale)
    if worst > 1e-4:
        raise SystemExit(f"{name}: the frozen model's outputs differ by {worst:.3g} of their size")
    print(f"    frozen: outputs within {worst:.2g} of their size of the unfrozen model's")
    return frozen


def save_checked(module, out, x, sidecar, eager_output=None, frozen=False):
    module.eval()
    scripted = torch.jit.script(module)
    y, a = check_split(scripted, x, out)
    if eager_output is not None:
        for u, v in zip(flat(eager_output), y):
            assert torch.allclose(u, v, rtol=1e-4, atol=1e-5), "scripted differs from eager"
    if frozen:
        scripted = freeze(scripted, x, y, out)
        y, a = check_split(scripted, x, out)
    write(scripted, out, x, y, sidecar)
    print(f"    features {tuple(a.shape)}; forward == forward_head(forward_features): exact")


def write(scripted, out, x, y, sidecar, outputs=None):
    """Saves a checked export, checks that the file gives its outputs `y`
    on `x` (`outputs(module, x)` reads them; default: flat(module(x))),
    and writes the sidecar beside it."""
    outputs = outputs or (lambda m, v: flat(m(v)))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.jit.save(scripted, out)
    reloaded = torch.jit.load(out)
    with torch.no_grad():
        for u, v in zip(y, outputs(reloaded, x)):
            assert torch.equal(u, v), "reloaded model differs"
    if sidecar is not None:
        with open(os.path.splitext(out)[0] + ".json", "w") as fh:
            json.dump(sidecar, fh, indent=2)
            fh.write("\n")


# --------------------------------------------------------------------------
# The bundled digits models
# --------------------------------------------------------------------------


DIGITS = ["digits_cnn", "digits_binary", "digits_regressor", "digits_multi", "digits_rgb"]


def export_digits():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_models as mm

    classes = {
        "digits_cnn": mm.DigitsCNN,
        "digits_binary": mm.DigitsBinary,
        "digits_regressor": mm.DigitsRegressor,
        "digits_multi": mm.DigitsMulti,
        "digits_rgb": mm.DigitsRGB,
    }
    data = mm.load_data()
    x = data["x"][torch.from_numpy(data["heldout"])]
    for name in DIGITS:
        path = os.path.join(mm.MODELS, name + ".pt")
        old = torch.jit.load(path).eval()
        model = classes[name]()
        model.load_state_dict(old.state_dict())
        model.eval()
        with open(os.path.join(mm.MODELS, name + ".json")) as fh:
            sidecar = json.load(fh)
        inp = x.repeat(1, 3, 1, 1) if sidecar["channels"] == 3 else x
        inp = mm.normalise(inp, sidecar["mean"], sidecar["std"])
        with torch.no_grad():
            before = flat(old(inp))
        mm.export(model, name, inp[:4], sidecar)
        new = torch.jit.load(path).eval()
        with torch.no_grad():
            after = flat(new(inp))
        for u, v in zip(before, after):
            assert torch.equal(u, v), f"{name}: forward changed"
        for (k, p), (k2, p2) in zip(old.state_dict().items(), new.state_dict().items()):
            assert k == k2 and torch.equal(p, p2), f"{name}: weight {k} changed"
        check_split(new, inp, name)
        print(f"    {name}: weights and forward bit-identical on {len(inp)} held-out digits")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="source", required=True)
    tv = sub.add_parser("torchvision", help="a torchvision classifier by name")
    tv.add_argument("name")
    tv.add_argument("--out", required=True)
    tv.add_argument("--weights", help="a state_dict file (torch.save); default: random weights")
    tv.add_argument("--num-classes", type=int)
    tv.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tv.add_argument("--labels", help="a text file with one class label a line")
    tv.add_argument(
        "--layer",
        help="write the dict form with this graph node's output as the feature maps "
        "(any module or operation, e.g. layer4.1.conv2 inside a residual block); "
        "default: the methods form at the family's recommended layer",
    )
    ts = sub.add_parser("torchscript", help="a TorchScript file with a known split")
    ts.add_argument("model")
    ts.add_argument("--out", required=True)
    ts.add_argument("--features", nargs="+", required=True)
    ts.add_argument("--head", nargs="+", required=True)
    ts.add_argument("--input-size", nargs=2, type=int, default=[224, 224])
    ts.add_argument("--channels", type=int, default=3)
    ts.add_argument("--sidecar", help="a sidecar JSON to copy beside the output (default: the input's)")
    for sp in (tv, ts):
        sp.add_argument(
            "--freeze",
            action="store_true",
            help="write the frozen form (batch norms folded, channels-last constant weights): "
            "a faster forward pass on CPUs, float32 only",
        )
    sub.add_parser("digits", help="re-export the bundled digits models with the CAM methods")
    a = p.parse_args(argv)

    torch.set_num_threads(2)
    if a.source == "torchvision":
        labels = None
        if a.labels:
            with open(a.labels) as fh:
                labels = [line.rstrip("\n") for line in fh if line.strip()]
        export_torchvision(a.name, a.out, a.weights, a.num_classes, a.seed, labels, a.freeze, a.layer)
    elif a.source == "torchscript":
        side = a.sidecar or os.path.splitext(a.model)[0] + ".json"
        sidecar = None
        if os.path.exists(side):
            with open(side) as fh:
                sidecar = json.load(fh)
        export_torchscript(a.model, a.out, a.features, a.head, a.input_size, a.channels, sidecar, a.freeze)
    else:
        if os.environ.get("PYTHONHASHSEED") != "0":
            # As scripts/make_models.py: reproducible archives.
            env = dict(os.environ, PYTHONHASHSEED="0")
            os.execve(sys.executable, [sys.executable] + sys.argv, env)
        export_digits()


if __name__ == "__main__":
    main()
