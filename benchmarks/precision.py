"""fp32 vs bf16 model calls: images/s and how far the images move, on the same prompts and seeds.

Each model generates held-out evaluation prompts (one seed each) twice on the same device, with its
model calls in fp32 and under bf16 autocast (`Generator.load(..., precision=...)`), and the shapes
judge scores both. Reported per model: images/s of each and the speedup, the RMS and largest pixel
difference of the bf16 images from the fp32 ones (uint8 units), how many are identical, and how
many pass the judge in each (with the images whose verdict differs). Model calls per image and
images per model call do not depend on the device or the precision; times do. On a GPU "auto" is
already bf16; on a CPU it is fp32, and bf16 pays where the CPU has AMX (Xeon Sapphire Rapids and
later), whose tile units multiply bf16 matrices.

    python -m benchmarks.precision --device cpu --threads 2 --prompts 64            # the CPU run
    python -m benchmarks.precision --device cuda --prompts 256 --batch-size 64      # a GPU
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


def run(gen: Generator, prompts: list[str], spec: SamplerSpec, batch_size: int) -> tuple[list[np.ndarray], float]:
    """The images of `prompts` (seed i for prompt i) in batches, after one untimed warm-up batch,
    and the wall seconds they took."""
    seeds = list(range(len(prompts)))
    gen.generate(prompts[:batch_size], seeds[:batch_size], spec)
    images, wall_s = [], 0.0
    for i in range(0, len(prompts), batch_size):
        results, seconds = timed(lambda: gen.generate(prompts[i:i + batch_size], seeds[i:i + batch_size], spec))
        images += [np.asarray(r.image) for r in results]
        wall_s += seconds
    return images, wall_s


def compare(model: str, device: str, prompts: list, batch_size: int) -> dict:
    """One model's row: fp32 and bf16 side by side."""
    captions = [caption for caption, _ in prompts]
    out: dict = {"model": model}
    images = {}
    for precision in ("fp32", "bf16"):
        gen = Generator.load(model, device, precision=precision)
        spec = gen.resolve(SamplerSpec())
        images[precision], wall_s = run(gen, captions, spec, batch_size)
        passed = [score(image, prompt_spec).passed for image, (_, prompt_spec) in zip(images[precision], prompts)]
        out[precision] = {"wall_s": wall_s, "images_per_s": len(prompts) / wall_s, "passed": int(sum(passed))}
        out[f"{precision}_verdicts"] = passed
    cfg_rows = 1 if spec.guidance == 1 else 2
    diff = [a.astype(np.float64) - b for a, b in zip(images["bf16"], images["fp32"])]
    out |= {
        "sampler": f"{spec.sampler}-{spec.steps}", "images": len(prompts),
        "model_calls_per_image": spec.steps, "rows_per_call": batch_size * cfg_rows,
        "speedup": out["bf16"]["images_per_s"] / out["fp32"]["images_per_s"],
        "rms_uint8": float(np.sqrt(np.mean([np.mean(d**2) for d in diff]))),
        "max_abs_uint8": int(max(np.abs(d).max() for d in diff)),
        "identical": int(sum(not d.any() for d in diff)),
        "verdicts_changed": int(sum(a != b for a, b in zip(out.pop("fp32_verdicts"), out.pop("bf16_verdicts")))),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="shapes-gaussian,shapes-hdit,shapes-token", help="comma-separated")
    p.add_argument("--prompts", type=int, default=64, help="held-out evaluation prompts, one seed each")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="benchmarks/results/precision.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = evaluation_prompts(args.prompts)
    rows = [compare(model, args.device, prompts, args.batch_size) for model in args.models.split(",")]

    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: None)()
    where = args.device if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads, AMX: {amx})"
    print(f"\nfp32 vs bf16 model calls on {where}, {args.prompts} held-out prompts, batch {args.batch_size}, "
          f"default samplers ({', '.join(f'{k} {v}' for k, v in DEFAULT_STEPS.items())} steps)")
    print("| model | sampler | model calls/image | rows/call | fp32 img/s | bf16 img/s | speedup | RMS uint8 | max "
          "| identical | judge passes fp32 / bf16 | verdicts changed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['sampler']} | {r['model_calls_per_image']} | {r['rows_per_call']} | "
              f"{r['fp32']['images_per_s']:.2f} | {r['bf16']['images_per_s']:.2f} | {r['speedup']:.2f}x | "
              f"{r['rms_uint8']:.2f} | {r['max_abs_uint8']} | {r['identical']}/{r['images']} | "
              f"{r['fp32']['passed']} / {r['bf16']['passed']} | {r['verdicts_changed']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "amx": amx,
                               "torch": torch.__version__, "rows": rows, "argv": sys.argv[1:]}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
