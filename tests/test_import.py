import subprocess
import sys


def run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_does_not_initialise_cuda_or_load_the_extension():
    out = run(
        "import sys, torch\n"
        "torch.cuda._lazy_init = lambda: (_ for _ in ()).throw(AssertionError('CUDA initialised'))\n"
        "import effnn, effnn.nn, effnn.ops, effnn.convert\n"
        "print(torch.cuda.is_initialized(), 'effnn._C' in sys.modules, 'effnn.kernels.monarch' in sys.modules)\n"
        "layer = effnn.MonarchLinear(8, 8)\n"
        "layer(torch.randn(2, 8)).sum().backward()  # CPU use never touches CUDA or the Triton kernels\n"
        "print(torch.cuda.is_initialized(), 'effnn.kernels.monarch' in sys.modules)\n"
    )
    assert out.split() == ["False", "False", "False", "False", "False"]


def test_import_and_use_without_triton():
    out = run(
        "import sys\n"
        "sys.modules['triton'] = None  # as on a CPU-only wheel\n"
        "import torch, effnn\n"
        "print(effnn.MonarchLinear(8, 4)(torch.randn(3, 8)).shape)\n"
        "from effnn.info import backend_status\n"
        "print(backend_status()['triton'])\n"
    )
    assert "torch.Size([3, 4])" in out and "triton is not installed" in out


def test_info_reports_every_backend():
    out = run("from effnn.info import main; main()")
    for name in ("ref", "triton", "ext"):
        assert f"  {name} " in out
    assert "torch " in out and "effnn " in out
