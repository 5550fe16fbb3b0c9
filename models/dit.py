"""Small class-conditional diffusion transformer (DiT) for Fashion-MNIST, predicting the noise eps.

The project's own weights, trained from scratch by ``tools/train_dit.py`` (EMA weights in
``models/weights/dit_fashion.pt``). It is the reference model for the Taylor-cache pass; sampling lives in
``models/dit_sampler.py``.

Layout (after Peebles & Xie's DiT, written here from the description, in pixel space):

* input ``x`` [B, 1, 28, 28] in [-1, 1] scale (noised), patch 4 -> 7x7 = 49 tokens of width ``hidden``
  (``x_embedder.proj``: Conv2d k=4 s=4), plus a fixed 2-D sin-cos position embedding;
* conditioning ``c = t_embedder(t) + y_embedder(y)``: sinusoidal timestep features (256) -> Linear-SiLU-Linear;
  class table with 10 classes + 1 null class (index ``NULL_CLASS`` = 10) for classifier-free guidance;
* ``depth`` blocks, each adaLN-Zero::

      shift1, scale1, gate1, shift2, scale2, gate2 = adaLN_modulation(c).chunk(6)    # SiLU -> Linear(D, 6D)
      x = x + gate1 * attn(modulate(norm1(x), shift1, scale1))
      x = x + gate2 * mlp(modulate(norm2(x), shift2, scale2))

  (``attn`` and ``mlp`` outputs before the gate are what a TaylorSeer-style cache forecasts);
* final layer: adaLN (shift, scale) -> LayerNorm -> Linear(D, 4*4*1) -> unpatchify -> eps [B, 1, 28, 28].

The adaLN modulation and output projections start at zero (adaLN-Zero), so the untrained network predicts 0.

``forward(x, t, y)``: x float32 [B,1,28,28]; t [B] float32 or int64 timestep in [0, 999]; y int64 [B] class in [0, 9],
10 (or any other value) for the null class.
Everything is plain MatMul/Softmax/LayerNorm so the legacy exporter (dynamo=False, opset 17) exports it with a
dynamic batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

WEIGHTS = Path(__file__).resolve().parent / "weights" / "dit_fashion.pt"
IMAGE_SIZE = 28
PATCH = 4
IN_CHANNELS = 1
HIDDEN = 128                      # 192/6 heads is the textbook size; 128/4 fits the 2-core CPU budget
DEPTH = 6
HEADS = 4
MLP_RATIO = 4.0
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES          # the extra "no class" label used for classifier-free guidance
FREQ_DIM = 256

EXPORT = {"inputs": {"x": ((2, 1, IMAGE_SIZE, IMAGE_SIZE), "float32"), "t": ((2,), "float32"),
                     "y": ((2,), "int64")},
          "dynamic": {"x": [0], "t": [0], "y": [0]}, "outputs": ["eps"]}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, [grid*grid, dim] (half the channels for rows, half for columns)."""
    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gy, gx = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    return np.concatenate([one_axis(dim // 2, gy), one_axis(dim // 2, gx)], axis=1).astype(np.float32)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_ch: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_ch, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)          # [B, N, D]


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (float) timestep, then Linear-SiLU-Linear."""

    def __init__(self, hidden: int, freq_dim: int = FREQ_DIM, max_period: float = 10000.0) -> None:
        super().__init__()
        half = freq_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32)
                                                / half), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.to(torch.float32)[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    """Class table with one extra row for the null class (classifier-free guidance).

    Any label outside [0, num_classes) means "no class" and reads the null row, so arbitrary integer inputs (such
    as the token ids ``graphopt export`` generates for int64 inputs) are valid.
    """

    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        valid = (y >= 0) & (y < self.num_classes)
        return self.embedding_table(torch.where(valid, y, torch.full_like(y, self.num_classes)))


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                         # [B, H, N, hd]
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, hidden: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_ch: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_ch)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, image_size: int = IMAGE_SIZE, patch: int = PATCH, in_channels: int = IN_CHANNELS,
                 hidden: int = HIDDEN, depth: int = DEPTH, heads: int = HEADS, mlp_ratio: float = MLP_RATIO,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        assert image_size % patch == 0 and hidden % heads == 0
        self.image_size, self.patch, self.in_channels = image_size, patch, in_channels
        self.grid = image_size // patch
        self.num_classes = num_classes
        self.x_embedder = PatchEmbed(patch, in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(num_classes, hidden)
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed_2d(hidden, self.grid))[None],
                             persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, patch, in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.blocks:                    # adaLN-Zero: every residual branch starts closed
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W]."""
        b = x.shape[0]
        g, p, c = self.grid, self.patch, self.in_channels
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)    # B, C, gy, py, gx, px
        return x.reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


def load_state(path: Path | str = WEIGHTS) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict in float32 (it may be stored in float16)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def build() -> nn.Module:
    """The trained DiT (EMA weights from models/weights/dit_fashion.pt, loaded strictly), in eval mode."""
    model = DiT()
    model.load_state_dict(load_state(), strict=True)
    return model.eval()
