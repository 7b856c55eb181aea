"""Routing ops of Mixture-of-Depths (effnn/ops/mod.py) against naive loops written from the paper."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from effnn.ops.mod import (
    mod_capacity,
    mod_gather,
    mod_scatter,
    mod_topk,
    mod_update,
    routing_loss,
    topk_targets,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_topk(scores, k, keep_mask=None, keep_first=0):
    """Per sequence: forced tokens first, then by score (float32), ties and NaN by position (NaN
    last); the k first, in position order."""
    out = []
    for b in range(scores.shape[0]):
        s = scores[b].float().tolist()

        def key(i, b=b, s=s):
            forced = (keep_mask is not None and bool(keep_mask[b, i])) or i < keep_first
            value = -math.inf if math.isnan(s[i]) else s[i]
            return (not forced, -value, i)

        out.append(sorted(sorted(range(len(s)), key=key)[:k]))
    return torch.tensor(out, dtype=torch.long).view(scores.shape[0], k)


def test_capacity_is_ceil_of_capacity_times_tokens():
    assert mod_capacity(2048, 0.125) == 256
    assert mod_capacity(2048, 0.5) == 1024
    assert mod_capacity(100, 0.125) == 13  # ceil(12.5)
    assert mod_capacity(30, 0.1) == 3  # 0.1 * 30 = 3.0000000000000004 in floating point
    assert mod_capacity(3, 1 / 3) == 1
    assert mod_capacity(7, 1.0) == 7
    assert mod_capacity(5, 1e-12) == 1  # at least one token of a non-empty sequence
    assert mod_capacity(0, 0.5) == 0
    for bad in (0, -0.1, 1.5, float("nan"), True, "0.5", None):
        with pytest.raises(ValueError, match="capacity must be a number in"):
            mod_capacity(8, bad)
    with pytest.raises(ValueError, match="tokens must be an int >= 0"):
        mod_capacity(-1, 0.5)


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 12),
    data=st.data(),
    ties=st.booleans(),
    use_keep=st.booleans(),
    keep_first=st.integers(0, 3),
)
def test_topk_matches_naive(B, T, data, ties, use_keep, keep_first):
    k = data.draw(st.integers(1, T))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    # integer-valued scores make many ties; NaN and inf must be well defined too
    scores = torch.randint(-2, 3, (B, T), generator=g).float() if ties else torch.randn(B, T, generator=g)
    if T > 2:
        scores[0, 1] = float("nan")
        scores[-1, 2] = float("inf")
    keep = torch.rand(B, T, generator=g) < 0.2 if use_keep else None
    idx = mod_topk(scores, k, keep, keep_first)
    assert idx.shape == (B, k) and idx.dtype == torch.long
    torch.testing.assert_close(idx, naive_topk(scores, k, keep, keep_first), rtol=0, atol=0)
    assert (idx[:, 1:] > idx[:, :-1]).all()  # ascending: the subset keeps the causal order


def test_topk_breaks_ties_by_position_and_decides_in_float32():
    scores = torch.zeros(2, 8)
    assert mod_topk(scores, 3).tolist() == [[0, 1, 2], [0, 1, 2]]
    # two float64 scores that differ below float32 resolution are a tie, won by the earlier token
    s = torch.tensor([[1.0, 1.0 + 1e-12, 0.0]], dtype=torch.float64)
    assert mod_topk(s, 1).tolist() == [[0]]
    # bf16 scores are compared exactly as they are
    assert mod_topk(torch.tensor([[0.5, 2.0, 2.0]], dtype=torch.bfloat16), 1).tolist() == [[1]]


def test_topk_forced_tokens_come_first_and_count_within_k():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    keep = torch.tensor([[False, False, False, True, False, True]])
    assert mod_topk(scores, 3, keep).tolist() == [[0, 3, 5]]
    assert mod_topk(scores, 2, keep).tolist() == [[3, 5]]
    assert mod_topk(scores, 1, keep).tolist() == [[3]]  # more forced than k: the best scores
    assert mod_topk(-scores, 1, keep).tolist() == [[5]]
    assert mod_topk(scores, 2, None, keep_first=1).tolist() == [[0, 1]]
    assert mod_topk(-scores, 2, None, keep_first=1).tolist() == [[0, 5]]
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 6\], got 7"):
        mod_topk(scores, 7)
    with pytest.raises(ValueError, match=r"scores must have shape \(B, T\)"):
        mod_topk(scores[0], 1)


def test_gather_scatter_update_match_loops():
    torch.manual_seed(0)
    B, T, D, k = 3, 7, 5, 4
    x = torch.randn(B, T, D, dtype=torch.float64)
    idx = mod_topk(torch.randn(B, T), k)
    sel = mod_gather(x, idx)
    y = torch.randn(B, k, D, dtype=torch.float64)
    out = mod_scatter(x, idx, y)
    for b in range(B):
        for j in range(k):
            assert torch.equal(sel[b, j], x[b, idx[b, j]])
            assert torch.equal(out[b, idx[b, j]], y[b, j])
        for t in set(range(T)) - set(idx[b].tolist()):
            assert torch.equal(out[b, t], x[b, t])
    assert out.data_ptr() != x.data_ptr()  # out of place
    w = torch.randn(B, k, dtype=torch.float64)
    torch.testing.assert_close(mod_update(sel, y, w), sel + w.unsqueeze(-1) * (y - sel), rtol=0, atol=1e-15)


def test_update_computes_in_float32_for_half_inputs():
    x = torch.full((1, 1, 4), 256.0, dtype=torch.bfloat16)
    out = x + torch.tensor(1.0, dtype=torch.bfloat16)  # 257 rounds to 256 in bf16: f is lost by the block
    y = mod_update(x, out, torch.ones(1, 1))
    assert y.dtype == torch.bfloat16 and torch.equal(y, out)
    out = torch.full((1, 1, 4), 258.0, dtype=torch.bfloat16)
    torch.testing.assert_close(mod_update(x, out, torch.full((1, 1), 0.5)),
                               torch.full((1, 1, 4), 257.0, dtype=torch.bfloat16), rtol=0, atol=1.0)


def test_gradcheck_gather_scatter_update():
    torch.manual_seed(0)
    B, T, D, k = 2, 5, 3, 3
    idx = mod_topk(torch.randn(B, T), k)
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    y = torch.randn(B, k, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, k, dtype=torch.float64, requires_grad=True)

    def fn(x, y, w):
        sel = mod_gather(x, idx)
        return mod_scatter(x, idx, mod_update(sel, y * sel, w))

    assert torch.autograd.gradcheck(fn, (x, y, w))


def test_routing_loss_is_bce_and_gamma_cross_entropy():
    torch.manual_seed(0)
    logits2 = torch.randn(2, 6, 2, dtype=torch.float64)
    idx = mod_topk(logits2[..., 1] - logits2[..., 0], 3)
    targets = topk_targets(idx, 6)
    assert targets.sum().item() == 6 and targets.dtype == torch.float32
    # gamma-MoD: F.cross_entropy(router_logits.view(-1, 2), targets.long()) over all tokens
    official = F.cross_entropy(logits2.view(-1, 2), targets.view(-1).long())
    torch.testing.assert_close(routing_loss(logits2[..., 1] - logits2[..., 0], targets),
                               official.float(), rtol=1e-6, atol=1e-6)
    # the MoD paper: binary cross-entropy, router outputs as logits, top-k membership as targets
    r = torch.randn(2, 6)
    manual = -(targets * F.logsigmoid(r) + (1 - targets) * F.logsigmoid(-r)).mean()
    torch.testing.assert_close(routing_loss(r, targets), manual)


def test_topk_gather_scatter_compile_fullgraph():
    def fn(x, scores):
        idx = mod_topk(scores, 3)
        return mod_scatter(x, idx, mod_gather(x, idx) * 2)

    x, scores = torch.randn(2, 8, 4), torch.randn(2, 8)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, scores), fn(x, scores), rtol=0, atol=0)
