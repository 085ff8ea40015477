"""fastcm.nn.DiTBlock / DiT against a plain-PyTorch adaLN-Zero block and against themselves on
the reference backend; the dispatch-count and host-time goals of the tangent passes."""

import statistics
import time

import pytest
import torch

import fastcm.nn
from benchmarks.bench_blocks import PlainDiTBlock, block_inputs, matching_blocks, plain_jvp
from fastcm.testing import AtenOpCounter, count_aten_ops
from helpers import DEVICE, assert_close

TINY = dict(batch=2, tokens=16, dim=64, heads=4)


def _jvp(module, args, tangents):
    return torch.func.jvp(module, args, tangents)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_matches_plain_pytorch_block(dtype):
    plain, fused = matching_blocks(32, 4, DEVICE, dtype)
    x, c, x_t, c_t = block_inputs(2, 6, 32, DEVICE, dtype)
    assert_close(fused(x, c), plain(x, c), dtype, name="forward")
    with torch.no_grad():
        expected, expected_t = plain_jvp(plain, x, c, x_t, c_t)
        y, y_t = _jvp(fused, (x, c), (x_t, c_t))
        explicit, explicit_t = fused.forward_with_tangent(x, c, x_t, c_t)
        _, const_c_t = fused.forward_with_tangent(x, c, x_t)
        _, expected_const_t = plain_jvp(plain, x, c, x_t, torch.zeros_like(c))
    assert_close(y, expected, dtype, name="jvp primal")
    assert_close(y_t, expected_t, dtype, name="func.jvp tangent")
    assert_close(explicit, expected, dtype, name="explicit primal")
    assert_close(explicit_t, expected_t, dtype, name="explicit tangent")
    assert_close(const_c_t, expected_const_t, dtype, name="tangent with constant c")
    with torch.autograd.forward_ad.dual_level():
        dual = fused(torch.autograd.forward_ad.make_dual(x, x_t), torch.autograd.forward_ad.make_dual(c, c_t))
        assert_close(torch.autograd.forward_ad.unpack_dual(dual).tangent, expected_t, dtype, name="dual tangent")


def test_block_gradients_match_plain_pytorch_block():
    plain, fused = matching_blocks(32, 4, DEVICE, torch.float64)
    x, c, _, _ = block_inputs(2, 6, 32, DEVICE, torch.float64)
    grad = torch.randn_like(x)
    xs = [t.clone().requires_grad_() for t in (x, c)]
    fused_grads = torch.autograd.grad(fused(*xs), xs + [fused.modulation.weight, fused.fc1.weight], grad)
    ys = [t.clone().requires_grad_() for t in (x, c)]
    plain_grads = torch.autograd.grad(plain(*ys), ys + [plain.adaLN_modulation[1].weight, plain.fc1.weight], grad)
    for name, actual, want in zip(("x", "c", "modulation", "fc1"), fused_grads, plain_grads):
        assert_close(actual, want, torch.float64, name=f"grad {name}")


def _dit(dtype):
    model = fastcm.nn.DiT(input_size=8, patch_size=2, in_channels=3, dim=32, depth=2, heads=4, num_classes=5)
    with torch.no_grad():  # leave the adaLN-Zero initialisation, so every branch contributes
        for block in model.blocks:
            block.modulation.weight.normal_(std=0.1)
        model.final_modulation.weight.normal_(std=0.1)
        model.final_linear.weight.normal_(std=0.1)
    return model.to(DEVICE, dtype)


def test_dit_tangents_match_the_reference_backend(backend):
    model = _dit(torch.float64)
    x, x_t = (
        torch.randn(2, 3, 8, 8, dtype=torch.float64, device=DEVICE),
        torch.randn(2, 3, 8, 8, dtype=torch.float64, device=DEVICE),
    )
    t, t_t = torch.rand(2, dtype=torch.float64, device=DEVICE), torch.randn(2, dtype=torch.float64, device=DEVICE)
    y = torch.tensor([1, 5], device=DEVICE)
    with torch.no_grad():
        out = model(x, t, y)
        out_jvp, out_t = torch.func.jvp(lambda a, s: model(a, s, y), (x, t), (x_t, t_t))
        explicit, explicit_t = model.forward_with_tangent(x, t, x_t, t_t, y)
        backend("reference")
        expected, expected_t = torch.func.jvp(lambda a, s: model(a, s, y), (x, t), (x_t, t_t))
    assert out.shape == x.shape
    for actual, want, name in (
        (out, expected, "forward"),
        (out_jvp, expected, "jvp primal"),
        (explicit, expected, "explicit"),
        (out_t, expected_t, "func.jvp tangent"),
        (explicit_t, expected_t, "explicit tangent"),
    ):
        assert_close(actual, want, torch.float64, name=name)
    leaf = x.clone().requires_grad_()
    (grad_x,) = torch.autograd.grad(model(leaf, t, y).sum(), leaf)
    backend("auto")
    assert torch.isfinite(grad_x).all() and grad_x.abs().sum() > 0


def test_dit_explicit_tangent_matches_finite_differences():
    model = _dit(torch.float64)
    x, x_t = (
        torch.randn(2, 3, 8, 8, dtype=torch.float64, device=DEVICE),
        torch.randn(2, 3, 8, 8, dtype=torch.float64, device=DEVICE),
    )
    t, t_t = torch.rand(2, dtype=torch.float64, device=DEVICE), torch.randn(2, dtype=torch.float64, device=DEVICE)
    eps = 1e-6
    with torch.no_grad():
        _, tangent = model.forward_with_tangent(x, t, x_t, t_t)
        central = (model(x + eps * x_t, t + eps * t_t) - model(x - eps * x_t, t - eps * t_t)) / (2 * eps)
    torch.testing.assert_close(tangent, central, rtol=1e-6, atol=1e-7)


# ---- host-overhead goals (CPU: the ops CPU tensors take under FASTCM_BACKEND=auto) ----------------

cpu_only = pytest.mark.skipif(DEVICE != "cpu", reason="host-overhead goals are measured on CPU tensors")


def _tiny():
    plain, fused = matching_blocks(TINY["dim"], TINY["heads"])
    return plain, fused, block_inputs(TINY["batch"], TINY["tokens"], TINY["dim"])


def test_count_aten_ops_counts_dispatches():
    x = torch.ones(3)
    result, count = count_aten_ops(lambda a: (a + 1) * 2, x)
    assert count == 2 and torch.equal(result, torch.full((3,), 4.0))
    with AtenOpCounter() as counter:
        torch.func.jvp(torch.sin, (x,), (x,))
    assert counter.ops["aten.sin"] >= 1 and counter.ops["aten.cos"] >= 1


@cpu_only
def test_dispatch_count_goals():
    plain, fused, (x, c, x_t, c_t) = _tiny()
    with torch.no_grad():
        _, plain_forward = count_aten_ops(plain, x, c)
        _, explicit = count_aten_ops(fused.forward_with_tangent, x, c, x_t, c_t)
        _, plain_tangent = count_aten_ops(plain_jvp, plain, x, c, x_t, c_t)
        _, fused_jvp = count_aten_ops(_jvp, fused, (x, c), (x_t, c_t))
    assert explicit <= 1.5 * plain_forward, (explicit, plain_forward)
    assert fused_jvp <= plain_tangent / 3, (fused_jvp, plain_tangent)


def _interleaved_medians(calls, reps=150):
    """Median host ms of each call, the calls interleaved so that machine load hits them alike."""
    samples = [[] for _ in calls]
    for _ in range(10):
        for call in calls:
            call()
    for _ in range(reps):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            samples[i].append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


@pytest.fixture
def one_thread():
    """Host time is the goal: one intra-op thread, so that a loaded machine's thread hand-offs
    (which stall multi-threaded ATen kernels) do not swamp it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@cpu_only
def test_host_time_goals(one_thread):
    plain, fused, (x, c, x_t, c_t) = _tiny()
    with torch.no_grad():
        plain_forward, explicit, plain_tangent, fused_jvp = _interleaved_medians(
            [
                lambda: plain(x, c),
                lambda: fused.forward_with_tangent(x, c, x_t, c_t),
                lambda: plain_jvp(plain, x, c, x_t, c_t),
                lambda: _jvp(fused, (x, c), (x_t, c_t)),
            ]
        )
    # Goals: torch.func.jvp of the block at most half the plain block's, and the explicit tangent
    # pass at most 2x a plain forward. The second is not met on this CPU (1.7-2.7x measured: the
    # C++ attention tangent kernel alone takes ~50 µs against SDPA's ~10 µs here, and the tangent
    # doubles the linears): the bound below is a regression guard, not the goal.
    assert fused_jvp <= plain_tangent / 2, (fused_jvp, plain_tangent)
    assert explicit <= 4 * plain_forward, (explicit, plain_forward)


def test_plain_block_is_the_standard_dit_block():
    """The comparison block is DiT's: zeroing the modulation gives x back (adaLN-Zero gates)."""
    block = PlainDiTBlock(16, 2)
    torch.nn.init.zeros_(block.adaLN_modulation[1].weight)
    torch.nn.init.zeros_(block.adaLN_modulation[1].bias)
    block = block.to(DEVICE)
    x, c = torch.randn(2, 3, 16, device=DEVICE), torch.randn(2, 16, device=DEVICE)
    assert torch.equal(block(x, c), x)
    fused = fastcm.nn.DiTBlock(16, 2).to(DEVICE)  # zero-initialised modulation
    assert torch.equal(fused(x, c), x)
