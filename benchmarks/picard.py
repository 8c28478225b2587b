"""Picard benchmark: sequential vs Socarrat Picard vs a faithful ParaDiGMS loop, side by side.

For each solver/step count (default DDPM-1000, DDIM-200, DDIM-50) it samples one prompt at batch 1
(or `--batch N` of the shapes evaluation prompts) with the same model, noise and execution mode
three ways (Socarrat Picard at each of `--tolerances`, side by side) and reports wall time,
sequential rounds (model calls one after another; `img rd`: the mean of each image's own), model
evaluations, agreement with the sequential images (RMS over the batch, the `worst` image's RMS and
the max pixel difference, in uint8 levels) and the shapes judge's score (% of images doing what
their prompt asks). Rounds, evaluations and `ops/rd` (tensor operations a round runs outside the
model call: on a GPU, each about one kernel launch, which for small models costs more than the
arithmetic) do not depend on the device; times do. With `--actors 1,2` it also runs Socarrat Picard
(at the first tolerance) over groups of K Ray actors (`socarrat.parallel`) and times one round's
model call (a full window) in-process and through each group: with K=1 the difference is the pure
scatter/gather overhead. With `--compile` every in-process method's model calls run under
torch.compile (`socarrat.generator.CompiledModel`: CUDA graphs on a GPU), the sequential baseline's
as well; the actor groups' run eager.

    python benchmarks/picard.py --model shapes-gaussian --device cpu --threads 1
    python benchmarks/picard.py --device cuda --window 64          # the H100 run

`paradigms` below is the reference algorithm of Shih et al. 2023 (arXiv 2305.16317) as diffusers'
`StableDiffusionParadigmsPipeline` runs it, on our schedule and step functions (so without that
pipeline's fixed-stride timestep and precision defects): one window for the whole batch, new
states initialised to the window's last state, x[b] + cumsum(drift), and a step accepted while its
squared change per element, divided by the DDPM posterior variance of the next step, is below
tolerance^2.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from socarrat.config import SamplerSpec
from socarrat.datasets.shapes import evaluation_prompts, score
from socarrat.generator import Generator, model_precision
from socarrat.models import parameter_count
from socarrat.sampling import cfg_denoiser, draw_noise, make_step, sample
from socarrat.sampling.picard import PicardStats, sample_picard, take_rows
from socarrat.sampling.schedules import Schedule
from socarrat.sampling.solvers import ddpm_sigma


def paradigms(denoise, x, schedule, step, noises, cond, window, tolerance):
    """The ParaDiGMS sliding-window Picard loop (diffusers' pipeline, see the module docstring)."""
    n = len(schedule)
    traj = x[None].repeat(n + 1, *[1] * x.dim())
    sigma = [ddpm_sigma(a, b) for a, b in zip(schedule.alpha_bar.tolist(), schedule.alpha_bar_next.tolist())]
    inv_var = 1 / torch.tensor(sigma[1:] + [0.0], dtype=torch.float64, device=x.device)  # 1/0 = inf: the last state
    stats, begin = PicardStats(), 0
    while begin < n:
        end = min(begin + window, n)
        states = traj[begin:end].flatten(0, 1)
        t = schedule.timesteps[begin:end].to(x.device).repeat_interleave(len(x))
        rows = torch.arange(len(x), device=x.device).repeat(end - begin)
        out = denoise(states, t, take_rows(cond, rows)).view(end - begin, *x.shape)
        noise = [None if noises is None else noises[j] for j in range(begin, end)]
        drift = torch.stack([step(traj[j], out[j - begin], j, noise[j - begin]) - traj[j] for j in range(begin, end)])
        new = traj[begin][None] + drift.cumsum(0)
        error = (new - traj[begin + 1:end + 1]).flatten(2).pow(2).mean(-1).double() * inv_var[begin:end, None]
        failed = (error > tolerance**2).any(1).tolist() + [True]  # one window for the whole batch
        traj[begin + 1:end + 1] = new
        new_begin = min(begin + failed.index(True) + 1, end)
        traj[end + 1:min(new_begin + window, n) + 1] = traj[end]
        stats.rounds, stats.evaluations = stats.rounds + 1, stats.evaluations + len(states)
        stats.windows.append(len(states))
        begin = new_begin
    return traj[n], stats


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


class _CountOps(TorchDispatchMode):
    in_model = False  # set while a `model_call` runs: its operations are the model's, not counted

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not _CountOps.in_model
        return func(*args, **(kwargs or {}))


def uncounted(denoise):
    """`denoise`, whose own tensor operations `tensor_ops` leaves out: what a method runs around
    the model is counted exactly, whatever the batch size of each call."""
    def model_call(*args):
        _CountOps.in_model = True
        try:
            return denoise(*args)
        finally:
            _CountOps.in_model = False
    return model_call


def tensor_ops(fn) -> int:
    """How many tensor operations `fn` dispatches (aten ops) outside `uncounted` model calls: on a
    GPU each is about one kernel launch, and for small models the launches, not the arithmetic,
    set the time of a round."""
    with _CountOps() as counter:
        fn()
    return counter.count


def median_ms(fn, repeats: int = 7) -> float:
    return 1000 * sorted(timed(fn)[1] for _ in range(repeats))[repeats // 2]


def run_config(gen: Generator, sampler: str, steps: int, prompts: list[str], groups: dict, args) -> list[dict]:
    model, device = gen.model, gen.device
    schedule = Schedule.create(gen.spec.schedule, gen.spec.train_timesteps, args.spacing, steps)
    step = make_step(sampler, schedule, gen.spec.prediction, gen.spec.clip_sample)
    seeds = [args.seed + i for i in range(len(prompts))]
    x, noises = draw_noise(seeds, gen.image_shape(SamplerSpec()), steps, sampler == "ddpm", device)
    cond = (model.encode(prompts), model.encode([""] * len(prompts)))
    denoise = uncounted(cfg_denoiser(gen.calls, args.guidance))  # compiled once for every config

    def model_call(size: int) -> tuple:
        """(x, t, rows) of a model call on `size` states cycling through the batch."""
        index = torch.arange(size, device=device) % len(x)
        return x[index], schedule.timesteps[:1].to(device).repeat(size), index

    # The first call at a new batch size pays one-time kernel selection: warm up both sizes.
    for size in (len(x), args.window * len(x)):
        xs, ts, index = model_call(size)
        denoise(xs, ts, take_rows(cond, index))

    def row(method, out, stats, wall):
        diff = to_uint8(out) - to_uint8(seq)
        images = to_uint8(out).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        own_rounds = stats.sample_rounds or [stats.rounds] * len(x)  # each image's, where the method says
        return {"method": method, "wall_s": wall, "rounds": stats.rounds, "evaluations": stats.evaluations,
                "mean_image_rounds": sum(own_rounds) / len(own_rounds),
                "rms_uint8": diff.pow(2).mean().sqrt().item(), "max_uint8": int(diff.abs().max()),
                "worst_image_rms_uint8": diff.flatten(1).pow(2).mean(1).sqrt().max().item(),
                "score_pct": 100 * sum(score(img, p).passed for img, p in zip(images, prompts)) / len(prompts)}

    def warm(run):
        """Run the method once untimed, counting its tensor operations, then time it: on a GPU a
        first call at each new batch size pays a one-time kernel selection (compiled: a compilation),
        so the time is the method's, not the order of the rows'."""
        if args.compile:
            run()  # compiled at every shape the method meets before its operations are counted
        ops = tensor_ops(run)
        return timed(run), ops

    (seq, seq_s), ops = warm(lambda: sample(denoise, x, schedule, step, noises, cond))
    rows = [row("sequential", seq, PicardStats(steps, steps * len(x)), seq_s)]
    rows[-1]["host_ops_per_round"] = ops / steps

    def add(method, run):  # an actor group's own work (its scatter and gather) counts as host work
        ((out, stats), wall), ops = warm(run)
        rows.append(row(method, out, stats, wall))
        rows[-1]["host_ops_per_round"] = ops / stats.rounds

    tolerances = args.tolerances or [SamplerSpec().tolerance]
    for tol in tolerances:
        add(f"socarrat picard tol={tol:g}", lambda: sample_picard(denoise, x, schedule, step, noises, cond, args.window, tol))
    local, tolerance = rows[-len(tolerances)], tolerances[0]
    for tol in args.ref_tolerances:
        add(f"paradigms tol={tol:g}", lambda: paradigms(denoise, x, schedule, step, noises, cond, args.window, tol))
    # One round's model call on a full window, in-process and through each group: the difference is
    # the scatter/gather overhead a round pays (K=1: transfer only; K>1 also splits the work).
    xs, ts, index = model_call(args.window * len(x))
    local["round_ms"] = median_ms(lambda: denoise(xs, ts, take_rows(cond, index)))
    for k, group in groups.items():
        with group.conditioned(cond, args.guidance) as (remote, remote_cond):
            add(f"socarrat picard on {k} ray actor(s)",
                lambda: sample_picard(remote, x, schedule, step, noises, remote_cond, args.window, tolerance))
            rows[-1]["round_ms"] = median_ms(lambda: remote(xs, ts, remote_cond[index]))
    for r in rows:
        r.update(config=f"{sampler.upper()}-{steps}", window=args.window, speedup=seq_s / r["wall_s"])
    return rows


def start_groups(gen: Generator, args) -> dict:
    """{K: PicardGroup} for each K in --actors, on Ray CPU actors (or 1/K of the GPU each)."""
    if not args.actors:
        return {}
    import ray

    from socarrat.parallel import PicardGroup

    gpu = gen.device.type == "cuda"
    ray.init(address="local", num_cpus=max(args.actors) + 1, num_gpus=1 if gpu else 0, include_dashboard=False)
    model = args.model or copy.deepcopy(gen.model).cpu()  # the tiny random default is no checkpoint
    return {k: PicardGroup(model, k, num_gpus_per_actor=1 / k if gpu else 0) for k in args.actors}


HEADER = (f"{'config':10} {'method':34} {'wall s':>8} {'speedup':>7} {'rounds':>6} {'img rd':>6} {'evals':>6} "
          f"{'ops/rd':>6} {'RMS u8':>7} {'worst':>6} {'max u8':>6} {'score':>6}")


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        extra = f"  (one round's model call: {r['round_ms']:.0f} ms)" if "round_ms" in r else ""
        print(f"{r['config']:10} {r['method']:34} {r['wall_s']:8.2f} {r['speedup']:6.2f}x {r['rounds']:6d} "
              f"{r['mean_image_rounds']:6.1f} {r['evaluations']:6d} {r['host_ops_per_round']:6.0f} {r['rms_uint8']:7.2f} "
              f"{r['worst_image_rms_uint8']:6.2f} {r['max_uint8']:6d} {r['score_pct']:5.0f}%{extra}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="bundled name, checkpoint dir or s3:// prefix (default: Generator.load())")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--steps-list", default="ddpm:1000,ddim:200,ddim:50", help="sampler:steps,...")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--tolerances", default="", help="Socarrat Picard's tolerances, comma-separated, each run "
                   "side by side (default: SamplerSpec's)")
    p.add_argument("--ref-tolerances", default="0.1,0.05", help="ParaDiGMS tolerances (0.1: diffusers' default)")
    p.add_argument("--spacing", default="trailing")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--prompt", default="a green triangle above a yellow circle")
    p.add_argument("--seed", type=int, default=1, help="of the first image; the i-th has seed + i")
    p.add_argument("--batch", type=int, default=1, help=">1: that many of the shapes evaluation prompts at once")
    p.add_argument("--actors", default="", help="also run over groups of K Ray actors, e.g. 1,2 (1: the pure overhead)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="every method's model calls under torch.compile")
    p.add_argument("--out", default="benchmarks/results/picard.json")
    args = p.parse_args(argv)
    args.ref_tolerances = [float(t) for t in args.ref_tolerances.split(",") if t]
    args.tolerances = [float(t) for t in args.tolerances.split(",") if t]
    args.actors = [int(k) for k in args.actors.split(",") if k]
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = Generator.load(args.model, device=args.device, compile=args.compile)
    groups = start_groups(gen, args)
    prompts = [p for p, _ in evaluation_prompts(args.batch)] if args.batch > 1 else [args.prompt]
    print(f"model {gen.name} ({parameter_count(gen.model) / 1e6:.1f}M params), device {gen.device}, batch {len(prompts)}, "
          f"guidance {args.guidance}, window {args.window}{', compiled' if args.compile else ''}\n")
    print(HEADER + "\n" + "-" * len(HEADER))
    rows = []
    # Generator's execution mode, for every method alike: bf16 autocast on a GPU, fp32 on the CPU.
    with torch.inference_mode(), model_precision(gen.device):
        for item in args.steps_list.split(","):
            sampler, steps = item.split(":")
            config_rows = run_config(gen, sampler, int(steps), prompts, groups, args)
            print_rows(config_rows)
            rows += config_rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": gen.name, "model_digest": gen.digest, "device": str(gen.device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "compiled": args.compile, "argv": sys.argv[1:]}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
