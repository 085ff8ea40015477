"""EMA benchmarks: one update of K = 3 profiles over a DiT-sized list of parameters, fastcm.ema.EMA
(one fused pass per parameter dtype) against K calls of torch._foreach_lerp_ (bfloat16 parameters are
first widened to float32, as the float32 shadows need). Floor: read θ once, read and write K float32
shadows."""

import torch

from fastcm import ema

from .common import Case, make_pytest_benchmark

PROFILES = 3
# (numel per tensor, how many): the weight matrices, biases and norms of a DiT-B-like stack.
GPU_LAYOUT = ((768 * 3 * 768, 12), (768 * 4 * 768, 24), (768 * 768, 12), (768 * 6 * 768, 12), (768, 120))
CPU_LAYOUT = ((96 * 3 * 96, 4), (96 * 4 * 96, 8), (96 * 96, 4), (96, 40))


def _case(device, layout, dtype):
    numel = sum(n * count for n, count in layout)
    profiles = [ema.power(0.05), ema.power(0.10), ema.constant(0.9999)]

    def make_inputs():
        params = [torch.randn(n, device=device, dtype=dtype) for n, count in layout for _ in range(count)]
        averages = ema.EMA(params, profiles)
        shadows = [averages.shadows(k) for k in range(PROFILES)]
        return averages, shadows, params

    def foreach_lerp(averages, shadows, params):
        averages.step += 1
        params32 = params if dtype == torch.float32 else [p.float() for p in params]
        for shadow_set, beta in zip(shadows, averages.betas(averages.step)):
            torch._foreach_lerp_(shadow_set, params32, 1.0 - beta)

    def fused(averages, shadows, params):
        averages.update()

    return Case(
        "ema",
        f"update K={PROFILES}",
        (len([1 for _, c in layout for _ in range(c)]), numel),
        dtype,
        make_inputs,
        reference=foreach_lerp,
        fastcm=fused,
        min_bytes=numel * (torch.finfo(dtype).bits // 8 + 2 * PROFILES * 4),
        # The baseline the EMA is judged against is the eager foreach loop itself.
        compile_reference=False,
    )


def cases(device: torch.device, small: bool):
    layout = CPU_LAYOUT if small else GPU_LAYOUT
    return [_case(device, layout, dtype) for dtype in (torch.float32, torch.bfloat16)]


test_ema = make_pytest_benchmark(cases)
