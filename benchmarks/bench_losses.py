"""Loss benchmarks: pseudo-Huber, sCM and MeanFlow, forward and forward+backward.

N = elements of one input tensor, s = bytes per input element, c = bytes per compute-dtype element
(4 for fp32/bf16/fp16, 8 for fp64); per-sample vectors (t, r, weight, logvar, B floats) are
counted but negligible. Floor = each needed input read once, each output written once; "fastcm
traffic" is what the kernels move when nothing is served from L2 (inputs larger than the H100's
50 MiB L2, as at 64x4x128x128 where one fp32 tensor is 64 MiB):

| case                          | floor | fastcm traffic                                       | fp32  | bf16  |
|-------------------------------|-------|------------------------------------------------------|-------|-------|
| pseudo_huber fwd              | 2N·s  | read input, target                                   | 1.00× | 1.00× |
| pseudo_huber fwd+bwd          | 3N·s  | fwd 2N·s; bwd re-reads input, target, writes grad    | 1.67× | 1.67× |
| scm fwd (any D)               | 5N·s  | read F, F⁻, F_jvp, x_t, dx_dt once, write nothing    | 1.00× | 1.00× |
| scm fwd+bwd, D ≤ 8192         | 6N·s  | fwd 5N·s + residual N·c; bwd reads it, writes grad   | 1.33× | 1.67× |
| scm fwd+bwd, D > 8192         | 6N·s  | fwd 5N·s; bwd re-reads the five, writes grad F       | 1.83× | 1.83× |
| meanflow fwd                  | 3N·s  | read u, v, du/dt once, write nothing                 | 1.00× | 1.00× |
| meanflow fwd+bwd, fp32/fp64   | 4N·s  | fwd 3N·s + residual N·c; bwd reads it, writes grad u | 1.50× | —     |
| meanflow fwd+bwd, bf16/fp16   | 4N·s  | fwd 3N·s; bwd re-reads the three, writes grad u      | —     | 1.75× |

(× = traffic ÷ floor.) The residual (F − F⁻ − ĝ, or u − u_tgt) is what the backward needs as one
tensor: grad = G_b·coef_b·residual, one read and one write. It is kept in the compute dtype (a
16-bit residual rounds the gradient twice), so it is saved only where 2·c < (inputs re-read)·s:
MeanFlow bf16 would move 3N·2 + 4N + 4N + N·2 = 16N bytes against the re-read's 14N, and keeps it.
The sCM residual needs the per-sample ‖g‖ first, so it is written from registers by one program per
sample; samples above 8192 elements (kernels/losses.py: SCM_ON_CHIP_ELEMENTS) do not fit one SM
(a 64K-element sample needs 512 KiB for Δ and g in fp32, against 256 KiB of registers) and fall back
to the re-read. So at the 64x4x128x128 shape the sCM fwd+bwd stays at 1.83× (the 1.5× target is
not met there); the case at 1024x4x32x32 (D = 4096, 16 MiB per fp32 tensor, 96 MiB in all) shows
the on-chip path beyond L2. The on-chip path runs B programs of 16 warps, one per SM at a time:
whether it reaches the copy bandwidth is a measurement, not part of this model.
The measured fastcm ÷ floor on a GPU is what benchmarks/results/ records; none is claimed here.
"""

import torch

from fastcm import losses
from fastcm.reference import losses as reference

from .common import Case, make_pytest_benchmark

GPU_SHAPE = (64, 4, 128, 128)
CPU_SHAPE = (8, 4, 32, 32)
# sCM samples within the on-chip limit (a 256px-image latent), batch large enough to exceed L2.
SCM_ON_CHIP_GPU_SHAPE = (1024, 4, 32, 32)


def _bytes(shape, dtype, tensors_moved, per_sample_vectors=0):
    numel = torch.Size(shape).numel()
    return tensors_moved * numel * torch.finfo(dtype).bits // 8 + per_sample_vectors * shape[0] * 4


def _grad_of(loss_fn, n_grad):
    """Forward + backward of a scalar loss w.r.t. the first n_grad inputs (and logvar for sCM)."""

    def run(*inputs):
        return torch.autograd.grad(loss_fn(*inputs), inputs[:n_grad])

    return run


def _pseudo_huber_cases(device, shape, dtype):
    def make_inputs(requires_grad):
        def make():
            x = torch.randn(shape, device=device, dtype=dtype, requires_grad=requires_grad)
            return x, torch.randn(shape, device=device, dtype=dtype)

        return make

    return [
        Case(
            "losses",
            "pseudo_huber fwd",
            shape,
            dtype,
            make_inputs(False),
            reference.pseudo_huber_loss,
            losses.pseudo_huber_loss,
            min_bytes=_bytes(shape, dtype, 2),
        ),
        Case(
            "losses",
            "pseudo_huber fwd+bwd",
            shape,
            dtype,
            make_inputs(True),
            _grad_of(reference.pseudo_huber_loss, 1),
            _grad_of(losses.pseudo_huber_loss, 1),
            min_bytes=_bytes(shape, dtype, 3),
        ),
    ]


def _scm_cases(device, shape, dtype, *, grad_only=False):
    batch = shape[0]

    def make_inputs(requires_grad):
        def make():
            F = torch.randn(shape, device=device, dtype=dtype, requires_grad=requires_grad)
            others = [torch.randn(shape, device=device, dtype=dtype) for _ in range(4)]
            t = torch.rand(batch, device=device) * 1.5 + 0.02
            logvar = torch.zeros(batch, device=device, requires_grad=requires_grad)
            return (F, logvar, *others, t)

        return make

    def call(impl):
        def run(F, logvar, F_minus, F_jvp, x_t, dx_dt, t):
            return impl(F, F_minus, F_jvp, x_t, dx_dt, t, r=0.5, weight=1.0 / (0.5 * torch.tan(t)), logvar=logvar)

        return run

    forward = Case(
        "losses",
        "scm fwd",
        shape,
        dtype,
        make_inputs(False),
        call(reference.scm_loss),
        call(losses.scm_loss),
        min_bytes=_bytes(shape, dtype, 5, per_sample_vectors=2),
    )
    backward = Case(
        "losses",
        "scm fwd+bwd",
        shape,
        dtype,
        make_inputs(True),
        _grad_of(call(reference.scm_loss), 2),
        _grad_of(call(losses.scm_loss), 2),
        min_bytes=_bytes(shape, dtype, 6, per_sample_vectors=3),
    )
    return [backward] if grad_only else [forward, backward]


def _meanflow_cases(device, shape, dtype):
    batch = shape[0]

    def make_inputs(requires_grad):
        def make():
            u = torch.randn(shape, device=device, dtype=dtype, requires_grad=requires_grad)
            t = torch.rand(batch, device=device)
            return (
                u,
                torch.randn(shape, device=device, dtype=dtype),
                torch.randn(shape, device=device, dtype=dtype),
                t,
                t * torch.rand(batch, device=device),
            )

        return make

    return [
        Case(
            "losses",
            "meanflow fwd",
            shape,
            dtype,
            make_inputs(False),
            reference.meanflow_loss,
            losses.meanflow_loss,
            min_bytes=_bytes(shape, dtype, 3, per_sample_vectors=2),
        ),
        Case(
            "losses",
            "meanflow fwd+bwd",
            shape,
            dtype,
            make_inputs(True),
            _grad_of(reference.meanflow_loss, 1),
            _grad_of(losses.meanflow_loss, 1),
            min_bytes=_bytes(shape, dtype, 4, per_sample_vectors=2),
        ),
    ]


def cases(device: torch.device, small: bool):
    shape = CPU_SHAPE if small else GPU_SHAPE
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for family_cases in (_pseudo_huber_cases, _scm_cases, _meanflow_cases):
            out.extend(family_cases(device, shape, dtype))
        if not small:
            out.extend(_scm_cases(device, SCM_ON_CHIP_GPU_SHAPE, dtype, grad_only=True))
    return out


test_losses = make_pytest_benchmark(cases)
