"""Picard sampler: equals sequential at tolerance 0 and window 1, stays close at the default
tolerance, per-sample windows make a batch equal its samples alone; Generator and CLI switch it on."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.picard import tensor_ops, uncounted
from socarrat.config import SamplerSpec
from socarrat.sampling import cfg_denoiser, draw_noise, make_step, sample
from socarrat.sampling import picard
from socarrat.sampling.picard import sample_picard, take_rows
from socarrat.sampling.schedules import Schedule

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]
SHAPE = (3, 32, 32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not fight the rest of a busy machine for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def setup(model, sampler, steps, spacing="trailing", seeds=(1, 2, 3)):
    """Everything `sample` and `sample_picard` take, for the tiny model with CFG."""
    prompts = PROMPTS[: len(seeds)]
    with torch.inference_mode():
        cond = (model.encode(prompts), model.encode([""] * len(prompts)))
    schedule = Schedule.create(model.spec.schedule, model.spec.train_timesteps, spacing, steps)
    x, noises = draw_noise(list(seeds), SHAPE, steps, sampler == "ddpm")
    step = make_step(sampler, schedule, model.spec.prediction, model.spec.clip_sample)
    return cfg_denoiser(model, 3.0), x, schedule, step, noises, cond


def rms_uint8(a, b):
    u8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round()
    return (u8(a) - u8(b)).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@torch.inference_mode()
def test_tolerance_zero_equals_sequential(tiny_model, sampler, spacing):
    args = setup(tiny_model, sampler, 7, spacing, seeds=(1, 2))
    picard, stats = sample_picard(*args, window=3, tolerance=0.0)
    assert (picard - sample(*args)).abs().max() < 1e-4
    assert stats.rounds <= 7


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@torch.inference_mode()
def test_window_one_is_the_sequential_loop(tiny_model, sampler):
    args = setup(tiny_model, sampler, 6, seeds=(4,))
    picard, stats = sample_picard(*args, window=1, tolerance=10.0)
    assert torch.equal(picard, sample(*args))
    assert stats.rounds == stats.evaluations == 6 and stats.windows == [1] * 6


@pytest.mark.parametrize("sampler, steps", [("ddim", 30), ("ddpm", 60)])
@torch.inference_mode()
def test_default_tolerance_is_close_in_fewer_rounds(tiny_model, sampler, steps):
    args = setup(tiny_model, sampler, steps, seeds=(5,))
    tolerance = SamplerSpec().tolerance
    picard, stats = sample_picard(*args, window=16, tolerance=tolerance)
    assert rms_uint8(picard, sample(*args)) <= 1.0
    assert stats.rounds < steps / 2
    # Stats add up: every round evaluates at most `window` states of the one sample.
    assert stats.evaluations == sum(stats.windows) and len(stats.windows) == stats.rounds
    assert all(1 <= w <= 16 for w in stats.windows) and stats.evaluations >= steps


@torch.inference_mode()
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_a_state_is_accepted_at_a_tenth_of_the_tolerance(tiny_model, sampler, monkeypatch):
    # A state's change can grow about tenfold on its way to the final image where the model chooses
    # between shapes, so `tolerance`, in final-image units, accepts a tenth of it in a state.
    assert picard.ERROR_GAIN == 10.0
    args = setup(tiny_model, sampler, 30, seeds=(5,))
    out, stats = sample_picard(*args, window=16, tolerance=2e-2)
    monkeypatch.setattr(picard, "ERROR_GAIN", 1.0)
    plain, plain_stats = sample_picard(*args, window=16, tolerance=2e-3)
    assert torch.equal(out, plain) and stats.windows == plain_stats.windows
    loose, loose_stats = sample_picard(*args, window=16, tolerance=2e-2)
    assert loose_stats.evaluations < stats.evaluations  # the gain made a difference here


@torch.inference_mode()
def test_a_sample_in_a_batch_equals_the_sample_alone(tiny_model):
    # Each sample slides its own window, so neither its result nor its stopping depends on the batch.
    batch, stats = sample_picard(*setup(tiny_model, "ddpm", 40, seeds=(1, 2, 3)), window=8, tolerance=3e-3)
    alone, alone_stats = sample_picard(*setup(tiny_model, "ddpm", 40, seeds=(1,)), window=8, tolerance=3e-3)
    torch.testing.assert_close(batch[:1], alone, atol=1e-5, rtol=0)
    assert stats.rounds >= alone_stats.rounds and stats.evaluations > alone_stats.evaluations
    # ... and so are its own stats: the batch's are their max (rounds) and sum (evaluations).
    assert (stats.sample_rounds[0], stats.sample_evaluations[0]) == (alone_stats.rounds, alone_stats.evaluations)
    assert stats.rounds == max(stats.sample_rounds) and stats.evaluations == sum(stats.sample_evaluations)
    assert len(set(stats.sample_evaluations)) > 1  # the samples converged at other rounds


@torch.inference_mode()
def test_a_rounds_work_outside_the_model_does_not_grow_with_the_batch(tiny_model):
    # A round takes every sample's window through the step, the sum and the guess together, wherever
    # each window starts: on a GPU each tensor operation outside the model is a kernel launch.
    def host_ops_per_round(seeds):
        denoise, *rest = setup(tiny_model, "ddpm", 40, seeds=seeds)
        runs = []
        ops = tensor_ops(lambda: runs.append(sample_picard(uncounted(denoise), *rest, window=8, tolerance=3e-3)))
        stats = runs[0][1]
        return ops / stats.rounds, stats

    alone, _ = host_ops_per_round((1,))
    batch, stats = host_ops_per_round((1, 2, 3))
    assert len(set(stats.sample_evaluations)) > 1  # the windows started at different steps
    assert batch <= 1.1 * alone, (batch, alone)


def test_take_rows_repeats_conditioning_per_window_row(tiny_model):
    with torch.inference_mode():
        pos, neg = tiny_model.encode(["a", "b"]), tiny_model.encode(["", ""])
    index = torch.tensor([1, 1, 0])
    rows_pos, rows_neg = take_rows((pos, neg), index)
    assert torch.equal(rows_pos.tokens, pos.tokens[index]) and torch.equal(rows_neg.mask, neg.mask[index])
    assert take_rows(None, index) is None


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_generator_picard_at_tolerance_zero_gives_the_sequential_png(tiny_generator, sampler):
    spec = SamplerSpec(sampler=sampler, steps=6)
    [seq] = tiny_generator.generate(["a red circle"], [3], spec)
    [par] = tiny_generator.generate(["a red circle"], [3], SamplerSpec(sampler=sampler, steps=6, picard=True, window=4, tolerance=0))
    # Equal up to float rounding: a different batch size may pick other kernels and flip one level.
    assert np.abs(np.asarray(seq.image).astype(int) - np.asarray(par.image)).max() <= 1
    assert "picard" not in seq.metadata
    assert par.metadata["picard"]["rounds"] <= 6 and par.metadata["spec"]["picard"]


def test_cli_picard_flags(tmp_path, tiny_model):
    from socarrat.checkpoint import save_checkpoint
    from socarrat.cli import main

    save_checkpoint(tiny_model, str(tmp_path / "model"))
    out = tmp_path / "img.png"
    assert main(["generate", "--prompt", "a red circle", "--steps", "8", "--picard", "--window", "4", "--tolerance", "0.01",
                 "--model", str(tmp_path / "model"), "--out", str(out)]) == 0
    meta = json.loads(Image.open(out).text["socarrat"])
    assert meta["spec"]["picard"] and meta["spec"]["window"] == 4 and 1 <= meta["picard"]["rounds"] <= 8
    assert main(["generate", "--prompt", "x", "--picard", "--window", "0", "--model", str(tmp_path / "model"),
                 "--out", str(tmp_path / "bad.png")]) == 2
