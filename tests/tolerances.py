"""Closeness checks of the kernel tests against float64 references."""

import torch


def assert_close_scaled(actual, ref, tol, what):
    """max |actual - ref| <= tol * max(1, max |ref|) (``ref`` float64)."""
    actual = actual.detach().cpu().double()
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    err = (actual - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.1g} * {scale:.3g}"


def assert_within_2x(got, ref_low, exact, what):
    """The low-precision rule: the error of ``got`` (fp16/bf16) against the float64 ``exact`` is at
    most twice the error of the reference computed in the same dtype (``ref_low``) plus one ulp
    of the largest value."""
    err = (got.detach().cpu().double() - exact).abs().max().item()
    err_ref = (ref_low.detach().cpu().double() - exact).abs().max().item()
    slack = torch.finfo(got.dtype).eps * exact.abs().max().item()
    assert err <= 2 * err_ref + slack, (
        f"{what}: kernel error {err:.3g} > 2 * reference {got.dtype} error {err_ref:.3g} + {slack:.3g}"
    )
