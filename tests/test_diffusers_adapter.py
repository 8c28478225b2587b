"""Diffusers adapter: a tiny random Stable-Diffusion pipeline, saved with `save_pretrained`, loads
through `Generator` (from a directory and from S3), and Socarrat's DDIM and DDPM sample it as
diffusers' own StableDiffusionPipeline does, sequentially and with Picard."""

import io
import json
import re
import shutil
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import diffusers
import torch
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from socarrat import storage
from socarrat.checkpoint import describe_checkpoint
from socarrat.cli import main
from socarrat.config import SamplerSpec
from socarrat.errors import UserError
from socarrat.generator import Generator
from socarrat.models.diffusers_adapter import import_diffusers, pipeline_spec, reads, spec_fields
from socarrat.sampling import cfg_denoiser, draw_noise, make_step, sample
from socarrat.sampling.picard import sample_picard
from socarrat.sampling.schedules import Schedule, alphas_cumprod
from socarrat.training import TrainConfig, initial_weights, preflight

PROMPTS = ["a red cat", "two blue dogs"]
SEEDS = [3, 4]
GUIDANCE = 4.0
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_tokenizer(folder):
    """A CLIP BPE tokenizer over single letters (no merges), written here: nothing is downloaded."""
    letters = list(string.ascii_lowercase)
    vocab = {tok: i for i, tok in enumerate(["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)])}
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=16), len(vocab)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny random SD-style pipeline (8x8 latents, VAE factor 8: 64 px images) saved as diffusers saves one."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    tokenizer, vocab_size = tiny_tokenizer(root / "vocab")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(root / "eps")
    # The same weights trained for v: only the scheduler config says so.
    shutil.copytree(root / "eps", root / "v")
    config_path = root / "v" / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prediction_type": "v_prediction"}))
    return root


@pytest.fixture(scope="module")
def generators(sd_dir):
    return {p: Generator.load(str(sd_dir / p), device="cpu") for p in ("eps", "v")}


def reference(sd_dir, prediction, sampler, spacing):
    """diffusers' own pipeline on the same files, with the sampler's scheduler. steps_offset=0 after
    construction: the pipeline forces 1 (timesteps 981..1), Socarrat's leading spacing is 980..0."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_dir / prediction, local_files_only=True)
    scheduler = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler}[sampler]
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config, timestep_spacing=spacing, steps_offset=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def socarrat_run(model, sampler, spacing, steps, picard=None):
    """What `Generator.generate` does, up to the decoded float images: (x, cond, latents, images)."""
    spec = model.spec
    schedule = Schedule.create(spec.schedule, spec.train_timesteps, spacing, steps)
    x, noises = draw_noise(SEEDS, model.latent_shape(64, 64), steps, sampler == "ddpm")
    cond = (model.encode(PROMPTS), model.encode([""] * len(PROMPTS)))
    args = (cfg_denoiser(model, GUIDANCE), x, schedule, make_step(sampler, schedule, spec.prediction, spec.clip_sample), noises, cond)
    latents = sample(*args) if picard is None else sample_picard(*args, window=picard[0], tolerance=picard[1])[0]
    return x, cond, latents, model.decode(latents)


def diffusers_run(pipe, steps, x, cond):
    """The pipeline on the same initial latents and prompt embeddings. DDPM draws each step's noise
    from per-sample generators seeded as `draw_noise` seeds them and advanced past the initial
    latents: `draw_noise` draws a sample's N step noises in one call, and torch's CPU normal sampler
    gives the same numbers one step at a time (checked in `test_step_noise_is_replayed`)."""
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    for g in generators:
        torch.randn(x.shape[1:], generator=g)
    final = {}

    def keep_latents(pipe, i, t, tensors):
        final.update(tensors)
        return tensors

    images = pipe(prompt_embeds=cond[0].tokens, negative_prompt_embeds=cond[1].tokens, latents=x.clone(),
                  num_inference_steps=steps, guidance_scale=GUIDANCE, generator=generators, output_type="pt",
                  callback_on_step_end=keep_latents).images
    return final["latents"], images


def test_step_noise_is_replayed():
    gen = torch.Generator().manual_seed(7)
    x, noises = draw_noise([7], (4, 8, 8), 5, True)
    assert torch.equal(torch.randn((4, 8, 8), generator=gen), x[0])
    assert torch.equal(torch.stack([torch.randn((1, 4, 8, 8), generator=gen)[0] for _ in range(5)]), noises[:, 0])


def test_spec_and_schedule_come_from_the_configs(sd_dir, generators):
    spec = generators["eps"].spec
    assert (spec.in_channels, spec.size_px, spec.schedule, spec.train_timesteps, spec.clip_sample) == (4, 64, "scaled_linear", 1000, False)
    assert (spec.prediction, generators["v"].spec.prediction) == ("eps", "v")
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.allclose(alphas_cumprod("scaled_linear", 1000), scheduler.alphas_cumprod.double(), rtol=1e-5)
    assert generators["eps"].pixel_multiple == 8
    # The configs alone say the same, without diffusers building the networks.
    info = describe_checkpoint(str(sd_dir / "eps"))
    assert (info.spec, info.digest, info.pixel_multiple) == (spec, generators["eps"].digest, 8)


def test_prompt_embeddings_match_the_pipeline(sd_dir, generators):
    pipe = reference(sd_dir, "eps", "ddim", "leading")
    positive, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True, None)
    with torch.inference_mode():
        assert torch.equal(generators["eps"].model.encode(PROMPTS).tokens, positive)
        assert torch.equal(generators["eps"].model.encode([""] * 2).tokens, negative)


@pytest.mark.parametrize("prediction, sampler, spacing", [
    ("eps", "ddim", "leading"), ("eps", "ddim", "trailing"), ("v", "ddim", "trailing"),
    ("eps", "ddpm", "leading"), ("eps", "ddpm", "trailing"), ("eps", "ddpm", "linspace"), ("v", "ddpm", "trailing"),
])
@torch.inference_mode()
def test_sequential_matches_stable_diffusion_pipeline(sd_dir, generators, prediction, sampler, spacing):
    # DDIM linspace is left out on purpose: diffusers' DDIMScheduler steps to t - T // steps, which
    # is not the next visited timestep for linspace spacing; Socarrat steps to the next one.
    x, cond, latents, images = socarrat_run(generators[prediction].model, sampler, spacing, 10)
    ref_latents, ref_images = diffusers_run(reference(sd_dir, prediction, sampler, spacing), 10, x, cond)
    assert (latents - ref_latents).abs().max() < 1e-4 * max(1, ref_latents.abs().max())
    assert ((images / 2 + 0.5).clamp(0, 1) - ref_images).abs().max() < 1e-4
    assert ref_images.std() > 0.01  # the random VAE does not flatten the comparison


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@torch.inference_mode()
def test_picard_matches_sequential(generators, sampler):
    model = generators["eps"].model
    *_, seq_latents, seq_images = socarrat_run(model, sampler, "trailing", 20)
    *_, latents, _ = socarrat_run(model, sampler, "trailing", 20, picard=(6, 0.0))
    assert (latents - seq_latents).abs().max() < 1e-4 * max(1, seq_latents.abs().max())
    *_, images = socarrat_run(model, sampler, "trailing", 20, picard=(8, SamplerSpec().tolerance))
    u8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round()
    assert (u8(images) - u8(seq_images)).pow(2).mean().sqrt() <= 1.0


def test_generator_makes_pngs_of_the_requested_size(generators):
    gen = generators["eps"]
    spec = SamplerSpec(sampler="ddpm", steps=4, height_px=48, width_px=32, picard=True)
    results = gen.generate(PROMPTS, SEEDS, spec)
    assert [r.image.size for r in results] == [(32, 48)] * 2
    assert not np.array_equal(np.asarray(results[0].image), np.asarray(results[1].image))
    png = Image.open(io.BytesIO(results[0].png_bytes()))
    assert png.size == (32, 48) and json.loads(png.text["socarrat"])["model_digest"] == gen.digest
    with pytest.raises(UserError, match="multiples of 8"):
        gen.generate(PROMPTS[:1], SEEDS[:1], SamplerSpec(steps=2, height_px=50))
    assert gen.model.truncated(["abcdefghijklmn", "abcdefghijklmno"]) == [False, True]  # a token a letter, 2 + 14 fit 16


def test_cli_generates_with_a_diffusers_directory(sd_dir, tmp_path):
    out = tmp_path / "cat.png"
    assert main(["generate", "--model", str(sd_dir / "eps"), "--prompt", "a red cat", "--steps", "3",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)


def test_s3_prefix_loads_like_the_directory(sd_dir, generators, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("SOCARRAT_CACHE", str(tmp_path / "cache"))
    local = sd_dir / "eps"
    store = storage.open_store(f"{s3_bucket}/sd")
    for path in local.rglob("*"):
        if path.is_file():
            store.put_file(path.relative_to(local).as_posix(), path)
    remote = Generator.load(f"{s3_bucket}/sd", device="cpu")
    assert remote.digest == generators["eps"].digest
    spec = SamplerSpec(steps=3)
    same = [np.asarray(g.generate(PROMPTS[:1], SEEDS[:1], spec)[0].image) for g in (remote, generators["eps"])]
    assert np.array_equal(*same)
    # Weights changed under a new prefix give another digest.
    unet = "unet/diffusion_pytorch_model.safetensors"
    store2 = storage.open_store(f"{s3_bucket}/sd2")
    for key in store.list():
        store2.put_file(key, local / key)
    data = bytearray((local / unet).read_bytes())
    data[-1] ^= 1
    store2.put_bytes(unet, bytes(data))
    assert Generator.load(f"{s3_bucket}/sd2", device="cpu").digest != remote.digest


def test_unsupported_scheduler_configs_are_named():
    with pytest.raises(UserError, match="prediction_type='sample'.*beta_start"):
        spec_fields({"prediction_type": "sample", "beta_schedule": "scaled_linear", "beta_start": 0.001, "beta_end": 0.012})
    with pytest.raises(UserError, match="thresholding"):
        spec_fields({"thresholding": True})
    with pytest.raises(UserError, match="LCMScheduler .a consistency-distilled model"):
        spec_fields({"_class_name": "LCMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    assert spec_fields({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 500})["schedule"] == "cosine"
    # Latents are not bounded: clip_sample, on in configs saved from a default DDIM or DDPM scheduler, is
    # not applied, as diffusers' StableDiffusionPipeline switches it off.
    assert spec_fields({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                        "clip_sample": True, "clip_sample_range": 2.0})["clip_sample"] is False


def test_unets_that_need_more_inputs_than_text_are_refused_by_their_config():
    vae = {"block_out_channels": [8, 8, 8, 8]}
    for extra, message in (({"num_class_embeds": 10}, "num_class_embeds"),
                           ({"encoder_hid_dim_type": "image_proj"}, "encoder_hid_dim_type='image_proj'"),
                           ({"out_channels": 8}, "a learned variance"), ({"in_channels": 9}, "inpainting"),
                           ({"sample_size": [64, 96]}, "only square defaults")):
        with pytest.raises(UserError, match=re.escape(message)):
            pipeline_spec({"in_channels": 4, "out_channels": 4, **extra}, vae, {})
    # SD-1 UNets converted before diffusers 0.9 say sample_size 32; its pipeline, and Socarrat, read 64.
    assert pipeline_spec({"sample_size": 32, "_diffusers_version": "0.8.0"}, vae, {}).size_px == 512
    assert pipeline_spec({"sample_size": 32, "_diffusers_version": "0.30.0"}, vae, {}).size_px == 256


def test_variant_weight_files_are_not_read():
    assert reads("unet/diffusion_pytorch_model.safetensors") and reads("text_encoder/model.safetensors")
    assert reads("unet/diffusion_pytorch_model-00001-of-00002.safetensors") and reads("model_index.json")
    assert reads("unet/diffusion_pytorch_model.safetensors.index.json")
    assert not reads("unet/diffusion_pytorch_model.fp16.safetensors") and not reads("vae/diffusion_pytorch_model.non_ema.safetensors")
    assert not reads("unet/diffusion_pytorch_model.bin") and not reads("safety_checker/model.safetensors")


def test_a_damaged_or_unsupported_pipeline_is_one_line_before_any_weights_are_read(sd_dir, tmp_path):
    def damaged(file: str, text: str | None = None) -> str:
        copy = tmp_path / f"{len(list(tmp_path.iterdir()))}-{file.replace('/', '-')}"
        shutil.copytree(sd_dir / "eps", copy)
        if text is None:
            (copy / file).unlink()
        else:
            (copy / file).write_text(text)
        return str(copy)

    with pytest.raises(UserError, match="model_index.json is not valid JSON"):
        Generator.load(damaged("model_index.json", "{"), device="cpu")
    with pytest.raises(UserError, match="unet/config.json is not valid JSON"):
        Generator.load(damaged("unet/config.json", "{"), device="cpu")
    with pytest.raises(UserError, match="vae/config.json is not a JSON object"):
        Generator.load(damaged("vae/config.json", "[]"), device="cpu")
    with pytest.raises(UserError, match="cannot load the 'text_encoder'"):
        Generator.load(damaged("text_encoder/model.safetensors", "not weights"), device="cpu")
    index = json.loads((sd_dir / "eps" / "model_index.json").read_text())
    with pytest.raises(UserError, match=r"'unet' names \['diffusers', 'NoSuchModel'\], not a \[library, class\]"):
        Generator.load(damaged("model_index.json", json.dumps({**index, "unet": ["diffusers", "NoSuchModel"]})), device="cpu")
    inpainting = damaged("unet/diffusion_pytorch_model.safetensors", "not weights")  # never read: the config refuses
    config = json.loads((Path(inpainting) / "unet/config.json").read_text())
    (Path(inpainting) / "unet/config.json").write_text(json.dumps({**config, "in_channels": 9}))
    with pytest.raises(UserError, match="inpainting"):
        Generator.load(inpainting, device="cpu")


def test_missing_diffusers_names_the_extra(sd_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what `import diffusers` meets when it is not installed
    with pytest.raises(UserError, match=r"pip install 'socarrat\[diffusers\]'"):
        import_diffusers()
    with pytest.raises(UserError, match="diffusers package"):
        Generator.load(str(sd_dir / "eps"), device="cpu")
    assert describe_checkpoint(str(sd_dir / "eps")).pixel_multiple == 8  # a driver that only plans needs no diffusers


def test_a_pipeline_is_no_donor_for_training(sd_dir, tmp_path):
    pipeline, shards = str(sd_dir / "eps"), str(tmp_path / "shards")
    assert main(["shapes-shards", "--out", shards, "--count", "4", "--shard-size", "4", "--size-px", "32"]) == 0
    for flag in ("init_text", "init"):  # its ModelSpec carries the default TextEncoderSpec: no match is no proof
        cfg = TrainConfig(shards=shards, out=str(tmp_path / "run"), **{flag: pipeline})
        for check in (preflight, initial_weights):  # the driver reads configs only; a worker loads the weights
            with pytest.raises(UserError, match="not a Socarrat checkpoint"):
                check(cfg)


def test_core_imports_without_diffusers():
    code = "import sys; sys.modules['diffusers'] = None; import socarrat.generator, socarrat.checkpoint, socarrat.models.diffusers_adapter"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
