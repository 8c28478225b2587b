"""Noise schedules (betas, alphas_cumprod) and timestep spacings.

A `Schedule` is everything a solver needs about time: the model's timestep at each sampling step
and the signal level (alpha_bar) before and after it. Pure torch; no models, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from socarrat.errors import UserError


def alphas_cumprod(kind: Literal["linear", "cosine", "scaled_linear"], train_timesteps: int) -> torch.Tensor:
    """alpha_bar[t] for t in [0, T): (T,) float64, decreasing from ~1."""
    if kind == "linear":  # DDPM (Ho et al. 2020), rescaled to T as in improved DDPM
        scale = 1000 / train_timesteps  # below T = 21 the last betas would reach 1 (alpha_bar 0): clipped at 0.999
        betas = torch.linspace(scale * 1e-4, scale * 0.02, train_timesteps, dtype=torch.float64).clamp(max=0.999)
        return torch.cumprod(1 - betas, dim=0)
    if kind == "scaled_linear":  # Stable Diffusion's (latent diffusion's): sqrt(beta) linear, not rescaled
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, train_timesteps, dtype=torch.float64) ** 2
        return torch.cumprod(1 - betas, dim=0)
    if kind == "cosine":  # Nichol & Dhariwal 2021, eq. 17, betas clipped at 0.999
        s = 0.008
        f = torch.cos((torch.arange(train_timesteps + 1, dtype=torch.float64) / train_timesteps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        return torch.cumprod(1 - betas, dim=0)
    raise UserError(f"schedule must be 'linear', 'cosine' or 'scaled_linear', got {kind!r}")


def spaced_timesteps(spacing: Literal["leading", "trailing", "linspace"], train_timesteps: int, steps: int) -> torch.Tensor:
    """The `steps` model timesteps to visit, descending (long). Spacings as defined in
    "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al. 2023), table 2."""
    if not 1 <= steps <= train_timesteps:
        raise UserError(f"steps must be in 1..{train_timesteps}, got {steps}")
    T = train_timesteps
    if spacing == "leading":
        ts = torch.arange(steps, dtype=torch.float64) * (T // steps)
    elif spacing == "trailing":
        ts = (T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round().flip(0) - 1
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64)
    else:
        raise UserError(f"spacing must be leading, trailing or linspace, got {spacing!r}")
    return ts.round().long().flip(0)


@dataclass(frozen=True)
class Schedule:
    """Per sampling step i: the model's timestep, alpha_bar at it, and alpha_bar after the step.

    The step after the last one lands on clean data (alpha_bar = 1); every other step lands on the
    next visited timestep, never on a fixed stride `t - T // steps`, which is wrong for trailing
    and linspace spacings.
    """

    timesteps: torch.Tensor  # (N,) long, descending
    alpha_bar: torch.Tensor  # (N,) float64
    alpha_bar_next: torch.Tensor  # (N,) float64

    def __len__(self) -> int:
        return len(self.timesteps)

    @staticmethod
    def create(kind: str, train_timesteps: int, spacing: str, steps: int) -> Schedule:
        ac = alphas_cumprod(kind, train_timesteps)
        ts = spaced_timesteps(spacing, train_timesteps, steps)
        alpha_bar = ac[ts]
        return Schedule(ts, alpha_bar, torch.cat([alpha_bar[1:], torch.ones(1, dtype=torch.float64)]))
