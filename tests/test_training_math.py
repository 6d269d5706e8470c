"""The training math against closed forms: timestep distributions, the loss, the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch

from wanpair.errors import WanpairError
from wanpair.train.flow_matching import flow_matching_loss, noisy_input, pad_text
from wanpair.train.timesteps import sample_timesteps


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _draw(method, window, n=100_000, **kw):
    return sample_timesteps(n, method, window, generator=torch.Generator().manual_seed(0), **kw).double()


@pytest.mark.parametrize("window", [(875, 1000), (0, 875), (0, 1000)])
def test_shift_1_conditioned_on_the_window_matches_the_truncated_logistic_normal(window):
    """shift = 1, scale 1: t = sigmoid(z); conditioned on [lo, hi], P(t <= x) is a ratio of normal CDFs."""
    t = _draw("shift", window, shift=1.0)
    lo, hi = window[0] / 1000, window[1] / 1000
    assert t.min() >= lo and t.max() <= hi
    cdf = lambda x: _phi(_logit(x)) if 0 < x < 1 else float(x >= 1)  # noqa: E731
    for q in (0.25, 0.5, 0.75):
        x = lo + q * (hi - lo)
        expected = (cdf(x) - cdf(lo)) / (cdf(hi) - cdf(lo))
        assert abs((t <= x).double().mean().item() - expected) < 0.01


def test_shift_transform_moves_mass_to_high_noise():
    """t' = s t / (1 + (s-1) t) is monotone, so P(t' <= x) = P(t <= x / (s - (s-1) x))."""
    s, x = 3.0, 0.5
    t = _draw("shift", (0, 1000), shift=s)
    inv = x / (s - (s - 1) * x)
    assert abs((t <= x).double().mean().item() - _phi(_logit(inv))) < 0.01


def test_uniform_and_linear_window_mapping():
    t = _draw("uniform", (0, 875), preserve_shape=False)
    assert abs(t.mean().item() - 0.4375) < 0.005 and t.max() <= 0.875
    t = _draw("sigmoid", (875, 1000), preserve_shape=False)
    assert abs(t.mean().item() - (0.875 + 0.125 * 0.5)) < 0.005  # sigmoid(z) has mean 1/2


def test_too_narrow_window_fails_loudly():
    with pytest.raises(WanpairError, match="too narrow"):
        sample_timesteps(4, "sigmoid", (999, 1000), sigmoid_scale=0.1, generator=torch.Generator().manual_seed(0))


def test_loss_on_a_hand_computed_case():
    x0 = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1, 1)
    eps = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1, 1)
    t = torch.tensor([0.25])
    # every number here is a short binary fraction, so float32 computes them exactly: compare exactly
    assert torch.equal(noisy_input(x0, eps, t).flatten(), torch.tensor([0.875, -0.625]))
    seen = {}

    def model(hidden_states, timestep, encoder_hidden_states, return_dict):
        seen.update(x=hidden_states, t=timestep, text=encoder_hidden_states)
        return (torch.zeros_like(hidden_states),)

    loss = flow_matching_loss(model, x0, eps, t, torch.ones(1, 512, 4), torch.float32)
    # target eps - x0 = (-0.5, 1.5); prediction 0 -> mean(0.25, 2.25) = 1.25
    assert loss.item() == pytest.approx(1.25)
    assert seen["t"].item() == pytest.approx(250.0)
    assert torch.equal(seen["x"].flatten(), torch.tensor([0.875, -0.625]))


def test_text_is_zero_padded_to_512():
    out = pad_text([torch.ones(3, 4), torch.ones(600, 4)])
    assert out.shape == (2, 512, 4)
    assert out[0, :3].eq(1).all() and out[0, 3:].eq(0).all() and out[1].eq(1).all()


def test_polynomial_schedule_honours_min_lr_ratio(demo):
    from conftest import set_train
    from wanpair.project import load_project
    from wanpair.train.optim import build_scheduler

    set_train(demo / "wanpair.toml", learning_rate=3e-4, lr_scheduler_power=8.0, min_lr_ratio=5e-5)
    project, _ = load_project(demo / "wanpair.toml")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    sched = build_scheduler(opt, project.train, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    lr_end = 5e-5 * 3e-4
    for step in (0, 10, 50, 99):
        assert lrs[step] == pytest.approx((3e-4 - lr_end) * (1 - step / 100) ** 8 + lr_end, rel=1e-6)
    assert sched.get_last_lr()[0] == pytest.approx(lr_end)
