"""Closed-loop load on the Serve endpoint against the model-only batched loop, in the same run.

    python -m benchmarks.serve_load        # no GPU: small CPU config (default model, DDIM-10, DDPM-100 Picard)
    python -m benchmarks.serve_load        # a GPU: issue 6's config (default model, DDIM-50, DDPM-1000 Picard)

Model-only: `Generator.generate` in this process, no HTTP, no PNG. Its batch size is the fastest of
1, 4 and --max-batch-images (the most Serve puts in one model call; on a GPU the largest, on a CPU
not always). Serve: `deployments.text_to_image` on a local Ray cluster, one model replica. For each
concurrency C, C clients each send a request (n=1) as soon as their previous one is answered, for
--duration-s; 503s are counted and retried at once. Each level is compared with a model-only loop
(and, at C=1, a one-image latency) measured just before it, so that a shared machine's changing load
hits both sides alike. Then Picard against sequential sampling at concurrency 1.
Device-independent figures beside the times: images per model call, model evaluations per image
(steps, doubled by classifier-free guidance) and Picard's rounds and evaluations.
On the CPU the replica and the model-only loop get one thread each, as a 1-CPU Ray actor does, while
the clients, the HTTP proxy and the ingress share the remaining cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
import requests
import torch
from ray import serve

from deployments.text_to_image import AppArgs, build_app
from socarrat.config import SamplerSpec
from socarrat.generator import Generator

ROOT = Path(__file__).resolve().parents[1]
H100 = "pending GPU"
PROMPTS = (ROOT / "examples" / "prompts.txt").read_text().splitlines()
GPU_DEFAULTS = {"steps": 50, "duration_s": 20.0, "picard_steps": 1000, "picard_requests": 5}
CPU_DEFAULTS = {"steps": 10, "duration_s": 8.0, "picard_steps": 100, "picard_requests": 3}


def _sync(gen: Generator) -> None:
    if gen.device.type == "cuda":
        torch.cuda.synchronize()


def one_image_latency(gen: Generator, spec: SamplerSpec) -> float:
    """Median of 5 single-image calls."""
    latencies = []
    for seed in range(5):
        t0 = time.perf_counter()
        gen.generate([PROMPTS[seed]], [seed], spec)
        _sync(gen)
        latencies.append(time.perf_counter() - t0)
    return statistics.median(latencies)


def batched_loop(gen: Generator, spec: SamplerSpec, batch: int, duration_s: float) -> dict:
    """Back-to-back calls of `batch` images for `duration_s`."""
    images, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < duration_s:
        gen.generate([PROMPTS[(images + i) % len(PROMPTS)] for i in range(batch)], list(range(images, images + batch)), spec)
        images += batch
    _sync(gen)
    wall = time.perf_counter() - t0
    return {"images": images, "wall_s": wall, "images_per_s": images / wall, "images_per_call": batch}


def closed_loop(url: str, body: dict, concurrency: int, duration_s: float) -> dict:
    """`concurrency` clients sending requests back to back until `duration_s` has passed."""
    start = time.perf_counter()
    deadline = start + duration_s

    def client(worker: int) -> list[tuple[int, float, int]]:
        session, answers = requests.Session(), []
        while time.perf_counter() < deadline:
            seed = worker * 1_000_000 + len(answers)
            t0 = time.perf_counter()
            r = session.post(url, json={**body, "prompt": PROMPTS[seed % len(PROMPTS)], "seed": seed})
            batch = r.json()["metadata"]["timings"]["batch_size"] if r.status_code == 200 else 0
            answers.append((r.status_code, time.perf_counter() - t0, batch))
        return answers

    with ThreadPoolExecutor(concurrency) as pool:
        answers = [a for per_client in pool.map(client, range(concurrency)) for a in per_client]
    wall = time.perf_counter() - start
    ok = [(latency, batch) for status, latency, batch in answers if status == 200]
    latencies = np.array([latency for latency, _ in ok])
    return {
        "concurrency": concurrency, "requests": len(answers), "ok": len(ok),
        "rejected_503": sum(status == 503 for status, _, _ in answers),
        "other_errors": sum(status not in (200, 503) for status, _, _ in answers),
        "wall_s": wall, "images_per_s": len(ok) / wall,
        **{f"p{q}_s": float(np.percentile(latencies, q)) for q in (50, 95, 99)},
        "images_per_call": float(np.mean([batch for _, batch in ok])),
    }


def picard_vs_sequential(url: str, steps: int, requests_count: int) -> dict:
    """p50 latency of DDPM-`steps` at concurrency 1, with and without Picard."""
    out = {}
    for mode, picard in (("sequential", False), ("picard", True)):
        latencies, meta = [], {}
        for seed in range(requests_count):
            t0 = time.perf_counter()
            r = requests.post(url, json={"prompt": PROMPTS[seed], "seed": seed, "sampler": "ddpm", "steps": steps, "picard": picard})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            meta = r.json()["metadata"]
        out[mode] = {"p50_s": statistics.median(latencies), "mode": meta["mode"], "picard": meta.get("picard")}
    out["speedup"] = out["sequential"]["p50_s"] / out["picard"]["p50_s"]
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_app(args, gpu: bool) -> str:
    """The endpoint on a fresh local Ray cluster; returns its generations URL."""
    ray.init(address="local", num_cpus=None if gpu else os.cpu_count(), include_dashboard=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs(
        model_uri=args.model, num_gpus=1 if gpu else 0, max_batch_images=args.max_batch_images,
        max_steps=max(args.steps, args.picard_steps), max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests)), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}/v1/images/generations"


def print_table(title: str, loops: list[dict], levels: list[dict], picard: dict, evals: int, picard_steps: int) -> None:
    print(f"\n{title}; {evals} model evaluations per image")
    print("model-only images/s, batches of " + ", ".join(f"{loop['images_per_call']}: {loop['images_per_s']:.2f}" for loop in loops))
    print(f"{'clients':>7}{'requests':>9}{'images/s':>10}{'loop':>8}{'vs loop':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
          f"{'503 rate':>9}{'img/call':>9}")
    for r in levels:
        print(f"{r['concurrency']:>7}{r['requests']:>9}{r['images_per_s']:>10.2f}{r['model_only_images_per_s']:>8.2f}"
              f"{r['vs_model_only']:>8.0%}{r['p50_s'] * 1e3:>9.1f}{r['p95_s'] * 1e3:>9.1f}{r['p99_s'] * 1e3:>9.1f}"
              f"{r['rejected_503'] / r['requests']:>9.1%}{r['images_per_call']:>9.1f}")
    one, top = _summary(levels)
    print(f"concurrency 1: p50 {one['p50_s'] * 1e3:.1f} ms - model-only one image {one['model_only_latency_s'] * 1e3:.1f} ms "
          f"= {(one['p50_s'] - one['model_only_latency_s']) * 1e3:+.1f} ms (target <= +15 ms)")
    print(f"saturated ({top['concurrency']} clients): {top['vs_model_only']:.0%} of the model-only loop (target >= 90%)")
    s, p = picard["sequential"], picard["picard"]
    print(f"DDPM-{picard_steps}, 1 client: sequential p50 {s['p50_s']:.2f} s, Picard p50 {p['p50_s']:.2f} s "
          f"({p['mode']}, {p['picard']}), speedup {picard['speedup']:.2f}x (target >= 5x)")
    print(f"H100 (default model, DDIM-50, concurrency 1..64; DDPM-1000 Picard): {H100}")


def _summary(levels: list[dict]) -> tuple[dict, dict]:
    """The concurrency-1 level and the level with the highest throughput."""
    return next(r for r in levels if r["concurrency"] == 1), max(levels, key=lambda r: r["images_per_s"])


def measure_levels(url: str, gen: Generator, spec: SamplerSpec, batch: int, concurrency: list[int], duration_s: float) -> list[dict]:
    levels = []
    for c in concurrency:
        loop = batched_loop(gen, spec, batch, duration_s / 2)
        level = {"model_only_images_per_s": loop["images_per_s"],
                 "model_only_latency_s": one_image_latency(gen, spec) if c == 1 else None}
        level |= closed_loop(url, {"steps": spec.steps}, c, duration_s)
        levels.append(level | {"vs_model_only": level["images_per_s"] / loop["images_per_s"]})
    return levels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the bundled default model (shapes-gaussian)")
    p.add_argument("--steps", type=int, help="DDIM steps (GPU 50, CPU 10)")
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    p.add_argument("--duration-s", type=float, help="per concurrency level (GPU 20, CPU 8)")
    p.add_argument("--max-batch-images", type=int, default=16)
    p.add_argument("--max-ongoing-requests", type=int, default=32)
    p.add_argument("--max-queued-requests", type=int, default=64)
    p.add_argument("--picard-steps", type=int, help="DDPM steps for Picard vs sequential (GPU 1000, CPU 100)")
    p.add_argument("--picard-requests", type=int)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    for key, value in (GPU_DEFAULTS if gpu else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.picard_requests < 1:
        p.error(f"--picard-requests must be >= 1 (a p50 needs a request), got {args.picard_requests}")
    if not gpu:
        torch.set_num_threads(1)  # as in the 1-CPU replica, where Ray sets OMP_NUM_THREADS=1

    spec = SamplerSpec(steps=args.steps)
    evals = args.steps * (2 if spec.guidance != 1 else 1)  # classifier-free guidance doubles each step's batch
    gen = Generator.load(args.model)
    gen.generate(PROMPTS[:args.max_batch_images], list(range(args.max_batch_images)), spec)  # first-call allocations
    loops = [batched_loop(gen, spec, b, args.duration_s / 2) for b in sorted({1, min(4, args.max_batch_images), args.max_batch_images})]
    batch = max(loops, key=lambda loop: loop["images_per_s"])["images_per_call"]
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores), 1 thread for the model"
    url = serve_app(args, gpu)
    try:
        requests.post(url, json={"prompt": PROMPTS[0], "steps": args.steps}).raise_for_status()  # warm-up
        levels = measure_levels(url, gen, spec, batch, [int(c) for c in args.concurrency.split(",")], args.duration_s)
        picard = picard_vs_sequential(url, args.picard_steps, args.picard_requests)
    finally:
        serve.shutdown()
        ray.shutdown()

    print_table(f"Serve load, {gen.name}, DDIM-{args.steps}, on {device}", loops, levels, picard, evals, args.picard_steps)
    one, top = _summary(levels)
    result = {
        "device": device, "model": gen.name, "steps": args.steps, "evals_per_image": evals,
        "duration_s_per_level": args.duration_s, "max_batch_images": args.max_batch_images,
        "max_ongoing_requests": args.max_ongoing_requests, "max_queued_requests": args.max_queued_requests,
        "model_only_loops": loops, "model_only_batch": batch, "serve": levels,
        "picard": {"steps": args.picard_steps, **picard},
        "saturated_vs_model_only": top["vs_model_only"],
        "c1_p50_minus_model_only_ms": (one["p50_s"] - one["model_only_latency_s"]) * 1e3,
        "h100": H100,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
