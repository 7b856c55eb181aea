"""Pictures of what effnn layers decide. Needs matplotlib (``pip install matplotlib``) only to draw.

Bi-level routing attention (``BiLevelRoutingAttention``)::

    out, routing = attn(features, return_routing=True)
    effnn.viz.plot_routing(image, routing, path="routing.png")

draws, over the input image, which regions each query region attends to: one panel per query
region, the query region outlined, its routed regions filled and numbered by rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from effnn.ops.routing_attention import Routing

__all__ = ["plot_routing", "routed_region_map"]


def routed_region_map(routing: Routing, query_region: int, batch_index: int = 0) -> Tensor:
    """(H, W) int64 map on the layer's input grid: ``j + 1`` on the tokens of the region routed
    to at rank j (0 = the most affine) by ``query_region``, 0 elsewhere (padding is cropped)."""
    _check_region(routing, query_region, batch_index)
    gh, gw, rh, rw = routing.grid
    P = gh * gw
    rank = torch.zeros(P, dtype=torch.int64)
    idx = routing.indices[batch_index, query_region].cpu()
    # a region routed twice keeps its best rank: write the ranks from last to first
    rank[idx.flip(0)] = torch.arange(idx.numel(), 0, -1)
    grid = rank.view(gh, 1, gw, 1).expand(gh, rh, gw, rw).reshape(gh * rh, gw * rw)
    H, W = routing.input_size
    return grid[:H, :W]


def _check_region(routing: Routing, query_region: int, batch_index: int) -> None:
    P = routing.grid.grid_h * routing.grid.grid_w
    if not 0 <= query_region < P:
        raise ValueError(f"query_region must be in [0, {P}), got {query_region}")
    if not 0 <= batch_index < routing.indices.shape[0]:
        raise ValueError(f"batch_index must be in [0, {routing.indices.shape[0]}), got {batch_index}")


def _image_array(image):
    import numpy as np

    a = image.detach().cpu().float().numpy() if isinstance(image, Tensor) else np.asarray(image, dtype=float)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"image must be (H, W), (H, W, 3) or (3, H, W), got shape {a.shape}")
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _default_queries(grid, count: int) -> list[int]:
    """Up to ``count`` query regions spread evenly over the grid."""
    P = grid.grid_h * grid.grid_w
    if P <= count:
        return list(range(P))
    return sorted({round(i * (P - 1) / (count - 1)) for i in range(count)})


def plot_routing(
    image,
    routing: Routing,
    *,
    batch_index: int = 0,
    query_regions: Sequence[int] | None = None,
    columns: int = 4,
    path: str | None = None,
    title: str | None = None,
):
    """Draw which regions each query region attends to, over ``image``.

    Args:
        image: the input image of the network, (H, W) or (H, W, 3) array-like, or a (3, H, W) or
            (H, W, 3) tensor (any value range; it is normalised for display). The layer's feature
            map is stretched over it, so region boundaries land where the features come from.
        routing: the :class:`effnn.ops.routing_attention.Routing` that
            ``BiLevelRoutingAttention(...)(x, return_routing=True)`` returned for that image.
        batch_index: which image of the batch ``routing`` describes.
        query_regions: region indices (row-major over the region grid) to draw, one panel each;
            default: up to 8 spread over the grid.
        columns: panels per row.
        path: if given, the figure is written there as PNG.
        title: figure title (default: the grid and top-k).

    Returns the matplotlib ``Figure``. The query region is outlined in red; its routed regions are
    filled (darker = more affine) and numbered by rank; the region grid is drawn in white. Regions
    made only of padding (``auto_pad``) lie outside the image and are not drawn.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as e:
        raise ImportError("effnn.viz.plot_routing needs matplotlib: pip install matplotlib") from e

    img = _image_array(image)
    gh, gw, rh, rw = routing.grid
    H, W = routing.input_size
    topk = routing.indices.shape[-1]
    queries = list(query_regions) if query_regions is not None else _default_queries(routing.grid, 8)
    if not queries:
        raise ValueError("query_regions is empty")
    sy, sx = img.shape[0] / H, img.shape[1] / W  # image pixels per feature token

    def box(region: int) -> tuple[float, float, float, float] | None:
        a, b = divmod(region, gw)
        y0, x0 = a * rh, b * rw
        if y0 >= H or x0 >= W:
            return None
        y1, x1 = min(y0 + rh, H), min(x0 + rw, W)
        return x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy

    cols = max(1, min(columns, len(queries)))
    rows = -(-len(queries) // cols)
    fig = Figure(figsize=(3 * cols, (3 * img.shape[0] / img.shape[1] + 0.4) * rows + 0.4),
                 layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(queries):]:
        ax.axis("off")
    for ax, q in zip(axes.flat, queries, strict=False):
        _check_region(routing, q, batch_index)
        ax.imshow(img, cmap=None if img.ndim == 3 else "gray", interpolation="nearest")
        for a in range(1, gh):
            if a * rh < H:
                ax.axhline(a * rh * sy - 0.5, color="white", lw=0.5, alpha=0.6)
        for b in range(1, gw):
            if b * rw < W:
                ax.axvline(b * rw * sx - 0.5, color="white", lw=0.5, alpha=0.6)
        for j, r in enumerate(routing.indices[batch_index, q].tolist()):
            rect = box(r)
            if rect is None:
                continue
            x, y, w, h = rect
            alpha = 0.65 - 0.45 * (j / max(topk - 1, 1))
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, facecolor="tab:blue", alpha=alpha, lw=0))
            ax.text(x + w / 2 - 0.5, y + h / 2 - 0.5, str(j + 1), color="white", ha="center",
                    va="center", fontsize=7)
        rect = box(q)
        if rect is not None:
            x, y, w, h = rect
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="red", lw=2))
        ax.set_title(f"query region {q}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"BRA routing: {gh}x{gw} regions, top-{topk}", fontsize=10)
    if path is not None:
        fig.savefig(path, format="png", dpi=100)
    return fig
