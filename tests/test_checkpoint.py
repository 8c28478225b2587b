"""Checkpoints round-trip on disk and through the S3 API server, and refuse corrupt copies."""

import hashlib
import json

import numpy as np
import pytest
from safetensors import SafetensorError

from socarrat import storage
from socarrat.checkpoint import CONFIG, WEIGHTS, describe_checkpoint, load_checkpoint, save_checkpoint
from socarrat.config import SamplerSpec
from socarrat.errors import NotFoundError, UserError
from socarrat.generator import Generator


def test_round_trip_gives_the_same_images(store_uri, tiny_model, tiny_generator, tmp_path, monkeypatch):
    monkeypatch.setenv("SOCARRAT_CACHE", str(tmp_path / "cache"))
    digest = save_checkpoint(tiny_model, store_uri)
    loaded = Generator.load(store_uri, device="cpu")
    assert loaded.digest == digest and loaded.spec == tiny_model.spec
    spec = SamplerSpec(steps=4)
    a = np.asarray(loaded.generate(["a red circle"], [3], spec)[0].image).astype(int)
    b = np.asarray(tiny_generator.generate(["a red circle"], [3], spec)[0].image).astype(int)
    assert np.abs(a - b).max() <= 2  # weights are stored in fp16


def test_remote_checkpoint_is_cached_and_verified(s3_bucket, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SOCARRAT_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/ckpt"
    digest = save_checkpoint(tiny_model, uri)
    load_checkpoint(uri)
    cached = tmp_path / "cache" / digest / WEIGHTS
    assert cached.is_file()
    cached.write_bytes(b"garbage")  # a damaged cache is replaced by a fresh download
    load_checkpoint(uri)
    assert cached.read_bytes() != b"garbage"


def test_corrupt_weights_are_refused(tmp_path, tiny_model):
    save_checkpoint(tiny_model, str(tmp_path))
    (tmp_path / WEIGHTS).write_bytes((tmp_path / WEIGHTS).read_bytes()[:-10])
    for read in (load_checkpoint, describe_checkpoint):
        with pytest.raises(UserError, match="sha256"):
            read(str(tmp_path))


def test_describe_reads_what_load_loads_without_the_weights(tmp_path, tiny_model, tiny_token_checkpoint):
    for name in ("shapes-gaussian", "shapes-token", tiny_token_checkpoint):
        info, gen = describe_checkpoint(name), Generator.load(name, device="cpu")
        assert (info.spec, info.digest, info.pixel_multiple) == (gen.spec, gen.digest, gen.pixel_multiple)
    # Weights that no loader could read, but whose sha256 the config names: describe never parses them.
    save_checkpoint(tiny_model, str(tmp_path))
    (tmp_path / WEIGHTS).write_bytes(b"not safetensors")
    config = json.loads((tmp_path / CONFIG).read_text())
    (tmp_path / CONFIG).write_text(json.dumps({**config, "sha256": hashlib.sha256(b"not safetensors").hexdigest()}))
    assert describe_checkpoint(str(tmp_path)).spec == tiny_model.spec
    with pytest.raises(SafetensorError):
        load_checkpoint(str(tmp_path))


def test_a_partial_copy_or_weights_that_do_not_fit_the_config_are_refused(tmp_path, tiny_model):
    save_checkpoint(tiny_model, str(tmp_path))
    config = json.loads((tmp_path / CONFIG).read_text())
    (tmp_path / CONFIG).write_text(json.dumps({**config, "model": {**config["model"], "res_blocks": 2}}))
    with pytest.raises(UserError, match="does not fit the model its config.json describes"):
        load_checkpoint(str(tmp_path))
    (tmp_path / WEIGHTS).unlink()
    for read in (load_checkpoint, describe_checkpoint):
        with pytest.raises(NotFoundError, match="no model.safetensors beside its config.json"):
            read(str(tmp_path))


@pytest.mark.parametrize("config", ["{", '{"model": {}}', '{"model": {}, "sha256": "../../x"}'])
def test_malformed_configs_are_refused(tmp_path, s3_bucket, tiny_model, config):
    save_checkpoint(tiny_model, str(tmp_path))
    (tmp_path / CONFIG).write_text(config)
    with pytest.raises(UserError, match="not JSON|not a Socarrat checkpoint config"):
        load_checkpoint(str(tmp_path))
    storage.write_bytes(f"{s3_bucket}/m/{CONFIG}", config.encode())
    with pytest.raises(UserError, match="not JSON|not a Socarrat checkpoint config"):
        load_checkpoint(f"{s3_bucket}/m")


def test_missing_checkpoints_name_the_path(tmp_path, s3_bucket):
    with pytest.raises(NotFoundError, match="nowhere"):
        load_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(NotFoundError, match="missing/config.json"):
        load_checkpoint(f"{s3_bucket}/missing")
    storage.write_bytes(f"{s3_bucket}/x", b"")  # the bucket exists; the key does not


def test_a_training_runs_folder_points_to_its_newest_checkpoint(tmp_path, tiny_model):
    for step in ("step-00000002", "step-00000010"):
        save_checkpoint(tiny_model, str(tmp_path / "run" / step))
    (tmp_path / "run" / "step-00000011").mkdir()  # one being written: no config.json yet
    with pytest.raises(NotFoundError, match=r"it is a training run: its newest checkpoint is \S+/run/step-00000010$"):
        load_checkpoint(str(tmp_path / "run"))


def test_every_bundled_model_loads_generates_and_fits_the_asset_budget():
    from socarrat.checkpoint import CONFIG, bundled_models

    bundled = bundled_models()
    assert "shapes-gaussian" in bundled
    size = {name: sum(f.stat().st_size for f in path.iterdir()) for name, path in bundled.items()}
    assert size["shapes-gaussian"] <= 30 * 2**20 and sum(size.values()) <= 40 * 2**20  # the package-data budgets
    for name, path in bundled.items():
        assert (path / "README.md").is_file() and (path / CONFIG).is_file()  # a model card beside the weights
        gen = Generator.load(name, device="cpu")
        [result] = gen.generate(["a red circle"], [0], SamplerSpec(steps=2))
        assert result.image.size == (gen.spec.size_px, gen.spec.size_px) and result.metadata["model"] == name
