"""The Paella sampler: schedule, determinism, batch independence, exact parallel sampling, editing."""

import numpy as np
import pytest
import torch
from PIL import Image

from socarrat.config import SamplerSpec
from socarrat.errors import UserError
from socarrat.generator import Blend, Edit
from socarrat.sampling import cfg_denoiser, sample
from socarrat.sampling.picard import sample_picard
from socarrat.sampling.tokens import TokenSchedule, constrain, draw_token_noise, lerp_text, make_token_step, noise_fraction

T = 1000


def run(model, prompts, seeds, steps=12, picard=False, window=4, keep=None, known=None, tolerance=0.0):
    """Tokens (B, 8, 8) sampled by the tiny model, sequentially or by Picard, optionally inpainting."""
    schedule = TokenSchedule.create(T, steps)
    x, noises = draw_token_noise(seeds, (8, 8), steps, model.codebook_size)
    step = make_token_step(schedule, (1.0, 0.5))
    with torch.inference_mode():
        cond = (model.encode(prompts), model.encode([""] * len(prompts)))
        denoise = cfg_denoiser(model, 3.0)
        if keep is not None:
            denoise, cond, x = constrain(denoise), (known, keep, cond), torch.where(keep, known, x)
        if picard:
            return sample_picard(denoise, x, schedule, step, noises, cond, window, tolerance)
        return sample(denoise, x, schedule, step, noises, cond), None


def test_schedule_goes_from_all_noise_to_clean_and_renoises_less_each_step():
    s = TokenSchedule.create(T, 12)
    assert s.timesteps[0] == T - 1 and len(s) == 12 and (s.timesteps.diff() < 0).all()
    assert noise_fraction(s.timesteps[:1], T).item() == 1.0 and noise_fraction(torch.tensor([0]), T).item() == 0.0
    assert (s.renoise[:-1].diff() < 0).all() and s.renoise[-1] == 0 and (s.renoise[:-1] > 0).all()
    assert (TokenSchedule.create(T, 12, renoise_steps=5).renoise[5:] == 0).all()
    assert torch.equal(TokenSchedule.create(T, 12, start=4).timesteps, s.timesteps[4:])
    with pytest.raises(UserError, match="steps must be"):
        TokenSchedule.create(T, 0)
    with pytest.raises(UserError, match="start must be"):
        TokenSchedule.create(T, 12, start=12)


def test_step_renoises_the_scheduled_fraction_with_the_starting_tokens():
    schedule = TokenSchedule.create(T, 4)
    _, noises = draw_token_noise([3], (64, 64), 4, 16)
    step = make_token_step(schedule, (1.0, 1.0))
    logits = torch.full((1, 16, 64, 64), -1e9).index_fill_(1, torch.tensor([7]), 0.0)  # certain: token 7
    x = step(torch.zeros(1, 64, 64, dtype=torch.long), logits, 0, noises[0])
    start, renoised = (noises[0][:, 2] * 16).long(), noises[0][:, 1] < schedule.renoise[0]
    assert torch.equal(x[renoised], start[renoised]) and (x[~renoised] == 7).all()
    assert abs(renoised.double().mean().item() - float(schedule.renoise[0])) < 0.02
    assert (step(x, logits, 3, noises[3]) == 7).all()  # the last step keeps what it draws


def test_a_tail_schedule_steps_as_the_full_sampler_does():
    full, tail = TokenSchedule.create(T, 8), TokenSchedule.create(T, 8, start=5)
    _, noises = draw_token_noise([3], (16, 16), 8, 16)
    logits = torch.randn(1, 16, 16, 16, dtype=torch.float64)
    x = torch.zeros(1, 16, 16, dtype=torch.long)
    full_step, tail_step = make_token_step(full, (2.0, 0.1)), make_token_step(tail, (2.0, 0.1), start=5)
    assert all(torch.equal(full_step(x, logits, 5 + i, noises[5 + i]), tail_step(x, logits, i, noises[5 + i]))
               for i in range(3))


def test_sampler_is_deterministic_for_a_seed_and_independent_of_the_batch(tiny_token_model):
    a, _ = run(tiny_token_model, ["a red circle", "two blue squares"], [1, 2])
    b, _ = run(tiny_token_model, ["a red circle", "two blue squares"], [1, 2])
    alone, _ = run(tiny_token_model, ["two blue squares"], [2])
    other, _ = run(tiny_token_model, ["a red circle"], [9])
    assert a.dtype == torch.long and a.shape == (2, 8, 8)
    assert torch.equal(a, b) and torch.equal(a[1:], alone) and not torch.equal(a[:1], other)


@pytest.mark.parametrize(("window", "tolerance"), [(1, 0.0), (3, 0.0), (12, 0.0), (12, 5.0)])
def test_parallel_sampling_gives_the_sequential_tokens_exactly(tiny_token_model, window, tolerance):
    prompts, seeds = ["a red circle", "two blue squares", "a green triangle"], [1, 2, 3]
    seq, _ = run(tiny_token_model, prompts, seeds)
    par, stats = run(tiny_token_model, prompts, seeds, picard=True, window=window, tolerance=tolerance)
    assert torch.equal(par, seq)
    assert stats.rounds <= 12 and (window > 1 or stats.rounds == 12)


def test_inpainting_leaves_the_kept_tokens_untouched_in_both_samplers(tiny_token_model):
    known = torch.randint(16, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(2, 8, 8, dtype=torch.bool)
    keep[:, :, 4:] = True
    seq, _ = run(tiny_token_model, ["a", "b"], [1, 2], keep=keep, known=known)
    par, _ = run(tiny_token_model, ["a", "b"], [1, 2], picard=True, keep=keep, known=known)
    assert torch.equal(seq[keep], known[keep]) and torch.equal(par, seq)
    assert not torch.equal(seq[~keep], known[~keep])


def test_lerp_text_is_each_prompt_at_its_ends(tiny_token_model):
    a, b = tiny_token_model.encode(["a red circle"]), tiny_token_model.encode(["two blue squares"])
    assert torch.equal(lerp_text(a, b, 0.0).tokens, a.tokens) and torch.allclose(lerp_text(a, b, 1.0).pooled, b.pooled)


def pixels(result) -> np.ndarray:
    return np.asarray(result.image)


def test_generator_picks_paella_for_token_models_and_refuses_other_samplers(token_generator, tiny_generator):
    [r] = token_generator.generate(["a red circle"], [1])
    assert r.metadata["spec"]["sampler"] == "paella" and r.metadata["spec"]["steps"] == 12 and r.image.size == (32, 32)
    [p] = token_generator.generate(["a red circle"], [1], SamplerSpec(picard=True, window=5))
    assert np.array_equal(pixels(p), pixels(r)) and p.metadata["picard"]["rounds"] <= 12
    with pytest.raises(UserError, match="does not apply to this token-family model"):
        token_generator.generate(["a"], [1], SamplerSpec(sampler="ddim"))
    with pytest.raises(UserError, match="does not apply to this gaussian-family model"):
        tiny_generator.generate(["a"], [1], SamplerSpec(sampler="paella"))
    with pytest.raises(UserError, match="multiples of 8"):
        token_generator.generate(["a"], [1], SamplerSpec(height_px=30))


def test_generator_edits_inpaint_outpaint_and_restyle(token_generator, tiny_generator):
    [source] = token_generator.generate(["a red circle"], [1])
    canvas, mask = Edit.outpaint(source.image.crop((0, 0, 16, 32)), right=16)
    assert canvas.size == (32, 32) and mask.getpixel((20, 5)) == 255 and mask.getpixel((5, 5)) == 0
    for edit in (Edit([canvas], [mask]), Edit([source.image], None, start_step=6), Edit([canvas], [mask], start_step=3)):
        seq = token_generator.generate(["a blue square"], [4], edit=edit)
        par = token_generator.generate(["a blue square"], [4], SamplerSpec(picard=True), edit=edit)
        assert np.array_equal(pixels(seq[0]), pixels(par[0]))
    restyled = token_generator.generate(["a blue square"], [4], edit=Edit([source.image], None, start_step=11))
    fresh = token_generator.generate(["a blue square"], [4])
    assert not np.array_equal(pixels(restyled[0]), pixels(fresh[0]))
    with pytest.raises(UserError, match="must be 32x32"):
        token_generator.generate(["a"], [1], edit=Edit([Image.new("RGB", (16, 16))], None, 3))
    with pytest.raises(UserError, match="one 32x32 mask"):
        token_generator.generate(["a"], [1], edit=Edit([canvas], [Image.new("L", (8, 8))]))
    with pytest.raises(UserError, match="start must be"):
        token_generator.generate(["a"], [1], edit=Edit([canvas], None, start_step=12))
    with pytest.raises(UserError, match="would ignore its images"):
        token_generator.generate(["a"], [1], edit=Edit([canvas]))
    with pytest.raises(UserError, match=r"edits \[1\] mark no pixel"):
        token_generator.generate(["a", "b"], [1, 2], edit=Edit([canvas] * 2, [mask, Image.new("L", (32, 32))], 3))
    with pytest.raises(UserError, match="token-family model"):
        tiny_generator.generate(["a"], [1], edit=Edit([canvas]))


def recorded_calls(generator, monkeypatch) -> list[torch.Tensor]:
    """The token states (rows, h, w) of every model call `generator` makes from now on."""
    seen, model = [], generator.calls
    monkeypatch.setattr(generator, "calls", lambda x, t, text: seen.append(x.clone()) or model(x, t, text))
    return seen


def test_an_edit_shows_the_model_its_kept_tokens_at_every_step(token_generator, monkeypatch):
    [source] = token_generator.generate(["a red circle"], [1])
    edit = Edit(*map(lambda item: [item], Edit.outpaint(source.image.crop((0, 0, 16, 32)), right=16)))
    f = token_generator.spec.token.downsampling
    known, keep = token_generator.model.tokenize(edit.pixels((32 // f, 32 // f), f)), edit.keep((32 // f, 32 // f), f)[0]
    seen = recorded_calls(token_generator, monkeypatch)
    token_generator.generate(["a blue square"], [4], edit=edit)
    assert len(seen) == 12 and keep.any() and not keep.all()
    for x in seen:  # both halves of each classifier-free-guidance call; re-noised to random tokens, most
        assert torch.equal(x[:, keep], known[:, keep].expand(len(x), -1))  # kept ones were hidden until the end


def test_structural_editing_starts_at_its_start_steps_noise_level(token_generator, monkeypatch):
    [source] = token_generator.generate(["a red circle"], [1])
    f = token_generator.spec.token.downsampling
    known = token_generator.model.tokenize(Edit([source.image]).pixels((32 // f, 32 // f), f))
    seen = recorded_calls(token_generator, monkeypatch)
    # Re-noising cut short after step 2 must not start step 6 from the clean image: it is at level
    # noise_fraction(500) = 0.71, about 0.66 of the tokens changed among 16 codes.
    token_generator.generate(["a blue square"], [4], SamplerSpec(renoise_steps=2), edit=Edit([source.image], None, 6))
    assert 0.5 < (seen[0][0] != known[0]).float().mean() < 0.8


def test_temperatures_too_low_for_finite_draws_are_refused():
    with pytest.raises(ValueError, match=r"temperature must be at least 0.001"):
        SamplerSpec(temperature=(1.0, 1e-50))


def test_blend_interpolates_between_prompts(token_generator):
    ends = token_generator.generate(["a red circle", "two blue squares"], [4, 4])
    blended = token_generator.generate(["a red circle"] * 2, [4, 4], blend=Blend(["two blue squares"] * 2, [0.0, 1.0]))
    assert np.array_equal(pixels(blended[0]), pixels(ends[0]))
    with pytest.raises(UserError, match="one prompt and one weight"):
        token_generator.generate(["a"], [1], blend=Blend(["b", "c"], [0.5]))


def test_a_token_step_over_rows_at_their_own_steps_is_the_steps_one_by_one():
    schedule = TokenSchedule.create(1000, 6)
    step = make_token_step(schedule, (1.0, 0.3))
    steps = torch.tensor([0, 2, 5, 5])
    x = torch.randint(0, 16, (len(steps), 4, 4))
    logits, noise = torch.randn(len(steps), 16, 4, 4), torch.rand(len(steps), 3, 4, 4)
    rows = step(x, logits, steps, noise)
    one_by_one = torch.cat([step(x[r:r + 1], logits[r:r + 1], int(i), noise[r:r + 1]) for r, i in enumerate(steps)])
    assert torch.equal(rows, one_by_one)
