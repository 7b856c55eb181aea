"""Compile Triton kernels for an H100/H200 (sm_90) on a machine without a GPU.

Under TRITON_INTERPRET=1 (how the kernel tests run on the CPU) triton interprets the kernels'
Python, so errors that only the compiler sees (types of loop-carried values, layouts, dot and
gather shapes) would otherwise wait for a GPU session. The interpreter flag is read when triton is
imported, so :func:`assert_compiles_for_sm90` runs a script in a fresh process without it; the
script calls :func:`compile_for_sm90` for each kernel variant.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


def signature(fn, consts: dict, pointer_type, scalar_types: dict | None = None) -> dict:
    """The ASTSource signature of the jitted ``fn``: "constexpr" for ``consts``,
    ``pointer_type(name)`` for ``*_ptr`` arguments, ``scalar_types.get(name, "i32")`` otherwise."""
    scalar_types = scalar_types or {}
    return {a: "constexpr" if a in consts else pointer_type(a) if a.endswith("_ptr")
            else scalar_types.get(a, "i32") for a in fn.arg_names}


def compile_for_sm90(fn, sig: dict, consts: dict, num_warps: int) -> None:
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, sig, {a: consts[a] for a in fn.arg_names if a in consts})
    compiled = triton_compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm["cubin"], fn.__name__


def assert_compiles_for_sm90(script: str, timeout: int = 600) -> None:
    """Run ``script`` (which compiles kernels with :func:`compile_for_sm90`) without the
    interpreter, from the repository root; fail with its stderr if it does not finish."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    code = textwrap.dedent(script) + "\nprint('compiled')\n"
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=_ROOT, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
