"""Kernel launches as torch.library custom ops.

Two callers need the dispatcher: torch.compile, which then sees one opaque node per launch
instead of breaking the graph, and torch.func transforms, whose wrapped tensors have no
storage a kernel could read (the dispatcher unwraps them for a custom op). Plain eager calls
skip the dispatcher, which costs ~10-20 µs of host time per launch.
"""

import torch


def _inside_functorch_transform() -> bool:
    return torch._C._functorch.maybe_current_level() is not None


def kernel_op(name: str, launcher, fake):
    """Register `launcher` (fully type-annotated) as the custom op fastcm::<name> with the fake
    (meta) implementation `fake`; return a caller that uses the op under torch.compile or a
    torch.func transform and calls `launcher` directly otherwise."""
    op = torch.library.custom_op(f"fastcm::{name}", mutates_args=())(launcher)
    op.register_fake(fake)

    def call(*args):
        if torch.compiler.is_compiling() or _inside_functorch_transform():
            return op(*args)
        return launcher(*args)

    call.__name__ = name
    call.__doc__ = launcher.__doc__
    return call
