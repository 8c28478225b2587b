"""The Paella sampler over discrete tokens, and its editing operations.

Paella (arXiv 2211.07292, and dome272/Paella's `sample`) starts from random tokens and, for a few
steps, predicts the clean tokens, samples them with a temperature and classifier-free guidance,
and re-noises a shrinking fraction with the starting tokens. Here that is one step function
`x_next = step(x, logits, i, noise_i)` on a `TokenSchedule`, so `socarrat.sampling.sample` runs it
as is, and `sample_picard` runs it as an exact Jacobi iteration (`picard.py`).

All randomness is drawn up front per sample (`draw_token_noise`): the starting tokens, one uniform
per token and step for the categorical draw (inverse CDF), one per token and step for the re-noise
mask. Sampling is then a fixed map of the step index, so a parallel fixed-point iteration reaches
the IDENTICAL tokens, and a sample does not depend on the rest of its batch, provided the model's
logits for a state are the same whatever else is in its batch. Float32 kernels do not promise that:
a different batch size can move logits by ~1e-5 (measured on the CPU), and a token whose uniform
lies that close to a CDF boundary then flips (4 of 1,024 tokens in one measured case).

Editing: `constrain` pins known tokens (inpainting, and outpainting: inpainting of a larger
canvas), `TokenSchedule.create(..., start=k)` begins at step k, from an image's noised tokens
(structural editing), `restart_with` makes an edit re-noise back to its own first state, and
`lerp_text` interpolates between two prompts. Unlike the reference, no typical filtering of the
logits (its mass 0.2): temperature and guidance alone shape the draws. Pure torch; no models, no I/O.
Shapes: tokens (B, h, w) long; logits (B, K, h, w); noise_i (B, 3, h, w) float in [0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from socarrat.errors import UserError
from socarrat.sampling import Denoise, StepFn
from socarrat.sampling.solvers import PerStep


def noise_fraction(t: torch.Tensor, train_timesteps: int) -> torch.Tensor:
    """Fraction of tokens replaced at timestep t (any shape) -> float64 in [0, 1]: 0 at t = 0,
    all at t = T - 1. Paella's cos(pi/2 * r) with r = 1 - t / (T - 1)."""
    return torch.sin(torch.pi / 2 * t.double() / (train_timesteps - 1)).clamp(0, 1)


@dataclass(frozen=True)
class TokenSchedule:
    """Per sampling step i: the model's timestep and the fraction re-noised after the step."""

    timesteps: torch.Tensor  # (N,) long, descending (from T - 1 unless sampling starts part-way)
    renoise: torch.Tensor  # (N,) float64; 0 after the last step

    def __len__(self) -> int:
        return len(self.timesteps)

    @staticmethod
    def create(train_timesteps: int, steps: int, renoise_steps: int | None = None, start: int = 0) -> TokenSchedule:
        """`steps` steps at Paella's levels r = i / steps; the first `renoise_steps` (default all
        but the last) re-noise to the next step's level. `start` > 0 drops the first steps: sampling
        then begins from tokens noised to `timesteps[0]` (structural editing)."""
        if not 1 <= steps <= train_timesteps:
            raise UserError(f"steps must be in 1..{train_timesteps}, got {steps}")
        if not 0 <= start < steps:
            raise UserError(f"start must be in 0..{steps - 1}, got {start}")
        levels = ((1 - torch.arange(steps + 1, dtype=torch.float64) / steps) * (train_timesteps - 1)).round().long()
        renoise = noise_fraction(levels[1:], train_timesteps)
        renoise[steps - 1 if renoise_steps is None else min(renoise_steps, steps):] = 0
        return TokenSchedule(levels[start:steps], renoise[start:])


def draw_token_noise(seeds: Sequence[int], shape: tuple[int, int], steps: int, codebook_size: int,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Starting tokens (B, h, w) long and every step's uniforms (N, B, 3, h, w): the categorical
    draw, the re-noise mask, and the starting tokens' own uniform (re-noising puts those back, as
    Paella's renoise_mode 'start'). Drawn on the CPU, one torch.Generator per seed."""
    starts, noises = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        start = torch.rand(shape, generator=gen, dtype=torch.float64)
        draws = torch.rand((steps, 2, *shape), generator=gen, dtype=torch.float64)
        starts.append(start)
        noises.append(torch.cat([draws, start.expand(steps, 1, *shape)], dim=1))
    tokens = uniform_to_token(torch.stack(starts), codebook_size)
    return tokens.to(device), torch.stack(noises, dim=1).to(device)


def uniform_to_token(u: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Uniforms in [0, 1) (any shape) -> uniformly distributed token ids, long."""
    return (u * codebook_size).long().clamp(max=codebook_size - 1)


def renoise(tokens: torch.Tensor, fraction: float | torch.Tensor, noise_i: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Paella's re-noising with a step's draws noise_i (B, 3, h, w): each token of (B, h, w) becomes
    its starting token where the step's re-noise uniform is below `fraction` (a float, or (B, 1, 1))."""
    return torch.where(noise_i[:, 1] < fraction, uniform_to_token(noise_i[:, 2], codebook_size), tokens)


def make_token_step(schedule: TokenSchedule, temperature: tuple[float, float], start: int = 0) -> StepFn:
    """Paella's step: sample the clean tokens from logits / temperature (linear from the first to
    the last value over the steps), then re-noise `schedule.renoise[i]` of them with the starting
    tokens. The draws are inverse-CDF on the pre-drawn uniforms, so the step is deterministic.
    start > 0: `schedule` is the tail of a `start + len(schedule)`-step one (structural editing),
    whose temperatures the steps keep."""
    n = start + len(schedule)
    temperatures = torch.linspace(temperature[0], temperature[1], n).tolist()[start:]  # n = 1: the first
    inv_temperatures = PerStep([1 / t for t in temperatures])  # multiplied, never divided: see PerStep
    fractions = PerStep(schedule.renoise.tolist())

    def step(x: torch.Tensor, logits: torch.Tensor, i: int | torch.Tensor, noise_i: torch.Tensor) -> torch.Tensor:
        k, logits = logits.shape[1], logits.double()
        cdf = (logits * inv_temperatures(i, logits)).softmax(1).cumsum(1).permute(0, 2, 3, 1).contiguous()
        picked = torch.searchsorted(cdf, noise_i[:, :1].permute(0, 2, 3, 1).contiguous(), right=True)[..., 0].clamp(max=k - 1)
        return renoise(picked, fractions(i, noise_i[:, 1]), noise_i, k)

    return step


def restart_with(noises: torch.Tensor, start: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Pre-drawn noises (N, B, 3, h, w) whose re-noising puts back `start` (B, h, w) long instead of the
    seed's random tokens: an edit's first state (kept tokens where pinned, an image's noised tokens
    for structural editing), Paella's renoise mode 'start' with the edit's init_x. Re-noised to random
    tokens, the kept context would be hidden from the model until the last steps."""
    noises = noises.clone()
    noises[:, :, 2] = (start.to(noises.dtype) + 0.5) / codebook_size  # uniform_to_token gives back start
    return noises


def constrain(denoise: Denoise) -> Denoise:
    """A denoiser for inpainting: cond is (known (B, h, w) long, keep (B, h, w) bool, the inner
    denoiser's cond). Its logits are one-hot on `known` wherever `keep`, so every step draws those
    tokens. Known tokens travel in cond, so Picard's per-row indexing (`take_rows`) keeps them aligned."""

    def constrained(x: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor, Any]) -> torch.Tensor:
        known, keep, inner = cond
        logits = denoise(x, t, inner)
        pinned = torch.full_like(logits, float("-inf")).scatter_(1, known[:, None], 0.0)
        return torch.where(keep[:, None], pinned, logits)

    return constrained


def lerp_text(a: Any, b: Any, weight: float | torch.Tensor) -> Any:
    """Conditioning between two prompts' encodings (`TextEncoding`s (B, L, D) of equal shape): token
    and pooled embeddings interpolated by weight (a float or (B,)), a token present where either
    prompt has one."""
    w = torch.as_tensor(weight, dtype=a.pooled.dtype, device=a.pooled.device).reshape(-1, 1)
    return type(a)(torch.lerp(a.tokens, b.tokens, w[..., None]), torch.lerp(a.pooled, b.pooled, w), a.mask | b.mask)
