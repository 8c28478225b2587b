"""An OpenAI-compatible image endpoint on Ray Serve: `POST /v1/images/generations`.

`build_app(args)` wires two deployments. `ImageAPI`, the FastAPI ingress, validates a request once
(OpenAI's fields plus seed, steps, guidance, sampler, Picard), turns it into a `GenerationRequest`
and stores or encodes the PNGs. `ImageModel` loads the model once per replica and batches the
requests queued in it, calling `Generator.generate` once per sampler spec (which includes the size);
with `picard_actors`, Picard requests run on the replica's `socarrat.parallel.PicardGroup`.
Pixels are `Generator`'s business: this module holds no sampling code and reaches object storage
only through `socarrat.storage`.
"""

import asyncio
import base64
import json
import math
import secrets
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from fastapi import FastAPI, Request
from starlette.datastructures import UploadFile  # what request.form() returns (FastAPI's is a subclass)
from starlette.exceptions import HTTPException
from fastapi.responses import JSONResponse
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from socarrat import storage
from socarrat.checkpoint import check_model_name
from socarrat.config import MAX_PROMPT_CHARS, PRECISION_HELP, GenerationRequest, Precision, SamplerSpec
from socarrat.errors import UserError
from socarrat.generator import DEFAULT_STEPS, OWN_SAMPLER, Edit, Generator, Result, picard_totals, read_image
from socarrat.parallel import PicardGroup, WorkerLostError

# The ingress only awaits the model deployment, so it admits far more requests than a model
# replica; rejections then happen at the model's queue, where they get an OpenAI error body.
INGRESS_MAX_ONGOING_REQUESTS = 1024

Mode = Literal["sequential", "picard-replica", "picard-group", "sequential-busy"]


class AppArgs(BaseModel):
    """Arguments of `build_app`: `args:` in serve_config.yaml, or `key=value` after the import path
    of `serve run`. Settings in the YAML's `deployments:` section would override the deployment
    options derived here (resources, max_ongoing_requests, max_queued_requests, Retry-After)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model_uri: str | None = Field(None, description="bundled name, checkpoint dir or s3:// prefix; None: the default")
    store_uri: str | None = Field(None, description="folder or s3:// prefix for response_format=url; None: url refused")
    url_expires_s: int = Field(3600, ge=1, le=7 * 24 * 3600, description="lifetime of the presigned HTTPS URLs of "
                               "response_format=url on S3 (local folders answer file:// URIs)")
    num_gpus: float = Field(1, ge=0, description="per model replica; fractions share one GPU's memory")
    num_cpus: float = Field(1, ge=0, description="per model replica; also torch's CPU threads")
    precision: Precision = Field("auto", description=PRECISION_HELP)
    max_n: int = Field(4, ge=1, description="images per request")
    max_size_px: int = Field(512, ge=8, description="largest width or height")
    max_steps: int = Field(1000, ge=1, description="sampler steps per request")
    max_batch_images: int = Field(16, ge=1, description="images per model call")
    batch_wait_timeout_s: float = Field(
        0, ge=0, description="before each model call, while fewer than max_batch_images images are queued, "
        "wait this long (in full) for more; requests that arrive during a model call share the next one anyway")
    max_ongoing_requests: int = Field(32, ge=1, description="per model replica, queued batches included")
    max_queued_requests: int = Field(64, ge=-1, description="per caller beyond those; more get 503; -1: no limit")
    retry_after_s: float = Field(1, gt=0, description="Retry-After of a 503")
    request_timeout_s: float = Field(120, gt=0, description="longest wait for the model's answer; then 504")
    picard_max_ongoing: int = Field(
        1, ge=0, description="Picard runs (in the replica or on its actor group) only while the replica holds "
        "at most this many requests (the one asking included); beyond that it falls back to batched sequential "
        "sampling")
    picard_actors: int = Field(
        0, ge=0, description="Picard runs on a group of this many Ray actors per model replica, each "
        "holding the model and evaluating its share of every round; 0: in the replica itself")
    picard_gpus_per_actor: float = Field(1, ge=0, description="per Picard actor; fractions share a GPU; 0: on CPUs")

    @model_validator(mode="after")
    def _check(self) -> "AppArgs":
        if self.max_n > self.max_batch_images:
            raise ValueError(f"max_n={self.max_n} exceeds max_batch_images={self.max_batch_images}: "
                             "a request's images share one model call")
        return self


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


@dataclass
class Generated:
    """A model replica's answer to one request."""

    results: list[Result]
    metadata: GenerationMetadata


@dataclass
class _Job:
    """One request waiting for a model call, answered through its future."""

    request: GenerationRequest
    mode: Mode
    arrived_s: float
    answer: asyncio.Future
    edit: Edit | None = None


def _images_in(jobs: Iterable[_Job]) -> int:
    """What the jobs put in one model call, in images: a Picard image evaluates min(window, steps) states."""
    return sum(len(job.request.prompts) * (min(job.request.spec.window, job.request.spec.steps)
                                           if job.request.spec.picard else 1) for job in jobs)


@serve.deployment
class ImageModel:
    """One `Generator` per replica, and a queue in front of it. Each model call takes the queued
    requests (up to max_batch_images images) and makes one `Generator.generate` call per sampler
    spec among them; each request keeps its own seeds, so its images are the ones it would get alone.

    Not `@serve.batch`: in Ray 2.60 it cuts a batch every batch_wait_timeout_s even while the model
    is busy, and those batches then wait in line; 16 requests arriving 13 ms apart during a 0.5 s
    call came out as batches of [4, 1, 1, ... 1]. Here a batch is cut when the model is free, so
    requests that arrive during a call share the next one.
    """

    def __init__(self, args: AppArgs):
        self.generator = Generator.load(args.model_uri, precision=args.precision)
        spec = self.generator.spec
        self.card = ModelCard(id=self.generator.name, created=int(time.time()), digest=self.generator.digest,
                              size_px=spec.size_px, downsampling=self.generator.pixel_multiple, family=spec.family,
                              max_steps=spec.train_timesteps)
        # The actors load the replica's checkpoint by name, checked by digest; they die with the replica.
        self.group = PicardGroup(self.generator.name, args.picard_actors, args.picard_gpus_per_actor,
                                 # the replica's own, resolved on its device: the actors' may have another
                                 digest=self.generator.digest, precision=self.generator.precision) if args.picard_actors else None
        self.args = args
        self.ongoing = 0
        self.queue: deque[_Job] = deque()
        self.runner: asyncio.Task | None = None

    def model_card(self) -> ModelCard:
        return self.card

    async def generate(self, request: GenerationRequest, edit: Edit | None = None) -> Generated:
        self.ongoing += 1
        try:
            mode, spec = self._mode(self._resolve(request.spec))
            job = _Job(request.model_copy(update={"spec": spec}), mode, time.perf_counter(),
                       asyncio.get_running_loop().create_future(), edit)
            self.queue.append(job)
            if self.runner is None or self.runner.done():
                self.runner = asyncio.create_task(self._drain())
            return await job.answer
        finally:
            self.ongoing -= 1

    def _resolve(self, spec: SamplerSpec) -> SamplerSpec:
        """The model's defaults filled in, the size too: equal work gets equal specs (and shares model
        calls), and the metadata states the size made."""
        spec, size_px = self.generator.resolve(spec), self.card.size_px
        return spec.model_copy(update={"height_px": spec.height_px or size_px, "width_px": spec.width_px or size_px})

    def _mode(self, spec: SamplerSpec) -> tuple[Mode, SamplerSpec]:
        if not spec.picard:
            return "sequential", spec
        if self.ongoing <= self.args.picard_max_ongoing:
            return "picard-group" if self.group else "picard-replica", spec
        # Picard spends extra model evaluations to cut latency; under load they are better spent on
        # other requests, and its converged result is the sequential one anyway.
        defaults = SamplerSpec()
        return "sequential-busy", spec.model_copy(update={"picard": False, "window": defaults.window,
                                                          "tolerance": defaults.tolerance})

    async def _drain(self) -> None:
        """Model calls until the queue is empty, in a thread so the replica keeps taking requests
        and answering health checks meanwhile."""
        while self.queue:
            if _images_in(self.queue) < self.args.max_batch_images:
                await asyncio.sleep(self.args.batch_wait_timeout_s)  # give a partial batch the chance to fill
            for spec, group in self._groups(self._take_batch()):
                try:
                    answers = await asyncio.to_thread(self._run, spec, group)
                except Exception as err:  # only this model call's requests fail (a lost Picard actor, say)
                    answers = [err] * len(group)
                for job, answer in zip(group, answers):
                    if job.answer.done():  # cancelled meanwhile (a timeout): no one is waiting
                        continue
                    if isinstance(answer, Exception):
                        job.answer.set_exception(answer)
                    else:
                        job.answer.set_result(answer)

    def _take_batch(self) -> list[_Job]:
        """Queued requests in arrival order, up to max_batch_images images (the first one in any case: a
        request larger than that, from a caller that bypassed the ingress, must not stall the queue);
        cancelled ones are dropped."""
        batch: list[_Job] = []
        while self.queue and (not batch or _images_in(batch + [self.queue[0]]) <= self.args.max_batch_images):
            job = self.queue.popleft()
            if not job.answer.done():
                batch.append(job)
        return batch

    @staticmethod
    def _groups(jobs: list[_Job]) -> list[tuple[SamplerSpec, list[_Job]]]:
        """The batch cut into model calls: one per sampler spec; an edit brings its own images, so it
        gets a call of its own. Each call is answered as soon as it is done."""
        groups: dict[tuple[SamplerSpec, int], list[_Job]] = defaultdict(list)
        for job in jobs:
            groups[job.request.spec, id(job) if job.edit else 0].append(job)
        return [(spec, group) for (spec, _), group in groups.items()]

    def _run(self, spec: SamplerSpec, jobs: list[_Job]) -> list[Generated]:
        started = time.perf_counter()
        results = self.generator.generate(
            [p for job in jobs for p in job.request.prompts], [s for job in jobs for s in job.request.seeds],
            spec, [n for job in jobs for n in job.request.negative_prompts or [""] * len(job.request.prompts)],
            edit=jobs[0].edit, denoiser=self.group.conditioned if self.group and spec.picard else None)
        answers = []
        for job in jobs:
            mine, results = results[:len(job.request.prompts)], results[len(job.request.prompts):]
            answers.append(Generated(mine, GenerationMetadata(
                model=self.card.id, model_digest=self.card.digest, mode=job.mode,
                spec=SamplerSpec.model_validate(mine[0].metadata["spec"]), precision=mine[0].metadata["precision"],
                timings={**mine[0].metadata["timings"], "queue_s": started - job.arrived_s},
                picard=picard_totals(mine), prompt_truncated=mine[0].metadata["prompt_truncated"],
                negative_prompt_truncated=mine[0].metadata["negative_prompt_truncated"])))
        return answers

    def check_health(self) -> None:
        """Serve replaces a replica whose weights went non-finite (a bad load, a corrupted device)."""
        if not all(torch.isfinite(p).all() for p in self.generator.model.parameters()):
            raise RuntimeError(f"model {self.card.id}: non-finite weights")


# Exception handlers must be registered before `serve.ingress(api)`, which takes a copy of the app.
api = FastAPI(title="Socarrat images", description="OpenAI-compatible text-to-image generation.")


class _ServiceError(Exception):
    """A failure that is not the caller's mistake: overload, an unavailable model, a timeout."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.code, self.retry_after_s = status, code, retry_after_s


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


@api.exception_handler(ValidationError)
async def _invalid(request: Request, err: ValidationError) -> JSONResponse:
    first = err.errors()[0]
    param = ".".join(map(str, first["loc"])) or None
    message = "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg'].removeprefix('Value error, ')}" for e in err.errors())
    return _error(400, message, "invalid_request_error", param, first["type"])


@api.exception_handler(HTTPException)  # no such route (404), or not with this method (405)
async def _no_route(request: Request, err: HTTPException) -> JSONResponse:
    return _error(err.status_code, f"{err.detail}: {request.method} {request.url.path}", "invalid_request_error",
                  headers=err.headers)


@api.exception_handler(json.JSONDecodeError)
@api.exception_handler(UnicodeDecodeError)  # json.loads of bytes that are not UTF-8
async def _not_json(request: Request, err: ValueError) -> JSONResponse:
    return _error(400, f"the body is not valid JSON in UTF-8: {err}", "invalid_request_error", code="invalid_json")


# Serve's own handlers for BackPressureError and DeploymentUnavailableError replace any registered
# here and answer in plain text, so `ImageAPI._ask` turns them into a _ServiceError.
@api.exception_handler(_ServiceError)
async def _service_error(request: Request, err: _ServiceError) -> JSONResponse:
    retry = {"Retry-After": str(math.ceil(err.retry_after_s))} if err.retry_after_s else None
    return _error(err.status, str(err), "server_error", code=err.code, headers=retry)


# Our bugs and the infrastructure's failures (a replica lost, out of memory, the object store). Starlette
# re-raises the error after this answer, and the replica logs it with its traceback ("Request failed.").
@api.exception_handler(Exception)
async def _server_error(request: Request, err: Exception) -> JSONResponse:
    return _error(500, f"the server failed on this request ({type(err).__name__}); retry it later", "server_error")


@serve.deployment(max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class ImageAPI:
    """Validates requests, forwards them to `ImageModel`, and returns or stores the PNGs."""

    def __init__(self, model: DeploymentHandle, args: AppArgs):
        self.model, self.args = model, args
        self.store = storage.open_store(args.store_uri) if args.store_uri else None
        self._card: ModelCard | None = None

    async def card(self) -> ModelCard:
        if self._card is None:
            self._card = await self._ask(self.model.model_card.remote(), self.args.request_timeout_s)
        return self._card

    # The body is parsed by hand, with the deployment's caps as validation context; the schema is
    # declared for /docs.
    @api.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
              responses={code: {"model": ErrorResponse} for code in (400, 503, 504)},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": ImageGenerationRequest.model_json_schema()}}}})
    async def generations(self, request: Request) -> ImagesResponse:
        started = time.perf_counter()
        context = {"args": self.args, "card": await self.card()}
        body = ImageGenerationRequest.model_validate(await request.json(), context=context)
        return await self._answer(body, None, started)

    @api.post("/v1/images/edits", response_model=ImagesResponse, response_model_exclude_none=True,
              responses={code: {"model": ErrorResponse} for code in (400, 503, 504)})
    async def edits(self, request: Request) -> ImagesResponse:
        """Inpainting and outpainting (send a canvas whose new border is transparent) with a token model."""
        started = time.perf_counter()
        form = await request.form()
        files = {k: await v.read() for k, v in form.multi_items() if isinstance(v, UploadFile) and k in ("image", "mask")}
        fields = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
        if "image" not in files:
            return _error(400, "an image file is required", "invalid_request_error", "image", "missing")
        try:
            images = {k: read_image(data, f"the {k}") for k, data in files.items()}
        except UserError as err:
            return _error(400, str(err), "invalid_request_error", code="invalid_image")
        context = {"args": self.args, "card": await self.card(), "image": images["image"], "mask": images.get("mask")}
        body = ImageEditRequest.model_validate(fields, context=context)
        return await self._answer(body, body.edit(), started)

    async def _answer(self, body: ImageGenerationRequest, edit: Edit | None, started: float) -> ImagesResponse:
        generated = await self._ask(self.model.generate.remote(body.generation_request(), edit),
                                    body.timeout_s or self.args.request_timeout_s)
        pngs = await asyncio.to_thread(lambda: [r.png_bytes() for r in generated.results])
        seeds = [r.metadata["seed"] for r in generated.results]
        if body.response_format == "url":
            data = [ImageData(url=url, seed=s) for url, s in zip(await asyncio.to_thread(self._publish, pngs), seeds)]
        else:
            data = [ImageData(b64_json=base64.b64encode(png).decode(), seed=s) for png, s in zip(pngs, seeds)]
        timings = {**generated.metadata.timings, "total_s": time.perf_counter() - started}
        return ImagesResponse(created=int(time.time()), data=data,
                              metadata=generated.metadata.model_copy(update={"timings": timings}))

    async def _ask(self, response: DeploymentResponse, timeout_s: float) -> Generated | ModelCard:
        """The model deployment's answer, its failures as _ServiceErrors."""
        try:
            return await asyncio.wait_for(response, timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise _ServiceError(504, "timeout", f"no image within the request timeout of {timeout_s} s") from None
        except BackPressureError as err:
            raise _ServiceError(503, "overloaded", f"the service is at capacity, retry later: {err}",
                                err.retry_after_s) from None
        except DeploymentUnavailableError as err:
            raise _ServiceError(503, "unavailable", f"the model is not available: {err}") from None
        except WorkerLostError:
            raise _ServiceError(503, "worker_lost", "a Picard worker was lost while making this request, which "
                                "produced no image; retry it", self.args.retry_after_s) from None

    def _publish(self, pngs: list[bytes]) -> list[str]:
        request_id = uuid.uuid4().hex
        urls = []
        for i, png in enumerate(pngs):
            key = f"{request_id}/{i}.png"  # store_uri names the images' own folder
            self.store.put_bytes(key, png)
            urls.append(self.store.share_url(key, self.args.url_expires_s))
        return urls

    @api.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        return ModelList(data=[await self.card()])

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """The ingress is up and a model replica answers now; replicas' own health is `check_health`."""
        card = await self._ask(self.model.model_card.remote(), self.args.request_timeout_s)
        return {"status": "ok", "model": card.id}


def build_app(args: AppArgs) -> Application:
    """The application for `serve run`: `serve run deployments.text_to_image:build_app num_gpus=0`."""
    args = AppArgs.model_validate(args)
    if args.model_uri:  # a bundled name's typo fails here, not in replicas restarted again and again
        check_model_name(args.model_uri)
    model = ImageModel.options(
        ray_actor_options={"num_gpus": args.num_gpus, "num_cpus": args.num_cpus},
        max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
        backpressure_config={"retry_after_s": args.retry_after_s},
    ).bind(args)
    return ImageAPI.bind(model, args)
