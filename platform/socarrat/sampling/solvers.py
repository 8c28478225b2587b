"""Solvers, each ONE step function `x_next = step(x, model_output, i, noise_i)`.

The sequential loop (`socarrat.sampling.sample`) and the Picard sampler call the same step
functions, so the converged Picard answer is the sequential one. A step is built for a schedule and
a parameterisation by `make_step`. Pure torch; no models, no I/O.
Shapes: x, model_output, noise_i (B, C, H, W) float; i an int step index, or a (B,) long tensor
giving each row its own step (Picard steps a whole window of states in one call). Both forms do the
same float arithmetic: a row's result does not depend on which form computed it.

A step may also carry `step.guess(x, out, steps, noises)`: with steps (K, B) long, each row's next K
steps from the one x is at (steps[0]), the K states they lead to ((K, B, ...)) if the model kept
predicting the x0 (and eps) that `out` implies at x, with the steps' own noises ((K, B, ...) or
None). Picard starts the states entering its windows from it.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from socarrat.errors import UserError
from socarrat.sampling.schedules import Schedule

StepFn = Callable[[torch.Tensor, torch.Tensor, "int | torch.Tensor", "torch.Tensor | None"], torch.Tensor]


class PerStep:
    """A table of per-step coefficients, computed in float64, read as a step needs them: at an int
    step the Python float, at a tensor of steps (B,) or (K, B) a tensor of that shape followed by
    ones to the dimensions of `like`, in its dtype.
    Either way the float64 value is rounded once to that dtype, and steps only multiply by them (a
    GPU divides by a scalar as by its reciprocal, by a tensor exactly), so a row gets the same
    arithmetic from both forms. Tables are kept per device and dtype: a read copies nothing."""

    def __init__(self, values: list[float]):
        self.values = values
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if (device, dtype) not in self._tables:
            self._tables[device, dtype] = torch.tensor(self.values, dtype=torch.float64).to(device, dtype)
        return self._tables[device, dtype]

    def __call__(self, i: int | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
        if not isinstance(i, torch.Tensor):
            return self.values[i]
        return self.table(like.device, like.dtype)[i.to(like.device)].view(*i.shape, *[1] * (like.dim() - i.dim()))


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
    pairs = list(zip(schedule.alpha_bar.tolist(), schedule.alpha_bar_next.tolist()))
    sqrt_a, sqrt_1a = PerStep([a**0.5 for a, _ in pairs]), PerStep([(1 - a) ** 0.5 for a, _ in pairs])
    inv_sqrt_a, inv_sqrt_1a = PerStep([a**-0.5 for a, _ in pairs]), PerStep([(1 - a) ** -0.5 for a, _ in pairs])
    sqrt_an, sqrt_1an = PerStep([n**0.5 for _, n in pairs]), PerStep([(1 - n) ** 0.5 for _, n in pairs])
    # DDPM's posterior mean c_x0 * x0 + c_x * x and deviation, with the spaced step's beta = 1 - a / n
    c_x0 = PerStep([n**0.5 * (1 - a / n) / (1 - a) for a, n in pairs])
    c_x = PerStep([(a / n) ** 0.5 * (1 - n) / (1 - a) for a, n in pairs])
    sigma = PerStep([ddpm_sigma(a, n) for a, n in pairs])

    def x0_eps(x, out, i):
        out = out.to(x.dtype)  # a bf16 model output: the same float32 arithmetic for both forms of i
        a, s = sqrt_a(i, x), sqrt_1a(i, x)
        if prediction == "eps":
            x0, eps = (x - s * out) * inv_sqrt_a(i, x), out
        else:  # v = a * eps - s * x0 (Salimans & Ho 2022)
            x0, eps = a * x - s * out, s * x + a * out
        if clip_sample:
            x0 = x0.clamp(-1, 1)
            eps = (x - a * x0) * inv_sqrt_1a(i, x)
        return x0, eps

    def ddim(x, out, i, noise_i=None):
        x0, eps = x0_eps(x, out, i)
        return sqrt_an(i, x) * x0 + sqrt_1an(i, x) * eps

    def ddpm(x, out, i, noise_i):
        x0, _ = x0_eps(x, out, i)
        return c_x0(i, x) * x0 + c_x(i, x) * x + sigma(i, x) * noise_i

    # Picard's initial guess (`guess`, above): the chain from x with the x0 (and eps) that `out`
    # implies at x held fixed, in closed form, a handful of launches for any length and any rows.
    def ddim_guess(x, out, steps, noises=None):
        x0, eps = x0_eps(x, out, steps[0])
        return sqrt_an(steps, x0[None]) * x0 + sqrt_1an(steps, x0[None]) * eps  # a DDIM jump to each level

    def ddpm_guess(x, out, steps, noises):
        x0, _ = x0_eps(x, out, steps[0])
        # x[k+1] = c_x[k] x[k] + drive[k], with drive[k] = c_x0[k] x0 + sigma[k] noise[k], unrolled:
        # x[k+1] = sum over m of W[k, m] * ([x] + drive)[m], W a table of products of c_x per row.
        drive = torch.cat([x[None], c_x0(steps, x0[None]) * x0 + sigma(steps, x0[None]) * noises])
        w = chain_weights(c_x.table(x.device, torch.float64)[steps.to(x.device)]).to(x.dtype)
        return torch.einsum("kmb,mb...->kb...", w, drive)

    steps = {"ddim": (ddim, ddim_guess), "ddpm": (ddpm, ddpm_guess)}
    if sampler not in steps:
        raise UserError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    step, step.guess = steps[sampler]
    return step


def chain_weights(c: torch.Tensor) -> torch.Tensor:
    """For x[k+1] = c[k] x[k] + d[k] (k = 0..K-1), c (K, B), one chain per column: W (K, K+1, B) with
    x[k+1] = W[k, 0] x[0] + sum over m of W[k, m+1] d[m], i.e. W[k, j] = prod of c[j..k] (1 for
    j = k + 1, 0 beyond)."""
    k, j = torch.arange(len(c), device=c.device)[:, None, None], torch.arange(len(c) + 1, device=c.device)[None, :, None]
    return torch.where(k >= j, c[:, None], torch.ones_like(c[:, None])).cumprod(0) * (j <= k + 1)


def ddpm_sigma(alpha_bar: float, alpha_bar_next: float) -> float:
    """Standard deviation of the DDPM posterior between two signal levels (0 onto clean data)."""
    return ((1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)) ** 0.5
