"""Kernel launches as torch.library custom ops.

Two callers need the dispatcher: torch.compile, which then sees one opaque node per launch
instead of breaking the graph, and torch.func transforms, whose wrapped tensors have no
storage a kernel could read (the dispatcher unwraps them for a custom op). Plain eager calls
skip the dispatcher, which costs ~10-20 µs of host time per launch.
"""

import functools
import importlib
import types

import torch


def _inside_functorch_transform() -> bool:
    return torch._C._functorch.maybe_current_level() is not None


def on_tensors_device(launcher):
    """`launcher` run with the current CUDA device set to that of its first CUDA tensor argument.
    A Triton launch goes to the current device and its current stream, which need not be the
    tensors' (a process that moved its model to cuda:1 without torch.cuda.set_device)."""

    @functools.wraps(launcher)
    def run(*args):
        device = next((arg.device for arg in args if isinstance(arg, torch.Tensor) and arg.is_cuda), None)
        if device is None:
            return launcher(*args)
        with torch.cuda.device(device):
            return launcher(*args)

    return run


def kernel_op(name: str, launcher, fake):
    """Register `launcher` (fully type-annotated) as the custom op fastcm::<name> with the fake
    (meta) implementation `fake`; return a caller that uses the op under torch.compile or a
    torch.func transform and calls `launcher` directly otherwise. Both run it on the device of
    its tensors (on_tensors_device)."""
    launcher = on_tensors_device(launcher)
    op = torch.library.custom_op(f"fastcm::{name}", mutates_args=())(launcher)
    op.register_fake(fake)

    def call(*args):
        if torch.compiler.is_compiling() or _inside_functorch_transform():
            return op(*args)
        return launcher(*args)

    call.__name__ = name
    call.__doc__ = launcher.__doc__
    return call


def gradients(input_names, **named):
    """The tuple an autograd.Function's backward returns, one entry per forward input in the order
    of `input_names`, with the named gradients in place and None elsewhere."""
    unknown = set(named) - set(input_names)
    if unknown:
        raise KeyError(f"gradients for inputs the Function does not take: {sorted(unknown)}")
    return tuple(named.get(name) for name in input_names)


class _Missing:
    def __init__(self, family: str):
        self._family = family

    def __getattr__(self, name):
        raise RuntimeError(f"fastcm.{self._family}: the Triton kernels need triton, which is not installed")


def kernel_ops(family: str, specs: dict):
    """The custom ops of one op family, registered now: registering inside a torch.compile trace
    is not traceable, so it cannot wait for the first call.

    specs maps an attribute name to (launcher name in fastcm.kernels.<family>, fake); the result
    has one caller (see kernel_op), the custom op fastcm::<family>_<attribute>, per attribute.
    Without triton, using any of them raises.
    """
    from ._backend import triton_installed

    if not triton_installed():
        return _Missing(family)
    launchers = importlib.import_module(f"fastcm.kernels.{family}")
    return types.SimpleNamespace(
        **{
            attribute: kernel_op(f"{family}_{attribute}", getattr(launchers, launcher_name), fake)
            for attribute, (launcher_name, fake) in specs.items()
        }
    )
