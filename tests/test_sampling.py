"""Solvers and the sequential loop: exactness on an oracle, CFG identities, noise independence."""

import pytest
import torch

from socarrat.sampling import cfg_denoiser, draw_noise, make_step, sample
from socarrat.sampling.schedules import Schedule

SHAPE = (3, 8, 8)


def oracle(x0: torch.Tensor, schedule_kind: str, prediction: str):
    """A denoiser that knows the clean image x0 and answers exactly in the requested parameterisation."""
    from socarrat.sampling.schedules import alphas_cumprod

    ac = alphas_cumprod(schedule_kind, 1000).float()

    def denoise(x, t, cond):
        a = ac[t][:, None, None, None]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0

    return denoise


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_solvers_land_on_the_clean_image_with_an_oracle(sampler, prediction, spacing):
    x0 = torch.rand(2, *SHAPE) * 2 - 1
    schedule = Schedule.create("cosine", 1000, spacing, 7)
    x, noises = draw_noise([1, 2], SHAPE, 7, sampler == "ddpm")
    step = make_step(sampler, schedule, prediction)
    out = sample(oracle(x0, "cosine", prediction), x, schedule, step, noises, cond=None)
    torch.testing.assert_close(out, x0, atol=2e-4, rtol=0)


def test_ddpm_depends_on_its_noise_and_ddim_ignores_it():
    schedule = Schedule.create("linear", 1000, "trailing", 5)
    x, noises = draw_noise([3], SHAPE, 5, stochastic=True)
    # A denoiser that is wrong about x0 leaves the DDPM noise visible in intermediate states.
    wrong = lambda x, t, c: torch.ones_like(x)
    a = make_step("ddpm", schedule, "eps")(x, wrong(x, None, None), 0, noises[0])
    b = make_step("ddpm", schedule, "eps")(x, wrong(x, None, None), 0, noises[0] + 1)
    assert not torch.allclose(a, b)
    ddim = make_step("ddim", schedule, "eps")
    assert torch.equal(ddim(x, wrong(x, None, None), 0, noises[0]), ddim(x, wrong(x, None, None), 0, None))


def test_noise_is_per_sample():
    alone, alone_noise = draw_noise([7], SHAPE, 4, True)
    batch, batch_noise = draw_noise([1, 7, 9], SHAPE, 4, True)
    assert torch.equal(alone[0], batch[1]) and torch.equal(alone_noise[:, 0], batch_noise[:, 1])
    assert not torch.equal(batch[0], batch[2])


class Cond(list):
    @staticmethod
    def cat(parts):
        return Cond(sum(parts, []))


def test_cfg_identities():
    model = lambda x, t, cond: x * torch.tensor(cond, dtype=x.dtype)[:, None, None, None]
    x, t = torch.ones(2, *SHAPE), torch.zeros(2, dtype=torch.long)
    pos, neg = Cond([2.0, 3.0]), Cond([1.0, 1.0])
    assert torch.equal(cfg_denoiser(model, 1.0)(x, t, (pos, neg)), model(x, t, pos))
    assert torch.equal(cfg_denoiser(model, 0.0)(x, t, (pos, neg)), model(x, t, neg))
    # guidance g: neg + g * (pos - neg)
    assert torch.allclose(cfg_denoiser(model, 4.0)(x, t, (pos, neg))[:, 0, 0, 0], torch.tensor([5.0, 9.0]))


def test_cfg_combines_bf16_outputs_in_float32():
    model = lambda x, t, cond: (x * torch.tensor(cond)[:, None, None, None]).bfloat16()
    x, t = torch.ones(1, *SHAPE), torch.zeros(1, dtype=torch.long)
    pos, neg = Cond([1.0 + 2**-7]), Cond([1.0])  # one bf16 step apart
    out = cfg_denoiser(model, 7.5)(x, t, (pos, neg))
    assert out.dtype == torch.float32 and out[0, 0, 0, 0].item() == 1.0 + 7.5 * 2**-7  # in bf16: 1.0625


def test_unknown_sampler_is_a_user_error():
    from socarrat.errors import UserError

    with pytest.raises(UserError, match="sampler"):
        make_step("euler", Schedule.create("linear", 1000, "trailing", 3), "eps")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])  # bf16: a model under autocast
def test_a_step_over_many_rows_each_at_its_own_step_is_bitwise_the_steps_one_by_one(sampler, prediction, clip_sample, out_dtype):
    # Picard steps a window of states in one call: its converged answer is the sequential one only if
    # a row's result does not depend on how it was called.
    schedule = Schedule.create("cosine", 1000, "trailing", 9)
    step = make_step(sampler, schedule, prediction, clip_sample)
    steps = torch.tensor([0, 3, 3, 8, 5])
    x, out, noise = (torch.randn(len(steps), *SHAPE) for _ in range(3))
    out = out.to(out_dtype)
    rows = step(x, out, steps, noise)
    one_by_one = torch.cat([step(x[r:r + 1], out[r:r + 1], int(i), noise[r:r + 1]) for r, i in enumerate(steps)])
    assert torch.equal(rows, one_by_one)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_a_steps_guess_is_its_chain_when_the_model_knows_the_clean_image(sampler, prediction):
    # Picard starts new window states from step.guess: the chain with the x0 the model implies held
    # fixed, in closed form, each row from its own step. With a denoiser that knows x0 it is the
    # chain itself, noise included.
    x0 = torch.rand(2, *SHAPE) * 2 - 1
    schedule = Schedule.create("cosine", 1000, "trailing", 20)
    step, denoise = make_step(sampler, schedule, prediction, clip_sample=False), oracle(x0, "cosine", prediction)
    x, noises = draw_noise([4, 5], SHAPE, 20, sampler == "ddpm")
    t, starts, count = schedule.timesteps, (5, 8), 10  # row 0 guesses from step 5, row 1 from step 8

    chain = []  # the states 1..18 of both rows, one step at a time
    for i in range(max(starts) + count):
        x = step(x, denoise(x, t[i].repeat(2), None), i, None if noises is None else noises[i])
        chain.append(x)
    rows, steps = torch.arange(2), torch.tensor(starts) + torch.arange(count)[:, None]  # (count, 2)
    at = torch.stack([chain[s - 1][r] for r, s in enumerate(starts)])
    guess = step.guess(at, denoise(at, t[steps[0]], None), steps, None if noises is None else noises[steps, rows])
    expected = torch.stack([torch.stack(chain[s:s + count])[:, r] for r, s in enumerate(starts)], 1)
    torch.testing.assert_close(guess, expected, atol=1e-5, rtol=0)
