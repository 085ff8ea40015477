import pytest
import torch

from fastcm.dmd import denoising_loss, dmd_loss
from fastcm.reference import dmd as ref
from helpers import DEVICE, FAST_DTYPES, assert_close, poisoned_empty, randn, to64


def test_reference_dmd_gradient_is_the_normalised_score_difference():
    """∂loss/∂x_b = w_b·(D_fake − D_real)/(mean|x_b − D_real|·D·B) (mean reduction), written out by hand."""
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    real, fake = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    weight = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(ref.dmd_loss(x, real, fake, weight=weight), x)
    for b in range(3):
        normaliser = (x[b].detach() - real[b]).abs().mean()
        want = weight[b] * (fake[b] - real[b]) / normaliser / 20 / 3
        torch.testing.assert_close(grad[b], want, rtol=1e-13, atol=1e-15)


def test_reference_dmd_value():
    x, real, fake = (torch.randn(2, 7, dtype=torch.float64) for _ in range(3))
    per_sample = ref.dmd_loss(x, real, fake, reduction="none")
    g = (fake - real) / (x - real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(per_sample, 0.5 * g.square().mean(1), rtol=1e-13, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", FAST_DTYPES)
@pytest.mark.parametrize("shape", [(1, 5), (3, 4, 9), (2, 2100)])
def test_dmd_kernel_matches_reference(backend, reduction, dtype, shape):
    backend("triton")
    x = randn(*shape, dtype=dtype, requires_grad=True)
    real, fake = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    weight = (torch.rand(shape[0], dtype=torch.float64) + 0.5).to(device=DEVICE, dtype=torch.float32).requires_grad_()
    with poisoned_empty():
        loss = dmd_loss(x, real, fake, weight=weight, reduction=reduction)
        upstream = (
            torch.ones_like(loss)
            if reduction != "none"
            else torch.arange(1.0, shape[0] + 1, device=DEVICE).to(loss.dtype)
        )
        grads = torch.autograd.grad(loss, (x, weight), upstream)
    x64, w64 = to64(x), to64(weight)
    want = ref.dmd_loss(x64, to64(real), to64(fake), weight=w64, reduction=reduction)
    want_grads = torch.autograd.grad(want, (x64, w64), to64(upstream))
    assert loss.dtype == dtype
    assert_close(loss, want, dtype)
    assert_close(grads[0], want_grads[0], dtype, name="grad x")
    assert_close(grads[1], want_grads[1], dtype, name="grad weight")


def test_dmd_double_backward_matches_reference(backend):
    backend("triton")
    x, real, fake = randn(2, 9, requires_grad=True), randn(2, 9), randn(2, 9)
    weight = torch.tensor([0.5, 1.5], device=DEVICE, requires_grad=True)
    (g,) = torch.autograd.grad(dmd_loss(x, real, fake, weight=weight), x, create_graph=True)
    (got,) = torch.autograd.grad(g.square().sum(), weight)
    x64, w64 = to64(x), to64(weight)
    (g64,) = torch.autograd.grad(ref.dmd_loss(x64, to64(real), to64(fake), weight=w64), x64, create_graph=True)
    (want,) = torch.autograd.grad(g64.square().sum(), w64)
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize(
    "schedule, prediction", [("flow", "flow"), ("trigflow", "trigflow"), ("vp", "eps"), ("edm", "x0")]
)
@pytest.mark.parametrize("dtype", FAST_DTYPES)
def test_denoising_loss_kernel_matches_reference(backend, schedule, prediction, dtype):
    backend("triton")
    net_out = randn(3, 2, 13, dtype=dtype, requires_grad=True)
    x0, noise = randn(3, 2, 13, dtype=dtype), randn(3, 2, 13, dtype=dtype)
    time = torch.tensor([0.2, 0.5, 0.8], device=DEVICE)
    weight = torch.tensor([1.0, 2.0, 0.5], device=DEVICE, requires_grad=True)
    kwargs = dict(schedule=schedule, prediction=prediction, reduction="sum")
    with poisoned_empty():
        loss = denoising_loss(net_out, x0, noise, time, weight=weight, **kwargs)
        grads = torch.autograd.grad(loss, (net_out, weight))
    out64, w64 = to64(net_out), to64(weight)
    want = ref.denoising_loss(out64, to64(x0), to64(noise), to64(time), weight=w64, **kwargs)
    want_grads = torch.autograd.grad(want, (out64, w64))
    assert_close(loss, want, dtype)
    assert_close(grads[0], want_grads[0], dtype, name="grad net_out")
    assert_close(grads[1], want_grads[1], dtype, name="grad weight")


def test_reference_denoising_loss_flow_target_is_velocity():
    net_out, x0, noise = (torch.randn(2, 5, dtype=torch.float64) for _ in range(3))
    loss = ref.denoising_loss(net_out, x0, noise, 0.3, schedule="flow", prediction="flow", reduction="none")
    torch.testing.assert_close(loss, (net_out - (noise - x0)).square().mean(1), rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: dmd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 4)),
            ValueError,
            r"fake_denoised has shape \(2, 4\) but x has shape \(2, 3\)",
        ),
        (
            lambda: dmd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), reduction="max"),
            ValueError,
            r"reduction='max' is not supported",
        ),
        (
            lambda: denoising_loss(
                torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), 0.5, schedule="flow", prediction="score"
            ),
            ValueError,
            r"prediction='score' is not supported",
        ),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
