"""Residual CNN for Fashion-MNIST (the project's own weights, trained by ``tools/train_fashion_resnet.py``).

Textbook ResNet layout with basic blocks, kept clean on purpose because it is the reference target for structured
pruning and LayerMerge:

* stem: conv3x3(1 -> w0) - BN - ReLU at 28x28
* ``layer1``: 2 basic blocks, width w0, 28x28, identity shortcuts
* ``layer2``: 2 basic blocks, width w1, first block stride 2 (-> 14x14) with a 1x1 conv + BN projection shortcut
* ``layer3``: 2 basic blocks, width w2, first block stride 2 (-> 7x7) with a 1x1 conv + BN projection shortcut
* global average pool, linear head -> 10 logits

A basic block is ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``. Module names follow torchvision's
ResNet (``conv1``/``bn1``/``layerN.i.conv1``/``downsample.0``/``fc``).

Input: Fashion-MNIST images normalised by ``bench.datasets.fashion_normalize`` ([N, 1, 28, 28] float32).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS = Path(__file__).resolve().parent / "weights" / "fashion_resnet.pt"
WIDTHS = (32, 64, 128)
BLOCKS = (2, 2, 2)
NUM_CLASSES = 10

EXPORT = {"inputs": {"image": ((1, 1, 28, 28), "float32")}, "dynamic": {"image": [0]}, "outputs": ["logits"]}


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class FashionResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = WIDTHS, blocks: tuple[int, ...] = BLOCKS,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_ch = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layer = []
            for j in range(n):
                layer.append(BasicBlock(in_ch, width, stride if j == 0 else 1))
                in_ch = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(image)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def build() -> nn.Module:
    """The trained network (weights from models/weights/fashion_resnet.pt, loaded strictly), in eval mode."""
    model = FashionResNet()
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return model.eval()
