"""The `socarrat` command line: `generate` one image, `shapes-shards` to write the training data.

A user mistake (a ValueError from our checks or pydantic) prints one line and exits 2; anything else
is our bug and keeps its traceback. Flags mirror the pydantic field names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from socarrat.errors import UserError


def one_line(err: Exception) -> str:
    """A user error as one line for a terminal: pydantic's errors joined as `field: message`."""
    if isinstance(err, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}" for e in err.errors())
    return str(err)


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """The SamplerSpec flags, shared by every command that samples."""
    parser.add_argument("--sampler", default="ddim", help="ddim | ddpm")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--spacing", default="trailing", help="leading | trailing | linspace")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--height-px", type=int, default=None)
    parser.add_argument("--width-px", type=int, default=None)
    parser.add_argument("--picard", action="store_true", help="Picard (ParaDiGMS) parallel sampling")
    parser.add_argument("--window", type=int, default=32, help="Picard: steps evaluated per model call")
    parser.add_argument("--tolerance", type=float, default=2e-3, help="Picard: accepted change of a state in final-image units; 0 = sequential")


def sampler_spec(args: argparse.Namespace):
    from socarrat.config import SamplerSpec

    return SamplerSpec(sampler=args.sampler, steps=args.steps, spacing=args.spacing, guidance=args.guidance,
                       height_px=args.height_px, width_px=args.width_px, picard=args.picard, window=args.window,
                       tolerance=args.tolerance)


def cmd_generate(args: argparse.Namespace) -> None:
    from socarrat.generator import Generator

    spec = sampler_spec(args)  # validate flags before loading anything
    if Path(args.out).suffix.lower() != ".png":
        raise UserError(f"--out must end in .png, got {args.out}")
    gen = Generator.load(args.model)
    [result] = gen.generate([args.prompt], [args.seed], spec, [args.negative_prompt], progress=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(result.png_bytes())
    t = result.metadata["timings"]
    print(f"wrote {args.out} ({gen.name}, {spec.sampler} {spec.steps} steps, seed {args.seed}, {t['sample_s']:.2f} s)")


def cmd_shapes_shards(args: argparse.Namespace) -> None:
    import io
    import json

    from PIL import Image

    from socarrat.datasets.shapes import dataset
    from socarrat.shards import write_shards

    def samples():
        for i, (image, caption) in enumerate(dataset(args.seed, args.count, args.size_px)):
            png = io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            meta = {"caption": caption, "seed": args.seed, "index": i, "size_px": args.size_px}
            yield f"{args.seed:04d}-{i:08d}", {"png": png.getvalue(), "txt": caption.encode(), "json": json.dumps(meta).encode()}

    n = write_shards(args.out, samples(), args.shard_size)
    print(f"wrote {n} shards of the shapes dataset to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="socarrat", description="Text-to-image generation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate one image into a PNG file")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--model", default=None, help="bundled name, checkpoint dir or s3:// prefix")
    gen.add_argument("--out", required=True, help="output .png path")
    add_sampler_flags(gen)
    gen.set_defaults(run=cmd_generate)
    shards = sub.add_parser("shapes-shards", help="write the captioned shapes dataset as webdataset shards")
    shards.add_argument("--out", required=True, help="folder or s3:// prefix")
    shards.add_argument("--count", type=int, default=50_000)
    shards.add_argument("--shard-size", type=int, default=5_000)
    shards.add_argument("--size-px", type=int, default=64)
    shards.add_argument("--seed", type=int, default=0)
    shards.set_defaults(run=cmd_shapes_shards)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (UserError, ValidationError) as err:
        print(f"socarrat {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
