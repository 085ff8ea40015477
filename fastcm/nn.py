"""Thin modules over fastcm ops."""

import torch

from .attention import attention


class Attention(torch.nn.Module):
    """Multi-head self-attention as in a DiT block, with fastcm.attention inside (so
    torch.func.jvp through the block runs the fused tangent kernel).

    x (B, N, dim) -> (B, N, dim): qkv = Linear(dim, (H + 2·Hkv)·d)(x), optional per-head
    RMS norm of q and k (qk_norm, as in SD3/Flux-style DiTs), O = attention(q, k, v) with
    d = dim / heads, then Linear(H·d, dim). kv_heads < heads gives GQA. cuda_dtype (bfloat16 or
    float16): float32 CUDA inputs run the attention in that dtype (the CUDA kernels take no
    float32; without it they run the reference), the output cast back.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        kv_heads: int = None,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        causal: bool = False,
        cuda_dtype: torch.dtype = None,
    ):
        super().__init__()
        if cuda_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                f"fastcm.nn.Attention: cuda_dtype must be None, torch.bfloat16 or torch.float16, got {cuda_dtype}"
            )
        self.cuda_dtype = cuda_dtype
        kv_heads = heads if kv_heads is None else kv_heads
        if dim % heads != 0 or heads % kv_heads != 0:
            raise ValueError(
                f"fastcm.nn.Attention: dim={dim} must divide by heads={heads} and heads by kv_heads={kv_heads}"
            )
        self.heads, self.kv_heads, self.head_dim, self.causal = heads, kv_heads, dim // heads, causal
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=qkv_bias)
        self.q_norm = torch.nn.RMSNorm(self.head_dim) if qk_norm else torch.nn.Identity()
        self.k_norm = torch.nn.RMSNorm(self.head_dim) if qk_norm else torch.nn.Identity()
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, attn_bias=None):
        batch, length, _ = x.shape
        sizes = (self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim)
        q, k, v = (t.view(batch, length, -1, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(sizes, dim=-1))
        q, k = self.q_norm(q), self.k_norm(k)
        if self.cuda_dtype is not None and x.is_cuda and x.dtype == torch.float32:
            q, k, v = (t.to(self.cuda_dtype) for t in (q, k, v))
        out = attention(q, k, v, causal=self.causal, attn_bias=attn_bias).to(x.dtype)
        return self.proj(out.transpose(1, 2).reshape(batch, length, -1))


__all__ = ["Attention"]


from .nn_dit import DiT, DiTBlock  # noqa: E402  (nn_dit builds on Attention above)

__all__ += ["DiTBlock", "DiT"]
