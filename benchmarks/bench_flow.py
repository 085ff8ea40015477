"""Flow-family benchmarks: prediction conversion, forward noising, the flow map, the flow-map loss and
the DMD / denoising losses, forward and forward+backward.

N = elements of one input tensor, s = bytes per element. Floor = each needed input read once, each
output written once; "fastcm traffic" is what the launches move when nothing is served from L2:

| case                      | floor | fastcm traffic                                                 |
|---------------------------|-------|----------------------------------------------------------------|
| convert_prediction fwd    | 3N·s  | read x_t, pred; write out (one launch)                         |
| add_noise (noise given)   | 4N·s  | read x0, ε; write x_t and the target (one launch)              |
| add_noise (Philox)        | 3N·s  | read x0; write x_t and the target; ε drawn in registers        |
| flow_map fwd              | 3N·s  | read x_t, u; write out                                         |
| flow_map_loss fwd+bwd     | 6N·s  | the sCM loss kernels with v read twice (as x_t and as dx_t/dt) |
| dmd fwd+bwd               | 6N·s  | fwd reads x, D_real, D_fake; bwd reads D_real, D_fake, writes  |
| denoising fwd+bwd         | 7N·s  | fwd reads net_out, x0, ε; bwd re-reads the three, writes grad  |

Measured GPU figures go to benchmarks/results/; none is claimed here.
"""

import torch

import fastcm
from fastcm.reference import dmd as reference_dmd
from fastcm.reference import flow as reference

from .common import Case, make_pytest_benchmark

GPU_SHAPE = (64, 4, 128, 128)
CPU_SHAPE = (8, 4, 32, 32)


def _bytes(shape, dtype, tensors_moved):
    return tensors_moved * torch.Size(shape).numel() * torch.finfo(dtype).bits // 8


def _grad_of(loss_fn, n_grad):
    def run(*inputs):
        return torch.autograd.grad(loss_fn(*inputs), inputs[:n_grad])

    return run


def _randn(shape, device, dtype, requires_grad=False):
    return torch.randn(shape, device=device, dtype=dtype, requires_grad=requires_grad)


def _elementwise_cases(device, shape, dtype):
    batch = shape[0]

    def two_tensors_and_time():
        return _randn(shape, device, dtype), _randn(shape, device, dtype), torch.rand(batch, device=device) * 0.8 + 0.1

    def flow_map_inputs():
        t = torch.rand(batch, device=device)
        return _randn(shape, device, dtype), _randn(shape, device, dtype), t, t * 0.5

    convert = dict(schedule="flow", source="flow", target="trigflow")
    noising = dict(schedule="trigflow", target="velocity")
    return [
        Case(
            "flow",
            "convert_prediction fwd",
            shape,
            dtype,
            two_tensors_and_time,
            lambda x, p, t: reference.convert_prediction(x, p, t, **convert),
            lambda x, p, t: fastcm.convert_prediction(x, p, t, **convert),
            min_bytes=_bytes(shape, dtype, 3),
        ),
        Case(
            "flow",
            "add_noise noise given",
            shape,
            dtype,
            two_tensors_and_time,
            lambda x0, e, t: reference.add_noise(x0, e, t, **noising),
            lambda x0, e, t: fastcm.add_noise(x0, t, noise=e, **noising),
            min_bytes=_bytes(shape, dtype, 4),
        ),
        Case(
            "flow",
            "add_noise philox",
            shape,
            dtype,
            two_tensors_and_time,
            lambda x0, e, t: reference.add_noise(x0, torch.randn_like(x0), t, **noising),
            lambda x0, e, t: fastcm.add_noise(x0, t, seed=0, **noising),
            min_bytes=_bytes(shape, dtype, 3),
        ),
        Case(
            "flow",
            "flow_map fwd",
            shape,
            dtype,
            flow_map_inputs,
            reference.flow_map,
            fastcm.flow_map,
            min_bytes=_bytes(shape, dtype, 3),
        ),
    ]


def _loss_cases(device, shape, dtype):
    batch = shape[0]

    def flow_map_loss_inputs():
        u = _randn(shape, device, dtype, requires_grad=True)
        return (u, u.detach().clone(), _randn(shape, device, dtype), _randn(shape, device, dtype))

    def dmd_inputs():
        return (
            _randn(shape, device, dtype, requires_grad=True),
            _randn(shape, device, dtype),
            _randn(shape, device, dtype),
        )

    def denoising_inputs():
        return (
            _randn(shape, device, dtype, requires_grad=True),
            _randn(shape, device, dtype),
            _randn(shape, device, dtype),
            torch.rand(batch, device=device),
        )

    def denoising(impl):
        return lambda out, x0, e, t: impl(out, x0, e, t, schedule="flow", prediction="flow")

    return [
        Case(
            "flow",
            "flow_map_loss fwd+bwd",
            shape,
            dtype,
            flow_map_loss_inputs,
            _grad_of(lambda u, um, uj, v: reference.flow_map_loss(u, um, uj, v, r=0.5), 1),
            _grad_of(lambda u, um, uj, v: fastcm.flow_map_loss(u, um, uj, v, r=0.5), 1),
            min_bytes=_bytes(shape, dtype, 6),
        ),
        Case(
            "flow",
            "dmd fwd+bwd",
            shape,
            dtype,
            dmd_inputs,
            _grad_of(reference_dmd.dmd_loss, 1),
            _grad_of(fastcm.dmd_loss, 1),
            min_bytes=_bytes(shape, dtype, 6),
        ),
        Case(
            "flow",
            "denoising fwd+bwd",
            shape,
            dtype,
            denoising_inputs,
            _grad_of(denoising(reference_dmd.denoising_loss), 1),
            _grad_of(denoising(fastcm.denoising_loss), 1),
            min_bytes=_bytes(shape, dtype, 7),
        ),
    ]


def cases(device: torch.device, small: bool):
    shape = CPU_SHAPE if small else GPU_SHAPE
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        out.extend(_elementwise_cases(device, shape, dtype))
        out.extend(_loss_cases(device, shape, dtype))
    return out


test_flow = make_pytest_benchmark(cases)
