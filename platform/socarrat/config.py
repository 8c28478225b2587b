"""The pydantic types that describe models, samplers and requests.

Each concept has one type, validated once at the front door and passed along as that object
(never re-parsed from dicts). This module depends only on pydantic and socarrat.errors.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from socarrat.errors import UserError

# The longest prompt or negative prompt any front door takes (OpenAI's images API takes 1000 for
# DALL-E 2). Text encoders read 24-77 tokens of it (the rest is cut and flagged); the cap bounds what
# a request costs to tokenize and to keep in the tokenizer's cache.
MAX_PROMPT_CHARS = 1000
MAX_CONTEXT = 77  # tokens, the most a built-in text encoder reads (CLIP's context)

# What a model call computes in: "auto" is bf16 on a GPU (half the memory traffic) and fp32 on the
# CPU (results exact across batch shapes, what the tests compare); "bf16" on a CPU with AMX (Xeon
# Sapphire Rapids and later) makes model calls ~1.3-2.3x faster (`benchmarks/precision.py`).
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
PRECISION_HELP = "what model calls compute in: auto = bf16 on a GPU, fp32 on the CPU; bf16 is faster on CPUs with AMX"
COMPILE_HELP = ("model calls under torch.compile (CUDA graphs on a GPU): each new batch shape compiles first, "
                "tens of seconds, then calls run faster")


def check_precision(precision: str) -> None:
    """UserError unless `precision` is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")


class _Spec(BaseModel):
    # allow_inf_nan: pydantic takes inf and nan (also from the strings "inf", "nan") by default, and an
    # infinite guidance or a nan temperature makes meaningless images without any error.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TextEncoderSpec(_Spec):
    """A text encoder: the small built-in transformer over open_clip's BPE, or a local HF model."""

    kind: Literal["builtin", "hf"] = "builtin"
    path: str | None = Field(None, description="local directory of a Hugging Face model (kind=hf)")
    context_length: int = Field(24, ge=4, le=MAX_CONTEXT)
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


class TokenSpec(_Spec):
    """The token family's VQ tokenizer and token embedding (Paella, arXiv 2211.07292)."""

    codebook_size: int = Field(256, ge=2, le=65536)
    code_dim: int = Field(8, ge=2, description="width of a code; codes and encoder outputs are l2-normalised")
    vq_channels: tuple[PositiveInt, ...] = Field((32, 64), min_length=1, description="VQ encoder widths; each level after "
                                         "the first halves the resolution, plus one more halving (f = 2**len)")
    embed_dim: int = Field(32, ge=4, description="the denoiser's token embedding width")

    @property
    def downsampling(self) -> int:
        """Pixels per token along each side (f)."""
        return 2 ** len(self.vq_channels)


class HDiTSpec(_Spec):
    """Shape of the hourglass diffusion transformer (ModelSpec.backbone 'hdit'; arXiv 2401.11605)."""

    patch_size: int = Field(2, ge=1, description="pixels per token along each side at the ingress")
    widths: tuple[PositiveInt, ...] = Field((64, 128), min_length=1, description="token width per level; each level "
                                    "after the first halves the token map")
    depths: tuple[PositiveInt, ...] = Field((2, 3), min_length=1, description="transformer layers per level, on the way "
                                    "down and again up (the lowest level: once)")
    head_dim: int = Field(32, ge=4, multiple_of=4)
    window: int = Field(8, ge=1, description="side in tokens of the local (shifted-window) self-attention of "
                        "every level but the lowest, which attends globally")
    cross_attention_levels: tuple[int, ...] = Field((0, 1), description="levels that read the prompt's tokens")
    mapping_width: int = Field(256, ge=8, multiple_of=2, description="width of the conditioning vector")
    mapping_depth: int = Field(1, ge=0, description="MLP blocks of the mapping network")
    qk_norm: bool = Field(False, description="cosine-similarity attention, as in the reference HDiT (QK-norm: "
                          "logits are cosine similarities times a learned per-head scale, bounded whatever the "
                          "weights do); off by default: on the CPU it scored lower after 1,000 steps (BENCHMARKS.md)")
    absolute_pos: bool = Field(True, description="add Fourier features of each token's place in the image "
                               "(-1..1 across it, at any size) to the ingress tokens: RoPE alone tells a token only "
                               "where others are, and an HDiT without them did not learn 'at the top' (BENCHMARKS.md); "
                               "false in checkpoints made before they existed")

    @property
    def downsampling(self) -> int:
        return self.patch_size * 2 ** (len(self.widths) - 1)

    @model_validator(mode="after")
    def _check(self) -> HDiTSpec:
        if len(self.depths) != len(self.widths):
            raise ValueError(f"hdit.depths {self.depths} needs one entry per level of hdit.widths {self.widths}")
        if any(w % self.head_dim for w in self.widths):
            raise ValueError(f"hdit.widths {self.widths} must be multiples of hdit.head_dim={self.head_dim}")
        if bad := [lv for lv in self.cross_attention_levels if not 0 <= lv < len(self.widths)]:
            raise ValueError(f"hdit.cross_attention_levels {bad} outside 0..{len(self.widths) - 1}")
        return self


class ModelSpec(_Spec):
    """Architecture + parameterisation of a model.

    family "gaussian": a diffusion model over pixels or latents (`in_channels`); family "token": a
    Paella-style denoiser over VQ tokens (`token`), whose U-Net uses `channels`, `res_blocks`,
    `attention_levels` and `heads` and whose noise level is a timestep in [0, train_timesteps).
    """

    family: Literal["gaussian", "token"] = "gaussian"
    token: TokenSpec | None = Field(None, description="family 'token': the VQ tokenizer and token embedding")
    backbone: Literal["unet", "hdit"] = Field("unet", description="the gaussian family's denoiser: 'unet' is "
                                              "shaped by channels, res_blocks, attention_levels and heads; 'hdit' by hdit")
    hdit: HDiTSpec | None = Field(None, description="backbone 'hdit': its shape")
    in_channels: int = Field(3, ge=1, description="3: RGB pixels (Socarrat's models); a diffusers checkpoint's latent channels")
    size_px: int = Field(32, ge=8, description="default (square) output size")
    channels: tuple[PositiveInt, ...] = Field((32, 64, 128), min_length=1, description="per level")
    res_blocks: int = Field(1, ge=1, description="ResBlocks per level")
    attention_levels: tuple[int, ...] = Field((2,), description="levels with self+cross attention")
    heads: int = Field(4, ge=1)
    text: TextEncoderSpec = TextEncoderSpec()
    prediction: Literal["eps", "v"] = "v"
    schedule: Literal["linear", "cosine", "scaled_linear"] = "cosine"
    train_timesteps: int = Field(1000, ge=2)
    clip_sample: bool = Field(True, description="clamp predicted x0 to [-1, 1] (pixel models)")

    @property
    def downsampling(self) -> int:
        """Total downsampling factor: height and width must be multiples of it."""
        if self.backbone == "hdit":
            return self.hdit.downsampling
        return 2 ** (len(self.channels) - 1) * (self.token.downsampling if self.token else 1)

    @model_validator(mode="before")
    @classmethod
    def _sub_spec_defaults(cls, data: object) -> object:
        """family 'token' and backbone 'hdit' bring their sub-spec, by default the default one."""
        if isinstance(data, dict):
            data = dict(data)
            if data.get("family") == "token" and data.get("token") is None:
                data["token"] = {}
            if data.get("backbone") == "hdit" and data.get("hdit") is None:
                data["hdit"] = {}
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        bad = [lv for lv in self.attention_levels if not 0 <= lv < len(self.channels)]
        if bad:
            raise ValueError(f"attention_levels {bad} outside 0..{len(self.channels) - 1}")
        if self.backbone == "hdit" and self.family != "gaussian":
            raise ValueError(f"backbone 'hdit' is for family 'gaussian' only, not {self.family!r}")
        if self.token is not None and self.family != "token":
            raise ValueError("a 'token' spec belongs to family 'token' only")
        if self.hdit is not None and self.backbone != "hdit":
            raise ValueError("an 'hdit' spec belongs to backbone 'hdit' only")
        if self.size_px % self.downsampling:
            raise ValueError(f"size_px={self.size_px} is not a multiple of {self.downsampling}")
        if self.backbone == "unet":
            if self.channels[0] % 2:
                raise ValueError(f"channels[0]={self.channels[0]} must be even (it sizes the timestep embedding)")
            if bad := [self.channels[lv] for lv in self.attention_levels if self.channels[lv] % self.heads]:
                raise ValueError(f"attention level channels {bad} must be multiples of heads={self.heads}")
        return self


def check_size(height_px: int, width_px: int, multiple: int) -> None:
    """UserError unless both sides of an image are multiples of `multiple` (a model's pixel multiple)."""
    if height_px % multiple or width_px % multiple:
        raise UserError(f"size {width_px}x{height_px}: height and width must be multiples of {multiple} for this model")


MIN_TEMPERATURE = 1e-3


class SamplerSpec(_Spec):
    """How to sample: solver, steps, spacing, guidance and image size."""

    sampler: Literal["ddim", "ddpm", "paella"] | None = Field(
        None, description="None: the model's own (ddim for Gaussian models, paella for token models)")
    steps: int | None = Field(None, ge=1, description="None: 50 for ddim and ddpm, 12 for paella")
    spacing: Literal["leading", "trailing", "linspace"] = "trailing"
    guidance: float = Field(3.0, ge=0, description="classifier-free guidance scale g: uncond + g (cond - uncond); "
                            "1 = off, the prompt alone (diffusers reads any value <= 1 so); 0 = unconditional")
    height_px: int | None = Field(None, ge=8, description="None: the model's size_px")
    width_px: int | None = Field(None, ge=8, description="None: the model's size_px")
    picard: bool = Field(False, description="Picard (ParaDiGMS) parallel sampling: many steps per model call")
    window: int = Field(32, ge=1, description="Picard: steps evaluated together per round and sample")
    tolerance: float = Field(2e-3, ge=0, description="Picard: how far (RMS, in data units: [-1, 1] pixels) an "
                             "accepted state may move the final image; a state's change scaled to the final image, "
                             "x / sqrt(alpha_bar), is accepted at a tenth of it, as a model choosing between shapes "
                             "can grow it tenfold; 0 = the sequential result")
    temperature: tuple[float, float] = Field((1.0, 0.5), description="paella: sampling temperature at the "
                                             "first and the last step, linear in between")
    renoise_steps: int | None = Field(None, ge=0, description="paella: steps followed by re-noising; None: all but the last")

    @model_validator(mode="after")
    def _check(self) -> SamplerSpec:
        if min(self.temperature) < MIN_TEMPERATURE:  # 1 / t must stay finite in the draws
            raise ValueError(f"temperature must be at least {MIN_TEMPERATURE} (lower draws the likeliest token all "
                             f"the same), got {self.temperature}")
        return self


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
        if max(map(len, self.prompts + (self.negative_prompts or []))) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompts and negative prompts must be at most {MAX_PROMPT_CHARS} characters")
        if any(not 0 <= s < 2**63 for s in self.seeds):
            raise ValueError("seeds must be in [0, 2**63)")
        return self
