"""Build script: a pure-Python package by default; the compiled extension is opt-in.

All metadata lives in pyproject.toml. This file only adds the optional C++ extension
``effnn._C`` (fused CPU kernels: Monarch, csrc/monarch_cpu.cpp; window attention,
csrc/window_attention_cpu.cpp) when the environment says so:

    EFFNN_BUILD_EXT=1 pip install --no-build-isolation --no-deps -e .

With ``EFFNN_BUILD_CUDA=1`` as well, ``effnn._C`` is built as a CUDA extension that adds the CUDA
kernels (window attention, csrc/window_attention_cuda.cu) next to the CPU ones. It needs nvcc of
the CUDA version torch was built with; ``TORCH_CUDA_ARCH_LIST`` defaults to "9.0" (H100/H200)
to keep the compile short; set it for other GPUs (e.g. "8.0;9.0").

``--no-build-isolation`` makes the build use (and link against) the torch that is already
installed, which is the torch the extension will run with. Without EFFNN_BUILD_EXT=1 nothing
here imports torch.
"""

import os
import re
import shutil
import subprocess
import sys

from setuptools import setup


def _set_cuda_home():
    """Point CUDA_HOME at the toolkit that nvcc runs from when it is not set: torch guesses it as
    the directory above the nvcc on PATH, which is wrong when that nvcc is a wrapper script (as in
    /usr/local/bin/nvcc -> /usr/local/cuda-13.0)."""
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or nvcc is None:
        return
    if os.path.exists(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include", "cuda_runtime.h")):
        return
    dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    top = re.search(r"^#\$ TOP=(.+)$", dry.stderr + dry.stdout, re.MULTILINE)
    if top:
        os.environ["CUDA_HOME"] = os.path.normpath(top.group(1).strip())


def _extension_kwargs():
    if os.environ.get("EFFNN_BUILD_EXT", "0") != "1":
        return {}
    cuda = os.environ.get("EFFNN_BUILD_CUDA", "0") == "1"
    if cuda:
        _set_cuda_home()  # before torch.utils.cpp_extension reads it at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:
        raise RuntimeError(
            "EFFNN_BUILD_EXT=1 needs torch installed in the build environment: install torch "
            "first and build with `pip install --no-build-isolation ...`"
        ) from e

    if sys.platform == "win32":
        cflags, ldflags = ["/O2", "/openmp"], []
    elif sys.platform == "darwin":
        # Apple clang has no -fopenmp: the kernels then run on one thread.
        cflags, ldflags = ["-O3"], []
    else:
        # No -march=native: the binary must run on any x86-64 (AVX2 code is dispatched at run
        # time; the GEMM micro-kernels are JIT-compiled by libtorch for the CPU it runs on).
        cflags, ldflags = ["-O3", "-fopenmp"], ["-fopenmp"]
    sources = ["csrc/monarch_cpu.cpp", "csrc/window_attention_cpu.cpp"]
    if cuda:
        ext = CUDAExtension(
            "effnn._C",
            sources + ["csrc/window_attention_cuda.cu"],
            extra_compile_args={"cxx": cflags, "nvcc": ["-O3"]},
            extra_link_args=ldflags,
        )
    else:
        ext = CppExtension("effnn._C", sources, extra_compile_args=cflags, extra_link_args=ldflags)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**_extension_kwargs())
