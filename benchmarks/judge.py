"""How far the prompt-adherence judge (`socarrat.datasets.shapes.score`) can be trusted on images
that are not clean renders: its pass rate on correct scenes under noise, blur and resampling, and
on shapes that are none of its three.

Every scene is drawn for its caption by the dataset's own sampler and rendered clean, so a perfect
judge passes all of them under any perturbation that keeps the scene recognisable; the shortfall is
the judge's strictness, which a blurrier model (fewer steps, another sampler) pays on top of its
adherence. The second table is leniency: blobs no prompt asks for, and what the judge calls them.
Pure numpy and PIL, no model: the figures do not depend on the machine.

    python -m benchmarks.judge                      # 500 scenes at 32 px, a few seconds
    python -m benchmarks.judge --scenes 2000 --size-px 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from socarrat.datasets.shapes import CATEGORIES, analyze, overall, render, sample_example, score

ROOT = Path(__file__).resolve().parents[1]
Perturb = Callable[[np.ndarray], np.ndarray]


def noisy(sigma: float) -> Perturb:
    rng = np.random.default_rng(0)
    return lambda a: np.clip(a + rng.normal(0, sigma, a.shape), 0, 255).astype(np.uint8)


def blurred(sigma_px: float) -> Perturb:
    return lambda a: np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(sigma_px)))


def resampled(a: np.ndarray) -> np.ndarray:
    """Up 2x and back down, bilinear: the soft edges of an upsampling decoder."""
    side = a.shape[0]
    return np.asarray(Image.fromarray(a).resize((2 * side,) * 2, Image.BILINEAR).resize((side,) * 2, Image.BILINEAR))


PERTURBATIONS: dict[str, Perturb] = {
    "clean": lambda a: a, "noise 20": noisy(20), "noise 60": noisy(60), "blur 0.6 px": blurred(0.6),
    "blur 1.0 px": blurred(1.0), "2x up and down": resampled,
}


def off_grammar_blobs(side: int) -> dict[str, np.ndarray]:
    """Red blobs (on white) that are none of circle, square or triangle, at about an object's size."""
    y, x = np.mgrid[:side, :side] / side
    masks = {
        "bar 2:1": (np.abs(x - 0.5) < 0.19) & (np.abs(y - 0.5) < 0.095),
        "bar 6:1": (np.abs(x - 0.5) < 0.3) & (np.abs(y - 0.5) < 0.05),
        "ellipse 2:1": ((x - 0.5) / 0.25) ** 2 + ((y - 0.5) / 0.125) ** 2 <= 1,
        "diamond": np.abs(x - 0.5) + np.abs(y - 0.5) <= 0.2,
        "ring": np.abs(np.hypot(x - 0.5, y - 0.5) - 0.2) < 0.04,
        "cross": ((np.abs(x - 0.5) < 0.05) & (np.abs(y - 0.5) < 0.25)) | ((np.abs(y - 0.5) < 0.05) & (np.abs(x - 0.5) < 0.25)),
    }
    return {name: np.where(m[..., None], np.array([255, 0, 0], np.uint8), np.uint8(255)) for name, m in masks.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=500)
    p.add_argument("--size-px", type=int, default=32, help="the bundled Gaussian models' size (default: 32)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "judge.json"))
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    scenes = [sample_example(rng) for _ in range(args.scenes)]
    images = [render(scene, args.size_px) for scene, _, _ in scenes]
    strictness = {}
    print(f"judge pass rate on {args.scenes} correct scenes at {args.size_px} px (a perfect judge: 1.000)")
    print(f"{'perturbation':<16}" + "".join(f"{c[:12]:>14}" for c in CATEGORIES) + f"{'overall':>10}")
    for name, perturb in PERTURBATIONS.items():
        passed: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
        for image, (_, _, spec) in zip(images, scenes):
            passed[spec.category].append(score(perturb(image), spec).passed)
        accuracy = {c: float(np.mean(v)) for c, v in passed.items() if v}
        strictness[name] = {**accuracy, "overall": overall(accuracy)}
        print(f"{name:<16}" + "".join(f"{accuracy.get(c, float('nan')):>14.3f}" for c in CATEGORIES)
              + f"{strictness[name]['overall']:>10.3f}")

    leniency = {}
    print("\nblobs outside the grammar, red on white: what the judge sees")
    for name, image in off_grammar_blobs(args.size_px).items():
        found = analyze(image)
        leniency[name] = [obj.shape for obj in found]
        print(f"{name:<16}{', '.join(str(s) for s in leniency[name]) or 'nothing'}")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"scenes": args.scenes, "size_px": args.size_px, "seed": args.seed,
                                          "pass_rate": strictness, "off_grammar_blobs": leniency}, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
