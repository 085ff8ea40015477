"""fastcm.sampling as a drop-in for k_diffusion.sampling, with k-diffusion's own loops as the oracle.

k-diffusion (0.1.1.post1) is installed with --no-deps by scripts/bootstrap.sh: its declared
dependencies (torchvision, scipy, torchsde, torchdiffeq, kornia, clip, wandb, ...) are gigabytes, and
its package __init__ imports all of them. These tests load only k_diffusion/sampling.py (and the
utils.py it imports for append_dims), with stand-ins for the modules those two files import but the
loops compared here never call: scipy.integrate (sample_lms), torchdiffeq (log_likelihood), torchsde
(the Brownian-tree noise, replaced by an explicit noise_sampler), PIL, safetensors and torchvision
(image helpers in utils), and tqdm's trange when tqdm is absent (a plain range). Any call into a
stand-in raises, so a test that reached one would fail, not pass silently.

The model is the exact denoiser of Gaussian data (closed form at every σ), the σ grids end above 0 so
that per-step errors are not hidden by a last x = D, and every comparison is to float32 rounding
(float32 x) or float64 rounding (float64 x).
"""

import contextlib
import importlib
import importlib.util
import math
import sys
import types

import pytest
import torch

from fastcm import sampling
from helpers import DEVICE, assert_close

MU, S = 0.3, 0.5

STAND_INS = {
    "scipy": ["integrate"],
    "scipy.integrate": [],
    "torchdiffeq": ["odeint"],
    "torchsde": [],
    "PIL": ["Image"],
    "PIL.Image": [],
    "safetensors": [],
    "torchvision": ["transforms"],
    "torchvision.transforms": ["functional"],
    "torchvision.transforms.functional": [],
}


class _StandIn(types.ModuleType):
    """A module the tests never call into: any attribute not set explicitly raises."""

    def __getattr__(self, name):
        if name.startswith("__"):  # the import machinery probes dunders; absent, as on any module
            raise AttributeError(name)
        raise RuntimeError(
            f"{self.__name__}.{name} is a test stand-in (k-diffusion installed without its "
            "dependencies); this test must not reach it"
        )


def _unavailable(name):
    def call(*args, **kwargs):
        raise RuntimeError(f"{name} is a test stand-in; this test must not reach it")

    return call


def _trange(n, *args, disable=None, **kwargs):
    return range(n)


@contextlib.contextmanager
def _stand_ins():
    added = []
    for name, attributes in STAND_INS.items():
        root = name.split(".")[0]
        if name == root and importlib.util.find_spec(root) is not None:
            continue
        if name != root and root not in added:
            continue
        module = _StandIn(name)
        for attribute in attributes:
            setattr(module, attribute, _unavailable(f"{name}.{attribute}"))
        sys.modules[name] = module
        added.append(name)
    for name in added:  # submodules as attributes of their parents, as an import would set them
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    if importlib.util.find_spec("tqdm") is None:
        tqdm = _StandIn("tqdm")
        auto = _StandIn("tqdm.auto")
        auto.trange, auto.tqdm, tqdm.auto = _trange, _unavailable("tqdm.auto.tqdm"), auto
        sys.modules.update({"tqdm": tqdm, "tqdm.auto": auto})
        added += ["tqdm", "tqdm.auto"]
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def kd():
    """k_diffusion.sampling, loaded without running the package's __init__ (see the module docstring)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        raise RuntimeError(
            "k-diffusion is not installed; scripts/bootstrap.sh installs it with "
            "`pip install --no-deps k-diffusion==0.1.1.post1`"
        )
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "k_diffusion"}
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["k_diffusion"] = package
    try:
        with _stand_ins():
            module = importlib.import_module("k_diffusion.sampling")
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "k_diffusion"]:
            del sys.modules[name]
        sys.modules.update(saved)
    return module


def gaussian_denoiser(x, sigma, *, mean, spread=S):
    """E[x0 | x0 + σ·n = x] for x0 ~ N(mean, spread²); `mean` arrives through extra_args."""
    sigma = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return mean + spread**2 / (spread**2 + sigma**2) * (x - mean)


def _grid(n, dtype, *, zero=False):
    sigmas = sampling.karras_sigmas(n, sigma_min=0.05, sigma_max=20.0, append_zero=zero)
    return sigmas.to(device=DEVICE, dtype=dtype)


def _start(dtype, batch=3, dims=8):
    return (MU + math.sqrt(S**2 + 20.0**2) * torch.randn(batch, dims, dtype=torch.float64)).to(DEVICE, dtype)


class _Recorder:
    """A callback that keeps copies of what it is given."""

    def __init__(self):
        self.calls = []

    def __call__(self, info):
        self.calls.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in info.items()})


def _assert_same_callbacks(got, want, dtype):
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert set(a) == set(b) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert a["i"] == b["i"]
        for key in ("sigma", "sigma_hat"):
            assert isinstance(a[key], torch.Tensor) and a[key].dim() == 0, key
            assert a[key].item() == pytest.approx(b[key].item(), rel=1e-6), key
        assert_close(a["x"], b["x"], dtype, name=f"callback x at step {a['i']}")
        assert_close(a["denoised"], b["denoised"], dtype, name=f"callback denoised at step {a['i']}")


def _noise_sampler(noises, log):
    """The same noise to both libraries: the k-th call returns noises[k]; the (σ, σ') arguments are logged."""
    stream = iter(noises)

    def sample(sigma, sigma_next):
        log.extend((float(sigma), float(sigma_next)))
        return next(stream)

    return sample


DETERMINISTIC = [
    ("sample_euler", {}),
    ("sample_heun", {}),
    ("sample_dpmpp_2m", {}),
    ("sample_euler_ancestral", {"eta": 0.0}),
    ("sample_dpmpp_2s_ancestral", {"eta": 0.0}),
    ("sample_dpmpp_sde", {"eta": 0.0}),
    ("sample_dpmpp_2m_sde", {"eta": 0.0}),
    ("sample_dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}),
    ("sample_dpmpp_3m_sde", {"eta": 0.0}),
]


def _run_both(kd, name, x, sigmas, options, noises=None):
    """(fastcm's result, k-diffusion's result, their callbacks, their noise_sampler logs)."""
    results, callbacks, logs = [], [], []
    for library in (sampling, kd):
        recorder, log = _Recorder(), []
        kwargs = dict(options)
        if noises is not None:
            kwargs["noise_sampler"] = _noise_sampler(noises, log)
        elif "eta" in options:
            kwargs["noise_sampler"] = _noise_sampler([torch.zeros_like(x)] * 2 * len(sigmas), log)
        out = getattr(library, name)(
            gaussian_denoiser, x.clone(), sigmas, extra_args={"mean": MU}, callback=recorder, disable=True, **kwargs
        )
        results.append(out)
        callbacks.append(recorder.calls)
        logs.append(log)
    return results, callbacks, logs


@pytest.mark.parametrize("name, options", DETERMINISTIC, ids=[f"{n}{o}" for n, o in DETERMINISTIC])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deterministic_samplers_match_kdiffusion(kd, name, options, dtype):
    x, sigmas = _start(dtype), _grid(7, dtype)
    (got, want), (got_calls, want_calls), (got_log, want_log) = _run_both(kd, name, x, sigmas, options)
    assert_close(got, want, dtype)
    _assert_same_callbacks(got_calls, want_calls, dtype)
    assert got_log == pytest.approx(want_log, rel=1e-6)


@pytest.mark.parametrize("name, options", DETERMINISTIC[:3] + DETERMINISTIC[6:7], ids=lambda v: str(v))
def test_deterministic_samplers_on_the_triton_kernels(kd, backend, name, options):
    backend("triton")
    x, sigmas = _start(torch.float32, batch=2, dims=5), _grid(5, torch.float32)
    (got, want), _, _ = _run_both(kd, name, x, sigmas, options)
    assert_close(got, want, torch.float32)


def test_final_step_to_zero_matches_kdiffusion(kd):
    for name, options in DETERMINISTIC:
        x, sigmas = _start(torch.float64), _grid(4, torch.float64, zero=True)
        (got, want), _, _ = _run_both(kd, name, x, sigmas, options)
        assert_close(got, want, torch.float64, name=name)


STOCHASTIC = [
    ("sample_euler_ancestral", {"eta": 1.0, "s_noise": 1.0}),
    ("sample_euler_ancestral", {"eta": 0.6, "s_noise": 1.1}),
    ("sample_dpmpp_2s_ancestral", {"eta": 1.0}),
    ("sample_dpmpp_2s_ancestral", {"eta": 3.0}),  # σ_up = σ' on some steps: σ_down = 0, the Euler branch
    ("sample_dpmpp_sde", {"eta": 1.0}),
    ("sample_dpmpp_sde", {"eta": 0.7, "r": 0.3}),
    ("sample_dpmpp_2m_sde", {"eta": 1.0}),
    ("sample_dpmpp_2m_sde", {"eta": 0.5, "solver_type": "heun", "s_noise": 0.9}),
    ("sample_dpmpp_3m_sde", {"eta": 1.0}),
]


@pytest.mark.parametrize("name, options", STOCHASTIC, ids=[f"{n}{o}" for n, o in STOCHASTIC])
@pytest.mark.parametrize("zero", [False, True])
def test_stochastic_samplers_match_kdiffusion_on_the_same_noise(kd, name, options, zero):
    dtype = torch.float32
    x, sigmas = _start(dtype), _grid(6, dtype, zero=zero)
    noises = [torch.randn_like(x) for _ in range(2 * len(sigmas))]
    (got, want), (got_calls, want_calls), (got_log, want_log) = _run_both(kd, name, x, sigmas, options, noises)
    assert len(got_log) == len(want_log) > 0
    assert got_log == pytest.approx(want_log, rel=1e-6)
    assert_close(got, want, dtype)
    _assert_same_callbacks(got_calls, want_calls, dtype)


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun"])
def test_churn_matches_kdiffusion_on_the_same_noise(kd, monkeypatch, name):
    """k-diffusion draws torch.randn_like(x) at every step (used where γ > 0); fastcm asks its noise_sampler
    for the churn noise (σ, σ̂) only where γ > 0. Both get noises[i] at step i."""
    dtype = torch.float32
    x, sigmas = _start(dtype), _grid(7, dtype)
    noises = [torch.randn_like(x) for _ in range(len(sigmas))]
    options = {"s_churn": 2.0, "s_tmin": 0.1, "s_tmax": 10.0, "s_noise": 1.007}
    by_sigma = {float(s): n for s, n in zip(sigmas, noises)}
    got_calls, want_calls, hats = _Recorder(), _Recorder(), []

    def churn_noise(sigma, sigma_hat):
        hats.append(float(sigma_hat) / float(sigma))
        return by_sigma[float(sigma)]

    got = getattr(sampling, name)(
        gaussian_denoiser, x.clone(), sigmas, {"mean": MU}, got_calls, True, noise_sampler=churn_noise, **options
    )
    stream = iter(noises)
    monkeypatch.setattr(torch, "randn_like", lambda like: next(stream))
    want = getattr(kd, name)(gaussian_denoiser, x.clone(), sigmas, {"mean": MU}, want_calls, True, **options)
    monkeypatch.undo()
    churned = [s for s in sigmas[:-1].tolist() if 0.1 <= s <= 10.0]
    assert len(hats) == len(churned) > 0
    assert hats == pytest.approx([1 + min(2.0 / 6, math.sqrt(2) - 1)] * len(churned))
    assert_close(got, want, dtype)
    _assert_same_callbacks(got_calls.calls, want_calls.calls, dtype)


@pytest.mark.parametrize("name, options", STOCHASTIC[::2], ids=lambda v: str(v))
def test_stochastic_samplers_own_noise_is_reproducible_and_has_kdiffusions_law(kd, name, options):
    """Without noise_sampler: fastcm's seeded noise, the same for the same seed; its samples have the law of
    k-diffusion's with torch.randn_like noise (mean and variance within 5 standard errors of each other; on
    this coarse grid both differ from the data law by the discretisation error)."""
    sigmas = _grid(10, torch.float64, zero=True)
    x = _start(torch.float64, batch=20000, dims=1)
    run = lambda **kw: getattr(sampling, name)(gaussian_denoiser, x, sigmas, {"mean": MU}, **options, **kw)  # noqa
    a = run(seed=5)
    assert torch.equal(a, run(seed=5))
    assert not torch.equal(a, run(seed=6))
    b = getattr(kd, name)(
        gaussian_denoiser,
        x,
        sigmas,
        {"mean": MU},
        **options,
        noise_sampler=lambda sigma, sigma_next: torch.randn_like(x),
    )
    n = a.numel()
    spread = math.sqrt(a.var().item() / n + b.var().item() / n)
    assert abs(a.mean().item() - b.mean().item()) < 5 * spread
    assert abs(a.var().item() - b.var().item()) < 5 * math.sqrt(2 / n) * (
        a.var().item() + b.var().item()
    ) / 2 * math.sqrt(2)


def test_the_swap_is_the_only_change(kd):
    """The script k-diffusion documents, positional arguments included, run with either module."""
    x, sigmas = _start(torch.float32), _grid(6, torch.float32, zero=True)
    for name in ("sample_euler", "sample_heun", "sample_dpmpp_2m"):
        want = getattr(kd, name)(gaussian_denoiser, x, sigmas, {"mean": MU}, None, True)
        got = getattr(sampling, name)(gaussian_denoiser, x, sigmas, {"mean": MU}, None, True)
        assert_close(got, want, torch.float32, name=name)


def test_sigma_grids_match_kdiffusion(kd):
    from fastcm import schedules

    got = schedules.exponential_sigmas(9, sigma_min=0.03, sigma_max=14.6)
    want = kd.get_sigmas_exponential(9, 0.03, 14.6)
    torch.testing.assert_close(got.float(), want, rtol=2e-6, atol=0)
    got = schedules.polyexponential_sigmas(7, sigma_min=0.1, sigma_max=80.0, rho=2.5)
    torch.testing.assert_close(got.float(), kd.get_sigmas_polyexponential(7, 0.1, 80.0, rho=2.5), rtol=2e-6, atol=0)
    got = sampling.karras_sigmas(6, sigma_min=0.1, sigma_max=80.0, append_zero=True)
    torch.testing.assert_close(got.float(), kd.get_sigmas_karras(6, 0.1, 80.0), rtol=2e-6, atol=0)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: sampling.sample_euler(gaussian_denoiser, torch.randn(2, 3), [1.0, 0.0], extra_args=[1]),
            TypeError,
            r"extra_args must be a dict of keyword arguments for the model or None, got list",
        ),
        (
            lambda: sampling.sample_euler(gaussian_denoiser, torch.randn(2, 3), [1.0, 0.0], s_churn=-1.0),
            ValueError,
            r"sample_euler: s_churn=-1.0 is not supported; expected a float >= 0",
        ),
        (
            lambda: sampling.sample_euler_ancestral(gaussian_denoiser, torch.randn(2, 3), [1.0, 0.0], eta=-0.5),
            ValueError,
            r"sample_euler_ancestral: eta=-0.5 is not supported",
        ),
        (
            lambda: sampling.sample_dpmpp_2m_sde(gaussian_denoiser, torch.randn(2, 3), [1.0, 0.0], solver_type="rk"),
            ValueError,
            r"solver_type='rk' is not supported; expected one of \('midpoint', 'heun'\)",
        ),
        (
            lambda: sampling.sample_dpmpp_sde(gaussian_denoiser, torch.randn(2, 3), [1.0, 0.0], r=0.0),
            ValueError,
            r"sample_dpmpp_sde: r=0.0 is not supported; expected a float in \(0, 1\]",
        ),
        (
            lambda: sampling.sample_dpmpp_3m_sde(gaussian_denoiser, torch.randn(2, 3), [1.0, 2.0]),
            ValueError,
            r"sample_dpmpp_3m_sde: sigmas \[1.0, 2.0\] must not increase",
        ),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name, options",
    STOCHASTIC[::2] + [("sample_euler", {"s_churn": 3.0}), ("sample_heun", {"s_churn": 3.0})],
    ids=lambda v: str(v),
)
def test_capture_matches_uncaptured_loop(name, options):
    """A captured stochastic loop replays the same in-kernel noise as the uncaptured one (the warm-up run
    restarts the counters)."""
    x = _start(torch.float32, batch=8, dims=4096).cuda()
    sigmas = _grid(6, torch.float32, zero=True).cuda()
    sampler = getattr(sampling, name)
    plain = sampler(gaussian_denoiser, x, sigmas, {"mean": MU}, **options, seed=17)
    captured = sampler(gaussian_denoiser, x, sigmas, {"mean": MU}, **options, seed=17, capture=True)
    assert torch.equal(plain, captured)


def test_loops_restart_their_noise_per_run(monkeypatch):
    """What capture relies on, checked on the CPU: the loop body run twice draws the same noise twice."""
    x, sigmas = _start(torch.float64), _grid(6, torch.float64, zero=True)
    calls = []
    real = sampling._run
    monkeypatch.setattr(sampling, "_run", lambda op, loop, x, *rest: calls.append(loop) or real(op, loop, x, *rest))
    first = sampling.sample_dpmpp_2m_sde(gaussian_denoiser, x, sigmas, {"mean": MU}, seed=3)
    assert torch.equal(calls[0](x.clone()), first)
