"""Picard (ParaDiGMS) sampling: many denoising steps in one batched model call.

Sequential sampling is the chain x[j+1] = step(x[j], denoise(x[j], t[j]), j, noise[j]). Picard
iteration (Shih et al. 2023, arXiv 2305.16317) guesses a window of future states, evaluates the
model on all of them in ONE batched call, recomputes the window from those outputs, and slides past
every leading state that no longer changes by more than `tolerance`. The noise is drawn up front
(`draw_noise`), so the fixed point is the sequential trajectory: at tolerance 0 the result equals
`sample`'s up to float rounding, and window 1 is the sequential loop itself.

`sample_picard` takes the same `denoise`, `schedule`, `step`, `noises` and `cond` as
`socarrat.sampling.sample`. Pure torch: no Ray, no I/O, no models (`socarrat.parallel` spreads the
window over Ray actors by passing its own `denoise`).

Where it departs from the reference (diffusers' ParaDiGMS pipeline), each measured against a
faithful copy of it in `benchmarks/picard.py`:
1. Stopping rule. The reference divides a state's squared change by the DDPM posterior variance of
   the next step. That variance is ~1 at the noisiest steps and shrinks with the step size, so the
   same tolerance accepts large early changes, which a deterministic solver (DDIM) carries to the
   final image (ParaDiGMS at tolerance 0.05 on DDIM-50: RMS 7-11 uint8 from sequential), and it
   means something else at 50 and at 1000 steps. We measure the change of y = x / sqrt(alpha_bar),
   the variable DDIM integrates (Song et al. 2021, eq. 14; the x/s of Karras et al. 2022). A DDIM
   step maps a change of y through r I + (1 - r) dD/dy and a DDPM step through r^2 I + (1 - r^2)
   dD/dy (r = sigma_next / sigma, D the denoised image): about the identity along the directions
   that hold the image's content (dD/dy ~ I), more where the sampler picks between modes. A change
   of y thus reaches the final image (y = x at alpha_bar = 1) undiminished, for ODE and SDE solvers
   alike, and `tolerance` bounds how far each accepted state can move the final image, in its
   units (RMS; [-1, 1] for pixels), whatever the solver, step count and spacing. Measured: at equal
   rounds this kept DDIM within ~1 uint8 of sequential where the reference's rule is off by 3-19,
   and a rule that forgives early DDPM errors (the Gaussian-data gain) was off by 17-22. Where the
   model chooses between shapes, though, dD/dy is large and a change grows, and an ODE solver keeps
   all of it: with the sharper GPU-trained model, at 2e-3, 3 of 12 DDIM-200 images ended 6-17 uint8
   RMS from sequential (an edge a pixel over; DDPM: within 0.15). So a step carries an `error_gain`
   (solvers.py) by which the tolerance is divided: 10 for DDIM, which brought all 12 within 3 (11
   within 0.13) for 4.5 more rounds on DDIM-200 and 1.8 on DDIM-50; 1 for DDPM (BENCHMARKS.md).
2. Initial guess. States entering a window start where the window's last state would go if the
   model's x0 (and eps) prediction there held (`step.guess`: for DDIM a jump along x0 and eps to
   each later level, for DDPM the posterior chain with the steps' own noise, both in closed form)
   instead of copying that state: DDPM-1000 95 -> 66 rounds, DDIM-200 18 -> 14 (measured with the
   step chain under a frozen model output, which the closed form replaced at 52 against 54 rounds
   on DDPM-1000 and the same 19 and 14 on DDIM-200 and DDIM-50).
3. Per-sample windows. Each sample slides its own window and stops when done, so its image and its
   rounds do not depend on the rest of the batch, and finished samples cost no evaluations.
4. Discrete states. For token models (`tokens.py`) a state is an integer grid and a step is a
   deterministic function of it, the draws being pre-drawn: the loop is then a Jacobi iteration
   (each guess replaced by its step's output; a sum of drifts means nothing for tokens) that
   accepts a state only when it came out unchanged, and reaches the sequential tokens exactly.
5. Host work. A round runs its window through the step function in one call (each row at its own
   step) and the guess in closed form: 154 tensor operations a round outside the model on
   DDPM-1000 (109 on DDIM-50), against ~1,200 (~450) for the reference loop and 1,521 (581) for the
   state-by-state loop this replaced. On a GPU each is a kernel launch, and those launches cost the
   replaced loop more than the model call itself.
Tried and dropped (ParaTAA, arXiv 2402.09970): rerunning the step chain with lagged model outputs
instead of adding drifts took ~13% fewer rounds on DDPM-1000, but its changes understate the error,
which added up to 2.4-3 uint8 at tolerances where the drift form stays under 0.5; triangular
Anderson acceleration of the window cut no rounds on our model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from socarrat.errors import UserError
from socarrat.sampling import Denoise
from socarrat.sampling.schedules import Schedule
from socarrat.sampling.solvers import StepFn


@dataclass
class PicardStats:
    """rounds: model calls one after another; evaluations: states evaluated, summed over the batch
    (CFG's two passes count once, as in `sample`); windows: states evaluated in each round;
    sample_rounds and sample_evaluations: each sample's own (the round its last state was accepted
    in, and its states evaluated), which do not depend on the rest of the batch."""

    rounds: int = 0
    evaluations: int = 0
    windows: list[int] = field(default_factory=list)
    sample_rounds: list[int] = field(default_factory=list)
    sample_evaluations: list[int] = field(default_factory=list)


def take_rows(cond: Any, index: torch.Tensor) -> Any:
    """Rows `index` (R,) long of batch conditioning: None stays None, a tuple (such as CFG's
    (positive, negative)) is taken element-wise, anything else is indexed (`TextEncoding`, tensors)."""
    if cond is None:
        return None
    if isinstance(cond, tuple):
        return tuple(take_rows(c, index) for c in cond)
    return cond[index]


def sample_picard(
    denoise: Denoise,
    x: torch.Tensor,
    schedule: Schedule,
    step: StepFn,
    noises: torch.Tensor | None,
    cond: Any,
    window: int,
    tolerance: float,
    progress: bool = False,
) -> tuple[torch.Tensor, PicardStats]:
    """Picard iteration over `step` from x (B, C, H, W) float, or (B, h, w) long tokens; noises
    (N, B, ...) or None (ODE solvers); cond: B rows, see `take_rows`. Each round evaluates up to
    `window` states per sample; `tolerance` is the accepted RMS change of a state in final-image
    units, divided by `step.error_gain` if the step has one (module docstring); token states are
    accepted only when unchanged, whatever the tolerance.
    Returns the final state (the shape of x) and the stats."""
    if window < 1:
        raise UserError(f"window must be >= 1, got {window}")
    n = len(schedule)
    traj = x[None].repeat(n + 1, *[1] * x.dim())  # (N+1, B, C, H, W): the current guess of every state
    begin = torch.zeros(len(x), dtype=torch.long)  # per sample: states 0..begin are final
    if x.is_floating_point():
        y_scale = torch.cat([schedule.alpha_bar, schedule.alpha_bar_next[-1:]]).sqrt().to(x.device, x.dtype)
    timesteps, stats = schedule.timesteps.to(x.device), PicardStats()
    guess = getattr(step, "guess", None) or partial(_extrapolate, step)  # states entering a window
    threshold = tolerance / getattr(step, "error_gain", 1.0)  # DDIM's: a tenth (module docstring)
    rounds, evaluations = torch.zeros_like(begin), torch.zeros_like(begin)  # per sample
    with tqdm(total=n, disable=not progress, desc="picard") as bar:
        while (begin < n).any():
            # Samples whose windows start at the same step go through `step` together.
            groups = [(s, min(s + window, n), (begin == s).nonzero()[:, 0]) for s in begin.unique().tolist() if s < n]
            j, b = _window_rows(groups)
            out = denoise(traj[j, b], timesteps[j], take_rows(cond, b.to(x.device)))
            stats.rounds, stats.evaluations = stats.rounds + 1, stats.evaluations + len(j)
            stats.windows.append(len(j))
            evaluations += torch.bincount(b, minlength=len(x))
            for (s, e, m), outs in zip(groups, out.split([(e - s) * len(m) for s, e, m in groups])):
                outs = outs.reshape(e - s, len(m), *out.shape[1:])
                old = traj[s:e + 1, m]  # (e - s + 1, M, C, H, W): the base and the window's guesses
                # The whole window in one call of `step` (each row at its own step): one launch per
                # operation, not one per state, which on a GPU costs more than the model call itself.
                rows = torch.arange(s, e, device=x.device).repeat_interleave(len(m))
                noise = None if noises is None else noises[s:e][:, m].flatten(0, 1)
                stepped = step(old[:-1].flatten(0, 1), outs.flatten(0, 1), rows, noise).view_as(old[:-1])
                if x.is_floating_point():
                    # x[s] + cumsum(drift), summed in float64: where the guesses were right it gives
                    # back the steps' own results (diffusers sums in the latents' dtype, fp16 on GPUs).
                    new = (old[0].double() + (stepped.double() - old[:-1].double()).cumsum(0)).to(x.dtype)
                    change = (new - old[1:]).flatten(2).pow(2).mean(-1).sqrt() / y_scale[s + 1:e + 1, None]
                    accepted = threshold
                else:  # tokens: Jacobi, each state its step's output, accepted only if unchanged
                    new = stepped
                    change, accepted = (new != old[1:]).flatten(2).any(-1).float(), 0.0
                traj[s + 1:e + 1, m] = new
                begin[m] = s + _slide(change, accepted)
                stop = min(int(begin[m].max()) + window, n)
                if stop > e:  # guess the states the next windows add
                    later = None if noises is None else noises[e:stop][:, m]
                    traj[e + 1:stop + 1, m] = guess(new[-1], outs[-1], e, stop, later)
            rounds[(begin >= n) & (rounds == 0)] = stats.rounds
            bar.update(int(begin.min()) - bar.n)
    stats.sample_rounds, stats.sample_evaluations = rounds.tolist(), evaluations.tolist()
    return traj[n], stats


def _window_rows(groups: list[tuple[int, int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and sample (R,) long of every state a round evaluates: groups (start, stop, samples)
    one after another, each step-major, as the loop reads them back."""
    steps = [torch.arange(s, e).repeat_interleave(len(m)) for s, e, m in groups]
    samples = [m.repeat(e - s) for s, e, m in groups]
    return torch.cat(steps), torch.cat(samples)


def _extrapolate(step: StepFn, x: torch.Tensor, out: torch.Tensor, start: int, stop: int, noises: torch.Tensor | None) -> torch.Tensor:
    """States start+1..stop after state x (R, ...) if the model kept answering `out`, with the steps'
    own noises ((stop - start, R, ...) or None): the step chain, for steps without a `guess`."""
    states = []
    for k, i in enumerate(range(start, stop)):
        x = step(x, out, i, None if noises is None else noises[k])
        states.append(x)
    return torch.stack(states)


def _slide(change: torch.Tensor, tolerance: float) -> torch.Tensor:
    """How far each sample's window (change: (W, R)) moves: past its leading states within
    tolerance and the first one that is not, which was computed from accepted states (as in the
    reference), at most the whole window."""
    failed = torch.cat([change > tolerance, torch.ones_like(change[:1], dtype=torch.bool)])
    return (failed.int().argmax(0) + 1).clamp(max=len(change)).cpu()
