"""HDiT backbone: shapes at any multiple, window attention against plain attention, gradients,
training and sampling through `Generator`, sizes it cannot make, and checkpoints."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import _randomise as randomised  # re-draws zero-initialised weights: every path is live
from test_training import fixed_loss  # the objective on one fixed 32 px batch

from jobs.train import _model_spec
from socarrat.checkpoint import describe_checkpoint, load_checkpoint, save_checkpoint
from socarrat.cli import main as cli
from socarrat.config import HDiTSpec, ModelSpec, SamplerSpec
from socarrat.errors import UserError
from socarrat.generator import Generator
from socarrat.models import build_model
from socarrat.models.hdit import window_attention
from socarrat.training import TrainConfig, train

TEXT = {"width": 16, "embed_dim": 8, "layers": 1, "heads": 2}
HDIT = {"patch_size": 2, "widths": (16, 32), "depths": (2, 1), "head_dim": 8, "window": 4, "mapping_width": 16}
SPEC = ModelSpec(backbone="hdit", hdit=HDIT, text=TEXT)


def with_qk_norm(qk_norm: bool) -> ModelSpec:
    return SPEC.model_copy(update={"hdit": SPEC.hdit.model_copy(update={"qk_norm": qk_norm})})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomised(build_model(SPEC)).eval()


@pytest.mark.parametrize("hw", [(4, 4), (16, 16), (12, 20), (40, 8)])
def test_keeps_the_input_shape_at_any_multiple_of_its_downsampling(model, hw):
    x = torch.randn(2, 3, *hw)
    out = model(x, torch.tensor([0, 999]), model.encode(["a red circle", ""]))
    assert out.shape == x.shape and out.isfinite().all()
    assert model.pixel_multiple == 4 and model.latent_shape(*hw) == (3, *hw)


def qkv(h, w, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(2, h, w, 3, 8, requires_grad=True) for _ in range(3)]


def full_attention(q, k, v):
    b, h, w, heads, d = q.shape
    flat = [x.reshape(b, h * w, heads, d).transpose(1, 2) for x in (q, k, v)]
    return F.scaled_dot_product_attention(*flat).transpose(1, 2).reshape(b, h, w, heads, d)


@pytest.mark.parametrize("window", [10, 64])
@pytest.mark.parametrize("shift", [False, True])
def test_a_window_that_covers_the_map_is_full_attention(window, shift):
    q, k, v = qkv(6, 10)
    torch.testing.assert_close(window_attention(q, k, v, window, shift), full_attention(q, k, v))


def test_unshifted_windows_attend_within_each_tile_including_cut_tiles_at_the_edge():
    q, k, v = qkv(10, 6)  # window 4: tiles of 4x4, 4x2, 2x4 and 2x2 tokens
    out = window_attention(q, k, v, 4, shift=False)
    for r in range(0, 10, 4):
        for c in range(0, 6, 4):
            tile = (slice(None), slice(r, r + 4), slice(c, c + 4))
            torch.testing.assert_close(out[tile], full_attention(q[tile], k[tile], v[tile]))


@pytest.mark.parametrize("query, rows, cols", [
    ((3, 3), slice(2, 6), slice(2, 6)),  # the shifted tile straddles the unshifted tiles' corner
    ((0, 0), slice(0, 2), slice(0, 2)),  # its tile wraps round to rows/cols 6-7: those are masked
    ((7, 1), slice(6, 8), slice(0, 2)),
])
def test_shifted_windows_read_exactly_the_tokens_of_their_tile(query, rows, cols):
    q, k, v = qkv(8, 8)
    window_attention(q, k, v, 4, shift=True)[:, query[0], query[1]].sum().backward()
    read = (k.grad.abs().sum((0, 3, 4)) > 0) | (v.grad.abs().sum((0, 3, 4)) > 0)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[rows, cols] = True
    assert torch.equal(read, expected)


def test_skip_merge_mapping_network_and_text_paths_receive_gradients():
    torch.manual_seed(0)
    model = randomised(build_model(with_qk_norm(True)))
    x = torch.randn(2, 3, 16, 16)
    out = model(x, torch.tensor([5, 700]), model.encode(["a red circle", "two blue squares"]))
    out.square().mean().backward()
    hdit = model.hdit
    for name, p in [*hdit.skip_mix.named_parameters("skip_mix"), *hdit.mapping.named_parameters("mapping"),
                    *hdit.down[0][0].cross.named_parameters("cross"), ("attn.scale", hdit.middle[0].attn.scale)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("qk_norm", [True, False])
def test_cosine_similarity_attention_does_not_grow_with_the_query_and_key_weights(qk_norm):
    """QK-norm: logits are cosine similarities times a learned scale, so weights that grow in training
    cannot sharpen attention without bound (the plain dot product, the control, does change)."""
    torch.manual_seed(0)
    model = randomised(build_model(with_qk_norm(qk_norm))).eval()
    x, t, text = torch.randn(2, 3, 16, 16), torch.tensor([5, 700]), model.encode(["a red circle", "two blue squares"])
    with torch.no_grad():
        before = model(x, t, text)
        for layer in [*model.hdit.down[0], *model.hdit.middle, *model.hdit.up[0]]:
            width = layer.attn.qkv.in_features
            layer.attn.qkv.weight[: 2 * width] *= 30  # queries and keys, not values
            if layer.cross is not None:
                layer.cross.q.weight *= 30
                layer.cross.kv.weight[:width] *= 30
        after = model(x, t, text)
    assert torch.allclose(after, before, atol=1e-4) == qk_norm


@pytest.mark.parametrize("absolute_pos", [False, True])
def test_only_place_features_tell_a_token_where_in_the_image_it_is(absolute_pos):
    """From a uniform image every token holds the same content and RoPE sees only offsets, so
    without place features a one-level (global attention) HDiT answers the same everywhere and
    cannot put a shape 'on the left'; with them (randomised from their zero start) places differ.
    (Deeper HDiTs learn a little of their place from where shifted windows are cut at the edges.)"""
    torch.manual_seed(0)
    hdit = {**HDIT, "widths": (16,), "depths": (2,), "cross_attention_levels": (0,), "absolute_pos": absolute_pos}
    model = randomised(build_model(SPEC.model_copy(update={"hdit": HDiTSpec(**hdit)}))).eval()
    with torch.no_grad():
        out = model(torch.full((1, 3, 16, 16), 0.3), torch.tensor([500]), model.encode(["a red circle on the left"]))
    same_pixel_of_each_patch = out[:, :, ::2, ::2]  # (a patch's 2x2 pixels differ from each other anyway)
    spread = (same_pixel_of_each_patch - same_pixel_of_each_patch.mean((2, 3), keepdim=True)).abs().max().item()
    assert (spread > 1e-2) == absolute_pos, spread


def test_spec_sizes_and_bad_sizes():
    three_levels = {"patch_size": 4, "widths": (32, 32, 64), "depths": (1, 1, 1)}
    assert SPEC.downsampling == 4 and ModelSpec(backbone="hdit", hdit=three_levels).downsampling == 16
    assert ModelSpec(backbone="hdit").hdit == HDiTSpec()
    with pytest.raises(ValueError, match="belongs to backbone 'hdit' only"):
        ModelSpec(hdit=three_levels)
    with pytest.raises(ValueError, match="multiple of 16"):
        ModelSpec(backbone="hdit", size_px=40, hdit=three_levels)
    with pytest.raises(ValueError, match="head_dim"):
        HDiTSpec(widths=(48, 64), head_dim=32)
    with pytest.raises(ValueError, match="one entry per level"):
        HDiTSpec(widths=(32, 64), depths=(1,))
    with pytest.raises(ValueError, match="cross_attention_levels"):
        HDiTSpec(cross_attention_levels=(2,))


def test_a_size_that_is_not_a_multiple_is_a_user_error(model):
    gen = Generator(model, digest="0" * 64, name="tiny-hdit", device="cpu")
    with pytest.raises(UserError, match="multiples of 4"):
        model.latent_shape(18, 16)
    with pytest.raises(UserError, match="multiples of 4"):
        gen.generate(["a red circle"], [0], SamplerSpec(steps=2, height_px=16, width_px=30))


def test_checkpoint_round_trip_and_the_bundled_unet_still_loads(model, tmp_path):
    digest = save_checkpoint(model, str(tmp_path))
    loaded, config = load_checkpoint(str(tmp_path))
    assert config["sha256"] == digest and loaded.spec == SPEC
    assert all(k.startswith(("text.", "hdit.")) for k in loaded.state_dict())
    rounded = build_model(SPEC).eval()  # the checkpoint keeps fp16 weights: the model, rounded to them
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    x, t, text = torch.randn(1, 3, 16, 16), torch.tensor([300]), model.encode(["a blue square"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, text), rounded(x, t, text), atol=1e-5, rtol=0)
    unet, _ = load_checkpoint("shapes-gaussian")
    assert unet.spec.backbone == "unet" and any(k.startswith("unet.") for k in unet.state_dict())


def test_checkpoints_made_before_place_features_load_without_them(tmp_path):
    old = SPEC.model_copy(update={"hdit": SPEC.hdit.model_copy(update={"absolute_pos": False})})
    save_checkpoint(build_model(old), str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    del config["model"]["hdit"]["absolute_pos"]  # as config.json was written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert HDiTSpec().absolute_pos  # new models have them
    assert load_checkpoint(str(tmp_path))[0].spec == old == describe_checkpoint(str(tmp_path)).spec
    assert _model_spec(str(tmp_path / "config.json")) == old  # jobs.train --model-spec CHECKPOINT/config.json
    assert _model_spec(json.dumps(config["model"])).hdit.absolute_pos  # a spec of its own: today's defaults
    assert not load_checkpoint("shapes-hdit")[0].spec.hdit.absolute_pos  # the bundled one predates them


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    assert cli(["shapes-shards", "--out", str(out), "--count", "200", "--shard-size", "100", "--size-px", "32"]) == 0
    return str(out)


def test_tiny_hdit_learns_and_samples_sequentially_and_with_picard(shards, tmp_path):
    torch.manual_seed(0)
    before = fixed_loss(build_model(SPEC), shards)
    cfg = TrainConfig(shards=shards, out=str(tmp_path / "run"), model=SPEC, steps=60, batch_size=16, lr=3e-3,
                      warmup_steps=5, checkpoint_every=60, log_every=10)
    result = train(cfg)
    gen = Generator.load(result.checkpoint, device="cpu")
    after = fixed_loss(gen.model, shards)
    assert after < 0.85 * before, (before, after)
    spec = SamplerSpec(steps=4, height_px=16, width_px=24)
    sequential = gen.generate(["a red circle", "a blue square"], [0, 1], spec)
    picard_spec = spec.model_copy(update={"picard": True, "window": 3, "tolerance": 0.0})
    picard = gen.generate(["a red circle", "a blue square"], [0, 1], picard_spec)
    for a, b in zip(sequential, picard):
        assert a.image.size == (24, 16)
        assert np.abs(np.asarray(a.image).astype(int) - np.asarray(b.image).astype(int)).max() <= 1


def test_train_job_backbone_flag_overrides_the_model_spec(shards, tmp_path):
    from jobs.train import main as train_job

    spec = json.dumps(SPEC.model_dump(mode="json") | {"backbone": "unet"})
    argv = ["--shards", shards, "--out", str(tmp_path), "--model-spec", spec, "--backbone", "hdit", "--steps", "2",
            "--batch-size", "4", "--num-workers", "0"]
    assert train_job(argv) == 0
    assert load_checkpoint(str(tmp_path / "step-00000002"))[0].spec == SPEC
