"""Generator: prompts -> conditioning -> sampler -> decode -> images with metadata.

The one place that turns a request into pixels. Serve, the Data job, the CLI and the benchmarks
all call `Generator.generate`; none carries its own sampling loop. Knows nothing of Ray or HTTP.
"""

from __future__ import annotations

import io
import json
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from socarrat.checkpoint import DEFAULT_MODEL, load_checkpoint
from socarrat.config import GenerationRequest, ModelSpec, Precision, SamplerSpec, check_precision
from socarrat.models import GaussianModel
from socarrat.models.text import TextEncoding
from socarrat.errors import UserError
from socarrat.sampling import Denoise, Schedule, StepFn, cfg_denoiser, draw_noise, make_step, sample
from socarrat.sampling.picard import sample_picard
from socarrat.sampling.tokens import (TokenSchedule, constrain, draw_token_noise, lerp_text, make_token_step, noise_fraction,
                                     renoise, restart_with)

DEFAULT_STEPS = {"ddim": 50, "ddpm": 50, "paella": 12}
OWN_SAMPLER = {"gaussian": "ddim", "token": "paella"}  # a family's sampler when a spec names none

# Where a request's model evaluations run: called with its conditioning ((positive, negative)
# encodings) and guidance, it yields the CFG denoiser and the conditioning that the sampler hands it.
# `socarrat.parallel.PicardGroup.conditioned` runs them on Ray actors; None: on this Generator's model.
DenoiserSource = Callable[[Any, float], AbstractContextManager[tuple[Denoise, Any]]]

@dataclass
class Result:
    """One generated image and what made it: prompt, seed, model digest, sampler spec, precision ("bf16"
    or "fp32": what its model calls computed in), timings, and whether the prompt or negative prompt
    was longer than the text encoder's context (its end cut: `prompt_truncated`,
    `negative_prompt_truncated`)."""

    image: Image.Image
    metadata: dict = field(default_factory=dict)

    def png_bytes(self) -> bytes:
        """PNG with the metadata in text chunks: `parameters` (A1111 style) and `socarrat` (JSON)."""
        m, spec = self.metadata, self.metadata["spec"]
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", (
            f"{m['prompt']}\nNegative prompt: {m['negative_prompt']}\n"
            f"Steps: {spec['steps']}, Sampler: {spec['sampler'].upper()}, CFG scale: {spec['guidance']}, "
            f"Seed: {m['seed']}, Size: {self.image.width}x{self.image.height}, "
            f"Model hash: {m['model_digest'][:10]}, Model: {m['model']}"
        ))
        info.add_text("socarrat", json.dumps(m))
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()


def picard_totals(results: Sequence[Result]) -> dict[str, int] | None:
    """Picard stats of several images sampled together (a request, a batch): the rounds of the
    slowest, the evaluations of all; None if none was sampled with Picard."""
    stats = [r.metadata["picard"] for r in results if "picard" in r.metadata]
    if not stats:
        return None
    return {"rounds": max(s["rounds"] for s in stats), "evaluations": sum(s["evaluations"] for s in stats)}


def read_image(data: bytes, what: str) -> Image.Image:
    """Decode an image file's bytes (any format PIL reads); UserError naming `what` if it cannot."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except Exception as err:  # any decoder failure is the caller's file
        raise UserError(f"{what} is not a readable image: {err}") from None


@dataclass
class Edit:
    """Images to edit with a token model, one per prompt, at the output size (RGB).

    masks (mode "L", same size; None: none) mark with white the pixels to paint anew: a token is
    resampled if any of its pixels is marked, every other token is kept (inpainting; outpainting is
    inpainting of a larger canvas, see `outpaint`). start_step > 0 skips the first steps and starts
    from the images' tokens, noised to that step's level (structural editing: lower keeps more).
    """

    images: list[Image.Image]
    masks: list[Image.Image] | None = None
    start_step: int = 0

    def pixels(self, tokens_hw: tuple[int, int], f: int) -> torch.Tensor:
        """The images as (B, 3, H, W) float in [-1, 1]; UserError unless they are H x W."""
        h, w = tokens_hw[0] * f, tokens_hw[1] * f
        if any(img.size != (w, h) for img in self.images):
            raise UserError(f"edit images must be {w}x{h} (the output size), got {sorted({img.size for img in self.images})}")
        arrays = np.stack([np.asarray(img.convert("RGB")) for img in self.images])
        return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1

    def keep(self, tokens_hw: tuple[int, int], f: int) -> torch.Tensor:
        """(B, h, w) bool: the tokens none of whose pixels the masks mark."""
        h, w = tokens_hw[0] * f, tokens_hw[1] * f
        if self.masks is None:
            return torch.zeros(len(self.images), *tokens_hw, dtype=torch.bool)
        if len(self.masks) != len(self.images) or any(m.size != (w, h) for m in self.masks):
            raise UserError(f"need one {w}x{h} mask per edit image")
        marked = torch.from_numpy(np.stack([np.asarray(m.convert("L")) >= 128 for m in self.masks])).float()
        return torch.nn.functional.max_pool2d(marked[:, None], f)[:, 0] == 0

    @staticmethod
    def outpaint(image: Image.Image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0) -> tuple[Image.Image, Image.Image]:
        """(canvas, mask) for outpainting: `image` on a canvas grown by the given pixels, the
        mask marking the new border."""
        if min(left, right, top, bottom) < 0:
            raise UserError("outpainting margins must be >= 0")
        size = (image.width + left + right, image.height + top + bottom)
        canvas, mask = Image.new("RGB", size, "white"), Image.new("L", size, 255)
        canvas.paste(image.convert("RGB"), (left, top))
        mask.paste(0, (left, top, left + image.width, top + image.height))
        return canvas, mask


@dataclass
class Blend:
    """Interpolation between prompts: sample i is conditioned on lerp(prompt i, prompts[i], weights[i]).
    These prompts, too, are cut to the text context; the metadata flags only the request's own."""

    prompts: list[str]
    weights: list[float]

    def apply(self, a: TextEncoding, b: TextEncoding) -> TextEncoding:
        if not len(self.prompts) == len(self.weights) == len(a.tokens):
            raise UserError(f"blend needs one prompt and one weight per prompt, got {len(self.prompts)} and {len(self.weights)}")
        return lerp_text(a, b, torch.tensor(self.weights))


def resolve_spec(model: ModelSpec, spec: SamplerSpec) -> SamplerSpec:
    """`spec` with the defaults of a `model` filled in (sampler, steps); UserError for a sampler its
    family does not have, or for another sampler's field moved off its default (it would be ignored)."""
    token = model.family == "token"
    sampler = spec.sampler or OWN_SAMPLER[model.family]
    if token != (sampler == "paella"):
        own = "paella" if token else "ddim or ddpm"
        raise UserError(f"sampler {sampler!r} does not apply to this {model.family}-family model; use {own}")
    unread = {name for name, value in SamplerSpec() if getattr(spec, name) != value} & (
        {"spacing"} if token else {"temperature", "renoise_steps"})
    if unread:
        raise UserError(f"{', '.join(sorted(unread))}: not read by the {sampler} sampler; "
                        f"leave {'it' if len(unread) == 1 else 'them'} unset")
    return spec.model_copy(update={"sampler": sampler, "steps": spec.steps or DEFAULT_STEPS[sampler]})


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(device: torch.device, precision: Precision = "auto") -> str:
    """"bf16" or "fp32": what `precision` means on `device` (see `Precision`)."""
    check_precision(precision)
    return "bf16" if precision == "bf16" or (precision == "auto" and device.type == "cuda") else "fp32"


def model_precision(device: torch.device, precision: Precision = "auto") -> torch.autocast:
    """The autocast every model call runs under, here and on Picard's actors (see `Precision`)."""
    bf16 = resolve_precision(device, precision) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def padded_rows(n: int) -> int:
    """The rows a compiled model call runs at for n: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


class CompiledModel:
    """`model`'s forward under torch.compile, called as the model is. Each call's rows are padded up to
    a power of two (repeating the last row) and the padding dropped from the output: every new shape
    compiles once (tens of seconds on a CPU), so that a few shapes cover the batches of a run (1 to
    128 rows: 8 shapes). Past torch's recompile limit (`torch._dynamo.config.recompile_limit`, 8)
    further shapes run eager, as Picard over large batches can meet them (up to 2 x window x batch
    rows). On a GPU it runs as a CUDA graph (`mode="reduce-overhead"`): one launch a call, not one a
    kernel."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.graphs = device.type == "cuda"
        self.forward = torch.compile(model, dynamic=False, mode="reduce-overhead" if self.graphs else None)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: Any) -> torch.Tensor:
        n, size = len(x), padded_rows(len(x))
        if size > n:
            index = torch.arange(size, device=x.device).clamp_(max=n - 1)
            x, t, text = x[index], t[index], text[index]
        out = self.forward(x, t, text)[:n]
        return out.clone() if self.graphs else out  # a CUDA graph's next replay overwrites its output


class Generator:
    """A loaded model on a device, ready to turn prompts into images."""

    def __init__(self, model: GaussianModel, digest: str, name: str, device: torch.device | str | None = None,
                 precision: Precision = "auto", compile: bool = False):
        self.device = torch.device(device) if device else default_device()
        self.precision = resolve_precision(self.device, precision)  # "bf16" or "fp32" from here on
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.digest, self.name = digest, name
        # What the denoiser calls: the model, or it compiled (the model encodes and decodes eager).
        self.calls = CompiledModel(self.model, self.device) if compile else self.model

    @classmethod
    def load(cls, name_or_uri: str | None = None, device: torch.device | str | None = None,
             precision: Precision = "auto", compile: bool = False) -> Generator:
        """A bundled model's name, a local checkpoint directory, or an s3:// prefix; None: the
        default bundled model. `precision`: see `Precision`; `compile`: the model's calls under
        torch.compile (see `CompiledModel`), which pays off over many calls of few shapes."""
        model, config = load_checkpoint(name_or_uri, device="cpu")
        return cls(model, config["sha256"], name_or_uri or DEFAULT_MODEL, device, precision, compile)

    @property
    def compiled(self) -> bool:
        return isinstance(self.calls, CompiledModel)

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def pixel_multiple(self) -> int:
        """Image height and width must be multiples of this."""
        return self.model.pixel_multiple

    def image_shape(self, spec: SamplerSpec) -> tuple[int, int, int]:
        """(C, H, W) of the state sampled for `spec`; raises UserError for a size it cannot make."""
        return self.model.latent_shape(spec.height_px or self.spec.size_px, spec.width_px or self.spec.size_px)

    def resolve(self, spec: SamplerSpec) -> SamplerSpec:
        """`spec` with this model's defaults filled in (see `resolve_spec`)."""
        return resolve_spec(self.spec, spec)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        spec: SamplerSpec = SamplerSpec(),
        negative_prompts: Sequence[str] | None = None,
        progress: bool = False,
        edit: Edit | None = None,
        blend: Blend | None = None,
        denoiser: DenoiserSource | None = None,
    ) -> list[Result]:
        """One image per (prompt, seed). The image for (prompt, seed, spec) does not depend on the
        rest of the batch: noise comes from a per-sample generator and every op is per-sample (up to
        float rounding, which a batch's shape can change: bit-exact in eager fp32 on the CPU, ~1e-3 under
        a GPU's bf16 autocast; a rare token of a token model can flip).
        `edit` (token models) pins or starts from the tokens of given images (see `Edit`); `blend`
        interpolates each prompt's conditioning towards another prompt's (any model). `denoiser`
        evaluates the model elsewhere (see `DenoiserSource`); it must hold this Generator's model."""
        request = GenerationRequest(prompts=list(prompts), seeds=list(seeds), negative_prompts=negative_prompts, spec=spec)
        spec = self.resolve(request.spec)
        shape = self.image_shape(spec)
        negatives = request.negative_prompts or [""] * len(request.prompts)
        t0 = time.perf_counter()
        with model_precision(self.device, self.precision):
            cond = (self.model.encode(request.prompts), self.model.encode(negatives))
            if blend is not None:
                cond = (blend.apply(cond[0], self.model.encode(blend.prompts)), cond[1])
            t1 = time.perf_counter()
            x, schedule, step, noises = self._plan(spec, request.seeds, shape)
            extra = [{} for _ in range(len(x))]  # per image
            with (denoiser or self._local_denoiser)(cond, spec.guidance) as (denoise, cond):
                if edit is not None:
                    x, schedule, step, noises, denoise, cond = self._edit_plan(edit, spec, x, noises, denoise, cond)
                if spec.picard:
                    x, stats = sample_picard(denoise, x, schedule, step, noises, cond, spec.window, spec.tolerance, progress)
                    for own, r, e in zip(extra, stats.sample_rounds, stats.sample_evaluations):
                        own["picard"] = {"rounds": r, "evaluations": e}  # each image's own, not the batch's
                else:
                    x = sample(denoise, x, schedule, step, noises, cond, progress)
            t2 = time.perf_counter()
            x = self.model.decode(x)
        pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        t3 = time.perf_counter()
        timings = {"encode_s": t1 - t0, "sample_s": t2 - t1, "decode_s": t3 - t2, "batch_size": len(x)}
        for own, p_cut, n_cut in zip(extra, self.model.truncated(request.prompts), self.model.truncated(negatives)):
            own |= {"prompt_truncated": p_cut, "negative_prompt_truncated": n_cut}
        return [
            Result(Image.fromarray(np.ascontiguousarray(img)), {
                "prompt": p, "negative_prompt": n, "seed": s, "model": self.name,
                "model_digest": self.digest, "spec": spec.model_dump(), "precision": self.precision,
                "timings": timings, **own,
            })
            for img, p, n, s, own in zip(pixels, request.prompts, negatives, request.seeds, extra)
        ]

    def _plan(self, spec: SamplerSpec, seeds: Sequence[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, Any, StepFn, torch.Tensor | None]:
        """The starting state, schedule, step function and pre-drawn noise of a resolved spec."""
        if spec.sampler == "paella":
            schedule = TokenSchedule.create(self.spec.train_timesteps, spec.steps, spec.renoise_steps)
            x, noises = draw_token_noise(seeds, shape, spec.steps, self.model.codebook_size, self.device)
            return x, schedule, make_token_step(schedule, spec.temperature), noises
        schedule = Schedule.create(self.spec.schedule, self.spec.train_timesteps, spec.spacing, spec.steps)
        x, noises = draw_noise(seeds, shape, spec.steps, spec.sampler == "ddpm", self.device)
        return x, schedule, make_step(spec.sampler, schedule, self.spec.prediction, self.spec.clip_sample), noises

    def _local_denoiser(self, cond: Any, guidance: float) -> AbstractContextManager[tuple[Denoise, Any]]:
        return nullcontext((cfg_denoiser(self.calls, guidance), cond))

    def _edit_plan(self, edit: Edit, spec: SamplerSpec, x: torch.Tensor, noises: torch.Tensor, denoise: Denoise, cond: Any):
        """Inpainting pins the kept tokens; a start step > 0 begins from the images' tokens, noised
        with the pre-drawn draws of the step before (where the sequential chain would re-noise).
        Either way, re-noising puts back this first state, so the model sees the kept tokens at
        every step."""
        if spec.sampler != "paella":
            raise UserError("image editing needs a token-family model and the paella sampler")
        if len(edit.images) != len(x):
            raise UserError(f"{len(edit.images)} edit images for {len(x)} prompts")
        if edit.masks is None and not edit.start_step:
            raise UserError("an edit needs masks (what to paint anew) or a start step > 0 (restyling), or it "
                            "would ignore its images")
        f = self.spec.token.downsampling
        known = self.model.tokenize(edit.pixels(x.shape[1:], f).to(self.device))
        keep = edit.keep(x.shape[1:], f).to(self.device)
        if unmarked := keep.flatten(1).all(1).nonzero()[:, 0].tolist():
            raise UserError(f"the masks of edits {unmarked} mark no pixel, so they would change nothing")
        remaining = TokenSchedule.create(self.spec.train_timesteps, spec.steps, spec.renoise_steps, edit.start_step)
        if edit.start_step:  # noised to the level of the step it starts at, with the draws of the step before
            level = float(noise_fraction(remaining.timesteps[0], self.spec.train_timesteps))
            x = renoise(known, level, noises[edit.start_step - 1], self.model.codebook_size)
        x = torch.where(keep, known, x)
        noises = restart_with(noises[edit.start_step:], x, self.model.codebook_size)
        return (x, remaining, make_token_step(remaining, spec.temperature, edit.start_step), noises,
                constrain(denoise), (known, keep, cond))
