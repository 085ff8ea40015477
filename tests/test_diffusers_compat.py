"""fastcm.diffusers against diffusers itself: each scheduler is built from the same config and stepped side by
side with diffusers' on the same samples and model outputs; every step's outputs agree to float32 rounding (the
stochastic ones given the same torch.Generator, whose noise both draw with diffusers' randn_tensor)."""

import inspect
import math

import pytest
import torch

from helpers import DEVICE, assert_close, poisoned_empty

# diffusers is a test extra (the oracle); a machine without it skips this file.
diffusers = pytest.importorskip("diffusers")
import fastcm.diffusers as fd  # noqa: E402

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

CASES = [
    ("EulerDiscreteScheduler", dict(prediction_type="epsilon"), {}),
    ("EulerDiscreteScheduler", dict(prediction_type="v_prediction", use_karras_sigmas=True), {}),
    ("EulerDiscreteScheduler", dict(prediction_type="epsilon"), dict(s_churn=4.0, s_tmin=0.5, s_tmax=8.0)),
    ("EulerAncestralDiscreteScheduler", dict(prediction_type="epsilon"), {}),
    ("EulerAncestralDiscreteScheduler", dict(prediction_type="v_prediction"), {}),
    ("DDIMScheduler", dict(prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False), {}),
    ("DDIMScheduler", dict(prediction_type="v_prediction", clip_sample=False), dict(eta=0.7)),
    ("DDIMScheduler", dict(prediction_type="sample", clip_sample=False), dict(eta=1.0)),
    ("LCMScheduler", dict(prediction_type="epsilon"), {}),
    ("LCMScheduler", dict(prediction_type="v_prediction"), {}),
    ("TCDScheduler", dict(prediction_type="epsilon"), dict(eta=0.3)),
    ("TCDScheduler", dict(prediction_type="sample"), dict(eta=0.0)),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2), {}),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_type="heun", use_karras_sigmas=True), {}),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_type="midpoint"), {}),
    (
        "DPMSolverMultistepScheduler",
        dict(algorithm_type="sde-dpmsolver++", solver_type="heun", prediction_type="v_prediction"),
        {},
    ),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), {}),
    ("UniPCMultistepScheduler", dict(solver_order=2), {}),
    ("UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh2"), {}),
    ("UniPCMultistepScheduler", dict(solver_order=3, prediction_type="v_prediction", use_karras_sigmas=True), {}),
    ("UniPCMultistepScheduler", dict(solver_order=3, predict_x0=False, final_sigmas_type="sigma_min"), {}),
    ("UniPCMultistepScheduler", dict(solver_order=1), {}),
    (
        "UniPCMultistepScheduler",
        dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min", disable_corrector=[1, 3]),
        {},
    ),
]
FLOW_CONFIG = dict(num_train_timesteps=1000)


def _config(name, options):
    return dict(FLOW_CONFIG if name.startswith("FlowMatch") else SD_CONFIG, **options)


def _model(sample, timestep):
    """A deterministic stand-in for the network: any function of (sample, t) exercises the update."""
    t = float(timestep) / 1000
    return (0.4 * sample + 0.2 * torch.sin(3 * sample) + t).to(sample.dtype)


def _scale(scheduler, sample, t):
    """scale_model_input where the scheduler has one (flow matching has none: the model sees the sample)."""
    return scheduler.scale_model_input(sample, t) if hasattr(scheduler, "scale_model_input") else sample


def _pair(name, options):
    theirs = getattr(diffusers, name)(**_config(name, options))
    ours = getattr(fd, name).from_config(theirs.config)
    return theirs, ours


def _start(scheduler):
    sample = torch.randn(2, 4, 6, 5, dtype=torch.float64).to(DEVICE, torch.float32)
    return sample * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts at unit noise


def _outputs(result):
    return [v for v in (result.values() if hasattr(result, "values") else result)]


def _side_by_side(theirs, ours, step_kwargs, steps=6, seed=3):
    """Steps both along diffusers' trajectory; returns the number of steps compared."""
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert torch.equal(theirs.timesteps, ours.timesteps)
    sample = _start(theirs)
    generator_theirs = torch.Generator().manual_seed(seed)
    generator_ours = torch.Generator().manual_seed(seed)
    for i, t in enumerate(theirs.timesteps):
        model_input = _scale(theirs, sample, t)
        assert torch.equal(model_input, _scale(ours, sample, t))
        output = _model(model_input, t)
        stochastic = "generator" in inspect.signature(theirs.step).parameters
        want = theirs.step(output, t, sample, **step_kwargs, **({"generator": generator_theirs} if stochastic else {}))
        with poisoned_empty():
            got = ours.step(output, t, sample, **step_kwargs, **({"generator": generator_ours} if stochastic else {}))
        assert type(got) is type(want)
        for key, w in want.items():
            assert_close(got[key], w, torch.float32, name=f"step {i} {key}")
            assert got[key].dtype == w.dtype
        sample = want.prev_sample
    return len(theirs.timesteps)


@pytest.mark.parametrize("name, options, step_kwargs", CASES, ids=[f"{n}{o}{k}" for n, o, k in CASES])
def test_steps_match_diffusers(name, options, step_kwargs):
    theirs, ours = _pair(name, options)
    assert dict(ours.config) == dict(theirs.config)
    assert ours.order == theirs.order
    assert getattr(ours, "init_noise_sigma", None) == getattr(theirs, "init_noise_sigma", None)
    assert _side_by_side(theirs, ours, step_kwargs) >= 6


@pytest.mark.parametrize(
    "name, options, step_kwargs", [CASES[0], CASES[6], CASES[8], CASES[14], CASES[16], CASES[18]], ids=lambda v: str(v)
)
def test_steps_match_diffusers_on_the_triton_kernels(backend, name, options, step_kwargs):
    backend("triton")
    theirs, ours = _pair(name, options)
    _side_by_side(theirs, ours, step_kwargs, steps=3)


@pytest.mark.parametrize(
    "name",
    [
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "DDIMScheduler",
        "LCMScheduler",
        "TCDScheduler",
        "FlowMatchEulerDiscreteScheduler",
    ],
)
def test_the_fused_update_replaces_diffusers_step(monkeypatch, name):
    """diffusers' own step is never reached for the configurations fastcm fuses."""
    options = next(o for n, o, _ in CASES if n == name)

    def unreachable(*args, **kwargs):
        raise AssertionError(f"diffusers.{name}.step ran")

    theirs, ours = _pair(name, options)
    monkeypatch.setattr(getattr(diffusers, name), "step", unreachable)
    ours.set_timesteps(4)
    sample = _start(ours)
    for t in ours.timesteps:
        sample = ours.step(_model(_scale(ours, sample, t), t), t, sample).prev_sample
    assert torch.isfinite(sample).all()


def test_dpm_solver_updates_are_fused(monkeypatch):
    calls = []
    real = fd._combine
    monkeypatch.setattr(fd, "_combine", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, ours = _pair("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"))
    ours.set_timesteps(4)
    sample = _start(ours)
    for t in ours.timesteps:
        sample = ours.step(_model(sample, t), t, sample).prev_sample
    assert len(calls) == 4


def test_unipc_data_prediction_step_is_one_pass(monkeypatch):
    """predict_x0=True: one fused pass per step (the corrector of the previous step with this step's predictor, the
    last step to σ = 0 included); diffusers' own predictor and corrector never run."""
    calls = []
    real = fd._combine5
    monkeypatch.setattr(fd, "_combine5", lambda *a, **k: calls.append(1) or real(*a, **k))

    def unreachable(*args, **kwargs):
        raise AssertionError("diffusers' UniPC update ran")

    for name in ("multistep_uni_p_bh_update", "multistep_uni_c_bh_update"):
        monkeypatch.setattr(diffusers.UniPCMultistepScheduler, name, unreachable)
    _, ours = _pair("UniPCMultistepScheduler", dict(solver_order=3))
    ours.set_timesteps(5)
    sample = _start(ours)
    for t in ours.timesteps:
        sample = ours.step(_model(sample, t), t, sample).prev_sample
    assert len(calls) == 5 and torch.isfinite(sample).all()


def test_unipc_noise_prediction_predictor_and_corrector_are_fused(monkeypatch):
    calls = []
    real = fd._combine5
    monkeypatch.setattr(fd, "_combine5", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, ours = _pair("UniPCMultistepScheduler", dict(solver_order=3, predict_x0=False))
    ours.set_timesteps(5)
    sample = _start(ours)
    for t in ours.timesteps:
        sample = ours.step(_model(sample, t), t, sample).prev_sample
    assert len(calls) == 4 + 4  # predictors of steps 1-4 (the last, to σ = 0, is diffusers'), correctors of 2-5


@pytest.mark.parametrize(
    "name, step_kwargs",
    [
        ("EulerAncestralDiscreteScheduler", {}),
        ("LCMScheduler", {}),
        ("TCDScheduler", {"eta": 0.5}),
        ("DDIMScheduler", {"eta": 1.0}),
    ],
)
def test_own_noise_is_reproducible_and_has_diffusers_law(name, step_kwargs):
    """Without a generator fastcm draws one seed per step from torch's global RNG (not diffusers' stream): the
    same under torch.manual_seed, different across seeds. On a zero sample and model output prev = c_z·z, so its
    spread against diffusers' (torch noise) checks the noise scale: equal to 5 standard errors."""
    options = dict(clip_sample=False) if name == "DDIMScheduler" else {}
    sample = torch.zeros(4, 5000, device=DEVICE)

    def first_step(library, seed, **kwargs):
        scheduler = getattr(library, name)(**_config(name, options))
        scheduler.set_timesteps(4)
        torch.manual_seed(seed)
        t = scheduler.timesteps[0]
        return scheduler.step(torch.zeros_like(sample), t, sample, **step_kwargs, **kwargs).prev_sample.double()

    a, b, c = first_step(fd, 1), first_step(fd, 1), first_step(fd, 2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    want = first_step(diffusers, 0, generator=torch.Generator().manual_seed(0))
    n = a.numel()
    assert want.std().item() > 0
    assert abs(a.mean().item()) < 5 * want.std().item() / math.sqrt(n)
    assert abs(a.std().item() / want.std().item() - 1) < 5 * math.sqrt(1 / n)


def test_pipeline_swap_from_config():
    theirs = diffusers.LCMScheduler(**SD_CONFIG)
    swapped = fd.LCMScheduler.from_config(theirs.config)
    assert isinstance(swapped, diffusers.LCMScheduler) and dict(swapped.config) == dict(theirs.config)
    sample = torch.randn(1, 3)
    assert torch.equal(
        swapped.add_noise(sample, torch.ones_like(sample), torch.tensor([500])),
        theirs.add_noise(sample, torch.ones_like(sample), torch.tensor([500])),
    )


@pytest.mark.parametrize(
    "schedule, theirs", [("linear", "linear"), ("scaled_linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")]
)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_vp_beta_schedules_match_diffusers(schedule, theirs, zero_snr):
    from fastcm import schedules

    want = diffusers.DDPMScheduler(
        beta_schedule=theirs, beta_start=0.0001, beta_end=0.02, rescale_betas_zero_snr=zero_snr
    )
    got = schedules.vp_betas(1000, schedule=schedule, beta_start=0.0001, beta_end=0.02, zero_terminal_snr=zero_snr)
    # diffusers rescales in float32 and forms β = 1 − α there: a few float32 ulps of 1, absolute, on every β.
    atol = 8 * torch.finfo(torch.float32).eps if zero_snr else 1e-7
    torch.testing.assert_close(got.float(), want.betas, rtol=1e-5, atol=atol)
    alphas_cumprod = torch.cumprod(1 - got, 0)
    torch.testing.assert_close(alphas_cumprod.float(), want.alphas_cumprod, rtol=1e-5, atol=1e-7)
    if zero_snr:
        assert alphas_cumprod[-1].item() < 1e-20
        assert schedules.vp_sigmas(alphas_cumprod[-2:]).tolist()[-1] > 1e9  # σ_T: pure noise
