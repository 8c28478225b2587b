"""Model parts: UNet shapes at several sizes, parameter counts, and a local Hugging Face text encoder."""

import json

import pytest
import torch

from socarrat.config import ModelSpec, TextEncoderSpec
from socarrat.errors import UserError
from socarrat.models import build_model
from socarrat.models.text import build_text_encoder

SMALL = dict(channels=(8, 16, 16), attention_levels=(2,), heads=2, text={"width": 16, "embed_dim": 8, "layers": 1, "heads": 2})


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("hw", [(8, 8), (16, 24), (40, 8)])
def test_unet_keeps_the_input_shape_at_any_multiple_of_its_downsampling(prediction, hw):
    model = build_model(ModelSpec(prediction=prediction, size_px=8, **SMALL))
    x = torch.randn(2, 3, *hw)
    text = model.encode(["a red circle", ""])
    assert model(x, torch.tensor([0, 999]), text).shape == x.shape
    assert model.spec.downsampling == 4


def test_spec_rejects_sizes_and_levels_it_cannot_build():
    with pytest.raises(ValueError, match="multiple of 4"):
        ModelSpec(size_px=18, **SMALL)
    with pytest.raises(ValueError, match="attention_levels"):
        ModelSpec(**{**SMALL, "attention_levels": (3,)})
    with pytest.raises(ValueError, match="must be even"):
        ModelSpec(**{**SMALL, "channels": (15, 32), "attention_levels": (1,)})
    with pytest.raises(ValueError, match=r"channels \[28\] must be multiples of heads=8"):
        ModelSpec(**{**SMALL, "channels": (16, 28), "attention_levels": (1,), "heads": 8})
    for widths in ({"channels": (32, -64)}, {"hdit": {"widths": (64, -128)}}, {"hdit": {"depths": (0, 0)}},
                   {"family": "token", "token": {"vq_channels": (0, 64)}}, {"family": "token", "token": {"code_dim": 1}}):
        with pytest.raises(ValueError, match="greater than"):  # each would build a broken model, or none
            ModelSpec(**{**SMALL, **widths})
    with pytest.raises(UserError, match="in_channels=4: a Socarrat Gaussian model works on RGB pixels"):
        build_model(ModelSpec(in_channels=4, **SMALL))  # no decoder from latents to pixels


@pytest.mark.parametrize("channels", [(16, 200), (18, 28), (6, 10)])
def test_unet_builds_and_runs_at_any_even_widths(channels):
    model = build_model(ModelSpec(size_px=8, **{**SMALL, "channels": channels, "attention_levels": (1,), "heads": 2}))
    x = torch.randn(1, 3, 8, 8)
    assert model(x, torch.tensor([5]), model.encode(["a red circle"])).shape == x.shape


def test_builtin_encoder_pools_the_end_token_and_masks_padding():
    enc = build_text_encoder(TextEncoderSpec(width=16, embed_dim=8, layers=1, heads=2, context_length=8))
    out = enc(["a red circle", "a red circle on the left of a very long caption that is cut"])
    assert out.tokens.shape == (2, 8, 16) and out.pooled.shape == (2, 16)
    assert out.mask[0].tolist() == [True] * 5 + [False] * 3 and out.mask[1].all()
    torch.testing.assert_close(out.pooled[0], out.tokens[0, 4])


def test_builtin_tokens_are_open_clips_and_truncation_is_flagged():
    from open_clip.tokenizer import SimpleTokenizer

    enc = build_text_encoder(TextEncoderSpec(width=16, embed_dim=8, layers=1, heads=2, context_length=8))
    fits, long = "a red circle on the left", "a big red circle on the left"  # 6 and 7 BPE tokens
    prompts = ["", "a red circle", fits, long, "x " * 50]
    assert torch.equal(enc.token_ids(prompts), SimpleTokenizer(context_length=8)(prompts))
    assert enc.truncated(prompts) == [False, False, False, True, True]  # start + 6 + end = 8 fits


@pytest.fixture
def hf_clip_dir(tmp_path):
    """A tiny random CLIP text model + a character-level CLIP tokenizer, saved like a real one."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 26 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")).save_pretrained(tmp_path)
    config = CLIPTextConfig(vocab_size=54, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=32, bos_token_id=52, eos_token_id=53)
    CLIPTextModel(config).save_pretrained(tmp_path)
    return tmp_path


def test_local_hf_text_encoder_feeds_the_unet(hf_clip_dir):
    spec = ModelSpec(**{**SMALL, "text": {"kind": "hf", "path": str(hf_clip_dir), "context_length": 12}})
    model = build_model(spec)
    text = model.encode(["red circle", "blue"])
    assert text.tokens.shape == (2, 12, 16) and text.mask[1].sum() == 6  # bos + 4 letters + eos
    assert not torch.equal(text.pooled[0], text.pooled[1])
    assert model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), text).shape == (2, 3, 8, 8)
    model.train()  # the denoiser trains; the frozen encoder keeps its dropout off
    assert model.unet.training and not model.text.model.training
    assert model.truncated(["abcdefghij", "abcdefghijk", ""]) == [False, True, False]  # bos + 10 + eos = 12


def test_a_bang_inside_a_word_is_a_token_not_padding():
    encoder = build_text_encoder(TextEncoderSpec(width=16, embed_dim=8, layers=1, heads=2)).eval()
    ids = encoder.token_ids(["a red car!\U0001f525"])[0]
    assert 0 in ids[:ids.argmax()].tolist()  # open_clip's id of this "!" is 0, its padding id too
    text = encoder(["a red car!\U0001f525"])
    assert text.mask[0].sum() == ids.argmax() + 1  # every token up to end-of-text (the highest id)
    shorter = encoder(["a red car!"])
    assert text.mask[0].sum() > shorter.mask[0].sum()


def test_missing_hf_directory_is_named(tmp_path):
    from socarrat.errors import NotFoundError

    with pytest.raises(NotFoundError, match="nope"):
        build_text_encoder(TextEncoderSpec(kind="hf", path=str(tmp_path / "nope")))
