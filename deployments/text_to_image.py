"""An OpenAI-compatible image endpoint on Ray Serve: `POST /v1/images/generations`.

`build_app(args)` wires two deployments. `ImageAPI`, the FastAPI ingress, validates a request once
(the wire format, `deployments.openai_api`), turns it into a `GenerationRequest` and stores or
encodes the PNGs. `ImageModel` loads the model once per replica and batches the
requests queued in it, calling `Generator.generate` once per sampler spec (which includes the size);
with `picard_actors`, Picard requests run on the replica's `socarrat.parallel.PicardGroup`.
Pixels are `Generator`'s business: this module holds no sampling code and reaches object storage
only through `socarrat.storage`.
"""

import asyncio
import base64
import json
import math
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from starlette.datastructures import UploadFile  # what request.form() returns (FastAPI's is a subclass)
from starlette.exceptions import HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from deployments.openai_api import (ErrorDetail, ErrorResponse, GenerationMetadata, ImageData, ImageEditRequest,
                                    ImageGenerationRequest, ImagesResponse, Mode, ModelCard, ModelList)
from socarrat import storage
from socarrat.checkpoint import check_model_name
from socarrat.config import PRECISION_HELP, GenerationRequest, Precision, SamplerSpec
from socarrat.errors import UserError
from socarrat.generator import Edit, Generator, Result, picard_totals, read_image
from socarrat.parallel import PicardGroup, WorkerLostError

# The ingress only awaits the model deployment, so it admits far more requests than a model
# replica; rejections then happen at the model's queue, where they get an OpenAI error body.
INGRESS_MAX_ONGOING_REQUESTS = 1024


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
