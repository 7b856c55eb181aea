"""A shortened run of examples/gblr_digits.py: the GBLR ViT's widths move to the budget and its
loss falls."""


import torch

from tests.examples import load_example


def _example():
    return load_example("gblr_digits.py")


def test_short_gblr_digits_run():
    ex = _example()
    full = ex.load_digits()
    data = ex.Digits(full.x_train[:384], full.y_train[:384], full.x_test[:100], full.y_test[:100])
    model = ex.make_vit(0, gblr=True)
    start_width = ex.mean_width(model)
    history = ex.train(model, data, seed=0, epochs=3, target_width=0.3, thres=20.0)
    widths = history["mean_width"]
    # the widths move toward the budget: monotonically, and most of the way in 18 steps
    assert all(b < a for a, b in zip([start_width, *widths], widths, strict=False))
    assert widths[-1] - 0.3 < 0.5 * (start_width - 0.3)
    assert history["loss"][-1] < history["loss"][0]
    costs = ex.layer_costs(model)
    assert len(costs) == 16 and all(0 <= macs for _, macs, _ in costs)
    assert ex.model_macs(model, data.x_test[:1]) < ex.model_macs(ex.make_vit(0, gblr=False), data.x_test[:1])
    assert torch.isfinite(torch.tensor(history["loss"])).all()
