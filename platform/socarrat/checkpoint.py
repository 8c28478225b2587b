"""Checkpoints: a directory (or s3:// prefix) holding `config.json` + `model.safetensors`.

`config.json` holds the `ModelSpec` and the sha256 of the weights; it is written last, so a
checkpoint whose config exists is complete. Remote checkpoints are downloaded once into a local
cache and verified against that sha256 on every load. Bundled checkpoints live in
`socarrat/assets/<name>/`. A directory or prefix holding a diffusers pipeline (`model_index.json`)
loads through `socarrat.models.diffusers_adapter` instead. Depends on storage, config and models;
knows nothing of Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from socarrat import storage
from socarrat.config import ModelSpec
from socarrat.errors import NotFoundError, UserError
from socarrat.models import GaussianModel, build_model

CONFIG, WEIGHTS = "config.json", "model.safetensors"
WEIGHTS_DTYPE = torch.float16  # what save_checkpoint writes by default
DEFAULT_MODEL = "shapes-gaussian"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bundled_models() -> dict[str, Path]:
    """Name -> directory of every checkpoint shipped in `socarrat/assets/`."""
    root = Path(str(resources.files("socarrat") / "assets"))
    return {p.parent.name: p.parent for p in sorted(root.glob(f"*/{CONFIG}"))}


def latest_checkpoint(out: str) -> tuple[int, str] | None:
    """(step, URI) of the newest complete checkpoint under a training run's `out`: one whose
    config.json exists."""
    steps = [int(m.group(1)) for k in storage.open_store(out).list() if (m := re.fullmatch(rf"step-(\d+)/{CONFIG}", k))]
    return (max(steps), storage.join(out, f"step-{max(steps):08d}")) if steps else None


def check_model_name(name_or_uri: str) -> Path | None:
    """A bundled model's directory, or None for a path or URI; NotFoundError for a model that is
    neither (a name's typo). Reads no checkpoint, so it can run where a checkpoint's path does not
    exist (a Serve app's head node)."""
    bundled = bundled_models()
    if name_or_uri in bundled:
        return bundled[name_or_uri]
    if not ("/" in name_or_uri or storage.is_remote(name_or_uri) or os.path.exists(name_or_uri)):
        raise NotFoundError(f"unknown model {name_or_uri!r}: not a path, not an s3:// URI, and not bundled "
                            f"({', '.join(bundled) or 'none bundled'})")
    return None


def save_checkpoint(model: GaussianModel, uri: str, dtype: torch.dtype = WEIGHTS_DTYPE, extra: dict | None = None) -> str:
    """Write `model` to a directory or s3:// prefix; returns the weights' sha256."""
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in model.state_dict().items()}
    store = storage.open_store(uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / WEIGHTS
        save_file(state, str(path))
        digest = sha256_file(path)
        store.put_file(WEIGHTS, path)
    config = {"model": model.spec.model_dump(mode="json"), "sha256": digest, **(extra or {})}
    store.put_bytes(CONFIG, json.dumps(config, indent=2).encode())
    return digest


def _cache_root() -> Path:
    return Path(os.environ.get("SOCARRAT_CACHE", Path.home() / ".cache" / "socarrat"))


def _diffusers_copy(uri: str) -> tuple[Path, str]:
    """(local directory, digest) of a diffusers pipeline (a directory or s3:// prefix holding
    model_index.json).

    An s3:// prefix is downloaded into the cache file by file, once: it is taken to be immutable
    (publish new weights under a new prefix). The digest is the sha256 over the sha256 of every
    file the adapter reads.
    """
    from socarrat.models.diffusers_adapter import reads

    store = storage.open_store(uri)
    keys = [k for k in store.list() if reads(k)]
    if storage.is_remote(uri):
        path = _cache_root() / "diffusers" / hashlib.sha256(store.uri.encode()).hexdigest()
        for key in keys:
            if not (path / key).is_file():
                store.get_file(key, path / key)
    else:
        path = Path(uri.removeprefix("file://"))
    return path, hashlib.sha256("".join(f"{k} {sha256_file(path / k)}\n" for k in keys).encode()).hexdigest()


def _parse_config(raw: bytes, uri: str) -> dict:
    """A checkpoint's config.json: JSON with "model" (a ModelSpec) and "sha256" (of the weights)."""
    try:
        config = json.loads(raw)
    except ValueError as err:
        raise UserError(f"{uri} is not JSON: {err}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or not re.fullmatch(
            r"[0-9a-f]{64}", str(config.get("sha256"))):
        raise UserError(f"{uri} is not a Socarrat checkpoint config: it needs \"model\" (a ModelSpec) and "
                        "\"sha256\" (64 hex digits)")
    return config


def _local_copy(uri: str) -> Path:
    """A local directory with the checkpoint's two files (downloaded once for s3:// URIs)."""
    if not storage.is_remote(uri):
        path = Path(uri.removeprefix("file://"))
        if not (path / CONFIG).is_file():
            newest = latest_checkpoint(str(path)) if path.is_dir() else None
            hint = f"; it is a training run: its newest checkpoint is {newest[1]}" if newest else ""
            raise NotFoundError(f"no checkpoint at {uri} (expected {path / CONFIG}){hint}")
        return path
    store = storage.open_store(uri)
    config = _parse_config(store.get_bytes(CONFIG), storage.join(uri, CONFIG))
    cache = _cache_root() / config["sha256"]
    if not (cache / WEIGHTS).is_file() or sha256_file(cache / WEIGHTS) != config["sha256"]:
        store.get_file(WEIGHTS, cache / WEIGHTS)
    # Through a temp file (storage's writers): K actors of one node may load the same model at once.
    storage.write_bytes(str(cache / CONFIG), json.dumps(config).encode())
    return cache


def _open(name_or_uri: str | None) -> tuple[Path, dict | None, str]:
    """(local directory, config, digest) of a model, an s3:// one downloaded into the cache once;
    config is None for a diffusers pipeline. A Socarrat checkpoint's weights are checked against
    the sha256 in its config."""
    name_or_uri = name_or_uri or DEFAULT_MODEL
    path = check_model_name(name_or_uri)
    if path is None:
        if storage.open_store(name_or_uri).exists("model_index.json"):
            path, digest = _diffusers_copy(name_or_uri)
            return path, None, digest
        path = _local_copy(name_or_uri)
    config = _parse_config((path / CONFIG).read_bytes(), str(path / CONFIG))
    if not (path / WEIGHTS).is_file():
        raise NotFoundError(f"checkpoint {name_or_uri}: no {WEIGHTS} beside its {CONFIG} (a partial copy?)")
    if sha256_file(path / WEIGHTS) != config["sha256"]:
        raise UserError(f"checkpoint {name_or_uri}: {WEIGHTS} does not match the sha256 in {CONFIG} (corrupt or partial copy)")
    return path, config, config["sha256"]


def recorded_model_fields(model: dict) -> dict:
    """The `model` of a checkpoint's config.json with the fields added since it was written filled in
    with the values that match its weights (HDiTSpec.absolute_pos: false), not today's defaults:
    `save_checkpoint` writes every field, so a missing one is younger than the checkpoint."""
    if isinstance(model.get("hdit"), dict) and "absolute_pos" not in model["hdit"]:
        model = {**model, "hdit": {**model["hdit"], "absolute_pos": False}}
    return model


def recorded_spec(config: dict) -> ModelSpec:
    """The `ModelSpec` a checkpoint's config.json records (see `recorded_model_fields`)."""
    return ModelSpec.model_validate(recorded_model_fields(config["model"]))


@dataclass(frozen=True)
class ModelInfo:
    """A model as planning work for it needs it: its spec, its digest, the multiple that image
    sides must be of (the model's `pixel_multiple`), and whether it is a Socarrat checkpoint or a
    diffusers pipeline (whose spec describes only what the samplers read)."""

    spec: ModelSpec
    digest: str
    pixel_multiple: int
    format: Literal["socarrat", "diffusers"]


def describe_checkpoint(name_or_uri: str | None = None) -> ModelInfo:
    """What `load_checkpoint` would load, found and checked the same way (an s3:// model is
    downloaded into the cache) but without building the model or reading its weights into memory:
    a driver that only plans the work stays light however large the model."""
    path, config, digest = _open(name_or_uri)
    if config is None:
        from socarrat.models.diffusers_adapter import describe

        spec, multiple = describe(path)
        return ModelInfo(spec, digest, multiple, "diffusers")
    spec = recorded_spec(config)
    return ModelInfo(spec, digest, spec.downsampling, "socarrat")


def load_checkpoint(name_or_uri: str | None = None, device: str | torch.device = "cpu") -> tuple[GaussianModel, dict]:
    """Load a bundled model by name, a local directory or an s3:// prefix (a Socarrat checkpoint, or a
    diffusers pipeline: one with model_index.json).

    Returns the model in eval mode (float32 weights on `device`) and its config dict, whose
    "sha256" is the model digest. None means the default bundled model.
    """
    path, config, digest = _open(name_or_uri)
    if config is None:
        from socarrat.models.diffusers_adapter import DiffusersModel

        model = DiffusersModel.load(path)
        return model.to(device), {"model": model.spec.model_dump(mode="json"), "sha256": digest}
    model = build_model(recorded_spec(config))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path / WEIGHTS)).items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing, unexpected or misshapen tensors: config and weights disagree
        detail = " ".join(str(err).split())[:300]
        raise UserError(f"checkpoint {name_or_uri or DEFAULT_MODEL}: its {WEIGHTS} does not fit the model its "
                        f"{CONFIG} describes ({detail})") from None
    return model.to(device).eval(), config
