"""Placement probe: does a model put an object where its prompt says, and can the architecture learn to?

The judge's position category (`jobs.evaluate`) fails for the bundled models; this measures the
mechanism directly. For 24 seeds it draws "a red circle at the top" and "... at the bottom" (and
left / right), finds the red object in each image and reports the mean shift of its centre between
the two words, as a fraction of the image side (0: the word is ignored; about 0.5: the objects sit
in opposite halves), and the share of seeds that moved the right way by more than 0.1. Beside it, a
control that the prompt is read at all: the share of "a {red, blue, green} square at the top" images
whose object has the asked colour, and is a square.

`--train-steps N` also trains the first model's architecture from scratch, for N steps, on one-object
captions with a placement only ("a small red circle on the left"; the dataset's own sampler,
filtered), the easiest form of the skill, once per `--loss-weighting` (by default both: Min-SNR, the
baseline, and capped-v), and probes those models beside the given ones; `--fine-tune` starts them
from the first model's weights instead. The figures (shifts, shares) do not depend on the device;
the training's time does.

    python -m benchmarks.placement --model shapes-gaussian runs/x/step-00003000   # probe checkpoints
    python -m benchmarks.placement --train-steps 1000 --threads 2                  # CPU: ~40 min
    python -m benchmarks.placement --train-steps 1000 --fine-tune --threads 2      # from the model's weights
    python -m benchmarks.placement --train-steps 5000 --device cuda                # GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from tqdm.auto import tqdm

from socarrat.checkpoint import describe_checkpoint
from socarrat.config import SamplerSpec
from socarrat.datasets.shapes import ABSOLUTE, analyze, render, sample_example
from socarrat.generator import Generator
from socarrat.models import build_model
from socarrat.training import GaussianObjective, LossWeighting

OPPOSITES = {"y": ("at the top", "at the bottom"), "x": ("on the left", "on the right")}
COLOURS = ("red", "blue", "green")


def placement_examples(count: int, size_px: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """`count` training examples whose caption asks for one object in a named place: images
    (N, 3, H, W) in [-1, 1] and captions."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    while len(captions) < count:
        scene, caption, spec = sample_example(rng)
        if spec.category == "position" and spec.relation in ABSOLUTE:
            images.append(render(scene, size_px))
            captions.append(caption)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1, captions


def train_on_placement(gen: Generator, steps: int, batch_size: int, examples: int, seed: int, weighting: LossWeighting,
                       fine_tune: bool = False) -> Generator:
    """A model of `gen`'s architecture, randomly initialised (or a copy of `gen`'s, `fine_tune`) and
    trained on placement captions only (the training job's objective with this loss weighting, its
    optimiser settings, constant lr)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(gen.model).float().train().requires_grad_(True) if fine_tune else build_model(gen.spec)
    model = model.to(gen.device)
    images, captions = placement_examples(max(examples, batch_size), gen.spec.size_px, seed)
    objective = GaussianObjective(model, uncond_prob=0.1, min_snr_gamma=5.0, weighting=weighting).to(gen.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99))
    rng = np.random.default_rng(seed)
    for _ in (bar := tqdm(range(steps), desc="training")):
        idx = rng.integers(0, len(captions), batch_size)
        with torch.autocast(gen.device.type, dtype=torch.bfloat16, enabled=gen.device.type == "cuda"):
            loss = objective(images[idx].to(gen.device), [captions[i] for i in idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    start = f"{gen.name} fine-tuned" if fine_tune else "from scratch"
    return Generator(model.eval(), "0" * 64, f"{start}, {steps} steps, {weighting}", gen.device)


def probe(gen: Generator, seeds: int, steps: int) -> dict:
    """Centre shifts between opposite placement words, and the colour/shape control."""
    spec, seed_list = SamplerSpec(steps=steps, guidance=3.0), list(range(seeds))
    out = {}
    for axis, words in OPPOSITES.items():
        centres = []
        for word in words:
            results = gen.generate([f"a red circle {word}"] * seeds, seed_list, spec)
            found = [[o for o in analyze(np.asarray(r.image)) if o.colour == "red"] for r in results]
            centres.append(np.array([getattr(f[0], "c" + axis) if f else np.nan for f in found]))
        shift = centres[1] - centres[0]
        out[f"shift_{axis}"] = float(np.nanmean(shift)) if np.isfinite(shift).any() else None  # no red object at all
        out[f"moved_{axis}"] = float(np.mean(shift > 0.1))  # nan (object missing) counts as not moved
    colour_hits = shape_hits = 0
    for colour in COLOURS:
        for r in gen.generate([f"a {colour} square at the top"] * seeds, seed_list, spec):
            objects = analyze(np.asarray(r.image))
            colour_hits += bool(objects) and objects[0].colour == colour
            shape_hits += bool(objects) and objects[0].shape == "square"
    out["colour_match"], out["square"] = colour_hits / (seeds * len(COLOURS)), shape_hits / (seeds * len(COLOURS))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["shapes-gaussian"],
                   help="checkpoints to probe (the first one's architecture is what --train-steps trains)")
    p.add_argument("--train-steps", type=int, default=0, help="also train the architecture on placement captions")
    p.add_argument("--fine-tune", action="store_true", help="--train-steps starts from the first model's weights, not from scratch")
    p.add_argument("--loss-weighting", nargs="+", choices=get_args(LossWeighting), default=list(get_args(LossWeighting)),
                   help="the loss weightings --train-steps trains with, one model each")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--examples", type=int, default=8000, help="placement renders --train-steps draws its batches from")
    p.add_argument("--seeds", type=int, default=24)
    p.add_argument("--steps", type=int, default=30, help="DDIM steps of the probe images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/placement.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for model in args.model:  # all checked before any weights are loaded
        info = describe_checkpoint(model)
        if info.format != "socarrat" or info.spec.family != "gaussian":
            print(f"placement: {model} is not a Socarrat Gaussian-family checkpoint", file=sys.stderr)
            return 2
    gens = [Generator.load(model, device=args.device) for model in args.model]
    rows = [{"model": model, "train_steps": None, "train_s": None, **probe(gen, args.seeds, args.steps)}
            for model, gen in zip(args.model, gens)]
    for weighting in args.loss_weighting if args.train_steps else ():
        t0 = time.perf_counter()
        fresh = train_on_placement(gens[0], args.train_steps, args.batch_size, args.examples, 0, weighting, args.fine_tune)
        train_s = time.perf_counter() - t0
        rows.append({"model": fresh.name, "train_steps": args.train_steps, "train_s": train_s,
                     **probe(fresh, args.seeds, args.steps)})

    print(f"\nPlacement, {args.seeds} seeds, DDIM-{args.steps}, guidance 3, on {args.device}")
    print("| model | top->bottom shift | moved | left->right shift | moved | colour match | square | train s |")
    print("|---|---|---|---|---|---|---|---|")
    shift = lambda value: "n/a" if value is None else f"{value:+.3f}"
    for r in rows:
        train_s = f"{r['train_s']:.0f}" if r["train_s"] else ""
        print(f"| {r['model']} | {shift(r['shift_y'])} | {r['moved_y']:.2f} | {shift(r['shift_x'])} | {r['moved_x']:.2f} "
              f"| {r['colour_match']:.2f} | {r['square']:.2f} | {train_s} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
