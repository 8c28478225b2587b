"""Solvers, each ONE step function `x_next = step(x, model_output, i, noise_i)`.

The sequential loop (`socarrat.sampling.sample`) and the Picard sampler call the same step
functions, so the converged Picard answer is the sequential one. A step is built for a schedule and
a parameterisation by `make_step`. Pure torch; no models, no I/O.
Shapes: x, model_output, noise_i (B, C, H, W) float; i an int step index.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from socarrat.errors import UserError
from socarrat.sampling.schedules import Schedule

StepFn = Callable[[torch.Tensor, torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]


def predict_x0_eps(x: torch.Tensor, out: torch.Tensor, alpha_bar: float, prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) implied by the model output at signal level alpha_bar (eps- or v-prediction)."""
    a, s = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if prediction == "eps":
        return (x - s * out) / a, out
    return a * x - s * out, s * x + a * out  # v = a * eps - s * x0 (Salimans & Ho 2022)


def make_step(
    sampler: Literal["ddim", "ddpm"],
    schedule: Schedule,
    prediction: Literal["eps", "v"],
    clip_sample: bool = True,
) -> StepFn:
    """The step function of `sampler` on `schedule`.

    DDIM (eta = 0) moves to alpha_bar_next along the predicted eps and ignores noise_i. DDPM samples
    the posterior q(x_next | x, x0) (Ho et al. 2020, eq. 7) with its own noise_i, so a run is
    reproducible from the noise drawn up front.
    """
    alpha_bar, alpha_bar_next = schedule.alpha_bar.tolist(), schedule.alpha_bar_next.tolist()

    def x0_eps(x, out, i):
        x0, eps = predict_x0_eps(x, out, alpha_bar[i], prediction)
        if clip_sample:
            x0 = x0.clamp(-1, 1)
            eps = (x - alpha_bar[i] ** 0.5 * x0) / (1 - alpha_bar[i]) ** 0.5
        return x0, eps

    def ddim(x, out, i, noise_i=None):
        x0, eps = x0_eps(x, out, i)
        return alpha_bar_next[i] ** 0.5 * x0 + (1 - alpha_bar_next[i]) ** 0.5 * eps

    def ddpm(x, out, i, noise_i):
        x0, _ = x0_eps(x, out, i)
        a, a_next = alpha_bar[i], alpha_bar_next[i]
        beta = 1 - a / a_next  # the spaced step's beta
        mean = (a_next**0.5 * beta * x0 + (a / a_next) ** 0.5 * (1 - a_next) * x) / (1 - a)
        return mean + ddpm_sigma(a, a_next) * noise_i

    if sampler == "ddim":
        return ddim
    if sampler == "ddpm":
        return ddpm
    raise UserError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")


def ddpm_sigma(alpha_bar: float, alpha_bar_next: float) -> float:
    """Standard deviation of the DDPM posterior between two signal levels (0 onto clean data)."""
    return ((1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)) ** 0.5
