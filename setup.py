"""Build of fastcm: the Python packages plus the C++/CUDA extension fastcm._C from csrc/.

Environment (see ENVs.md):
  FASTCM_SKIP_EXTENSION=1   build no extension (attention then needs the JIT build at first use)
  FASTCM_SKIP_CUDA=1        build only the C++ CPU part even where nvcc and a CUDA torch exist
  FASTCM_CUDA_ARCH_LIST     CUDA archs, e.g. "8.0;9.0a" (default); overrides TORCH_CUDA_ARCH_LIST
  MAX_JOBS                  parallel compile jobs (default: from cores and free memory)
  FASTCM_NVCC_FLAGS         extra nvcc flags, space-separated (e.g. "-Xptxas -v" for the register report)
"""

import glob
import os

from setuptools import setup

PACKAGES = ["fastcm", "fastcm.reference", "fastcm.kernels"]
PACKAGE_DIR = {"fastcm": "fastcm", "fastcm.kernels": "kernels"}


def _default_jobs() -> int:
    try:
        free_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        free_gib = 8.0
    # nvcc on flash-style templates peaks near 4 GiB per job.
    return max(1, min(os.cpu_count() or 1, int(free_gib // 4)))


def _extensions():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    if os.environ.get("FASTCM_SKIP_EXTENSION") == "1" or not cpp_sources:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(_default_jobs()))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = (
        bool(cuda_sources)
        and CUDA_HOME is not None
        and torch.version.cuda is not None
        and os.environ.get("FASTCM_SKIP_CUDA") != "1"
    )
    cxx_flags = ["-O3", "-std=c++17"]
    if not with_cuda:
        ext = CppExtension("fastcm._C", cpp_sources, extra_compile_args={"cxx": cxx_flags})
    else:
        arch_list = os.environ.get("FASTCM_CUDA_ARCH_LIST", "8.0;9.0a")
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        macros = [("FASTCM_WITH_CUDA", "1")]
        # The wgmma / TMA kernels exist only in sm_90a code; the host may pick them only then
        # ("9.0a" or "9.0a+PTX").
        if any(arch.split("+")[0] == "9.0a" for arch in arch_list.replace(" ", ";").split(";")):
            macros.append(("FASTCM_WITH_SM90A", "1"))
        ext = CUDAExtension(
            "fastcm._C",
            cpp_sources + cuda_sources,
            define_macros=macros,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo"]
                + os.environ.get("FASTCM_NVCC_FLAGS", "").split(),
            },
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
