"""The example's training step and sampler give the same result on the Triton kernels as on
the reference, so the example exercises fastcm's fast path faithfully."""

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import scm_toy  # noqa: E402


def _one_step(backend_name, backend):
    backend(backend_name)
    torch.manual_seed(1)
    net = scm_toy.Net(width=32)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(2)
    x0 = scm_toy.sample_data(16, generator)
    loss = scm_toy.train_step(net, optimizer, x0, step=5, warmup_steps=10, generator=generator)
    samples = scm_toy.sample(net, 16, 2, torch.Generator().manual_seed(3))
    return loss, [p.detach().clone() for p in net.parameters()], samples


def test_example_train_step_and_sampling_match_reference(backend):
    loss, params, samples = _one_step("triton", backend)
    want_loss, want_params, want_samples = _one_step("reference", backend)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for got, want in zip(params, want_params):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(samples, want_samples, rtol=1e-5, atol=1e-6)


def test_example_runs_end_to_end():
    results = scm_toy.main(["--steps", "20", "--batch", "64"])
    assert set(results) == {"noise", "data", "1-step", "2-step"}
    assert all(torch.isfinite(torch.tensor(v)) for v in results.values())
    assert results["data"] < 0.1 < results["noise"]  # the metric separates data from noise
