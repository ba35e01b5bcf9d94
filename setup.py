"""Build sparsepo_lite._C against the torch that is already installed.

CPU machine:  pip install torch==2.13.0 && pip install --no-build-isolation -e ".[dev]"
GPU machine:  pip install --no-build-isolation -e ".[dev]"   (uses the CUDA torch you have)

Build isolation would download another torch (several GB with CUDA) into a throwaway
environment and build against it, so the build needs --no-build-isolation.
SPARSEPO_LITE_CUDA=0|1 forces the CUDA sources off/on (default: on when torch has CUDA
and nvcc is found).
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "sparsepo-lite builds its extension against the torch already installed, and none is.\n"
        "Install torch first (CPU machine: pip install torch==2.13.0), then run\n"
        "  pip install --no-build-isolation -e .\n"
        "(--no-build-isolation: otherwise pip fetches another torch just to build)."
    )


def _use_cuda() -> bool:
    flag = os.environ.get("SPARSEPO_LITE_CUDA", "auto")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not available:
        sys.exit("SPARSEPO_LITE_CUDA=1, but the installed torch has no CUDA or nvcc was not found.")
    return available and flag != "0"


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.relpath(p, here) for p in sorted(glob.glob(os.path.join(here, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, here) for p in sorted(glob.glob(os.path.join(here, "csrc", "cpu", "*.cpp")))]
    cxx = ["-O3", "-fopenmp", "-fdiagnostics-color=always"]
    if not _use_cuda():
        return CppExtension("sparsepo_lite._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    sources += [
        os.path.relpath(p, here)
        for p in sorted(glob.glob(os.path.join(here, "csrc", "cuda", "*")))
        if p.endswith((".cu", ".cpp"))
    ]
    return CUDAExtension(
        "sparsepo_lite._C",
        sources,
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
