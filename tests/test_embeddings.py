import math

import pytest
import torch

import fastcm.embeddings as embeddings
from fastcm.reference import embeddings as ref
from helpers import DEVICE, FAST_DTYPES, assert_close, poisoned_empty, randn, to64

DTYPES = FAST_DTYPES + (torch.float64,)
PATHS = ["triton", "auto"] if DEVICE == "cpu" else ["triton"]


# ---- the reference against closed forms -------------------------------------------------------


def test_rope_tables_closed_form_2d():
    positions = ref.grid_positions(2, 3)
    assert positions.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    cos, sin = ref.rope_tables(positions.double(), 8, base=100.0)
    # head_dim 8: 4 pairs, 2 per axis, frequencies 100^(-0/2), 100^(-1/2) = 1, 0.1
    expected = [[p[0] * 1.0, p[0] * 0.1, p[1] * 1.0, p[1] * 0.1] for p in positions.tolist()]
    torch.testing.assert_close(cos, torch.cos(torch.tensor(expected, dtype=torch.float64)), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(sin, torch.sin(torch.tensor(expected, dtype=torch.float64)), rtol=1e-14, atol=1e-14)


def test_rope_reference_rotates_pairs_and_preserves_norms():
    q, k = torch.randn(1, 2, 6, 8, dtype=torch.float64), torch.randn(1, 1, 6, 8, dtype=torch.float64)
    cos, sin = ref.rope_tables(ref.grid_positions(6).double(), 8)
    q_rot, k_rot = ref.rope(q, k, cos, sin)
    angle = math.atan2(sin[3, 1].item(), cos[3, 1].item())
    x1, x2 = q[0, 1, 3, 1].item(), q[0, 1, 3, 5].item()
    assert q_rot[0, 1, 3, 1].item() == pytest.approx(x1 * math.cos(angle) - x2 * math.sin(angle), rel=1e-12)
    assert q_rot[0, 1, 3, 5].item() == pytest.approx(x2 * math.cos(angle) + x1 * math.sin(angle), rel=1e-12)
    torch.testing.assert_close(k_rot.norm(dim=-1), k.norm(dim=-1), rtol=1e-13, atol=1e-13)
    # relative positions: <rope(q)_i, rope(k)_j> depends on i − j only (1-D positions)
    scores = q_rot[0, 0] @ k_rot[0, 0].T
    shifted_cos, shifted_sin = ref.rope_tables(ref.grid_positions(6).double() + 5.0, 8)
    q_s, k_s = ref.rope(q, k, shifted_cos, shifted_sin)
    torch.testing.assert_close(q_s[0, 0] @ k_s[0, 0].T, scores, rtol=1e-12, atol=1e-12)


def test_timestep_embedding_reference_closed_form():
    t = torch.tensor([0.0, 0.3, 2.5], dtype=torch.float64)
    emb = ref.timestep_embedding(t, 7, max_period=50.0)
    freqs = [50.0 ** (-j / 3) for j in range(3)]
    expected = [[math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs] + [0.0] for s in t.tolist()]
    torch.testing.assert_close(emb, torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=1e-14)


def test_closed_forms_match_autodiff():
    t, t_t = torch.rand(4, dtype=torch.float64) * 3, torch.randn(4, dtype=torch.float64)
    for dim in (6, 7):
        y, y_t = torch.func.jvp(lambda s: ref.timestep_embedding(s, dim), (t,), (t_t,))
        closed_y, closed_t = ref.timestep_embedding_closed(t, t_t, dim, 10000.0, True, True)
        torch.testing.assert_close(closed_y, y, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(closed_t, y_t, rtol=1e-12, atol=1e-12)
        grad, leaf = torch.randn_like(y), t.clone().requires_grad_()
        torch.testing.assert_close(
            ref.timestep_embedding_backward(grad, t, dim, 10000.0),
            torch.autograd.grad(ref.timestep_embedding(leaf, dim), leaf, grad)[0],
            rtol=1e-12,
            atol=1e-12,
        )


# ---- fast paths against the reference ------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(2, 3, 6, 8), (1, 2, 19, 20)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_forward_jvp_backward(backend, path, shape, dtype):
    backend(path)
    batch, heads, tokens, head_dim = shape
    q = randn(*shape, dtype=dtype, requires_grad=True)
    k = randn(batch, 1, tokens, head_dim, dtype=dtype, requires_grad=True)
    q_t, k_t = randn(*q.shape, dtype=dtype), randn(*k.shape, dtype=dtype)
    cos, sin = ref.rope_tables(ref.grid_positions(tokens).to(DEVICE), head_dim)
    q64, k64, cos64, sin64 = to64(q), to64(k), to64(cos), to64(sin)
    (eq, ek), (eq_t, ek_t) = torch.func.jvp(
        lambda a, b: ref.rope(a, b, cos64, sin64), (q64.detach(), k64.detach()), (to64(q_t), to64(k_t))
    )
    with poisoned_empty():
        q_out, k_out = embeddings.rope(q, k, cos, sin)
        _, (jq_t, jk_t) = torch.func.jvp(
            lambda a, b: embeddings.rope(a, b, cos, sin), (q.detach(), k.detach()), (q_t, k_t)
        )
        xq, xk, xq_t, xk_t = embeddings.rope_jvp(q, k, q_t, k_t, cos, sin)
        grad_q, grad_k = randn(*q.shape, dtype=dtype), randn(*k.shape, dtype=dtype)
        grads = torch.autograd.grad((q_out, k_out), (q, k), (grad_q, grad_k))
    for actual, want, name in (
        (q_out, eq, "q"),
        (k_out, ek, "k"),
        (xq, eq, "explicit q"),
        (xk, ek, "explicit k"),
        (jq_t, eq_t, "q tangent"),
        (jk_t, ek_t, "k tangent"),
        (xq_t, eq_t, "explicit q_t"),
        (xk_t, ek_t, "explicit k_t"),
    ):
        assert actual.dtype == dtype
        assert_close(actual, want, dtype, name=name)
    expected_grads = torch.autograd.grad(ref.rope(q64, k64, cos64, sin64), (q64, k64), (to64(grad_q), to64(grad_k)))
    for actual, want, name in zip(grads, expected_grads, ("grad q", "grad k")):
        assert_close(actual, want, dtype, name=name)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dim", [16, 33])
@pytest.mark.parametrize("dtype", DTYPES)
def test_timestep_embedding_forward_jvp_backward(backend, path, dim, dtype):
    backend(path)
    t = (torch.rand(5, dtype=torch.float64) * 1.5).to(DEVICE, dtype).requires_grad_()
    t_t = randn(5, dtype=dtype)
    t64 = to64(t)
    expected, expected_t = torch.func.jvp(lambda s: ref.timestep_embedding(s, dim), (t64.detach(),), (to64(t_t),))
    with poisoned_empty():
        emb = embeddings.timestep_embedding(t, dim)
        _, jvp_t = torch.func.jvp(lambda s: embeddings.timestep_embedding(s, dim), (t.detach(),), (t_t,))
        explicit, explicit_t = embeddings.timestep_embedding_jvp(t, t_t, dim)
        grad = randn(5, dim, dtype=torch.float32 if dtype != torch.float64 else dtype)
        (grad_t,) = torch.autograd.grad(emb, t, grad)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert emb.dtype == compute and explicit_t.dtype == compute  # float32 whatever t's dtype
    for actual, want, name in (
        (emb, expected, "embedding"),
        (explicit, expected, "explicit"),
        (jvp_t, expected_t, "tangent"),
        (explicit_t, expected_t, "explicit tangent"),
    ):
        assert_close(actual, want, compute, name=name)
    (want_grad,) = torch.autograd.grad(ref.timestep_embedding(t64, dim), t64, to64(grad))
    assert grad_t.dtype == dtype
    assert_close(grad_t, want_grad, dtype, name="grad t")


def test_errors_name_the_argument():
    q, cos = torch.ones(1, 2, 4, 8), torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"q must be \(B, H, N, d\) with an even d"):
        embeddings.rope(q[..., :7], q[..., :7], cos, cos)
    with pytest.raises(ValueError, match=r"cos must have shape \(N, d/2\) = \(4, 4\)"):
        embeddings.rope(q, q, cos[:3], cos)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        embeddings.timestep_embedding(torch.ones(3), 0)
    with pytest.raises(ValueError, match=r"t must be \(B,\) times"):
        embeddings.timestep_embedding(torch.ones(3, 1), 4)
    with pytest.raises(ValueError, match="head_dim=6 must be divisible by 2·axes = 4"):
        embeddings.rope_tables(ref.grid_positions(2, 2), 6)
