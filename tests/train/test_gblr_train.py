import math

import pytest
import torch
from torch import nn

from effnn.nn.gblr import GaudiGBLRLinear
from effnn.train.gblr import (
    SigmaSchedule,
    gblr_layers,
    gblr_param_groups,
    mean_shift_widths,
    mean_width,
    model_macs,
    soft_shrink_widths,
)


def _model(sigma=None):
    return nn.Sequential(
        GaudiGBLRLinear(16, 24, sigma=sigma, width_init="unif", location_init="unif"),
        nn.ReLU(),
        nn.LayerNorm(24),
        GaudiGBLRLinear(24, 8, sigma=sigma, width_init="unif", location_init="unif"),
        nn.Linear(8, 4),
    )


def official_targeted_softshrink(layers, lr, thres, target, cont=False, p=1.0):
    """``TargetedSoftshrink.on_train_batch_end`` (changwoolee/Gaudi-GBLR, src/callbacks/shrink.py)
    as read there, on plain tensors: the mean over layers of mean(((w0 * w1) > 0) * widths); no
    shrink below the target; softshrink by thres * lr, clamp [0, 1] per row, locations mod 1."""
    width_sum = sum((((w[0:1] * w[1:2]) > 0).float() * w).mean() for w, _ in layers)
    mean = width_sum / len(layers)
    if target > 0 and mean < target:
        thres = 0.0
    elif target > 0 and cont:
        thres = thres * ((mean - target) / (1.0 - target)) ** p
    lambd = thres * lr
    out = []
    for w, loc in layers:
        w = torch.stack([nn.functional.softshrink(w[0], lambd).clamp(0, 1), nn.functional.softshrink(w[1], lambd).clamp(0, 1)])
        out.append((w, loc - loc.floor()))
    return out, lambd


def test_sigma_schedule_is_the_official_linear_annealing():
    sched = SigmaSchedule(1.0, 100.0, start=5, end=300)
    assert sched(0) == 1.0 and sched(4) == 1.0 and sched(5) == 1.0
    assert sched(300) == 100.0 and sched(1000) == 100.0
    assert sched(152.5) == pytest.approx(50.5)
    model = _model(sigma=3.0)
    assert sched.apply(model, 100) == pytest.approx(1 + 99 * 95 / 295)
    for layer in gblr_layers(model):
        assert float(layer.sigma) == pytest.approx(1 + 99 * 95 / 295)
    with pytest.raises(ValueError, match="start must be before end"):
        SigmaSchedule(1.0, 100.0, start=5, end=5)
    with pytest.raises(ValueError, match="sigma_init must be a positive number, got 0"):
        SigmaSchedule(0, 100.0, start=0, end=1)


@pytest.mark.parametrize("target,cont", [(0.0, False), (0.3, False), (0.3, True), (0.9, False)])
def test_soft_shrink_matches_the_official_targeted_rule(target, cont):
    model = _model()
    layers = gblr_layers(model)
    with torch.no_grad():
        layers[0].widths[0, 0] = 0.0  # a half-dead component: not counted in the mean
        layers[1].locations[1, 0] = 1.7
    before = [(layer.widths.detach().clone(), layer.locations.detach().clone()) for layer in layers]
    expected, expected_lambd = official_targeted_softshrink(before, lr=0.01, thres=5.0, target=target, cont=cont)
    lambd = soft_shrink_widths(model, lr=0.01, thres=5.0, target_width=target, cont=cont)
    assert lambd == pytest.approx(float(expected_lambd))
    for layer, (w, loc) in zip(layers, expected, strict=True):
        torch.testing.assert_close(layer.widths.detach(), w)
        torch.testing.assert_close(layer.locations.detach(), loc)
    if target == 0.9:  # the mean is below the target: the step pauses
        assert lambd == 0.0
        for layer, (w, _) in zip(layers, before, strict=True):
            torch.testing.assert_close(layer.widths.detach(), w)


def test_soft_shrink_freeze_warmup_and_frozen_layers():
    model = _model()
    layers = gblr_layers(model)
    layers[1].widths.requires_grad_(False)
    frozen = layers[1].widths.detach().clone()
    mean = mean_width(model)
    # warm-up: init_thres alone at progress 0 (no target check), blended at 0.25
    assert soft_shrink_widths(model, lr=0.1, thres=1.0, target_width=1.0, init_thres=0.2, progress=0.0) == pytest.approx(0.02)
    assert soft_shrink_widths(model, lr=0.1, thres=1.0, target_width=1.0, init_thres=0.2, progress=0.25) == pytest.approx(0.015)
    assert torch.equal(layers[1].widths, frozen)  # a layer whose widths are frozen is not shrunk
    assert mean_width(model) < mean
    lambd = soft_shrink_widths(model, lr=0.1, thres=1.0, target_width=1.0, freeze=True)
    assert lambd == 0.0 and not layers[0].widths.requires_grad and not layers[0].locations.requires_grad
    with pytest.raises(ValueError, match="no GaudiGBLRLinear layer"):
        soft_shrink_widths(nn.Linear(2, 2), lr=0.1, thres=1.0)
    with pytest.raises(ValueError, match="progress must be in"):
        soft_shrink_widths(model, lr=0.1, thres=1.0, progress=2.0)


def test_mean_shift_is_the_official_mean_shrink():
    model = _model()
    layers = gblr_layers(model)
    before = [layer.widths.detach().clone() for layer in layers]
    mean = mean_width(model)
    shift = mean_shift_widths(model, target_width=0.2, lambd=0.5)
    assert shift == pytest.approx(0.5 * (mean - 0.2))
    for layer, w in zip(layers, before, strict=True):
        torch.testing.assert_close(layer.widths.detach(), (w - shift).clamp(0, 1))
        assert torch.all((layer.locations >= 0) & (layer.locations < 1))
    assert mean_shift_widths(model, target_width=0.99) == 0.0  # below the target: only the clamp


def test_param_groups_follow_the_official_optimizer_wiring():
    model = _model()
    groups = gblr_param_groups(model, weight_decay=0.05, structure_lr=1e-3)
    assert [len(g["params"]) for g in groups] == [5, 5, 4]  # factors + Linear weight; biases/LN; structure
    assert groups[-1]["lr"] == 1e-3 and groups[-1]["betas"] == (0.0, 0.999) and groups[-1]["weight_decay"] == 0.0
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    split = gblr_param_groups(model, weight_decay=0.05, structure_lr=1e-3, location_lr=1e-2)
    assert split[-1]["lr"] == 1e-2 and split[-2]["lr"] == 1e-3 and len(split) == 4
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    opt = torch.optim.AdamW(groups, lr=1e-2)
    model(torch.randn(5, 16)).sum().backward()
    opt.step()


def _hand_macs(layer):
    # official get_num_params at sigma = inf: integer lengths, live if both exceed one element
    a = torch.round(layer.widths[1] * layer.out_features)
    b = torch.round(layer.widths[0] * layer.in_features)
    live = (a > 1) & (b > 1)
    return int((torch.minimum(layer.rank_per_component * (a + b), a * b) * live).sum())


def test_model_macs_at_splr_init_is_dense_and_follows_the_shrink():
    dense = nn.Sequential(nn.Linear(48, 48), nn.GELU(), nn.Linear(48, 96))
    gblr = nn.Sequential(GaudiGBLRLinear(48, 48, sigma=None), nn.GELU(), GaudiGBLRLinear(48, 96, sigma=None))
    x = torch.randn(2, 7, 48)
    assert model_macs(gblr, x) == model_macs(dense, x) == 14 * (48 * 48 + 48 * 96)
    # drive the mean width to a target with the official step, then count by hand
    while mean_width(gblr) > 0.15:
        soft_shrink_widths(gblr, lr=1.0, thres=0.01, target_width=0.15)
    per_token = sum(_hand_macs(layer) for layer in gblr_layers(gblr))
    assert 0 < per_token < 0.5 * (48 * 48 + 48 * 96)
    assert model_macs(gblr, x) == 14 * per_token
    assert sum(layer.eval().macs_per_token() for layer in gblr_layers(gblr)) == per_token


def test_short_training_moves_widths_to_the_budget_and_lowers_the_loss():
    torch.manual_seed(0)
    teacher = nn.Linear(32, 32)
    model = nn.Sequential(GaudiGBLRLinear(32, 32, sigma=1.0))
    opt = torch.optim.AdamW(gblr_param_groups(model, weight_decay=0.0, structure_lr=5e-3), lr=5e-3)
    sigma = SigmaSchedule(1.0, 20.0, start=0, end=20)
    x_all = torch.randn(2048, 32)
    losses = []
    for step in range(30):
        sigma.apply(model, step)
        x = x_all[(step * 64) % 2048:][:64]
        loss = nn.functional.mse_loss(model(x), teacher(x).detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        soft_shrink_widths(model, lr=opt.param_groups[-1]["lr"], thres=40.0, target_width=0.3)
        losses.append(float(loss.detach()))
    assert mean_width(model) < 0.36
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])
    assert math.isfinite(losses[-1])
