"""Write the class-activation-map goldens that tests/it/cam.rs compares
against: maps from the real pytorch-grad-cam 1.5.7 and raw Grad-CAM maps
from captum's LayerGradCam, on eager PyTorch models hooked at the layer
whose output is the TorchScript model's forward_features.

What it generates
-----------------
tests/golden/cam/manifest.json     the cases (schema below)
tests/golden/cam/<model>/input.npy the model input, float32 (N, C, H, W)
tests/golden/cam/<model>/<method>_<target>.npy
                                   pytorch-grad-cam's map, float32 (N, H, W)
tests/golden/cam/<model>/gradcam_<target>_raw.npy
                                   captum LayerGradCam(relu_attributions=True),
                                   float32 (N, h, w)
tests/golden/cam/<model>/score_<target>.npy
                                   the score of the clean input, float32 [N]
tests/golden/cam/resnet_narrow.pt/.json
                                   a random-weight ResNet-18-shaped torchvision
                                   ResNet (BasicBlock, [2, 2, 2, 2]) at 1/8 of
                                   resnet18's widths, 10 classes (~0.7 MB),
                                   exported by scripts/export_cam_model.py
tests/golden/cam/resnet_narrow_inner.pt/.json
                                   the same model in the dict form
                                   (export_cam_model.export_dict)
bench-data/resnet18_cam.pt/.json   torchvision resnet18, random weights (seed
                                   0, the weights of make_bench_data.py's),
                                   exported by scripts/export_cam_model.py;
                                   git-ignored (45 MB): its test prints
                                   "skipped: ..." when the file is absent.

Models and target layers (the module whose output is forward_features):
  digits_cnn     models/digits_cnn.pt, eager DigitsCNN, features[7]
  digits_rgb     models/digits_rgb.pt, eager DigitsRGB, features[10]
  resnet_narrow  layer4[-1], input 2 x 3 x 96 x 128 (non-square, features 3 x 4)
  resnet_narrow_inner
                 the same weights in the dict form (forward returns
                 {"features", "output"}), layer4[1].conv2: inside the last
                 residual block, so the output also depends on the input
                 by the skip connection
  resnet18       layer4[-1], input 1 x 3 x 128 x 160 (non-square, features 4 x 5)
Targets: "categorical" = ClassifierOutputTarget(I) for every image,
"predicted" = targets None (pytorch-grad-cam's argmax of the output).
Methods: GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM (batch_size 16).

manifest.json:
  {"torch", "grad_cam", "captum", "atol",
   "models": [{"name", "model", "optional", "input", "layer"}],
   "cases": [{"model": name, "method": "gradcam" | "gradcam++" | "layercam"
              | "scorecam", "target": {"kind": "categorical", "index": I}
              | {"kind": "predicted"}, "classes": [...], "map": file,
              "raw": file or null, "score": file}]}
Files are relative to tests/golden/cam/, models to the repository root.

How to run (from the repository root):

    . scripts/golden_env.sh && tch_vis_golden_setup
    "$TCH_VIS_GOLDEN_VENV/bin/python" scripts/make_cam_goldens.py
"""

import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "golden", "cam")
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import export_cam_model as ecm  # noqa: E402
import make_models as mm  # noqa: E402

ATOL = 1e-5
METHODS = ["gradcam", "gradcam++", "layercam", "scorecam"]


def narrow_resnet18(width=8, num_classes=10):
    """torchvision's ResNet with BasicBlock and resnet18's depth [2, 2, 2, 2],
    at widths (w, 2w, 4w, 8w) instead of (64, 128, 256, 512)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.layer1 = model._make_layer(BasicBlock, width, 2)
    model.layer2 = model._make_layer(BasicBlock, 2 * width, 2, stride=2)
    model.layer3 = model._make_layer(BasicBlock, 4 * width, 2, stride=2)
    model.layer4 = model._make_layer(BasicBlock, 8 * width, 2, stride=2)
    model.fc = nn.Linear(8 * width, num_classes)
    for m in model.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            # Random eval statistics, so that batch norm is not the identity.
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def smooth_noise(n, h, w, seed):
    """Smooth, seeded, image-like inputs (N, 3, h, w)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, h // 8, w // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def digits_inputs():
    data = mm.load_data()
    ho = torch.from_numpy(data["heldout"][:3])
    gray = mm.normalise(data["x"][ho], [0.3054], [0.3234])
    fg, bg = mm.heldout_colours(data)
    rgb_side = json.load(open(os.path.join(mm.MODELS, "digits_rgb.json")))
    rgb = mm.normalise(mm.colourise(data["x"][ho], fg[:3], bg[:3]), rgb_side["mean"], rgb_side["std"])
    side = json.load(open(os.path.join(mm.MODELS, "digits_cnn.json")))
    assert side["mean"] == [0.3054] and side["std"] == [0.3234]
    return gray, rgb


def load_digits(cls, name):
    model = cls()
    model.load_state_dict(torch.jit.load(os.path.join(mm.MODELS, name + ".pt")).state_dict())
    return model.eval()


def run_case(model, layer, x, method, target_index):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM, "scorecam": ScoreCAM}[method]
    targets = None if target_index is None else [ClassifierOutputTarget(target_index)] * x.shape[0]
    with cls(model=model, target_layers=[layer]) as cam:
        if method == "scorecam":
            cam.batch_size = 16
        out = cam(input_tensor=x.clone(), targets=targets)
    return np.ascontiguousarray(out, dtype=np.float32)


def captum_raw(model, layer, x, classes):
    from captum.attr import LayerGradCam

    attr = LayerGradCam(model, layer).attribute(
        x.clone(), target=torch.tensor(classes), relu_attributions=True
    )
    return attr[:, 0].detach().numpy().astype(np.float32)


def save(rel, array):
    path = os.path.join(OUT, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, np.ascontiguousarray(array, dtype=np.float32))
    return rel


def main():
    import captum
    import pytorch_grad_cam  # noqa: F401
    from importlib.metadata import version

    torch.set_num_threads(2)
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    gray, rgb = digits_inputs()

    # The narrow resnet: committed; resnet18: git-ignored, under bench-data/.
    torch.manual_seed(0)
    narrow = narrow_resnet18()
    features, head, _ = ecm.torchvision_split("resnet", narrow)
    x_narrow = smooth_noise(2, 96, 128, seed=1)
    with torch.no_grad():
        want = narrow(x_narrow)
    narrow_side = dict(ecm.torchvision_sidecar(), input_size=[96, 128], crop=[96, 128], resize=[96, 128])
    ecm.save_checked(ecm.CamSplit(features, head), os.path.join(OUT, "resnet_narrow.pt"), x_narrow, narrow_side, want)

    # The dict form of the same narrow resnet, at a layer inside its last
    # residual block (conv2 of layer4[1], before its batch norm and the
    # skip connection's sum): a target no forward_features/forward_head
    # split can express.
    ecm.export_dict(narrow, "layer4.1.conv2", os.path.join(OUT, "resnet_narrow_inner.pt"), x_narrow, narrow_side)

    r18_path = os.path.join(ROOT, "bench-data", "resnet18_cam.pt")
    r18 = ecm.export_torchvision("resnet18", r18_path, seed=0)
    x_r18 = smooth_noise(1, 128, 160, seed=2)

    models = [
        ("digits_cnn", "models/digits_cnn.pt", False, load_digits(mm.DigitsCNN, "digits_cnn"), "features[7]", gray, 3),
        ("digits_rgb", "models/digits_rgb.pt", False, load_digits(mm.DigitsRGB, "digits_rgb"), "features[10]", rgb, 3),
        ("resnet_narrow", "tests/golden/cam/resnet_narrow.pt", False, narrow, "layer4[-1]", x_narrow, 7),
        ("resnet_narrow_inner", "tests/golden/cam/resnet_narrow_inner.pt", False, narrow, "layer4[1].conv2", x_narrow, 7),
        ("resnet18", "bench-data/resnet18_cam.pt", True, r18, "layer4[-1]", x_r18, 7),
    ]
    manifest = {
        "torch": torch.__version__.split("+")[0],
        "grad_cam": version("grad-cam"),
        "captum": captum.__version__,
        "atol": ATOL,
        "models": [],
        "cases": [],
    }
    for name, model_rel, optional, model, layer_name, x, index in models:
        layer = eval("model." + layer_name, {"model": model})
        for p in model.parameters():
            p.requires_grad_(True)  # pytorch-grad-cam hooks need a graph
        manifest["models"].append(
            {"name": name, "model": model_rel, "optional": optional, "input": save(f"{name}/input.npy", x.numpy()),
             "layer": layer_name, "form": "dict" if name.endswith("_inner") else "methods"}
        )
        with torch.no_grad():
            out = model(x)
        for target in ["categorical", "predicted"]:
            classes = [index] * x.shape[0] if target == "categorical" else out.argmax(1).tolist()
            score = out[torch.arange(x.shape[0]), torch.tensor(classes)].numpy()
            score_rel = save(f"{name}/score_{target}.npy", score)
            spec = {"kind": "categorical", "index": index} if target == "categorical" else {"kind": "predicted"}
            for method in METHODS:
                cam = run_case(model, layer, x, method, index if target == "categorical" else None)
                stem = f"{name}/{method.replace('++', 'pp')}_{target}"
                raw = None
                if method == "gradcam":
                    raw = save(stem + "_raw.npy", captum_raw(model, layer, x, classes))
                manifest["cases"].append(
                    {"model": name, "method": method, "target": spec, "classes": classes,
                     "map": save(stem + ".npy", cam), "raw": raw, "score": score_rel}
                )
                flat = cam.reshape(cam.shape[0], -1)
                print(f"{stem}: map range per image {[(round(float(a), 3), round(float(b), 3)) for a, b in zip(flat.min(1), flat.max(1))]}, "
                      f"non-zero {(flat > 0).mean():.2f}, classes {classes}")
    with open(os.path.join(OUT, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.write("\n")
    print(f"wrote {len(manifest['cases'])} cases to {OUT}")


if __name__ == "__main__":
    main()
