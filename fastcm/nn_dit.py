"""DiT modules built from the tangent-carrying block ops: DiTBlock (adaLN-Zero) and a small DiT.

Each module works under autograd, torch.func.jvp and forward-AD dual tensors (every fused op is
an autograd.Function whose jvp rule is one pass), and has `forward_with_tangent`, an explicit
tangent pass built from the ops' explicit-tangent forms and fastcm.attention_jvp: (y, ẏ) with no
functorch machinery, the pass an sCM step needs for dF/dt.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from .attention import attention, attention_jvp
from .blocks import (
    gated_residual,
    gated_residual_jvp,
    gelu_tanh,
    gelu_tanh_jvp,
    modulated_norm,
    modulated_norm_jvp,
    silu,
    silu_jvp,
)
from .embeddings import grid_positions, timestep_embedding, timestep_embedding_jvp

Tensor = torch.Tensor


def _linear(layer: torch.nn.Linear, x: Tensor) -> Tensor:
    # The explicit tangent pass calls F.linear directly: a module call costs host time for hooks.
    return F.linear(x, layer.weight, layer.bias)


def _linear_tangent(layer: torch.nn.Linear, x_t: Optional[Tensor]) -> Optional[Tensor]:
    return None if x_t is None else F.linear(x_t, layer.weight)


def _chunks(mod: Optional[Tensor], count: int):
    """The per-sample (B, 1, C) modulation vectors of an adaLN linear output (B, count·C)."""
    return (None,) * count if mod is None else mod.unsqueeze(1).chunk(count, dim=2)


def _tangents_of(module: torch.nn.Module, *inputs: Tensor):
    """Under no_grad with a forward-AD level open (dual tensors, torch.func.jvp): the inputs'
    (primal, tangent) pairs when some input carries a tangent and no parameter does; else None."""
    if torch.is_grad_enabled() or forward_ad._current_level < 0:
        return None
    pairs = [forward_ad.unpack_dual(t) for t in inputs]
    if all(pair.tangent is None for pair in pairs):
        return None
    if any(forward_ad.unpack_dual(p).tangent is not None for p in module.parameters()):
        return None
    return [(pair.primal, pair.tangent) for pair in pairs]


class DiTBlock(torch.nn.Module):
    """A DiT block with adaLN-Zero conditioning (Peebles & Xie, "Scalable Diffusion Models with
    Transformers"):

        shift₁, scale₁, gate₁, shift₂, scale₂, gate₂ = Linear(silu(c))      (zero-initialised)
        x = x + gate₁·Attn(modulated_norm(x, shift₁, scale₁))
        x = x + gate₂·MLP(modulated_norm(x, shift₂, scale₂)),  MLP = Linear ∘ gelu_tanh ∘ Linear

    x: (B, N, dim) tokens, c: (B, dim) conditioning, one float dtype. Attention is
    fastcm.attention over `heads` heads (a fastcm.nn.Attention module, qkv/proj layout).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        mlp_ratio: float = 4.0,
        norm: str = "layer",
        eps: float = 1e-6,
        qkv_bias: bool = True,
    ):
        super().__init__()
        from .nn import Attention  # fastcm.nn re-exports this module

        self.norm, self.eps = norm, eps
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias)
        hidden = int(dim * mlp_ratio)
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)
        self.modulation = torch.nn.Linear(dim, 6 * dim)
        torch.nn.init.zeros_(self.modulation.weight)
        torch.nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, N, dim), c (B, dim) -> (B, N, dim). Under no_grad, a jvp through the block (dual
        tensors, torch.func.jvp) whose tangents are on x and c runs forward_with_tangent: one explicit
        tangent pass instead of a jvp rule per op."""
        dual = _tangents_of(self, x, c)
        if dual is not None:
            (x, x_t), (c, c_t) = dual
            y, y_t = self.forward_with_tangent(x, c, torch.zeros_like(x) if x_t is None else x_t, c_t)
            return forward_ad.make_dual(y, y_t)
        batch, length, dim = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = _chunks(self.modulation(silu(c)), 6)
        h = modulated_norm(x, shift1, scale1, norm=self.norm, eps=self.eps).reshape(-1, dim)
        q, k, v = self._heads(self.attn.qkv(h), batch, length)
        x = gated_residual(x, gate1, self._project(attention(q, k, v), batch, length))
        h = modulated_norm(x, shift2, scale2, norm=self.norm, eps=self.eps).reshape(-1, dim)
        return gated_residual(x, gate2, self.fc2(gelu_tanh(self.fc1(h))).reshape(batch, length, dim))

    # The linears run on (B·N, C) views: a 2-D linear is 2 ATen ops, a 3-D one 4.
    def _heads(self, qkv: Tensor, batch: int, length: int):
        return qkv.view(batch, length, 3, self.attn.heads, self.attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _project(self, out: Tensor, batch: int, length: int, tangent: bool = False) -> Tensor:
        out = out.transpose(1, 2).reshape(batch * length, -1)
        out = _linear_tangent(self.attn.proj, out) if tangent else _linear(self.attn.proj, out)
        return out.reshape(batch, length, -1)

    def forward_with_tangent(
        self, x: Tensor, c: Tensor, x_t: Tensor, c_t: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        """(forward(x, c), its directional derivative along (x_t, c_t)) from the explicit-tangent ops
        and fastcm.attention_jvp; c_t None means a constant conditioning. Runs under torch.no_grad:
        no autograd graph."""
        if not isinstance(self.attn.q_norm, torch.nn.Identity):
            raise ValueError("fastcm.nn.DiTBlock.forward_with_tangent: qk_norm attention is not supported")
        batch, length, dim = x.shape
        with torch.no_grad():
            if c_t is None:
                mod, mod_t = _linear(self.modulation, silu(c)), None
            else:
                activated, activated_t = silu_jvp(c, c_t)
                mod, mod_t = _linear(self.modulation, activated), _linear_tangent(self.modulation, activated_t)
            shift1, scale1, gate1, shift2, scale2, gate2 = _chunks(mod, 6)
            shift1_t, scale1_t, gate1_t, shift2_t, scale2_t, gate2_t = _chunks(mod_t, 6)
            h, h_t = modulated_norm_jvp(x, shift1, scale1, x_t, shift1_t, scale1_t, norm=self.norm, eps=self.eps)
            h, h_t = h.reshape(-1, dim), h_t.reshape(-1, dim)
            qkv, qkv_t = _linear(self.attn.qkv, h), _linear_tangent(self.attn.qkv, h_t)
            out, out_t = attention_jvp(*self._heads(qkv, batch, length), *self._heads(qkv_t, batch, length))
            x, x_t = gated_residual_jvp(
                x,
                gate1,
                self._project(out, batch, length),
                x_t,
                gate1_t,
                self._project(out_t, batch, length, tangent=True),
            )
            h, h_t = modulated_norm_jvp(x, shift2, scale2, x_t, shift2_t, scale2_t, norm=self.norm, eps=self.eps)
            h, h_t = h.reshape(-1, dim), h_t.reshape(-1, dim)
            m, m_t = gelu_tanh_jvp(_linear(self.fc1, h), _linear_tangent(self.fc1, h_t))
            return gated_residual_jvp(
                x,
                gate2,
                _linear(self.fc2, m).reshape(batch, length, dim),
                x_t,
                gate2_t,
                _linear_tangent(self.fc2, m_t).reshape(batch, length, dim),
            )


def sincos_position_embedding(height: int, width: int, dim: int) -> Tensor:
    """DiT's fixed 2-D sin-cos position embedding (height·width, dim) float32: half the channels
    encode the row, half the column, each as [sin(p·ω), cos(p·ω)], ω_j = 10000^(−j/(dim/4))."""
    if dim % 4:
        raise ValueError(f"fastcm.nn.DiT: dim={dim} must be divisible by 4 for the 2-D position embedding")
    positions = grid_positions(height, width)
    omega = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    parts = []
    for axis in range(2):
        angles = positions[:, axis].double()[:, None] * omega
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


class DiT(torch.nn.Module):
    """A small DiT: patchify (Conv2d, stride = patch), fixed 2-D sin-cos positions, conditioning
    c = MLP(timestep_embedding(t)) (+ a class embedding with a null class for classifier-free
    guidance), `depth` DiTBlocks, a final adaLN layer and unpatchify.

    forward(x, t, y=None): x (B, in_channels, H, W), t (B,) times (any float dtype: the embedding is
    float32), y (B,) int labels in [0, num_classes] (num_classes = the null label) or None.
    Returns (B, out_channels, H, W), out_channels = in_channels (2·in_channels with learn_sigma).
    """

    def __init__(
        self,
        *,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        learn_sigma: bool = False,
        frequency_dim: int = 256,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"fastcm.nn.DiT: input_size={input_size} must be divisible by patch_size={patch_size}")
        self.patch_size, self.grid = patch_size, input_size // patch_size
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.frequency_dim = frequency_dim
        self.patchify = torch.nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_position_embedding(self.grid, self.grid, dim)[None], persistent=False)
        self.time_fc1 = torch.nn.Linear(frequency_dim, dim)
        self.time_fc2 = torch.nn.Linear(dim, dim)
        self.label_embedding = torch.nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.blocks = torch.nn.ModuleList(DiTBlock(dim, heads, mlp_ratio=mlp_ratio) for _ in range(depth))
        self.final_modulation = torch.nn.Linear(dim, 2 * dim)
        self.final_linear = torch.nn.Linear(dim, patch_size * patch_size * self.out_channels)
        for layer in (self.final_modulation, self.final_linear):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)

    def _tokens(self, x: Tensor) -> Tensor:
        return self.patchify(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)

    def _conditioning(self, t: Tensor, y: Optional[Tensor], dtype) -> Tensor:
        c = self.time_fc2(silu(self.time_fc1(timestep_embedding(t, self.frequency_dim).to(dtype))))
        if self.label_embedding is not None and y is not None:
            c = c + self.label_embedding(y)
        return c

    def _unpatchify(self, tokens: Tensor) -> Tensor:
        batch, p, g, ch = tokens.shape[0], self.patch_size, self.grid, self.out_channels
        return tokens.reshape(batch, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4).reshape(batch, ch, g * p, g * p)

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        c = self._conditioning(t, y, x.dtype)
        tokens = self._tokens(x)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = _chunks(self.final_modulation(silu(c)), 2)
        return self._unpatchify(self.final_linear(modulated_norm(tokens, shift, scale)))

    def forward_with_tangent(
        self, x: Tensor, t: Tensor, x_t: Tensor, t_t: Tensor, y: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        """(forward(x, t, y), its directional derivative along (x_t, t_t)) from the explicit-tangent
        ops (the labels y are constants). Runs under torch.no_grad: no autograd graph."""
        with torch.no_grad():
            emb, emb_t = timestep_embedding_jvp(t, t_t, self.frequency_dim)
            emb, emb_t = emb.to(x.dtype), emb_t.to(x.dtype)
            hidden, hidden_t = silu_jvp(self.time_fc1(emb), _linear_tangent(self.time_fc1, emb_t))
            c, c_t = self.time_fc2(hidden), _linear_tangent(self.time_fc2, hidden_t)
            if self.label_embedding is not None and y is not None:
                c = c + self.label_embedding(y)
            tokens = self._tokens(x)
            tokens_t = F.conv2d(x_t, self.patchify.weight, stride=self.patch_size).flatten(2).transpose(1, 2)
            for block in self.blocks:
                tokens, tokens_t = block.forward_with_tangent(tokens, c, tokens_t, c_t)
            activated, activated_t = silu_jvp(c, c_t)
            shift, scale = _chunks(self.final_modulation(activated), 2)
            shift_t, scale_t = _chunks(_linear_tangent(self.final_modulation, activated_t), 2)
            out, out_t = modulated_norm_jvp(tokens, shift, scale, tokens_t, shift_t, scale_t)
            return (
                self._unpatchify(self.final_linear(out)),
                self._unpatchify(_linear_tangent(self.final_linear, out_t)),
            )


__all__ = ["DiTBlock", "DiT", "sincos_position_embedding"]
