"""DiT block op benchmarks (adaLN modulated norm, gated residual, activations, RoPE, timestep
embedding; forward and explicit tangent) and whole-block rows: a plain-PyTorch adaLN-Zero DiT
block against fastcm.nn.DiTBlock, forward, explicit tangent and torch.func.jvp.

`python -m benchmarks.bench_blocks` prints the host-overhead table at tiny shapes (width 64,
16 tokens, batch 2, 4 heads): ATen ops dispatched and host wall time per call.
"""

import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastcm.blocks as blocks
import fastcm.embeddings as embeddings
from fastcm.nn import DiTBlock
from fastcm.reference import blocks as ref_blocks
from fastcm.reference import embeddings as ref_embeddings
from fastcm.testing import count_aten_ops

from .common import Case, make_pytest_benchmark

GPU_BLOCK = (32, 256, 384, 6)  # batch, tokens, width, heads: DiT-S/2 at 256² latents 32²
CPU_BLOCK = (2, 64, 64, 4)
TINY_BLOCK = (2, 16, 64, 4)


class PlainDiTBlock(torch.nn.Module):
    """The standard adaLN-Zero DiT block in plain PyTorch (as in the DiT reference code):
    nn.LayerNorm without affine, nn.Linear, tanh-GELU and F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm2 = torch.nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.fc1 = torch.nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = torch.nn.Linear(int(dim * mlp_ratio), dim)
        self.adaLN_modulation = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(dim, 6 * dim))

    def attention(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attention(self.norm1(x) * (1 + scale1.unsqueeze(1)) + shift1.unsqueeze(1))
        h = self.norm2(x) * (1 + scale2.unsqueeze(1)) + shift2.unsqueeze(1)
        return x + gate2.unsqueeze(1) * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


def matching_blocks(dim: int, heads: int, device=None, dtype=torch.float32):
    """(PlainDiTBlock, fastcm.nn.DiTBlock) with the same random weights (the modulation too, so
    that no branch is zeroed by the adaLN-Zero initialisation)."""
    plain = PlainDiTBlock(dim, heads)
    for p in plain.adaLN_modulation[1].parameters():
        torch.nn.init.normal_(p, std=0.05)
    fused = DiTBlock(dim, heads)
    pairs = [
        (fused.attn.qkv, plain.qkv),
        (fused.attn.proj, plain.proj),
        (fused.fc1, plain.fc1),
        (fused.fc2, plain.fc2),
        (fused.modulation, plain.adaLN_modulation[1]),
    ]
    with torch.no_grad():
        for mine, theirs in pairs:
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
    return plain.to(device, dtype), fused.to(device, dtype)


def block_inputs(batch, tokens, dim, device=None, dtype=torch.float32):
    x, c = (
        torch.randn(batch, tokens, dim, device=device, dtype=dtype),
        torch.randn(batch, dim, device=device, dtype=dtype),
    )
    return x, c, torch.randn_like(x), torch.randn_like(c)


def plain_jvp(plain, x, c, x_t, c_t):
    """torch.func.jvp of the plain block; SDPA's MATH backend, the one with a forward-mode rule
    on every device (the fused CPU / flash kernels have none)."""
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(plain, (x, c), (x_t, c_t))


def block_calls(plain, fused):
    """name -> (plain-PyTorch call, fastcm call), each taking (x, c, x_t, c_t)."""
    return {
        "forward": (lambda x, c, x_t, c_t: plain(x, c), lambda x, c, x_t, c_t: fused(x, c)),
        "tangent": (
            lambda *args: plain_jvp(plain, *args),
            lambda x, c, x_t, c_t: fused.forward_with_tangent(x, c, x_t, c_t),
        ),
        "func.jvp": (
            lambda *args: plain_jvp(plain, *args),
            lambda x, c, x_t, c_t: torch.func.jvp(fused, (x, c), (x_t, c_t)),
        ),
    }


def host_ms(fn, args, reps: int = 200) -> float:
    """Median host wall time of fn(*args) in ms (CPU tensors: the whole call is host time)."""
    for _ in range(10):
        fn(*args)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def host_overhead_table(reps: int = 200):
    """Rows (call, implementation, ATen ops, host ms) at TINY_BLOCK on CPU, under no_grad."""
    batch, tokens, dim, heads = TINY_BLOCK
    plain, fused = matching_blocks(dim, heads)
    args = block_inputs(batch, tokens, dim)
    rows = []
    with torch.no_grad():
        for name, (plain_call, fused_call) in block_calls(plain, fused).items():
            for label, call in (
                ("plain PyTorch" if name != "tangent" else "plain func.jvp", plain_call),
                ("fastcm", fused_call),
            ):
                _, ops = count_aten_ops(call, *args)
                rows.append((name, label, ops, host_ms(call, args, reps)))
    return rows


def _op_case(device, name, shape, dtype, make_inputs, reference, fast, min_bytes, compile_reference=True):
    return Case(
        "blocks",
        name,
        shape,
        dtype,
        make_inputs,
        reference=reference,
        fastcm=fast,
        min_bytes=min_bytes,
        compile_reference=compile_reference,
    )


def _norm_cases(device, batch, tokens, dim, dtype):
    def make_inputs():
        x = torch.randn(batch, tokens, dim, device=device, dtype=dtype)
        shift, scale = torch.randn(2, batch, dim, device=device, dtype=dtype)
        return x, shift, scale, torch.randn_like(x), torch.randn_like(shift), torch.randn_like(scale)

    size = batch * tokens * dim * torch.finfo(dtype).bits // 8
    shape = (batch, tokens, dim)
    return [
        _op_case(
            device,
            "modulated_norm fwd",
            shape,
            dtype,
            make_inputs,
            lambda x, s, c, *_: ref_blocks.modulated_norm(x, s, c),
            lambda x, s, c, *_: blocks.modulated_norm(x, s, c),
            2 * size,
        ),
        _op_case(
            device,
            "modulated_norm tangent",
            shape,
            dtype,
            make_inputs,
            lambda x, s, c, x_t, s_t, c_t: torch.func.jvp(ref_blocks.modulated_norm, (x, s, c), (x_t, s_t, c_t)),
            lambda *args: blocks.modulated_norm_jvp(*args),
            4 * size,
            compile_reference=False,
        ),
        _op_case(
            device,
            "gated_residual tangent",
            shape,
            dtype,
            make_inputs,
            lambda x, s, c, x_t, s_t, c_t: torch.func.jvp(ref_blocks.gated_residual, (x, s, x_t), (x_t, s_t, x)),
            lambda x, s, c, x_t, s_t, c_t: blocks.gated_residual_jvp(x, s, x_t, x_t, s_t, x),
            6 * size,
            compile_reference=False,
        ),
        _op_case(
            device,
            "gelu_tanh tangent",
            shape,
            dtype,
            make_inputs,
            lambda x, s, c, x_t, *_: torch.func.jvp(ref_blocks.gelu_tanh, (x,), (x_t,)),
            lambda x, s, c, x_t, *_: blocks.gelu_tanh_jvp(x, x_t),
            4 * size,
            compile_reference=False,
        ),
    ]


def _embedding_cases(device, batch, tokens, dim, heads, dtype):
    head_dim = dim // heads

    def make_inputs():
        q, k, q_t, k_t = torch.randn(4, batch, heads, tokens, head_dim, device=device, dtype=dtype)
        cos, sin = ref_embeddings.rope_tables(ref_embeddings.grid_positions(tokens).to(device), head_dim)
        return q, k, q_t, k_t, cos, sin

    def make_times():
        return torch.rand(batch * 64, device=device), torch.randn(batch * 64, device=device)

    size = batch * tokens * dim * torch.finfo(dtype).bits // 8
    return [
        _op_case(
            device,
            "rope tangent",
            (batch, heads, tokens, head_dim),
            dtype,
            make_inputs,
            lambda q, k, q_t, k_t, cos, sin: torch.func.jvp(
                lambda a, b: ref_embeddings.rope(a, b, cos, sin), (q, k), (q_t, k_t)
            ),
            embeddings.rope_jvp,
            8 * size,
            compile_reference=False,
        ),
        _op_case(
            device,
            "timestep_embedding tangent",
            (batch * 64, 256),
            torch.float32,
            make_times,
            lambda t, t_t: torch.func.jvp(lambda s: ref_embeddings.timestep_embedding(s, 256), (t,), (t_t,)),
            lambda t, t_t: embeddings.timestep_embedding_jvp(t, t_t, 256),
            batch * 64 * 256 * 8,
            compile_reference=False,
        ),
    ]


def _block_cases(device, batch, tokens, dim, heads, dtype):
    plain, fused = matching_blocks(dim, heads, device, dtype)
    size = batch * tokens * dim * torch.finfo(dtype).bits // 8
    weights = sum(p.numel() for p in fused.parameters()) * torch.finfo(dtype).bits // 8
    flops = 2 * batch * tokens * 12 * dim * dim + 4 * batch * tokens * tokens * dim
    out = []
    for name, (plain_call, fused_call) in block_calls(plain, fused).items():

        def make_inputs():
            return block_inputs(batch, tokens, dim, device, dtype)

        scale = 1 if name == "forward" else 2
        out.append(
            Case(
                "blocks",
                f"DiTBlock {name}",
                (batch, tokens, dim),
                dtype,
                make_inputs,
                reference=torch.no_grad()(plain_call),
                fastcm=torch.no_grad()(fused_call),
                min_bytes=scale * (2 * size + weights),
                flops=scale * flops,
                compile_reference=name == "forward",
            )
        )
    return out


def cases(device: torch.device, small: bool):
    batch, tokens, dim, heads = CPU_BLOCK if small else GPU_BLOCK
    dtypes = (torch.float32,) if small else (torch.bfloat16,)
    out = []
    for dtype in dtypes:
        out += _norm_cases(device, batch, tokens, dim, dtype)
        out += _embedding_cases(device, batch, tokens, dim, heads, dtype)
        out += _block_cases(device, batch, tokens, dim, heads, dtype)
    return out


test_blocks = make_pytest_benchmark(cases)


if __name__ == "__main__":
    torch.set_num_threads(1)  # host time, not intra-op parallelism, is what this table measures
    print(f"host overhead at batch, tokens, width, heads = {TINY_BLOCK} (CPU, one thread, no_grad, float32)")
    print(f"{'call':<10} {'implementation':<16} {'ATen ops':>8} {'host ms':>9}")
    for call, label, ops, ms in host_overhead_table():
        print(f"{call:<10} {label:<16} {ops:>8} {ms:>9.3f}")
