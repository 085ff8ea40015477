"""What every benchmark shares: the Case record, timing, the memory/compute floors and the
pytest-benchmark adapter.

A Case times three implementations of one computation on the same inputs: the eager PyTorch
reference, torch.compile of that reference, and fastcm. Its floor is the larger of
min_bytes / measured copy bandwidth and flops / measured matmul rate, both measured in the
same run as the cases.
"""

import dataclasses
import statistics
import time
from typing import Callable, Optional, Tuple

import torch

L2_BYTES = 50 * 2**20  # H100; inputs smaller than 2x this are rotated through several copies


@dataclasses.dataclass
class Case:
    family: str
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    make_inputs: Callable[[], tuple]
    reference: Callable
    fastcm: Callable
    min_bytes: int
    flops: int = 0
    compile_reference: bool = True

    @property
    def id(self) -> str:
        dims = "x".join(str(d) for d in self.shape)
        return f"{self.family}/{self.name}/{dims}/{str(self.dtype).replace('torch.', '')}"


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rotating(fn: Callable, input_sets: list) -> Callable[[], object]:
    """A zero-argument callable that runs fn on the next input set each call, so repeated
    timing does not measure inputs already sitting in L2."""
    state = {"i": 0}

    def call():
        args = input_sets[state["i"] % len(input_sets)]
        state["i"] += 1
        return fn(*args)

    return call


def input_sets_for(case: Case) -> list:
    first = case.make_inputs()
    copies = 1
    if case.flops == 0:
        copies = max(1, min(8, -(-2 * L2_BYTES // max(case.min_bytes, 1))))
    return [first] + [case.make_inputs() for _ in range(copies - 1)]


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds of fn(): CUDA events via triton.testing.do_bench on GPU, a host
    clock around each call (after synchronising) on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


_host_peak_tracking = False


def track_host_peak_memory() -> bool:
    """Make peak host memory measurable (Linux, glibc): tensors above 64 KiB get their own
    mmap, so freeing one returns it to the OS and the resident-set high-water mark tracks
    what is live. Call once, before timing, so every case runs under the same allocator."""
    global _host_peak_tracking
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold, m_trim_threshold = -3, -1
        fixed = libc.mallopt(m_mmap_threshold, 64 * 2**10) and libc.mallopt(m_trim_threshold, 64 * 2**10)
        _host_peak_tracking = bool(fixed) and _read_status_mb("VmHWM:") is not None
    except (OSError, AttributeError):
        _host_peak_tracking = False
    return _host_peak_tracking


def _read_status_mb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return None


def _host_peak_mb(fn: Callable[[], object]) -> Optional[float]:
    fn()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return None
    base = _read_status_mb("VmRSS:")
    fn()
    return _read_status_mb("VmHWM:") - base


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory allocated during one call, above what was allocated before: the CUDA
    allocator's counters on GPU; on CPU the resident-set high-water mark (None unless
    track_host_peak_memory() succeeded)."""
    if device.type != "cuda":
        return _host_peak_mb(fn) if _host_peak_tracking else None
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device copy (bytes read + bytes written)."""
    numel = (256 if device.type == "cuda" else 16) * 2**20
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in `dtype` (float32 on CPU)."""
    n = 8192 if device.type == "cuda" else 512
    dtype = dtype if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3)


def make_pytest_benchmark(cases_fn: Callable[[torch.device, bool], list]):
    """A pytest-benchmark test over every case of a family (fastcm implementation only)."""
    import pytest

    device = bench_device()
    cases = cases_fn(device, device.type != "cuda")

    @pytest.mark.parametrize("case", cases, ids=[c.id for c in cases])
    def test_case(benchmark, case):
        call = rotating(case.fastcm, input_sets_for(case))

        def run():
            call()
            _synchronize(device)

        benchmark(run)

    return test_case
