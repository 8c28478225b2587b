"""Mass-generation job throughput against the model-only batched loop, and 2 x 0.5 against 1 x 1.0 workers.

    python -m benchmarks.generate                       # small CPU config (tiny model, 192 prompts, DDIM-10)
    python -m benchmarks.generate --prompts-count 10000 --steps 50 --batch-size 64 --shard-size 1024  # issue 5's H100 target

Model-only loop: `Generator.generate` over the same prompts, seeds and spec in batches of
--batch-size, in this process: no Ray, no PNG encoding, no writes. Job: `jobs.generate.run` on a
local Ray cluster into a fresh folder; the cluster is started before the clock (a cluster is up
before a job is submitted), everything else (driver model check, reading and planning, actor start
and model load, rendering, PNG encoding, publishing) is on it.

Workers: one worker holding a whole device against two sharing it (num_gpus 0.5 each). On the CPU,
the device is one core: Ray is restarted pinned to core 0 with one logical CPU, so both workers (and
Ray itself) share that core. PNG encoding and writes then compete with the model for the same core,
so the CPU figure shows what splitting the device costs, never the overlap gain a GPU can give.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray
import torch

from jobs.generate import GenerateJob, run
from socarrat.config import SamplerSpec
from socarrat.generator import Generator

ROOT = Path(__file__).resolve().parents[1]
H100 = "pending GPU"


def write_prompts(path: Path, count: int) -> list[tuple[str, int]]:
    """`count` rows cycling through the example prompts, each with its own id and seed."""
    base = (ROOT / "examples" / "prompts.txt").read_text().splitlines()
    rows = [(base[i % len(base)], i) for i in range(count)]
    path.write_text("".join(json.dumps({"id": f"p{i:06d}", "prompt": p, "seed": s}) + "\n" for i, (p, s) in enumerate(rows)))
    return rows


def model_only(gen: Generator, rows: list[tuple[str, int]], spec: SamplerSpec, batch_size: int) -> dict:
    gen.generate([rows[0][0]], [rows[0][1]], spec)  # warm-up: first-call allocations are not throughput
    t0 = time.perf_counter()
    calls = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        gen.generate([p for p, _ in batch], [s for _, s in batch], spec)
        calls += 1
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"images": len(rows), "wall_s": wall, "images_per_s": len(rows) / wall, "model_calls": calls}


def job_run(args, prompts: Path, workers: int, share: float) -> dict:
    with tempfile.TemporaryDirectory() as out:
        job = GenerateJob(
            prompts=str(prompts), out=out, model=args.model, spec=SamplerSpec(steps=args.steps),
            batch_size=args.batch_size, shard_size=args.shard_size, min_workers=workers, max_workers=workers,
            num_gpus_per_worker=share if args.gpu else 0, num_cpus_per_worker=1 if args.gpu else share)
        s = run(job)
    assert s["images_generated"] == args.prompts_count, s
    # End to end, start-up included (the summary's images_per_s counts the shard stage only).
    return {**s, "images_per_s": s["images_generated"] / s["wall_s"]}


def row(name: str, r: dict, base: float, evals: int) -> str:
    per_call = r["images"] / r["model_calls"]
    return (f"{name:<36}{r['images']:>7}{r['wall_s']:>9.1f}{r['images_per_s']:>10.2f}{r['images_per_s'] / base:>9.0%}"
            f"{r['model_calls']:>7}{per_call:>10.1f}{evals:>7}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the bundled default model (shapes-gaussian)")
    p.add_argument("--prompts-count", type=int, default=192)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generate.json"))
    args = p.parse_args()
    args.gpu = torch.cuda.is_available()
    spec = SamplerSpec(steps=args.steps)
    evals = args.steps * (2 if spec.guidance != 1 else 1)  # per image: CFG doubles each step's batch
    if not args.gpu:
        torch.set_num_threads(1)  # as in a 1-CPU actor, where Ray sets OMP_NUM_THREADS=1

    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        rows = write_prompts(prompts, args.prompts_count)
        gen = Generator.load(args.model)
        first = model_only(gen, rows, spec, args.batch_size)
        device = torch.cuda.get_device_name() if args.gpu else f"CPU ({os.cpu_count()} cores), 1 thread per worker"

        ray.init(num_cpus=None if args.gpu else 2, include_dashboard=False)
        one = job_run(args, prompts, 1, 1.0)
        ray.shutdown()
        cores = os.sched_getaffinity(0)
        if not args.gpu:
            os.sched_setaffinity(0, {min(cores)})  # Ray's processes inherit it
        ray.init(num_cpus=None if args.gpu else 1, include_dashboard=False)
        whole = job_run(args, prompts, 1, 1.0)
        halves = job_run(args, prompts, 2, 0.5)
        ray.shutdown()
        os.sched_setaffinity(0, cores)
        # Timed again after the jobs, and the faster kept: other load on the machine comes and goes.
        base = min(first, model_only(gen, rows, spec, args.batch_size), key=lambda r: r["wall_s"])

    job = {**one, "images": one["images_generated"]}
    print(f"\nmass generation, {gen.name}, DDIM-{args.steps}, batch {args.batch_size}, shard {args.shard_size}, on {device}")
    print(f"{'':<36}{'images':>7}{'wall s':>9}{'images/s':>10}{'vs loop':>9}{'calls':>7}{'img/call':>10}{'evals':>7}")
    print(row("model-only loop (no Ray)", base, base["images_per_s"], evals))
    print(row("job, 1 worker x 1.0", job, base["images_per_s"], evals))
    busy = one["render_s"] + one["encode_s"] + one["publish_s"]
    steady = {**job, "wall_s": busy, "images_per_s": job["images"] / busy}
    print(row("  its actor busy time only", steady, base["images_per_s"], evals))
    account = {k: one[k] for k in ("startup_s", "render_s", "encode_s", "publish_s")}
    account["actor start + scheduling_s"] = one["stage_s"] - one["render_s"] - one["encode_s"] - one["publish_s"]
    print("  job wall time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in account.items()))
    share = "core" if not args.gpu else "GPU"
    note = "" if args.gpu else " (CPU: Ray pinned to it; encoding shares the core, so no overlap gain is possible)"
    print(f"\none {share}{note}:")
    for name, r in (("1 worker x 1.0", whole), ("2 workers x 0.5", halves)):
        r = {**r, "images": r["images_generated"]}
        print(row(f"job, {name} {share}", r, whole["images_per_s"], evals) + "   (vs 1 x 1.0)")
    print(f"\nH100 (default model, DDIM-50, 10,000 prompts): {H100}")

    result = {
        "device": device, "model": gen.name, "steps": args.steps, "batch_size": args.batch_size,
        "shard_size": args.shard_size, "prompts": args.prompts_count, "evals_per_image": evals,
        "model_only": base, "job_1x1": one, "job_vs_model_only": one["images_per_s"] / base["images_per_s"],
        "actor_busy_vs_model_only": steady["images_per_s"] / base["images_per_s"],
        "job_wall_accounting_s": account, "one_device": {"1x1.0": whole, "2x0.5": halves,
                                                         "ratio": halves["images_per_s"] / whole["images_per_s"]},
        "load_average_1m_at_end": os.getloadavg()[0], "h100": H100,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
