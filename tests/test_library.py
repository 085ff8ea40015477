"""fastcm._library: a Triton launch runs on the device of its tensors, not on the current one."""

import contextlib

import torch

from fastcm._library import on_tensors_device


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (this suite runs without a GPU)."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_launch_runs_with_its_tensors_device_current(monkeypatch):
    current = []

    @contextlib.contextmanager
    def set_current(device):
        current.append(torch.device(device))
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(torch.cuda, "device", set_current)
    seen = []

    def launcher(x: torch.Tensor, scale: float) -> torch.Tensor:
        seen.append(list(current))
        return x

    guarded = on_tensors_device(launcher)
    guarded(torch.zeros(2).as_subclass(_OnCuda1), 2.0)
    guarded(torch.zeros(2), 2.0)
    assert seen == [[torch.device("cuda", 1)], []]
    assert guarded.__name__ == "launcher" and guarded.__wrapped__ is launcher
