"""Stochastic and higher-order sampler-step benchmarks. The eager baselines are the float reference,
written as k-diffusion's loop bodies write these updates (term by term, with torch.randn_like(x) noise);
fastcm draws its noise in-kernel, so its floors count only the tensor inputs read once and the output
written once."""

import math

import torch

from fastcm import sde_steps
from fastcm.reference import sde_steps as reference

from .common import Case, make_pytest_benchmark

GPU_SHAPE = (64, 4, 128, 128)
CPU_SHAPE = (8, 4, 32, 32)
SIGMA, SIGMA_NEXT, SIGMA_PREV, SIGMA_PREV2, SIGMA_PREV3 = 2.0, 1.2, 3.1, 4.4, 6.0
# UniPC at full order: UniC-3 of the previous step and UniP-3, reading x, D and three earlier D.
UNIPC_HISTORY = dict(
    sigma_prev=SIGMA_PREV, sigma_prev2=SIGMA_PREV2, sigma_prev3=SIGMA_PREV3, order=3, corrector_order=3
)


def _case(device, shape, dtype, name, tensors, reference_fn, fastcm_fn):
    def make_inputs():
        return tuple(torch.randn(shape, device=device, dtype=dtype) for _ in range(tensors))

    return Case(
        "sde_steps",
        name,
        shape,
        dtype,
        make_inputs,
        reference=reference_fn,
        fastcm=fastcm_fn,
        min_bytes=(tensors + 1) * math.prod(shape) * torch.finfo(dtype).bits // 8,
    )


def _noisy(fn):
    """The reference with the noise a k-diffusion loop draws for it: torch.randn_like(x)."""
    return lambda x, *rest: fn(x, *rest, noise=torch.randn_like(x))


def cases(device: torch.device, small: bool):
    shape = CPU_SHAPE if small else GPU_SHAPE
    out = []
    for dtype in (torch.float32, torch.bfloat16):

        def add(name, tensors, reference_fn, fastcm_fn, dtype=dtype):
            out.append(_case(device, shape, dtype, name, tensors, reference_fn, fastcm_fn))

        add(
            "churn (noise)",
            1,
            _noisy(lambda x, noise: reference.churn_step(x, SIGMA, 1.3 * SIGMA, noise=noise)),
            lambda x: sde_steps.churn_step(x, SIGMA, 1.3 * SIGMA, seed=1),
        )
        add(
            "euler ancestral (noise)",
            2,
            _noisy(lambda x, d, noise: reference.euler_ancestral_step(x, d, SIGMA, SIGMA_NEXT, noise=noise)),
            lambda x, d: sde_steps.euler_ancestral_step(x, d, SIGMA, SIGMA_NEXT, seed=1),
        )
        add(
            "dpmpp_2s_ancestral (noise)",
            3,
            _noisy(
                lambda x, d, e, noise: reference.dpmpp_2s_ancestral_step(
                    x, d, SIGMA, SIGMA_NEXT, denoised_mid=e, noise=noise
                )
            ),
            lambda x, d, e: sde_steps.dpmpp_2s_ancestral_step(x, d, SIGMA, SIGMA_NEXT, denoised_mid=e, seed=1),
        )
        add(
            "dpmpp_sde (noise)",
            3,
            _noisy(
                lambda x, d, e, noise: reference.dpmpp_sde_step(x, d, SIGMA, SIGMA_NEXT, denoised_mid=e, noise=noise)
            ),
            lambda x, d, e: sde_steps.dpmpp_sde_step(x, d, SIGMA, SIGMA_NEXT, denoised_mid=e, seed=1),
        )
        add(
            "dpmpp_2m_sde (noise)",
            3,
            _noisy(
                lambda x, d, e, noise: reference.dpmpp_2m_sde_step(
                    x, d, SIGMA, SIGMA_NEXT, old_denoised=e, sigma_prev=SIGMA_PREV, noise=noise
                )
            ),
            lambda x, d, e: sde_steps.dpmpp_2m_sde_step(
                x, d, SIGMA, SIGMA_NEXT, old_denoised=e, sigma_prev=SIGMA_PREV, seed=1
            ),
        )
        add(
            "dpmpp_3m_sde (noise)",
            4,
            _noisy(
                lambda x, d, e, f, noise: reference.dpmpp_3m_sde_step(
                    x,
                    d,
                    SIGMA,
                    SIGMA_NEXT,
                    denoised_1=e,
                    denoised_2=f,
                    sigma_prev=SIGMA_PREV,
                    sigma_prev2=SIGMA_PREV2,
                    noise=noise,
                )
            ),
            lambda x, d, e, f: sde_steps.dpmpp_3m_sde_step(
                x,
                d,
                SIGMA,
                SIGMA_NEXT,
                denoised_1=e,
                denoised_2=f,
                sigma_prev=SIGMA_PREV,
                sigma_prev2=SIGMA_PREV2,
                seed=1,
            ),
        )
        add(
            "unipc (P3 + C3)",
            5,
            lambda x, d, e, f, g: reference.unipc_step(
                x, d, SIGMA, SIGMA_NEXT, denoised_1=e, denoised_2=f, denoised_3=g, **UNIPC_HISTORY
            ),
            lambda x, d, e, f, g: sde_steps.unipc_step(
                x, d, SIGMA, SIGMA_NEXT, denoised_1=e, denoised_2=f, denoised_3=g, **UNIPC_HISTORY
            ),
        )
    return out


test_sde_steps = make_pytest_benchmark(cases)
