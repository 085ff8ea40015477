"""The examples' training steps and samplers give the same result on fastcm's kernels as on the
reference, so the examples exercise fastcm's fast path faithfully, and they run end to end."""

import collections
import importlib
import pathlib
import sys

import pytest
import torch

import fastcm.nn
from helpers import DEVICE

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import flow_distill_toy  # noqa: E402
import ict_toy  # noqa: E402
import meanflow_toy  # noqa: E402
import scm_attention_toy  # noqa: E402
import scm_toy  # noqa: E402
import toy  # noqa: E402

attention_module = importlib.import_module("fastcm.attention")


def _scm_step(net, optimizer, x0, generator, shape=(2,)):
    loss = scm_toy.train_step(net, optimizer, x0, step=5, warmup_steps=10, generator=generator)
    return loss, scm_toy.sample(net, 16, 2, torch.Generator().manual_seed(3), DEVICE, shape=shape)


def _ict_step(net, optimizer, x0, generator):
    loss = ict_toy.train_step(net, optimizer, x0, step=5, total_steps=10, generator=generator)
    # One step: sample_cm's re-noising draws Philox noise whose stream differs between backends.
    return loss, ict_toy.sample(net, 16, 1, seed=3, device=DEVICE)


def _scm_attention_step(net, optimizer, x0, generator):
    return _scm_step(net, optimizer, x0, generator, shape=(scm_attention_toy.POINTS, 2))


def _meanflow_step(net, optimizer, x0, generator):
    loss = meanflow_toy.train_step(net, optimizer, x0, generator)
    return loss, meanflow_toy.sample(net, 16, 2, torch.Generator().manual_seed(3), DEVICE)


def _flow_distill_step(net, optimizer, x0, generator):
    loss = flow_distill_toy.distill_step(net, optimizer, x0, step=5, warmup_steps=10, generator=generator)
    return loss, scm_toy.sample(net, 16, 2, torch.Generator().manual_seed(3), DEVICE)


# name: (example module, its problem (Net, sample_data), one training step + sampling, the fast
# backend). "auto" on CPU tensors runs attention on the extension's C++ kernels and the other ops
# on the reference, so that comparison is the attention kernels' alone; on CUDA tensors every op
# runs its Triton kernels.
EXAMPLES = {
    "scm": (scm_toy, toy, _scm_step, "triton"),
    "ict": (ict_toy, toy, _ict_step, "triton"),
    "scm_attention": (scm_attention_toy, scm_attention_toy, _scm_attention_step, "auto"),
    "meanflow": (meanflow_toy, meanflow_toy.PROBLEM, _meanflow_step, "triton"),
    "flow_distill": (flow_distill_toy, toy, _flow_distill_step, "triton"),
}


def _one_step(example, backend_name, backend):
    _, problem, step, _ = EXAMPLES[example]
    backend(backend_name)
    torch.manual_seed(1)
    net = problem.Net(width=32)
    for module in net.modules():
        if isinstance(module, fastcm.nn.Attention):
            # On CUDA the example runs attention in bfloat16 (the extension's kernels), in both runs:
            # two bfloat16 attentions agree only to bfloat16's precision. Kept in float32, the
            # comparison is of float32 kernels, at the float32 tolerance below.
            module.cuda_dtype = None
    net = net.to(DEVICE)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(2)  # the examples draw on the CPU and copy to the device
    loss, samples = step(net, optimizer, problem.sample_data(16, generator, DEVICE), generator)
    return loss, [p.detach().clone() for p in net.parameters()], samples


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_example_train_step_and_sampling_match_reference(example, backend):
    loss, params, samples = _one_step(example, EXAMPLES[example][3], backend)
    want_loss, want_params, want_samples = _one_step(example, "reference", backend)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for got, want in zip(params, want_params):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(samples, want_samples, rtol=1e-5, atol=1e-6)


def test_attention_example_takes_the_fused_jvp_and_backward(monkeypatch):
    """One sCM step of the transformer calls, per block, the fused forward+JVP kernel once (in
    torch.func.jvp: no separate primal pass), the primal kernel once (the loss's forward) and the
    backward kernel once."""
    calls = collections.Counter()
    ops = attention_module._ops()

    class CountingOps:
        def __getattr__(self, name):
            calls[name] += 1
            return getattr(ops, name)

    monkeypatch.setattr(attention_module, "_ops", CountingOps)
    torch.manual_seed(1)
    net = scm_attention_toy.Net(width=32, blocks=3)
    generator = torch.Generator().manual_seed(2)
    scm_toy.train_step(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        scm_attention_toy.sample_data(8, generator),
        step=5,
        warmup_steps=10,
        generator=generator,
    )
    assert calls == {"attention_forward_jvp": 3, "attention_forward": 3, "attention_backward": 3}


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_example_runs_end_to_end(example):
    results = EXAMPLES[example][0].main(["--steps", "20", "--batch", "64", "--device", DEVICE])
    assert set(results) == {"noise", "data", "1-step", "2-step"}
    assert all(torch.isfinite(torch.tensor(v)) for v in results.values())
    assert results["data"] < 0.1 < results["noise"]  # the metric separates data from noise
