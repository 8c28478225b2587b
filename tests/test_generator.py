"""Generator: reproducibility, batch independence, CFG, metadata and bad input."""

import numpy as np
import pytest
from pydantic import ValidationError

from socarrat.config import SamplerSpec
from socarrat.errors import UserError
from socarrat.models import parameter_count

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "a purple square",
           "three red triangles", "a blue circle on the left", "a yellow square", "two green circles"]


def pixels(results):
    return [np.asarray(r.image) for r in results]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_same_seed_same_image_other_seed_other_image(tiny_generator, sampler):
    spec = SamplerSpec(sampler=sampler, steps=6)
    a, b = pixels(tiny_generator.generate(["a red circle"] * 2, [5, 5], spec))
    [c] = pixels(tiny_generator.generate(["a red circle"], [6], spec))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_image_does_not_depend_on_the_rest_of_the_batch(tiny_generator, sampler):
    spec = SamplerSpec(sampler=sampler, steps=5)
    batch = pixels(tiny_generator.generate(PROMPTS, list(range(100, 108)), spec))
    for i in (0, 5):
        [alone] = pixels(tiny_generator.generate([PROMPTS[i]], [100 + i], spec))
        assert np.abs(alone.astype(int) - batch[i]).max() <= 1  # float reassociation across batch sizes


def test_prompt_changes_the_image(tiny_generator):
    spec = SamplerSpec(steps=5)
    a, b = pixels(tiny_generator.generate(["a red circle", "a blue square"], [1, 1], spec))
    assert not np.array_equal(a, b)


def test_guidance_one_ignores_the_negative_prompt_and_other_scales_use_it(tiny_generator):
    for guidance, same in ((1.0, True), (4.0, False)):
        spec = SamplerSpec(steps=4, guidance=guidance)
        a, b = pixels(tiny_generator.generate(["a red circle"] * 2, [1, 1], spec, negative_prompts=["", "a blue square"]))
        assert np.array_equal(a, b) == same


def test_metadata_and_size(tiny_generator):
    spec = SamplerSpec(steps=3, height_px=16, width_px=32)
    [r] = tiny_generator.generate(["a red circle"], [9], spec)
    assert r.image.size == (32, 16)
    m = r.metadata
    assert (m["prompt"], m["seed"], m["model_digest"], m["spec"]["steps"]) == ("a red circle", 9, "0" * 64, 3)
    assert set(m["timings"]) >= {"encode_s", "sample_s", "decode_s"}
    assert not m["prompt_truncated"] and not m["negative_prompt_truncated"]


def test_a_prompt_longer_than_the_context_is_flagged(tiny_generator):
    long = "a red circle " + "and a blue square " * 8  # more than the 24 tokens of the context
    results = tiny_generator.generate([long, "a red circle"], [1, 1], SamplerSpec(steps=2), [""] * 1 + [long])
    assert [(r.metadata["prompt_truncated"], r.metadata["negative_prompt_truncated"]) for r in results] == [
        (True, False), (False, True)]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prompts=[], seeds=[]), ValidationError, "prompts"),
    (dict(prompts=["  "], seeds=[1]), ValidationError, "empty"),
    (dict(prompts=["x" * 1001], seeds=[1]), ValidationError, "at most 1000 characters"),
    (dict(prompts=["x"], seeds=[1], negative_prompts=["x" * 1001]), ValidationError, "at most 1000 characters"),
    (dict(prompts=["a", "b"], seeds=[1]), ValidationError, "seeds"),
    (dict(prompts=["a"], seeds=[-1]), ValidationError, "seeds"),
    (dict(prompts=["a"], seeds=[1], spec=SamplerSpec(height_px=15)), UserError, "multiples of 2"),
])
def test_bad_requests_fail_before_model_work(tiny_generator, kwargs, error, match):
    with pytest.raises(error, match=match):
        tiny_generator.generate(**kwargs)


@pytest.mark.parametrize("field, value", [("steps", 0), ("guidance", -1.0), ("sampler", "euler"), ("spacing", "odd")])
def test_bad_sampler_spec(field, value):
    with pytest.raises(ValidationError, match=field):
        SamplerSpec(**{field: value})


def test_precision_auto_is_fp32_on_the_cpu_and_bf16_runs_the_model_calls_in_bf16(tiny_model):
    from socarrat.generator import Generator

    spec, made = SamplerSpec(steps=4), {}
    for precision in ("auto", "fp32", "bf16"):
        [r] = Generator(tiny_model, "0" * 64, "tiny-test", "cpu", precision).generate(["a red circle"], [3], spec)
        made[precision] = (np.asarray(r.image).astype(int), r.metadata["precision"])
    assert [made[p][1] for p in ("auto", "fp32", "bf16")] == ["fp32", "fp32", "bf16"]
    assert np.array_equal(made["auto"][0], made["fp32"][0])
    diff = made["bf16"][0] - made["fp32"][0]
    assert diff.any() and np.sqrt(np.mean(diff**2)) < 8  # the same image, a few uint8 steps off
    with pytest.raises(UserError, match="precision 'fp16': use one of auto, fp32, bf16"):
        Generator(tiny_model, "0" * 64, "tiny-test", "cpu", "fp16")


def test_compiled_model_calls_pad_to_a_power_of_two_and_give_the_eager_images(tiny_model):
    from socarrat.generator import Generator, padded_rows

    assert [padded_rows(n) for n in (1, 2, 3, 4, 5, 6, 128, 129)] == [1, 2, 4, 4, 8, 8, 128, 256]
    prompts, seeds, spec = ["a red circle", "two blue squares", "a green triangle"], [1, 2, 3], SamplerSpec(steps=2)
    eager = Generator(tiny_model, "0" * 64, "tiny-test", "cpu")
    compiled = Generator(tiny_model, "0" * 64, "tiny-test", "cpu", compile=True)
    calls = []
    compiled.calls.forward = _recording(compiled.calls.forward, calls)
    for a, b in zip(pixels(eager.generate(prompts, seeds, spec)), pixels(compiled.generate(prompts, seeds, spec))):
        assert np.abs(a.astype(int) - b).max() <= 1  # float rounding: other kernels, another batch shape
    assert calls == [8, 8]  # 3 prompts x 2 (CFG) rows, padded to 8, once a step


def _recording(forward, calls: list):
    def record(x, t, text):
        calls.append(len(x))
        return forward(x, t, text)
    return record


def test_load_default_model_and_a_bad_name():
    from socarrat.generator import Generator

    gen = Generator.load(device="cpu")
    assert parameter_count(gen.model) > 0 and len(gen.digest) == 64
    with pytest.raises(UserError, match="unknown model"):
        Generator.load("no-such-model")


def test_another_samplers_field_is_refused_rather_than_ignored():
    from socarrat.config import ModelSpec
    from socarrat.generator import resolve_spec

    gaussian = ModelSpec()
    with pytest.raises(UserError, match=r"^renoise_steps, temperature: not read by the ddpm sampler; leave them unset"):
        resolve_spec(gaussian, SamplerSpec(sampler="ddpm", temperature=(2.0, 1.0), renoise_steps=3))
    # At their defaults they are harmless, and Picard's window and tolerance may stay set with Picard
    # off: Serve's busy fallback and a caller's copy of a Picard spec turn it off that way.
    spec = resolve_spec(gaussian, SamplerSpec(window=8, tolerance=0.0, temperature=SamplerSpec().temperature))
    assert (spec.sampler, spec.steps) == ("ddim", 50)
