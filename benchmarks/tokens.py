"""Token family vs Gaussian family: images/s at equal batch, and when exact parallel sampling pays.

Part 1 generates the same prompts with a token model (paella, `--token-steps`, default 12) and a
Gaussian model (DDIM, `--gaussian-steps`, default 50) at the same batch size and reports images/s,
model evaluations per image and sequential model calls per batch. Part 2 samples with the token
model sequentially and by exact parallel (Jacobi) sampling at several windows and temperatures,
checks that the tokens are identical, and reports rounds (model calls one after another) against
steps, and evaluations: a state is accepted only when not one of its tokens changed, so rounds fall
below steps only where the sampler is nearly deterministic (low temperature, confident model).
"Identical" counts images equal to the sequential ones: the fixed point is the sequential result
exactly when the model's logits for a state do not depend on what else is in its batch; float32
kernels reassociate by batch size (logits move by ~1e-5), which flips a token whose pre-drawn
uniform lies that close to a CDF boundary. Rounds and evaluations do not depend on the device; times do.

    python -m benchmarks.tokens --token runs/token-64/step-00004000 --device cpu --threads 1 --batch-size 8
    python -m benchmarks.tokens --device cuda --batch-size 64          # bundled models, the H100 run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.picard import timed
from socarrat.config import SamplerSpec
from socarrat.datasets.shapes import evaluation_prompts
from socarrat.generator import Generator, picard_totals
from socarrat.models import parameter_count


def timed_generate(gen: Generator, prompts: list[str], spec: SamplerSpec, repeats: int) -> tuple[float, list]:
    """Best wall seconds of `repeats` generate calls (after one warm-up) and the last results."""
    results, best = gen.generate(prompts, list(range(len(prompts))), spec), float("inf")
    for _ in range(repeats):
        results, wall_s = timed(lambda: gen.generate(prompts, list(range(len(prompts))), spec))
        best = min(best, wall_s)
    return best, results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--token", default="shapes-token", help="token-family model")
    p.add_argument("--gaussian", default="shapes-gaussian", help="Gaussian-family model")
    p.add_argument("--token-steps", type=int, default=12)
    p.add_argument("--gaussian-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--windows", default="3,6,12", help="parallel sampling windows")
    p.add_argument("--temperatures", default="1.0:0.5,0.5:0.25,0.1:0.1",
                   help="first:last sampling temperatures to run the parallel sampler at")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="benchmarks/results/tokens.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = [caption for caption, _ in evaluation_prompts(args.batch_size)]
    token, gaussian = Generator.load(args.token, args.device), Generator.load(args.gaussian, args.device)

    rows = []
    for gen, spec in ((gaussian, SamplerSpec(sampler="ddim", steps=args.gaussian_steps)),
                      (token, SamplerSpec(sampler="paella", steps=args.token_steps))):
        wall_s, _ = timed_generate(gen, prompts, spec, args.repeats)
        evals = spec.steps * (2 if spec.guidance != 1 else 1)  # CFG doubles each step's batch
        rows.append({"model": gen.name, "sampler": f"{spec.sampler}-{spec.steps}", "wall_s": wall_s,
                     "images_per_s": len(prompts) / wall_s, "evals_per_image": evals, "model_calls": spec.steps,
                     "images_per_call": len(prompts), "params_m": parameter_count(gen.model) / 1e6})
    speedup = rows[1]["images_per_s"] / rows[0]["images_per_s"]

    parallel = []
    for temperature in [tuple(map(float, pair.split(":"))) for pair in args.temperatures.split(",")]:
        base = SamplerSpec(steps=args.token_steps, temperature=temperature)
        sequential_s, reference = timed_generate(token, prompts, base, args.repeats)
        parallel.append({"temperature": temperature, "window": 1, "rounds": args.token_steps, "wall_s": sequential_s,
                         "evaluations": args.token_steps * len(prompts), "speedup": 1.0, "identical": len(prompts)})
        for window in map(int, args.windows.split(",")):
            spec = base.model_copy(update={"picard": True, "window": window})
            wall_s, results = timed_generate(token, prompts, spec, args.repeats)
            same = sum(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(results, reference))
            stats = picard_totals(results)
            parallel.append({"temperature": temperature, "window": window, "rounds": stats["rounds"], "wall_s": wall_s,
                             "evaluations": stats["evaluations"], "speedup": sequential_s / wall_s, "identical": same})

    print(f"\nToken vs Gaussian family, batch {len(prompts)}, on {args.device}")
    print("| model | sampler | params M | wall s | images/s | evals/image | sequential model calls | images/call |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['sampler']} | {r['params_m']:.1f} | {r['wall_s']:.3f} | {r['images_per_s']:.1f} | "
              f"{r['evals_per_image']} | {r['model_calls']} | {r['images_per_call']} |")
    print(f"token / gaussian images/s: {speedup:.2f}x (target >= 3x on the same GPU and batch)")
    print(f"\nExact parallel sampling of paella-{args.token_steps} (tokens identical to sequential), batch {len(prompts)}")
    print("| temperature | window | rounds | steps | evaluations (batch) | wall s | vs sequential | images identical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in parallel:
        print(f"| {r['temperature'][0]} -> {r['temperature'][1]} | {r['window']} | {r['rounds']} | {args.token_steps} | "
              f"{r['evaluations']} | {r['wall_s']:.3f} | {r['speedup']:.2f}x | {r['identical']}/{len(prompts)} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "batch_size": len(prompts), "families": rows,
                               "speedup": speedup, "parallel": parallel, "argv": sys.argv[1:]}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
