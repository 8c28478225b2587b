"""The pydantic types that describe models, samplers and requests.

Each concept has one type, validated once at the front door and passed along as that object
(never re-parsed from dicts). This module depends only on pydantic.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextEncoderSpec(_Spec):
    """A text encoder: the small built-in transformer over open_clip's BPE, or a local HF model."""

    kind: Literal["builtin", "hf"] = "builtin"
    path: str | None = Field(None, description="local directory of a Hugging Face model (kind=hf)")
    context_length: int = Field(24, ge=4, le=77)
    width: int = Field(128, ge=8)
    embed_dim: int = Field(32, ge=8, description="factorised token embedding (vocab x embed_dim)")
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _check(self) -> TextEncoderSpec:
        if self.kind == "hf" and not self.path:
            raise ValueError("text.path is required when text.kind is 'hf'")
        if self.width % self.heads:
            raise ValueError(f"text.width={self.width} must be a multiple of text.heads={self.heads}")
        return self


class ModelSpec(_Spec):
    """Architecture + diffusion parameterisation of a Gaussian-family model."""

    family: Literal["gaussian"] = "gaussian"
    in_channels: int = Field(3, ge=1, description="3 for pixels; latent channels for a latent model")
    size_px: int = Field(32, ge=8, description="default (square) output size")
    channels: tuple[int, ...] = Field((32, 64, 128), min_length=1, description="per level")
    res_blocks: int = Field(1, ge=1, description="ResBlocks per level")
    attention_levels: tuple[int, ...] = Field((2,), description="levels with self+cross attention")
    heads: int = Field(4, ge=1)
    text: TextEncoderSpec = TextEncoderSpec()
    prediction: Literal["eps", "v"] = "v"
    schedule: Literal["linear", "cosine"] = "cosine"
    train_timesteps: int = Field(1000, ge=2)
    clip_sample: bool = Field(True, description="clamp predicted x0 to [-1, 1] (pixel models)")

    @property
    def downsampling(self) -> int:
        """Total downsampling factor: height and width must be multiples of it."""
        return 2 ** (len(self.channels) - 1)

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        bad = [lv for lv in self.attention_levels if not 0 <= lv < len(self.channels)]
        if bad:
            raise ValueError(f"attention_levels {bad} outside 0..{len(self.channels) - 1}")
        if self.size_px % self.downsampling:
            raise ValueError(f"size_px={self.size_px} is not a multiple of {self.downsampling}")
        return self


class SamplerSpec(_Spec):
    """How to sample: solver, steps, spacing, guidance and image size."""

    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int = Field(50, ge=1)
    spacing: Literal["leading", "trailing", "linspace"] = "trailing"
    guidance: float = Field(3.0, ge=0, description="classifier-free guidance scale; 1 = off")
    height_px: int | None = Field(None, ge=8, description="None: the model's size_px")
    width_px: int | None = Field(None, ge=8, description="None: the model's size_px")
    picard: bool = Field(False, description="Picard (ParaDiGMS) parallel sampling: many steps per model call")
    window: int = Field(32, ge=1, description="Picard: steps evaluated together per round and sample")
    tolerance: float = Field(2e-3, ge=0, description="Picard: accepted RMS change of a state scaled to the final "
                             "image, x / sqrt(alpha_bar), in data units ([-1, 1] pixels); 0 = the sequential result")


class GenerationRequest(_Spec):
    """Prompts to generate, each with its own seed, under one sampler spec."""

    prompts: list[str] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    negative_prompts: list[str] | None = Field(None, description="one per prompt; None: empty")
    spec: SamplerSpec = SamplerSpec()

    @model_validator(mode="after")
    def _check(self) -> GenerationRequest:
        if len(self.prompts) != len(self.seeds):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.seeds)} seeds")
        if self.negative_prompts is not None and len(self.negative_prompts) != len(self.prompts):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.negative_prompts)} negatives")
        if any(not p.strip() for p in self.prompts):
            raise ValueError("prompts must not be empty")
        if any(not 0 <= s < 2**63 for s in self.seeds):
            raise ValueError("seeds must be in [0, 2**63)")
        return self
