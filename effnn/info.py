"""``python -m effnn.info`` (or ``effnn info``): versions, and for each backend whether it can run
here and, if not, why."""

from __future__ import annotations

import platform
import sys

import torch

import effnn
from effnn import _ext
from effnn.ops._dispatch import ext_cuda_reasons, triton_device_reasons


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def backend_status() -> dict[str, str]:
    """``{backend: "available (...)" or "unavailable: reasons"}`` for this machine."""
    status = {"ref": "available (plain PyTorch, every device)"}
    devices = [torch.device("cuda")] if torch.cuda.is_available() else []
    devices.append(torch.device("cpu"))
    triton_ok = [d.type for d in devices if not triton_device_reasons(d)]
    if triton_ok:
        status["triton"] = f"available on {', '.join(triton_ok)}"
    else:
        reasons = triton_device_reasons(torch.device("cuda"))
        if not torch.cuda.is_available():
            reasons.insert(0, "no CUDA device is visible (CPU tensors only under TRITON_INTERPRET=1)")
        status["triton"] = "unavailable: " + "; ".join(reasons)
    reason = _ext.unavailable_reason()
    if reason is not None:
        status["ext"] = f"unavailable: {reason}"
    elif ext_cuda_reasons("effnn_ext::window_attention_forward"):
        status["ext"] = "available on cpu (built without CUDA kernels; EFFNN_BUILD_CUDA=1 adds them)"
    else:
        visible = "" if torch.cuda.is_available() else "; no CUDA device is visible"
        status["ext"] = f"available on cpu; CUDA kernels compiled in (window attention){visible}"
    return status


def main() -> None:
    print(f"effnn {effnn.__version__}")
    print(f"python {sys.version.split()[0]} on {platform.platform()}")
    print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), {torch.get_num_threads()} CPU threads")
    print(f"triton {_version('triton')}")
    if torch.cuda.is_available():
        print(f"CUDA device: {torch.cuda.get_device_name()}")
    else:
        print("CUDA device: none")
    print("backends:")
    for name, status in backend_status().items():
        print(f"  {name:7s} {status}")


if __name__ == "__main__":
    main()
