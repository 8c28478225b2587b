"""Train a model family on webdataset shards with Ray Train (DDP over --num-workers).

    python -m jobs.train --shards s3://bucket/shapes --out s3://bucket/runs/gaussian --steps 8000 \
        --num-workers 4 --use-gpu

Checkpoints land in `--out/step-XXXXXXXX/` (config.json + model.safetensors, loadable by
`Generator.load`, plus train_state.pt); running the same command again resumes from the newest.
`--num-workers 0` trains in this process without Ray (debugging, or a machine without a cluster).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import ValidationError

from socarrat import storage
from socarrat.checkpoint import bundled_models, recorded_model_fields
from socarrat.cli import check_at_least, one_line, with_default
from socarrat.config import ModelSpec
from socarrat.errors import UserError
from socarrat.training import TrainConfig, TrainResult, preflight, train


def _ray_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    train(
        TrainConfig.model_validate(config),
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
        wrap=ray.train.torch.prepare_model,
        report=ray.train.report,
    )


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its relative local paths made absolute: Ray Train starts each worker in a folder of
    its own, where they would name other folders (the shards or a local text encoder not found,
    checkpoints written into the Ray session and lost). A bundled model's name stays a name."""
    paths = {"shards": cfg.shards, "out": cfg.out}
    bundled = bundled_models()  # a bundled model's name is loaded as that model, whatever folders are here
    paths |= {name: uri for name in ("init", "init_text")
              if (uri := getattr(cfg, name)) and uri not in bundled and Path(uri).exists()}
    update: dict[str, object] = {name: storage.absolute(uri) for name, uri in paths.items()}
    text = cfg.model.text
    if text.kind == "hf" and text.path:
        update["model"] = cfg.model.model_copy(update={"text": text.model_copy(update={"path": storage.absolute(text.path)})})
    return cfg.model_copy(update=update)


def run(cfg: TrainConfig, num_workers: int = 1, use_gpu: bool = False) -> TrainResult | None:
    """Train in this process (num_workers=0) or on `num_workers` Ray Train workers."""
    cfg = absolute_paths(cfg)  # in both modes, so that a run resumes whichever started it (the spec is compared)
    preflight(cfg)  # a user mistake fails here in one line, not as a worker's traceback, an hour in
    if num_workers == 0:
        return train(cfg)
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(name="socarrat-train", storage_path=str(Path.home() / "ray_results")),
    )
    try:
        trainer.fit()
    except ray.train.WorkerGroupError as err:  # its failures are the workers' own exceptions
        # What only a worker can find wrong (no readable sample in the shards, say): one line, as above.
        if mistakes := [e for e in err.worker_failures.values() if isinstance(e, UserError)]:
            raise UserError(str(mistakes[0])) from None
        raise
    return None


def _model_spec(text: str | None, **overrides: object) -> ModelSpec:
    """--model-spec (JSON text or file, or a checkpoint's config.json) with the flags set over it."""
    data = {}
    if text:
        if not text.lstrip().startswith("{") and not Path(text).is_file():
            raise UserError(f"--model-spec {text!r} is neither JSON nor a file")
        try:
            data = json.loads(text if text.lstrip().startswith("{") else Path(text).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"--model-spec {text[:80]!r}: not valid JSON ({err})") from None
        saved = isinstance(data, dict) and "model" in data  # a checkpoint's config.json works too
        data = data["model"] if saved else data
        if not isinstance(data, dict):
            raise UserError(f"--model-spec {text[:80]!r}: not a JSON object of ModelSpec fields")
        data = recorded_model_fields(data) if saved else data  # as its weights were made
    data |= {k: v for k, v in overrides.items() if v is not None}
    return ModelSpec.model_validate(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jobs.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="folder or s3:// prefix of .tar shards")
    p.add_argument("--out", required=True, help="folder or s3:// prefix for checkpoints")
    p.add_argument("--model-spec", default=None, help="ModelSpec as JSON text or a .json file (default: ModelSpec())")
    p.add_argument("--size-px", type=int, default=None, help="ModelSpec.size_px, over --model-spec's (default: "
                   f"{ModelSpec().size_px})")
    p.add_argument("--backbone", choices=get_args(ModelSpec.model_fields["backbone"].annotation), default=None,
                   help="ModelSpec.backbone, over --model-spec's (default: unet)")
    p.add_argument("--family", choices=get_args(ModelSpec.model_fields["family"].annotation), default=None,
                   help="ModelSpec.family, over --model-spec's (default: gaussian; token trains VQ, then denoiser)")
    for name, field in TrainConfig.model_fields.items():
        if name in ("shards", "out", "model"):
            continue
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            p.add_argument(flag, action="store_true", help=field.description)
            continue
        text = with_default(field.description, field.default)
        kind = next((a for a in get_args(field.annotation) if a is not type(None)), field.annotation)  # X | None -> X
        if get_origin(kind) is Literal:
            p.add_argument(flag, choices=get_args(kind), default=field.default, help=text)
        else:
            p.add_argument(flag, type=kind, default=field.default, help=text)
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers, on the Ray cluster (or a local "
                   "one it starts); 0 = in this process, without Ray (default: 1)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per Ray Train worker (default: CPU workers)")
    args = p.parse_args(argv)
    try:
        check_at_least(args, num_workers=0)
        fields = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields and k != "model"}
        spec = _model_spec(args.model_spec, size_px=args.size_px, backbone=args.backbone, family=args.family)
        cfg = TrainConfig(model=spec, **fields)
        run(cfg, args.num_workers, args.use_gpu)
    except (UserError, ValidationError, json.JSONDecodeError) as err:
        print(f"jobs.train: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
