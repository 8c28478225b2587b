"""Picard over a group of Ray actors: equals the in-process sampler, also as `Generator`'s denoiser
for Gaussian and token models (edits included); a killed actor fails the request with a clear error
(never a wrong image) and the group recovers for the next request."""

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
import ray
import torch
from ray.exceptions import RayActorError

from socarrat import parallel
from socarrat.checkpoint import save_checkpoint
from socarrat.config import SamplerSpec
from socarrat.errors import UserError
from socarrat.generator import Edit
from socarrat.parallel import PicardGroup, WorkerLostError, split
from socarrat.sampling import cfg_denoiser, draw_noise, make_step
from socarrat.sampling.picard import sample_picard
from socarrat.sampling.schedules import Schedule

STEPS, WINDOW = 12, 4


@pytest.fixture(scope="module")
def group(tiny_model):
    # One logical GPU that no CUDA backs: the two actors take half of it each, as on a real card,
    # and run on the CPU because torch finds no GPU.
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)  # never a `ray start` cluster
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the in-process runs: a tiny model is fastest on one thread
    try:
        yield PicardGroup(tiny_model, actors=2, num_gpus_per_actor=0.5, num_cpus_per_actor=0.5)
    finally:
        torch.set_num_threads(threads)
        ray.shutdown()


@pytest.fixture(scope="module")
def token_group(group, tiny_token_model):
    return PicardGroup(tiny_token_model, actors=2, num_cpus_per_actor=0.5)


def request(model, sampler="ddpm"):
    """(cond, x, schedule, step, noises) for two prompts."""
    with torch.inference_mode():
        cond = (model.encode(["a red circle", "two blue squares"]), model.encode(["", ""]))
    schedule = Schedule.create(model.spec.schedule, model.spec.train_timesteps, "trailing", STEPS)
    x, noises = draw_noise([1, 2], (3, 32, 32), STEPS, sampler == "ddpm")
    return cond, x, schedule, make_step(sampler, schedule, model.spec.prediction, model.spec.clip_sample), noises


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_actor_group_equals_in_process(group, tiny_model, sampler):
    cond, x, schedule, step, noises = request(tiny_model, sampler)
    with torch.inference_mode():
        local, local_stats = sample_picard(cfg_denoiser(tiny_model, 3.0), x, schedule, step, noises, cond, WINDOW, 1e-3)
    with group.conditioned(cond, 3.0) as (denoise, rows):
        remote, remote_stats = sample_picard(denoise, x, schedule, step, noises, rows, WINDOW, 1e-3)
    # The actors run other kernels (one thread, other batch sizes): equal up to float rounding.
    torch.testing.assert_close(remote, local, atol=1e-4, rtol=0)
    assert remote_stats.evaluations >= STEPS * len(x)


def assert_recovered(group, model, victim) -> None:
    """The group has replaced its actor 1, `victim`, and samples as in-process again."""
    cond, x, schedule, step, noises = request(model)
    with torch.inference_mode():
        local, _ = sample_picard(cfg_denoiser(model, 3.0), x, schedule, step, noises, cond, WINDOW, 1e-3)
    with group.conditioned(cond, 3.0) as (denoise, rows):
        remote, _ = sample_picard(denoise, x, schedule, step, noises, rows, WINDOW, 1e-3)
    assert group.actors[1] is not victim
    torch.testing.assert_close(remote, local, atol=1e-4, rtol=0)


def test_killed_actor_fails_the_request_and_the_group_recovers(group, tiny_model):
    cond, x, schedule, step, noises = request(tiny_model)
    victim, rounds = group.actors[1], []

    with group.conditioned(cond, 3.0) as (denoise, rows):
        def killing(x, t, rows):
            rounds.append(len(x))
            if len(rounds) == 2:
                ray.kill(victim, no_restart=True)
            return denoise(x, t, rows)

        with pytest.raises(WorkerLostError, match=r"actor\(s\) \[1\] of 2 died.*retry"):
            sample_picard(killing, x, schedule, step, noises, rows, WINDOW, tolerance=0.0)
    assert 2 <= len(rounds) < STEPS

    assert_recovered(group, tiny_model, victim)


def test_a_dead_actor_is_found_behind_another_actors_own_error(group, tiny_model):
    """`ray.get` raises the first error to arrive: an actor's own error (out of memory, say) that comes
    before another actor's death must not hide it, or the group would not restart that one and the
    next request would fail too."""
    victim = group.actors[1]
    args = (torch.zeros(1, 3, 32, 32), torch.tensor([0]), torch.tensor([0]))
    own_error = group.actors[0].denoise.remote("no such request", *args)
    ray.wait([own_error])  # its error has arrived ...
    ray.kill(victim, no_restart=True)  # ... before the death
    with pytest.raises(WorkerLostError, match=r"actor\(s\) \[1\] of 2 died"):
        group._gather([own_error, victim.denoise.remote("x", *args)])
    assert_recovered(group, tiny_model, victim)


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=int)


def recording(source, rows: list[int]):
    """`source` (a DenoiserSource) that appends the rows of each model call it makes to `rows`."""

    @contextmanager
    def conditioned(cond, guidance):
        with source(cond, guidance) as (denoise, remote_cond):
            yield (lambda x, t, c: rows.append(len(x)) or denoise(x, t, c)), remote_cond

    return conditioned


def test_a_group_waiting_for_resources_says_so_and_a_killed_wait_ends(group, tiny_model, monkeypatch, caplog):
    monkeypatch.setattr(parallel, "WAIT_NOTICE_S", 0.2)
    before = set(ray.util.list_named_actors())
    with ThreadPoolExecutor(1) as pool:  # two GPUs per actor on a cluster of one: never scheduled
        waiting = pool.submit(PicardGroup, tiny_model, actors=1, num_gpus_per_actor=2)
        notice, deadline = "still waiting for 1 Picard actors with {'num_gpus': 2", time.monotonic() + 120
        while notice not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
        assert notice in caplog.text
        for name in set(ray.util.list_named_actors()) - before:
            ray.kill(ray.get_actor(name))
        with pytest.raises(RayActorError):
            waiting.result()


def test_each_actor_is_sent_its_share_of_the_window_only():
    window = torch.randn(64, 3, 32, 32)
    parts = split(window, 4)
    assert torch.equal(torch.cat(parts), window)
    # Ray pickles tensors: a view would carry the whole window's storage to every actor.
    sent = [len(ray.cloudpickle.dumps(part)) for part in parts]
    assert max(sent) < 0.3 * len(ray.cloudpickle.dumps(window))


def test_generator_on_the_group_equals_in_process(group, tiny_generator):
    prompts, seeds = ["a red circle", "two blue squares", "a green triangle"], [1, 2, 3]
    spec = SamplerSpec(sampler="ddpm", steps=STEPS, picard=True, window=WINDOW, tolerance=0.0)
    here = tiny_generator.generate(prompts, seeds, spec)
    rows = []
    there = tiny_generator.generate(prompts, seeds, spec, denoiser=recording(group.conditioned, rows))
    sequential_spec = spec.model_copy(update={"picard": False})
    sequential = tiny_generator.generate(prompts, seeds, sequential_spec, denoiser=group.conditioned)
    for a, b, c in zip(here, there, sequential):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1 and np.abs(pixels(a) - pixels(c)).max() <= 1  # float rounding
    stats = [r.metadata["picard"] for r in there]  # each image's own
    assert 1 < max(s["rounds"] for s in stats) == len(rows) <= STEPS
    assert sum(rows) == sum(s["evaluations"] for s in stats)  # every evaluation ran on the group


def test_a_bf16_group_computes_in_bf16_as_a_bf16_generator_does(group, tiny_model):
    from socarrat.generator import Generator

    lone = PicardGroup(tiny_model, actors=1, num_cpus_per_actor=0, precision="bf16")
    prompts, seeds, spec = ["a red circle", "two blue squares"], [1, 2], SamplerSpec(sampler="ddim", steps=STEPS)

    def made(precision: str, denoiser=None) -> list[np.ndarray]:
        gen = Generator(tiny_model, "0" * 64, "tiny", "cpu", precision)
        return [pixels(r) for r in gen.generate(prompts, seeds, spec, denoiser=denoiser)]

    there, here, fp32 = made("bf16", lone.conditioned), made("bf16"), made("fp32")
    assert max(np.abs(a - b).max() for a, b in zip(there, here)) <= 1  # float rounding: the same bf16 calls
    assert max(np.abs(a - b).max() for a, b in zip(fp32, here)) > 1  # what fp32 model calls on the actor would give
    with pytest.raises(UserError, match="precision 'half'"):
        PicardGroup(tiny_model, actors=1, precision="half")


def test_token_edit_on_the_group_equals_in_process(token_group, token_generator):
    [source] = token_generator.generate(["a red circle"], [1])
    canvas, mask = Edit.outpaint(source.image.crop((0, 0, 16, 32)), right=16)
    edit, spec = Edit([canvas] * 2, [mask] * 2, start_step=3), SamplerSpec(picard=True, window=WINDOW)
    here = token_generator.generate(["a blue square"] * 2, [4, 5], spec, edit=edit)
    rows = []
    there = token_generator.generate(["a blue square"] * 2, [4, 5], spec, edit=edit,
                                     denoiser=recording(token_group.conditioned, rows))
    for a, b in zip(here, there):  # tokens: exactly the same image
        assert np.array_equal(pixels(a), pixels(b))
    stats = [r.metadata["picard"] for r in there]
    assert max(s["rounds"] for s in stats) == len(rows) > 1
    assert sum(rows) == sum(s["evaluations"] for s in stats)


def test_a_lost_actor_is_not_restarted_on_a_replaced_checkpoint(group, tiny_model, tmp_path):
    uri = str(tmp_path / "model")
    lone = PicardGroup(uri, actors=1, num_cpus_per_actor=0, digest=save_checkpoint(tiny_model, uri))
    cond = request(tiny_model)[0]
    ray.kill(lone.actors[0], no_restart=True)
    with pytest.raises(WorkerLostError):
        with lone.conditioned(cond, 3.0):
            pass
    save_checkpoint(tiny_model, uri, dtype=torch.bfloat16)  # other weights at the same URI
    # The actor's UserError reaches the group as itself, in one line (not "worker lost, retry").
    with pytest.raises(RuntimeError, match=r"^a lost Picard actor could not be restarted: checkpoint \S+ now has "
                                           r"digest [0-9a-f]{64}, not the expected [0-9a-f]{64}$"):
        with lone.conditioned(cond, 3.0):
            pass
