"""The wire format of Socarrat's OpenAI-compatible image endpoint: requests as OpenAI's Images API
defines them (plus Socarrat's fields: seed, steps, guidance, sampler, Picard, edits), responses and
error bodies. Pydantic models only: a request is validated once, against the deployment's caps and
the served model's card (`context={"args": AppArgs, "card": ModelCard}`), and becomes a
`GenerationRequest`. No Ray, no model, no I/O (deployments/text_to_image.py serves it).
"""

import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from socarrat.config import MAX_PROMPT_CHARS, GenerationRequest, SamplerSpec
from socarrat.generator import DEFAULT_STEPS, OWN_SAMPLER, Edit

Mode = Literal["sequential", "picard-replica", "picard-group", "sequential-busy"]


class ModelCard(BaseModel):
    """The served model as `GET /v1/models` lists it, plus what request validation needs."""

    model_config = ConfigDict(frozen=True)

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "socarrat"
    digest: str
    size_px: int = Field(description="default width and height")
    downsampling: int = Field(description="width and height must be multiples of it")
    family: Literal["gaussian", "token"] = Field(description="gaussian: ddim/ddpm; token: paella and image edits")
    max_steps: int = Field(description="sampler steps the model can take (its training timesteps)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`: OpenAI's fields, then Socarrat's. Validate it with
    `context={"args": AppArgs, "card": ModelCard}`: the caps and the model's sizes depend on them."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # inf guidance makes NaN images

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    n: int = Field(1, ge=1)
    size: str = Field("auto", validate_default=True, description="'WIDTHxHEIGHT' in pixels, or 'auto' for the "
                      "model's size (for edits: the image's)")
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = None
    seed: int | None = Field(None, ge=0, description="image i gets seed + i; None: a random seed")
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    sampler: Literal["ddim", "ddpm", "paella"] | None = Field(None, description="None: the model's own")
    picard: bool = False
    window: int | None = Field(None, ge=1, validate_default=True, description="Picard: steps evaluated per "
                               "parallel round; None: the most that max_batch_images allows, up to 32")
    tolerance: float | None = Field(None, ge=0, description="Picard: convergence tolerance")
    timeout_s: float | None = Field(None, gt=0, description="give up after this long; None: the deployment's timeout")
    user: str | None = Field(None, description="OpenAI's end-user id; accepted and ignored")

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: object) -> object:
        # OpenAI's API reads an explicit null as "the default", and its clients send them.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt must not be empty")
        return prompt

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _whole_characters(cls, text: str) -> str:
        # JSON can escape half a UTF-16 pair ("\ud83d"), which UTF-8 cannot encode: the PNG would fail after sampling.
        if any("\ud800" <= c <= "\udfff" for c in text):
            raise ValueError("the text holds a lone UTF-16 surrogate (half of an escaped pair like \\ud83d\\ude00)")
        return text

    @field_validator("n")
    @classmethod
    def _n(cls, n: int, info: ValidationInfo) -> int:
        return _at_most(n, info.context["args"].max_n, "images per request")

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: int | None, info: ValidationInfo) -> int | None:
        if steps is not None and steps > (own := info.context["card"].max_steps):
            raise ValueError(f"{steps} steps is more than this model can take ({own}, its training timesteps)")
        return steps if steps is None else _at_most(steps, info.context["args"].max_steps, "steps")

    @field_validator("size")
    @classmethod
    def _size(cls, size: str, info: ValidationInfo) -> str:
        if size != "auto" and (rule := _size_rule(size, info)):
            raise ValueError(f"size {size!r} is not allowed: use 'auto' or 'WIDTHxHEIGHT' with {rule}")
        return size

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, response_format: str, info: ValidationInfo) -> str:
        if response_format == "url" and info.context["args"].store_uri is None:
            raise ValueError("'url' needs an object store, and this deployment has none (store_uri); use 'b64_json'")
        return response_format

    @field_validator("model")
    @classmethod
    def _model(cls, model: str | None, info: ValidationInfo) -> str | None:
        served = info.context["card"].id
        if model is not None and model != served:
            raise ValueError(f"model {model!r} is not served here; this deployment serves {served!r}")
        return model

    @field_validator("seed")
    @classmethod
    def _seed(cls, seed: int | None, info: ValidationInfo) -> int | None:
        if seed is not None and seed + info.data.get("n", 1) > 2**63:
            raise ValueError("seed + n must not exceed 2**63")
        return seed

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, sampler: str | None, info: ValidationInfo) -> str | None:
        family = info.context["card"].family
        if sampler is not None and (sampler == "paella") != (family == "token"):
            own = "'paella'" if family == "token" else "'ddim' or 'ddpm'"
            raise ValueError(f"sampler {sampler!r} does not apply to the {family}-family model served here; use {own}")
        return sampler

    @field_validator("window", "tolerance")
    @classmethod
    def _picard_only(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and not info.data.get("picard"):
            raise ValueError(f"{info.field_name} applies to Picard sampling only; send picard=true or leave it out")
        return value

    @field_validator("window")
    @classmethod
    def _window(cls, window: int | None, info: ValidationInfo) -> int | None:
        """A Picard round evaluates min(window, steps) states of every image in one model call."""
        if not info.data.get("picard"):
            return window
        cap, n, family = info.context["args"].max_batch_images, info.data.get("n", 1), info.context["card"].family
        if window is None:
            return min(SamplerSpec().window, cap // n)
        steps = info.data.get("steps") or DEFAULT_STEPS[info.data.get("sampler") or OWN_SAMPLER[family]]
        if min(window, steps) * n > cap:
            raise ValueError(f"Picard evaluates min(window, steps) x n = {min(window, steps)} x {n} images per model "
                             f"call, over this deployment's cap of {cap}; send a window of at most {cap // n}")
        return window

    @field_validator("timeout_s")
    @classmethod
    def _timeout(cls, timeout_s: float | None, info: ValidationInfo) -> float | None:
        return timeout_s if timeout_s is None else _at_most(timeout_s, info.context["args"].request_timeout_s, "s timeout")

    def generation_request(self) -> GenerationRequest:
        """The request for `Generator`: n copies of the prompt with consecutive seeds."""
        first = self.seed if self.seed is not None else secrets.randbelow(2**63 - self.n + 1)
        return GenerationRequest(prompts=[self.prompt] * self.n, seeds=[first + i for i in range(self.n)],
                                 negative_prompts=[self.negative_prompt] * self.n, spec=self.sampler_spec())

    def sampler_spec(self) -> SamplerSpec:
        width, _, height = self.size.partition("x")
        fields = {"sampler": self.sampler, "steps": self.steps, "guidance": self.guidance_scale,
                  "width_px": int(width) if height else None, "height_px": int(height) if height else None}
        if self.picard:
            fields |= {"picard": True, "window": self.window, "tolerance": self.tolerance}
        # Unset fields keep SamplerSpec's defaults, so the defaults live in one place.
        return SamplerSpec(**{k: v for k, v in fields.items() if v is not None})


class ImageEditRequest(ImageGenerationRequest):
    """`POST /v1/images/edits` (multipart form): OpenAI's `image` and `mask` files with the fields of
    a generation request, plus `start_step`. As in OpenAI's API, the mask's fully transparent pixels
    (or, without a mask, the image's) mark what to paint anew; the rest is kept. Token models only.
    Validate with `context` as for generations, plus "image" and "mask" (PIL images; mask or None)."""

    start_step: int = Field(0, ge=0, description="start from the image's tokens noised to this step's level "
                            "(structural editing; 0: from noise, keeping only what the mask keeps)")
    _edit: Edit = PrivateAttr()

    @field_validator("size")
    @classmethod
    def _size(cls, size: str, info: ValidationInfo) -> str:
        """'auto' (or nothing): the image's size, which must then be one this deployment makes."""
        image = info.context["image"]
        if size not in ("auto", own := f"{image.width}x{image.height}"):
            raise ValueError(f"size {size} differs from the image's {own}")
        if rule := _size_rule(own, info):
            raise ValueError(f"the image is {own}, but edits need {rule}")
        return own

    @model_validator(mode="after")
    def _check_edit(self, info: ValidationInfo) -> "ImageEditRequest":
        if info.context["card"].family != "token":
            raise ValueError("image edits need a token-family model; this deployment serves a Gaussian one")
        image, mask = info.context["image"], info.context["mask"] or info.context["image"]
        if mask.size != image.size:
            raise ValueError(f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}")
        steps = self.steps or DEFAULT_STEPS["paella"]
        if self.start_step >= steps:
            raise ValueError(f"start_step must be below steps ({steps}), got {self.start_step}")
        alpha = mask.convert("RGBA").getchannel("A")  # palette and tRNS transparency too; no alpha: opaque
        if alpha.getextrema()[0] > 0:
            raise ValueError("the mask has no fully transparent pixel, so the edit would change nothing: make "
                             "the pixels to paint (all of them, to restyle with start_step) transparent")
        marked = alpha.point(lambda a: 255 if a == 0 else 0)
        self._edit = Edit([image.convert("RGB")] * self.n, [marked] * self.n, self.start_step)
        return self

    def edit(self) -> Edit:
        return self._edit


def _size_rule(size: str, info: ValidationInfo) -> str | None:
    """None if 'WIDTHxHEIGHT' is a size this deployment makes; else what it makes."""
    cap, step = info.context["args"].max_size_px, info.context["card"].downsampling
    width, _, height = size.partition("x")
    if not (width.isdigit() and height.isdigit()) or not all(
            8 <= int(px) <= cap and int(px) % step == 0 for px in (width, height)):
        return f"each side a multiple of {step} from {max(8, step)} to {cap}"
    return None


def _at_most(value: float, cap: float, what: str) -> float:
    if value > cap:
        raise ValueError(f"{value} {what} is over this deployment's cap of {cap}")
    return value


class GenerationMetadata(BaseModel):
    """How a request's images were made: model, sampler spec, precision of the model calls, mode
    (sequential, Picard, or sequential because the replica was busy), timings (seconds; batch_size = images per model call),
    for Picard the request's rounds (its slowest image's) and model evaluations (its images'
    states evaluated, however many other requests shared the call), and whether the prompt or the
    negative prompt was longer than the model's text context (its end not used)."""

    model_config = ConfigDict(protected_namespaces=())

    model: str
    model_digest: str
    mode: Mode
    spec: SamplerSpec
    precision: Literal["bf16", "fp32"]
    timings: dict[str, float | int]
    picard: dict[str, int] | None = None
    prompt_truncated: bool
    negative_prompt_truncated: bool


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    seed: int


class ImagesResponse(BaseModel):
    """OpenAI's images response, plus each image's seed and the request's metadata."""

    created: int
    data: list[ImageData]
    metadata: GenerationMetadata


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail
