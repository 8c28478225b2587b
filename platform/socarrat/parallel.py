"""Picard rounds sharded over a group of Ray actors that each hold the model.

`PicardGroup` starts K actors (`num_gpus_per_actor=1/K` shares one GPU; 0 runs them on CPUs); each
loads the model once, of any family. `group.conditioned(cond, guidance)` sends one request's
conditioning to every actor once and yields a `denoise` callable and a stand-in for the
conditioning, which `socarrat.sampling.picard.sample_picard` (or `sample`) takes in place of a
local denoiser and `cond`; it is a `socarrat.generator.DenoiserSource`, so
`generator.generate(..., denoiser=group.conditioned)` runs a whole request, edits included, on the
group. Per round only the window's states, timesteps and row numbers travel to the actors, and
their model outputs travel back.

A lost actor fails the request with `WorkerLostError`, never with a partial or silently wrong
image; the group replaces the actor before its next request. The samplers stay pure: Ray lives here.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import ray
import torch
from ray.exceptions import RayActorError, RayError

from socarrat.config import Precision, check_precision
from socarrat.errors import UserError
from socarrat.generator import default_device, model_precision
from socarrat.sampling import Denoise, cfg_denoiser
from socarrat.sampling.picard import take_rows


WAIT_NOTICE_S = 60.0  # how often a group still waiting for its actors says so


class WorkerLostError(RuntimeError):
    """A Picard actor died while sampling: the request produced no image and can be retried."""


@dataclasses.dataclass(frozen=True)
class RemoteRows:
    """Rows of a request's conditioning held by the actors. Indexing selects rows, as it does for a
    `TextEncoding`, so the Picard loop repeats the conditioning per window row without moving it."""

    rows: torch.Tensor | None = None  # (R,) long row numbers in the request's batch; None: all rows

    def __getitem__(self, index: torch.Tensor) -> RemoteRows:
        return RemoteRows(index.cpu() if self.rows is None else self.rows[index.cpu()])


@ray.remote
class DenoiseActor:
    """One model replica on the GPU (share) Ray gave it, or on the CPU where there is none."""

    def __init__(self):
        self.device = default_device()
        self.requests: dict[str, tuple[Denoise, Any]] = {}

    def load(self, model: str | torch.nn.Module, digest: str | None, precision: Precision = "auto") -> None:
        """Load the model; a method, not `__init__`, so that a UserError reaches the caller as itself."""
        from socarrat.checkpoint import load_checkpoint

        if isinstance(model, str):
            uri, (model, config) = model, load_checkpoint(model)
            # A checkpoint replaced at its URI after the caller loaded it would give other images.
            if digest is not None and config["sha256"] != digest:
                raise UserError(f"checkpoint {uri} now has digest {config['sha256']}, not the expected {digest}")
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.precision = precision

    def condition(self, key: str, cond: Any, guidance: float) -> None:
        self.requests[key] = (cfg_denoiser(self.model, guidance), _to_device(cond, self.device))

    def release(self, key: str) -> None:
        self.requests.pop(key, None)

    @torch.inference_mode()
    def denoise(self, key: str, x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        denoise, cond = self.requests[key]
        with model_precision(self.device, self.precision):
            out = denoise(x.to(self.device), t.to(self.device), take_rows(cond, rows.to(self.device)))
        return out.float().cpu()


def _to_device(cond: Any, device: torch.device) -> Any:
    """Conditioning on `device`: a tensor, a dataclass of tensors (TextEncoding) or a tuple of them."""
    if isinstance(cond, tuple):
        return tuple(_to_device(c, device) for c in cond)
    if dataclasses.is_dataclass(cond):
        fields = {f.name: _to_device(getattr(cond, f.name), device) for f in dataclasses.fields(cond)}
        return dataclasses.replace(cond, **fields)
    return cond.to(device)


def split(tensor: torch.Tensor, k: int) -> list[torch.Tensor]:
    """`tensor` in k parts along dim 0 (on the CPU), each a copy of its own: a view would be pickled
    with its whole storage, so every actor would be sent the whole window."""
    return [part.clone() for part in tensor.cpu().tensor_split(k)]


class PicardGroup:
    """K actors that evaluate the rows of each Picard round together.

    `model`: a checkpoint name or URI that each actor loads (`socarrat.checkpoint`), or a model
    object on the CPU, shipped once through the object store; `digest`: the sha256 the checkpoint
    must have (`Generator.digest`), so that actors started later cannot load other weights;
    `precision`: what the actors' model calls compute in on their devices (`socarrat.config.Precision`).
    Actors are named "picard-<random>" (in the caller's namespace), so `ray list actors` shows them.
    """

    def __init__(
        self, model: str | torch.nn.Module, actors: int, num_gpus_per_actor: float = 0.0,
        num_cpus_per_actor: float = 1.0, digest: str | None = None, precision: Precision = "auto",
    ):
        if actors < 1:
            raise UserError(f"actors must be >= 1, got {actors}")
        check_precision(precision)
        self._model = model if isinstance(model, str) else ray.put(model)
        self._options, self._digest = {"num_gpus": num_gpus_per_actor, "num_cpus": num_cpus_per_actor}, digest
        self._precision = precision
        self.actors = self._started(actors)
        self._lost: set[int] = set()

    def _started(self, count: int) -> list[ray.actor.ActorHandle]:
        """`count` new actors with the model loaded. A model that fails to load raises here: a
        UserError (no such checkpoint, another digest) as itself, and no actor is left running."""
        actors = [DenoiseActor.options(name=f"picard-{uuid.uuid4().hex[:12]}", **self._options).remote()
                  for _ in range(count)]
        try:
            loads = [actor.load.remote(self._model, self._digest, self._precision) for actor in actors]
            # No time limit: an autoscaling cluster may take minutes to add the nodes. Say what it waits for.
            while len(ray.wait(loads, num_returns=len(loads), timeout=WAIT_NOTICE_S)[0]) < len(loads):
                logging.getLogger(__name__).warning(
                    "still waiting for %d Picard actors with %s each (the cluster has %s): `ray status` shows "
                    "whether it can add them", count, self._options, ray.cluster_resources())
            ray.get(loads)
        except Exception as err:
            for actor in actors:
                ray.kill(actor)
            if isinstance(err, ray.exceptions.RayTaskError) and isinstance(err.cause, UserError):
                raise UserError(str(err.cause)) from None  # one line, without the remote traceback
            raise
        return actors

    @contextmanager
    def conditioned(self, cond: Any, guidance: float) -> Iterator[tuple[Denoise, RemoteRows]]:
        """Send `cond` (B rows: Generator's (positive, negative) encodings) to every actor once and
        yield (denoise, rows): the sampler's denoiser with CFG at `guidance`, and its conditioning."""
        for i in sorted(self._lost):
            try:
                [self.actors[i]] = self._started(1)
            except UserError as err:  # the request is not at fault: the service is
                raise RuntimeError(f"a lost Picard actor could not be restarted: {err}") from None
            self._lost.discard(i)
        key = uuid.uuid4().hex
        cond_ref = ray.put(_to_device(cond, torch.device("cpu")))  # each actor moves it to its own device
        try:  # released on every actor that lives, even if one dies while taking it
            self._gather([a.condition.remote(key, cond_ref, guidance) for a in self.actors])
            yield self._denoiser(key), RemoteRows()
        finally:
            for i, actor in enumerate(self.actors):
                if i not in self._lost:
                    actor.release.remote(key)

    def _denoiser(self, key: str) -> Denoise:
        def denoise(x: torch.Tensor, t: torch.Tensor, rows: RemoteRows) -> torch.Tensor:
            k = len(self.actors)
            index = torch.arange(len(x)) if rows.rows is None else rows.rows
            shards = [s for s in zip(split(x, k), split(t, k), split(index, k)) if len(s[0])]
            outs = self._gather([actor.denoise.remote(key, *shard) for actor, shard in zip(self.actors, shards)])
            return torch.cat(outs).to(x.device)

        return denoise

    def _gather(self, refs: list[ray.ObjectRef]) -> list[Any]:
        """Every result, or WorkerLostError naming the actors that died (results are all or nothing)."""
        try:
            return ray.get(refs)
        except RayError as err:  # the first error to arrive: an actor's own may come before another's death
            died = []
            for i, ref in enumerate(refs):
                try:
                    ray.get(ref)
                except RayActorError:
                    died.append(i)
                except Exception:  # an actor's own error (out of memory, say): it lives, and the request fails
                    pass
            if not died:
                raise
            self._lost.update(died)
            raise WorkerLostError(
                f"Picard actor(s) {sorted(self._lost)} of {len(self.actors)} died while sampling; this request "
                "produced no image: retry it (the group restarts lost actors before the next request)"
            ) from err
