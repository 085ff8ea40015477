import copy

import pytest
import torch

import fastcm.nn
from fastcm.reference.losses import scm_loss as ref_scm_loss
from fastcm.schedules import trigflow_sample_t
from fastcm.training import SCMStep
from helpers import DEVICE


def _dit():
    model = fastcm.nn.DiT(input_size=4, patch_size=2, in_channels=2, dim=16, depth=1, heads=2, num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.abs().sum():
                p.normal_(std=0.1)  # undo the zero initialisation so that every branch has a gradient
    return model.to(DEVICE, torch.float64)


class _NoExplicitTangent(torch.nn.Module):
    """The same network without forward_with_tangent: the step falls back to torch.func.jvp."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, x, t, y=None):
        return self.inner(x, t, y)


@pytest.mark.parametrize("explicit", [True, False])
def test_step_matches_the_algorithm_written_out(backend, explicit):
    model = _dit()
    expected_model = copy.deepcopy(model)
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64, device=DEVICE)
    y = torch.tensor([0, 2, 3], device=DEVICE)
    calls = []
    network = model if explicit else _NoExplicitTangent(model)
    step = SCMStep(
        network,
        torch.optim.SGD(network.parameters(), lr=0.1),
        warmup_steps=4,
        ema_update=calls.append,
        generator=torch.Generator(DEVICE).manual_seed(7),
    )
    losses = [step(x0, y) for _ in range(2)]
    assert calls == [network, network] and step.step_count == 2
    backend("reference")
    replay = torch.Generator(DEVICE).manual_seed(7)  # the same draws of t and z, in the same order
    expected_losses = [_reference_step(expected_model, x0, y, replay, r) for r in (0.0, 0.25)]
    for actual, want in zip(losses, expected_losses):
        torch.testing.assert_close(actual, want, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), expected_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=f"parameter {name}")


def _reference_step(model, x0, y, generator, r, sigma_data=0.5, lr=0.1):
    """Alg. 1 of sCM written out: torch.func.jvp on the reference backend, the reference loss, SGD.
    t ~ arctan(e^τ/σd), τ ~ N(−1, 1.4²) and z are drawn from `generator` on its device, in float64."""
    t = trigflow_sample_t(x0.shape[0], sigma_data=sigma_data, generator=generator, device=DEVICE, dtype=x0.dtype)
    z = torch.randn(x0.shape, generator=generator, device=DEVICE, dtype=x0.dtype) * sigma_data
    tv = t.view(-1, 1, 1, 1)
    x_t = torch.cos(tv) * x0 + torch.sin(tv) * z
    dx_dt = torch.cos(tv) * z - torch.sin(tv) * x0
    with torch.no_grad():
        F_minus, F_jvp = torch.func.jvp(
            lambda a, s: model(a, s, y),
            (x_t / sigma_data, t),
            (torch.cos(tv) * torch.sin(tv) * dx_dt / sigma_data, torch.cos(t) * torch.sin(t)),
        )
    loss = ref_scm_loss(model(x_t / sigma_data, t, y), F_minus, F_jvp, x_t, dx_dt, t, sigma_data=sigma_data, r=r)
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    return loss.detach()


def test_logvar_weight_is_trained():
    model = _dit()
    logvar = torch.nn.Linear(1, 1).to(DEVICE, torch.float64)
    params = list(model.parameters()) + list(logvar.parameters())
    step = SCMStep(
        model, torch.optim.SGD(params, lr=0.1), warmup_steps=0, logvar=lambda t: logvar(t.double()[:, None])[:, 0]
    )
    before = logvar.weight.detach().clone()
    loss = step(torch.randn(2, 2, 4, 4, dtype=torch.float64, device=DEVICE))
    assert torch.isfinite(loss) and not torch.equal(logvar.weight, before)


def test_bad_arguments():
    model = _dit()
    with pytest.raises(ValueError, match="sigma_data must be > 0"):
        SCMStep(model, torch.optim.SGD(model.parameters(), lr=0.1), sigma_data=0.0)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0"):
        SCMStep(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=-1)
