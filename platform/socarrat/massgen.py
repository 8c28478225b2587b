"""Mass generation without Ray: prompt rows -> keyed image tasks -> a plan of shards -> published shards.

The Data job (`jobs/generate.py`) runs these functions on Ray; the rules live here, so they read and
test without a cluster. Depends on config, generator, shards and storage; knows nothing of Ray.

Keys and seeds. Every image has a key that a rerun assigns again: `{id}-{j}` for a row with an `id`,
else `{digest of prompt, negative prompt, seed and sampler spec}-{j}`, with j < images_per_prompt.
A row with a `seed` gets `seed + j`; one without gets a hash of (seed_base, key base, j). Identical
rows make the same keys and are generated once; rows sharing an id with different content are
rejected, all but the first in (key, content) order.

Output layout under --out (`socarrat.shards` owns the tar + manifest pair):

    job.json                 RunSettings of the images made; a rerun must repeat them (replaced while none is)
    lease.json               the Lease of the run writing now, if any
    shards/{name}.tar        {key}.png + {key}.json per image, members grouped by key
    manifest/{name}.parquet  one row per image: key, shard, prompt, seed, sampler settings, model,
                             whether a prompt was cut to the text context (prompt_truncated,
                             negative_prompt_truncated), the precision the model ran in
    failures.jsonl           the input rows rejected, with the reason
    summary.json             counts and timings of the latest run

Exactly once. A shard is done when its manifest part exists; nothing else counts. A run
(1) reads the keys of done shards, (2) deletes tars without a manifest part (a writer died between
its two uploads), (3) orders the tasks not done by (sampler spec, key) and cuts them into shards of
`shard_size`, each named by a digest of its keys, (4) publishes each shard tar first, manifest
last, both first-writer-wins, so a retried or duplicated attempt changes nothing once one attempt
has published (a run checks first that the store lets only the first writer win:
`check_first_writer_wins`). A key lands in at most one done shard, since done keys are never
planned again and a plan holds each key once, and in at least one, since every key not done is
planned. Removing whole
shards from the order and cutting again gives back the other shards (all but the last are full), so
a rerun of the same command gives each unfinished shard its old name.

One run per --out at a time, since step 2 would delete another run's tar in flight: a run holds
lease.json (`hold_lease`) from before step 1 to its end and refreshes it every LEASE_HEARTBEAT_S. A
lease left by a process of this host that is gone, or one of another host that stays unchanged for
LEASE_STALE_S by the new run's own clock (hosts' clocks may disagree), belongs to a run that died
and is taken over; any other lease makes the new run stop with an error naming the holder. A run
whose lease was taken over all the same (it stalled that long) publishes nothing more
(`check_lease`, before each tar and again before its manifest part). (Two runs that find the same
stale lease at the same instant can both take it over; S3 offers no compare-and-delete that would
close that window. Nor does a check close it: a run that stalls for LEASE_STALE_S between its last
check and a manifest part publishes that part after another run took over; where that run had
replaced job.json, nothing being published yet, the part's images have the old settings.)
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from socarrat import shards, storage
from socarrat.config import MAX_PROMPT_CHARS, Precision, SamplerSpec
from socarrat.errors import NotFoundError, UserError
from socarrat.generator import Generator, Result

PROMPT_FORMATS = (".jsonl", ".csv", ".txt", ".parquet")
JOB, FAILURES, SUMMARY, LEASE = "job.json", "failures.jsonl", "summary.json", "lease.json"
LEASE_HEARTBEAT_S = 30.0
LEASE_STALE_S = 120.0  # four missed heartbeats: a rerun watches the lease of a run killed on another host this long
COLUMNS = ("prompt", "negative_prompt", "id", "seed", "steps", "guidance")  # of input rows; others are ignored
_NO_PROMPT = "prompt is missing"  # the reason for a row without one
_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_GLOB = re.compile(r"[*?\[]")
MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("prompt", pa.string()), ("negative_prompt", pa.string()),
    ("seed", pa.int64()), ("model", pa.string()), ("model_digest", pa.string()), ("sampler", pa.string()),
    ("steps", pa.int32()), ("spacing", pa.string()), ("guidance", pa.float64()),
    ("height_px", pa.int32()), ("width_px", pa.int32()),
    ("prompt_truncated", pa.bool_()), ("negative_prompt_truncated", pa.bool_()),  # longer than the text context
    ("precision", pa.string()),  # "bf16" or "fp32", as the worker resolved it; null in parts written before it
])


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The run settings a user gives (jobs.generate.GenerateJob) and records (RunSettings) alike.
ImagesPerPrompt = Annotated[int, Field(ge=1, le=10_000)]
SeedBase = Annotated[int, Field(ge=0, lt=2**63, description="seeds of rows without one derive from it")]


class RunSettings(_Frozen):
    """Everything that decides a run's images; every run into one --out must repeat it once an image
    is published there. (Precision "auto" is each worker's own: bf16 on a GPU, fp32 on a CPU.)"""

    model_digest: str
    spec: SamplerSpec = SamplerSpec()
    images_per_prompt: ImagesPerPrompt = 1
    seed_base: SeedBase = 0
    precision: Precision = "auto"  # a default, so that job.json files written before it still load


class ImageTask(_Frozen):
    """One image to make: its key, what to draw, and how."""

    key: str
    prompt: str
    negative_prompt: str = ""
    seed: int
    spec: SamplerSpec


TASKS = TypeAdapter(list[ImageTask])


class Lease(_Frozen):
    """Which run is writing into an --out now; times are Unix seconds of the holder's clock, for
    people to read: no run compares them with its own clock."""

    run_id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float


def prompt_files(uri: str, out: str) -> list[str]:
    """The prompt files named by `uri`: one file, a folder or prefix, or a glob (`s3://b/p/*.csv`,
    where `*` stays within one path segment). Folders and globs leave out hidden files and folders
    (`.ipynb_checkpoints/`) and everything under `out`, whose manifest and failures.jsonl would
    read as prompts on a rerun. NotFoundError, before any work starts, when nothing readable is there."""
    glob = _GLOB.search(uri)
    if glob:
        base = uri[:glob.start()].rpartition("/")[0]
        pattern = (uri[len(base) + 1:] if base else uri).split("/")
        store = storage.open_store(base or ".")
        keys = [k for k in _listing(store, out) if len(k.split("/")) == len(pattern)
                and all(map(fnmatch.fnmatchcase, k.split("/"), pattern))]
    else:
        store = storage.open_store(uri)
        keys = _listing(store, out)
        if not keys:  # not a folder or prefix: maybe one file, a key of its parent
            parent, _, name = uri.rstrip("/").rpartition("/")
            store = storage.open_store(parent or ".")
            keys = [name] if store.exists(name) else []
    found = [store.url(k) for k in keys if k.endswith(PROMPT_FORMATS)]
    if not found:
        raise NotFoundError(f"no prompt files ({', '.join(PROMPT_FORMATS)}) at {uri}")
    return found


def _listing(store: storage.Store, out: str) -> list[str]:
    """The keys of `store` but hidden ones and those under `out`."""
    skip = storage.open_store(out).uri + "/"
    return [k for k in store.list()
            if not any(p.startswith(".") for p in k.split("/")) and not store.url(k).startswith(skip)]


def check_spec(spec: SamplerSpec, max_steps: int) -> SamplerSpec:
    """`spec` if a model with `max_steps` train timesteps can sample it, else UserError."""
    if spec.steps is not None and spec.steps > max_steps:
        raise UserError(f"steps must be in 1..{max_steps} for this model, got {spec.steps}")
    return spec


def tasks_for_row(row: Mapping[str, Any], settings: RunSettings, max_steps: int) -> list[ImageTask]:
    """The images of one input row; UserError naming the field when the row is unusable, also for a
    sampler setting the model cannot run (`max_steps`: its train timesteps), which would otherwise
    fail the shard holding the row, on every rerun."""
    prompt = _text(row, "prompt")
    if not prompt.strip():
        raise UserError("prompt is empty")
    negative = _text(row, "negative_prompt", default="")
    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        if len(text) > MAX_PROMPT_CHARS:
            raise UserError(f"{name} has {len(text)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    n = settings.images_per_prompt
    seed = _seed(row.get("seed"), n)
    spec = check_spec(_spec(settings.spec, {k: row[k] for k in ("steps", "guidance") if row.get(k) is not None}), max_steps)
    # Defaults left out: a sampler field added later must not change the keys of earlier runs.
    base = _id(row.get("id")) or _digest([prompt, negative, seed, spec.model_dump(exclude_defaults=True)])
    seeds = [seed + j if seed is not None else _derived_seed(settings.seed_base, base, j) for j in range(n)]
    return [ImageTask(key=f"{base}-{j}", prompt=prompt, negative_prompt=negative, seed=s, spec=spec)
            for j, s in enumerate(seeds)]


def check_rows(rows: Iterable[dict[str, Any]], settings: RunSettings, max_steps: int) -> dict[str, list[str]]:
    """Columns for a batch of input rows: `tasks` (a JSON list of ImageTask, or "") and `error`
    (the reason it was rejected, or ""), beside `source`, the row as JSON. A row of a .jsonl file
    is its line as `text`, parsed here, so that a bad line fails alone."""
    out: dict[str, list[str]] = {"source": [], "tasks": [], "error": []}
    for row in rows:
        tasks, error = "", ""
        try:
            row = _fields(row)
            tasks = TASKS.dump_json(tasks_for_row(row, settings, max_steps)).decode()
        except UserError as err:
            error = str(err)
        out["source"].append(json.dumps(row, default=str, ensure_ascii=False))
        out["tasks"].append(tasks)
        out["error"].append(error)
    return out


def check_prompt_column(checked: Sequence[Mapping[str, str]]) -> None:
    """UserError naming the first prompt file (`path`) none of whose rows has a prompt, with its
    columns: its prompts are in a column of another name, and every row would fail on every rerun."""
    if not any(row["error"] == _NO_PROMPT for row in checked):
        return  # the usual case: no row's source need be parsed
    columns: dict[str, set[str] | None] = {}  # None once a row of the file fails otherwise, or not at all
    for row in checked:
        source = json.loads(row["source"])
        path = source.get("path", "")
        if row["error"] != _NO_PROMPT:
            columns[path] = None
        elif (names := columns.setdefault(path, set())) is not None:
            names.update(source.keys() - {"path"})
    for path, names in columns.items():
        if names is None:
            continue
        if "prompt" in names:
            raise UserError(f"no row of {path} has a prompt: its `prompt` column is empty in every row")
        raise UserError(f"no row of {path} has a prompt; its columns are {', '.join(sorted(names)) or 'none'}; "
                        "name the prompt column `prompt`")


@dataclass
class Plan:
    """What a run has to make, given the checked rows and the keys already done."""

    shards: list[tuple[str, list[ImageTask]]]
    failures: list[dict]
    rows: int
    rows_duplicate: int
    images_expected: int
    images_done_before: int


def make_plan(checked: Iterable[Mapping[str, str]], done_keys: set[str], shard_size: int) -> Plan:
    """Cut the tasks of `checked` rows (from `check_rows`) that are not in `done_keys` into shards."""
    failures, valid, rows = [], [], 0
    for row in checked:
        rows += 1
        if row["error"]:
            failures.append({"row": json.loads(row["source"]), "reason": row["error"]})
        else:
            valid.append((TASKS.validate_json(row["tasks"]), row["tasks"], row["source"]))
    tasks, duplicates, clashes = _unique_tasks(valid)
    todo = sorted((t for k, t in tasks.items() if k not in done_keys), key=lambda t: (t.spec.model_dump_json(), t.key))
    cuts = [todo[i:i + shard_size] for i in range(0, len(todo), shard_size)]
    return Plan(
        shards=[(_digest([t.key for t in cut], prefix="shard-"), cut) for cut in cuts],
        failures=failures + clashes, rows=rows, rows_duplicate=duplicates,
        images_expected=len(tasks), images_done_before=len(tasks) - len(todo),
    )


def _unique_tasks(valid: list[tuple[list[ImageTask], str, str]]) -> tuple[dict[str, ImageTask], int, list[dict]]:
    """Tasks by key, keeping the first row of each key base in (key, content) order; returns them,
    the count of identical repeats, and a failure for each row whose id clashes with other content."""
    tasks: dict[str, ImageTask] = {}
    duplicates, clashes = 0, []
    for row_tasks, _, source in sorted(valid, key=lambda v: (v[0][0].key, v[1])):
        first = tasks.get(row_tasks[0].key)
        if first is None:
            tasks.update((t.key, t) for t in row_tasks)
        elif first == row_tasks[0]:
            duplicates += 1
        else:
            base = row_tasks[0].key.rsplit("-", 1)[0]
            clashes.append({"row": json.loads(source),
                            "reason": f"id {base!r} is used by another row with other content; ids must be unique"})
    return tasks, duplicates, clashes


def check_first_writer_wins(store: storage.Store) -> None:
    """UserError unless `store` refuses a conditional write to a key that exists. The exactly-once
    protocol rests on it (job.json, lease.json and manifest parts, single puts like the probe's), and
    an S3-compatible server that ignores If-None-Match would let two runs both win, silently."""
    probe = f"probe-{uuid.uuid4().hex}.tmp"
    store.put_bytes(probe, b"", if_absent=True)
    try:
        overwritten = store.put_bytes(probe, b"", if_absent=True)
    finally:
        store.delete(probe)
    if overwritten:
        raise UserError(f"{store.uri} accepted a conditional write (If-None-Match: *) over an object that "
                        "exists: its server does not support conditional writes, which exactly-once output "
                        "needs; write to AWS S3 or another server that does, or to a local folder")


def claim_output(store: storage.Store, settings: RunSettings) -> None:
    """Record `settings` as job.json under `store`, or check that they match the recorded ones
    (see `confirm_settings`); first checks that the store lets only the first writer of a key win.
    Being the run's first writes, they also tell an unwritable --out before any work starts."""
    check_first_writer_wins(store)
    if not store.put_bytes(JOB, settings.model_dump_json(indent=2).encode(), if_absent=True):
        _check_settings(store, settings)


def confirm_settings(store: storage.Store, settings: RunSettings) -> None:
    """Under the lease, before planning: UserError unless job.json records `settings` or no image has
    been published under it, in which case `settings` replace it (a run that stopped on bad input,
    say, leaves job.json behind with nothing made). Checked again here as a run that claimed the
    output earlier may have waited for the lease while another replaced job.json."""
    if _check_settings(store, settings):
        store.put_bytes(JOB, settings.model_dump_json(indent=2).encode())


def _check_settings(store: storage.Store, settings: RunSettings) -> bool:
    """Whether job.json records other settings with nothing published yet (they may be replaced);
    UserError naming the fields that differ when images were published under them."""
    recorded = RunSettings.model_validate_json(store.get_bytes(JOB))
    if recorded == settings:
        return False
    if not done_keys(store):
        return True
    old, new = _flat(recorded.model_dump()), _flat(settings.model_dump())
    diff = ", ".join(f"{k}: {old[k]} -> {new[k]}" for k in old if old[k] != new[k])
    raise UserError(f"{store.url(JOB)} records a run with other settings ({diff}); "
                    "rerun with the recorded settings to resume it, or choose another --out")


def _flat(fields: dict, prefix: str = "") -> dict:
    """{"spec.steps": 50, ...}: nested fields by dotted names."""
    flat = {}
    for name, value in fields.items():
        flat |= _flat(value, f"{prefix}{name}.") if isinstance(value, dict) else {f"{prefix}{name}": value}
    return flat


@contextlib.contextmanager
def hold_lease(store: storage.Store, run_id: str) -> Iterator[Lease]:
    """Hold the lease of --out `store` while the block runs, refreshing it from a daemon thread;
    UserError naming the holder when another live run holds it (see the module docstring). Finding
    another host's lease, it watches it for up to LEASE_STALE_S."""
    lease = _acquire_lease(store, run_id)
    stop = threading.Event()
    beats = threading.Thread(target=_heartbeat, args=(storage.open_store(store.uri), lease, stop),
                             name="socarrat-lease", daemon=True)
    beats.start()
    try:
        yield lease
    finally:
        stop.set()
        beats.join()
        held = _read_lease(store)
        if held is not None and held.run_id == run_id:  # not taken over meanwhile
            store.delete(LEASE)


def check_lease(store: storage.Store, run_id: str) -> None:
    """UserError unless run `run_id` still holds the lease of --out `store`. A run whose lease was
    taken over must publish nothing more: the run that took over deletes the tars it finds without
    a manifest part, and would plan this run's shards in flight again."""
    held = _read_lease(store)
    if held is None or held.run_id != run_id:
        raise UserError(f"run {run_id} lost {store.url(LEASE)} (now held by {held.run_id if held else 'none'}) after "
                        f"it stalled, and stopped before publishing more; run one at a time, then rerun to resume")


def _acquire_lease(store: storage.Store, run_id: str) -> Lease:
    now = time.time()
    lease = Lease(run_id=run_id, host=socket.gethostname(), pid=os.getpid(), started_at=now, heartbeat_at=now)
    for _ in range(3):
        if store.put_bytes(LEASE, lease.model_dump_json(indent=2).encode(), if_absent=True):
            return lease
        held = _read_lease(store)
        if held is None:  # released in between
            continue
        if not _gone(store, held):
            raise UserError(
                f"another run is writing to {store.uri}: run {held.run_id}, pid {held.pid} on {held.host}, "
                f"started {time.ctime(held.started_at)} ({store.url(LEASE)}); wait for it to end, or stop it "
                f"(`ray job stop <submission id>` if `ray job submit` started it, see `ray job list`; else kill "
                f"pid {held.pid} on {held.host}) and run again; if no such run lives, delete {store.url(LEASE)}")
        store.delete(LEASE)  # its run died: take it over
    raise UserError(f"{store.url(LEASE)} keeps changing: other runs are starting into {store.uri}; run one at a time")


def _gone(store: storage.Store, held: Lease) -> bool:
    """Whether the run holding `held` is gone. On this host its pid tells, however long the run has
    stalled. Elsewhere only this process's own clock can: gone if the lease stays unchanged for
    LEASE_STALE_S, while a live holder rewrites it every LEASE_HEARTBEAT_S."""
    if held.host == socket.gethostname():
        try:
            os.kill(held.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's process: alive
            pass
        return False
    logging.getLogger(__name__).warning("%s is held by run %s on %s; watching it for up to %.0f s to tell whether "
                                        "that run lives", store.url(LEASE), held.run_id, held.host, LEASE_STALE_S)
    deadline = time.monotonic() + LEASE_STALE_S
    while time.monotonic() < deadline:
        time.sleep(LEASE_HEARTBEAT_S / 4)
        current = _read_lease(store)
        if current != held:
            return current is None  # rewritten: alive; released: gone
    return True


def _read_lease(store: storage.Store) -> Lease | None:
    try:
        return Lease.model_validate_json(store.get_bytes(LEASE))
    except NotFoundError:
        return None


def _heartbeat(store: storage.Store, lease: Lease, stop: threading.Event) -> None:
    log = logging.getLogger(__name__)
    while not stop.wait(LEASE_HEARTBEAT_S):
        try:
            held = _read_lease(store)
            if held is None or held.run_id != lease.run_id:
                log.error("%s was taken over by another run after this one stalled; this run stops before "
                          "publishing more; run one at a time", store.url(LEASE))
                return
            store.put_bytes(LEASE, lease.model_copy(update={"heartbeat_at": time.time()}).model_dump_json(indent=2).encode())
        except Exception as err:  # a missed beat is retried; the lease goes stale only after several
            log.warning("cannot refresh %s: %s", store.url(LEASE), err)


def done_keys(store: storage.Store) -> set[str]:
    """Keys of the images in done shards (those with a manifest part)."""
    manifest = shards.read_manifest(store, columns=["key"])
    return set(manifest.column("key").to_pylist()) if manifest is not None else set()


@dataclass
class ShardStats:
    """What making one shard took; rows of the job's result dataset."""

    shard: str
    images: int
    model_calls: int
    published: bool
    render_s: float
    encode_s: float
    publish_s: float


def render(generator: Generator, tasks: list[ImageTask], batch_size: int) -> tuple[list[Result], int]:
    """One Result per task, in order, and the number of model calls: `Generator.generate` takes one
    spec per call, so tasks are batched by spec, `batch_size` at most per call."""
    by_spec: dict[SamplerSpec, list[int]] = {}
    for i, task in enumerate(tasks):
        by_spec.setdefault(task.spec, []).append(i)
    results: list[Result | None] = [None] * len(tasks)
    calls = 0
    for spec, indices in by_spec.items():
        for start in range(0, len(indices), batch_size):
            batch = [tasks[i] for i in indices[start:start + batch_size]]
            made = generator.generate([t.prompt for t in batch], [t.seed for t in batch], spec,
                                      [t.negative_prompt for t in batch])
            for i, result in zip(indices[start:start + batch_size], made):
                results[i] = result
            calls += 1
    return results, calls


def publish(store: storage.Store, run_id: str, name: str, tasks: list[ImageTask],
            results: list[Result]) -> tuple[bool, float]:
    """Encode and publish shard `name` (tar, then manifest part) if run `run_id` still holds the
    lease (else UserError); returns (published, encode_s)."""
    t0 = time.perf_counter()
    samples, rows = [], []
    for task, result in sorted(zip(tasks, results), key=lambda tr: tr[0].key):
        meta = {k: v for k, v in result.metadata.items() if k != "timings"}  # per batch, not per image
        samples.append((task.key, {"png": result.png_bytes(), "json": json.dumps({"key": task.key, **meta}).encode()}))
        rows.append({
            "key": task.key, "shard": f"{shards.SHARD_DIR}/{name}.tar", "prompt": task.prompt,
            "negative_prompt": task.negative_prompt, "seed": task.seed, "model": meta["model"],
            "model_digest": meta["model_digest"], "height_px": result.image.height,
            "width_px": result.image.width, "prompt_truncated": meta["prompt_truncated"],
            "negative_prompt_truncated": meta["negative_prompt_truncated"], "precision": meta["precision"],
            **task.spec.model_dump(include={"sampler", "steps", "spacing", "guidance"}),
        })
    encode_s = time.perf_counter() - t0
    check_lease(store, run_id)
    # Again once the tar is up: a run that took over meanwhile may have removed it as incomplete.
    published = shards.publish_shard(store, name, samples, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA),
                                     before_manifest=lambda: check_lease(store, run_id))
    return published, encode_s


def write_failures(store: storage.Store, failures: list[dict]) -> None:
    """failures.jsonl, replaced on every run so it describes the current input."""
    store.put_bytes(FAILURES, "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures).encode())


def summarize(plan: Plan, stats: list[ShardStats], wall_s: float, stage_s: float) -> dict[str, Any]:
    """summary.json's content: counts of this run, and where its time went."""
    generated = sum(s.images for s in stats)
    return {
        "rows": plan.rows, "rows_failed": len(plan.failures), "rows_duplicate": plan.rows_duplicate,
        "images_expected": plan.images_expected, "images_done_before": plan.images_done_before,
        "images_generated": generated, "images_done": plan.images_done_before + generated,
        "shards_planned": len(plan.shards), "shards_published": sum(s.published for s in stats),
        "model_calls": sum(s.model_calls for s in stats),
        "wall_s": wall_s, "startup_s": wall_s - stage_s, "stage_s": stage_s,
        "images_per_s": generated / stage_s if generated else 0.0,  # while making shards
        "render_s": sum(s.render_s for s in stats), "encode_s": sum(s.encode_s for s in stats),
        "publish_s": sum(s.publish_s for s in stats),
    }


def write_summary(store: storage.Store, summary: dict[str, Any]) -> None:
    store.put_bytes(SUMMARY, json.dumps(summary, indent=2).encode())


def _text(row: Mapping[str, Any], name: str, default: str | None = None) -> str:
    value = row.get(name)
    if value is None:
        if default is None:
            raise UserError(f"{name} is missing")
        return default
    if not isinstance(value, str):
        raise UserError(f"{name} must be text, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def _fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of an input row, a .jsonl line parsed; non-finite numbers as text, so that
    failures.jsonl stays valid JSON (the checks reject them all the same)."""
    if str(row.get("path")).endswith(".jsonl"):
        try:
            parsed = json.loads(row["text"])
        except json.JSONDecodeError as err:
            raise UserError(f"line is not valid JSON: {err}") from None
        if not isinstance(parsed, dict):
            raise UserError(f"line must be a JSON object, got {row['text'][:40]!r}")
        row = {**parsed, "path": row["path"]}
    return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def _seed(value: Any, count: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().isdecimal():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**63 - count:
        raise UserError(f"seed must be an integer in [0, 2**63 - images_per_prompt], got {str(value)[:40]!r}")
    return value


def _spec(default: SamplerSpec, overrides: dict[str, Any]) -> SamplerSpec:
    try:
        return SamplerSpec.model_validate({**default.model_dump(), **overrides}) if overrides else default
    except ValidationError as err:
        raise UserError("; ".join(f"{e['loc'][0]}: {e['msg']}" for e in err.errors())) from None


def _id(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _ID.fullmatch(text):
        raise UserError(f"id must be 1-128 letters, digits, '_' or '-', got {str(value)[:40]!r}")
    return text


def _digest(parts: list[Any], prefix: str = "") -> str:
    return prefix + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _derived_seed(seed_base: int, base: str, j: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed_base}:{base}:{j}".encode()).digest()[:8], "big") >> 1

