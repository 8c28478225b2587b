"""Samplers: pure functions of (denoise, noise, schedule, step). No Ray, no I/O, no models.

`denoise(x, t, cond) -> model_output` takes x (B, C, H, W), t (B,) long timesteps and whatever
conditioning the caller's model wants; `cfg_denoiser` wraps a model into one with classifier-free
guidance. All randomness is drawn up front by `draw_noise` from per-sample seeds, so a sample never
depends on what else is in its batch (beyond float rounding, which can differ with the batch's
shape, most under bf16 autocast), and the Picard sampler can replay the same trajectory.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from socarrat.sampling.schedules import Schedule
from socarrat.sampling.solvers import StepFn, make_step

Denoise = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]

__all__ = ["Denoise", "Schedule", "StepFn", "cfg_denoiser", "draw_noise", "make_step", "sample"]


def sample(
    denoise: Denoise,
    x: torch.Tensor,
    schedule: Schedule,
    step: StepFn,
    noises: torch.Tensor | None,
    cond: Any,
    progress: bool = False,
) -> torch.Tensor:
    """Run `step` over `schedule` from x (B, C, H, W); noises (N, B, C, H, W) or None (ODE solvers)."""
    for i, t in enumerate(tqdm(schedule.timesteps.tolist(), disable=not progress, desc="sampling")):
        t_batch = torch.full((len(x),), t, device=x.device, dtype=torch.long)
        x = step(x, denoise(x, t_batch, cond), i, None if noises is None else noises[i])
    return x


def cfg_denoiser(model: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], guidance: float) -> Denoise:
    """Classifier-free guidance: cond is (positive, negative) conditioning, each indexable per sample
    and concatenable with `type(cond).cat`. Guidance 1 evaluates the positive prompt alone. Outputs
    are combined in float32: under bf16 autocast out_pos - out_neg would cancel in 8 bits."""

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: tuple[Any, Any]) -> torch.Tensor:
        positive, negative = cond
        if guidance == 1:
            return model(x, t, positive).float()
        both = type(positive).cat([positive, negative])
        out_pos, out_neg = model(torch.cat([x, x]), torch.cat([t, t]), both).float().chunk(2)
        return out_neg + guidance * (out_pos - out_neg)

    return denoise


def draw_noise(
    seeds: Sequence[int], shape: tuple[int, int, int], steps: int, stochastic: bool, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Initial state (B, C, H, W) and, for stochastic solvers, every step's noise (N, B, C, H, W).

    Drawn on the CPU from one torch.Generator per sample, so the same seed gives the same image on
    any device and in any batch.
    """
    xs, noises = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        xs.append(torch.randn(shape, generator=gen))
        if stochastic:
            noises.append(torch.randn((steps, *shape), generator=gen))
    x = torch.stack(xs).to(device)
    return x, (torch.stack(noises, dim=1).to(device) if stochastic else None)
