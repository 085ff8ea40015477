import math

import pytest
import torch

import fastcm
from helpers import DEVICE, randn, to64


def _linear(weight, bias):
    def f(x, t):
        return x @ weight + t.reshape(-1, 1) * bias

    return f


@pytest.mark.parametrize("scheme", ["central", "forward", "backward"])
def test_fd_tangent_of_a_linear_function_is_exact(scheme):
    weight, bias = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x, dx = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    got = fastcm.fd_tangent(
        _linear(weight, bias), x, torch.tensor([0.2, 0.7, 1.3], dtype=torch.float64), dx, eps=0.1, scheme=scheme
    )
    torch.testing.assert_close(got, dx @ weight + bias, rtol=1e-12, atol=1e-12)


def test_fd_tangent_calls_f_once_with_one_sided_steps_at_the_boundaries():
    calls = []

    def f(x, t):
        calls.append(t.clone())
        return torch.sin(t).reshape(-1, 1) * x

    x, dx = torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 0.7, math.pi / 2], dtype=torch.float64)
    got = fastcm.fd_tangent(f, x, t, dx, eps=1e-5, t_min=0.0, t_max=math.pi / 2)
    assert len(calls) == 1 and calls[0].shape == (6,)
    assert (calls[0] >= 0).all() and (calls[0] <= math.pi / 2).all()
    torch.testing.assert_close(got, torch.cos(t).reshape(-1, 1).expand(3, 2), rtol=0, atol=1e-4)


def test_fd_tangent_matches_the_jvp_of_a_smooth_network(backend):
    backend("triton")
    weight = randn(7, 7) * 0.3

    def f(x, t):
        return torch.tanh(x @ weight) * torch.cos(t).reshape(-1, 1)

    x, dx, t = randn(4, 7), randn(4, 7), torch.rand(4, device=DEVICE) + 0.2
    with torch.no_grad():
        got = fastcm.fd_tangent(f, x, t, dx, eps=1e-3)
    _, want = torch.func.jvp(
        lambda a, s: torch.tanh(a @ to64(weight)) * torch.cos(s).reshape(-1, 1),
        (to64(x), to64(t)),
        (to64(dx), torch.ones(4, dtype=torch.float64)),
    )
    assert (got.double().cpu() - want).abs().max() < 1e-4


def test_check_jvp_accepts_a_correct_rule_and_flags_a_wrong_one():
    class WrongJvp(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.sin()

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_forward(inputs[0])

        @staticmethod
        def jvp(ctx, x_t):
            (x,) = ctx.saved_tensors
            return x.sin() * x_t  # the rule should use cos

    x, dx = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    good = fastcm.check_jvp(lambda a: (a.sin(), a * a), (x,), (dx,), eps=1e-4)
    assert len(good) == 2 and max(good) < 1e-7
    bad = fastcm.check_jvp(WrongJvp.apply, (x,), (dx,), eps=1e-4)
    assert bad[0] > 0.1


def test_check_jvp_on_fastcm_precondition(backend):
    backend("triton")
    x, f, dx, df = (randn(2, 33, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0.3, 1.1], dtype=torch.float64, device=DEVICE)
    dt = torch.tensor([1.0, -0.5], dtype=torch.float64, device=DEVICE)
    errors = fastcm.check_jvp(
        lambda a, b, s: fastcm.precondition(a, b, s, param="trigflow"), (x, f, t), (dx, df, dt), eps=1e-5
    )
    assert errors[0] < 1e-8


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: fastcm.fd_tangent(lambda x, t: x, torch.randn(2, 3), 0.5, torch.randn(2, 3), scheme="five"),
            ValueError,
            r"scheme='five' is not supported",
        ),
        (
            lambda: fastcm.fd_tangent(lambda x, t: x, torch.randn(2, 3), 0.5, torch.randn(2, 3), eps=0.0),
            ValueError,
            r"eps=0.0 is not supported",
        ),
        (
            lambda: fastcm.fd_tangent(lambda x, t: x[:2], torch.randn(2, 3), 0.5, torch.randn(2, 3)),
            ValueError,
            r"f must return a tensor with 2B = 4 samples",
        ),
        (lambda: fastcm.check_jvp(torch.sin, (torch.randn(2),), ()), ValueError, r"1 primals but 0 tangents"),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
