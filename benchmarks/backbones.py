"""Backbone benchmark: forward cost per image of the UNet and HDiT as the image grows, side by side.

Each backbone (random weights) runs one forward at batch `--batch` and each size, in Generator's
execution mode (bf16 autocast on CUDA, fp32 on the CPU). Per image it reports the median time, the
peak memory above the weights (CUDA only) and the matmul FLOPs, counted by FlopCounterMode on the
meta device (device-independent; attention through the math backend so that it is counted), then
the growth of each cost from one size to the next: the side doubles, so 4x is linear in pixels and
16x quadratic. The HDiT target (issue 10) is at most ~4.5x per doubling from 128 to 512 px.

- unet: the bundled shapes-gaussian architecture (global attention at 1/4 of the side);
- hdit: the default HDiTSpec, sized for 32 px (patch 2, two levels: global attention at 1/4 of the
  side), `shapes-hdit`'s architecture (which has no place features: `hdit.absolute_pos` false);
- hdit-4lv: patch 4 and four levels, global attention only at 1/32 of the side (the paper's layout
  for large images), about the UNet's parameter count;
- hdit-4lv-global: hdit-4lv with global attention at every level, the quadratic reference.

    python -m benchmarks.backbones --device cpu --threads 1     # CPU: 32, 64, 128 px, batch 2, fp32
    python -m benchmarks.backbones --device cuda                # H100: 64..512 px, batch 8, bf16
    python -m benchmarks.backbones --eval                       # + shapes-gaussian vs shapes-hdit scores

`--eval` also scores the bundled `shapes-gaussian` and `shapes-hdit` with `jobs.evaluate` (DDIM-50,
guidance 3) and reports their images/s, when `shapes-hdit` is bundled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.picard import median_ms
from socarrat.checkpoint import bundled_models
from socarrat.config import ModelSpec, SamplerSpec
from socarrat.datasets.shapes import CATEGORIES
from socarrat.generator import Generator
from socarrat.models import build_model, parameter_count

HDIT_4LV = {"patch_size": 4, "widths": (64, 64, 128, 128), "depths": (2, 2, 1, 2), "mapping_width": 128,
            "cross_attention_levels": (2, 3)}
BACKBONES = {
    "unet": ModelSpec(),
    "hdit": ModelSpec(backbone="hdit"),
    "hdit-4lv": ModelSpec(backbone="hdit", hdit=HDIT_4LV),
    "hdit-4lv-global": ModelSpec(backbone="hdit", hdit={**HDIT_4LV, "window": 1 << 16}),
}
PROMPT = "a green triangle above a yellow circle"
FLOP_SIZES = (64, 128, 256, 512)  # counted at every run: FLOPs do not depend on the device


def flops_per_image(model, size_px: int) -> int:
    """Matmul FLOPs of one forward on one size_px image; `model` lives on the meta device."""
    text = model.encode([PROMPT])
    x, t = torch.zeros(1, model.spec.in_channels, size_px, size_px, device="meta"), torch.zeros(1, device="meta")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, text)
    return counter.get_total_flops()


def peak_mib(fn) -> float:
    """Peak CUDA memory that `fn` allocates above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def time_forward(model, text, size_px: int, args) -> tuple[float | None, float | None]:
    """(ms, MiB) per image of one forward at batch `args.batch`; (None, None) past the GPU's memory."""
    x = torch.randn(args.batch, model.spec.in_channels, size_px, size_px, device=args.device)
    t = torch.randint(0, model.spec.train_timesteps, (args.batch,), device=args.device)
    try:
        model(x, t, text)  # warm-up: kernel selection, allocator
        ms = median_ms(lambda: model(x, t, text), args.repeats) / args.batch
        return ms, peak_mib(lambda: model(x, t, text)) / args.batch if args.device.type == "cuda" else None
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None


def measure(name: str, spec: ModelSpec, args) -> list[dict]:
    """One row per size: FLOPs per image of `spec`'s forward at every size, ms and MiB at the timed ones."""
    torch.manual_seed(0)
    model = build_model(spec).to(args.device).eval()
    meta_model = build_model(spec).to("meta")
    params = sum(p.numel() for p in getattr(model, spec.backbone).parameters())
    text = model.encode([PROMPT] * args.batch)
    rows = []
    for size in sorted(set(args.sizes) | set(FLOP_SIZES)):
        ms, mib = time_forward(model, text, size, args) if size in args.sizes else (None, None)
        rows.append({"backbone": name, "size_px": size, "params": params, "batch": args.batch, "ms_per_image": ms,
                     "mib_per_image": mib, "gflops_per_image": flops_per_image(meta_model, size) / 1e9})
        print_row(rows[-1])
    return rows


def add_growth(rows: list[dict]) -> None:
    """Each row gets its cost divided by the same backbone's cost at the previous size."""
    for prev, row in zip(rows, rows[1:]):
        if prev["backbone"] == row["backbone"]:
            for key in ("ms_per_image", "mib_per_image", "gflops_per_image"):
                ok = row[key] is not None and prev[key]
                row[key.replace("_per_image", "_growth")] = row[key] / prev[key] if ok else None


def fmt(value, spec: str, unit: str = "") -> str:
    """`value` formatted, or a dash of the same width where there is none (memory on the CPU, OOM)."""
    text = format(value, spec) + unit if value is not None else "-"
    return text.rjust(len(format(0.0, spec)) + len(unit))


HEADER = f"{'backbone':16} {'px':>4} {'params':>6} {'ms/img':>9} {'MiB/img':>8} {'GFLOP/img':>10}"


def print_row(r: dict) -> None:
    print(f"{r['backbone']:16} {r['size_px']:4d} {r['params'] / 1e6:5.2f}M {fmt(r['ms_per_image'], '9.2f')} "
          f"{fmt(r['mib_per_image'], '8.1f')} {r['gflops_per_image']:10.3f}", flush=True)


def print_growth(rows: list[dict]) -> None:
    print(f"\ngrowth per doubling of the side (4x = linear in pixels, 16x = quadratic)\n"
          f"{'backbone':16} {'px':>9} {'time':>6} {'memory':>7} {'FLOPs':>6}")
    for r in rows:
        if "gflops_growth" in r:
            size = f"{r['size_px'] // 2}->{r['size_px']}"
            print(f"{r['backbone']:16} {size:>9} {fmt(r['ms_growth'], '5.2f', 'x')} {fmt(r['mib_growth'], '6.2f', 'x')} "
                  f"{fmt(r['gflops_growth'], '5.2f', 'x')}")


def compare_bundled(args) -> list[dict] | None:
    """shapes-gaussian vs shapes-hdit: evaluation scores and images/s (DDIM-50, guidance 3)."""
    if "shapes-hdit" not in bundled_models():
        print("\n--eval: no bundled shapes-hdit model yet; skipped")
        return None
    from jobs.evaluate import evaluate

    rows, spec = [], SamplerSpec(sampler="ddim", steps=50, guidance=3.0)
    for name in ("shapes-gaussian", "shapes-hdit"):
        gen = Generator.load(name, device=args.device)
        summary = evaluate(gen, spec, args.eval_prompts, args.eval_seeds, progress=False)["summary"]
        rows.append({"model": name, "params": parameter_count(gen.model), "images_per_s": summary["images_per_s"],
                     "scores": summary["scores"], "stderr": summary["stderr"]})
    columns = [*CATEGORIES, "overall"]
    print(f"\n{'model':16} {'params':>6} {'img/s':>7} " + " ".join(f"{c[:10]:>10}" for c in columns) + "  stderr")
    for r in rows:
        scores = " ".join(f"{r['scores'][c]:10.3f}" for c in columns)
        print(f"{r['model']:16} {r['params'] / 1e6:5.2f}M {r['images_per_s']:7.2f} {scores}  {r['stderr']['overall']:.3f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default=None, help="comma-separated px (default: 64,128,256,512 on CUDA, 32,64,128 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="default: 8 on CUDA, 2 on CPU")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backbones", default=",".join(BACKBONES))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--eval", action="store_true", help="also score the bundled shapes-gaussian and shapes-hdit")
    p.add_argument("--eval-prompts", type=int, default=300)
    p.add_argument("--eval-seeds", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/backbones.json")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    gpu = args.device.type == "cuda"
    args.sizes = [int(s) for s in (args.sizes or ("64,128,256,512" if gpu else "32,64,128")).split(",")]
    args.batch = args.batch or (8 if gpu else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, batch {args.batch}, {'bf16 autocast' if gpu else 'fp32'}, threads {torch.get_num_threads()}\n")
    print(HEADER + "\n" + "-" * len(HEADER))
    rows = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
        for name in args.backbones.split(","):
            rows += measure(name, BACKBONES[name], args)
    add_growth(rows)
    print_growth(rows)
    evaluation = compare_bundled(args) if args.eval else None
    meta = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "dtype": "bf16" if gpu else "fp32", "argv": sys.argv[1:],
            "specs": {name: BACKBONES[name].model_dump(mode="json") for name in args.backbones.split(",")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "evaluation": evaluation}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
