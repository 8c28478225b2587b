"""Mass generation on Ray Data: prompt files -> images in webdataset shards + a parquet manifest.

    python -m jobs.generate --prompts examples/prompts.txt --out out/run1
    ray job submit --working-dir . -- python -m jobs.generate --prompts s3://b/prompts.parquet --out s3://b/run1

Prompt files are .jsonl, .csv, .txt (one prompt a line) or .parquet, local or s3://, one file, a
folder or prefix, or a glob. Columns: `prompt`, and optionally `id`, `seed`, `negative_prompt`,
`steps`, `guidance`; others are ignored. Their values are read as written: no reader guesses types
("007" stays "007"). A bad row or .jsonl line goes to failures.jsonl with its reason and the job goes
on; a file that cannot be parsed, or has no prompts, stops it (exit 2).

The pipeline: `ray.data.read_*` -> check rows (`socarrat.massgen.check_rows`) -> plan in the driver
(drop done keys, cut shards; the driver holds one small record per image, not the images) -> an
autoscaling pool of model-holding actors, one shard per call -> publish the shard. Run the same
command again to resume: the output layout and the exactly-once protocol are in `socarrat.massgen`.
One run per --out at a time: a second run into the same --out stops with an error while the first
lives (`socarrat.massgen.hold_lease`).

Two environment variables inject faults for the tests: SOCARRAT_FAULT_ACTOR_EXIT=<stage>:<path> makes
the first actor to create <path> exit at <stage> of a shard, `rendered` (not published) or `published`
(not yet returned) (several such faults: separate them with commas), and
SOCARRAT_FAULT_ACTOR_EXIT=always makes every actor exit once rendered; and
SOCARRAT_FAULT_DRIVER_EXIT_AFTER_SHARDS=<n> makes the driver make the first n planned shards only,
then exit hard, as if killed there (no summary).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
import uuid
import warnings
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import ray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from socarrat import massgen, shards, storage
from socarrat.cli import add_precision_flag, add_sampler_flags, one_line, sampler_spec, with_default
from socarrat.checkpoint import describe_checkpoint
from socarrat.config import COMPILE_HELP, PRECISION_HELP, Precision, SamplerSpec, check_size
from socarrat.errors import UserError
from socarrat.generator import Generator, resolve_spec

_ACTOR_EXIT = "SOCARRAT_FAULT_ACTOR_EXIT"
_DRIVER_EXIT_AFTER = "SOCARRAT_FAULT_DRIVER_EXIT_AFTER_SHARDS"
# The last line of the traceback of one of our user errors, as Ray gives it for a failed actor call.
_USER_ERROR_LINE = re.compile(r"^socarrat\.errors\.\w+: (.*)$", re.MULTILINE)
_SHARD_RETRIES = 3  # attempts at a shard after the first, each on a restarted actor


class GenerateJob(BaseModel):
    """A mass-generation run; the CLI flags mirror these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: str = Field(min_length=1, description="prompt file, folder, prefix or glob; local or s3://")
    out: str = Field(min_length=1, description="output folder or s3:// prefix")
    model: str | None = Field(None, description="bundled name, checkpoint dir or s3:// prefix; None: the default, shapes-gaussian")
    images_per_prompt: massgen.ImagesPerPrompt = 1
    spec: SamplerSpec = SamplerSpec()
    seed_base: massgen.SeedBase = 0
    batch_size: int = Field(32, ge=1, description="images per model call")
    shard_size: int = Field(1024, ge=1, description="images per tar shard; a multiple of batch_size wastes nothing")
    num_gpus_per_worker: float | None = Field(None, ge=0, description=(
        "fractions allowed; None: 1 if the cluster has GPUs at the start, else 0 (on a cluster that "
        "adds GPU workers on demand, give it)"))
    num_cpus_per_worker: float = Field(1, gt=0)
    precision: Precision = Field("auto", description=PRECISION_HELP)
    compile: bool = Field(False, description=COMPILE_HELP)
    min_workers: int = Field(1, ge=1)
    max_workers: int | None = Field(None, ge=1, description="None: as many as the cluster fits")

    @model_validator(mode="after")
    def _check(self) -> GenerateJob:
        if self.max_workers is not None and self.max_workers < self.min_workers:
            raise ValueError(f"max_workers={self.max_workers} is below min_workers={self.min_workers}")
        return self


class ShardMaker:
    """A pool actor: loads the model once, then renders and publishes one shard per call."""

    def __init__(self, model: str | None, out: str, run_id: str, batch_size: int, exit_marker: str | None, digest: str,
                 precision: Precision = "auto", compile: bool = False):
        self.generator = Generator.load(model, precision=precision, compile=compile)
        # The checkpoint replaced at its URI since the driver read it, or another one at the same
        # local path on this node, would give images that job.json and the manifest do not describe.
        if self.generator.digest != digest:
            raise UserError(f"model {model or 'default'} has digest {self.generator.digest} on this worker, "
                            f"not the driver's {digest}; give every node the same checkpoint")
        self.store = storage.open_store(out)
        self.run_id, self.batch_size, self.exit_marker = run_id, batch_size, exit_marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        stats = [self._make(str(name), massgen.TASKS.validate_json(tasks))
                 for name, tasks in zip(batch["shard"], batch["tasks"])]
        return {f.name: [getattr(s, f.name) for s in stats] for f in dataclasses.fields(massgen.ShardStats)}

    def _make(self, name: str, tasks: list[massgen.ImageTask]) -> massgen.ShardStats:
        # Published by an earlier attempt whose actor died before returning: made by this run all the same.
        if self.store.exists(f"{shards.MANIFEST_DIR}/{name}.parquet"):
            return massgen.ShardStats(shard=name, images=len(tasks), model_calls=0, published=True,
                                      render_s=0.0, encode_s=0.0, publish_s=0.0)
        t0 = time.perf_counter()
        results, calls = massgen.render(self.generator, tasks, self.batch_size)
        t1 = time.perf_counter()
        if self._fault("rendered"):
            os._exit(1)
        published, encode_s = massgen.publish(self.store, self.run_id, name, tasks, results)
        publish_s = time.perf_counter() - t1 - encode_s
        if self._fault("published"):
            os._exit(1)
        return massgen.ShardStats(shard=name, images=len(tasks), model_calls=calls, published=published,
                                  render_s=t1 - t0, encode_s=encode_s, publish_s=publish_s)

    def _fault(self, stage: str) -> bool:
        """Whether the injected fault (SOCARRAT_FAULT_ACTOR_EXIT, see the module docstring) strikes at `stage`."""
        for fault in (self.exit_marker or "").split(","):
            when, _, marker = fault.partition(":")
            if (when == "always" and stage == "rendered") or (when == stage and _first_to_create(marker)):
                return True
        return False


def run(job: GenerateJob) -> dict[str, Any]:
    """Make every image of `job` not made yet; returns the summary (also written as summary.json).
    Connects to the Ray cluster, or starts a local one, unless Ray is initialised already."""
    t0 = time.perf_counter()
    files = massgen.prompt_files(job.prompts, job.out)
    # The driver reads the model's spec and digest, never its weights: a missing or corrupt model,
    # or a size it cannot make, fails here, before any GPU work, however large the model.
    model = describe_checkpoint(job.model)
    max_steps = model.spec.train_timesteps
    # The model's defaults filled in: keys do not depend on how they were given.
    spec = massgen.check_spec(resolve_spec(model.spec, job.spec), max_steps)
    check_size(spec.height_px or model.spec.size_px, spec.width_px or model.spec.size_px, model.pixel_multiple)
    settings = massgen.RunSettings(model_digest=model.digest, spec=spec, images_per_prompt=job.images_per_prompt,
                                   seed_base=job.seed_base, precision=job.precision)
    store = storage.open_store(job.out)
    massgen.claim_output(store, settings)
    run_id = _run_id()
    with massgen.hold_lease(store, run_id):
        massgen.confirm_settings(store, settings)
        if not ray.is_initialized():
            ray.init()
        checked = _read_rows(files, settings, max_steps)
        if not checked:
            raise UserError(f"no prompts in {job.prompts}: its {len(files)} prompt file(s) hold no rows")
        massgen.check_prompt_column(checked)
        plan = massgen.make_plan(checked, massgen.done_keys(store), job.shard_size)
        shards.remove_incomplete(store)
        massgen.write_failures(store, plan.failures)
        t1 = time.perf_counter()
        todo, exit_after = plan.shards, os.environ.get(_DRIVER_EXIT_AFTER)
        if exit_after:
            todo = todo[:int(exit_after)]
        stats = _make_shards(job, settings.model_digest, run_id, todo)
        if exit_after:
            os._exit(3)  # as if killed: the lease stays behind, held by a process that is gone
        t2 = time.perf_counter()
        summary = massgen.summarize(plan, stats, wall_s=t2 - t0, stage_s=t2 - t1)
        massgen.check_lease(store, run_id)
        massgen.write_summary(store, summary)
    return summary


def _run_id() -> str:
    """The Ray job's submission id when `ray job submit` started this driver, else a random id. The
    job supervisor hands the id to the driver in this variable (ray/dashboard/modules/job/job_supervisor.py)."""
    config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return config.get("metadata", {}).get("job_submission_id") or f"local-{uuid.uuid4().hex[:12]}"


# Text columns stay text: read_json(lines=True) goes through pandas and read_csv through pyarrow's
# type inference, which turn the ids "007" and "7" into one int, a prompt "1984" into an int and a
# column of large seeds with gaps into float64. So a .jsonl file is read as lines (check_rows parses
# them, a bad line failing alone), and a .csv file with our columns as strings.
_CSV_TYPES = pacsv.ConvertOptions(column_types=dict.fromkeys(massgen.COLUMNS, pa.string()),
                                  strings_can_be_null=True, null_values=[""])  # not "NA", "null", ...
_READERS = {
    ".jsonl": lambda paths: ray.data.read_text(paths, include_paths=True),
    ".csv": lambda paths: ray.data.read_csv(paths, include_paths=True, convert_options=_CSV_TYPES),
    ".txt": lambda paths: ray.data.read_text(paths, include_paths=True).rename_columns({"text": "prompt"}),
    ".parquet": lambda paths: ray.data.read_parquet(paths, include_paths=True),
}


def _read_rows(files: list[str], settings: massgen.RunSettings, max_steps: int) -> list[dict[str, str]]:
    """Read every prompt file with Ray Data and check its rows, one block at a time (files may
    differ in their columns and types). A file that cannot be read is a UserError; an error in our
    own code keeps its traceback."""
    by_format: dict[str, list[str]] = {}
    for uri in files:
        fmt = next(e for e in massgen.PROMPT_FORMATS if uri.endswith(e))
        by_format.setdefault(fmt, []).append(uri.removeprefix("file://"))
    parts = []
    for fmt, paths in sorted(by_format.items()):
        try:  # read_parquet reads the footers here, in the driver
            parts.append(_READERS[fmt](paths))
        except (pa.ArrowException, OSError) as err:
            raise _unreadable(paths, err) from None
    dataset = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    checked = dataset.map_batches(
        lambda table: massgen.check_rows(table.to_pylist(), settings, max_steps), batch_size=None, batch_format="pyarrow")
    try:
        return list(checked.iter_rows())
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, ray.exceptions.UserCodeException):  # raised by check_rows: our bug
            raise
        raise _unreadable(files, err.cause.__cause__ or err.cause) from None  # Ray Data may wrap it once more


def _unreadable(paths: list[str], err: BaseException) -> UserError:
    return UserError(f"cannot read the prompt files {', '.join(paths)}: {str(err).splitlines()[0]}")


def _make_shards(job: GenerateJob, digest: str, run_id: str,
                 todo: list[tuple[str, list[massgen.ImageTask]]]) -> list[massgen.ShardStats]:
    """Make the shards of `todo` on a pool of ShardMaker actors; a UserError of theirs (a model
    missing or different on a worker node, the lease lost), or a shard that killed its worker on
    every attempt, as one line."""
    try:
        return [massgen.ShardStats(**row) for row in _shard_pool(job, digest, run_id, todo)]
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
        found = _USER_ERROR_LINE.findall(str(err))
        init_failed = getattr(err, "actor_init_failed", False)
        if found:
            raise UserError(f"a shard worker {'could not start' if init_failed else 'stopped'}: {found[-1]}") from None
        if init_failed or not isinstance(err, ray.exceptions.RayActorError):
            raise
        raise UserError(f"a shard worker died on each of {_SHARD_RETRIES + 1} attempts at one shard (out of memory? "
                        "see the Ray logs); the shards published are kept: rerun to resume, perhaps with a smaller "
                        "--batch-size") from None


def _shard_pool(job: GenerateJob, digest: str, run_id: str,
                todo: list[tuple[str, list[massgen.ImageTask]]]) -> Iterator[dict[str, Any]]:
    if not todo:
        return iter(())
    items = [{"shard": name, "tasks": massgen.TASKS.dump_json(tasks).decode()} for name, tasks in todo]
    num_gpus = job.num_gpus_per_worker
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing max_task_retries as a remote argument but offers no named
        # parameter for it yet: the warning would only puzzle users.
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", ray.util.annotations.RayDeprecationWarning)
        made = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardMaker,
            batch_size=1,  # one shard per call: a shard is what a crash retries and what a rerun skips
            # Ray Data gives pool actors max_restarts=-1 and max_task_retries=-1 unless told otherwise
            # (ActorPoolMapOperator._apply_default_remote_args): a dead actor is restarted and its
            # shards retried, which the crash test checks. Bounded here: a shard that kills its actor
            # every time (out of memory, say) ends the run with an error, and a rerun resumes it.
            max_task_retries=_SHARD_RETRIES,
            compute=ray.data.ActorPoolStrategy(min_size=job.min_workers, max_size=job.max_workers),
            num_gpus=num_gpus,
            num_cpus=job.num_cpus_per_worker,
            fn_constructor_kwargs={"model": job.model, "out": job.out, "run_id": run_id, "batch_size": job.batch_size,
                                   "exit_marker": os.environ.get(_ACTOR_EXIT), "digest": digest,
                                   "precision": job.precision, "compile": job.compile},
        )
    return made.iter_rows()


def _first_to_create(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def format_summary(out: str, s: dict[str, Any]) -> str:
    """The summary as a small table for the terminal."""
    rows = [
        ("rows read", f"{s['rows']}  ({s['rows_failed']} failed, see failures.jsonl; {s['rows_duplicate']} duplicates)"),
        ("images expected", f"{s['images_expected']}"),
        ("done before this run", f"{s['images_done_before']}"),
        ("generated now", f"{s['images_generated']}  in {s['shards_published']}/{s['shards_planned']} shards, "
                          f"{s['model_calls']} model calls"),
        ("wall time", f"{s['wall_s']:.1f} s  (startup {s['startup_s']:.1f} s, shards {s['stage_s']:.1f} s)"),
        ("images/s in shards", f"{s['images_per_s']:.2f}"),
        ("actor time", f"render {s['render_s']:.1f} s, encode {s['encode_s']:.1f} s, publish {s['publish_s']:.1f} s"),
    ]
    return "\n".join([f"jobs.generate -> {out}", *(f"  {k:<22}{v}" for k, v in rows)])


def main(argv: list[str] | None = None) -> int:
    fields = GenerateJob.model_fields
    p = argparse.ArgumentParser(prog="jobs.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", required=True, help=fields["prompts"].description)
    p.add_argument("--out", required=True, help=fields["out"].description)
    p.add_argument("--model", default=None, help=fields["model"].description)
    add_sampler_flags(p)
    add_precision_flag(p)
    p.add_argument("--compile", action="store_true", help=fields["compile"].description)
    for name, kind in [("images_per_prompt", int), ("seed_base", int), ("batch_size", int), ("shard_size", int),
                       ("min_workers", int), ("max_workers", int), ("num_gpus_per_worker", float),
                       ("num_cpus_per_worker", float)]:
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=fields[name].default,
                       help=with_default(fields[name].description, fields[name].default))
    args = p.parse_args(argv)
    try:
        job = GenerateJob(spec=sampler_spec(args), **{k: v for k, v in vars(args).items() if k in fields})
        summary = run(job)
    except (UserError, ValidationError) as err:
        print(f"jobs.generate: error: {one_line(err)}", file=sys.stderr)
        return 2
    print(format_summary(job.out, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
