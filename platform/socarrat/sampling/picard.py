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
   model chooses between shapes, though, dD/dy is large and a change grows on its way: with the
   sharper trained models, a state accepted at 2e-3 moved 3 of 12 DDIM-200 images 6-17 uint8 RMS
   from sequential (an edge a pixel over), and DDPM-1000 images up to 18 (a shape drawn otherwise).
   So a state is accepted at a tenth of `tolerance` (ERROR_GAIN), which brought every image
   measured within 3 uint8 (all but one within 0.13) for about a quarter more rounds (BENCHMARKS.md,
   "Picard's stopping rule").
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
5. Host work. A round takes every sample's window through the step function in one call (each row
   at its own step) and the guesses in closed form, as one (window, samples) grid of steps, so its
   tensor operations outside the model do not grow with the batch: 130-170 a round at batch 1 as at
   batch 12, where a loop over the windows' start steps ran 520-720 at batch 12 (124-157 at batch
   1); against ~1,200 (~450) at batch 1 for the reference loop on DDPM-1000 (DDIM-50) and 1,521
   (581) for a state-by-state loop. On a GPU each is a kernel launch, and those launches cost the
   state-by-state loop more than the model call itself.
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


# How much an accepted state's change can grow on its way to the final image where the model chooses
# between shapes, measured on the bundled models for DDIM and DDPM (module docstring, stopping rule).
ERROR_GAIN = 10.0


@dataclass
class PicardStats:
    """rounds: model calls one after another; evaluations: states evaluated, summed over the batch
    (CFG's two passes count once); windows: states evaluated in each round;
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
    `window` states per sample; `tolerance` is how far (RMS, final-image units) the result may be
    from the sequential one: a state is accepted when its change, scaled to the final image, is
    within tolerance / ERROR_GAIN (module docstring); token states only when unchanged.
    Returns the final state (the shape of x) and the stats."""
    if window < 1:
        raise UserError(f"window must be >= 1, got {window}")
    n = len(schedule)
    # The current guess of every state (N+1, B, C, H, W), and `window` rows past the last that take
    # the guesses made past it (written, never read), so that no round has to mask them out.
    traj = x[None].repeat(n + 1 + window, *[1] * x.dim())
    begin = torch.zeros(len(x), dtype=torch.long)  # per sample: states 0..begin are final
    if x.is_floating_point():
        y_scale = torch.cat([schedule.alpha_bar, schedule.alpha_bar_next[-1:]]).sqrt().to(x.device, x.dtype)
    timesteps, stats = schedule.timesteps.to(x.device), PicardStats()
    guess = getattr(step, "guess", None) or partial(_extrapolate, step)  # states entering a window
    threshold = tolerance / ERROR_GAIN
    rounds, evaluations = torch.zeros_like(begin), torch.zeros_like(begin)  # per sample
    lags = torch.arange(window)[:, None]
    with tqdm(total=n, disable=not progress, desc="picard") as bar:
        while len(live := (begin < n).nonzero()[:, 0]):
            # Every live sample's window in one (window, live) grid of steps; the rows past the last
            # step are not evaluated. Index arithmetic on the CPU, then one copy to the device.
            start = begin[live]
            grid = start + lags
            inside = grid < n
            count = inside.sum(0)
            a, k = inside.T.nonzero().T  # sample-major: each sample's window rows together
            evaluated, last = start + count, count.cumsum(0) - 1  # each window's last state, its row
            evaluations.index_add_(0, live, count)
            k, a, j, b = torch.stack([k, a, grid[k, a], live[a]]).to(x.device)
            states = traj[j, b]
            out = denoise(states, timesteps[j], take_rows(cond, b))
            stats.rounds, stats.evaluations = stats.rounds + 1, stats.evaluations + len(j)
            stats.windows.append(len(j))
            # All windows through `step` in one call (each row at its own step): one launch per
            # operation, not one per state or per window, which on a GPU cost more than the model.
            stepped = step(states, out, j, None if noises is None else noises[j, b])
            if x.is_floating_point():
                # x[begin] + cumsum(drift), summed in float64: where the guesses were right it gives
                # back the steps' own results (diffusers sums in the latents' dtype, fp16 on GPUs).
                drift = stepped.new_zeros(grid.shape + x.shape[1:], dtype=torch.float64)
                drift[k, a] = stepped.double() - states.double()
                new = (traj[start, live].double() + drift.cumsum(0))[k, a].to(x.dtype)
                change = (new - traj[j + 1, b]).flatten(1).pow(2).mean(-1).sqrt() / y_scale[j + 1]
                accepted = threshold
            else:  # tokens: Jacobi, each state its step's output, accepted only if unchanged
                new = stepped
                change, accepted = (new != traj[j + 1, b]).flatten(1).any(-1).float(), 0.0
            traj[j + 1, b] = new
            start = (start + _slide(change.new_zeros(grid.shape).index_put((k, a), change), accepted)).clamp(max=n)
            begin[live] = start
            # Guess the states the next windows add, after the last one each window computed.
            ahead = int(((start + window).clamp(max=n) - evaluated).max())
            if ahead > 0:
                later = evaluated + lags[:ahead]  # (ahead, live): states later + 1, past N only in spare rows
                steps = later.clamp(max=n - 1)
                later_noises = None if noises is None else noises[steps, live]
                last, steps = last.to(x.device), steps.to(x.device)
                traj[later + 1, live] = guess(new[last], out[last], steps, later_noises)
            rounds[(begin >= n) & (rounds == 0)] = stats.rounds
            bar.update(int(begin.min()) - bar.n)
    stats.sample_rounds, stats.sample_evaluations = rounds.tolist(), evaluations.tolist()
    return traj[n], stats


def _extrapolate(step: StepFn, x: torch.Tensor, out: torch.Tensor, steps: torch.Tensor, noises: torch.Tensor | None) -> torch.Tensor:
    """The states after x (R, ...) at each row's next steps (K, R) if the model kept answering `out`,
    with the steps' own noises ((K, R, ...) or None): the step chain, for steps without a `guess`."""
    states = []
    for k, i in enumerate(steps):
        x = step(x, out, i, None if noises is None else noises[k])
        states.append(x)
    return torch.stack(states)


def _slide(change: torch.Tensor, tolerance: float) -> torch.Tensor:
    """How far each sample's window (change: (W, R)) moves: past its leading states within
    tolerance and the first one that is not, which was computed from accepted states (as in the
    reference), at most the whole window."""
    failed = torch.cat([change > tolerance, torch.ones_like(change[:1], dtype=torch.bool)])
    return (failed.int().argmax(0) + 1).clamp(max=len(change)).cpu()
