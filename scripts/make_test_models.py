#!/usr/bin/env python3
"""Writes the small models of the CLI tests under tests/models/:

avgpool_rgb.pt (+ .json)  a tiny TorchScript classifier that takes colour
    images of any size (global average pool, a seeded 3 -> 10 linear layer,
    softmax), with a 96 x 96 sidecar. Used where the input must be larger
    than 64 x 64 (more than one compute thread; channels-last batches
    with --channels-last)
    without a large model.
conv_rgb_heavy.pt (+ .json)  a small file but a heavy forward pass: two
    3 x 3 convolutions (3 -> 64 -> 96 channels) at 224 x 224, ~8 GFLOP per
    image, average pool, a 96 -> 10 linear layer. The model whose forward
    pass no machine runs in 2 ms, for the OpenMP wait policy's choice.
cam_rgb.pt, cam_rgb_frozen.pt (+ .json)  one small seeded CAM model (conv,
    batch norm, ReLU twice; average pool and a linear head) exported by
    scripts/export_cam_model.py, as it is and with --freeze.
dict_*.pt (+ .json)  small models whose forward returns a dict, each wrong
    for the dict form of the CAM convention in one way: no "features" entry
    (dict_no_features), features that are not (N, K, h, w)
    (dict_flat_features), features detached from the input
    (dict_detached), and nothing but the features (dict_only_features).

not_torchscript_*  model files of the kinds users mistake for TorchScript,
    each of a seeded 1 -> 2 channel convolution: a torch.save checkpoint of
    its state_dict (not_torchscript_state_dict.pt) and in the legacy
    non-zip format (not_torchscript_legacy.pt), and a torch.export archive
    (not_torchscript_export.pt2).

fixed_batch_1.pt (+ .json)  a small convolutional classifier traced with
    torch.jit.trace on one image, whose forward reshapes to (1, -1): the
    trace runs on a batch of one only, as models traced with a fixed batch
    size do.

extra_argument.pt (+ .json)  a linear classifier scripted with a second,
    non-tensor parameter, forward(x, temperature: float): the kind of model
    whose forward needs more than the image.

uint16_output.pt  a module with no weights whose (N, 1) output is a
    torch.uint16 tensor, a dtype tch 0.24 has no Kind for: the way to get
    such tensors into the library's calls.

    python scripts/make_test_models.py        (needs torch)
"""
import json
import os

import torch

out = os.path.join(os.path.dirname(__file__), "..", "tests", "models")
os.makedirs(out, exist_ok=True)


def save_scripted(name, model, size):
    """Scripts `model` (eval mode) to tests/models/NAME.pt with a colour sidecar of `size`."""
    torch.jit.script(model.eval()).save(os.path.join(out, name + ".pt"))
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump({"input_size": size, "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, f)
        f.write("\n")
    print(f"wrote tests/models/{name}.pt and .json")


torch.manual_seed(0)
save_scripted("avgpool_rgb", torch.nn.Sequential(
    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 10), torch.nn.Softmax(1)
), [96, 96])
torch.manual_seed(3)
save_scripted("conv_rgb_heavy", torch.nn.Sequential(
    torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 96, 3, padding=1),
    torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(96, 10),
), [224, 224])

import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_cam_model as ecm  # noqa: E402

nn = torch.nn
torch.manual_seed(1)
features = nn.Sequential(
    nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
    nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
)
for bn in (features[1], features[4]):
    # Statistics and affine terms away from the identity, so folding them
    # into the convolutions changes the weights.
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.2, 0.2)
head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
side = {"input_size": [96, 96], "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
for name, frozen in [("cam_rgb", False), ("cam_rgb_frozen", True)]:
    ecm.save_checked(ecm.CamSplit(features, head), os.path.join(out, name + ".pt"), x, side, frozen=frozen)
print("wrote tests/models/cam_rgb.pt, cam_rgb_frozen.pt and .json")


from typing import Dict  # noqa: E402

F = torch.nn.functional


class DictModel(nn.Module):
    """A conv layer and a linear head; forward returns a dict of `kind`."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        a = F.relu(self.conv(x))
        if self.kind == "detached":
            a = a.detach()
        y = self.fc(a.mean((2, 3)))
        if self.kind == "no_features":
            return {"logits": y}
        if self.kind == "flat_features":
            return {"features": a.mean((2, 3)), "output": y}
        if self.kind == "only_features":
            return {"features": a}
        return {"features": a, "output": y}


torch.manual_seed(3)
for kind in ["no_features", "flat_features", "detached", "only_features"]:
    name = "dict_" + kind
    torch.jit.script(DictModel(kind).eval()).save(os.path.join(out, name + ".pt"))
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump({"input_size": [16, 16], "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, f)
        f.write("\n")
print("wrote tests/models/dict_*.pt and .json")

torch.manual_seed(4)
conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)).eval()
torch.save(conv.state_dict(), os.path.join(out, "not_torchscript_state_dict.pt"))
torch.save(conv.state_dict(), os.path.join(out, "not_torchscript_legacy.pt"), _use_new_zipfile_serialization=False)
torch.export.save(torch.export.export(conv, (torch.zeros(1, 1, 8, 8),)), os.path.join(out, "not_torchscript_export.pt2"))
print("wrote tests/models/not_torchscript_*")


class FixedBatch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4 * 14 * 14, 10)

    def forward(self, x):
        return self.fc(self.conv(x).reshape(1, -1))


torch.manual_seed(5)
torch.jit.trace(FixedBatch().eval(), torch.zeros(1, 1, 16, 16)).save(os.path.join(out, "fixed_batch_1.pt"))
with open(os.path.join(out, "fixed_batch_1.json"), "w") as f:
    json.dump({"input_size": [16, 16], "channels": 1, "mean": [0.5], "std": [0.25]}, f)
    f.write("\n")
print("wrote tests/models/fixed_batch_1.pt and .json")


class ExtraArgument(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16 * 16, 10)

    def forward(self, x, temperature: float):
        return self.fc(x.flatten(1)) / temperature


torch.manual_seed(6)
torch.jit.script(ExtraArgument().eval()).save(os.path.join(out, "extra_argument.pt"))
with open(os.path.join(out, "extra_argument.json"), "w") as f:
    json.dump({"input_size": [16, 16], "channels": 1, "mean": [0.5], "std": [0.25]}, f)
    f.write("\n")
print("wrote tests/models/extra_argument.pt and .json")


class Uint16Output(torch.nn.Module):
    def forward(self, x):
        return (x.abs() * 10).to(torch.uint16)[:, :1]


torch.jit.script(Uint16Output().eval()).save(os.path.join(out, "uint16_output.pt"))
print("wrote tests/models/uint16_output.pt")
