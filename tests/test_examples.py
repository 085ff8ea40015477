"""The examples' training steps and samplers give the same result on the Triton kernels as on
the reference, so the examples exercise fastcm's fast path faithfully, and they run end to end."""

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import ict_toy  # noqa: E402
import scm_toy  # noqa: E402
import toy  # noqa: E402


def _scm_step(net, optimizer, x0, generator):
    loss = scm_toy.train_step(net, optimizer, x0, step=5, warmup_steps=10, generator=generator)
    return loss, scm_toy.sample(net, 16, 2, torch.Generator().manual_seed(3))


def _ict_step(net, optimizer, x0, generator):
    loss = ict_toy.train_step(net, optimizer, x0, step=5, total_steps=10, generator=generator)
    # One step: sample_cm's re-noising draws Philox noise whose stream differs between backends.
    return loss, ict_toy.sample(net, 16, 1, seed=3)


EXAMPLES = {"scm": (scm_toy, _scm_step), "ict": (ict_toy, _ict_step)}


def _one_step(example, backend_name, backend):
    backend(backend_name)
    torch.manual_seed(1)
    net = toy.Net(width=32)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(2)
    loss, samples = EXAMPLES[example][1](net, optimizer, toy.sample_data(16, generator), generator)
    return loss, [p.detach().clone() for p in net.parameters()], samples


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_example_train_step_and_sampling_match_reference(example, backend):
    loss, params, samples = _one_step(example, "triton", backend)
    want_loss, want_params, want_samples = _one_step(example, "reference", backend)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for got, want in zip(params, want_params):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(samples, want_samples, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_example_runs_end_to_end(example):
    results = EXAMPLES[example][0].main(["--steps", "20", "--batch", "64"])
    assert set(results) == {"noise", "data", "1-step", "2-step"}
    assert all(torch.isfinite(torch.tensor(v)) for v in results.values())
    assert results["data"] < 0.1 < results["noise"]  # the metric separates data from noise
