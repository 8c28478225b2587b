"""Training: shapes shards through storage, a tiny run whose loss falls, resume, Ray Train, evaluation."""

import copy
import io
import json
import os
import re
import tarfile
import time

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file

from conftest import TINY_SPEC
from jobs.evaluate import evaluate, paired_difference, read_rows, write_report
from jobs.train import absolute_paths, run
from socarrat import storage
from socarrat.checkpoint import latest_checkpoint, save_checkpoint
from socarrat.cli import main as cli
from socarrat.config import HDiTSpec, SamplerSpec
from socarrat.datasets.shapes import CATEGORIES
from socarrat.errors import NotFoundError, UserError
from socarrat.generator import Generator
from socarrat.shards import list_shards, read_shard
from socarrat.models import build_model, parameter_count
from socarrat.training import (GaussianObjective, TrainConfig, default_weighting, load_examples, loss_weights, lr_at,
                                preflight, train)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    assert cli(["shapes-shards", "--out", str(out), "--count", "300", "--shard-size", "100", "--size-px", "32"]) == 0
    return str(out)


def config(shards, out, **kw):
    base = dict(shards=shards, out=out, model=TINY_SPEC, steps=40, batch_size=16, lr=3e-3, warmup_steps=5,
                checkpoint_every=20, log_every=10)
    return TrainConfig(**{**base, **kw})


def test_shards_round_trip_through_s3(shards, s3_bucket):
    assert cli(["shapes-shards", "--out", f"{s3_bucket}/shapes", "--count", "300", "--shard-size", "100", "--size-px", "32"]) == 0
    local, remote = list_shards(shards), list_shards(f"{s3_bucket}/shapes")
    assert len(local) == len(remote) == 3
    for a, b in zip(local, remote):
        assert list(read_shard(a)) == list(read_shard(b))
    key, members = next(read_shard(local[0]))
    assert "." not in key and set(members) == {"png", "txt", "json"}
    assert json.loads(members["json"])["caption"] == members["txt"].decode()


def fixed_loss(model, shards) -> float:
    """The objective on one fixed batch, timesteps and noise, so two models compare exactly."""
    data = load_examples(shards, 32)
    x0 = data.images[:64].float() / 127.5 - 1
    torch.manual_seed(0)
    with torch.no_grad():
        return GaussianObjective(model, 0.0, 5.0)(x0, data.captions[:64]).item()


def test_tiny_run_learns_and_its_checkpoint_generates(shards, tmp_path):
    torch.manual_seed(0)
    before = fixed_loss(build_model(TINY_SPEC), shards)
    result = train(config(shards, str(tmp_path / "run")))
    assert result.checkpoint.endswith("step-00000040")
    gen = Generator.load(result.checkpoint, device="cpu")
    after = fixed_loss(gen.model, shards)
    assert after < 0.85 * before, (before, after)
    [image] = gen.generate(["a red circle"], [0], SamplerSpec(steps=3))
    assert image.image.size == (32, 32)
    info = json.loads(storage.read_bytes(storage.join(result.checkpoint, "config.json")))["training"]
    assert info["step"] == 40 and info["corrupt_samples"] == 0


def test_resume_continues_from_the_newest_checkpoint(shards, tmp_path):
    out = str(tmp_path / "run")
    train(config(shards, out, steps=20, checkpoint_every=10))
    saved = torch.load(io.BytesIO(storage.read_bytes(f"{out}/step-00000020/train_state.pt")))
    logs = []
    resumed = train(config(shards, out, steps=30, checkpoint_every=10, log_every=4), report=logs.append)
    assert resumed.step == 30 and len(resumed.losses) == 10
    # Logged at 24, 28 and the last step, each line over the steps since the one before.
    assert [log["step"] for log in logs] == [24, 28, 30]
    assert [log["loss"] for log in logs] == pytest.approx([np.mean(resumed.losses[i:j]) for i, j in ((0, 4), (4, 8), (8, 10))])
    assert set(saved) == {"model", "ema", "opt"} and storage.open_store(out).exists("step-00000030/config.json")
    other = config(shards, out, steps=40, model=TINY_SPEC.model_copy(update={"prediction": "eps"}))
    with pytest.raises(UserError, match="spec differs .* .prediction: v there, eps here"):
        train(other)
    with pytest.raises(UserError, match="spec differs"):
        run(other, num_workers=2)  # checked by the driver, before Ray starts any worker
    assert not ray.is_initialized()


def test_a_diverged_run_stops_before_its_nan_weights_reach_a_checkpoint(shards, tmp_path):
    out = str(tmp_path / "run")
    train(config(shards, out, steps=20, checkpoint_every=10))
    # Checkpoints every 3 steps, log lines every 10: a check only at log lines would let NaN weights
    # into the checkpoints of steps 24 and 27.
    with pytest.raises(UserError, match=r"diverged: a loss, gradient or weight was not finite in steps 2\d-(\d+); "
                       r"the newest checkpoint, .*step-000000\d\d, is from before") as err:
        train(config(shards, out, steps=40, checkpoint_every=3, log_every=10, lr=1e30))
    stopped = int(re.search(r"steps 2\d-(\d+)", str(err.value)).group(1))
    newest, uri = latest_checkpoint(out)
    assert newest < stopped and uri in str(err.value)
    for step in range(20, newest + 1):
        if storage.open_store(out).exists(f"step-{step:08d}/model.safetensors"):
            weights = load_file(f"{out}/step-{step:08d}/model.safetensors")
            assert all(w.isfinite().all() for w in weights.values()), step


def test_max_minutes_stops_with_a_checkpoint_and_the_same_command_goes_on(shards, tmp_path):
    cfg = config(shards, str(tmp_path / "run"), max_minutes=1e-6)  # past at the first --log-every step
    first = train(cfg)
    assert first.step == 10 and first.checkpoint.endswith("step-00000010")
    assert train(cfg).checkpoint.endswith("step-00000020")


def test_max_minutes_counts_from_the_start_of_the_run(shards, tmp_path, monkeypatch):
    # perf_counter's origin is arbitrary (boot, on Linux): a day on the clock before the run
    # starts must not count against a one-hour budget.
    clock = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + 86_400)
    assert train(config(shards, str(tmp_path / "run"), steps=20, max_minutes=60)).step == 20


def test_init_text_starts_from_a_checkpoints_text_encoder(shards, tmp_path, tiny_model):
    donor_model = copy.deepcopy(tiny_model)
    with torch.no_grad():  # unlike any seeded initialisation
        for p in donor_model.text.parameters():
            p.add_(torch.randn_like(p))
    donor_uri = str(tmp_path / "donor")
    save_checkpoint(donor_model, donor_uri)
    donor = {k: v.half().float() for k, v in donor_model.text.state_dict().items()}  # as saved: fp16
    hdit = TINY_SPEC.model_copy(update={"backbone": "hdit", "hdit": HDiTSpec(widths=(32, 64), depths=(1, 1))})
    for init, near in ((donor_uri, True), (None, False)):
        result = train(config(shards, str(tmp_path / f"run-{near}"), model=hdit, init_text=init, steps=1, lr=1e-9))
        text = Generator.load(result.checkpoint, device="cpu").model.text.state_dict()
        assert all(torch.allclose(text[k], donor[k], atol=1e-3) for k in donor) == near
    other = hdit.model_copy(update={"text": TINY_SPEC.text.model_copy(update={"layers": 2})})
    with pytest.raises(UserError, match="text encoder spec is not this run's .layers: 1 there, 2 here"):
        run(config(shards, str(tmp_path / "other"), model=other, init_text=donor_uri), num_workers=2)
    assert not ray.is_initialized()  # checked by the driver, before Ray starts any worker


def test_init_starts_a_new_run_from_a_whole_checkpoint(shards, tmp_path):
    donor = train(config(shards, str(tmp_path / "donor"), steps=20)).checkpoint
    saved = Generator.load(donor, device="cpu").model.state_dict()
    result = train(config(shards, str(tmp_path / "more"), init=donor, steps=1, lr=1e-9))
    assert result.step == 1  # a new run: step 0, fresh optimiser
    weights = Generator.load(result.checkpoint, device="cpu").model.state_dict()
    assert all(torch.allclose(weights[k].float(), saved[k].float(), atol=1e-3) for k in saved)
    info = json.loads(storage.read_bytes(storage.join(result.checkpoint, "config.json")))["training"]
    assert info["config"]["init"] == donor  # the card says where it started
    resumed = train(config(shards, str(tmp_path / "more"), steps=2, lr=1e-9))  # ... and so after a resume
    info = json.loads(storage.read_bytes(storage.join(resumed.checkpoint, "config.json")))["training"]
    assert resumed.step == 2 and info["config"]["init"] == donor
    other = TINY_SPEC.model_copy(update={"prediction": "eps"})
    with pytest.raises(UserError, match="model spec is not this run's .prediction: v there, eps here"):
        run(config(shards, str(tmp_path / "other"), model=other, init=donor), num_workers=2)
    assert not ray.is_initialized()  # checked by the driver, before Ray starts any worker
    with pytest.raises(ValueError, match="not both"):
        config(shards, str(tmp_path / "both"), init=donor, init_text=donor)


def test_resume_says_what_it_does_with_a_finished_run_or_init(shards, tmp_path, capsys):
    out = str(tmp_path / "run")
    train(config(shards, out, steps=10))
    capsys.readouterr()
    again = train(config(shards, out, steps=10, init=out + "/step-00000010"))
    assert again.step == 10 and not again.losses
    said = capsys.readouterr().out
    assert "--init and --init-text only start a new run" in said and "nothing to train" in said


def test_weights_without_their_train_state_are_not_resumed(shards, tmp_path, tiny_model):
    out = tmp_path / "run"
    save_checkpoint(tiny_model, str(out / "step-00000500"))  # weights copied in, no train_state.pt
    with pytest.raises(UserError, match=r"no train_state.pt .* --init .*step-00000500 and another --out"):
        run(config(shards, str(out)), num_workers=2)
    assert not ray.is_initialized()


def test_a_token_run_resumes_only_with_its_own_vq_stage(shards, tmp_path):
    spec = type(TINY_SPEC).model_validate({**TINY_SPEC.model_dump(), "family": "token"})
    checkpoint = tmp_path / "run" / "step-00000700"
    checkpoint.mkdir(parents=True)
    (checkpoint / "train_state.pt").write_bytes(b"")
    (checkpoint / "config.json").write_text(json.dumps({"model": spec.model_dump(mode="json"),
                                                        "training": {"config": {"vq_steps": 500}}}))
    # Resumed with another --vq-steps, steps 700-1999 would train the VQ again under a trained denoiser.
    with pytest.raises(UserError, match="trains the VQ for the first 500 steps, this one asks for 2000; give --vq-steps 500"):
        preflight(config(shards, str(tmp_path / "run"), model=spec, steps=3000))
    preflight(config(shards, str(tmp_path / "run"), model=spec, steps=3000, vq_steps=500))


@pytest.mark.parametrize("flags, message", [
    (["--lr", "inf"], "lr: Input should be a finite number"),
    (["--seed", "-1"], "seed: Input should be greater than or equal to 0"),
    (["--family", "token", "--steps", "2000"], "the token family trains its VQ for the first vq_steps (2000)"),
    (["--family", "token", "--vq-steps", "0"], "vq_steps 0 trains the denoiser on the tokens of an untrained VQ"),
    (["--model-spec", '{"model": 3}'], "not a JSON object of ModelSpec fields"),
    (["--model-spec", "FILE"], "not valid JSON"),  # an empty file
    (["--out", "FILE/run"], "FILE/run"),  # under a file: no checkpoint could ever be written
    (["--model-spec", '{"prediction": "eps"}', "--loss-weighting", "capped-v"], "capped-v needs v-prediction"),
    (["--model-spec", "{bad"], "--model-spec '{bad': not valid JSON"),
    (["--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
])
def test_train_job_refuses_bad_flags_and_an_unwritable_out_before_any_work(shards, tmp_path, capsys, flags, message):
    from jobs.train import main

    (tmp_path / "FILE").write_text("")
    argv = ["--shards", shards, "--out", str(tmp_path / "out"), "--num-workers", "0", *flags]
    assert main([a.replace("FILE", str(tmp_path / "FILE")) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message.replace("FILE", str(tmp_path / "FILE")) in err and "\n" not in err
    assert not list(tmp_path.glob("out/step-*"))


def test_loss_weights_keep_the_high_noise_steps_where_layout_is_decided():
    snr = torch.tensor([1e-4, 0.5, 3.0, 100.0])
    capped, min_snr = (loss_weights(snr, 5.0, w, "v") for w in ("capped-v", "min-snr"))
    assert capped.tolist() == pytest.approx([1.0, 1.0, 1.0, 5 / 101])  # the plain v-loss, capped at low noise
    assert min_snr.tolist() == pytest.approx([1e-4 / (1 + 1e-4), 1 / 3, 0.75, 5 / 101])  # ~0 at high noise
    assert loss_weights(snr, 5.0, "min-snr", "eps").tolist() == pytest.approx([1.0, 1.0, 1.0, 0.05])
    assert TrainConfig(shards="s", out="o").loss_weighting is None
    assert default_weighting("v") == "capped-v" and default_weighting("eps") == "min-snr"


def test_lr_warms_up_holds_and_cools_down_to_zero(shards, tmp_path):
    cfg = config(shards, str(tmp_path), steps=100, lr=1e-3, warmup_steps=10, cooldown_steps=40)
    lrs = [lr_at(cfg, step) for step in range(cfg.steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == lrs[59] == pytest.approx(1e-3)
    assert all(a > b > 0 for a, b in zip(lrs[60:], lrs[61:])) and lrs[-1] == pytest.approx(1e-3 / 40)
    assert lr_at(cfg, 12, stage_start=10) == pytest.approx(3e-4)  # a new stage warms up again
    assert {lr_at(config(shards, str(tmp_path), steps=100, warmup_steps=0), s) for s in range(100)} == {3e-3}


def test_missing_shards_and_corrupt_samples(tmp_path, shards):
    with pytest.raises(NotFoundError, match="no .tar shards"):
        load_examples(str(tmp_path / "empty"), 32)
    with pytest.raises(NotFoundError, match="no .tar shards"):
        run(config(str(tmp_path / "empty"), str(tmp_path / "out")), num_workers=2)
    assert not ray.is_initialized()
    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(bad / "a.tar", "w") as tar:
        for name, data in (("k1.png", b"not a png"), ("k1.txt", b"a red circle")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (bad / "b.tar").write_bytes((tmp_path / "x").write_bytes(b"") or b"truncated garbage")
    good = list_shards(shards)[0]
    storage.open_store(str(bad)).put_bytes("c.tar", storage.read_bytes(good))
    examples = load_examples(str(bad), 32)
    assert len(examples.captions) == 100 and examples.corrupt == 2


def test_ray_train_job_with_two_ddp_workers(shards, tmp_path, monkeypatch):
    ray.init(num_cpus=2, include_dashboard=False)  # from the repo root, whose `jobs` the workers import
    monkeypatch.chdir(tmp_path)  # relative paths, as typed: Ray Train's workers start in folders of their own
    try:  # out of time: both ranks agree to stop at the same step (a rank left alone would hang in all-reduce)
        run(config(os.path.relpath(shards), "timed", steps=60, log_every=3, max_minutes=1e-6), num_workers=2)
    finally:
        ray.shutdown()
    assert [k for k in storage.open_store(str(tmp_path / "timed")).list() if k.endswith("config.json")] == ["step-00000003/config.json"]
    gen = Generator.load(str(tmp_path / "timed" / "step-00000003"), device="cpu")
    [image] = gen.generate(["a red circle"], [1], SamplerSpec(steps=2))
    assert image.image.size == (32, 32)


def test_ray_train_workers_get_absolute_local_paths_and_names_stay_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "start").mkdir()
    spec = TINY_SPEC.model_copy(update={"text": TINY_SPEC.text.model_copy(update={"kind": "hf", "path": "clip"})})
    cfg = absolute_paths(config("shards", "s3://b/run", model=spec, init="start"))
    assert (cfg.shards, cfg.out, cfg.init) == (str(tmp_path / "shards"), "s3://b/run", str(tmp_path / "start"))
    assert cfg.model.text.path == str(tmp_path / "clip")  # a local text encoder, as --model-spec named it
    (tmp_path / "shapes-gaussian").mkdir()  # a folder named as a bundled model does not hide it
    assert absolute_paths(config("shards", "out", init_text="shapes-gaussian")).init_text == "shapes-gaussian"


def test_evaluate_end_to_end(tiny_generator, store_uri):
    report = evaluate(tiny_generator, SamplerSpec(steps=2), num_prompts=10, num_seeds=2, batch_size=8, sheet_size=6, progress=False)
    summary = report["summary"]
    assert summary["images"] == 20 and set(summary["scores"]) >= {"position", "counting", "overall"}
    assert summary["stderr"].keys() == summary["scores"].keys()
    for category, p in summary["scores"].items():  # 4 images a category: p(1-p)/4 under the root
        assert category == "overall" or summary["stderr"][category] == pytest.approx((p * (1 - p) / 4) ** 0.5)
    per_category = [e for c, e in summary["stderr"].items() if c != "overall"]
    assert summary["stderr"]["overall"] == pytest.approx(sum(e**2 for e in per_category) ** 0.5 / len(per_category))
    kinds = summary["position_kinds"]  # the position images, split by kind of relation
    assert sum(k["images"] for k in kinds.values()) == 4
    assert sum(k["images"] * (k["accuracy"] or 0) for k in kinds.values()) == pytest.approx(4 * summary["scores"]["position"])
    write_report(report, store_uri)
    store = storage.open_store(store_uri)
    assert sorted(store.list()) == ["contact_sheet.png", "images.jsonl", "scores.json"]
    assert len(store.get_bytes("images.jsonl").splitlines()) == 20


def test_paired_difference_compares_two_reports_image_by_image(tmp_path):
    def rows(passed):  # two images (seeds 0 and 1) of one prompt per category
        return [{"prompt": c, "seed": s, "category": c, "passed": passed(c, s)} for c in CATEGORIES for s in (0, 1)]

    earlier = rows(lambda c, s: c == "counting")
    later = rows(lambda c, s: c == "counting" or (c == "position" and s == 0))
    diff = paired_difference(later, earlier)
    assert diff["position"] == pytest.approx({"mean": 0.5, "stderr": 0.5})  # differences 1 and 0
    assert diff["counting"] == diff["single_object"] == {"mean": 0.0, "stderr": 0.0}
    assert diff["overall"] == pytest.approx({"mean": 0.1, "stderr": 0.1})
    with pytest.raises(UserError, match="other prompts or seeds"):
        paired_difference(later, earlier[:-1])
    storage.open_store(str(tmp_path)).put_bytes("images.jsonl", "".join(json.dumps(r) + "\n" for r in earlier).encode())
    assert read_rows(str(tmp_path)) == earlier
    with pytest.raises(UserError, match="--against takes an earlier evaluation's --out"):
        read_rows(str(tmp_path / "nothing"))


def test_evaluate_checks_its_flags_and_out_before_any_work(s3_server, tmp_path, capsys, monkeypatch):
    from jobs import evaluate as evaluate_job

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags and --out were checked")

    monkeypatch.setattr(evaluate_job.Generator, "load", no_model)
    (tmp_path / "file").write_text("")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "images.jsonl").write_text(json.dumps({"prompt": "a red circle", "seed": 0}) + "\n")
    cases = [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--against", str(tmp_path / "report")], "--against: that report judged other prompts or seeds"),
        (["--out", ""], "an empty path or URI"),
        (["--seeds", "-1"], "--seeds must be >= 1"),
        (["--prompts", "2"], "--prompts must be >= 5"),
        (["--prompts", "516"], "ask for n <= 515"),
        (["--out", "s4://bucket/eval"], "unsupported scheme"),
        (["--out", "s3://no-such-bucket-here/eval"], "does not exist"),
        (["--out", str(tmp_path / "file" / "eval")], "cannot write"),
        (["--against", str(tmp_path / "no-report")], "--against takes an earlier evaluation's --out"),
    ]
    for argv, message in cases:
        assert evaluate_job.main(argv + (["--out", str(tmp_path / "o")] if "--out" not in argv else [])) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "report"]


def _resume_at(rank: int, steps: tuple[int, int], port: int, verdicts) -> None:
    """One of two gloo ranks: resume at steps[rank]; record whether the ranks' check refused it."""
    import torch.distributed as dist

    from socarrat.training import _same_on_every_rank

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        _same_on_every_rank(steps[rank], torch.device("cpu"))
        verdicts.put((rank, "agreed"))
    except UserError as err:
        verdicts.put((rank, str(err)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("steps, refused", [((500, 500), False), ((500, 0), True)])
def test_ranks_that_would_resume_at_different_steps_all_stop(steps, refused):
    import torch.multiprocessing as mp

    from conftest import _free_port

    ctx = mp.get_context("spawn")
    verdicts, port = ctx.Queue(), _free_port()
    ranks = [ctx.Process(target=_resume_at, args=(rank, steps, port, verdicts)) for rank in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=120)
    said = dict(verdicts.get(timeout=60) for _ in ranks)  # a rank that died puts nothing: fail, not hang
    assert sorted(said) == [0, 1]
    for message in said.values():  # every rank stops, not only the one that found no checkpoint
        assert ("steps 0 to 500" in message and "shared storage" in message) if refused else message == "agreed"
