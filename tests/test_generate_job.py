"""The mass-generation job (jobs/generate.py) and its rules (socarrat.massgen), on a real local Ray.

One Ray session for the module; a tiny model saved as a checkpoint; 2-step DDIM. The end-to-end
runs check the invariants of the issue: every expected key exactly once (manifest, tars read with
webdataset and with Ray Data), reruns compute only what is missing, crashes and kills change
neither, and the images equal those of `Generator.generate`.
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

import jobs.generate
from jobs.generate import GenerateJob, ShardMaker, main, run
from socarrat import massgen, storage
from socarrat.checkpoint import describe_checkpoint, save_checkpoint
from socarrat.config import MAX_PROMPT_CHARS, SamplerSpec
from socarrat.errors import NotFoundError, UserError
from socarrat.generator import Generator
from socarrat.shards import read_manifest, read_shard, write_shard

ROOT = Path(__file__).resolve().parents[1]
SPEC = SamplerSpec(steps=2)
SETTINGS = massgen.RunSettings(model_digest="0" * 64, spec=SPEC, images_per_prompt=2)
MAX_STEPS = 1000  # the train timesteps of the tiny models


@pytest.fixture(scope="module")
def ray_session(s3_server):
    """One local Ray for the module, started after the S3 server so its workers see AWS_ENDPOINT_URL."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    save_checkpoint(tiny_model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def reference(model_dir):
    return Generator.load(model_dir, device="cpu")


def job(prompts, out, model_dir, **kw):
    return GenerateJob(prompts=prompts, out=out, model=model_dir, spec=SPEC, batch_size=3, shard_size=4,
                       max_workers=1, **kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def manifest_keys(out):
    return read_manifest(storage.open_store(out)).column("key").to_pylist()


def pixels(png):
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


# --- rules, no Ray -------------------------------------------------------------------------

def test_keys_and_seeds_are_stable_and_follow_id_and_seed():
    a = massgen.tasks_for_row({"prompt": "a red circle"}, SETTINGS, MAX_STEPS)
    assert a == massgen.tasks_for_row({"prompt": "a red circle", "path": "elsewhere.txt"}, SETTINGS, MAX_STEPS)
    assert [t.key.rsplit("-", 1)[1] for t in a] == ["0", "1"] and a[0].seed != a[1].seed
    assert a[0].key != massgen.tasks_for_row({"prompt": "a red circle", "guidance": 1.0}, SETTINGS, MAX_STEPS)[0].key
    assert a[0].seed != massgen.tasks_for_row({"prompt": "a red circle"}, SETTINGS.model_copy(update={"seed_base": 1}), MAX_STEPS)[0].seed
    b = massgen.tasks_for_row({"prompt": "x", "id": "row_7", "seed": "41", "steps": 3}, SETTINGS, MAX_STEPS)
    assert [(t.key, t.seed, t.spec.steps) for t in b] == [("row_7-0", 41, 3), ("row_7-1", 42, 3)]
    assert all("." not in t.key for t in a + b)


@pytest.mark.parametrize("row, reason", [
    ({}, "prompt is missing"),
    ({"prompt": "  "}, "prompt is empty"),
    ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt has 1001 characters"),
    ({"prompt": "x", "negative_prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "negative_prompt has 1001 characters"),
    ({"prompt": 5}, "prompt must be text"),
    ({"prompt": "x", "seed": -1}, "seed must be"),
    ({"prompt": "x", "seed": 2**63 - 1}, "seed must be"),
    ({"prompt": "x", "seed": "abc"}, "seed must be"),
    ({"prompt": "x", "seed": "\u00b2"}, "seed must be"),  # a digit to str.isdigit, not to int()
    ({"prompt": "x", "steps": 0}, "steps"),
    # Valid for SamplerSpec, not for the model: the actor would fail the shard on every rerun.
    ({"prompt": "x", "steps": MAX_STEPS + 1}, f"steps must be in 1..{MAX_STEPS} for this model"),
    ({"prompt": "x", "guidance": "lots"}, "guidance"),
    ({"prompt": "x", "guidance": "inf"}, "guidance: Input should be a finite number"),
    ({"prompt": "x", "guidance": "nan"}, "guidance"),
    ({"prompt": "x", "id": "a.b"}, "id must be"),
])
def test_a_bad_row_is_rejected_with_its_reason(row, reason):
    checked = massgen.check_rows([row], SETTINGS, MAX_STEPS)
    assert checked["tasks"] == [""] and reason in checked["error"][0]


def test_a_row_with_an_infinite_number_is_rejected_and_recorded_as_valid_json():
    checked = massgen.check_rows([{"prompt": "x", "guidance": math.inf}], SETTINGS, MAX_STEPS)
    assert "guidance: Input should be a finite number" in checked["error"][0]
    assert json.loads(checked["source"][0], parse_constant=pytest.fail) == {"prompt": "x", "guidance": "inf"}


def test_a_file_without_a_prompt_column_is_named_with_its_columns():
    rows = [{"text": "a red circle", "seed": 1, "path": "/in/a.csv"}, {"prompt": "x", "path": "/in/b.csv"},
            {"prompt": None, "path": "/in/b.csv"}]
    checked = massgen.check_rows(rows, SETTINGS, MAX_STEPS)
    checked = [dict(zip(checked, values)) for values in zip(*checked.values())]
    with pytest.raises(UserError, match="no row of /in/a.csv has a prompt; its columns are seed, text"):
        massgen.check_prompt_column(checked)
    massgen.check_prompt_column(checked[1:])  # b.csv has prompts, one row without: a failures row
    checked = massgen.check_rows([{"id": "1", "prompt": None, "path": "/in/c.csv"}], SETTINGS, MAX_STEPS)  # an empty CSV cell
    with pytest.raises(UserError, match="no row of /in/c.csv has a prompt: its `prompt` column is empty"):
        massgen.check_prompt_column([dict(zip(checked, values)) for values in zip(*checked.values())])


def test_plan_dedupes_rejects_id_clashes_and_recuts_the_same_shards():
    rows = [{"prompt": f"p{i}"} for i in range(9)] + [{"prompt": "p0"}, {"prompt": "a", "id": "x"}, {"prompt": "b", "id": "x"}]
    checked = massgen.check_rows(rows, SETTINGS, MAX_STEPS)
    checked = [dict(zip(checked, values)) for values in zip(*checked.values())]
    plan = massgen.make_plan(checked, set(), shard_size=4)
    assert (plan.rows, plan.rows_duplicate, plan.images_expected) == (12, 1, 20)
    assert [f["row"]["prompt"] for f in plan.failures] == ["b"] and "ids must be unique" in plan.failures[0]["reason"]
    assert [len(tasks) for _, tasks in plan.shards] == [4, 4, 4, 4, 4]
    # Shards 1 and 3 done: the rerun's plan holds the other shards, under their old names.
    done = {t.key for i in (1, 3) for t in plan.shards[i][1]}
    again = massgen.make_plan(checked, done, shard_size=4)
    assert again.shards == [plan.shards[i] for i in (0, 2, 4)] and again.images_done_before == 8


def test_plan_groups_shards_by_sampler_spec():
    rows = [{"prompt": f"p{i}", "steps": 2 + i % 2} for i in range(8)]
    checked = massgen.check_rows(rows, SETTINGS.model_copy(update={"images_per_prompt": 1}), MAX_STEPS)
    plan = massgen.make_plan([dict(zip(checked, v)) for v in zip(*checked.values())], set(), shard_size=4)
    assert [{t.spec.steps for t in tasks} for _, tasks in plan.shards] == [{2}, {3}]


def test_prompt_files_resolve_files_folders_and_globs(tmp_path):
    for name in ("a.txt", "b.csv", "notes.md", "old/c.csv", ".ipynb_checkpoints/b-checkpoint.csv",
                 "run1/failures.jsonl", "run1/manifest/shard-1.parquet"):
        (tmp_path / name).parent.mkdir(exist_ok=True, parents=True)
        (tmp_path / name).write_text("prompt\nx\n")
    out = str(tmp_path / "run1")  # the job's own output beside its prompts: never read as prompts
    a, b, c = (f"file://{tmp_path}/{name}" for name in ("a.txt", "b.csv", "old/c.csv"))
    assert massgen.prompt_files(str(tmp_path / "a.txt"), out) == [a]
    assert massgen.prompt_files(str(tmp_path), out) == [a, b, c]
    assert massgen.prompt_files(f"{tmp_path}/*.csv", out) == [b]  # `*` stays within one folder
    assert massgen.prompt_files(f"{tmp_path}/*/*.csv", out) == [c]
    with pytest.raises(NotFoundError, match="no prompt files"):
        massgen.prompt_files(str(tmp_path / "missing.txt"), out)


# --- bad input: clear errors before any work --------------------------------------------------

def test_missing_prompts_model_or_bucket_and_unwritable_out_fail_before_any_work(s3_server, model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    (tmp_path / "file").write_text("")
    cases = [
        (["--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o1")], "no prompt files"),
        (["--prompts", "s3://no-such-bucket-here/p.txt", "--out", str(tmp_path / "o2")], "does not exist"),
        (["--prompts", str(prompts), "--out", str(tmp_path / "o3"), "--model", str(tmp_path / "nomodel")], "no checkpoint"),
        (["--prompts", str(prompts), "--out", str(tmp_path / "file" / "o4"), "--model", model_dir], "cannot write"),
        (["--prompts", str(prompts), "--out", "s3://no-such-bucket-here/run", "--model", model_dir], "does not exist"),
        (["--prompts", str(prompts), "--out", str(tmp_path / "o5"), "--min-workers", "3", "--max-workers", "2"], "max_workers"),
        (["--prompts", str(prompts), "--out", str(tmp_path / "o6"), "--model", model_dir, "--steps", "5000"],
         "steps must be in 1..1000 for this model, got 5000"),
        (["--prompts", str(prompts), "--out", ""], "out: String should have at least 1 character"),
        (["--prompts", "", "--out", str(tmp_path / "o7")], "prompts: String should have at least 1 character"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "p.txt"]  # nothing written anywhere


def test_other_settings_replace_job_json_until_an_image_is_published_then_are_refused(reference, tmp_path):
    out, other = storage.open_store(str(tmp_path)), SETTINGS.model_copy(update={"spec": SamplerSpec(steps=3)})
    massgen.claim_output(out, SETTINGS)
    massgen.claim_output(out, SETTINGS)
    massgen.claim_output(out, other)  # nothing made under job.json yet (a first run stopped on bad input)
    massgen.confirm_settings(out, other)  # under the lease: recorded
    assert massgen.RunSettings.model_validate_json(out.get_bytes(massgen.JOB)) == other
    task = massgen.ImageTask(key="k-0", prompt="a red circle", seed=0, spec=SamplerSpec(steps=1))
    put_lease(out, lease(run_id="mine"))
    massgen.publish(out, "mine", "s-0", [task], reference.generate([task.prompt], [task.seed], task.spec))
    for check in (massgen.claim_output, massgen.confirm_settings):  # the one a waiting run makes, too
        with pytest.raises(UserError, match=r"records a run with other settings \(spec.steps: 3 -> 2\); rerun"):
            check(out, SETTINGS)
    with pytest.raises(UserError, match=r"\(precision: auto -> bf16\)"):
        massgen.claim_output(out, other.model_copy(update={"precision": "bf16"}))
    assert massgen.RunSettings.model_validate_json('{"model_digest": "%s"}' % ("0" * 64)).precision == "auto"


def test_a_store_that_ignores_conditional_writes_is_refused_before_any_work(tmp_path, store_uri):
    """Some S3-compatible servers ignore If-None-Match: two runs would both win job.json and the lease."""

    class LastWriterWins(storage.LocalStore):
        def put_bytes(self, key, data, *, if_absent=False):
            return super().put_bytes(key, data)

    massgen.claim_output(storage.open_store(store_uri), SETTINGS)  # the local folder and the S3 API server
    store = LastWriterWins(str(tmp_path / "out"))
    with pytest.raises(UserError, match="does not support conditional writes"):
        massgen.claim_output(store, SETTINGS)
    assert store.list() == []  # the probe is gone, and job.json was never written


def lease(run_id="other", host=None, pid=None, age_s=0.0):
    now = time.time()
    return massgen.Lease(run_id=run_id, host=host or socket.gethostname(), pid=pid or os.getpid(),
                         started_at=now - age_s, heartbeat_at=now - age_s)


def put_lease(store, held):
    store.put_bytes(massgen.LEASE, held.model_dump_json().encode())


def test_a_second_run_is_refused_while_the_first_holds_the_lease(model_dir, tmp_path, capsys):
    store = storage.open_store(str(tmp_path / "out"))
    with massgen.hold_lease(store, "first") as held:
        assert massgen.Lease.model_validate_json(store.get_bytes(massgen.LEASE)) == held
        with pytest.raises(UserError, match=f"another run is writing to .*run first, pid {os.getpid()}"):
            with massgen.hold_lease(store, "second"):
                pass
    assert not store.exists(massgen.LEASE)  # released at the end
    # Through the command: refused before the orphan tar of the live run is touched.
    put_lease(store, lease())  # a live process of this host, so the pid decides at once
    write_shard(store, "shards/shard-in-flight.tar", [("k", {"txt": b"x"})])
    (tmp_path / "p.txt").write_text("a red circle\n")
    assert main(["--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"), "--model", model_dir]) == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()} on {socket.gethostname()}" in err and "ray job stop" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert store.exists("shards/shard-in-flight.tar")


def test_a_lease_of_a_dead_process_or_one_left_unchanged_elsewhere_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(massgen, "LEASE_HEARTBEAT_S", 0.01)
    monkeypatch.setattr(massgen, "LEASE_STALE_S", 0.1)
    store = storage.open_store(str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    # Another host's clock may run ahead: its lease's fresh time says nothing, its standing still does.
    for left in (lease(host="elsewhere", age_s=-3600), lease(pid=int(dead.stdout))):
        put_lease(store, left)
        with massgen.hold_lease(store, "next") as held:
            assert massgen.Lease.model_validate_json(store.get_bytes(massgen.LEASE)) == held and held.run_id == "next"


def test_a_live_run_keeps_its_lease_however_long_it_stalls_or_its_clock_lags(tmp_path, monkeypatch):
    monkeypatch.setattr(massgen, "LEASE_HEARTBEAT_S", 0.01)
    store = storage.open_store(str(tmp_path))
    put_lease(store, lease(age_s=10 * massgen.LEASE_STALE_S))  # this host, this live pid, no beat for long
    with pytest.raises(UserError, match="another run is writing"), massgen.hold_lease(store, "next"):
        pass
    # Another host whose clock lags far behind: its lease looks stale, but it keeps being rewritten.
    held, stop = lease(host="elsewhere", age_s=10 * massgen.LEASE_STALE_S), threading.Event()
    put_lease(store, held)

    def refresh():
        beat = 0
        while not stop.wait(0.01):
            beat += 1
            put_lease(store, held.model_copy(update={"heartbeat_at": held.heartbeat_at + beat}))

    beats = threading.Thread(target=refresh, daemon=True)
    beats.start()
    try:
        with pytest.raises(UserError, match="pid .* on elsewhere"), massgen.hold_lease(store, "next"):
            pass
    finally:
        stop.set()
        beats.join()


def test_a_lease_taken_over_while_a_tar_uploads_publishes_no_manifest_part(reference, tmp_path):
    """The run that took over deletes tars without a manifest part: a manifest part published after
    that would mark a shard done whose images are gone."""

    class TakenOverDuringUploads(storage.LocalStore):
        def put_file(self, key, path, *, if_absent=False):
            put_lease(self, lease(run_id="newer"))
            return super().put_file(key, path, if_absent=if_absent)

    store = TakenOverDuringUploads(str(tmp_path))
    put_lease(store, lease(run_id="mine"))
    task = massgen.ImageTask(key="k-0", prompt="a red circle", seed=0, spec=SamplerSpec(steps=1))
    with pytest.raises(UserError, match="run mine lost"):
        massgen.publish(store, "mine", "s-0", [task], reference.generate([task.prompt], [task.seed], task.spec))
    assert store.list("shards/") == ["shards/s-0.tar"] and read_manifest(store) is None


def test_the_lease_is_refreshed_while_held_and_a_lease_taken_over_is_left_alone(tmp_path, monkeypatch):
    store = storage.open_store(str(tmp_path))
    with massgen.hold_lease(store, "me") as held:
        put_lease(store, lease(run_id="newer"))  # taken over while this run stalled
    assert massgen.Lease.model_validate_json(store.get_bytes(massgen.LEASE)).run_id == "newer"
    # Nor does the heartbeat overwrite it: it stops.
    monkeypatch.setattr(massgen, "LEASE_HEARTBEAT_S", 0.01)
    beats = threading.Thread(target=massgen._heartbeat, args=(store, held, threading.Event()), daemon=True)
    beats.start()
    beats.join(timeout=30)
    assert not beats.is_alive() and massgen.Lease.model_validate_json(store.get_bytes(massgen.LEASE)).run_id == "newer"
    store.delete(massgen.LEASE)
    with massgen.hold_lease(store, "me") as held:
        deadline = time.monotonic() + 30
        while massgen.Lease.model_validate_json(store.get_bytes(massgen.LEASE)).heartbeat_at == held.heartbeat_at:
            assert time.monotonic() < deadline, "no heartbeat"


def test_a_worker_refuses_a_model_with_another_digest(model_dir, tmp_path):
    with pytest.raises(UserError, match=f"digest [0-9a-f]{{64}} on this worker, not the driver's {'0' * 64}"):
        ShardMaker(model_dir, str(tmp_path), "run", batch_size=2, exit_marker=None, digest="0" * 64)


def test_a_worker_loads_the_model_in_the_precision_and_mode_asked(model_dir, tmp_path):
    digest = describe_checkpoint(model_dir).digest
    maker = ShardMaker(model_dir, str(tmp_path), "run", 2, None, digest, precision="bf16", compile=True)
    assert (maker.generator.precision, maker.generator.compiled) == ("bf16", True)
    assert GenerateJob(prompts="p.txt", out="o", compile=True, precision="fp32").compile


# --- end to end on Ray ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, content, message", [
    ("p.parquet", b"PAR1 not a parquet file", "cannot read the prompt files .*p.parquet"),  # footer read in the driver
    ("p.csv", b"text,seed\na red circle,1\n", "no row of .*p.csv has a prompt; its columns are seed, text"),
    ("p.txt", b"\n  \n", r"no prompts in .*p.txt: its 1 prompt file\(s\) hold no rows"),
])
def test_an_unparsable_prompt_file_or_one_without_prompts_is_a_clear_error(ray_session, model_dir, tmp_path, name,
                                                                            content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        run(job(str(tmp_path / name), str(tmp_path / "out"), model_dir))
    assert not (tmp_path / "out" / "failures.jsonl").exists()


def test_readers_keep_ids_prompts_and_seeds_as_written(ray_session, tmp_path):
    # Type guessing would make ids "007" and "7" one int, prompts ints, and seeds with gaps float64.
    rows = [{"id": "007", "prompt": "1984", "seed": "123456789012345678"}, {"id": "7", "prompt": "1985"},
            {"id": "1", "prompt": "2001", "seed": "5"}, {"prompt": "2010"}]
    want = sorted(massgen.check_rows(rows, SETTINGS, MAX_STEPS)["tasks"])
    write_jsonl(tmp_path / "p.jsonl", [{**r, "seed": int(r["seed"])} if "seed" in r else r for r in rows])
    with open(tmp_path / "p.jsonl", "a") as f:
        f.write('{"prompt": "broken\n')
    (tmp_path / "p.csv").write_text("id,prompt,seed\n" + "".join(
        f"{r.get('id', '')},{r['prompt']},{r.get('seed', '')}\n" for r in rows))
    for name in ("p.jsonl", "p.csv"):
        checked = jobs.generate._read_rows([f"file://{tmp_path / name}"], SETTINGS, MAX_STEPS)
        assert sorted(r["tasks"] for r in checked if not r["error"]) == want, name
        failed = [(json.loads(r["source"]).get("text"), r["error"].split(":")[0]) for r in checked if r["error"]]
        assert failed == ([('{"prompt": "broken', "line is not valid JSON")] if name == "p.jsonl" else []), name


def test_workers_with_another_model_than_the_driver_stop_the_run_with_one_line(ray_session, model_dir, tmp_path,
                                                                                monkeypatch):
    (tmp_path / "p.txt").write_text("a red circle\n")
    # The driver sees other weights than the workers will load (the checkpoint was replaced meanwhile).
    replaced = dataclasses.replace(describe_checkpoint(model_dir), digest="f" * 64)
    monkeypatch.setattr(jobs.generate, "describe_checkpoint", lambda *args: replaced)
    with pytest.raises(UserError, match=f"a shard worker could not start: .* not the driver's {'f' * 64}"):
        run(job(str(tmp_path / "p.txt"), str(tmp_path / "out"), model_dir))


def test_local_run_writes_each_image_once_and_a_rerun_makes_none(ray_session, model_dir, reference, tmp_path):
    import ray

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "a.txt").write_text("a red circle\ntwo blue squares\n")
    (prompts / "b.csv").write_text("prompt,seed\na green triangle,7\na cyan square,-3\n")
    write_jsonl(prompts / "c.jsonl", [
        {"id": "r1", "prompt": "a yellow circle", "negative_prompt": "a red circle", "seed": 11, "steps": 3},
        {"id": "r2", "prompt": "a magenta square" + " beside a cyan circle" * 6, "guidance": 1.0},  # cut at 24 tokens
        {"prompt": "a red circle"},  # the same as a line of a.txt: generated once
        {"prompt": ""},
        {"prompt": "x" * 2000},
        {"prompt": "a blue circle", "seed": "abc"},
    ])
    out = str(tmp_path / "out")
    summary = run(job(str(prompts), out, model_dir, images_per_prompt=2))

    keys = manifest_keys(out)
    assert len(keys) == len(set(keys)) == 10 and {"r1-0", "r1-1", "r2-0", "r2-1"} <= set(keys)
    expected = {"images_generated": 10, "images_done_before": 0, "rows": 10, "rows_failed": 4, "rows_duplicate": 1}
    assert {k: summary[k] for k in expected} == expected
    assert summary["images_per_s"] == summary["images_generated"] / summary["stage_s"]
    failures = [json.loads(line) for line in Path(out, "failures.jsonl").read_text().splitlines()]
    assert sorted((f["row"]["prompt"][:8], f["reason"].split(" ")[0], Path(f["row"]["path"]).name) for f in failures) == [
        ("", "prompt", "c.jsonl"), ("a blue c", "seed", "c.jsonl"), ("a cyan s", "seed", "b.csv"), ("xxxxxxxx", "prompt", "c.jsonl")]

    tars = sorted(str(p) for p in Path(out, "shards").glob("*.tar"))
    by_wds = Counter(s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False))
    by_ray = Counter(r["__key__"] for r in ray.data.read_webdataset(str(Path(out, "shards"))).iter_rows())
    assert by_wds == by_ray == Counter(keys)

    manifest = pq.read_table(str(Path(out, "manifest"))).to_pylist()
    settings = {(r["key"], r["steps"], r["guidance"], r["negative_prompt"]) for r in manifest if r["key"] in ("r1-1", "r2-0")}
    assert settings == {("r1-1", 3, 3.0, "a red circle"), ("r2-0", 2, 1.0, "")}
    samples = {key: members for uri in tars for key, members in read_shard(uri)}
    for row in manifest:
        if row["key"] in ("r1-1", "r2-0") or row["prompt"] == "a green triangle":
            spec = SPEC.model_copy(update={"steps": row["steps"], "guidance": row["guidance"]})
            [want] = reference.generate([row["prompt"]], [row["seed"]], spec, [row["negative_prompt"]])
            assert np.abs(pixels(samples[row["key"]]["png"]) - np.asarray(want.image).astype(int)).max() <= 1
            assert json.loads(samples[row["key"]]["json"])["seed"] == row["seed"]
    assert {r["seed"] for r in manifest if r["key"].startswith("r1-")} == {11, 12}
    assert {r["key"] for r in manifest if r["prompt_truncated"]} == {"r2-0", "r2-1"}
    assert json.loads(samples["r2-0"]["json"])["prompt_truncated"] and not any(r["negative_prompt_truncated"] for r in manifest)

    again = run(job(str(prompts), out, model_dir, images_per_prompt=2))
    assert (again["images_generated"], again["images_done_before"], again["shards_planned"]) == (0, 10, 0)
    assert sorted(manifest_keys(out)) == sorted(keys)


# An actor dies with a shard rendered but not published (the retry makes it again), or published but
# not returned (the retry finds it published and counts it so).
def test_s3_run_survives_actor_crashes_with_each_image_once(ray_session, model_dir, s3_bucket, tmp_path, monkeypatch):
    prompts = storage.open_store(s3_bucket + "/in")
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": [f"a red circle {i}" for i in range(8)], "seed": list(range(8))}), buf)
    prompts.put_bytes("prompts.parquet", buf.getvalue())
    # One actor dies with a shard rendered but not published, the next with a shard published but
    # not yet returned: each shard is made again or counted, never published twice.
    markers = [tmp_path / "crashed-rendered", tmp_path / "crashed-published"]
    monkeypatch.setenv("SOCARRAT_FAULT_ACTOR_EXIT", f"rendered:{markers[0]},published:{markers[1]}")
    out = f"{s3_bucket}/run"
    summary = run(job(s3_bucket + "/in/*.parquet", out, model_dir))

    assert all(m.exists() for m in markers), "a fault was not injected: the test proves nothing"
    keys = manifest_keys(out)
    assert len(keys) == len(set(keys)) == 8 and summary["shards_published"] == summary["shards_planned"] == 2
    store = storage.open_store(out)
    tars = store.list("shards/")
    assert len(tars) == 2
    assert Counter(key for k in tars for key, _ in read_shard(store.url(k))) == Counter(keys)
    again = run(job(s3_bucket + "/in/*.parquet", out, model_dir))
    assert (again["images_generated"], again["images_done_before"]) == (0, 8)


def test_a_shard_that_kills_its_worker_every_time_ends_the_run(ray_session, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SOCARRAT_FAULT_ACTOR_EXIT", "always")
    monkeypatch.setattr(jobs.generate, "_SHARD_RETRIES", 1)  # each attempt restarts an actor: keep it short
    (tmp_path / "p.txt").write_text("a red circle\n")
    with pytest.raises(UserError, match="a shard worker died on each of 2 attempts"):
        run(job(str(tmp_path / "p.txt"), str(tmp_path / "out"), model_dir))
    assert read_manifest(storage.open_store(str(tmp_path / "out"))) is None


def test_a_run_whose_lease_is_taken_over_publishes_nothing_more(ray_session, model_dir, tmp_path, monkeypatch):
    hold = massgen.hold_lease

    @contextlib.contextmanager
    def taken_over(store, run_id):  # as if this run stalled right away and another took over
        with hold(store, run_id) as held:
            put_lease(store, lease(run_id="newer"))
            yield held

    monkeypatch.setattr(massgen, "hold_lease", taken_over)
    (tmp_path / "p.txt").write_text("a red circle\n")
    with pytest.raises(UserError, match=r"a shard worker stopped: run local-\w+ lost .*lease.json \(now held by newer\)"):
        run(job(str(tmp_path / "p.txt"), str(tmp_path / "out"), model_dir))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["failures.jsonl", "job.json", "lease.json"]


def test_a_killed_run_then_a_rerun_ends_with_each_image_once(ray_session, model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a blue square {i}\n" for i in range(6)))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "jobs.generate", "--prompts", str(prompts), "--out", str(out), "--model", model_dir,
            "--steps", "2", "--batch-size", "2", "--shard-size", "2", "--max-workers", "1"]
    # The job's driver connects to this module's cluster, makes its first shard and exits hard.
    env = dict(os.environ, RAY_ADDRESS=ray_session, SOCARRAT_FAULT_DRIVER_EXIT_AFTER_SHARDS="1")
    killed = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 3, killed.stderr[-3000:]
    assert not (out / "summary.json").exists()
    assert (out / "lease.json").exists()  # left by the killed driver: the rerun must take it over
    done_before = manifest_keys(str(out))
    # A tar published without its manifest part (its writer died in between): not done, so the
    # rerun deletes it, or the key it holds would be in two tars.
    store = storage.open_store(str(out))
    write_shard(store, "shards/shard-orphan.tar", [(done_before[0], {"txt": b"stale"})], if_absent=True)

    assert main(argv[3:]) == 0  # the same command again, in this process (already on the cluster)
    assert "images expected" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images_done_before"], summary["images_generated"]) == (2, 4)
    keys = manifest_keys(str(out))
    assert len(keys) == len(set(keys)) == 6 and set(done_before) <= set(keys)
    assert not store.exists("shards/shard-orphan.tar") and not store.exists("lease.json")
    tars = store.list("shards/")
    assert Counter(key for k in tars for key, _ in read_shard(store.url(k))) == Counter(keys)


def test_a_token_model_runs_through_the_same_job_in_the_precision_asked(ray_session, tiny_token_checkpoint, tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\ntwo blue squares\n")
    out = str(tmp_path / "out")
    summary = run(GenerateJob(prompts=str(tmp_path / "p.txt"), out=out, model=tiny_token_checkpoint,
                              spec=SamplerSpec(steps=4), batch_size=2, shard_size=4, max_workers=1, precision="bf16"))
    assert summary["images_generated"] == 2
    manifest = pq.read_table(str(Path(out, "manifest"))).to_pylist()
    assert {(r["sampler"], r["steps"], r["precision"]) for r in manifest} == {("paella", 4, "bf16")}
    samples = {key: members for uri in Path(out, "shards").glob("*.tar") for key, members in read_shard(str(uri))}
    assert {json.loads(members["json"])["precision"] for members in samples.values()} == {"bf16"}
    assert json.loads(Path(out, massgen.JOB).read_text())["precision"] == "bf16"  # a rerun must ask for it too
    reference = Generator.load(tiny_token_checkpoint, device="cpu", precision="bf16")
    for row in manifest:
        [want] = reference.generate([row["prompt"]], [row["seed"]], SamplerSpec(steps=4))
        # The same tokens, up to a rare flip: another thread count or batch can move a logit by ~1e-5,
        # which changes a token whose draw lies that close to a boundary (sampling/tokens.py).
        differ = (pixels(samples[row["key"]]["png"]) != np.asarray(want.image)).any(-1).mean()
        assert differ < 0.25, differ  # another seed or prompt changes nearly every pixel
