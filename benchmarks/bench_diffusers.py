"""fastcm.diffusers' fused scheduler steps against diffusers' own step on the same tensors. The small latent
(1, 4, 64, 64: a 512² Stable Diffusion latent) is the few-step regime where a scheduler's host overhead, not the
model, shows; each call runs one step at a fixed step index (the scheduler's counter is reset per call).
Needs diffusers (the test extra). Floors: sample and model output read once, each output written once."""

import math

import torch

from .common import Case, make_pytest_benchmark

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULERS = [  # (name, config, step kwargs, outputs written)
    ("EulerDiscreteScheduler", {}, {}, 2),
    ("EulerAncestralDiscreteScheduler", {}, {}, 2),
    ("LCMScheduler", {}, {}, 2),
    ("TCDScheduler", {}, {"eta": 0.3}, 2),
    ("DDIMScheduler", {"clip_sample": False}, {"eta": 1.0}, 2),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}, 1),
    ("UniPCMultistepScheduler", {"solver_order": 3}, {}, 1),
]


def _stepper(library, name, config, step_kwargs):
    scheduler = getattr(library, name)(**SD_CONFIG, **config)
    scheduler.set_timesteps(8)
    timestep = scheduler.timesteps[3]  # a history of three steps for the multistep (order 3) solvers

    def step(sample, model_output):
        scheduler._step_index = 3
        return scheduler.step(model_output, timestep, sample, **step_kwargs)

    return step


def cases(device: torch.device, small: bool):
    import diffusers

    import fastcm.diffusers as fused

    # (1, 4, 8, 8): next to no arithmetic, so the time is the host overhead of one step
    shapes = [(1, 4, 8, 8), (1, 4, 64, 64)] + ([] if small else [(16, 4, 128, 128)])
    out = []
    for shape in shapes:
        for name, config, step_kwargs, outputs in SCHEDULERS:

            def make_inputs(shape=shape):
                return tuple(torch.randn(shape, device=device) for _ in range(2))

            out.append(
                Case(
                    "diffusers",
                    name.replace("Scheduler", ""),
                    shape,
                    torch.float32,
                    make_inputs,
                    reference=_stepper(diffusers, name, config, step_kwargs),
                    fastcm=_stepper(fused, name, config, step_kwargs),
                    min_bytes=(2 + outputs) * math.prod(shape) * 4,
                    compile_reference=False,
                )
            )
    return out


test_diffusers = make_pytest_benchmark(cases)
