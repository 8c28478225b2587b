"""A diffusers Stable-Diffusion-style pipeline behind Socarrat's model interface.

One thin wrapper, as k-diffusion adapts every foreign model once: a local diffusers directory
(`model_index.json` + `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) becomes a
Gaussian-family model whose `encode` is the CLIP text encoder's hidden states, whose `forward` is
the UNet's eps or v prediction and whose `decode` is the VAE decoder. Socarrat's own samplers run it.

The scheduler config is read for what the model was trained with (prediction type, betas, train
timesteps); how to sample (solver, steps, spacing) is the `SamplerSpec`'s, so the config's scheduler
class (but for the few-step ones below), `timestep_spacing`, `steps_offset`, `set_alpha_to_one` and
`variance_type` are not used. Nor is `clip_sample`: latents are not bounded to [-1, 1], and
diffusers' StableDiffusionPipeline turns it off too (configs saved from a default DDIM or DDPM
scheduler carry it on). What the samplers cannot reproduce (trained betas, thresholding,
zero-terminal-SNR rescaling, the LCM and TCD schedulers of consistency-distilled models, SDXL's
second text encoder, UNets that need added conditioning) is refused with a UserError.

Imports diffusers only when a checkpoint is loaded (the `diffusers` extra); no storage, no Ray.
`socarrat.checkpoint` finds the directory (downloading an s3:// prefix) and computes the digest.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from torch import nn

from socarrat.config import ModelSpec, check_size
from socarrat.errors import NotFoundError, UserError
from socarrat.models.text import TextEncoding, hf_truncated

INDEX = "model_index.json"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Weights in other formats, pickled or for other frameworks: the components load safetensors.
_OTHER_WEIGHTS = (".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".pb")
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
# Schedulers of distilled few-step models (LCM, LCM-LoRA merged, TCD), whose UNets DDIM/DDPM sample badly.
# Only checkpoints saved with these schedulers are recognised: a Turbo or Lightning UNet saved with a
# DDIM or Euler config is not.
_FEW_STEP_SCHEDULERS = ("LCMScheduler", "TCDScheduler")
# (beta_start, beta_end) of Socarrat's schedule at T train timesteps (its linear one is rescaled to T).
_BETAS = {"scaled_linear": lambda T: (0.00085, 0.012), "linear": lambda T: (0.1 / T, 20 / T)}


def reads(key: str) -> bool:
    """Whether loading reads the file at `key` (relative, '/'-separated) of a pipeline directory: not
    weights in other formats, nor variants (`diffusion_pytorch_model.fp16.safetensors`, `.non_ema.`),
    which would be downloaded and hashed into the digest for nothing."""
    name = key.rsplit("/", 1)[-1]
    variant = name.endswith(".safetensors") and "." in name.removesuffix(".safetensors")
    return key == INDEX or (key.split("/")[0] in COMPONENTS and not key.endswith(_OTHER_WEIGHTS) and not variant)


def import_diffusers():
    """The diffusers module, or a UserError saying how to install it."""
    try:
        return importlib.import_module("diffusers")
    except ImportError as err:
        raise UserError(
            "this checkpoint is a diffusers pipeline and loading it needs the diffusers package: "
            "pip install 'socarrat[diffusers]'"
        ) from err


def spec_fields(config: dict) -> dict:
    """`ModelSpec` fields from a diffusers scheduler config; UserError for what our solvers do not reproduce."""
    T = config.get("num_train_timesteps", 1000)
    prediction, beta_schedule = config.get("prediction_type", "epsilon"), config.get("beta_schedule", "linear")
    problems = []
    if prediction not in _PREDICTIONS:
        problems.append(f"prediction_type={prediction!r} (supported: {', '.join(_PREDICTIONS)})")
    if beta_schedule not in _SCHEDULES:
        problems.append(f"beta_schedule={beta_schedule!r} (supported: {', '.join(_SCHEDULES)})")
    elif beta_schedule in _BETAS:
        betas = (config.get("beta_start", 1e-4), config.get("beta_end", 0.02))
        expected = _BETAS[beta_schedule](T)
        if not all(math.isclose(b, e, rel_tol=1e-6) for b, e in zip(betas, expected)):
            problems.append(f"beta_start, beta_end = {betas} (supported with {beta_schedule} at {T} steps: {expected})")
    problems += [f"{flag}={config[flag]!r}" for flag in ("trained_betas", "thresholding", "rescale_betas_zero_snr") if config.get(flag)]
    if config.get("_class_name") in _FEW_STEP_SCHEDULERS:
        problems.append(f"{config['_class_name']} (a consistency-distilled model: its few steps are not DDIM or DDPM steps)")
    if problems:
        raise UserError(f"scheduler config not supported: {'; '.join(problems)}")
    return {"prediction": _PREDICTIONS[prediction], "schedule": _SCHEDULES[beta_schedule],
            "train_timesteps": T, "clip_sample": False}


def _older_than(version: str | None, than: str) -> bool:
    """Whether a config's `_diffusers_version` is before `than` (no version: not older)."""
    from packaging.version import InvalidVersion, Version

    try:
        return version is not None and Version(version) < Version(than)
    except InvalidVersion:
        return False


def vae_factor(vae_config) -> int:
    """Pixels per latent along each side: the VAE halves the resolution at each level but the last."""
    return 2 ** (len(vae_config.get("block_out_channels", (64,))) - 1)  # diffusers' AutoencoderKL default


def pipeline_spec(unet_config, vae_config, scheduler_config: dict) -> ModelSpec:
    """The `ModelSpec` of a pipeline from its components' configs (dicts, or diffusers' FrozenDicts);
    UserError for a UNet or scheduler the samplers cannot run."""
    _check_unet(unet_config)
    # A config.json lists every field when diffusers writes it; a missing one has diffusers' default.
    sample_size = unet_config.get("sample_size") or 64
    if not isinstance(sample_size, int):
        raise UserError(f"UNet sample_size {sample_size!r}: only square defaults (one int) are supported")
    if sample_size < 64 and _older_than(unet_config.get("_diffusers_version"), "0.9.0"):
        sample_size = 64  # SD-1 configs converted before diffusers 0.9 say 32; its pipeline reads 64 too
    size_px = sample_size * vae_factor(vae_config)
    return ModelSpec(in_channels=unet_config.get("in_channels", 4), size_px=size_px, **spec_fields(scheduler_config))


def describe(path: str | Path) -> tuple[ModelSpec, int]:
    """(spec, pixel multiple) of the pipeline in the local directory `path`, read from its JSON
    configs alone: the checks `DiffusersModel.load` makes, without diffusers or the weights."""
    path = Path(path)
    _index(path)
    vae = _config(path, "vae")
    return pipeline_spec(_config(path, "unet"), vae, _config(path, "scheduler")), vae_factor(vae)


class DiffusersModel(nn.Module):
    """A diffusers UNet2DConditionModel + AutoencoderKL + CLIP text encoder and tokenizer as a
    Gaussian-family model; `load` reads them from a pipeline directory, the constructor takes them
    built (with the scheduler's config as a dict).

    `spec` describes what the samplers and `Generator` read (latent channels, default size,
    prediction, schedule); its architecture fields keep their defaults: the diffusers configs
    describe these networks.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer, scheduler_config: dict):
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.spec = pipeline_spec(unet.config, vae.config, scheduler_config)

    @classmethod
    def load(cls, path: str | Path) -> DiffusersModel:
        """The pipeline in the local directory `path`, float32 on the CPU."""
        path = Path(path)
        describe(path)  # refuse an unsupported pipeline from its configs, before reading any weights
        index = _index(path)
        import_diffusers()
        components = [_component(path, index, name) for name in ("unet", "vae", "text_encoder", "tokenizer")]
        return cls(*components, _config(path, "scheduler")).float().eval().requires_grad_(False)

    def encode(self, prompts: Sequence[str]) -> TextEncoding:
        """Prompts (B strings) -> the text encoder's last hidden states (B, L, D), as diffusers'
        StableDiffusionPipeline computes them: padded to the tokenizer's max length, and without an
        attention mask unless the text encoder's config asks for one."""
        device = next(self.text_encoder.parameters()).device
        batch = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").to(device)
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        out = self.text_encoder(batch.input_ids, attention_mask=batch.attention_mask if use_mask else None)
        return TextEncoding(out.last_hidden_state, out.pooler_output, batch.attention_mask.bool())

    def truncated(self, prompts: Sequence[str]) -> list[bool]:
        return hf_truncated(self.tokenizer, prompts, self.tokenizer.model_max_length)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        """Latents x (B, 4, h, w), t (B,) long timesteps in [0, train_timesteps) -> the UNet's eps or v,
        in the UNet's dtype. The latents may stay float32 around a half-precision UNet: the change
        Picard accepts (its tolerance 2e-3 / ERROR_GAIN = 2e-4, after dividing by sqrt(alpha_bar)
        ~ 0.07) is below fp16's resolution of them."""
        dtype = self.unet.dtype
        return self.unet(x.to(dtype), t, encoder_hidden_states=text.tokens.to(dtype), return_dict=False)[0]

    @property
    def pixel_multiple(self) -> int:
        """The VAE's downsampling factor: image sides must be multiples of it."""
        return vae_factor(self.vae.config)

    def latent_shape(self, height_px: int, width_px: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents for a height_px x width_px image."""
        f = self.pixel_multiple
        check_size(height_px, width_px, f)
        return self.spec.in_channels, height_px // f, width_px // f

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> pixels (B, 3, h * f, w * f), about [-1, 1] (not clamped)."""
        return self.vae.decode(x / self.vae.config.scaling_factor, return_dict=False)[0]


def _index(path: Path) -> dict:
    """model_index.json of the pipeline at `path`; NotFoundError if there is none, UserError for SDXL."""
    if not (path / INDEX).is_file():
        raise NotFoundError(f"no diffusers pipeline at {path} (expected {path / INDEX})")
    index = _read_json(path / INDEX)
    if index.get("text_encoder_2"):
        raise UserError(f"{path}: pipelines with a second text encoder (SDXL) are not supported")
    return index


def _config(path: Path, component: str) -> dict:
    """The JSON config of `component` ("unet", "vae" or "scheduler")."""
    file = path / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
    if not file.is_file():
        raise NotFoundError(f"diffusers pipeline at {path} has no {component!r} config ({file})")
    return _read_json(file)


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise UserError(f"{file} is not a JSON object")
    return value


def _component(path: Path, index: dict, name: str):
    """Component `name`, loaded by the class model_index.json names for it (as diffusers does)."""
    entry = index.get(name)
    if not entry or not (path / name).is_dir():
        raise NotFoundError(f"diffusers pipeline at {path} has no {name!r} component (model_index.json and {path / name})")
    try:
        library, class_name = entry
        cls = getattr(importlib.import_module(library), class_name)
    except (ValueError, TypeError, ImportError, AttributeError):
        raise UserError(f"{path / INDEX}: {name!r} names {entry!r}, not a [library, class] that can be imported") from None
    kwargs = {} if name == "tokenizer" else {"use_safetensors": True}
    try:
        return cls.from_pretrained(path / name, local_files_only=True, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:  # missing or damaged weights, config or vocabulary
        detail = " ".join(str(err).split())[:300]
        raise UserError(f"cannot load the {name!r} of the diffusers pipeline at {path}: {detail}") from None


def _check_unet(config) -> None:
    """UserError for a UNet that needs inputs beyond (latents, timestep, text hidden states)."""
    extra = [k for k in ("addition_embed_type", "class_embed_type", "num_class_embeds", "time_cond_proj_dim")
             if config.get(k) is not None]
    if config.get("encoder_hid_dim_type") not in (None, "text_proj"):  # image projections need added inputs
        extra.append(f"encoder_hid_dim_type={config['encoder_hid_dim_type']!r}")
    channels_in, channels_out = config.get("in_channels", 4), config.get("out_channels", 4)
    if channels_out == 2 * channels_in:
        extra.append(f"out_channels={channels_out} = 2 x in_channels (a learned variance)")
    elif channels_in != channels_out:
        extra.append(f"in_channels={channels_in} != out_channels={channels_out} (inpainting)")
    if extra:
        raise UserError(f"UNets with {', '.join(extra)} are not supported (text-to-image UNets only)")
