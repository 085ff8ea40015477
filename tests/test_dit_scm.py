"""examples/dit_scm.py: its first training steps agree between fastcm's kernels and the reference, its
loss falls, it runs end to end, and its step under DDP (2 processes, gloo) equals the single-process
step with the same global batch."""

import math
import os
import pathlib
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import DEVICE

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import dit_scm  # noqa: E402

GLOBAL_BATCH = 8


def _digits(count):
    (images, _), _ = dit_scm.load_digits_16()
    return images[:count]


def _steps(recipe, steps, batch, optimizer="sgd", tangent="jvp", lr=0.05):
    """Losses and final parameters of `steps` steps from seed 1 on the first `batch` training digits."""
    torch.manual_seed(1)
    net = dit_scm.make_net(recipe)
    optimizer = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(2)
    images = _digits(256)
    losses = []
    for step in range(steps):
        x0 = images[torch.randint(len(images), (batch,), generator=generator)]
        noise = dit_scm.draw_noise(recipe, batch, generator)
        losses.append(dit_scm.train_step(net, optimizer, x0, step, steps, noise, recipe, tangent))
    return losses, [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("recipe", dit_scm.LOSSES)
def test_first_steps_match_reference(recipe, backend):
    """ "auto" on CPU tensors runs the attention (forward, fused JVP, backward) on the extension's C++
    kernels; the reference runs fastcm/reference everywhere."""
    backend("auto")
    losses, params = _steps(recipe, 2, 8)
    backend("reference")
    want_losses, want_params = _steps(recipe, 2, 8)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    for got, want in zip(params, want_params):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_finite_difference_tangent_approximates_the_jvp():
    torch.manual_seed(0)
    net = dit_scm.make_net("scm")
    for p in net.parameters():  # leave the zero initialisation, so the output depends on the input
        p.data.add_(0.05 * torch.randn_like(p))
    x, x_t = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)
    t, t_t = torch.rand(4) + 0.2, torch.rand(4)
    F, jvp = dit_scm.jvp_tangent(net, x, t, x_t, t_t)
    F_fd, fd = dit_scm.finite_difference_tangent(net, x, t, x_t, t_t)
    torch.testing.assert_close(F_fd, F)
    # Central differences in float32 with ε = 1e-3: truncation O(ε²) and rounding O(2⁻²⁴/ε) ≈ 1e-4.
    assert (fd - jvp).abs().max() <= 2e-3 * jvp.abs().max()


def _denoising_error(recipe, net, x0):
    """Mean squared error of the consistency function's clean estimate at σ = 0.78 (TrigFlow t = 1)."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5)).to(x0.device)
    with torch.no_grad():
        if recipe == "scm":
            t = torch.ones(len(x0), device=x0.device)
            estimate = dit_scm.trigflow_f(net, torch.cos(t[0]) * x0 + torch.sin(t[0]) * 0.5 * noise, t)
        else:
            sigma = torch.full((len(x0),), 0.5 * math.tan(1.0), device=x0.device)
            estimate = dit_scm.cm_f(net, x0 + sigma[0] * noise, sigma)
    return ((estimate - x0) ** 2).mean().item()


@pytest.mark.parametrize("recipe", dit_scm.LOSSES)
def test_training_improves_the_denoiser(recipe):
    """The sCM loss of a normalised tangent stays near 1/d by construction, so progress is measured on
    what both recipes train: the one-call clean estimate of noisy held-out digits. The untrained
    network (zero output layer) returns the skip term alone. Trained on the device under test, as the
    example trains (on cuda: bfloat16 autocast and fastcm's Triton kernels)."""
    (images, _), (held_out, _) = dit_scm.load_digits_16()
    images, held_out = images.to(DEVICE), held_out[:64].to(DEVICE)
    torch.manual_seed(1)
    net = dit_scm.make_net(recipe).to(DEVICE)
    optimizer = torch.optim.Adam(net.parameters(), lr=dit_scm.DEFAULT_LR[recipe])
    generator = torch.Generator().manual_seed(2)
    before = _denoising_error(recipe, net, held_out)
    losses = []
    for step in range(40):
        x0 = images[torch.randint(len(images), (16,), generator=generator).to(DEVICE)]
        losses.append(
            dit_scm.train_step(net, optimizer, x0, step, 40, dit_scm.draw_noise(recipe, 16, generator), recipe)
        )
    assert _denoising_error(recipe, net, held_out) < 0.7 * before
    if recipe == "ect":
        assert sum(losses[-10:]) < sum(losses[:10]), losses


def test_runs_end_to_end(tmp_path):
    out = dit_scm.main(["--steps", "4", "--batch", "8", "--samples", "200", "--out", str(tmp_path), "--no-progress"])
    assert out["accuracy"] > 0.9  # the feature extractor is a working digit classifier
    results = out["results"]
    assert set(results) == {
        "real (training digits)",
        "noise",
        "fastcm 1-step",
        "fastcm 2-step",
        "reference 1-step",
        "reference 2-step",
    }
    assert results["real (training digits)"]["FD"] < 0.2 * results["noise"]["FD"]
    # 200 real digits: every class is expected ~20 times, well above the 5% (10) coverage threshold.
    assert results["real (training digits)"]["coverage"] == 10
    assert (tmp_path / "samples.png").stat().st_size > 0 and (tmp_path / "loss.png").stat().st_size > 0


# ------------------------------------------------------------------ DDP


def _wrap(net, mode):
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(net)
    from torch.distributed.fsdp import fully_shard

    for block in net.blocks:
        fully_shard(block)
    return fully_shard(net)


def _parallel_worker(rank, world, port, mode, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(1)
        net = _wrap(dit_scm.make_net("scm"), mode)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        losses = []
        for step, (x0, (t, z)) in enumerate(_global_batches()):
            share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
            losses.append(dit_scm.train_step(net, optimizer, x0[share], step, 10, (t[share], z[share])))
        # FSDP2 parameters are DTensor shards: gathered to the full tensors to compare.
        results[rank] = (
            losses,
            [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in net.parameters()],
        )
    finally:
        dist.destroy_process_group()


def _global_batches(steps=2):
    generator = torch.Generator().manual_seed(2)
    images = _digits(64)
    return [
        (
            images[torch.randint(64, (GLOBAL_BATCH,), generator=generator)],
            dit_scm.draw_noise("scm", GLOBAL_BATCH, generator),
        )
        for _ in range(steps)
    ]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_data_parallel_step_matches_single_process(mode):
    """2 ranks × 4 samples, under DDP or FSDP2 (fully_shard per block and at the root; torch.func.jvp
    runs through the sharded network), give the parameters of one process on the 8 samples after two
    sCM steps (gradients averaged over ranks; the loss is a batch mean); the ranks' mean loss is the
    single-process loss."""
    world = 2
    results = mp.Manager().dict()
    mp.spawn(_parallel_worker, args=(world, _free_port(), mode, results), nprocs=world, join=True)
    torch.manual_seed(1)
    net = dit_scm.make_net("scm")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    losses = [
        dit_scm.train_step(net, optimizer, x0, step, 10, noise) for step, (x0, noise) in enumerate(_global_batches())
    ]
    rank_mean = [sum(results[r][0][i] for r in range(world)) / world for i in range(len(losses))]
    assert rank_mean == pytest.approx(losses, rel=1e-5)
    for r in range(world):
        for got, want in zip(results[r][1], net.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
