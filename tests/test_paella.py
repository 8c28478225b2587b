"""The token family: VQ tokenizer, noising, two-stage training through jobs.train, checkpoints."""

import pytest
import torch
import torch.nn.functional as F

from jobs.train import main as train_main
from socarrat.cli import main as cli
from socarrat.config import ModelSpec, TokenSpec
from socarrat.generator import Generator
from socarrat.models import build_model
from socarrat.models.paella import add_noise
from socarrat.models.vq import VQ
from socarrat.sampling.tokens import noise_fraction
from socarrat.training import TrainConfig, load_examples, train

SPEC = ModelSpec(family="token", size_px=32, channels=(16, 32), attention_levels=(1,), heads=2,
                 token={"codebook_size": 32, "vq_channels": (16, 32), "embed_dim": 8},
                 text={"width": 32, "embed_dim": 8, "layers": 1, "heads": 2})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    assert cli(["shapes-shards", "--out", str(out), "--count", "200", "--shard-size", "100", "--size-px", "32"]) == 0
    return str(out)


def test_vq_round_trip_shapes_and_every_code_reachable():
    vq = VQ(TokenSpec(codebook_size=64, vq_channels=(8, 16, 16)))
    images = torch.rand(3, 3, 48, 64) * 2 - 1
    tokens = vq.encode(images)
    assert tokens.shape == (3, 6, 8) and tokens.dtype == torch.long and vq.decode(tokens).shape == (3, 3, 48, 64)
    assert 0 <= tokens.min() and tokens.max() < 64 and torch.equal(vq.encode(images), tokens)


def test_vq_picks_the_nearest_code_under_autocast_too():
    torch.manual_seed(0)
    vq = VQ(TokenSpec(codebook_size=256, code_dim=32, vq_channels=(8, 16)))
    z, codebook = vq._latents(torch.rand(4, 3, 64, 64) * 2 - 1), F.normalize(vq.codebook, dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 similarities differ on ~7 of 1,024 tokens here
        under_autocast = vq._nearest(z, codebook)
    assert torch.equal(under_autocast, vq._nearest(z, codebook))


def test_vq_training_reconstructs_shapes_and_uses_its_codebook(shards):
    torch.manual_seed(0)
    vq = VQ(TokenSpec(codebook_size=32, vq_channels=(16, 32)), restart_after=5)
    data = load_examples(shards, 32)
    x = data.images[:64].float() / 127.5 - 1
    opt = torch.optim.Adam(vq.parameters(), lr=3e-3)
    first = vq.loss(x)[1]["recon"]
    for _ in range(60):
        loss, stats = vq.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert stats["recon"] < first / 4
    assert vq.encode(x).unique().numel() >= 16  # idle codes restart on encoder outputs


def test_noising_replaces_the_requested_fraction():
    tokens = torch.zeros(4, 64, 64, dtype=torch.long)
    t = torch.tensor([0, 333, 666, 999])
    noised = add_noise(tokens, t, 1000, 1024, generator=torch.Generator().manual_seed(0))
    expected = noise_fraction(t, 1000) * 1023 / 1024  # a replacement can draw token 0 again
    assert torch.allclose((noised != 0).double().mean((1, 2)), expected, atol=0.02)
    assert (noised[0] == 0).all() and noised.max() < 1024


def test_two_stage_training_learns_and_its_checkpoint_generates(shards, tmp_path):
    cfg = TrainConfig(shards=shards, out=str(tmp_path / "run"), model=SPEC, steps=50, vq_steps=25, batch_size=16,
                      lr=3e-3, warmup_steps=5, checkpoint_every=25, log_every=5)
    torch.manual_seed(0)
    result = train(cfg)
    vq_losses, denoiser_losses = result.losses[:25], result.losses[25:]
    assert vq_losses[-1] < vq_losses[0] / 2
    assert sum(denoiser_losses[-5:]) < sum(denoiser_losses[:5])
    gen = Generator.load(result.checkpoint, device="cpu")
    [image] = gen.generate(["a red circle"], [1])
    assert image.image.size == (32, 32) and image.metadata["spec"]["sampler"] == "paella"
    state = torch.load(f"{result.checkpoint}/train_state.pt")
    assert all(torch.equal(state["ema"][k], v) for k, v in state["model"].items() if k.startswith("vq."))


def test_resume_across_the_stage_boundary_and_the_cli_flag(shards, tmp_path):
    out = str(tmp_path / "run")
    args = ["--shards", shards, "--out", out, "--family", "token", "--size-px", "32", "--num-workers", "0",
            "--model-spec", SPEC.model_dump_json(), "--batch-size", "8", "--warmup-steps", "2", "--log-every", "5"]
    assert train_main([*args, "--steps", "6", "--vq-steps", "4", "--checkpoint-every", "3"]) == 0
    assert train_main([*args, "--steps", "9", "--vq-steps", "4", "--checkpoint-every", "3"]) == 0
    model = Generator.load(f"{out}/step-00000009", device="cpu").model
    assert model.spec.family == "token" and model.spec == SPEC
    assert train_main([*args, "--steps", "12", "--size-px", "64"]) == 2


def test_token_spec_belongs_to_the_token_family():
    assert ModelSpec(family="token", size_px=64).token == TokenSpec()
    with pytest.raises(ValueError, match="belongs to family 'token' only"):
        ModelSpec(token={})
    assert build_model(SPEC).latent_shape(32, 64) == (8, 16)
