"""A small DiT (Peebles & Xie 2023) for images, built from fastcm.nn.Attention and plain PyTorch layers.

x (B, C, H, W) and a per-sample noise label c (B,) -> (B, C, H, W). Patches of p×p pixels become
tokens (a strided convolution) with a learned position embedding; c enters through Fourier
features and an MLP; each block is adaLN-Zero: LayerNorm without affine, then shift / scale from the
time embedding, attention (fastcm.nn.Attention with per-head RMS-normed q and k), a gate, and the
same around a GELU MLP; the output layer is modulated the same way and maps each token back to its
patch. Gates and the output layer start at zero, so the untrained network outputs 0.

Every layer has a forward-mode derivative, so torch.func.jvp runs through the whole network; the
attention tangent comes from fastcm's fused kernel. This module is the one place the example's
network is defined, so that it can be swapped for fused DiT blocks without touching the training.
"""

import math

import torch

import fastcm.nn


def modulate(h, shift, scale):
    return h * (1 + scale) + shift


class DiTBlock(torch.nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = fastcm.nn.Attention(width, heads, qk_norm=True, cuda_dtype=torch.bfloat16)
        self.norm2 = torch.nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, mlp_ratio * width),
            torch.nn.GELU(approximate="tanh"),
            torch.nn.Linear(mlp_ratio * width, width),
        )
        self.modulation = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(width, 6 * width))
        torch.nn.init.zeros_(self.modulation[1].weight)
        torch.nn.init.zeros_(self.modulation[1].bias)

    def forward(self, h, cond):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)[:, None].chunk(6, dim=-1)
        h = h + gate1 * self.attn(modulate(self.norm1(h), shift1, scale1))
        return h + gate2 * self.mlp(modulate(self.norm2(h), shift2, scale2))


class DiT(torch.nn.Module):
    """F(x, c): x (B, channels, size, size), c (B,) the noise label -> (B, channels, size, size)."""

    def __init__(
        self,
        size: int = 16,
        channels: int = 1,
        patch: int = 2,
        width: int = 64,
        depth: int = 4,
        heads: int = 4,
        frequencies: int = 32,
        label_scale: float = 1.0,
    ):
        super().__init__()
        if size % patch:
            raise ValueError(f"DiT: size={size} must be a multiple of patch={patch}")
        self.size, self.channels, self.patch = size, channels, patch
        self.embed = torch.nn.Conv2d(channels, width, patch, stride=patch)
        self.position = torch.nn.Parameter(0.02 * torch.randn(1, (size // patch) ** 2, width))
        # Fixed log-spaced frequencies (as in DiT's timestep embedding), times label_scale.
        self.register_buffer(
            "freqs", label_scale * torch.exp(-math.log(1000.0) * torch.arange(frequencies) / frequencies)
        )
        self.time = torch.nn.Sequential(
            torch.nn.Linear(2 * frequencies, width), torch.nn.SiLU(), torch.nn.Linear(width, width)
        )
        self.blocks = torch.nn.ModuleList(DiTBlock(width, heads) for _ in range(depth))
        self.final_norm = torch.nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(width, 2 * width))
        self.final = torch.nn.Linear(width, patch * patch * channels)
        for layer in (self.final_modulation[1], self.final):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)

    def forward(self, x, c):
        batch = x.shape[0]
        phase = c.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        cond = self.time(torch.cat([torch.sin(phase), torch.cos(phase)], dim=1))
        h = self.embed(x).flatten(2).transpose(1, 2) + self.position
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = self.final_modulation(cond)[:, None].chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(h), shift, scale))
        grid = self.size // self.patch
        out = out.reshape(batch, grid, grid, self.patch, self.patch, self.channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(batch, self.channels, self.size, self.size)
