"""Generator: prompts -> conditioning -> sampler -> decode -> images with metadata.

The one place that turns a request into pixels. Serve, the Data job, the CLI and the benchmarks
all call `Generator.generate`; none carries its own sampling loop. Knows nothing of Ray or HTTP.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from socarrat.checkpoint import DEFAULT_MODEL, bundled_models, load_checkpoint
from socarrat.config import GenerationRequest, ModelSpec, SamplerSpec
from socarrat.models import GaussianModel, build_model
from socarrat.sampling import Schedule, cfg_denoiser, draw_noise, make_step, sample
from socarrat.sampling.picard import sample_picard

# The stand-in used until a default model is bundled: tiny, seeded, so its digest is stable.
TINY_SPEC = ModelSpec(channels=(16, 32), attention_levels=(1,), heads=2, text={"width": 32, "embed_dim": 8, "layers": 1, "heads": 2})


@dataclass
class Result:
    """One generated image and what made it: prompt, seed, model digest, sampler spec, timings."""

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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Generator:
    """A loaded model on a device, ready to turn prompts into images."""

    def __init__(self, model: GaussianModel, digest: str, name: str, device: torch.device | str | None = None):
        self.device = torch.device(device) if device else default_device()
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.digest, self.name = digest, name

    @classmethod
    def load(cls, name_or_uri: str | None = None, device: torch.device | str | None = None) -> Generator:
        """A bundled model's name, a local checkpoint directory, or an s3:// prefix. None loads the
        default bundled model, or a tiny random model while none is bundled."""
        if name_or_uri is None and DEFAULT_MODEL not in bundled_models():
            torch.manual_seed(0)
            model = build_model(TINY_SPEC)
            digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
            return cls(model, digest, "tiny-random", device)
        model, config = load_checkpoint(name_or_uri, device="cpu")
        return cls(model, config["sha256"], name_or_uri or DEFAULT_MODEL, device)

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

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        spec: SamplerSpec = SamplerSpec(),
        negative_prompts: Sequence[str] | None = None,
        progress: bool = False,
    ) -> list[Result]:
        """One image per (prompt, seed). The image for (prompt, seed, spec) does not depend on the
        rest of the batch: noise comes from a per-sample generator and every op is per-sample."""
        request = GenerationRequest(prompts=list(prompts), seeds=list(seeds), negative_prompts=negative_prompts, spec=spec)
        shape = self.image_shape(spec)
        negatives = request.negative_prompts or [""] * len(request.prompts)
        schedule = Schedule.create(self.spec.schedule, self.spec.train_timesteps, spec.spacing, spec.steps)
        t0 = time.perf_counter()
        with self._autocast():
            cond = (self.model.encode(request.prompts), self.model.encode(negatives))
            t1 = time.perf_counter()
            x, noises = draw_noise(request.seeds, shape, spec.steps, spec.sampler == "ddpm", self.device)
            step = make_step(spec.sampler, schedule, self.spec.prediction, self.spec.clip_sample)
            denoise, picard = cfg_denoiser(self.model, spec.guidance), {}
            if spec.picard:
                x, stats = sample_picard(denoise, x, schedule, step, noises, cond, spec.window, spec.tolerance, progress)
                picard = {"picard": {"rounds": stats.rounds, "evaluations": stats.evaluations}}  # of the whole batch
            else:
                x = sample(denoise, x, schedule, step, noises, cond, progress)
            t2 = time.perf_counter()
            x = self.model.decode(x)
        pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        t3 = time.perf_counter()
        timings = {"encode_s": t1 - t0, "sample_s": t2 - t1, "decode_s": t3 - t2, "batch_size": len(x)}
        return [
            Result(Image.fromarray(np.ascontiguousarray(img)), {
                "prompt": p, "negative_prompt": n, "seed": s, "model": self.name,
                "model_digest": self.digest, "spec": spec.model_dump(), "timings": timings, **picard,
            })
            for img, p, n, s in zip(pixels, request.prompts, negatives, request.seeds)
        ]

    def _autocast(self):
        # bf16 on GPU halves memory traffic; on CPU, fp32 keeps results exact for the tests.
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
