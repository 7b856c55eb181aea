"""Naive implementations written straight from the papers' equations (loops allowed): the golden
references the fast paths are tested against, in float64."""

import torch


def monarch_naive_mid(x, blkdiag1):
    """The middle activation (T, k*q) of fly's MonarchLinear: x zero-padded to k*p features, then
    the first block-diagonal factor."""
    T, n_in = x.shape
    k, q, p = blkdiag1.shape
    xp = torch.zeros(T, k * p, dtype=x.dtype)
    xp[:, :n_in] = x
    mid = torch.zeros(T, k * q, dtype=x.dtype)
    for kk in range(k):
        mid[:, kk * q:(kk + 1) * q] = xp[:, kk * p:(kk + 1) * p] @ blkdiag1[kk].T
    return mid


def monarch_naive(x, blkdiag1, blkdiag2, bias, out_features):
    """fly's MonarchLinear forward for 2-D x: pad, first block-diagonal factor, perfect shuffle,
    second factor, output shuffle, truncate, bias (HazyResearch/fly, blockdiag_butterfly_multiply)."""
    T = x.shape[0]
    l, s, r = blkdiag2.shape
    mid = monarch_naive_mid(x, blkdiag1)
    out = torch.zeros(T, l * s, dtype=x.dtype)
    for ll in range(l):
        # block ll reads middle features rr*l + ll and writes output features ss*l + ll
        out[:, ll::l] = mid[:, ll::l] @ blkdiag2[ll].T
    y = out[:, :out_features]
    return y if bias is None else y + bias


def monarch_square_project_paper(weight, m):
    """Algorithm 1 of the Monarch paper for n = m*m and nblocks = m: reshape A to a 4-D tensor
    A[l, j, k, i] = A[l*m + j, k*m + i] and take the best rank-1 approximation of every slice
    A[:, j, k, :]. Returns the dense matrix of the projection."""
    a = weight.reshape(m, m, m, m)  # (l, j, k, i)
    out = torch.zeros_like(a)
    for j in range(m):
        for k in range(m):
            u, s, vh = torch.linalg.svd(a[:, j, k, :])
            out[:, j, k, :] = s[0] * torch.outer(u[:, 0], vh[0])
    return out.reshape(m * m, m * m)
