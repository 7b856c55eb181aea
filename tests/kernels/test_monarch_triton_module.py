"""MonarchLinear with backend="triton" end to end: dispatch, the registered ops' autograd, and
torch.compile, against the reference backend (CPU tensors under TRITON_INTERPRET=1, or CUDA)."""

import pytest
import torch

pytest.importorskip("triton")

from effnn import MonarchLinear  # noqa: E402
from effnn.kernels import monarch as km  # noqa: E402

DEVICE = "cpu" if km._INTERPRET else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("in_features,out_features,nblocks", [(48, 80, 4), (100, 70, 3)])
def test_module_forward_backward_matches_reference(in_features, out_features, nblocks):
    ref = MonarchLinear(in_features, out_features, nblocks=nblocks, backend="ref", device=DEVICE)
    tri = MonarchLinear(in_features, out_features, nblocks=nblocks, backend="triton", device=DEVICE)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, in_features, device=DEVICE)
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yt = ref(xr), tri(xt)
    torch.testing.assert_close(yt, yr, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(yr)
    yr.backward(g)
    yt.backward(g)
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-4, atol=1e-4)
    for (name, pr), pt in zip(ref.named_parameters(), tri.parameters(), strict=True):
        torch.testing.assert_close(pt.grad, pr.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_inference_saves_nothing_and_matches():
    tri = MonarchLinear(32, 32, nblocks=4, backend="triton", device=DEVICE)
    x = torch.randn(5, 32, device=DEVICE)
    with torch.no_grad():
        y = tri(x)
    torch.testing.assert_close(y, tri.to(DEVICE)(x).detach(), rtol=1e-5, atol=1e-5)
