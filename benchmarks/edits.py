"""Image editing with a token model: does an inpainted or outpainted image follow its prompt and keep
what it was told to keep?

For each seed, a source image is drawn from `--source` ("a red circle on the left"); its right half
is then painted anew with `--prompt` ("a red circle left of a blue square") three ways: outpainting
(the left half on a canvas grown to the right), inpainting (a mask over the right half) and, as the
baseline, plain generation of the prompt. The judge (`socarrat.datasets.shapes.score`) checks each
image against the prompt; "kept" is the RMS (uint8) between the kept half and the source's. Pass
rates and RMS do not depend on the device; times do.

    python -m benchmarks.edits --seeds 32              # bundled shapes-token, CPU, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from socarrat.datasets.shapes import score
from socarrat.generator import Edit, Generator

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-token")
    p.add_argument("--source", default="a red circle on the left")
    p.add_argument("--prompt", default="a red circle left of a blue square")
    p.add_argument("--seeds", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "edits.json"))
    args = p.parse_args()

    gen = Generator.load(args.model, device=args.device)
    seeds = list(range(args.seeds))
    sources = [r.image for r in gen.generate([args.source] * len(seeds), seeds)]
    side = sources[0].width
    half = side // 2
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (half, 0, side, side))
    outpaint = [Edit.outpaint(s.crop((0, 0, half, side)), right=side - half) for s in sources]
    modes = {
        "outpaint right half": Edit([c for c, _ in outpaint], [m for _, m in outpaint]),
        "inpaint right half": Edit(sources, [mask] * len(seeds)),
        "generate (baseline)": None,
    }
    rows = {}
    print(f"{gen.name}: '{args.source}' -> right half painted anew as '{args.prompt}', {len(seeds)} seeds")
    print(f"{'mode':<22}{'judge passes':>14}{'kept RMS':>10}{'s':>7}")
    for name, edit in modes.items():
        t0 = time.perf_counter()
        made = [r.image for r in gen.generate([args.prompt] * len(seeds), seeds, edit=edit)]
        wall_s = time.perf_counter() - t0
        passes = sum(score(img, args.prompt).passed for img in made)
        kept = [np.asarray(img)[:, :half].astype(float) - np.asarray(src)[:, :half] for img, src in zip(made, sources)]
        rms = float(np.sqrt(np.mean(np.square(kept))))
        rows[name] = {"passes": passes, "images": len(made), "kept_rms_uint8": rms, "wall_s": wall_s}
        print(f"{name:<22}{f'{passes}/{len(made)}':>14}{rms:>10.1f}{wall_s:>7.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": gen.name, "model_digest": gen.digest, "source": args.source,
                                          "prompt": args.prompt, "seeds": len(seeds), "modes": rows}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
