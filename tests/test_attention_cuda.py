"""The CUDA attention ops (csrc/cuda/) against the float64 reference (fastcm/reference/attention.py).

Calls torch.ops.fastcm.attention_forward / attention_forward_jvp / attention_backward directly on
CUDA tensors, so it tests the extension whatever the public API does on top. Every test is marked
gpu: collected everywhere, run only with FASTCM_TEST_DEVICE=cuda (conftest skips it otherwise).

Accuracy criterion for bf16/fp16 (docs/DESIGN.md): ‖kernel − ref64‖ ≤ 2·‖torch_lowp − ref64‖ per output,
where ref64 is the reference in float64 on the same rounded inputs and torch_lowp is PyTorch's own
math attention (the reference evaluated in bf16/fp16 on the GPU, with torch.func.jvp for tangents).
Norms are Frobenius norms over the finite entries; -inf LSE entries must match exactly.
"""

import math
import random

import pytest
import torch

from fastcm.reference import attention as ref
from helpers import DEVICE, to64

pytestmark = pytest.mark.gpu

LOWP = (torch.bfloat16, torch.float16)
# Shapes: (B, H, Hkv, Nq, Nk, Dqk, Dv). Tails (not multiples of 64), GQA, cross attention,
# D_qk != D_v, head dims 32/64/96/128 and (through padding / slicing) 40, 20, 256.
SHAPES = [
    (1, 2, 2, 128, 128, 64, 64),
    (2, 4, 2, 100, 77, 128, 128),
    (1, 3, 1, 1, 1, 64, 64),
    (2, 2, 2, 65, 130, 32, 32),
    (1, 2, 1, 200, 50, 96, 96),
    (1, 2, 2, 70, 90, 64, 128),
    (1, 2, 2, 70, 90, 128, 64),
    (1, 4, 4, 33, 257, 40, 24),
    (1, 1, 1, 17, 9, 20, 12),
    (1, 2, 2, 64, 80, 64, 256),
]


def _ops():
    from fastcm._extension import extension_ops

    ops = extension_ops()
    if not ops.has_cuda():
        pytest.fail("fastcm._C was built without CUDA kernels (has_cuda() is False) on a GPU machine")
    return ops


def _rand(*shape, dtype, device=DEVICE):
    return torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)


def _poison_allocator(*shapes, dtype):
    """Leave NaN-filled freed blocks of these sizes in the CUDA caching allocator, so outputs the
    ops allocate with at::empty start as NaN and any element the kernel does not write shows up."""
    blocks = [torch.full(s, float("nan"), dtype=dtype, device=DEVICE) for s in shapes]
    blocks += [torch.full(s, float("nan"), dtype=torch.float32, device=DEVICE) for s in shapes]
    torch.cuda.synchronize()
    del blocks


def _err(actual, expected):
    """Frobenius error over the entries where expected is finite, relative to the larger of their
    norm and that of as many entries of magnitude 1: an output that is zero up to rounding (dQ and
    dK with a single key, where dS = P·(dP − δ) cancels exactly in PyTorch's math) has no relative
    error to speak of, and its kernel value is held to float32-level absolute error instead. Inf
    entries must agree."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not torch.isnan(a).any(), "NaN in result (unwritten or invalid element)"
    finite = torch.isfinite(e)
    assert torch.equal(a[~finite], e[~finite]), "non-finite entries (e.g. LSE = -inf) differ"
    diff = (a - e)[finite].norm().item()
    scale = max(e[finite].norm().item(), math.sqrt(finite.sum().item()))
    return diff / max(scale, 1e-30)


def _check_against_torch(name, kernel, torch_lowp, ref64):
    err_k = _err(kernel, ref64)
    err_t = _err(torch_lowp, ref64) if torch_lowp is not None else 0.0
    # 1e-6: float32-level floor for outputs where PyTorch's low-precision path happens to be exact.
    assert err_k <= 2.0 * err_t + 1e-6, f"{name}: kernel error {err_k:.3e} > 2 x torch low-precision error {err_t:.3e}"
    return err_k, err_t


def _inputs(B, H, Hkv, Nq, Nk, Dqk, Dv, dtype):
    q, k, v = _rand(B, H, Nq, Dqk, dtype=dtype), _rand(B, Hkv, Nk, Dqk, dtype=dtype), _rand(B, Hkv, Nk, Dv, dtype=dtype)
    qt, kt, vt = (
        _rand(B, H, Nq, Dqk, dtype=dtype),
        _rand(B, Hkv, Nk, Dqk, dtype=dtype),
        _rand(B, Hkv, Nk, Dv, dtype=dtype),
    )
    return q, k, v, qt, kt, vt


def _run_jvp_and_check(q, k, v, qt, kt, vt, *, causal, scale, bias=None, bias_t=None, check_torch=True):
    ops = _ops()
    B, H, Nq, _ = q.shape
    Dv = v.shape[-1]
    _poison_allocator((B, H, Nq, Dv), (B, H, Nq, Dv), (B, H, Nq), dtype=q.dtype)
    out, out_t, lse, lse_t = ops.attention_forward_jvp(q, k, v, qt, kt, vt, bias, bias_t, scale, causal)
    torch.cuda.synchronize()
    assert out.dtype == q.dtype and out_t.dtype == q.dtype
    assert lse.dtype == torch.float32 and lse_t.dtype == torch.float32
    bias64 = to64(bias) if bias is None or bias.dtype != torch.bool else bias.cpu()
    r_out, r_out_t, r_lse, r_lse_t = ref.attention_jvp(
        to64(q),
        to64(k),
        to64(v),
        to64(qt),
        to64(kt),
        to64(vt),
        scale=scale,
        causal=causal,
        attn_bias=bias64,
        bias_t=to64(bias_t),
        return_lse=True,
    )
    if check_torch:
        t_out, t_out_t, t_lse, t_lse_t = ref.attention_jvp(
            q,
            k,
            v,
            qt,
            kt,
            vt,
            scale=scale,
            causal=causal,
            attn_bias=bias if bias is None or bias.dtype == torch.bool else bias.to(q.dtype),
            bias_t=None if bias_t is None else bias_t.to(q.dtype),
            return_lse=True,
        )
    else:
        t_out = t_out_t = t_lse = t_lse_t = None
    for name, a, t, r in (
        ("out", out, t_out, r_out),
        ("out_t", out_t, t_out_t, r_out_t),
        ("lse", lse, t_lse, r_lse),
        ("lse_t", lse_t, t_lse_t, r_lse_t),
    ):
        _check_against_torch(name, a, t, r)
    return out, out_t, lse, lse_t


def _run_forward_and_check(q, k, v, *, causal, scale):
    """The primal op (poisoned outputs) against the float64 reference; returns PyTorch's
    low-precision (out, lse) and the reference's."""
    ops = _ops()
    B, H, Nq, _ = q.shape
    _poison_allocator((B, H, Nq, v.shape[-1]), (B, H, Nq), dtype=q.dtype)
    out, lse = ops.attention_forward(q, k, v, None, scale, causal)
    r_out, r_lse = ref.attention(to64(q), to64(k), to64(v), scale=scale, causal=causal, return_lse=True)
    t_out, t_lse = ref.attention(q, k, v, scale=scale, causal=causal, return_lse=True)
    _check_against_torch("out", out, t_out, r_out)
    _check_against_torch("lse", lse, t_lse, r_lse)
    return t_out, t_lse, r_out, r_lse


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_jvp_matches_reference(shape, causal, dtype):
    B, H, Hkv, Nq, Nk, Dqk, Dv = shape
    q, k, v, qt, kt, vt = _inputs(*shape, dtype)
    _run_jvp_and_check(q, k, v, qt, kt, vt, causal=causal, scale=Dqk**-0.5)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:6])
def test_forward_matches_reference_and_jvp_primal(shape, causal, dtype):
    ops = _ops()
    B, H, Hkv, Nq, Nk, Dqk, Dv = shape
    q, k, v, qt, kt, vt = _inputs(*shape, dtype)
    scale = 0.7 * Dqk**-0.5
    t_out, t_lse, r_out, r_lse = _run_forward_and_check(q, k, v, causal=causal, scale=scale)
    out_j, _, lse_j, _ = ops.attention_forward_jvp(q, k, v, qt, kt, vt, None, None, scale, causal)
    _check_against_torch("out (jvp kernel)", out_j, t_out, r_out)
    _check_against_torch("lse (jvp kernel)", lse_j, t_lse, r_lse)


@pytest.mark.parametrize("stage", ["scalar", "vector"])
@pytest.mark.parametrize("kernel", ["default", "tma_serial", "cp_async", "sm_80"])
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("kind", ["f32_full", "f32_broadcast", "lowp_full", "bool_mask", "with_tangent"])
def test_bias(kind, dtype, kernel, stage, monkeypatch):
    """Bias tiles in every forward kernel that takes them (on sm_90 at D = 64: the TMA kernel by
    default and without the overlap, each warpgroup staging its rows; the cp.async wgmma one; the
    sm_80 one), with both bias staging modes (FASTCM_ATTN_BIAS_STAGE). Nk = 152: rows of a multiple of
    4 keys, which the vector mode loads 4 keys at a time, the last key tile partly past Nk; Nk = 150
    (the bool mask's): misaligned rows, which it loads by element."""
    _force_kernel(kernel, monkeypatch)
    monkeypatch.setenv("FASTCM_ATTN_BIAS_STAGE", stage)
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, 90, 150 if kind == "bool_mask" else 152, 64
    q, k, v, qt, kt, vt = _inputs(B, H, Hkv, Nq, Nk, D, D, dtype)
    bias_t = None
    if kind == "f32_full":
        bias = _rand(B, H, Nq, Nk, dtype=torch.float32)
    elif kind == "f32_broadcast":
        bias = _rand(1, 1, Nq, Nk, dtype=torch.float32).expand(B, H, Nq, Nk)  # stride-0 view
    elif kind == "lowp_full":
        bias = _rand(B, H, Nq, Nk, dtype=dtype)
    elif kind == "bool_mask":
        bias = torch.rand(B, 1, Nq, Nk, device=DEVICE) > 0.3
    else:
        bias = _rand(B, 1, Nq, Nk, dtype=torch.float32).expand(B, H, Nq, Nk)
        bias_t = _rand(B, H, Nq, Nk, dtype=torch.float32)
    for causal in (False, True):
        _run_jvp_and_check(q, k, v, qt, kt, vt, causal=causal, scale=D**-0.5, bias=bias, bias_t=bias_t)


@pytest.mark.parametrize("dtype", LOWP)
def test_fully_masked_rows(dtype):
    ops = _ops()
    B, H, Nq, Nk, D = 1, 2, 96, 70, 64
    q, k, v, qt, kt, vt = _inputs(B, H, H, Nq, Nk, D, D, dtype)
    bias = torch.zeros(B, H, Nq, Nk, device=DEVICE)
    bias[:, :, 5] = -math.inf  # one row masked by the bias
    bias[:, 1, 60:80] = -math.inf  # a block of rows in one head
    # Causal with Nq > Nk: rows i < Nq - Nk see no key at all.
    for causal in (False, True):
        out, out_t, lse, lse_t = ops.attention_forward_jvp(q, k, v, qt, kt, vt, bias, None, D**-0.5, causal)
        dead = torch.isneginf(bias).all(-1)
        if causal:
            dead = dead | (torch.arange(Nq, device=DEVICE) < Nq - Nk).view(1, 1, Nq)
        assert dead.any()
        assert torch.equal(out[dead], torch.zeros_like(out[dead]))
        assert torch.equal(out_t[dead], torch.zeros_like(out_t[dead]))
        assert torch.isneginf(lse[dead]).all()
        assert torch.equal(lse_t[dead], torch.zeros_like(lse_t[dead]))
        assert torch.isfinite(lse[~dead]).all() and not torch.isnan(out).any() and not torch.isnan(out_t).any()
        _run_jvp_and_check(q, k, v, qt, kt, vt, causal=causal, scale=D**-0.5, bias=bias)
        grad = _rand(B, H, Nq, D, dtype=dtype)
        dq, dk, dv = _run_backward_and_check(q, k, v, grad, causal=causal, scale=D**-0.5, bias=bias)
        assert torch.equal(dq[dead], torch.zeros_like(dq[dead]))


@pytest.mark.parametrize("dtype", LOWP)
def test_noncontiguous_and_strided_inputs(dtype):
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, 77, 99, 64
    # (B, N, H, D) storage viewed as (B, H, N, D): head stride D, row stride H·D.
    q = _rand(B, Nq, H, D, dtype=dtype).transpose(1, 2)
    k = _rand(B, Nk, Hkv, D, dtype=dtype).transpose(1, 2)
    v = _rand(B, Nk, Hkv, D, dtype=dtype).transpose(1, 2)
    qt = _rand(B, Nq, H, D, dtype=dtype).transpose(1, 2)
    kt = _rand(B, Hkv, Nk, D, dtype=dtype)
    vt = _rand(B, Hkv, Nk, 2 * D, dtype=dtype)[..., :D]  # row stride 2D
    # Last dim not contiguous: the op must copy it.
    v_bad = _rand(B, Hkv, D, Nk, dtype=dtype).transpose(-1, -2)
    assert not q.is_contiguous() and not vt.is_contiguous() and v_bad.stride(-1) != 1
    for causal in (False, True):
        _run_jvp_and_check(q, k, v, qt, kt, vt, causal=causal, scale=D**-0.5)
        _run_jvp_and_check(q, k, v_bad, qt, kt, vt, causal=causal, scale=D**-0.5)


@pytest.mark.parametrize("dtype", LOWP)
def test_random_shapes(dtype):
    rng = random.Random(1234)
    for _ in range(25):
        Hkv = rng.choice([1, 2, 3])
        H = Hkv * rng.choice([1, 2, 4])
        Dqk = rng.choice([8, 16, 32, 48, 64, 72, 96, 128])
        Dv = rng.choice([Dqk, Dqk, 8, 64, 128, 160])
        shape = (rng.choice([1, 2, 3]), H, Hkv, rng.randint(1, 300), rng.randint(1, 300), Dqk, Dv)
        q, k, v, qt, kt, vt = _inputs(*shape, dtype)
        causal = rng.random() < 0.5
        _run_jvp_and_check(q, k, v, qt, kt, vt, causal=causal, scale=rng.uniform(0.05, 0.3))


@pytest.mark.parametrize("dtype", LOWP)
def test_deterministic(dtype):
    """Same inputs, same bits: a run-to-run difference would point at a race."""
    ops = _ops()
    q, k, v, qt, kt, vt = _inputs(2, 8, 4, 300, 513, 128, 128, dtype)
    first = ops.attention_forward_jvp(q, k, v, qt, kt, vt, None, None, 0.1, True)
    for _ in range(3):
        again = ops.attention_forward_jvp(q, k, v, qt, kt, vt, None, None, 0.1, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# ---- the sm_90a (wgmma) forwards and the choice between the forward kernels ------------------
# On sm_90 devices the forward ops run a wgmma kernel for padded head dims 64 / 128 (every test
# above with such a shape exercises one there): the warp-specialised TMA kernel without a bias
# (with the intra-warpgroup overlap except at d 128 JVP), the cp.async one with bias tiles.
# FASTCM_ATTN_SM90_OVERLAP=0 selects the TMA kernel without the overlap, FASTCM_ATTN_SM90_QREGS=0
# the TMA kernel reading Q from shared memory at d 64 (default: Q in registers there),
# FASTCM_ATTN_SM90_TMA=0 the cp.async kernel for every call, FASTCM_ATTN_SM90=0 the sm_80 kernel.


def _hopper():
    return torch.cuda.get_device_capability()[0] == 9


# kernel -> the switch that forces it (None: the default choice)
KERNEL_SWITCH = {
    "default": None,
    "tma_serial": "FASTCM_ATTN_SM90_OVERLAP",
    "tma_smem_q": "FASTCM_ATTN_SM90_QREGS",
    "cp_async": "FASTCM_ATTN_SM90_TMA",
    "sm_80": "FASTCM_ATTN_SM90",
}
SWITCHES = ("FASTCM_ATTN_SM90", "FASTCM_ATTN_SM90_TMA", "FASTCM_ATTN_SM90_OVERLAP", "FASTCM_ATTN_SM90_QREGS")


def _sm90_name(kernel, kd, jvp, dqk=None, dv=None):
    """The name attention_forward_kernels gives a no-bias launch of padded head dim kd ∈ {64, 128}
    under `kernel`'s switch, on an sm_90 device. dqk, dv: the head dims where they differ; the TMA
    kernels take no call whose Q/K or V leaves a 64-column panel without data (cp.async does)."""
    empty_panel = dqk is not None and min(-(-dqk // 8), -(-dv // 8)) * 8 <= kd - 64
    if kernel == "sm_80" or kernel == "cp_async" or empty_panel:
        return "sm_80" if kernel == "sm_80" else "sm_90a"
    name = "sm_90a_tma" if kernel == "tma_serial" or (kd == 128 and jvp) else "sm_90a_tma_overlap"
    return name + ("_qregs" if kd == 64 and kernel != "tma_smem_q" else "")


def _force_kernel(kernel, monkeypatch):
    for variable in SWITCHES:
        monkeypatch.delenv(variable, raising=False)
    if KERNEL_SWITCH[kernel] is not None:
        monkeypatch.setenv(KERNEL_SWITCH[kernel], "0")


def test_forward_kernel_choice(monkeypatch):
    ops = _ops()
    _force_kernel("default", monkeypatch)
    t = lambda d: _rand(1, 2, 16, d, dtype=torch.bfloat16)  # noqa: E731
    kernels = ops.attention_forward_kernels  # (q, v, jvp, has_bias, has_bias_t)
    hopper = _hopper()
    ovl, tma, tiles = ("sm_90a_tma_overlap", "sm_90a_tma", "sm_90a") if hopper else ("sm_80",) * 3
    qregs = "_qregs" if hopper else ""  # d 64: Q (and Q̇) in registers
    assert kernels(t(64), t(64), True, False, False) == [f"{ovl}{qregs} (64, 64)"]
    assert kernels(t(40), t(24), False, False, False) == [f"{ovl}{qregs} (64, 64)"]
    assert kernels(t(40), t(104), False, False, False) == [f"{tiles} (128, 128)"]  # Q/K's panel 2: no data
    assert kernels(t(72), t(104), False, False, False) == [f"{ovl} (128, 128)"]
    assert kernels(t(128), t(128), True, False, False) == [f"{tma} (128, 128)"]  # no overlap: registers
    assert kernels(t(64), t(200), True, False, False) == [f"{tiles} (128, 128)", "sm_80 (96, 96)"]
    assert kernels(t(128), t(200), True, False, False) == [f"{tma} (128, 128)"] * 2
    assert kernels(t(64), t(64), True, True, True) == [f"{ovl}{qregs} (64, 64)"]  # bias tiles per warpgroup
    assert kernels(t(64), t(64), False, True, False) == [f"{ovl}{qregs} (64, 64)"]
    assert kernels(t(128), t(128), True, True, False) == [f"{tiles} (128, 128)"]
    assert kernels(t(128), t(128), False, True, True) == [f"{tiles} (128, 128)"]  # no bias_t without jvp
    assert kernels(t(128), t(128), False, False, True) == [f"{ovl} (128, 128)"]
    assert kernels(t(128), t(128), True, True, True) == ["sm_80 (128, 128)"]  # 257 KB of smem on sm_90a
    assert kernels(t(32), t(32), False, False, False) == ["sm_80 (32, 32)"]
    assert kernels(t(256), t(128), False, False, False) == ["sm_80 (256, 128)"]
    broadcast = _rand(1, 1, 16, 64, dtype=torch.bfloat16).expand(3, 2, 16, 64)  # stride 0: no tensor map
    assert kernels(broadcast, t(64), True, False, False) == [f"{tiles} (64, 64)"]
    monkeypatch.setenv("FASTCM_ATTN_SM90_OVERLAP", "0")
    assert kernels(t(64), t(64), False, False, False) == [f"{tma}{qregs} (64, 64)"]
    monkeypatch.setenv("FASTCM_ATTN_SM90_QREGS", "0")
    assert kernels(t(64), t(64), True, False, False) == [f"{tma} (64, 64)"]
    monkeypatch.setenv("FASTCM_ATTN_SM90_OVERLAP", "1")
    assert kernels(t(64), t(64), True, False, False) == [f"{ovl} (64, 64)"]
    assert kernels(t(128), t(128), False, False, False) == [f"{ovl} (128, 128)"]
    monkeypatch.setenv("FASTCM_ATTN_SM90_TMA", "0")
    assert kernels(t(64), t(200), True, False, False) == [f"{tiles} (128, 128)", "sm_80 (96, 96)"]
    monkeypatch.setenv("FASTCM_ATTN_SM90", "0")
    assert kernels(t(64), t(200), True, False, False) == ["sm_80 (128, 128)", "sm_80 (96, 96)"]
    for variable in SWITCHES:
        _force_kernel("default", monkeypatch)
        monkeypatch.setenv(variable, "yes")
        with pytest.raises(RuntimeError, match=f"{variable} must be 0 or 1"):
            kernels(t(64), t(64), False, False, False)
        with pytest.raises(RuntimeError, match=f"{variable} must be 0 or 1"):
            ops.attention_forward(t(64), t(64), t(64), None, 0.125, False)


# Shapes the sm_90a kernels take, with many key tiles (BN 64 JVP / 128 primal) and 128-row query tiles.
SHAPES_SM90 = [
    (1, 4, 1, 1000, 1500, 64, 64),
    (1, 2, 2, 777, 2048, 128, 128),
    (2, 3, 3, 129, 127, 64, 48),
    (1, 2, 1, 300, 513, 120, 128),
]


def _padded_head_dim(shape):
    return 64 if max(shape[5], shape[6]) <= 64 else 128


# tma_smem_q differs from the default only at padded d 64.
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "shape,kernel",
    [
        (shape, kernel)
        for shape in SHAPES_SM90 + SHAPES[:2] + SHAPES[5:8]
        for kernel in KERNEL_SWITCH
        if kernel != "tma_smem_q" or _padded_head_dim(shape) == 64
    ],
)
def test_forward_kernels_on_sm90_head_dims(shape, kernel, causal, dtype, monkeypatch):
    """Primal and JVP ops on shapes whose padded head dim is 64 or 128, with each forward kernel (on
    sm_90: TMA with and without the overlap, with Q in registers or shared memory, cp.async,
    sm_80) held to 2x PyTorch's own low-precision error."""
    ops = _ops()
    _force_kernel(kernel, monkeypatch)
    q, k, v, qt, kt, vt = _inputs(*shape, dtype)
    kd = _padded_head_dim(shape)
    for jvp in (False, True):
        expected = _sm90_name(kernel, kd, jvp, shape[5], shape[6]) if _hopper() else "sm_80"
        assert ops.attention_forward_kernels(q, v, jvp, False, False) == [f"{expected} ({kd}, {kd})"]
    scale = 0.9 * shape[5] ** -0.5
    _run_jvp_and_check(q, k, v, qt, kt, vt, causal=causal, scale=scale)
    _run_forward_and_check(q, k, v, causal=causal, scale=scale)


@pytest.mark.parametrize("kernel", list(KERNEL_SWITCH))
@pytest.mark.parametrize("d", [64, 128])
def test_empty_keys(d, kernel, monkeypatch):
    """Nk = 0 on every forward kernel choice: no row sees a key, so O = 0, LSE = −inf, zero
    tangents, and the backward gives dQ = 0 (the TMA kernels cannot map an empty tensor and leave
    the call to a kernel that loops over no key tile)."""
    ops = _ops()
    _force_kernel(kernel, monkeypatch)
    q, k, v, qt, kt, vt = _inputs(1, 2, 1, 70, 0, d, d, torch.bfloat16)
    out, out_t, lse, lse_t = ops.attention_forward_jvp(q, k, v, qt, kt, vt, None, None, d**-0.5, False)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(out_t, torch.zeros_like(out_t))
    assert torch.isneginf(lse).all() and torch.equal(lse_t, torch.zeros_like(lse_t))
    out, lse = ops.attention_forward(q, k, v, None, d**-0.5, True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    dq, dk, dv = ops.attention_backward(
        _rand(1, 2, 70, d, dtype=torch.bfloat16), q, k, v, out, lse, None, d**-0.5, True
    )
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("kernel", list(KERNEL_SWITCH))
@pytest.mark.parametrize("dtype", LOWP)
def test_forward_strided_layouts(dtype, kernel, monkeypatch):
    """Inputs the kernels read in place through their strides: (B, N, H, D) storage viewed as
    (B, H, N, D) (head stride < row stride: the tensor maps' strides), a V slice of a wider
    tensor, and k / v broadcast over the batch (stride 0: the TMA kernel cannot map it, the
    cp.async one takes the call)."""
    _force_kernel(kernel, monkeypatch)
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, 200, 333, 64
    q, qt = (_rand(B, Nq, H, D, dtype=dtype).transpose(1, 2) for _ in range(2))
    k, kt = (_rand(B, Nk, Hkv, D, dtype=dtype).transpose(1, 2) for _ in range(2))
    v, vt = (_rand(B, Hkv, Nk, 2 * D, dtype=dtype)[..., D:] for _ in range(2))
    expected = _sm90_name(kernel, 64, True) if _hopper() else "sm_80"
    assert _ops().attention_forward_kernels(q, v, True, False, False) == [f"{expected} (64, 64)"]
    for causal in (False, True):
        _run_jvp_and_check(q, k, v, qt, kt, vt, causal=causal, scale=D**-0.5)
    k1, v1, kt1, vt1 = (_rand(1, Hkv, Nk, D, dtype=dtype).expand(B, Hkv, Nk, D) for _ in range(4))
    _run_jvp_and_check(q, k1, v1, qt, kt1, vt1, causal=False, scale=D**-0.5)


# ---- D_qk > 128: the decoupled (D_qk, D_v) forward kernels -------------------------------------
# Padded pairs (192 | 256) x (64 | 128), BN 32 (primal) / 16 (JVP); D_v > 128 through 128-column
# slices. (B, H, Hkv, Nq, Nk, Dqk, Dv): D_v 64, 128, 256 and 200 (slices 128 + 72), 40 -> 64,
# D_qk 160 / 184 -> 192, GQA, Nq != Nk both ways, tails of the 16/32-key and 64-row tiles.
SHAPES_DQK256 = [
    (1, 2, 1, 70, 90, 256, 64),
    (2, 4, 2, 100, 77, 256, 128),
    (1, 2, 2, 65, 130, 256, 256),
    (1, 3, 1, 33, 47, 256, 200),
    (1, 2, 2, 64, 80, 192, 128),
    (1, 2, 1, 50, 40, 184, 96),
    (1, 1, 1, 17, 9, 160, 40),
]


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES_DQK256)
def test_dqk256_forward_jvp_matches_reference(shape, causal, dtype):
    q, k, v, qt, kt, vt = _inputs(*shape, dtype)
    _run_jvp_and_check(q, k, v, qt, kt, vt, causal=causal, scale=shape[5] ** -0.5)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES_DQK256)
def test_dqk256_forward_matches_reference(shape, causal, dtype):
    ops = _ops()
    B, H, Hkv, Nq, Nk, Dqk, Dv = shape
    q, k, v, _, _, _ = _inputs(*shape, dtype)
    scale = 0.7 * Dqk**-0.5
    _poison_allocator((B, H, Nq, Dv), (B, H, Nq), dtype=dtype)
    out, lse = ops.attention_forward(q, k, v, None, scale, causal)
    torch.cuda.synchronize()
    r_out, r_lse = ref.attention(to64(q), to64(k), to64(v), scale=scale, causal=causal, return_lse=True)
    t_out, t_lse = ref.attention(q, k, v, scale=scale, causal=causal, return_lse=True)
    _check_against_torch("out", out, t_out, r_out)
    _check_against_torch("lse", lse, t_lse, r_lse)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("kind", ["f32_broadcast", "lowp_full", "with_tangent"])
def test_dqk256_bias_and_masked_rows(kind, dtype):
    """Bias tiles at BN 16/32 (stride-0 and full), bias_t, a row masked by the bias, and causal
    with Nq > Nk (rows that see no key)."""
    B, H, Hkv, Nq, Nk, Dqk, Dv = 2, 4, 2, 90, 70, 256, 128
    q, k, v, qt, kt, vt = _inputs(B, H, Hkv, Nq, Nk, Dqk, Dv, dtype)
    bias_t = None
    if kind == "f32_broadcast":
        bias = _rand(1, 1, Nq, Nk, dtype=torch.float32).expand(B, H, Nq, Nk)  # stride-0 view
    elif kind == "lowp_full":
        bias = _rand(B, H, Nq, Nk, dtype=dtype)
    else:
        bias = _rand(B, 1, Nq, Nk, dtype=torch.float32).expand(B, H, Nq, Nk)
        bias_t = _rand(B, H, Nq, Nk, dtype=torch.float32)
    bias = bias.clone()
    bias[:, :, 5] = -math.inf
    for causal in (False, True):
        _run_jvp_and_check(q, k, v, qt, kt, vt, causal=causal, scale=Dqk**-0.5, bias=bias, bias_t=bias_t)


@pytest.mark.parametrize("dtype", LOWP)
def test_dqk256_noncontiguous_and_deterministic(dtype):
    """(B, N, H, D) storage viewed as (B, H, N, D) at D_qk = 256 (strides passed through), an odd
    D_qk (padded copy); then same inputs, same bits."""
    ops = _ops()
    B, H, Hkv, Nq, Nk, Dqk, Dv = 1, 4, 2, 77, 99, 256, 200
    q = _rand(B, Nq, H, Dqk, dtype=dtype).transpose(1, 2)
    k = _rand(B, Nk, Hkv, Dqk, dtype=dtype).transpose(1, 2)
    v = _rand(B, Nk, Hkv, Dv, dtype=dtype).transpose(1, 2)
    qt, kt = _rand(B, H, Nq, Dqk, dtype=dtype), _rand(B, Hkv, Nk, Dqk, dtype=dtype)
    vt = _rand(B, Hkv, Nk, Dv, dtype=dtype)
    _run_jvp_and_check(q, k, v, qt, kt, vt, causal=True, scale=Dqk**-0.5)
    odd = [t[..., :250] for t in (q, k, qt, kt)]
    _run_jvp_and_check(odd[0], odd[1], v, odd[2], odd[3], vt, causal=False, scale=250**-0.5)
    first = ops.attention_forward_jvp(q, k, v, qt, kt, vt, None, None, 0.06, True)
    for _ in range(2):
        again = ops.attention_forward_jvp(q, k, v, qt, kt, vt, None, None, 0.06, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def _run_backward_and_check(q, k, v, grad, *, causal, scale, bias=None):
    """attention_backward (from the CUDA forward's out and LSE) vs autograd through the reference
    (float64, and PyTorch's own low-precision math)."""
    ops = _ops()
    out, lse = ops.attention_forward(q, k, v, bias, scale, causal)
    _poison_allocator(q.shape, k.shape, v.shape, dtype=q.dtype)
    dq, dk, dv = ops.attention_backward(grad, q, k, v, out, lse, bias, scale, causal)
    torch.cuda.synchronize()
    assert dq.dtype == q.dtype and dk.dtype == q.dtype and dv.dtype == q.dtype
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape

    def grads(q_, k_, v_, g_, b_):
        q_, k_, v_ = (t.detach().requires_grad_(True) for t in (q_, k_, v_))
        o = ref.attention(q_, k_, v_, scale=scale, causal=causal, attn_bias=b_)
        return torch.autograd.grad(o, (q_, k_, v_), g_)

    r = grads(to64(q), to64(k), to64(v), to64(grad), to64(bias))
    t = grads(q, k, v, grad, None if bias is None else bias.to(q.dtype))
    for name, a, tt, rr in zip(("dq", "dk", "dv"), (dq, dk, dv), t, r):
        _check_against_torch(name, a, tt, rr)
    return dq, dk, dv


# Backward shapes (B, H, Hkv, Nq, Nk, Dqk, Dv): every padded head dim of the fused kernels
# (32, 64, 96, 128; 40 and 24 through padding), D_qk != D_v, GQA groups of 1-4, Nq != Nk both
# ways, tails (not multiples of the 64/32-row tiles), one-row heads.
BWD_SHAPES = [
    (2, 4, 2, 100, 77, 64, 64),
    (1, 2, 1, 64, 130, 128, 64),
    (1, 2, 2, 33, 20, 40, 24),
    (2, 2, 2, 65, 130, 32, 32),
    (1, 4, 1, 200, 50, 96, 96),
    (1, 2, 2, 70, 90, 64, 128),
    (1, 3, 3, 1, 1, 64, 64),
    (1, 4, 2, 129, 257, 128, 128),
    (2, 6, 2, 90, 91, 96, 48),
]


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", BWD_SHAPES)
@pytest.mark.parametrize("bias_kind", [None, "f32_broadcast", "lowp_full"])
def test_backward_matches_reference(shape, causal, dtype, bias_kind):
    B, H, Hkv, Nq, Nk, Dqk, Dv = shape
    q, k, v, _, _, _ = _inputs(*shape, dtype)
    if bias_kind == "f32_broadcast":
        bias = _rand(1, 1, Nq, Nk, dtype=torch.float32).expand(B, H, Nq, Nk)  # stride-0 view
    elif bias_kind == "lowp_full":
        bias = _rand(B, H, Nq, Nk, dtype=dtype)
    else:
        bias = None
    grad = _rand(B, H, Nq, Dv, dtype=dtype)
    _run_backward_and_check(q, k, v, grad, causal=causal, scale=Dqk**-0.5, bias=bias)


# ---- the sm_90a (wgmma) backward and the choice between the backward kernels -----------------
# On sm_90 devices a backward with padded head dim 64 or 128 runs the wgmma kernels;
# FASTCM_ATTN_SM90_BWD=0 (or FASTCM_ATTN_SM90=0) sends it to the mma.sync ones.


def test_backward_kernel_choice(monkeypatch):
    ops = _ops()
    for variable in ("FASTCM_ATTN_SM90", "FASTCM_ATTN_SM90_BWD"):
        monkeypatch.delenv(variable, raising=False)
    t = lambda d: _rand(1, 2, 16, d, dtype=torch.bfloat16)  # noqa: E731
    kernels = ops.attention_backward_kernels  # (q, v, has_bias)
    wgmma = "sm_90a" if _hopper() else "sm_80"
    assert kernels(t(64), t(64), False) == [f"{wgmma} (64)"]
    assert kernels(t(40), t(24), False) == [f"{wgmma} (64)"]
    assert kernels(t(104), t(128), False) == [f"{wgmma} (128)"]
    assert kernels(t(64), t(64), True) == [f"{wgmma} (64)"]  # bias tiles staged as in sm_80
    assert kernels(t(96), t(96), False) == ["sm_80 (96)"]
    assert kernels(t(32), t(16), False) == ["sm_80 (32)"]
    assert kernels(t(64), t(256), False) == ["aten"]
    for variable in ("FASTCM_ATTN_SM90_BWD", "FASTCM_ATTN_SM90"):
        monkeypatch.setenv(variable, "0")
        assert kernels(t(64), t(64), False) == ["sm_80 (64)"]
        monkeypatch.setenv(variable, "2")
        with pytest.raises(RuntimeError, match=f"{variable} must be 0 or 1"):
            kernels(t(64), t(64), False)
        monkeypatch.delenv(variable)


# Padded head dims 64 and 128 with many tiles of both kernels (128 owned rows, 64-row tiles),
# GQA, tails, Nq != Nk both ways.
BWD_SHAPES_SM90 = [
    (1, 4, 1, 300, 513, 64, 64),
    (2, 2, 2, 777, 1000, 128, 120),
    (1, 6, 2, 129, 127, 48, 64),
    (1, 2, 1, 1000, 300, 128, 128),
]


@pytest.mark.parametrize("bwd_kernel", ["default", "bwd_sm80"])
@pytest.mark.parametrize("bias_kind", [None, "f32_broadcast"])
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", BWD_SHAPES_SM90 + BWD_SHAPES[:3] + BWD_SHAPES[5:8])
def test_backward_kernels_on_sm90_head_dims(shape, causal, dtype, bias_kind, bwd_kernel, monkeypatch):
    """The backward on each kernel (on sm_90: the wgmma kernels by default, the mma.sync ones with
    FASTCM_ATTN_SM90_BWD=0), without a bias and with a broadcast fp32 one, held to 2x PyTorch's own
    low-precision error."""
    monkeypatch.delenv("FASTCM_ATTN_SM90", raising=False)
    monkeypatch.setenv("FASTCM_ATTN_SM90_BWD", "0" if bwd_kernel == "bwd_sm80" else "1")
    B, H, Hkv, Nq, Nk, Dqk, Dv = shape
    q, k, v, _, _, _ = _inputs(*shape, dtype)
    kd = 64 if max(Dqk, Dv) <= 64 else 128
    expected = "sm_90a" if _hopper() and bwd_kernel == "default" else "sm_80"
    assert _ops().attention_backward_kernels(q, v, bias_kind is not None) == [f"{expected} ({kd})"]
    bias = None if bias_kind is None else _rand(1, 1, Nq, Nk, dtype=torch.float32).expand(B, H, Nq, Nk)
    grad = _rand(B, H, Nq, Dv, dtype=dtype)
    _run_backward_and_check(q, k, v, grad, causal=causal, scale=0.9 * Dqk**-0.5, bias=bias)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("shape", [(1, 2, 1, 70, 90, 64, 256), (1, 2, 2, 50, 40, 192, 64)])
def test_backward_aten_fallback(shape, dtype):
    """Head dims above 128 take the ATen path of attention_backward_cuda (out and LSE from the
    CUDA forward, which covers D_qk up to 256)."""
    B, H, Hkv, Nq, Nk, Dqk, Dv = shape
    q, k, v, _, _, _ = _inputs(*shape, dtype)
    grad = _rand(B, H, Nq, Dv, dtype=dtype)
    bias = _rand(1, H, Nq, Nk, dtype=torch.float32).expand(B, H, Nq, Nk)
    _run_backward_and_check(q, k, v, grad, causal=True, scale=Dqk**-0.5, bias=bias)


@pytest.mark.parametrize("bwd_kernel", ["default", "bwd_sm80"])
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize(
    "shape", [(1, 4, 2, 300, 513, 64, 64), (1, 2, 1, 200, 150, 128, 128), (1, 2, 2, 70, 90, 64, 256)]
)
def test_backward_lse_gradient(shape, dtype, bwd_kernel, monkeypatch):
    """attention_backward with grad_lse (δ = rowsum(dO⊙O) − dLSE in every backward kernel: wgmma,
    mma.sync, ATen for D_v 256) against autograd of (O·dO).sum() + (LSE·dLSE).sum() through the
    float64 reference, held to 2x PyTorch's own low-precision error; the second shape has rows that
    see no key."""
    monkeypatch.setenv("FASTCM_ATTN_SM90_BWD", "0" if bwd_kernel == "bwd_sm80" else "1")
    ops = _ops()
    B, H, Hkv, Nq, Nk, Dqk, Dv = shape
    q, k, v, _, _, _ = _inputs(*shape, dtype)
    grad, grad_lse = _rand(B, H, Nq, Dv, dtype=dtype), _rand(B, H, Nq, dtype=torch.float32)
    scale = Dqk**-0.5
    out, lse = ops.attention_forward(q, k, v, None, scale, True)
    _poison_allocator(q.shape, k.shape, v.shape, dtype=q.dtype)
    got = ops.attention_backward(grad, q, k, v, out, lse, None, scale, True, grad_lse)

    def grads(q_, k_, v_, g_, gl_):
        q_, k_, v_ = (t.detach().requires_grad_(True) for t in (q_, k_, v_))
        o, l = ref.attention(q_, k_, v_, scale=scale, causal=True, return_lse=True)
        # Rows that see no key (causal Nq > Nk) have LSE = −inf and no gradient through it.
        lse_term = torch.where(torch.isfinite(l), l * gl_.to(l.dtype), 0).sum()
        return torch.autograd.grad((o * g_).sum() + lse_term, (q_, k_, v_))

    r = grads(to64(q), to64(k), to64(v), to64(grad), to64(grad_lse))
    t = grads(q, k, v, grad, grad_lse)
    for name, a, tt, rr in zip(("dq", "dk", "dv"), got, t, r):
        _check_against_torch(name, a, tt, rr)


@pytest.mark.parametrize("dtype", LOWP)
def test_backward_deterministic(dtype):
    """The fused backward has no atomics (on sm_90: the wgmma kernels at this head dim): same
    inputs, same bits."""
    ops = _ops()
    q, k, v, _, _, _ = _inputs(2, 8, 2, 300, 513, 128, 96, dtype)
    grad = _rand(2, 8, 300, 96, dtype=dtype)
    out, lse = ops.attention_forward(q, k, v, None, 0.1, True)
    first = ops.attention_backward(grad, q, k, v, out, lse, None, 0.1, True)
    for _ in range(3):
        again = ops.attention_backward(grad, q, k, v, out, lse, None, 0.1, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_bad_input_messages():
    ops = _ops()
    q = _rand(1, 2, 16, 64, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        ops.attention_forward(q, q, q, None, 0.125, False)
    qb = q.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        ops.attention_forward(
            qb, _rand(1, 3, 16, 64, dtype=torch.bfloat16), _rand(1, 3, 16, 64, dtype=torch.bfloat16), None, 0.125, False
        )
    big = _rand(1, 2, 16, 264, dtype=torch.bfloat16)
    msg = r"q.size\(-1\) \(the q/k head dim D_qk\) is 264; the CUDA kernel supports D_qk up to 256"
    with pytest.raises(RuntimeError, match=msg):
        ops.attention_forward(big, big, big, None, 0.1, False)
    with pytest.raises(RuntimeError, match="supports D_qk up to 256"):
        ops.attention_forward_jvp(big, big, big, big, big, big, None, None, 0.1, False)
    with pytest.raises(RuntimeError, match="match its primal"):
        ops.attention_forward_jvp(qb, qb, qb, qb[..., :32], qb, qb, None, None, 0.125, False)


def test_public_api_f32_inputs_run_the_triton_kernels():
    """float32 CUDA inputs (the CUDA kernels take none) run the Triton kernels, without the reference's
    warning, and give the float64 reference's result to float32 accuracy."""
    import importlib
    import warnings

    import fastcm
    from helpers import assert_close

    q, k, v, qt, kt, vt = _inputs(1, 4, 2, 70, 90, 64, 64, torch.float32)
    assert importlib.import_module("fastcm.attention")._backend(q.device, q.dtype, 64, 64) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, out_t = fastcm.attention_jvp(q, k, v, qt, kt, vt, causal=True)
    want, want_t = ref.attention_jvp(*map(to64, (q, k, v, qt, kt, vt)), causal=True)
    assert_close(out, want, torch.float32, name="out")
    assert_close(out_t, want_t, torch.float32, name="out_t")


def test_public_api_passes_a_f32_bias_unrounded():
    """fastcm.attention / attention_jvp hand a float32 bias to the kernels as it is: the op's result
    with that bias, not with the bias rounded to bf16 (ALiBi-sized values 6..300, where bf16's
    steps of 2 would move P by up to e)."""
    import fastcm

    ops = _ops()
    q, k, v, qt, kt, vt = _inputs(1, 2, 2, 70, 90, 64, 64, torch.bfloat16)
    bias = (300 - 3.3 * torch.arange(90, device=DEVICE, dtype=torch.float32)).expand(1, 2, 70, 90)
    out = fastcm.attention(q, k, v, attn_bias=bias)
    want, _ = ops.attention_forward(q, k, v, bias, 64**-0.5, False)
    rounded, _ = ops.attention_forward(q, k, v, bias.to(torch.bfloat16), 64**-0.5, False)
    assert torch.equal(out, want) and not torch.equal(out, rounded)
    out, out_t = fastcm.attention_jvp(q, k, v, qt, kt, vt, attn_bias=bias, bias_t=0.1 * bias)
    want = ops.attention_forward_jvp(q, k, v, qt, kt, vt, bias, 0.1 * bias, 64**-0.5, False)
    assert torch.equal(out, want[0]) and torch.equal(out_t, want[1])


def test_nn_attention_runs_f32_models_on_the_kernels(monkeypatch):
    """fastcm.nn.Attention(cuda_dtype=bf16) in a float32 model: the attention takes the bf16 kernels
    (no reference warning), output and tangent come back in float32, within 2x of the same module
    with PyTorch's bf16 attention against the float64 one."""
    import copy
    import warnings

    import fastcm.nn

    torch.manual_seed(0)
    module = fastcm.nn.Attention(64, 2, qk_norm=True, cuda_dtype=torch.bfloat16).to(DEVICE)
    x, x_t = (torch.randn(2, 50, 64, device=DEVICE) for _ in range(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, out_t = torch.func.jvp(module, (x,), (x_t,))
    assert not [w for w in caught if "run the PyTorch reference" in str(w.message)]
    assert out.dtype == out_t.dtype == torch.float32
    monkeypatch.setattr(fastcm.nn, "attention", lambda q, k, v, **kw: ref.attention(q, k, v, **kw))
    t_out, t_out_t = torch.func.jvp(module, (x,), (x_t,))  # reference attention in bf16
    module64 = copy.deepcopy(module).double()
    r_out, r_out_t = torch.func.jvp(module64, (x.double(),), (x_t.double(),))
    _check_against_torch("out", out, t_out, r_out)
    _check_against_torch("out_t", out_t, t_out_t, r_out_t)


@pytest.mark.parametrize("dtype", LOWP)
def test_public_api_on_cuda(dtype):
    """fastcm.attention_jvp routes CUDA tensors to these kernels."""
    import fastcm

    q, k, v, qt, kt, vt = _inputs(1, 4, 2, 130, 130, 64, 64, dtype)
    out, out_t = fastcm.attention_jvp(q, k, v, qt, kt, vt, causal=True)
    r_out, r_out_t = ref.attention_jvp(to64(q), to64(k), to64(v), to64(qt), to64(kt), to64(vt), causal=True)
    t_out, t_out_t = ref.attention_jvp(q, k, v, qt, kt, vt, causal=True)
    _check_against_torch("out", out, t_out, r_out)
    _check_against_torch("out_t", out_t, t_out_t, r_out_t)
