"""A first look at the CUDA attention kernels on a GPU, before the test suite: one small primal,
one JVP and one backward call per padded head dim (64, 128), bf16, on whichever kernels the
FASTCM_ATTN_SM90* switches of the environment select, against the float64 reference (autograd
through it for the backward).

Prints the kernel each call ran and its relative errors; exits 1 on an error above 2e-2 or a
non-finite output. Run it under `timeout`: a kernel that hangs (a barrier that never completes)
shows up as the timeout, not as a stuck test suite.

    FASTCM_ATTN_SM90_TMA=0 timeout 60 python scripts/attention_smoke.py
"""

import sys

import torch

from fastcm._extension import extension_ops
from fastcm.reference import attention as ref


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    ops = extension_ops()
    torch.manual_seed(0)
    ok = True
    for d in (64, 128):
        B, H, Hkv, Nq, Nk = 1, 2, 1, 300, 700
        r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)   # noqa: E731
        q, k, v, qt, kt, vt = r(B, H, Nq, d), r(B, Hkv, Nk, d), r(B, Hkv, Nk, d), r(B, H, Nq, d), r(B, Hkv, Nk, d), r(B, Hkv, Nk, d)
        scale = d ** -0.5
        f64 = [t.double().cpu() for t in (q, k, v, qt, kt, vt)]
        out, lse = ops.attention_forward(q, k, v, None, scale, False)
        jvp = ops.attention_forward_jvp(q, k, v, qt, kt, vt, None, None, scale, False)
        grad = r(B, H, Nq, d)
        grads = ops.attention_backward(grad, q, k, v, out, lse, None, scale, False)
        torch.cuda.synchronize()
        r_out, r_lse = ref.attention(*f64[:3], scale=scale, return_lse=True)
        r_jvp = ref.attention_jvp(*f64, scale=scale, return_lse=True)
        leaves = [t.clone().requires_grad_(True) for t in f64[:3]]
        r_grads = torch.autograd.grad(ref.attention(*leaves, scale=scale), leaves, grad.double().cpu())
        for name, got, want, kernel in [
            ("out", out, r_out, ops.attention_forward_kernels(q, v, False, False, False)),
            ("lse", lse, r_lse, None),
            ("jvp out", jvp[0], r_jvp[0], ops.attention_forward_kernels(q, v, True, False, False)),
            ("jvp out_t", jvp[1], r_jvp[1], None),
            ("jvp lse", jvp[2], r_jvp[2], None),
            ("jvp lse_t", jvp[3], r_jvp[3], None),
            ("bwd dq", grads[0], r_grads[0], ops.attention_backward_kernels(q, v, False)),
            ("bwd dk", grads[1], r_grads[1], None),
            ("bwd dv", grads[2], r_grads[2], None),
        ]:
            err = rel_err(got, want)
            good = bool(torch.isfinite(got).all()) and err < 2e-2
            ok &= good
            print(f"d={d:3d} {name:10s} rel err {err:.2e} {'ok' if good else 'FAIL'}" + (f"  {kernel}" if kernel else ""))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
