#!/usr/bin/env python3
"""Writes tests/models/avgpool_rgb.pt (+ .json): a tiny TorchScript classifier
that takes colour images of any size (global average pool, a seeded 3 -> 10
linear layer, softmax), with a 96 x 96 sidecar. The CLI tests use it where
the input must be larger than 64 x 64 (more than one compute thread,
channels-last batches) without a large model.

    python scripts/make_test_models.py        (needs torch)
"""
import json
import os

import torch

out = os.path.join(os.path.dirname(__file__), "..", "tests", "models")
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
m = torch.nn.Sequential(
    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 10), torch.nn.Softmax(1)
).eval()
torch.jit.script(m).save(os.path.join(out, "avgpool_rgb.pt"))
with open(os.path.join(out, "avgpool_rgb.json"), "w") as f:
    json.dump({"input_size": [96, 96], "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, f)
    f.write("\n")
print("wrote tests/models/avgpool_rgb.pt and .json")
