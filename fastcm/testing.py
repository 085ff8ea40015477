"""Helpers for tests and benchmarks of host overhead: counting the ATen ops a call dispatches."""

import collections
from typing import Callable, Tuple

from torch.utils._python_dispatch import TorchDispatchMode


class AtenOpCounter(TorchDispatchMode):
    """A context manager counting the ops that reach the dispatcher's Python key (ATen ops and
    custom ops, after autograd and functorch have unwrapped them): `count` in all, `ops` per op.

        with AtenOpCounter() as counter:
            model(x)
        print(counter.count, counter.ops.most_common(5))
    """

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_aten_ops(fn: Callable, *args, **kwargs) -> Tuple[object, int]:
    """(fn(*args, **kwargs), the number of ops it dispatched)."""
    with AtenOpCounter() as counter:
        result = fn(*args, **kwargs)
    return result, counter.count


__all__ = ["AtenOpCounter", "count_aten_ops"]
