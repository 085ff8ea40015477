"""A first look at the CUDA attention kernels on a GPU, before the test suite: one small primal,
one JVP and one backward call per padded head dim (64, 128), bf16, on whichever kernels the
FASTCM_ATTN_SM90* switches of the environment select, against the float64 reference (autograd
through it for the backward). --bias repeats the calls with an fp32 bias (a (1, 1, Nq, Nk) view
broadcast over batch and heads: contiguous rows, the vectorised staging's case under
FASTCM_ATTN_BIAS_STAGE=vector); --small takes the smallest shape (compute-sanitizer's case);
--device cpu runs the same calls on the C++ CPU kernels (scripts/device_run.sh's simulation).

Prints the kernel each call ran and its relative errors; exits 1 on an error above 2e-2 or a
non-finite output. Run it under `timeout`: a kernel that hangs (a barrier that never completes)
shows up as the timeout, not as a stuck test suite.

    FASTCM_ATTN_SM90_TMA=0 timeout 60 python scripts/attention_smoke.py [--bias] [--small] [--device cpu]
"""

import argparse
import sys

import torch

from fastcm._extension import extension_ops
from fastcm.reference import attention as ref


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--bias", action="store_true", help="also the calls with an fp32 bias")
    parser.add_argument("--small", action="store_true", help="Nq 70, Nk 45 (compute-sanitizer's case)")
    args = parser.parse_args()
    ops = extension_ops()
    cuda = args.device == "cuda"
    torch.manual_seed(0)
    ok = True
    for d in (64, 128):
        B, H, Hkv, Nq, Nk = (1, 2, 1, 70, 45) if args.small else (1, 2, 1, 300, 700)
        r = lambda *s: torch.randn(*s, device=args.device, dtype=torch.bfloat16)  # noqa: E731
        q, k, v, qt, kt, vt = (
            r(B, H, Nq, d),
            r(B, Hkv, Nk, d),
            r(B, Hkv, Nk, d),
            r(B, H, Nq, d),
            r(B, Hkv, Nk, d),
            r(B, Hkv, Nk, d),
        )
        scale = d**-0.5
        f64 = [t.double().cpu() for t in (q, k, v, qt, kt, vt)]
        grad = r(B, H, Nq, d)
        bias64 = torch.randn(1, 1, Nq, Nk, dtype=torch.float64)
        # fp32 on CUDA (the 16-byte vector loads); the CPU kernels take a bias of q's dtype only.
        bias_dtype = torch.float32 if cuda else q.dtype
        for bias in [None] + ([bias64.to(args.device, bias_dtype).expand(B, H, Nq, Nk)] if args.bias else []):
            has_bias = bias is not None
            out, lse = ops.attention_forward(q, k, v, bias, scale, False)
            jvp = ops.attention_forward_jvp(q, k, v, qt, kt, vt, bias, None, scale, False)
            grads = ops.attention_backward(grad, q, k, v, out, lse, bias, scale, False)
            if cuda:
                torch.cuda.synchronize()
            b64 = bias.double().cpu() if has_bias else None
            r_out, r_lse = ref.attention(*f64[:3], attn_bias=b64, scale=scale, return_lse=True)
            r_jvp = ref.attention_jvp(*f64, attn_bias=b64, scale=scale, return_lse=True)
            leaves = [t.clone().requires_grad_(True) for t in f64[:3]]
            r_grads = torch.autograd.grad(
                ref.attention(*leaves, attn_bias=b64, scale=scale), leaves, grad.double().cpu()
            )
            names = (lambda fn, *a: fn(*a)) if cuda else (lambda fn, *a: "C++ CPU kernel")
            for name, got, want, kernel in [
                ("out", out, r_out, names(ops.attention_forward_kernels, q, v, False, has_bias, False)),
                ("lse", lse, r_lse, None),
                ("jvp out", jvp[0], r_jvp[0], names(ops.attention_forward_kernels, q, v, True, has_bias, False)),
                ("jvp out_t", jvp[1], r_jvp[1], None),
                ("jvp lse", jvp[2], r_jvp[2], None),
                ("jvp lse_t", jvp[3], r_jvp[3], None),
                ("bwd dq", grads[0], r_grads[0], names(ops.attention_backward_kernels, q, v, has_bias)),
                ("bwd dk", grads[1], r_grads[1], None),
                ("bwd dv", grads[2], r_grads[2], None),
            ]:
                err = rel_err(got, want)
                good = bool(torch.isfinite(got).all()) and err < 2e-2
                ok &= good
                print(
                    f"d={d:3d} {'bias ' if has_bias else ''}{name:10s} rel err {err:.2e} {'ok' if good else 'FAIL'}"
                    + (f"  {kernel}" if kernel else "")
                )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
