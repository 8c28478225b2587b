"""Prompt-adherence evaluation: held-out shapes prompts -> images -> analyzer scores.

    python -m jobs.evaluate --model shapes-gaussian --steps 50 --guidance 3 --out runs/eval

Generates `--prompts` held-out captions x `--seeds` seeds (never a training caption's exact string),
judges every image with `socarrat.datasets.shapes.score` in GenEval's five categories, and writes
`scores.json` (per category + overall, with standard errors), `images.jsonl` (one row per image with the analyzer's
reason) and `contact_sheet.png` to `--out` (a folder or s3:// prefix). Runs on one device, no Ray.
`--against REPORT` (an earlier `--out` on the same prompts and seeds) also gives the paired difference
from that model, image by image: its standard error is smaller than that of the difference of the
two scores (0.016 against 0.023 overall for two 600-image reports of the default model).
The flags and a write to `--out` are checked before the model is loaded, so a mistyped output is
not found out only after the whole evaluation.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import textwrap
import time

import numpy as np
from PIL import Image, ImageDraw
from pydantic import ValidationError
from tqdm.auto import tqdm

from socarrat import storage
from socarrat.cli import add_precision_flag, add_sampler_flags, check_at_least, one_line, sampler_spec
from socarrat.config import COMPILE_HELP, SamplerSpec
from socarrat.datasets.shapes import ABSOLUTE, CATEGORIES, RELATIVE, PromptSpec, evaluation_prompts, overall, score
from socarrat.errors import UserError
from socarrat.generator import Generator


def contact_sheet(images: list[Image.Image], captions: list[str], passed: list[bool], columns: int = 6, cell_px: int = 128) -> Image.Image:
    """A grid of images, each above its caption; a green frame passed, a red one failed."""
    text_px = 40  # three lines of the default bitmap font
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * cell_px, rows * (cell_px + text_px)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, caption, ok) in enumerate(zip(images, captions, passed)):
        x, y = (i % columns) * cell_px, (i // columns) * (cell_px + text_px)
        sheet.paste(img.resize((cell_px - 8, cell_px - 8), Image.NEAREST), (x + 4, y + 4))
        draw.rectangle([x + 1, y + 1, x + cell_px - 2, y + cell_px - 2], outline="green" if ok else "red", width=3)
        draw.text((x + 3, y + cell_px), "\n".join(textwrap.wrap(caption, cell_px // 6)[:3]), fill="black")
    return sheet


def evaluation_jobs(num_prompts: int, num_seeds: int) -> list[tuple[str, PromptSpec, int]]:
    """(caption, what it asks, seed) of every image an evaluation makes, in order; UserError for
    more prompts than there are held-out captions."""
    return [(caption, spec, seed) for seed in range(num_seeds) for caption, spec in evaluation_prompts(num_prompts)]


def evaluate(generator: Generator, spec: SamplerSpec, num_prompts: int = 300, num_seeds: int = 2,
             batch_size: int = 64, sheet_size: int = 36, progress: bool = True) -> dict:
    """Scores of `generator` under `spec`: {"summary": {..., "scores": {category: accuracy, "overall"},
    "stderr": the same keys, "position_kinds": {"absolute" | "relative": {"accuracy", "images"}}},
    "rows", "sheet"}."""
    jobs = evaluation_jobs(num_prompts, num_seeds)
    rows, images = [], []
    start = time.perf_counter()
    for i in tqdm(range(0, len(jobs), batch_size), desc="evaluating", disable=not progress):
        chunk = jobs[i:i + batch_size]
        results = generator.generate([c for c, _, _ in chunk], [s for _, _, s in chunk], spec)
        for (caption, prompt_spec, seed), result in zip(chunk, results):
            verdict = score(result.image, prompt_spec)
            rows.append({"prompt": caption, "seed": seed, "category": verdict.category, "passed": verdict.passed, "reason": verdict.reason})
            images.append(result.image)
    wall_s = time.perf_counter() - start
    passed = {c: [r["passed"] for r in rows if r["category"] == c] for c in CATEGORIES}
    accuracy = {c: float(np.mean(p)) for c, p in passed.items()}
    # Binomial standard errors, images taken as independent (a prompt's seeds are not quite): two
    # models' scores differ beyond noise only where they are ~2 of these apart.
    stderr = {c: float(np.sqrt(a * (1 - a) / len(passed[c]))) for c, a in accuracy.items()}
    scores, stderr = {**accuracy, "overall": overall(accuracy)}, {**stderr, "overall": overall_stderr(stderr)}
    # Position mixes two skills, placing one object in the image ("at the top") and one relative to
    # another ("above"): the split shows which of them a model has learnt.
    kinds = {kind: [r["passed"] for r, (_, ps, _) in zip(rows, jobs) if ps.relation in relations]
             for kind, relations in (("absolute", ABSOLUTE), ("relative", RELATIVE))}
    position_kinds = {kind: {"accuracy": float(np.mean(p)) if p else None, "images": len(p)} for kind, p in kinds.items()}
    pick = np.random.default_rng(0).choice(len(rows), min(sheet_size, len(rows)), replace=False)
    sheet = contact_sheet([images[i] for i in pick], [rows[i]["prompt"] for i in pick], [rows[i]["passed"] for i in pick])
    summary = {"model": generator.name, "model_digest": generator.digest, "spec": spec.model_dump(),
               "precision": generator.precision, "compiled": generator.compiled, "device": generator.device.type,
               "images": len(rows),
               "wall_s": round(wall_s, 2), "images_per_s": round(len(rows) / wall_s, 2), "scores": scores,
               "stderr": stderr, "position_kinds": position_kinds}
    return {"summary": summary, "rows": rows, "sheet": sheet}


def overall_stderr(per_category: dict[str, float]) -> float:
    """The standard error of `overall` from the categories' own, taken as independent."""
    return float(np.sqrt(sum(e**2 for e in per_category.values()))) / len(per_category)


def read_rows(report: str) -> list[dict]:
    """The per-image rows (`images.jsonl`) of an earlier report (folder or s3:// prefix)."""
    store = storage.open_store(report)
    if not store.exists("images.jsonl"):
        raise UserError(f"{store.url('images.jsonl')} not found: --against takes an earlier evaluation's --out")
    return [json.loads(line) for line in store.get_bytes("images.jsonl").splitlines()]


def check_same_images(rows: list[dict], earlier: list[dict]) -> dict[tuple[str, int], dict]:
    """`earlier` by (prompt, seed); UserError unless it judged the (prompt, seed) pairs of `rows`."""
    by_key = {(r["prompt"], r["seed"]): r for r in earlier}
    if len(by_key) != len(rows) or any((r["prompt"], r["seed"]) not in by_key for r in rows):
        raise UserError("--against: that report judged other prompts or seeds; run both with the same --prompts and --seeds")
    return by_key


def paired_difference(rows: list[dict], earlier: list[dict]) -> dict[str, dict[str, float]]:
    """{category and "overall": {"mean", "stderr"}} of passed(rows) - passed(earlier), image by image on
    the same (prompt, seed); UserError unless both judged the same images. A model's own luck with a
    prompt and seed cancels out, so two models differ beyond noise where this is ~2 of its errors."""
    by_key = check_same_images(rows, earlier)
    out = {}
    for category in CATEGORIES:
        d = np.array([float(r["passed"]) - by_key[(r["prompt"], r["seed"])]["passed"] for r in rows if r["category"] == category])
        out[category] = {"mean": float(d.mean()), "stderr": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0}
    out["overall"] = {"mean": overall({c: v["mean"] for c, v in out.items()}),
                      "stderr": overall_stderr({c: v["stderr"] for c, v in out.items()})}
    return out


def write_report(report: dict, out: str) -> None:
    """scores.json, images.jsonl and contact_sheet.png under `out` (a folder or s3:// prefix)."""
    store = storage.open_store(out)
    png = io.BytesIO()
    report["sheet"].save(png, format="PNG")
    store.put_bytes("contact_sheet.png", png.getvalue())
    store.put_bytes("images.jsonl", "".join(json.dumps(r) + "\n" for r in report["rows"]).encode())
    store.put_bytes("scores.json", json.dumps(report["summary"], indent=2).encode())


def print_table(summary: dict) -> None:
    print(f"\n{'category':<20} {'accuracy':>8}  {'stderr':>6}")
    for category, value in summary["scores"].items():
        print(f"{category:<20} {value:>8.3f}  {summary['stderr'][category]:>6.3f}")
    parts = [f"{kind} {'n/a' if k['accuracy'] is None else format(k['accuracy'], '.3f')} ({k['images']} images)"
             for kind, k in summary["position_kinds"].items()]
    print("position by kind: " + ", ".join(parts))
    print(f"\n{summary['images']} images, {summary['images_per_s']} images/s, model {summary['model']} ({summary['model_digest'][:10]})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jobs.evaluate", description="GenEval-style prompt adherence on held-out shapes prompts.")
    p.add_argument("--model", default=None, help="bundled name, checkpoint dir or s3:// prefix (default: the bundled default)")
    p.add_argument("--out", default="runs/eval", help="folder or s3:// prefix for the report (default: runs/eval)")
    p.add_argument("--prompts", type=int, default=300, help=f"held-out prompts: at least one per category "
                   f"({len(CATEGORIES)}), at most 515 (default: 300)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default: 2)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call (default: 64)")
    p.add_argument("--against", default=None, help="an earlier report (its --out) on the same prompts and seeds: "
                   "also print and record the paired difference from it")
    add_sampler_flags(p)
    add_precision_flag(p)
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    args = p.parse_args(argv)
    try:
        spec = sampler_spec(args)
        check_at_least(args, prompts=len(CATEGORIES), seeds=1, batch_size=1)  # a prompt per category
        jobs = evaluation_jobs(args.prompts, args.seeds)  # at most 515 prompts, checked before the model loads
        earlier = read_rows(args.against) if args.against else None
        if earlier is not None:  # before any image is made
            check_same_images([{"prompt": caption, "seed": seed} for caption, _, seed in jobs], earlier)
        storage.check_writable(args.out)
        report = evaluate(Generator.load(args.model, precision=args.precision, compile=args.compile), spec, args.prompts, args.seeds, args.batch_size)
        if earlier is not None:
            report["summary"]["paired_against"] = {"report": args.against, **paired_difference(report["rows"], earlier)}
        write_report(report, args.out)
    except (UserError, ValidationError) as err:
        print(f"jobs.evaluate: error: {one_line(err)}", file=sys.stderr)
        return 2
    print_table(report["summary"])
    if paired := report["summary"].get("paired_against"):
        print(f"\npaired difference from {paired['report']} (this model - that one, image by image)")
        for category in (*CATEGORIES, "overall"):
            print(f"{category:<20} {paired[category]['mean']:>+8.3f}  {paired[category]['stderr']:>6.3f}")
    print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
