"""Execution modes of the model calls: fp32 vs bf16, eager vs compiled; images/s and how far the
images move, on the same prompts and seeds.

Each model generates held-out evaluation prompts (one seed each) once per mode on the same device
(`Generator.load(..., precision=..., compile=...)`: `--modes fp32,bf16,fp32+compile,...`), and the
shapes judge scores every image. Reported per model and mode, against the first mode: images/s and
the speedup, the RMS and largest pixel difference of its images (uint8 units), how many are
identical, and how many pass the judge (with the images whose verdict differs). A compiled mode's
warm-up batch also compiles (each new shape once); its time is reported apart. Model calls per image
and rows per call do not depend on the device or the mode; times do. On a GPU "auto" is already
bf16; on a CPU it is fp32, and bf16 pays where the CPU has AMX (Xeon Sapphire Rapids and later),
whose tile units multiply bf16 matrices.

    python -m benchmarks.precision --device cpu --threads 2 --prompts 128 --batch-size 64   # the CPU run
    python -m benchmarks.precision --device cuda --prompts 256 --batch-size 64              # a GPU
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
from socarrat.datasets.shapes import evaluation_prompts, score
from socarrat.generator import DEFAULT_STEPS, Generator


def run(gen: Generator, prompts: list[str], spec: SamplerSpec, batch_size: int) -> tuple[list[np.ndarray], float, float]:
    """The images of `prompts` (seed i for prompt i) in batches, the wall seconds they took, and the
    seconds of an untimed warm-up beforehand: the first and the last batch (compiling their shapes)."""
    seeds = list(range(len(prompts)))
    last = (len(prompts) - 1) // batch_size * batch_size
    _, warm_s = timed(lambda: [gen.generate(prompts[i:i + batch_size], seeds[i:i + batch_size], spec) for i in {0, last}])
    images, wall_s = [], 0.0
    for i in range(0, len(prompts), batch_size):
        results, seconds = timed(lambda: gen.generate(prompts[i:i + batch_size], seeds[i:i + batch_size], spec))
        images += [np.asarray(r.image) for r in results]
        wall_s += seconds
    return images, wall_s, warm_s


def compare(model: str, device: str, prompts: list, batch_size: int, modes: list[str]) -> list[dict]:
    """One model's rows, a mode each, the first mode the baseline."""
    captions = [caption for caption, _ in prompts]
    rows, base = [], None
    for mode in modes:
        precision, _, compiled = mode.partition("+")
        gen = Generator.load(model, device, precision=precision, compile=compiled == "compile")
        spec = gen.resolve(SamplerSpec())
        images, wall_s, warm_s = run(gen, captions, spec, batch_size)
        verdicts = [score(image, prompt_spec).passed for image, (_, prompt_spec) in zip(images, prompts)]
        base = base or {"images": images, "verdicts": verdicts, "images_per_s": len(prompts) / wall_s}
        diff = [a.astype(np.float64) - b for a, b in zip(images, base["images"])]
        rows.append({
            "model": model, "mode": mode, "sampler": f"{spec.sampler}-{spec.steps}", "images": len(prompts),
            "model_calls_per_image": spec.steps, "rows_per_call": batch_size * (1 if spec.guidance == 1 else 2),
            "wall_s": wall_s, "warm_up_s": warm_s, "images_per_s": len(prompts) / wall_s,
            "speedup": len(prompts) / wall_s / base["images_per_s"], "passed": int(sum(verdicts)),
            "rms_uint8": float(np.sqrt(np.mean([np.mean(d**2) for d in diff]))),
            "max_abs_uint8": int(max(np.abs(d).max() for d in diff)),
            "identical": int(sum(not d.any() for d in diff)),
            "verdicts_changed": int(sum(a != b for a, b in zip(verdicts, base["verdicts"]))),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="shapes-gaussian,shapes-hdit,shapes-token", help="comma-separated")
    p.add_argument("--modes", default="fp32,bf16", help="comma-separated PRECISION or PRECISION+compile; "
                   "the first is the baseline")
    p.add_argument("--prompts", type=int, default=64, help="held-out evaluation prompts, one seed each")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="benchmarks/results/precision.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = evaluation_prompts(args.prompts)
    modes = args.modes.split(",")
    rows = [row for model in args.models.split(",") for row in compare(model, args.device, prompts, args.batch_size, modes)]

    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: None)()
    where = args.device if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads, AMX: {amx})"
    print(f"\nModel calls in {', '.join(modes)} on {where}, {args.prompts} held-out prompts, batch {args.batch_size}, "
          f"default samplers ({', '.join(f'{k} {v}' for k, v in DEFAULT_STEPS.items())} steps); against {modes[0]}")
    print("| model | sampler | model calls/image | rows/call | mode | warm-up s | img/s | speedup | RMS uint8 | max "
          "| identical | judge passes | verdicts changed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['sampler']} | {r['model_calls_per_image']} | {r['rows_per_call']} | {r['mode']} | "
              f"{r['warm_up_s']:.1f} | {r['images_per_s']:.2f} | {r['speedup']:.2f}x | {r['rms_uint8']:.2f} | "
              f"{r['max_abs_uint8']} | {r['identical']}/{r['images']} | {r['passed']} | {r['verdicts_changed']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "amx": amx,
                               "torch": torch.__version__, "rows": rows, "argv": sys.argv[1:]}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
