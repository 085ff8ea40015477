"""Batches past CUDA's grid limits. CUDA allows 2³¹ − 1 programs on grid axis 0 but only 65535 on
axes 1 and 2, and Triton's interpreter enforces neither, so the CPU suite cannot see a launcher
that puts the batch on axis 1. On CPU every Triton launcher is called on a batch of 70 000 with
the kernels' execution skipped and their grids checked; on a GPU the losses run at that batch
against the reference."""

import pytest
import torch

import fastcm.kernels.blocks as blocks_launchers
import fastcm.kernels.dmd as dmd_launchers
import fastcm.kernels.embeddings as embeddings_launchers
import fastcm.kernels.flow as flow_launchers
import fastcm.kernels.losses as losses_launchers
import fastcm.kernels.precondition as precondition_launchers
import fastcm.kernels.sde_steps as sde_steps_launchers
import fastcm.kernels.steps as steps_launchers
from fastcm import losses
from fastcm.reference import losses as reference
from helpers import DEVICE, assert_close, randn, to64

BATCH = 70_000
CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)


def _launcher_calls():
    """(name, call) for every Triton launcher on a (BATCH, 3) float32 batch."""
    x, y, z, w, u = (torch.randn(BATCH, 3) for _ in range(5))
    sigma, t, r = torch.rand(BATCH) + 0.1, torch.rand(BATCH), torch.rand(BATCH)
    stats2, stats3, coef = torch.rand(2, BATCH), torch.rand(3, BATCH), torch.rand(BATCH)
    grad = torch.tensor(1.0)
    tokens, heads, table = torch.randn(BATCH, 2, 3), torch.randn(BATCH, 1, 2, 4), torch.rand(2, 2)
    return [
        ("precondition_forward", lambda: precondition_launchers.precondition_forward(x, y, sigma, "edm", 0.5, 0.002)),
        (
            "precondition_backward",
            lambda: precondition_launchers.precondition_backward(x, x, y, sigma, "edm", 0.5, 0.002, True, True, True),
        ),
        (
            "precondition_jvp",
            lambda: precondition_launchers.precondition_jvp(x, y, sigma, z, w, sigma, "trigflow", 0.5, 0.002),
        ),
        ("pseudo_huber_forward", lambda: losses_launchers.pseudo_huber_forward(x, y, None, 0.03, "mean")),
        (
            "pseudo_huber_backward",
            lambda: losses_launchers.pseudo_huber_backward(grad, x, y, None, stats2, "mean", True, True),
        ),
        (
            "scm_forward streamed",
            lambda: losses_launchers.scm_forward(x, y, z, w, u, t, r, None, None, 0.5, 0.1, "l2", "mean", False),
        ),
        (
            "scm_forward on chip",
            lambda: losses_launchers.scm_forward(x, y, z, w, u, t, r, None, None, 0.5, 0.1, "l2", "mean", True),
        ),
        ("scm_backward", lambda: losses_launchers.scm_backward(grad, x, y, z, w, u, t, r, stats3, 0.5, "mean")),
        ("scm_tangent", lambda: losses_launchers.scm_tangent(y, z, w, u, t, r, 0.5, 0.1, "l2")),
        ("meanflow_forward", lambda: losses_launchers.meanflow_forward(x, y, z, t, r, 1e-3, 0.75, "mean", True)),
        ("meanflow_backward", lambda: losses_launchers.meanflow_backward(grad, x, y, z, t, r, coef, "mean")),
        ("residual_backward", lambda: losses_launchers.residual_backward(grad, x, coef, 1.0, "mean", torch.float32)),
        (
            "linear_combination",
            lambda: steps_launchers.linear_combination(x, x, y, None, None, None, [1.0, 0.5, 0.0, 0.3], 7, 0, True),
        ),
        ("guided_moments", lambda: steps_launchers.guided_moments(x, y, None, 2.0)),
        (
            "sde_steps combination",
            lambda: sde_steps_launchers.combination(x, x, y, z, w, None, None, [1.0, 0.5, 0.2, 0.1, 0.3], 7, 0, True),
        ),
        (
            "modulated_norm",
            lambda: blocks_launchers.modulated_norm_launch(
                tokens, x, y, None, tokens, x, y, None, "layer", 1e-6, True, True
            ),
        ),
        (
            "modulated_norm_backward",
            lambda: blocks_launchers.modulated_norm_backward(
                tokens, tokens, y, None, "layer", 1e-6, True, True, True, False
            ),
        ),
        (
            "gated_residual",
            lambda: blocks_launchers.gated_residual_launch(tokens, x, tokens, tokens, x, tokens, True, True),
        ),
        ("gated_residual_backward", lambda: blocks_launchers.gated_residual_backward(tokens, x, tokens, True, True)),
        ("activation", lambda: blocks_launchers.activation_launch(x, x, "swiglu", True, True)),
        (
            "activation_backward",
            lambda: blocks_launchers.activation_backward(x[:, :1].contiguous(), x[:, :2].contiguous(), "swiglu"),
        ),
        ("rope", lambda: embeddings_launchers.rope_launch(heads, heads, table, table, False, True, True)),
        ("timestep_embedding", lambda: embeddings_launchers.timestep_embedding_launch(t, t, 3, 1e4, True, True)),
        ("timestep_embedding_backward", lambda: embeddings_launchers.timestep_embedding_backward(x, t, 3, 1e4)),
        ("dmd_sums", lambda: dmd_launchers.dmd_sums(x, y, z)),
        ("denoising_sums", lambda: dmd_launchers.denoising_sums(x, y, z, torch.rand(BATCH, 2))),
        ("add_noise", lambda: flow_launchers.add_noise(x, None, torch.rand(BATCH, 4), 7, 0)),
    ]


@pytest.mark.skipif(DEVICE != "cpu", reason="the kernels run for real on a GPU: see the gpu test below")
def test_every_launch_grid_fits_cuda_limits_past_65535_samples(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    grids = []

    def record_grid(self, *args, grid, warmup, **kwargs):
        grids.append((self.fn.__name__, tuple(grid)))

    monkeypatch.setattr(InterpretedFunction, "run", record_grid)
    for name, call in _launcher_calls():
        grids.clear()
        call()
        assert grids, f"{name}: launched no kernel"
        for kernel, grid in grids:
            assert len(grid) <= 3 and all(0 < n <= limit for n, limit in zip(grid, CUDA_GRID_LIMITS)), (
                f"{name}: {kernel} launched with grid {grid}; CUDA allows at most {CUDA_GRID_LIMITS}"
            )


@pytest.mark.gpu
def test_losses_past_65535_samples_match_reference_on_gpu(backend):
    backend("triton")
    shape = (BATCH, 3)
    t = torch.rand(BATCH, dtype=torch.float64, device=DEVICE) * 1.5 + 0.02
    r = torch.rand(BATCH, dtype=torch.float64, device=DEVICE)
    F = randn(*shape, dtype=torch.float32, requires_grad=True)
    others = {name: randn(*shape, dtype=torch.float32) for name in ("F_minus", "F_jvp", "x_t", "dx_dt")}
    cases = [
        (losses.pseudo_huber_loss, reference.pseudo_huber_loss, {"input": F, "target": others["F_minus"]}),
        (losses.scm_loss, reference.scm_loss, {"F": F, **others, "t": t}),
        (
            losses.meanflow_loss,
            reference.meanflow_loss,
            {"u": F, "v": others["F_minus"], "dudt": others["F_jvp"], "t": t, "r": t * r},
        ),
    ]
    for fast, ref, inputs in cases:
        out = fast(**inputs, reduction="none")
        (grad,) = torch.autograd.grad(out.sum(), F)
        inputs64 = {name: to64(value) for name, value in inputs.items()}
        expected = ref(**inputs64, reduction="none")
        (expected_grad,) = torch.autograd.grad(expected.sum(), [v for v in inputs64.values() if v.requires_grad])
        assert_close(out, expected, torch.float32, name=f"{fast.__name__} loss")
        assert_close(grad, expected_grad, torch.float32, name=f"{fast.__name__} gradient")
