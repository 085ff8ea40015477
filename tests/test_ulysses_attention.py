"""All-to-all (Ulysses) context-parallel attention over gloo on CPU: 2 processes reproduce
single-process attention, its tangent (ulysses_attention_jvp and torch.func.jvp through
ulysses_attention) and the gradients."""

import importlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcm.distributed as fd
from helpers import assert_close

fa = importlib.import_module("fastcm.attention")

B, H, HKV, CHUNK, D, DV = 2, 4, 2, 5, 8, 6


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
        out, out_t = fd.ulysses_attention_jvp(q, k, v, q_t, k_t, v_t, causal=causal)
        _, func_out_t = torch.func.jvp(
            lambda a, b, c: fd.ulysses_attention(a, b, c, causal=causal), (q, k, v), (q_t, k_t, v_t)
        )
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (fd.ulysses_attention(*leaves, causal=causal) * grad_out).sum().backward()
        results[rank] = [out, out_t, func_out_t] + [t.grad for t in leaves]
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_ulysses_attention_matches_single_process(causal):
    world = 2
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, _free_port(), causal, results), nprocs=world, join=True)
    q, k, v, q_t, k_t, v_t, grad_out = _full_inputs(world)
    out, out_t = fa.attention_jvp(q, k, v, q_t, k_t, v_t, causal=causal)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    (fa.attention(*leaves, causal=causal) * grad_out).sum().backward()
    gathered = [torch.cat([results[r][i] for r in range(world)], dim=2) for i in range(6)]
    for name, got, want in zip(
        ("out", "out_t", "torch.func.jvp out_t", "dq", "dk", "dv"),
        gathered,
        [out, out_t, out_t] + [t.grad for t in leaves],
    ):
        assert_close(got, want, torch.float64, name=name)


def test_ulysses_attention_on_one_rank_and_bad_input(tmp_path, monkeypatch):
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'store'}")
    try:
        q = torch.randn(1, 3, 4, 8)
        torch.testing.assert_close(fd.ulysses_attention(q, q, q), fa.attention(q, q, q))
        with pytest.raises(ValueError, match="q has 4 tokens per rank, k has 5"):
            fd.ulysses_attention(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))
        monkeypatch.setattr(fd.dist, "get_world_size", lambda group=None: 2)
        with pytest.raises(ValueError, match="q has 3 heads, which the 2 ranks"):
            fd.ulysses_attention(q, q, q)
    finally:
        dist.destroy_process_group()
