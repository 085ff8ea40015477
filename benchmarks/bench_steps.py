"""Sampler-step benchmarks. Floors count each tensor input read once and the output written once;
noise drawn in-kernel (cm, trigflow, ddim with eta > 0) costs no memory traffic, so the re-noise
floors count only D (and x) and the output. The eager baselines for the noisy steps are what
sampler code writes today: D + c·torch.randn_like(D)."""

import math

import torch

from fastcm import steps
from fastcm.reference import steps as reference

from .common import Case, make_pytest_benchmark

GPU_SHAPE = (64, 4, 128, 128)
CPU_SHAPE = (8, 4, 32, 32)
SIGMA, SIGMA_NEXT, SIGMA_PREV = 2.0, 1.2, 3.1


def _case(device, shape, dtype, name, tensors, reference_fn, fastcm_fn):
    def make_inputs():
        return tuple(torch.randn(shape, device=device, dtype=dtype) for _ in range(tensors))

    numel = math.prod(shape)
    return Case(
        "steps",
        name,
        shape,
        dtype,
        make_inputs,
        reference=reference_fn,
        fastcm=fastcm_fn,
        min_bytes=(tensors + 1) * numel * torch.finfo(dtype).bits // 8,
    )


def _renoise_cm(d):
    return d + math.sqrt(SIGMA_NEXT**2 - 0.002**2) * torch.randn_like(d)


def _renoise_trigflow(d):
    return math.cos(1.1) * d + math.sin(1.1) * 0.5 * torch.randn_like(d)


def _ddim_eta1(x, eps):
    return reference.ddim_step(x, eps, 0.3, 0.6, eta=1.0, noise=torch.randn_like(x))


def cases(device: torch.device, small: bool):
    shape = CPU_SHAPE if small else GPU_SHAPE
    out = []
    for dtype in (torch.float32, torch.bfloat16):

        def add(name, tensors, reference_fn, fastcm_fn):
            out.append(_case(device, shape, dtype, name, tensors, reference_fn, fastcm_fn))

        add(
            "euler",
            2,
            lambda x, d: reference.euler_step(x, d, SIGMA, SIGMA_NEXT),
            lambda x, d: steps.euler_step(x, d, SIGMA, SIGMA_NEXT),
        )
        add(
            "heun",
            3,
            lambda x, d, e: reference.heun_step(x, d, SIGMA, SIGMA_NEXT, denoised_next=e),
            lambda x, d, e: steps.heun_step(x, d, SIGMA, SIGMA_NEXT, denoised_next=e),
        )
        add(
            "dpmpp_2m first",
            2,
            lambda x, d: reference.dpmpp_2m_step(x, d, SIGMA, SIGMA_NEXT),
            lambda x, d: steps.dpmpp_2m_step(x, d, SIGMA, SIGMA_NEXT),
        )
        add(
            "dpmpp_2m",
            3,
            lambda x, d, e: reference.dpmpp_2m_step(x, d, SIGMA, SIGMA_NEXT, old_denoised=e, sigma_prev=SIGMA_PREV),
            lambda x, d, e: steps.dpmpp_2m_step(x, d, SIGMA, SIGMA_NEXT, old_denoised=e, sigma_prev=SIGMA_PREV),
        )
        add(
            "ddim eta=0",
            2,
            lambda x, e: reference.ddim_step(x, e, 0.3, 0.6),
            lambda x, e: steps.ddim_step(x, e, 0.3, 0.6),
        )
        add("ddim eta=1 (noise)", 2, _ddim_eta1, lambda x, e: steps.ddim_step(x, e, 0.3, 0.6, eta=1.0, seed=1))
        add("cm (noise)", 1, _renoise_cm, lambda d: steps.cm_step(d, SIGMA_NEXT, seed=1))
        add("trigflow (noise)", 1, _renoise_trigflow, lambda d: steps.trigflow_step(d, 1.1, seed=1))
        add("cfg", 2, lambda c, u: reference.cfg(c, u, 5.0), lambda c, u: steps.cfg(c, u, 5.0))
        add(
            "cfg rescale",
            2,
            lambda c, u: reference.cfg(c, u, 5.0, guidance_rescale=0.7),
            lambda c, u: steps.cfg(c, u, 5.0, guidance_rescale=0.7),
        )
    return out


test_steps = make_pytest_benchmark(cases)
