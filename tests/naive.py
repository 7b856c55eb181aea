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


def routed_attention_naive(q, k, v, r_idx, r_weight, key_valid, num_heads, scale):
    """BRA's token-to-token attention (level 2), one query region and one head at a time: query
    region p of image n attends, per head, to the concatenated tokens of its routed regions
    r_idx[n, p, :], each region's keys and values times r_weight[n, p, j] when given; keys with
    key_valid False are left out of the softmax. Region-major (N, P, T, C) tensors, head-major
    channels."""
    N, P, Tq, Cqk = q.shape
    Cv = v.shape[-1]
    dq, dv = Cqk // num_heads, Cv // num_heads
    out = torch.zeros(N, P, Tq, Cv, dtype=q.dtype)
    for n in range(N):
        for p in range(P):
            keys, values, keep = [], [], []
            for j, r in enumerate(r_idx[n, p].tolist()):
                w = 1.0 if r_weight is None else r_weight[n, p, j]
                keys.append(w * k[n, r])
                values.append(w * v[n, r])
                keep.append(torch.ones(k.shape[2], dtype=torch.bool) if key_valid is None else key_valid[r])
            keys, values, keep = torch.cat(keys), torch.cat(values), torch.cat(keep)
            for h in range(num_heads):
                logits = scale * q[n, p, :, h * dq:(h + 1) * dq] @ keys[keep, h * dq:(h + 1) * dq].T
                out[n, p, :, h * dv:(h + 1) * dv] = torch.softmax(logits, -1) @ values[keep, h * dv:(h + 1) * dv]
    return out


def bra_naive(x, params, *, num_heads, n_win, qk_dim, topk, scale, diff_routing=False,
              soft_routing=False, padding="none", kv_downsample_mode="identity", kv_per_win=4,
              kv_downsample_ratio=4):
    """Bi-level routing attention of BiFormer on channels-last x (N, H, W, C), written from the
    paper and the official ops/bra_legacy.py / ops/bra_nchw.py, one image and one region at a
    time. ``params`` holds the official parameter names: "qkv.qkv.weight"/"qkv.qkv.bias" (rows
    q | k | v) and optionally "wo.*", "lepe.*", "router.emb.*".

    padding: "none" (H, W divisible by n_win), "legacy" (zero-pad x before the projection; n_win x
    n_win regions of ceil(H/n_win) tokens; padded tokens count in region means, as keys and in the
    LCE), "nchw" (zero-pad q, k, v after the projection; regions of floor(H/n_win) tokens; means
    over valid tokens; padded keys kept in the softmax; LCE on the unpadded V map), "masked"
    ("legacy" regions, "nchw" zero padding, padded keys dropped from the softmax, empty regions
    never routed). Returns (out, r_idx, r_weight)."""
    N, H, W, C = x.shape
    if padding == "nchw":
        rh, rw = H // n_win, W // n_win
        gh, gw = -(-H // rh), -(-W // rw)
    else:
        rh, rw = -(-H // n_win), -(-W // n_win)
        gh, gw = n_win, n_win
    Hp, Wp = gh * rh, gw * rw
    weight, bias = params["qkv.qkv.weight"], params.get("qkv.qkv.bias")
    if padding == "legacy":
        xp = torch.zeros(N, Hp, Wp, C, dtype=x.dtype)
        xp[:, :H, :W] = x
        qkv = torch.nn.functional.linear(xp, weight, bias)
    else:
        qkv = torch.zeros(N, Hp, Wp, weight.shape[0], dtype=x.dtype)
        qkv[:, :H, :W] = torch.nn.functional.linear(x, weight, bias)
    q, k, v = qkv[..., :qk_dim], qkv[..., qk_dim:2 * qk_dim], qkv[..., 2 * qk_dim:]
    valid = torch.zeros(Hp, Wp, dtype=torch.bool)
    valid[:H, :W] = True
    regions = [(a, b) for a in range(gh) for b in range(gw)]

    def tokens(t, n, a, b):  # one region's tokens, row-major
        return t[n, a * rh:(a + 1) * rh, b * rw:(b + 1) * rw].reshape(rh * rw, -1)

    def pooled(t):  # the official per-region KV downsampling of a (rh, rw, c) region map
        m = t.reshape(rh, rw, -1).permute(2, 0, 1)[None]
        if kv_downsample_mode == "ada_avgpool":
            m = torch.nn.functional.adaptive_avg_pool2d(m, kv_per_win)
        elif kv_downsample_mode == "ada_maxpool":
            m = torch.nn.functional.adaptive_max_pool2d(m, kv_per_win)
        elif kv_downsample_mode == "avgpool" and kv_downsample_ratio > 1:
            m = torch.nn.functional.avg_pool2d(m, kv_downsample_ratio)
        elif kv_downsample_mode == "maxpool" and kv_downsample_ratio > 1:
            m = torch.nn.functional.max_pool2d(m, kv_downsample_ratio)
        return m[0].permute(1, 2, 0).reshape(-1, t.shape[-1])

    out = torch.zeros(N, Hp, Wp, C, dtype=x.dtype)
    r_idx = torch.zeros(N, gh * gw, topk, dtype=torch.long)
    r_weight = torch.zeros(N, gh * gw, topk, dtype=x.dtype)
    dqk, dv = qk_dim // num_heads, C // num_heads
    for n in range(N):
        # level 1: region-level queries and keys, affinity graph, top-k
        q_r, k_r, nonempty = [], [], []
        for a, b in regions:
            mask = tokens(valid[None, ..., None], 0, a, b)[:, 0]
            if padding in ("nchw", "masked"):
                count = max(int(mask.sum()), 1)
                q_r.append(tokens(q, n, a, b).sum(0) / count)
                k_r.append(tokens(k, n, a, b).sum(0) / count)
            else:
                q_r.append(tokens(q, n, a, b).mean(0))
                k_r.append(tokens(k, n, a, b).mean(0))
            nonempty.append(bool(mask.any()))
        q_r, k_r = torch.stack(q_r), torch.stack(k_r)
        if not diff_routing:
            q_r, k_r = q_r.detach(), k_r.detach()
        if "router.emb.weight" in params:
            emb = lambda t: torch.nn.functional.linear(t, params["router.emb.weight"], params["router.emb.bias"])  # noqa: E731
            q_r, k_r = emb(q_r), emb(k_r)
        affinity = (q_r * scale) @ k_r.T
        if padding == "masked":
            affinity = affinity.masked_fill(~torch.tensor(nonempty), float("-inf"))
        top, idx = torch.topk(affinity, topk, dim=-1)
        weights = torch.softmax(top, dim=-1)
        r_idx[n], r_weight[n] = idx, weights.detach()
        # level 2: every token of region p attends to the tokens of its routed regions
        for p, (a, b) in enumerate(regions):
            keys, values, keep = [], [], []
            for j, r in enumerate(idx[p].tolist()):
                ra, rb = regions[r]
                kr, vr = tokens(k, n, ra, rb), tokens(v, n, ra, rb)
                key_mask = tokens(valid[None, ..., None], 0, ra, rb)[:, 0]
                if kv_downsample_mode != "identity":
                    kr, vr = pooled(kr), pooled(vr)
                    key_mask = torch.ones(kr.shape[0], dtype=torch.bool)
                w = weights[p, j] if soft_routing else 1.0
                keys.append(w * kr)
                values.append(w * vr)
                keep.append(key_mask if padding == "masked" else torch.ones_like(key_mask))
            keys, values, keep = torch.cat(keys), torch.cat(values), torch.cat(keep)
            qp = tokens(q, n, a, b)
            o = []
            for h in range(num_heads):
                logits = scale * qp[:, h * dqk:(h + 1) * dqk] @ keys[keep, h * dqk:(h + 1) * dqk].T
                o.append(torch.softmax(logits, -1) @ values[keep, h * dv:(h + 1) * dv])
            out[n, a * rh:(a + 1) * rh, b * rw:(b + 1) * rw] = torch.cat(o, -1).reshape(rh, rw, C)
    # local context enhancement: depthwise conv of the V map (padded map for "legacy")
    if "lepe.weight" in params:
        kernel = params["lepe.weight"]
        v_map = v if padding in ("none", "legacy") else v[:, :H, :W]
        lepe = torch.nn.functional.conv2d(v_map.permute(0, 3, 1, 2), kernel, params["lepe.bias"],
                                          padding=kernel.shape[-1] // 2, groups=C).permute(0, 2, 3, 1)
        out = out[:, :lepe.shape[1], :lepe.shape[2]] + lepe
    out = out[:, :H, :W]
    if "wo.weight" in params:
        out = torch.nn.functional.linear(out, params["wo.weight"], params["wo.bias"])
    return out, r_idx, r_weight


def gaudi_mask_naive(width, location, n, sigma=None, hard=False):
    """One Gaudi mask (n,) from the GBLR paper's definition (Lee & Kim, ICLR 2024): the inverse
    DFT, summed term by term over all n frequencies, of the Dirichlet kernel of the boxcar of
    width w and location l (rounded to multiples of 1/n) times the Gaussian exp(-f^2 / 2 sigma^2)
    (sigma None: no Gaussian). ``hard``: the official eval mode (widths of one element dropped,
    entries below 1e-3 in magnitude zeroed). Plain Python floats, no autograd."""
    import cmath
    import math

    w = round(float(width) * n) / n
    loc = round(float(location) * n) / n
    if hard and abs(w) <= 1.0 / n:
        w = 0.0

    def sinc(v):
        return 1.0 if v == 0 else math.sin(math.pi * v) / (math.pi * v)

    mask = []
    for i in range(n):
        total = 0.0
        for f in range(n):
            fs = f if f <= n // 2 else f - n  # the signed frequency of DFT bin f
            dirichlet = w * sinc(fs * w) / sinc(fs / n) * cmath.exp(-1j * math.pi * fs * (2 * loc + w - 1.0 / n))
            gauss = 1.0 if sigma is None else math.exp(-fs * fs / (2.0 * sigma * sigma))
            total += dirichlet * gauss * cmath.exp(2j * math.pi * f * i / n)
        value = total.real
        mask.append(0.0 if hard and abs(value) < 1e-3 else value)
    return torch.tensor(mask, dtype=torch.float64)


def gblr_linear_naive(x, widths, locations, lr_weight1, lr_weight2, bias, sigma=None, hard=False):
    """GBLR layer from the paper: y = x W^T + b, W = sum_k diag(m_out_k) U_k V_k diag(m_in_k) with
    U_k = lr_weight2[k] (out, r), V_k = lr_weight1[k] (r, in) and Gaudi masks from
    :func:`gaudi_mask_naive` (row 0 of widths/locations: input columns, row 1: output rows).
    One component at a time, float64."""
    K, r, n = lr_weight1.shape
    m = lr_weight2.shape[1]
    y = torch.zeros(x.shape[0], m, dtype=torch.float64)
    for k in range(K):
        m_in = gaudi_mask_naive(widths[0, k], locations[0, k], n, sigma, hard)
        m_out = gaudi_mask_naive(widths[1, k], locations[1, k], m, sigma, hard)
        y += ((x * m_in) @ lr_weight1[k].T) @ (lr_weight2[k] * m_out[:, None]).T
    return y if bias is None else y + bias
