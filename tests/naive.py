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


def exponential_split_naive(rel, a):
    """SphereFormer's range bins from the definition: bin widths a, a, 2a, 2a, 4a, 4a, ... from 0
    ("the split length doubles once used twice"); bin b of |rel| -> b for rel >= 0, -b-1 else."""
    edges = [0.0]
    while edges[-1] <= rel.abs().max().item():
        edges.append(edges[-1] + a * 2 ** ((len(edges) - 1) // 2))
    mag_bin = (rel.abs()[..., None] >= torch.tensor(edges[1:], dtype=rel.dtype)).sum(-1)
    return torch.where(rel >= 0, mag_bin, -mag_bin - 1)


def window_attention_naive(q, k, v, coords, batch, window_size, scale, origin="fixed", tables=None,
                           quant_size=None, exp_split_a=None):
    """Window attention over all pairs with a dense mask (sptr's sparse_self_attention semantics):
    points i, j attend iff same cloud and same cell floor((s - origin) / w) on every axis; scores
    scale*q_i.k_j + scale*q_i.sum_a Tq[idx_a] + k_j.sum_a Tk[idx_a]; out_i = sum_j p_ij (v_j +
    sum_a Tv[idx_a]). idx_a = c_i - c_j + L - 1 with c = floor(((s - origin) mod w) / quant), or for
    the third axis with exp_split_a: clamp(exponential split of r_i - r_j + L, 0, 2L - 1)."""
    N, h, d = q.shape
    w = torch.tensor(window_size, dtype=coords.dtype)
    o = coords.min(0).values if origin == "batch_min" else torch.zeros(3, dtype=coords.dtype)
    cell = torch.floor((coords - o) / w)
    same = (batch[:, None] == batch[None, :]) & (cell[:, None, :] == cell[None, :, :]).all(-1)
    scores = scale * torch.einsum("ihd,jhd->hij", q, k)
    vals = v[None].expand(N, N, h, d).clone()  # vals[i, j] = v_j (+ value table rows)
    if tables is not None:
        Tq, Tk, Tv = tables
        L = int((window_size[0] + 1e-4) / quant_size[0])
        qs = torch.tensor(quant_size, dtype=coords.dtype)
        code = torch.floor(torch.remainder(coords - o, w) / qs).clamp(0, L - 1).long()
        idx = code[:, None, :] - code[None, :, :] + L - 1  # (N, N, 3)
        if exp_split_a is not None:
            r = coords[:, 2]
            idx[..., 2] = (exponential_split_naive(r[:, None] - r[None, :], exp_split_a) + L).clamp(0, 2 * L - 1)
        for a in range(3):
            tq, tk, tv = Tq[idx[..., a], a], Tk[idx[..., a], a], Tv[idx[..., a], a]  # (N, N, h, d)
            scores = scores + scale * torch.einsum("ihd,ijhd->hij", q, tq)
            scores = scores + torch.einsum("jhd,ijhd->hij", k, tk)
            vals = vals + tv
    scores = scores.masked_fill(~same, float("-inf"))
    p = torch.softmax(scores, -1)
    return torch.einsum("hij,ijhd->ihd", p, vals)


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


def asag_query_weights_naive(score, iou, gamma1=0.4, gamma2=0.6):
    """ASAG's Query Weighting for one matched query, from the paper's eq. 1-3 with the official
    negative term (models/criterion.py, SetCriterion.get_weight): Norm(x) = sigmoid(4.5(x - 1/3)) /
    sigmoid(3); w_pos = Norm(s^g1 IoU^g2); w_neg = Norm(s^g1 P(IoU^g2)) - Norm(0), with
    P(x) = 1 below 0.5 else (1 - x^2) / (1 - 0.5^2)."""
    import math

    def sig(v):
        return 1 / (1 + math.exp(-v))

    def norm(v):
        return sig(4.5 * (v - 1 / 3)) / sig(3)

    q = iou ** gamma2
    p_neg = 1.0 if q < 0.5 else (1 - q * q) / (1 - 0.25)
    return norm(score ** gamma1 * q), norm(score ** gamma1 * p_neg) - norm(0.0)


def _asag_nms_naive(boxes, scores, thr):
    """Greedy NMS one box at a time (torchvision semantics: drop IoU > thr)."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for i in order:
        ok = True
        for j in keep:
            lt = torch.maximum(boxes[i, :2], boxes[j, :2])
            rb = torch.minimum(boxes[i, 2:], boxes[j, 2:])
            inter = (rb - lt).clamp(min=0).prod()
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            if inter / (area(boxes[i]) + area(boxes[j]) - inter) > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def asag_generator_naive(params, features, image_sizes, *, num_pred_anchor1=50, num_pred_anchor2=20,
                         patch_size=15, stride=(8, 16, 32), threshold1=0.7, threshold2=0.1,
                         nms_threshold=0.25, use_anchor_threshold=0.1, used_inference_level="P3P6",
                         activation="gelu", min_anchor=5, max_anchor=200):
    """The official ASAG ``AnchorGenerator.forward`` in eval mode (models/anchor_generator.py),
    run on each image alone, one patch at a time, from official parameter names. Each image's maps
    are cut to its valid region ceil(size / stride) first (the image alone, unpadded); compressed
    maps smaller than a patch are zero-padded (the official code crashes there). Returns per image
    a list of (cx, cy, w, h, conf, level) rows in output order."""
    F = torch.nn.functional
    act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[activation]

    def mlp(name, t):
        for i in range(3):
            t = F.linear(t, params[f"{name}.layers.{i}.weight"], params[f"{name}.layers.{i}.bias"])
            if i < 2:
                t = act(t)
        return t

    def compress(level, x):
        h = act(F.conv2d(x, params[f"compress.{level}.0.weight"], params[f"compress.{level}.0.bias"]))
        return F.conv2d(h, params[f"compress.{level}.2.weight"], params[f"compress.{level}.2.bias"], padding=1)

    def head(patch, idx, name, k):  # patch (C, n, n) -> (k, 5): sigmoid box, raw logit
        t = patch.flatten(1).T
        t = F.layer_norm(t, t.shape, params[f"layernorm.{idx}.weight"], params[f"layernorm.{idx}.bias"])
        t = t + params[f"pos_embedding.{idx}.weight"]
        out = mlp(name, t.flatten()).view(k, 5)
        return torch.cat([torch.sigmoid(out[:, :4]), out[:, 4:]], 1)

    results = []
    for b, (h, w) in enumerate(image_sizes):
        whwh = torch.tensor([w, h, w, h], dtype=features[0].dtype)
        maps = []
        for level, (f, s) in enumerate(zip(features, stride, strict=True)):
            hh, ww = -(-h // s), -(-w // s)  # ceil
            maps.append(compress(level, f[b:b + 1, :, :hh, :ww])[0])
        c5 = maps[2]
        r5h = max(int(torch.round(torch.tensor(h / stride[2]))), 1)
        r5w = max(int(torch.round(torch.tensor(w / stride[2]))), 1)
        interp = F.interpolate(c5[None, :, :r5h, :r5w], size=(30, 30), mode="bilinear")[0]
        p6 = F.conv2d(F.relu(interp)[None], params["P6.weight"], params["P6.bias"], stride=2, padding=2, dilation=2)[0]
        anchors = []  # current stage: list of (cx, cy, w, h, conf, level)
        for r0, c0 in [(0, 0), (0, 15), (15, 0), (15, 15)]:
            pred = head(interp[:, r0:r0 + 15, c0:c0 + 15], 0, "proj_all", num_pred_anchor1)
            for a in pred:
                box = a[:4] * 0.5 + torch.tensor([c0 / 30, r0 / 30, 0, 0], dtype=a.dtype)
                anchors.append([*(box * whwh).tolist(), float(torch.sigmoid(a[4])), 5])
        for a in head(p6, 0, "proj_all", num_pred_anchor1):
            anchors.append([*(a[:4] * whwh).tolist(), float(torch.sigmoid(a[4])), 6])
        for a in anchors:
            if a[2] < 3 or a[3] < 3:
                a[4] = 0.0
        output = []
        fixed = True
        stop = {"P5P6": 1, "P4P6": 2, "P3P6": 3}[used_inference_level]
        for i in (1, 2):
            if stop == i:
                break
            s = stride[2 - i]
            half = s * patch_size / 2
            sel = [threshold2 < a[4] < threshold1 and a[3] < half and a[2] < half for a in anchors]
            if not any(sel):
                break
            chosen = [a for a, m in zip(anchors, sel, strict=True) if m]
            pboxes = torch.tensor([[a[0] - s * patch_size / 2, a[1] - s * patch_size / 2,
                                    a[0] + s * patch_size / 2, a[1] + s * patch_size / 2] for a in chosen],
                                  dtype=features[0].dtype)
            keep = _asag_nms_naive(pboxes, [a[4] for a in chosen], nms_threshold)
            crops = []
            for j in keep:
                c = (pboxes[j, :2] + pboxes[j, 2:]) / 2 / s
                pos = torch.floor(c - patch_size / 2)
                lim = torch.ceil(torch.tensor([w, h], dtype=c.dtype) / s)
                pos = pos + (lim - (pos + patch_size)).clamp(max=0)
                crops.append(pos.clamp(min=0).long().tolist())
            emit = [a for a, m in zip(anchors, sel, strict=True) if a[4] > use_anchor_threshold and not m]
            if fixed and len(emit) < min_anchor:
                emit = sorted(anchors, key=lambda a: -a[4])[:min_anchor]
            output += emit
            cmap = maps[2 - i]
            new = []
            for x0, y0 in crops:
                need_h, need_w = y0 + patch_size, x0 + patch_size
                padded = torch.zeros(cmap.shape[0], max(need_h, cmap.shape[1]), max(need_w, cmap.shape[2]), dtype=cmap.dtype)
                padded[:, :cmap.shape[1], :cmap.shape[2]] = cmap
                pred = head(padded[:, y0:need_h, x0:need_w], i, "proj_patch", num_pred_anchor2)
                for a in pred:
                    gw, gh = w / s, h / s
                    cx = a[0] * (patch_size / gw) + x0 / gw
                    cy = a[1] * (patch_size / gh) + y0 / gh
                    bw, bh = a[2] * (patch_size / gw), a[3] * (patch_size / gh)
                    conf = float(torch.sigmoid(a[4]))
                    if cx >= 1 or cy >= 1:
                        conf = 0.0
                    box = [float(cx * w), float(cy * h), float(bw * w), float(bh * h)]
                    if box[2] < 3 or box[3] < 3:
                        conf = 0.0
                    new.append([*box, conf, 4 if i == 1 else 3])
            anchors = new
            fixed = False
        emit = [a for a in anchors if a[4] > use_anchor_threshold]
        if fixed and len(emit) < min_anchor:
            emit = sorted(anchors, key=lambda a: -a[4])[:min_anchor]
        output += emit
        if len(output) > max_anchor:
            output = sorted(output, key=lambda a: -a[4])[:max_anchor]
        results.append(output)
    return results


def asag_anchor_loss_naive(groups, area_weight=4.0, gamma1=0.4, gamma2=0.6):
    """The generator's criterion (official models/criterion.py: AnchorHungarianMatcher, get_weight
    "anchor", quality_focal_loss_with_ignore, loss_anchor_boxes), one patch and one slot at a time,
    with brute-force matching. ``groups``: list of (patches, inverse, scale) where patches is a list
    of (pred (K, 5) sigmoid boxes + logit, targets (G, 4) in patch coordinates). Returns the sums
    (ce, l1, giou), each group times its scale (the caller divides by the number of GT)."""
    import itertools
    import math

    def xyxy(b):
        return [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2]

    def iou_giou(a, b):
        a, b = xyxy(a), xyxy(b)
        iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
        ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
        return inter / union, inter / union - (hull - union) / hull

    def sig(v):
        return 1 / (1 + math.exp(-v))

    def bce(x, y):  # BCE with logits
        return max(x, 0) - x * y + math.log1p(math.exp(-abs(x)))

    def area_w(t, inverse):
        r = math.sqrt(t[2] * t[3])
        return (area_weight - 1) * r + 1 if inverse else area_weight - r * (area_weight - 1)

    ce = l1 = giou_sum = 0.0
    for patches, inverse, scale in groups:
        for pred_t, tg_t in patches:
            pred, tg = pred_t.tolist(), tg_t.tolist()
            K, G = len(pred), len(tg)

            def cost(k, g, pred=pred, tg=tg, inverse=inverse):
                p = sig(pred[k][4])
                c_cls = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p ** 2 * -math.log(1 - p + 1e-8)
                c_l1 = sum(abs(pred[k][d] - tg[g][d]) for d in range(4))
                return (5 * c_l1 + 2 * c_cls - 2 * iou_giou(pred[k][:4], tg[g])[1]) * area_w(tg[g], inverse)

            best, match = float("inf"), []
            for slots in itertools.permutations(range(K), min(K, G)):
                for gts in itertools.combinations(range(G), min(K, G)):
                    c = sum(cost(k, g) for k, g in zip(slots, gts, strict=True))
                    if c < best:
                        best, match = c, list(zip(slots, gts, strict=True))
            matched = dict(match)
            for k in range(K):
                p = sig(pred[k][4])
                if k in matched:
                    t = tg[matched[k]]
                    iou, giou = iou_giou(pred[k][:4], t)
                    a = area_w(t, inverse)
                    ce += scale * bce(pred[k][4], iou) * abs(iou - p) ** 2 * a
                    w = sig(4.5 * (p ** gamma1 * iou ** gamma2 - 1 / 3)) / sig(3)
                    l1 += scale * sum(abs(pred[k][d] - t[d]) for d in range(4)) * w * a
                    giou_sum += scale * (1 - giou) * w * a
                elif not any(iou_giou(pred[k][:4], t)[0] >= 0.5 for t in tg):
                    ce += scale * bce(pred[k][4], 0.0) * p ** 2
    return ce, l1, giou_sum
