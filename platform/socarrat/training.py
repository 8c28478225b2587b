"""Training pieces shared by `jobs/train.py` and the tests: data, objective, EMA, checkpoints.

The objective is a module (`forward(images, captions) -> loss`) so that DDP sees one forward that
covers the text encoder and the denoiser. Knows nothing of Ray: the job wraps `train` in a Ray
Train worker loop and passes the rank, the world size and a `wrap` for DDP.
"""

from __future__ import annotations

import copy
import io
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from socarrat import storage
from socarrat.checkpoint import (CONFIG, WEIGHTS_DTYPE, describe_checkpoint, latest_checkpoint, load_checkpoint,
                                 recorded_spec, save_checkpoint)
from socarrat.config import ModelSpec
from socarrat.errors import UserError
from socarrat.models import GaussianModel, TokenModel, build_model
from socarrat.models.paella import add_noise
from socarrat.sampling.schedules import alphas_cumprod
from socarrat.shards import list_shards, read_shard

STATE = "train_state.pt"
LossWeighting = Literal["min-snr", "capped-v"]


class TrainConfig(BaseModel):
    """Everything one training run needs; CLI flags mirror these names."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # an lr of inf trains NaN weights

    shards: str = Field(description="URI of a folder/prefix of webdataset .tar shards (png + txt)")
    out: str = Field(description="URI where step-XXXXXXXX checkpoints are written")
    model: ModelSpec = ModelSpec()
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1, description="per worker")
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    cooldown_steps: int = Field(0, ge=0, description="the last steps of the run decay lr linearly to 0 "
                                "(warmup-stable-decay): a constant-lr run, resumed or started with --init, "
                                "ends on an annealed model")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    uncond_prob: float = Field(0.1, ge=0, le=1, description="caption dropped (for CFG)")
    min_snr_gamma: float = Field(5.0, gt=0, description="the cap gamma of the loss weights (see loss_weighting)")
    loss_weighting: LossWeighting | None = Field(
        None, description="the weight of each noise level's x0 error: min-snr = min(SNR, gamma) (Hang et al. 2023), "
        "near 0 on the high-noise steps where the layout is decided, so placement words are not learnt; capped-v = "
        "min(SNR + 1, gamma), the plain v-loss with only the low-noise steps capped (v-prediction only). "
        "Default: capped-v for v-prediction, min-snr for eps")
    vq_steps: int = Field(2000, ge=0, description="token family: the first steps train the VQ tokenizer, "
                          "the rest the denoiser on its frozen tokens")
    checkpoint_every: int = Field(500, ge=1)
    max_minutes: float | None = Field(None, gt=0, description="stop (with a checkpoint) at the first --log-every "
                                      "step past this wall time: training that must fit one machine lease; "
                                      "the same command resumes; unset: no limit")
    log_every: int = Field(50, ge=1)
    init: str | None = Field(None, description="a checkpoint (bundled name, path or s3://) of this very model spec "
                             "whose weights start this run (fresh optimiser, step 0): go on training a model whose "
                             "train_state.pt is gone, or fine-tune one; token family: --vq-steps 0 keeps its VQ")
    init_text: str | None = Field(None, description="a checkpoint (bundled name, path or s3://) whose text encoder "
                                  "starts this run's: a new backbone learns against a trained text tower")
    seed: int = Field(0, ge=0)
    compile: bool = Field(False, description="run the training objective under torch.compile")

    @model_validator(mode="after")
    def _one_start(self) -> "TrainConfig":
        if self.init and self.init_text:
            raise ValueError("give init or init_text, not both (init already holds a text encoder)")
        if self.loss_weighting == "capped-v" and self.model.prediction != "v":
            raise ValueError("loss_weighting capped-v needs v-prediction (on eps its weights grow without bound "
                             "as SNR -> 0): use min-snr")
        if self.model.family == "token" and self.vq_steps >= self.steps:
            raise ValueError(f"the token family trains its VQ for the first vq_steps ({self.vq_steps}) of the "
                             f"{self.steps} steps, so its denoiser would never train: give more steps than "
                             "vq_steps (or vq_steps 0 with init of a trained token model)")
        return self


def default_weighting(prediction: str) -> LossWeighting:
    """The loss weighting a model of this prediction trains with unless told otherwise."""
    return "capped-v" if prediction == "v" else "min-snr"


def loss_weights(snr: torch.Tensor, gamma: float, weighting: LossWeighting, prediction: str) -> torch.Tensor:
    """The weights of the squared output errors at these SNRs: an x0 error weighs min(SNR, gamma)
    (`min-snr`) or min(SNR + 1, gamma) (`capped-v`), and an output error is the x0 error times
    SNR + 1 for v, times SNR for eps."""
    x0_weight = (snr + 1 if weighting == "capped-v" else snr).clamp(max=gamma)
    return x0_weight / (snr + 1 if prediction == "v" else snr)


class GaussianObjective(nn.Module):
    """Denoising loss: noise images at a uniform random timestep, predict eps or v; each noise level's
    x0 error weighs min(SNR, gamma) (`min-snr`) or min(SNR + 1, gamma) (`capped-v`)."""

    def __init__(self, model: GaussianModel, uncond_prob: float, min_snr_gamma: float,
                 weighting: LossWeighting | None = None):
        super().__init__()
        self.model, self.uncond_prob, self.gamma = model, uncond_prob, min_snr_gamma
        self.weighting = weighting or default_weighting(model.spec.prediction)
        spec = model.spec
        self.register_buffer("alpha_bar", alphas_cumprod(spec.schedule, spec.train_timesteps).float(), persistent=False)

    def forward(self, x0: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """x0 (B, C, H, W) in [-1, 1]; returns the scalar loss."""
        b = len(x0)
        captions = ["" if r < self.uncond_prob else c for r, c in zip(torch.rand(b).tolist(), captions)]
        t = torch.randint(0, len(self.alpha_bar), (b,), device=x0.device)
        a = self.alpha_bar[t][:, None, None, None]
        eps = torch.randn_like(x0)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        out = self.model(xt, t, self.model.encode(captions))
        v = self.model.spec.prediction == "v"
        target = a.sqrt() * eps - (1 - a).sqrt() * x0 if v else eps
        weight = loss_weights(a / (1 - a), self.gamma, self.weighting, self.model.spec.prediction)
        return (weight * (out.float() - target) ** 2).mean()


class VQObjective(nn.Module):
    """The token family's first stage: the VQ tokenizer's own loss (captions unused)."""

    def __init__(self, model: TokenModel):
        super().__init__()
        self.vq = model.vq

    def forward(self, x0: torch.Tensor, captions: list[str]) -> torch.Tensor:
        return self.vq.loss(x0)[0]


class TokenObjective(nn.Module):
    """Paella's loss: noise the (frozen) VQ tokens at a uniform random timestep, predict the clean
    tokens, cross-entropy over every position (arXiv 2211.07292, sec. 3)."""

    def __init__(self, model: TokenModel, uncond_prob: float):
        super().__init__()
        self.model, self.uncond_prob = model, uncond_prob

    def forward(self, x0: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """x0 (B, 3, H, W) in [-1, 1]; returns the scalar loss."""
        captions = ["" if r < self.uncond_prob else c for r, c in zip(torch.rand(len(x0)).tolist(), captions)]
        with torch.no_grad():
            tokens = self.model.tokenize(x0)
        t = torch.randint(0, self.model.spec.train_timesteps, (len(x0),), device=x0.device)
        noised = add_noise(tokens, t, self.model.spec.train_timesteps, self.model.codebook_size)
        return F.cross_entropy(self.model(noised, t, self.model.encode(captions)).float(), tokens)


def stage_at(cfg: TrainConfig, step: int) -> tuple[str, int]:
    """The training stage at `step` and the step it began: the Gaussian family has one stage; the
    token family trains its VQ for `vq_steps` steps, then the denoiser on the frozen VQ."""
    if cfg.model.family == "gaussian":
        return "gaussian", 0
    return ("vq", 0) if step < cfg.vq_steps else ("denoiser", cfg.vq_steps)


def objective_for(stage: str, cfg: TrainConfig, model: nn.Module, ema: nn.Module) -> nn.Module:
    """The loss module of `stage`. Entering "denoiser" freezes the VQ and copies it into the EMA
    model: the denoiser learns the tokens of exactly the VQ weights that are saved with it."""
    if stage == "gaussian":
        return GaussianObjective(model, cfg.uncond_prob, cfg.min_snr_gamma, cfg.loss_weighting)
    if stage == "vq":
        return VQObjective(model)
    model.vq.requires_grad_(False).eval()
    ema.vq.load_state_dict(model.vq.state_dict())
    return TokenObjective(model, cfg.uncond_prob)


@dataclass
class Examples:
    """Decoded training data held in memory: images (N, C, H, W) uint8 and their captions."""

    images: torch.Tensor
    captions: list[str]
    corrupt: int = 0

    def batch(self, rng: np.random.Generator, size: int, device: torch.device) -> tuple[torch.Tensor, list[str]]:
        idx = rng.integers(0, len(self.captions), size)
        # non_blocking: a blocking host-to-device copy waits for the GPU queue to drain, every step
        x = self.images[torch.from_numpy(idx).to(self.images.device, non_blocking=True)].to(device).float() / 127.5 - 1
        return x, [self.captions[i] for i in idx]


def load_examples(uri: str, size_px: int) -> Examples:
    """Read every shard under `uri` (png + txt per sample), resized to size_px; corrupt samples are
    skipped and counted. The shapes dataset is tens of MB, so it is decoded once into memory."""
    images, captions, stats = [], [], {"corrupt": 0}
    for shard in tqdm(list_shards(uri), desc="reading shards"):
        for key, members in read_shard(shard, stats):
            try:
                img = Image.open(io.BytesIO(members["png"])).convert("RGB")
                caption = members["txt"].decode()
            except Exception:  # a bad member of a good shard: skip it, count it
                stats["corrupt"] += 1
                continue
            if img.size != (size_px, size_px):
                img = img.resize((size_px, size_px), Image.BILINEAR)
            images.append(np.asarray(img))
            captions.append(caption)
    if not images:
        raise UserError(f"no readable samples in the shards under {uri}")
    return Examples(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions, stats["corrupt"])


def resume_point(cfg: TrainConfig) -> tuple[int, str, dict] | None:
    """(step, URI, its config.json) of the checkpoint a run of `cfg` resumes from, or None; UserError if that
    checkpoint's model spec is not `cfg.model` (a different run's output folder) or it holds weights
    without their train_state.pt (weights copied there, say)."""
    if found := latest_checkpoint(cfg.out):
        recorded = json.loads(storage.read_bytes(storage.join(found[1], CONFIG)))
        saved = recorded_spec(recorded)
        if saved != cfg.model:
            raise UserError(f"cannot resume from {found[1]}: its model spec differs from the requested one "
                            f"({spec_difference(saved, cfg.model)})")
        vq_steps = recorded.get("training", {}).get("config", {}).get("vq_steps", cfg.vq_steps)
        if cfg.model.family == "token" and vq_steps != cfg.vq_steps:
            raise UserError(f"cannot resume from {found[1]}: its run trains the VQ for the first {vq_steps} steps, "
                            f"this one asks for {cfg.vq_steps}; give --vq-steps {vq_steps} to go on with it")
        if not storage.open_store(found[1]).exists(STATE):
            raise UserError(f"cannot resume from {found[1]}: it has weights but no {STATE} (optimiser and raw "
                            f"weights); start a new run from them with --init {found[1]} and another --out")
        return (*found, recorded)
    return None


def spec_difference(there: BaseModel, here: BaseModel) -> str:
    """The fields two specs of one type disagree on, for an error message: `name: A there, B here`."""
    a, b = there.model_dump(), here.model_dump()
    return ", ".join(f"{k}: {a[k]} there, {b[k]} here" for k in a if a[k] != b[k])


def preflight(cfg: TrainConfig) -> None:
    """The checks a user mistake fails, cheap enough for a driver before any worker starts:
    shards to read, a checkpoint to resume that fits the spec, weights to start from that fit it
    (read from the start checkpoint's config alone: the driver never holds the model)."""
    list_shards(cfg.shards)
    storage.check_writable(cfg.out)  # not at the first checkpoint, an hour in
    if resume_point(cfg):  # a resumed run's start (its VQ included) was checked when it began
        return
    if cfg.model.family == "token" and cfg.vq_steps == 0 and not cfg.init:
        raise UserError("vq_steps 0 trains the denoiser on the tokens of an untrained VQ: give --init, a trained "
                        "token model whose VQ it keeps, or --vq-steps > 0")
    if cfg.init or cfg.init_text:
        info = describe_checkpoint(cfg.init or cfg.init_text)
        _check_start(cfg, info.spec if info.format == "socarrat" else None)


def initial_weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The state dict (float32) a new run starts from: checkpoint `cfg.init` whole, or the text encoder
    of `cfg.init_text`; UserError unless it is a Socarrat checkpoint whose spec (or text encoder spec)
    is this run's."""
    donor, _ = load_checkpoint(cfg.init or cfg.init_text)
    # A diffusers pipeline's spec carries the default TextEncoderSpec, but its encoder is CLIP's, not ours.
    _check_start(cfg, donor.spec if hasattr(donor, "text") else None)
    return {k: v.float() for k, v in (donor if cfg.init else donor.text).state_dict().items()}


def _check_start(cfg: TrainConfig, donor: ModelSpec | None) -> None:
    """UserError unless the start checkpoint's spec `donor` (None: not a Socarrat checkpoint) is this
    run's, whole for `init`, in its text encoder for `init_text`."""
    flag, source = ("init", cfg.init) if cfg.init else ("init_text", cfg.init_text)
    if donor is None:
        raise UserError(f"{flag} {source!r}: not a Socarrat checkpoint")
    there, here = (donor, cfg.model) if cfg.init else (donor.text, cfg.model.text)
    if there != here:
        what = "model spec" if cfg.init else "text encoder spec"
        raise UserError(f"{flag} {source!r}: its {what} is not this run's ({spec_difference(there, here)})")


def lr_at(cfg: TrainConfig, step: int, stage_start: int = 0) -> float:
    """The learning rate of `step`: linear warm-up from the start of its stage, constant, then a
    linear cooldown to 0 over the run's last `cooldown_steps` (Hägele et al. 2024, arXiv 2405.18392:
    such a cooldown matches a cosine schedule without fixing the run's length in advance)."""
    warmup = min(1.0, (step - stage_start + 1) / max(1, cfg.warmup_steps))
    cooldown = min(1.0, (cfg.steps - step) / cfg.cooldown_steps) if cfg.cooldown_steps else 1.0
    return cfg.lr * min(warmup, cooldown)


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)
    checkpoint: str | None = None
    images_per_s: float = 0.0


def train(
    cfg: TrainConfig,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    report: Callable[[dict], None] = lambda metrics: None,
) -> TrainResult:
    """Train `cfg.model` on `cfg.shards`, resuming from the newest checkpoint under `cfg.out`.

    Rank 0 writes a checkpoint every `checkpoint_every` steps and at the end: the EMA weights (fp16,
    loadable by `Generator`) plus `train_state.pt` (raw weights, EMA, optimiser).
    """
    began = time.perf_counter()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    start = 0
    if found := resume_point(cfg):
        start, uri, recorded = found
        say = tqdm.write if rank == 0 else lambda text: None
        say(f"resuming from {uri}" + (": --init and --init-text only start a new run, so they are not used"
                                      if cfg.init or cfg.init_text else ""))
        # Where the run began, as its checkpoints have recorded it: the ones written now say it too.
        origin = recorded.get("training", {}).get("config", {})
        cfg = cfg.model_copy(update={"init": origin.get("init"), "init_text": origin.get("init_text")})
        if start >= cfg.steps:
            say(f"nothing to train: {uri} is at step {start} of --steps {cfg.steps}; raise --steps to go on")
        state = torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, STATE))), map_location=device)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
    elif cfg.init or cfg.init_text:
        weights = initial_weights(cfg)
        for m in (model, ema):
            (m if cfg.init else m.text).load_state_dict(weights)
    _same_on_every_rank(start, device)
    data = load_examples(cfg.shards, cfg.model.size_px)
    data.images = data.images.to(device)  # tens to hundreds of MB: no host gather or copy per step
    # Batches (numpy) and noise, timesteps, caption dropout (torch) differ per rank and per resume.
    rng = np.random.default_rng([cfg.seed, rank, start])
    torch.manual_seed(int(rng.integers(2**63)))
    result = TrainResult(start)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="training", disable=rank != 0)
    t0, seen, logged = time.perf_counter(), 0, 0  # logged: the losses already in a log line
    pending: list[torch.Tensor] = []  # this step's and earlier losses not yet read back from the device
    stage = None
    for step in bar:
        now, now_start = stage_at(cfg, step)
        if now != stage:
            stage, stage_start = now, now_start
            objective = wrap(objective_for(stage, cfg, model, ema).to(device))
            if cfg.compile:
                objective = torch.compile(objective)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, stage_start)
        x0, captions = data.batch(rng, cfg.batch_size, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = objective(x0, captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step - stage_start) / (10 + step - stage_start))  # short memory early in a stage
        with torch.no_grad():  # one fused launch per dtype, not one per tensor: small models are launch-bound
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        # Read back at log and checkpoint steps only: a .item() per step would stall the GPU queue.
        pending.append(torch.stack([loss.detach().float(), grad_norm.float()]))
        seen += cfg.batch_size * world_size
        result.step = step + 1
        logging = result.step % cfg.log_every == 0 or result.step == cfg.steps
        out_of_time = (cfg.max_minutes is not None and result.step % cfg.log_every == 0
                       and _on_any_rank(time.perf_counter() - began > 60 * cfg.max_minutes, device))
        checkpointing = result.step % cfg.checkpoint_every == 0 or result.step == cfg.steps or out_of_time
        if logging or checkpointing:
            checked = len(result.losses)
            read = torch.stack(pending).tolist()
            pending.clear()
            result.losses += [value for value, _ in read]
            # A non-finite loss, gradient or (where a checkpoint is due) weight: stop before a checkpoint
            # takes the weights. The last update can break them after its loss and gradient were fine.
            finite = np.isfinite(read).all() and (not checkpointing or _finite(model) and _finite(ema, WEIGHTS_DTYPE))
            if _on_any_rank(not finite, device):
                last = latest_checkpoint(cfg.out)
                where = f"the newest checkpoint, {last[1]}, is from before" if last else "no checkpoint was written"
                raise UserError(f"training diverged: a loss, gradient or weight was not finite in steps "
                                f"{start + checked + 1}-{result.step}; {where}. Run again with a lower --lr "
                                "(it resumes from that checkpoint)")
        if logging:
            result.images_per_s = seen / (time.perf_counter() - t0)
            recent, logged = float(np.mean(result.losses[logged:])), len(result.losses)
            bar.set_postfix(loss=f"{recent:.4f}", img_s=f"{result.images_per_s:.0f}")
            report({"step": result.step, "loss": recent, "images_per_s": result.images_per_s})
        if rank == 0 and checkpointing:
            result.checkpoint = save_training_checkpoint(cfg, model, ema, opt, result.step, data.corrupt, result.images_per_s)
            tqdm.write(f"checkpoint written: {result.checkpoint}")
        if out_of_time:
            break
    return result


def _same_on_every_rank(step: int, device: torch.device) -> None:
    """UserError unless every DDP rank resumes at `step`: ranks that disagree would run loops of
    other lengths, and hang in an all-reduce, or step other optimiser states."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    steps = torch.tensor([step, -step], device=device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    if steps[0].item() != -steps[1].item():
        raise UserError(f"the training workers found different checkpoints to resume (steps {-steps[1].item()} to "
                        f"{steps[0].item()}) under a local --out that only one node writes: use shared storage "
                        "(s3://) for --out when the workers are on several nodes")


def _finite(model: nn.Module, dtype: torch.dtype | None = None) -> bool:
    """Whether every weight is finite, in `dtype` if given (the EMA weights as the checkpoint stores them)."""
    return bool(torch.stack([p.to(dtype or p.dtype).isfinite().all() for p in model.parameters()]).all())


def _on_any_rank(flag: bool, device: torch.device) -> bool:
    """True on every DDP rank if `flag` is True on any, so that all ranks stop at the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    any_flag = torch.tensor([float(flag)], device=device)
    dist.all_reduce(any_flag, op=dist.ReduceOp.MAX)
    return bool(any_flag.item())


def save_training_checkpoint(cfg: TrainConfig, model: nn.Module, ema: GaussianModel, opt: torch.optim.Optimizer, step: int, corrupt: int, images_per_s: float) -> str:
    """Write `out/step-XXXXXXXX/` (resume reads the step from the name): train_state.pt first, then the
    EMA model (config.json last)."""
    uri = storage.join(cfg.out, f"step-{step:08d}")
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict()}, buf)
    storage.open_store(uri).put_bytes(STATE, buf.getvalue())
    train_info = {"step": step, "corrupt_samples": corrupt, "images_per_s": round(images_per_s, 1), "config": cfg.model_dump(mode="json", exclude={"model"})}
    save_checkpoint(ema, uri, extra={"training": train_info})
    return uri
