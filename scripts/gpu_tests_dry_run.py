"""The GPU tests' own logic on a machine without a GPU: tests/test_attention_cuda.py on CPU tensors,
with the C++ CPU kernels standing in for the CUDA ones and the kernel-name ops answered as a
non-Hopper device would (through the index models' plans). It checks the tests, not the kernels:
reference and tolerance code, shapes, expected names, before device time is spent on them.

    .venv/bin/python scripts/gpu_tests_dry_run.py [extra pytest args]

Deselected: what only the CUDA ops accept or read (fp32 and bool bias tensors with bf16/fp16
inputs, the FASTCM_ATTN_* switches and their errors), and the public API's routing of fp32 CUDA
inputs to the reference.
"""

import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
DESELECT = ("not f32 and not bool_mask and not with_tangent and not kernel_choice and not bad_input"
            " and not aten_fallback and not fully_masked and not dqk256_bias")

CONFTEST = f'''
import sys
import pytest
import torch
sys.path.insert(0, {str(ROOT / "tests" / "cuda_index_model")!r})
torch.cuda.synchronize = lambda *a, **k: None


@pytest.fixture(autouse=True)
def _seed():   # as tests/conftest.py does
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    import test_attention_cuda as m
    from test_attention_bwd_sm90_index_model import plan_backward
    from test_attention_fwd_sm90_index_model import plan_forward_launch
    from fastcm._extension import extension_ops
    real = extension_ops()

    class Ops:
        def __getattr__(self, name):
            return getattr(real, name)

        def attention_forward_kernels(self, q, v, jvp, has_bias, has_bias_t):
            d8 = lambda d: (d + 7) // 8 * 8
            names = []
            for c0 in range(0, d8(v.shape[3]), 128):
                name, a, b = plan_forward_launch(0, False, True, True, d8(q.shape[3]), min(128, d8(v.shape[3]) - c0),
                                                 jvp, has_bias, jvp and has_bias_t)
                names.append(f"{{name}} ({{a}}, {{b}})")
            return names

        def attention_backward_kernels(self, q, v, has_bias):
            kernel, kd = plan_backward(0, True, q.shape[3], v.shape[3], has_bias, 163 * 1024)
            return ["aten" if kd == 0 else f"{{kernel}} ({{kd}})"]

    ops = Ops()
    m._ops = lambda: ops
    m._hopper = lambda: False
    m._poison_allocator = lambda *a, **k: None
'''


def main():
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("test_attention_cuda.py", "helpers.py"):
            shutil.copy(ROOT / "tests" / name, tmp)
        (pathlib.Path(tmp) / "conftest.py").write_text(CONFTEST)
        command = [sys.executable, "-m", "pytest", "test_attention_cuda.py", "-q", "-p", "no:cacheprovider",
                   "-W", "ignore::pytest.PytestUnknownMarkWarning", "-k", DESELECT] + sys.argv[1:]
        sys.exit(subprocess.run(command, cwd=tmp).returncode)


if __name__ == "__main__":
    main()
