"""Ring attention over gloo on CPU: 2 and 3 processes reproduce single-process attention,
its tangent, LSE, μ and the gradients."""

import importlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcm.distributed as fd
from helpers import assert_close

# The module, not the function of the same name that the package exports.
fa = importlib.import_module("fastcm.attention")

B, H, HKV, CHUNK, D, DV = 2, 4, 2, 13, 8, 6


def _full_inputs(world):
    generator = torch.Generator().manual_seed(1)
    n = CHUNK * world
    shapes = [(B, H, n, D), (B, HKV, n, D), (B, HKV, n, DV)] * 2
    tensors = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    return tensors + [torch.randn(B, H, n, DV, generator=generator, dtype=torch.float64)]


def _worker(rank, world, port, causal, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        q, k, v, q_t, k_t, v_t, grad_out = (t[:, :, rank * CHUNK : (rank + 1) * CHUNK] for t in _full_inputs(world))
        out, out_t, lse, lse_t = fd.ring_attention_jvp(q, k, v, q_t, k_t, v_t, causal=causal, return_lse=True)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (fd.ring_attention(*leaves, causal=causal) * grad_out).sum().backward()
        results[rank] = [out, out_t, lse, lse_t] + [t.grad for t in leaves]
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "world,causal,kernels", [(2, True, "auto"), (3, False, "auto"), (3, True, "auto"), (2, True, "triton")]
)
def test_ring_attention_matches_single_process(world, causal, kernels, monkeypatch):
    """The ranks run the default kernels, or the Triton ones (the spawned processes inherit
    FASTCM_BACKEND); the single-process result they are held to is the default one. gloo carries
    CPU tensors, so the Triton ranks run Triton's interpreter whatever the device under test (the
    spawned processes import triton afresh, after TRITON_INTERPRET is set)."""
    results = mp.Manager().dict()
    with monkeypatch.context() as env:
        env.setenv("FASTCM_BACKEND", kernels)
        if kernels == "triton":
            env.setenv("TRITON_INTERPRET", "1")
        mp.spawn(_worker, args=(world, _free_port(), causal, results), nprocs=world, join=True)
    q, k, v, q_t, k_t, v_t, grad_out = _full_inputs(world)
    expected = fa.attention_jvp(q, k, v, q_t, k_t, v_t, causal=causal, return_lse=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    (fa.attention(*leaves, causal=causal) * grad_out).sum().backward()
    gathered = [torch.cat([results[r][i] for r in range(world)], dim=2) for i in range(7)]
    for name, got, want in zip(
        ("out", "out_t", "lse", "lse_t", "dq", "dk", "dv"), gathered, list(expected) + [t.grad for t in leaves]
    ):
        assert_close(got, want, torch.float64, name=name)
