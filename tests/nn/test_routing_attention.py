import copy
import io
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import effnn
from effnn import BiLevelRoutingAttention
from effnn.nn.routing_attention import convert_nchw_state_dict
from tests.naive import bra_naive


def make(dim=16, num_heads=2, n_win=3, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(dim, num_heads, n_win, dtype=dtype, **kw)
    with torch.no_grad():  # default init leaves the biases near zero; make every term visible
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def check_against_naive(layer, x, rtol=1e-10, atol=1e-10, exact_routing=True):
    """Output, routing and every gradient of ``layer`` equal the naive loop implementation's, with
    the layer's own (official-layout) parameters. ``exact_routing=False`` where regions can tie
    exactly (legacy padding: regions of padding only all have the projection bias as keys), so
    torch.topk may order the tied, identical regions differently."""
    x = x.clone().requires_grad_()
    x_naive = x.detach().clone().requires_grad_()
    y, routing = layer(x, return_routing=True)
    params = {k: v.detach().clone().requires_grad_() for k, v in layer.state_dict().items()}
    y_naive, r_idx, r_weight = bra_naive(
        x_naive, params, num_heads=layer.num_heads, n_win=layer.n_win, qk_dim=layer.qk_dim,
        topk=layer.topk, scale=layer.scale, diff_routing=layer.diff_routing,
        soft_routing=layer.soft_routing, padding=effnn.ops.routing_attention.padding_mode(layer.auto_pad),
        kv_downsample_mode=layer.kv_downsample_mode, kv_per_win=layer.kv_per_win,
        kv_downsample_ratio=layer.kv_downsample_ratio,
    )
    if exact_routing:
        assert torch.equal(routing.indices, r_idx)
    torch.testing.assert_close(routing.weights, r_weight.to(routing.weights.dtype), rtol=rtol, atol=atol)
    torch.testing.assert_close(y, y_naive, rtol=rtol, atol=atol)
    g = torch.randn_like(y)
    y.backward(g)
    y_naive.backward(g)
    torch.testing.assert_close(x.grad, x_naive.grad, rtol=rtol, atol=atol)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=rtol, atol=atol, msg=name)


# ---- official layout --------------------------------------------------------------------------


@pytest.mark.parametrize("kw,shapes", [
    ({}, {"lepe.weight": (16, 1, 3, 3), "lepe.bias": (16,), "qkv.qkv.weight": (48, 16),
          "qkv.qkv.bias": (48,), "wo.weight": (16, 16), "wo.bias": (16,)}),
    ({"qk_dim": 8, "side_dwconv": 5, "param_routing": True, "diff_routing": True, "soft_routing": True},
     {"lepe.weight": (16, 1, 5, 5), "lepe.bias": (16,), "router.emb.weight": (8, 8),
      "router.emb.bias": (8,), "qkv.qkv.weight": (32, 16), "qkv.qkv.bias": (32,),
      "wo.weight": (16, 16), "wo.bias": (16,)}),
    ({"param_attention": "qkv", "side_dwconv": 0}, {"qkv.qkv.weight": (48, 16), "qkv.qkv.bias": (48,)}),
])
def test_official_state_dict_names_shapes_and_order(kw, shapes):
    layer = BiLevelRoutingAttention(16, 2, 3, **kw)
    sd = layer.state_dict()
    assert list(sd) == list(shapes)  # the official registration order
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    fresh = BiLevelRoutingAttention(16, 2, 3, **kw)
    fresh.load_state_dict({k: torch.randn(s) for k, s in shapes.items()})  # loads as it is


CONFIGS = {
    # name: (constructor kwargs, input shape)
    "divisible": ({"topk": 2}, (2, 6, 9, 16)),
    "legacy_pad": ({"topk": 3, "auto_pad": True}, (2, 5, 7, 16)),
    "nchw_pad": ({"topk": 3, "auto_pad": "nchw"}, (2, 5, 7, 16)),
    "masked_pad": ({"topk": 3, "auto_pad": "masked"}, (2, 5, 7, 16)),
    "masked_empty_regions": ({"topk": 4, "auto_pad": "masked", "n_win": 4}, (1, 2, 5, 16)),
    "soft": ({"topk": 3, "soft_routing": True}, (2, 6, 6, 16)),
    "param_diff_soft": ({"topk": 3, "param_routing": True, "diff_routing": True,
                         "soft_routing": True, "auto_pad": True}, (2, 5, 6, 16)),
    "qk_dim_scale": ({"topk": 2, "qk_dim": 8, "qk_scale": 0.3, "side_dwconv": 5}, (1, 6, 6, 16)),
    "qkv_no_lce": ({"topk": 2, "param_attention": "qkv", "side_dwconv": 0}, (1, 6, 6, 16)),
    "ada_avgpool": ({"topk": 2, "kv_downsample_mode": "ada_avgpool", "kv_per_win": 1}, (1, 6, 6, 16)),
    "ada_maxpool": ({"topk": 2, "kv_downsample_mode": "ada_maxpool", "kv_per_win": 3}, (1, 6, 6, 16)),
    "avgpool_pad": ({"topk": 2, "kv_downsample_mode": "avgpool", "kv_downsample_ratio": 2,
                     "auto_pad": True}, (1, 5, 6, 16)),
    "maxpool": ({"topk": 2, "kv_downsample_mode": "maxpool", "kv_downsample_ratio": 2}, (1, 6, 6, 16)),
    "many_heads_all_regions": ({"topk": 9, "num_heads": 8}, (1, 3, 6, 16)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_naive_fp64(name):
    kw, shape = CONFIGS[name]
    layer = make(**kw)
    check_against_naive(layer, torch.randn(shape, dtype=torch.float64))


def test_padding_modes_agree_when_sizes_divide():
    x = torch.randn(2, 6, 9, 16, dtype=torch.float64)
    outs = []
    for mode in (False, True, "nchw", "masked"):
        layer = make(topk=3)
        layer.auto_pad = mode
        outs.append(layer(x))
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=1e-12, atol=1e-12)


def test_convert_nchw_state_dict():
    sd = {
        "stages.0.attn.qkv_linear.weight": torch.randn(48, 16, 1, 1),
        "stages.0.attn.qkv_linear.bias": torch.randn(48),
        "stages.0.attn.output_linear.weight": torch.randn(16, 16, 1, 1),
        "stages.0.attn.output_linear.bias": torch.randn(16),
        "stages.0.attn.lepe.weight": torch.randn(16, 1, 3, 3),
        "stages.0.attn.lepe.bias": torch.randn(16),
        "stages.0.norm1.weight": torch.randn(16),
    }
    out = convert_nchw_state_dict(sd)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "stages.0.attn.qkv.qkv.weight": (48, 16), "stages.0.attn.qkv.qkv.bias": (48,),
        "stages.0.attn.wo.weight": (16, 16), "stages.0.attn.wo.bias": (16,),
        "stages.0.attn.lepe.weight": (16, 1, 3, 3), "stages.0.attn.lepe.bias": (16,),
        "stages.0.norm1.weight": (16,),
    }
    assert torch.equal(out["stages.0.attn.qkv.qkv.weight"], sd["stages.0.attn.qkv_linear.weight"][:, :, 0, 0])
    bare = convert_nchw_state_dict({k.removeprefix("stages.0.attn."): v for k, v in sd.items() if ".attn." in k})
    layer = BiLevelRoutingAttention(16, 2, 3, auto_pad="nchw")
    layer.load_state_dict(bare)


def test_return_routing():
    layer = make(topk=2, auto_pad="nchw")
    x = torch.randn(2, 7, 10, 16, dtype=torch.float64)
    y, routing = layer(x, return_routing=True)
    assert torch.equal(y, layer(x))
    assert routing.grid == (4, 4, 2, 3) == layer.region_grid(7, 10)  # floor(7/3)=2, floor(10/3)=3
    assert routing.input_size == (7, 10)
    assert routing.indices.shape == routing.weights.shape == (2, 16, 2)
    assert routing.indices.dtype == torch.int64
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(2, 16, dtype=torch.float64))


def test_gradcheck():
    layer = make(dim=4, num_heads=2, n_win=2, topk=2, soft_routing=True, param_routing=True,
                 diff_routing=True, auto_pad="masked")
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)


@settings(max_examples=10, deadline=None)
@given(
    H=st.integers(1, 5), W=st.integers(1, 5), n_win=st.integers(1, 3), heads=st.sampled_from([1, 2]),
    mode=st.sampled_from([False, True, "nchw", "masked"]), soft=st.booleans(), data=st.data(),
)
def test_property_any_size_and_mode(H, W, n_win, heads, mode, soft, data):
    if mode is False:
        H, W = H * n_win, W * n_win
    if mode == "nchw" and min(H, W) < n_win:
        H, W = H + n_win, W + n_win
    grid = effnn.ops.routing_attention.region_grid(H, W, n_win, mode)
    topk = data.draw(st.integers(1, grid.num_regions))
    layer = make(dim=4, num_heads=heads, n_win=n_win, topk=topk, auto_pad=mode, soft_routing=soft)
    padding_regions = grid.padded_size[0] - H >= grid.region_h or grid.padded_size[1] - W >= grid.region_w
    check_against_naive(layer, torch.randn(2, H, W, 4, dtype=torch.float64), rtol=1e-9, atol=1e-9,
                        exact_routing=not (mode is True and padding_regions))


# ---- compile, export, serialisation -----------------------------------------------------------


def test_torch_compile_fullgraph_matches_eager():
    layer = make(dtype=torch.float32, topk=3)
    x = torch.randn(2, 6, 6, 16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    y_c, y_e = compiled(x), layer(x)
    torch.testing.assert_close(y_c, y_e)
    g = torch.randn_like(y_e)
    for a, b in zip(torch.autograd.grad(y_c, (x, *layer.parameters()), g),
                    torch.autograd.grad(y_e, (x, *layer.parameters()), g), strict=True):
        torch.testing.assert_close(a, b)


def test_torch_export_holds_the_routed_attention_op():
    layer = make(dtype=torch.float32, topk=2)
    x = torch.randn(2, 6, 6, 16)
    exported = torch.export.export(layer, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert "effnn.routed_attention.default" in targets
    torch.testing.assert_close(exported.module()(x), layer(x))


def test_serialisation_round_trips(tmp_path):
    st_torch = pytest.importorskip("safetensors.torch")
    layer = make(dtype=torch.float32, topk=2, side_dwconv=5)
    x = torch.randn(2, 6, 6, 16)
    y = layer(x)
    st_torch.save_file(layer.state_dict(), tmp_path / "bra.safetensors")
    fresh = BiLevelRoutingAttention(16, 2, 3, topk=2, side_dwconv=5)
    fresh.load_state_dict(st_torch.load_file(tmp_path / "bra.safetensors"))
    assert torch.equal(fresh(x), y)
    assert torch.equal(copy.deepcopy(layer)(x), y)
    assert torch.equal(pickle.loads(pickle.dumps(layer))(x), y)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), y)
    half = copy.deepcopy(layer).to(torch.bfloat16)
    y_half = half(x.bfloat16())
    assert y_half.dtype == torch.bfloat16
    # bf16 region means may route differently; most outputs agree to bf16 precision
    close = ((y_half.float() - y).abs() <= 0.05 + 0.05 * y.abs()).float().mean()
    assert close > 0.9


def test_autocast_runs_in_bfloat16():
    layer = make(dtype=torch.float32, topk=2)
    x = torch.randn(2, 6, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_meta_device_then_materialise():
    with torch.device("meta"):
        layer = BiLevelRoutingAttention(16, 2, 3, topk=2, param_routing=True, diff_routing=True,
                                        soft_routing=True)
    assert all(p.is_meta for p in layer.parameters())
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert torch.isfinite(layer(torch.randn(1, 6, 6, 16))).all()
    fresh = BiLevelRoutingAttention(16, 2, 3, topk=2, param_routing=True, diff_routing=True,
                                    soft_routing=True)
    assert all(a.shape == b.shape for a, b in zip(layer.parameters(), fresh.parameters(), strict=True))


# ---- FLOPs ------------------------------------------------------------------------------------


def layer_macs(H, W, C, S, k, K):
    """The issue's count: HW*3C^2 + S^4*C + 2k(HW)^2*C/S^2 + K^2*HW*C + HW*C^2."""
    hw = H * W
    return hw * 3 * C * C + S**4 * C + 2 * k * hw * hw * C // S**2 + K * K * hw * C + hw * C * C


@pytest.mark.parametrize("H,C,S,k,K,heads", [(14, 16, 7, 4, 5, 2), (8, 32, 4, 16, 3, 4)])
def test_flop_counters_count_the_layer_formula(H, C, S, k, K, heads):
    layer = BiLevelRoutingAttention(C, heads, S, topk=k, side_dwconv=K).eval()
    x = torch.randn(1, H, H, C)
    macs = layer_macs(H, H, C, S, k, K)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == 2 * macs
    fvcore_nn = pytest.importorskip("fvcore.nn")
    analysis = fvcore_nn.FlopCountAnalysis(layer, (x,))
    analysis.set_op_handle(**effnn.flops.fvcore_handles())
    analysis.unsupported_ops_warnings(False)
    assert analysis.total() == macs


def test_biformer_t_stage_flops_match_the_official_fvcore_count():
    # research note: fvcore on the official layers at batch 1 gives 0.0822 / 0.0670 / 0.0597 GFLOPs
    for H, C, k, want in [(56, 64, 1, 0.0822), (28, 128, 4, 0.0670), (14, 256, 16, 0.0597)]:
        assert round(layer_macs(H, H, C, 7, k, 5) / 1e9, 4) == want


# ---- bad input --------------------------------------------------------------------------------


def test_constructor_errors():
    with pytest.raises(ValueError, match="dim must be a positive int"):
        BiLevelRoutingAttention(0)
    with pytest.raises(ValueError, match="must be divisible by num_heads=3"):
        BiLevelRoutingAttention(16, 3)
    with pytest.raises(ValueError, match="topk=50 exceeds the n_win\\*\\*2=49 regions"):
        BiLevelRoutingAttention(16, 2, 7, topk=50)
    with pytest.raises(ValueError, match="side_dwconv must be an odd kernel size"):
        BiLevelRoutingAttention(16, 2, side_dwconv=4)
    with pytest.raises(ValueError, match="param_attention must be 'qkvo' or 'qkv'"):
        BiLevelRoutingAttention(16, 2, param_attention="none")
    with pytest.raises(ValueError, match="param_routing=True needs diff_routing=True"):
        BiLevelRoutingAttention(16, 2, param_routing=True)
    with pytest.raises(NotImplementedError, match="diff_routing=True needs soft_routing=True"):
        BiLevelRoutingAttention(16, 2, diff_routing=True)
    for mode in ("fracpool", "conv"):
        with pytest.raises(NotImplementedError, match=f"kv_downsample_mode='{mode}' is not implemented"):
            BiLevelRoutingAttention(16, 2, kv_downsample_mode=mode)
    with pytest.raises(ValueError, match="kv_downsample_mode must be one of"):
        BiLevelRoutingAttention(16, 2, kv_downsample_mode="adaavgpool")
    with pytest.raises(ValueError, match="works with auto_pad False or True"):
        BiLevelRoutingAttention(16, 2, kv_downsample_mode="avgpool", auto_pad="masked")
    with pytest.raises(ValueError, match="auto_pad must be False, True or one of"):
        BiLevelRoutingAttention(16, 2, auto_pad="zeros")
    with pytest.raises(ValueError, match="qk_scale must be None or a positive number"):
        BiLevelRoutingAttention(16, 2, qk_scale=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        BiLevelRoutingAttention(16, 2, backend="gpu")


def test_forward_errors():
    layer = BiLevelRoutingAttention(16, 2, 3, topk=2)
    with pytest.raises(ValueError, match=r"channels-last \(N, H, W, 16\), got shape \(1, 16, 6, 6\)"):
        layer(torch.randn(1, 16, 6, 6))
    with pytest.raises(ValueError, match=r"got shape \(6, 6, 16\)"):
        layer(torch.randn(6, 6, 16))
    with pytest.raises(ValueError, match="H=7 and W=6 must be divisible by n_win=3"):
        layer(torch.randn(1, 7, 6, 16))
    with pytest.raises(TypeError, match="input has dtype torch.float64 but the parameters have dtype torch.float32"):
        layer(torch.randn(1, 6, 6, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(1, 6, 6, 16, dtype=torch.long))
    with pytest.raises(TypeError, match="must be a Tensor"):
        layer([[0.0] * 16])
    with pytest.raises(ValueError, match="input is on meta but the parameters are on cpu"):
        layer(torch.randn(1, 6, 6, 16, device="meta"))
    with pytest.raises(ValueError, match="at least 1x1"):
        BiLevelRoutingAttention(16, 2, 3, topk=2, auto_pad=True)(torch.randn(1, 0, 6, 16))
    w = layer.state_dict()
    with pytest.raises(ValueError, match="topk=5 must be between 1 and the number of regions, 4"):
        effnn.ops.routing_attention.bi_level_routing_attention(
            torch.randn(1, 4, 4, 16), w["qkv.qkv.weight"], None, None, None, None, None,
            num_heads=2, n_win=2, qk_dim=16, topk=5, scale=0.25)
    pooled = BiLevelRoutingAttention(16, 2, 3, topk=2, kv_downsample_mode="avgpool", kv_downsample_ratio=4)
    with pytest.raises(ValueError, match="regions of 2x2 tokens are smaller than kv_downsample_ratio=4"):
        pooled(torch.randn(1, 6, 6, 16))


def test_empty_batch_and_nonfinite_input():
    layer = make(dtype=torch.float32, topk=2)
    x = torch.randn(0, 6, 6, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 6, 6, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in layer.parameters())
    # a non-finite input makes its own image non-finite (through the routing means), never another
    x = torch.randn(2, 6, 6, 16)
    x[0, 0, 0, 0] = float("nan")
    y = layer(x)
    assert torch.isnan(y[0]).any() and torch.isfinite(y[1]).all()


# ---- distributed (STANDARDS 10) ---------------------------------------------------------------


def _bra_model():
    torch.manual_seed(7)
    return torch.nn.Sequential(
        BiLevelRoutingAttention(8, 2, 2, topk=2, side_dwconv=3, auto_pad="masked", soft_routing=True,
                                param_routing=True, diff_routing=True),
        torch.nn.Flatten(), torch.nn.LazyLinear(3),
    )


def _bra_data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 5, 8, generator=g), torch.randint(0, 3, (4,), generator=g)


def _bra_grads(model, x, y):
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _bra_worker(rank, tmp: Path):
    """DDP, then FSDP2, each rank on its half of the batch; saves both sets of gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = _bra_data()
    half = slice(2 * rank, 2 * rank + 2)
    grads = {}
    model = _bra_model()
    model(x[:1])  # materialise the lazy head
    ddp = DDP(model)
    torch.nn.functional.cross_entropy(ddp(x[half]), y[half]).backward()
    grads["ddp"] = {n: p.grad for n, p in model.named_parameters()}
    model = _bra_model()
    model(x[:1])
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    torch.nn.functional.cross_entropy(model(x[half]), y[half]).backward()
    grads["fsdp2"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    torch.save(grads, tmp / f"rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_ddp_and_fsdp2_gradients_match_one_process(tmp_path):
    from tests.integration.test_distributed import run_workers

    results = run_workers(_bra_worker, tmp_path)
    model = _bra_model()
    x, y = _bra_data()
    model(x[:1])
    want = _bra_grads(model, x, y)
    for rank, res in enumerate(results):
        for wrapper in ("ddp", "fsdp2"):
            for name, g in want.items():
                torch.testing.assert_close(res[wrapper][name], g, rtol=1e-5, atol=1e-6,
                                           msg=f"{wrapper} rank {rank}: {name}")


# ---- routing pictures -------------------------------------------------------------------------


def test_routed_region_map_and_plot(tmp_path):
    import effnn.viz

    layer = make(dtype=torch.float32, topk=2, auto_pad=True)
    _, routing = layer(torch.randn(2, 5, 7, 16), return_routing=True)  # 3x3 regions of 2x3 tokens
    grid_map = effnn.viz.routed_region_map(routing, 4, batch_index=1)
    assert grid_map.shape == (5, 7)
    for rank, region in enumerate(routing.indices[1, 4].tolist(), start=1):
        a, b = divmod(region, 3)
        block = grid_map[2 * a:2 * a + 2, 3 * b:3 * b + 3]  # cropped at the map's border
        assert (block == rank).all()
    assert (grid_map > 0).sum() <= 2 * 6
    with pytest.raises(ValueError, match=r"query_region must be in \[0, 9\)"):
        effnn.viz.routed_region_map(routing, 9)
    pytest.importorskip("matplotlib")
    path = tmp_path / "routing.png"
    fig = effnn.viz.plot_routing(torch.rand(3, 50, 70), routing, batch_index=1, path=str(path))
    assert len([ax for ax in fig.axes if ax.images]) == 8  # 8 of the 9 query regions by default
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="image must be"):
        effnn.viz.plot_routing(torch.rand(50), routing)
