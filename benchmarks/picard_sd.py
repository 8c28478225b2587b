"""Picard on a Stable-Diffusion-shaped model: sequential vs Socarrat Picard vs diffusers' ParaDiGMS.

One random-weight diffusers UNet2DConditionModel + AutoencoderKL behind Socarrat's adapter
(`socarrat.models.diffusers_adapter`), sampled three ways on identical inputs (initial latents,
prompt embeddings, and every step's noise):
- sequential: Socarrat's `sample` (equal to diffusers' StableDiffusionPipeline, see the tests);
- Socarrat Picard: `sample_picard` at `--tolerance`;
- diffusers' `StableDiffusionParadigmsPipeline` with DDPMParallelScheduler / DDIMParallelScheduler at
  each of `--ref-tolerances` (0.1 is its default), the same window (its `parallel`).
Socarrat keeps its states in float32 around the fp16 UNet (as `Generator` does around a bf16-autocast
one); ParaDiGMS keeps them in the UNet's dtype, as diffusers does. Reported: wall time, rounds (UNet calls one after another, counted by a hook on the UNet for every
method), model evaluations (states evaluated; CFG's two passes count once), and agreement with
sequential in latent units (RMS) and in decoded uint8 pixels (RMS, max). Random weights: read speed
and agreement, not image quality. Rounds and evaluations do not depend on the device; times do.

    python -m benchmarks.picard_sd --config tiny --threads 1   # CPU: tiny UNet, DDPM-100 and DDIM-50
    python -m benchmarks.picard_sd --config sd15               # GPU: SD-1.5 UNet, fp16, 64x64 latents, DDPM-1000, DDIM-200

Both ParaDiGMS schedulers step by a fixed stride T // steps; with trailing spacing and steps dividing
T (as here) that is the next visited timestep, so all methods integrate the same chain.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMParallelScheduler, DDPMParallelScheduler, StableDiffusionParadigmsPipeline,
                       UNet2DConditionModel)

from benchmarks.picard import timed, to_uint8
from socarrat.config import SamplerSpec
from socarrat.models.diffusers_adapter import DiffusersModel
from socarrat.models.text import TextEncoding
from socarrat.sampling import cfg_denoiser, make_step, sample
from socarrat.sampling.picard import sample_picard
from socarrat.sampling.schedules import Schedule

# UNet, VAE and text-embedding shapes: SD-1.5's (860M-parameter UNet, 77 x 768 CLIP states), and a
# tiny stand-in for the CPU.
CONFIGS = {
    "sd15": dict(
        unet=dict(sample_size=64, cross_attention_dim=768),  # the rest are UNet2DConditionModel's defaults: SD-1.5's
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=(77, 768), steps="ddpm:1000,ddim:200"),
    "tiny": dict(
        unet=dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                  attention_head_dim=4, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        vae=dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8, sample_size=128,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=(16, 32), steps="ddpm:100,ddim:50"),
}
SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1,
                 timestep_spacing="trailing")
PARALLEL_SCHEDULERS = {"ddpm": DDPMParallelScheduler, "ddim": DDIMParallelScheduler}


class CallCounter:
    """Counts the UNet's calls and the rows it evaluates, whoever calls it."""

    def __init__(self, unet: torch.nn.Module):
        self.calls = self.rows = 0
        unet.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls, self.rows = self.calls + 1, self.rows + len(args[0])

    def reset(self) -> tuple[int, int]:
        counts, self.calls, self.rows = (self.calls, self.rows), 0, 0
        return counts


def build(config: dict, device: torch.device, dtype: torch.dtype) -> DiffusersModel:
    """The adapter around a random UNet (in `dtype`) and VAE (float32: decoding is not what we time).
    No text encoder: every method gets the same prompt embeddings."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config["unet"]).to(device, dtype)
    vae = AutoencoderKL(latent_channels=4, **config["vae"]).to(device)
    model = DiffusersModel(unet, vae, None, None, dict(DDPMParallelScheduler(**SCHEDULER).config))
    return model.eval().requires_grad_(False)


def inputs(model: DiffusersModel, config: dict, steps: int, seeds: list[int], dtype, device):
    """Initial latents (B, 4, h, w), prompt embeddings (positive, negative) (B, L, D), all in `dtype`,
    and each step's noise (N, B, 4, h, w), drawn exactly as the ParaDiGMS pipeline draws it from
    `noise_generators(seeds)`: per sample and step, one (1, 4, h, w) normal in `dtype` on the CPU."""
    shape = model.latent_shape(model.spec.size_px, model.spec.size_px)
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    gen = torch.Generator().manual_seed(10_000 + seeds[0])
    embeds = [torch.randn((len(seeds), *config["text"]), generator=gen) for _ in range(2)]
    gens = noise_generators(seeds)
    noises = torch.stack([torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in gens]) for _ in range(steps)])
    return x.to(device, dtype), [e.to(device, dtype) for e in embeds], noises.to(device)


def noise_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(20_000 + s) for s in seeds]


def run_config(model, pipe, counter, config, sampler: str, steps: int, args, dtype, device) -> list[dict]:
    seeds = [args.seed + i for i in range(args.batch)]
    x, embeds, noises = inputs(model, config, steps, seeds, dtype, device)
    schedule = Schedule.create(model.spec.schedule, model.spec.train_timesteps, "trailing", steps)
    step = make_step(sampler, schedule, model.spec.prediction, model.spec.clip_sample)
    text = [TextEncoding(e, e[:, 0], torch.ones(e.shape[:2], dtype=torch.bool, device=device)) for e in embeds]
    denoise, cond = cfg_denoiser(model, args.guidance), (text[0], text[1])
    states, noises = x.float(), noises.float() if sampler == "ddpm" else None  # the same values, in float32
    pipe.scheduler = PARALLEL_SCHEDULERS[sampler].from_config(pipe.scheduler.config)
    for rows in (2 * len(x), 2 * args.window * len(x)):  # kernel selection happens on a batch size's first call
        model(x[:1].repeat(rows, 1, 1, 1), schedule.timesteps[:1].to(device).repeat(rows), type(text[0]).cat([text[0][:1]] * rows))
    counter.reset()

    def paradigms(tolerance):
        return pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], latents=x.clone(), num_inference_steps=steps,
                    parallel=args.window, tolerance=tolerance, guidance_scale=args.guidance,
                    generator=noise_generators(seeds), output_type="latent").images

    methods = {"sequential": lambda: sample(denoise, states, schedule, step, noises, cond),
               f"socarrat picard tol={args.tolerance:g}":
                   lambda: sample_picard(denoise, states, schedule, step, noises, cond, args.window, args.tolerance)[0]}
    methods.update({f"diffusers paradigms tol={tol:g}": (lambda tol=tol: paradigms(tol)) for tol in args.ref_tolerances})
    rows, seq = [], None
    for name, method in methods.items():
        out, wall = timed(method)
        calls, evaluated = counter.reset()
        pixels = to_uint8(model.decode(out.float()))
        if seq is None:
            seq, seq_pixels, seq_wall = out.float(), pixels, wall
        diff = pixels - seq_pixels
        rows.append({"config": f"{sampler.upper()}-{steps}", "method": name, "wall_s": wall, "speedup": seq_wall / wall,
                     "rounds": calls, "evaluations": evaluated // 2 if args.guidance != 1 else evaluated,
                     "rms_latent": (out.float() - seq).pow(2).mean().sqrt().item(),
                     "rms_uint8": diff.pow(2).mean().sqrt().item(), "max_uint8": int(diff.abs().max()), "window": args.window})
    return rows


HEADER = (f"{'config':9} {'method':30} {'wall s':>8} {'speedup':>7} {'rounds':>6} {'evals':>6} "
          f"{'RMS lat':>8} {'RMS u8':>7} {'max u8':>6}")


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(f"{r['config']:9} {r['method']:30} {r['wall_s']:8.2f} {r['speedup']:6.2f}x {r['rounds']:6d} "
              f"{r['evaluations']:6d} {r['rms_latent']:8.4f} {r['rms_uint8']:7.2f} {r['max_uint8']:6d}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=list(CONFIGS), default=None, help="default: sd15 on a GPU, tiny on the CPU")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--steps-list", default=None, help="sampler:steps,... (default: the config's)")
    p.add_argument("--window", type=int, default=32, help="states per round, both methods")
    p.add_argument("--tolerance", type=float, default=SamplerSpec().tolerance, help="Socarrat Picard's tolerance")
    p.add_argument("--ref-tolerances", default="0.1,0.05", help="ParaDiGMS tolerances (0.1: diffusers' default)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="benchmarks/results/picard_sd.json")
    args = p.parse_args(argv)
    args.ref_tolerances = [float(t) for t in args.ref_tolerances.split(",") if t]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = args.config or ("sd15" if device.type == "cuda" else "tiny")
    config, dtype = CONFIGS[name], torch.float16 if device.type == "cuda" else torch.float32
    model = build(config, device, dtype)
    pipe = StableDiffusionParadigmsPipeline(vae=model.vae, text_encoder=None, tokenizer=None, unet=model.unet,
                                            scheduler=DDPMParallelScheduler(**SCHEDULER), safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    counter = CallCounter(model.unet)
    print(f"config {name}: UNet {sum(p.numel() for p in model.unet.parameters()) / 1e6:.1f}M params, {dtype}, "
          f"latents {model.latent_shape(model.spec.size_px, model.spec.size_px)}, device {device}, batch {args.batch}, "
          f"guidance {args.guidance}, window {args.window}\n")
    print(HEADER + "\n" + "-" * len(HEADER))
    rows = []
    with torch.inference_mode():
        for item in (args.steps_list or config["steps"]).split(","):
            sampler, steps = item.split(":")
            config_rows = run_config(model, pipe, counter, config, sampler, int(steps), args, dtype, device)
            print_rows(config_rows)
            rows += config_rows
    pending = [] if name == "sd15" and device.type == "cuda" else [
        f"sd15 on one H100 ({CONFIGS['sd15']['steps']}): pending GPU, run `python -m benchmarks.picard_sd --config sd15`"]
    print("".join(f"\n{line}" for line in pending))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": name, "device": str(device), "dtype": str(dtype), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "argv": sys.argv[1:]}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "pending": pending}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
