"""Build script: a pure-Python package by default; the compiled extension is opt-in.

All metadata lives in pyproject.toml. This file only adds the optional C++ extension
``effnn._C`` (fused CPU kernels: Monarch, csrc/monarch_cpu.cpp; window attention,
csrc/window_attention_cpu.cpp) when the environment says so:

    EFFNN_BUILD_EXT=1 pip install --no-build-isolation --no-deps -e .

``--no-build-isolation`` makes the build use (and link against) the torch that is already
installed, which is the torch the extension will run with. Without EFFNN_BUILD_EXT=1 nothing
here imports torch.
"""

import os
import sys

from setuptools import setup


def _extension_kwargs():
    if os.environ.get("EFFNN_BUILD_EXT", "0") != "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
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
    ext = CppExtension(
        "effnn._C",
        ["csrc/monarch_cpu.cpp", "csrc/window_attention_cpu.cpp"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**_extension_kwargs())
