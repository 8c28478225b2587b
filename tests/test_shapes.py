"""Behaviour of the procedural shapes dataset and its detector-free judge (socarrat.datasets.shapes)."""

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from socarrat.datasets.shapes import (
    ABSOLUTE, BACKGROUND, CATEGORIES, COLOURS, SHAPES, PromptSpec, analyze, dataset, evaluation_prompts, is_heldout,
    parse_caption, render, sample_example, score, score_many,
)
from socarrat.errors import UserError

OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "left",
            "above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def examples(seed: int, n: int):
    rng = np.random.default_rng(seed)
    return [sample_example(rng) for _ in range(n)]


def wrong(spec: PromptSpec, rng: np.random.Generator) -> PromptSpec:
    """`spec` altered so that the scene drawn for it no longer satisfies it."""
    first = spec.objects[0]
    if spec.category == "counting":
        return replace(spec, count=5 - spec.count)
    if spec.category == "position":
        return replace(spec, relation=OPPOSITE[spec.relation])
    if spec.category == "two_objects":
        missing = next(s for s in SHAPES if s not in {o.shape for o in spec.objects})
        return replace(spec, objects=(first, replace(spec.objects[1], shape=missing)))
    colour = rng.choice([c for c in COLOURS if c != first.colour])
    return replace(spec, objects=(replace(first, colour=str(colour)), *spec.objects[1:]))


def test_dataset_is_deterministic_in_its_seed():
    first, again, other = (list(dataset(seed, 20)) for seed in (0, 0, 1))
    assert [c for _, c in first] == [c for _, c in again]
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(first, again))
    assert [c for _, c in first] != [c for _, c in other]
    assert not all(np.array_equal(a, b) for (a, _), (b, _) in zip(first, other))
    assert first[0][0].shape == (32, 32, 3) and first[0][0].dtype == np.uint8


def test_captions_parse_back_to_their_spec():
    samples = examples(1, 2000)
    assert all(parse_caption(caption) == spec for _, caption, spec in samples)
    assert {spec.category for _, _, spec in samples} == set(CATEGORIES)
    assert parse_caption("  A Photo of  TWO red circles. ") == parse_caption("two red circles")


@pytest.mark.parametrize("size_px", [32, 64])
def test_analyzer_passes_true_captions_of_clean_renders(size_px):
    results = Counter()
    for scene, caption, _ in examples(2, 2000):
        result = score(render(scene, size_px), caption)
        results[result.passed] += 1
    assert results[True] / 2000 >= 0.99, results


@pytest.mark.parametrize("size_px", [32, 64])
def test_analyzer_fails_wrong_captions(size_px):
    rng = np.random.default_rng(3)
    passed = Counter()
    for scene, _, spec in examples(3, 500):
        passed[spec.category] += score(render(scene, size_px), wrong(spec, rng)).passed
    assert sum(passed.values()) / 500 <= 0.01, passed


def test_analyzer_tolerates_pixel_noise():
    rng = np.random.default_rng(4)
    passed = 0
    for scene, caption, _ in examples(4, 300):
        noisy = render(scene, 32) + rng.normal(0, 30, (32, 32, 3))
        passed += score(np.clip(noisy, 0, 255).astype(np.uint8), caption).passed
    assert passed / 300 >= 0.97


def test_analyzer_reports_objects_and_takes_pil_images():
    scene, _, _ = sample_example(np.random.default_rng(5))
    image = render(scene, 64)
    found = analyze(image)
    assert analyze(Image.fromarray(image)) == found
    truth = sorted((o.shape, o.colour, o.size) for o in scene.objects)
    assert sorted((o.shape, o.colour, o.size) for o in found) == truth
    for obj in found:
        near = min(scene.objects, key=lambda o: (o.cx - obj.cx) ** 2 + (o.cy - obj.cy) ** 2)
        assert abs(near.cx - obj.cx) < 0.05 and abs(near.cy - obj.cy) < 0.1  # triangles' centroids sit low
    assert analyze(np.full((32, 32, 3), BACKGROUND, np.uint8)) == []


def test_heldout_captions_are_never_trained_on():
    training = {caption for _, caption, _ in examples(6, 5000)}
    assert not any(is_heldout(caption) for caption in training)
    prompts = evaluation_prompts(300)
    captions = [caption for caption, _ in prompts]
    assert len(set(captions)) == 300 and not training & set(captions)
    assert all(is_heldout(caption) and parse_caption(caption) == spec for caption, spec in prompts)
    assert Counter(spec.category for _, spec in prompts) == {c: 60 for c in CATEGORIES}
    assert evaluation_prompts(300) == prompts


def test_evaluation_prompts_refuses_more_than_the_heldout_space():
    with pytest.raises(UserError, match="n=1000"):
        evaluation_prompts(1000)


def test_score_many_averages_over_categories_not_images():
    samples = examples(7, 40)
    single = [(render(s, 32), c) for s, c, spec in samples if spec.category == "single_object"][:2]
    counting = [(render(s, 32), c) for s, c, spec in samples if spec.category == "counting"][:1]
    blank = np.full((32, 32, 3), BACKGROUND, np.uint8)
    images = [single[0][0], single[1][0], blank]
    result = score_many(images, [single[0][1], single[1][1], counting[0][1]])
    assert result == {"single_object": 1.0, "counting": 0.0, "overall": 0.5}


@pytest.mark.parametrize("text", ["", "a purple circle", "a red hexagon", "two red circle", "four red circles",
                                  "a red circle above", "a red circle and a square", "the sky at night"])
def test_parse_caption_rejects_text_outside_the_grammar(text):
    with pytest.raises(UserError, match="caption"):
        parse_caption(text)


def test_render_refuses_sizes_the_analyzer_is_not_made_for():
    scene, _, _ = sample_example(np.random.default_rng(8))
    with pytest.raises(UserError, match="size_px=16"):
        render(scene, 16)


def test_analyze_takes_uint8_rgb_only():
    scene, _, _ = sample_example(np.random.default_rng(8))
    image = render(scene, 32)
    assert analyze(image)
    for bad in (image / 255.0, image[..., :2]):  # a float image would find nothing and fail every prompt
        with pytest.raises(UserError, match="analyze takes \\(H, W, 3\\) uint8 RGB"):
            analyze(bad)


def test_placement_benchmark_trains_on_one_object_placement_captions_only():
    from benchmarks.placement import placement_examples

    images, captions = placement_examples(20, 32, seed=0)
    assert images.shape == (20, 3, 32, 32) and -1 <= images.min() < images.max() <= 1
    specs = [parse_caption(c) for c in captions]
    assert all(s.relation in ABSOLUTE and len(s.objects) == 1 and not s.count for s in specs)
    assert len({s.relation for s in specs}) > 2  # every placement word, not one


def test_placement_benchmark_fine_tunes_a_copy_with_each_weighting_side_by_side(tiny_checkpoint, tmp_path):
    import json

    import torch

    from benchmarks.placement import main, train_on_placement
    from socarrat.generator import Generator

    out = tmp_path / "placement.json"
    assert main(["--model", tiny_checkpoint, "--train-steps", "2", "--fine-tune", "--batch-size", "2", "--examples", "4",
                 "--seeds", "1", "--steps", "1", "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == [tiny_checkpoint, *(f"{tiny_checkpoint} fine-tuned, 2 steps, {w}"
                                                              for w in ("min-snr", "capped-v"))]
    gen = Generator.load(tiny_checkpoint, device="cpu")
    before = {k: v.clone() for k, v in gen.model.state_dict().items()}
    tuned = train_on_placement(gen, 2, 2, 4, seed=0, weighting="capped-v", fine_tune=True).model.state_dict()
    assert all(torch.equal(v, gen.model.state_dict()[k]) for k, v in before.items())  # the probed model is untouched
    drift = max((tuned[k].float() - v.float()).abs().max().item() for k, v in before.items())
    assert 0 < drift < 0.05  # it started from those weights and moved
