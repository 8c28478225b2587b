"""Timestep spacings against hand-computed values, and the true final signal level."""

import pytest
import torch

from socarrat.errors import UserError
from socarrat.sampling.schedules import Schedule, alphas_cumprod, spaced_timesteps


@pytest.mark.parametrize("spacing, expected", [
    ("leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
    ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
])
def test_spacings_match_hand_computed(spacing, expected):
    assert spaced_timesteps(spacing, 1000, 10).tolist() == expected


def test_uneven_spacings_are_not_a_fixed_stride():
    # 1000 / 3 is not an integer: trailing rounds each point, leading uses the floor stride.
    assert spaced_timesteps("trailing", 1000, 3).tolist() == [999, 666, 332]
    assert spaced_timesteps("leading", 1000, 3).tolist() == [666, 333, 0]
    assert spaced_timesteps("linspace", 1000, 1).tolist() == [0]


def test_schedule_steps_to_the_next_visited_timestep_and_ends_clean():
    s = Schedule.create("linear", 1000, "trailing", 3)
    ac = alphas_cumprod("linear", 1000)
    assert torch.equal(s.alpha_bar, ac[[999, 666, 332]])
    assert s.alpha_bar_next.tolist() == [ac[666].item(), ac[332].item(), 1.0]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alphas_cumprod_decrease_from_one(kind):
    ac = alphas_cumprod(kind, 1000)
    assert ac.shape == (1000,) and 0.99 < ac[0] < 1 and ac[-1] < 0.01
    assert torch.all(ac[1:] < ac[:-1])


def test_a_short_linear_schedule_keeps_some_signal_at_its_end():
    # Rescaled to T, the last betas of DDPM's linear schedule reach 1 below T = 21: clipped at 0.999.
    for steps in (10, 20):
        ac = alphas_cumprod("linear", steps)
        assert torch.all(ac > 0) and torch.all(ac[1:] < ac[:-1])
    assert torch.equal(alphas_cumprod("linear", 1000), torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0))


def test_bad_steps_and_spacing():
    with pytest.raises(UserError, match="steps"):
        spaced_timesteps("trailing", 1000, 0)
    with pytest.raises(UserError, match="steps"):
        spaced_timesteps("trailing", 1000, 1001)
    with pytest.raises(UserError, match="spacing"):
        spaced_timesteps("sideways", 1000, 10)
