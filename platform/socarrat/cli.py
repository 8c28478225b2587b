"""The `socarrat` command line: `generate` one image, `edit` one with a token model, `shapes-shards`
to write the training data.

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
    """The SamplerSpec flags, shared by every command that samples; unset ones keep SamplerSpec's defaults."""
    from socarrat.config import SamplerSpec

    default = {name: info.default for name, info in SamplerSpec.model_fields.items()}
    parser.add_argument("--sampler", help="ddim | ddpm | paella (default: the model's own: "
                        "ddim for Gaussian models, paella for token models)")
    parser.add_argument("--steps", type=int, help="default: 50 for ddim and ddpm, 12 for paella")
    parser.add_argument("--spacing", help=f"leading | trailing | linspace (default: {default['spacing']})")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale: 1 = off (the prompt alone), "
                        f"0 = unconditional (default: {default['guidance']})")
    parser.add_argument("--height-px", type=int, help="image height (default: the model's size)")
    parser.add_argument("--width-px", type=int, help="image width (default: the model's size)")
    parser.add_argument("--picard", action="store_true", help="Picard (ParaDiGMS) parallel sampling")
    parser.add_argument("--window", type=int, help=f"Picard: steps evaluated per model call (default: {default['window']})")
    parser.add_argument("--tolerance", type=float, help="Picard: how far (RMS, image units) the result may be "
                        f"from sequential sampling's; 0 = the sequential result (default: {default['tolerance']})")
    parser.add_argument("--temperature", type=float, nargs=2, metavar=("FIRST", "LAST"),
                        help=f"paella: sampling temperature at the first and the last step (default: {default['temperature']})")
    parser.add_argument("--renoise-steps", type=int, help="paella: steps followed by re-noising (default: all but the last)")


def add_precision_flag(parser: argparse.ArgumentParser) -> None:
    """--precision, shared by every command that loads a model to sample with."""
    from socarrat.config import PRECISION_HELP, PRECISIONS

    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=with_default(PRECISION_HELP, "auto"))


def with_default(description: str | None, default: object) -> str:
    """A flag's help: its description, then its default unless that is None."""
    return " ".join(filter(None, [description, None if default is None else f"(default: {default})"]))


def sampler_spec(args: argparse.Namespace):
    """The SamplerSpec of the sampler flags given; the rest keep SamplerSpec's defaults. UserError for
    Picard's flags without --picard, which would be ignored (the model's sampler checks the others)."""
    from socarrat.config import SamplerSpec

    stray = [f"--{name}" for name in ("window", "tolerance") if getattr(args, name) is not None]
    if stray and not args.picard:
        raise UserError(f"{', '.join(stray)}: for Picard sampling only; add --picard")
    return SamplerSpec(**{name: getattr(args, name) for name in SamplerSpec.model_fields
                          if getattr(args, name) is not None})


def check_at_least(args: argparse.Namespace, **least: int) -> None:
    """UserError naming the first of these flags below its least value (`seeds=1`: --seeds >= 1)."""
    for name, bound in least.items():
        if (value := getattr(args, name)) < bound:
            raise UserError(f"--{name.replace('_', '-')} must be >= {bound}, got {value}")


def _check_out(args: argparse.Namespace) -> None:
    """UserError for a bad --seed or an --out that is no .png or cannot be written, before any work."""
    from socarrat import storage

    check_at_least(args, seed=0)
    if Path(args.out).suffix.lower() != ".png":
        raise UserError(f"--out must end in .png, got {args.out}")
    storage.check_writable(storage.parent(args.out))


def _save(result, args: argparse.Namespace) -> None:
    from socarrat import storage

    storage.write_bytes(args.out, result.png_bytes())  # a local path or s3://, complete or not at all
    m = result.metadata
    print(f"wrote {args.out} ({m['model']}, {m['spec']['sampler']} {m['spec']['steps']} steps, "
          f"{result.image.width}x{result.image.height}, seed {args.seed}, {m['timings']['sample_s']:.2f} s)")
    for what in ("prompt", "negative_prompt"):
        if m[f"{what}_truncated"]:
            print(f"warning: the {what.replace('_', ' ')} is longer than the model's text context; its end was "
                  "not used", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> None:
    from socarrat.generator import Generator

    spec = sampler_spec(args)  # validate flags before loading anything
    _check_out(args)
    gen = Generator.load(args.model, precision=args.precision)
    [result] = gen.generate([args.prompt], [args.seed], spec, [args.negative_prompt], progress=True)
    _save(result, args)


def cmd_edit(args: argparse.Namespace) -> None:
    from PIL import Image

    from socarrat import storage
    from socarrat.generator import Edit, Generator, read_image

    def open_image(uri: str, mode: str) -> Image.Image:
        return read_image(storage.read_bytes(uri), uri).convert(mode)

    _check_out(args)
    image = open_image(args.image, "RGB")
    mask = open_image(args.mask, "L") if args.mask else None
    if args.outpaint:
        if mask is not None:
            raise UserError("give --mask or --outpaint, not both")
        image, mask = Edit.outpaint(image, *args.outpaint)
    if args.height_px or args.width_px:
        raise UserError("edit makes an image of --image's size (grown by --outpaint): leave out --height-px "
                        "and --width-px")
    spec = sampler_spec(args).model_copy(update={"height_px": image.height, "width_px": image.width})
    gen = Generator.load(args.model, precision=args.precision)
    edit = Edit([image], [mask] if mask else None, args.start_step)
    [result] = gen.generate([args.prompt], [args.seed], spec, [args.negative_prompt], progress=True, edit=edit)
    _save(result, args)


def cmd_shapes_shards(args: argparse.Namespace) -> None:
    import io
    import json

    from PIL import Image

    from socarrat.datasets.shapes import dataset
    from socarrat.shards import write_shards

    check_at_least(args, seed=0, count=1)

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
    gen = sub.add_parser("generate", help="generate one image into a PNG file",
                         description="Generate one image into a PNG file (a local path or s3:// URI).")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--seed", type=int, default=0, help="the image's noise (default: 0)")
    gen.add_argument("--model", default=None, help="bundled name, checkpoint dir or s3:// prefix "
                     "(default: shapes-gaussian)")
    gen.add_argument("--out", required=True, help="output .png path")
    add_sampler_flags(gen)
    add_precision_flag(gen)
    gen.set_defaults(run=cmd_generate)
    edit = sub.add_parser("edit", help="inpaint, outpaint or restyle an image with a token model")
    edit.add_argument("--image", required=True, help="the image to edit (its size is the output size)")
    edit.add_argument("--mask", default=None, help="white where to paint anew (same size as --image)")
    edit.add_argument("--outpaint", type=int, nargs=4, metavar=("LEFT", "RIGHT", "TOP", "BOTTOM"), default=None,
                      help="grow the canvas by these pixels and paint the new border")
    edit.add_argument("--start-step", type=int, default=0, help="start from the image's tokens noised to this "
                      "step's level (structural editing; 0 = from noise)")
    edit.add_argument("--prompt", required=True)
    edit.add_argument("--negative-prompt", default="")
    edit.add_argument("--seed", type=int, default=0, help="the edit's random draws (default: 0)")
    edit.add_argument("--model", default="shapes-token", help="a token-family model: bundled name, checkpoint dir "
                      "or s3:// prefix (default: shapes-token)")
    edit.add_argument("--out", required=True, help="output .png path")
    add_sampler_flags(edit)
    add_precision_flag(edit)
    edit.set_defaults(run=cmd_edit)
    shards = sub.add_parser("shapes-shards", help="write the captioned shapes dataset as webdataset shards")
    shards.add_argument("--out", required=True, help="folder or s3:// prefix")
    shards.add_argument("--count", type=int, default=50_000, help="images (default: 50000)")
    shards.add_argument("--shard-size", type=int, default=5_000, help="images per tar shard (default: 5000)")
    shards.add_argument("--size-px", type=int, default=64, help="image side; training resizes to the model's "
                        "size_px, 32 for the bundled Gaussian models (default: 64)")
    shards.add_argument("--seed", type=int, default=0, help="the same seed renders the same images (default: 0)")
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
