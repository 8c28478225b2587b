"""socarrat.shards: tar shards round-trip, and the tar + manifest pair that marks a shard complete.

Tests taking `store_uri` run on a local folder and on the S3 API server, so S3 == local.
"""

import errno
import io
import tarfile

import pyarrow as pa
import pytest
import webdataset as wds

from socarrat import shards, storage
from socarrat.errors import NotFoundError, UserError
from socarrat.shards import (
    complete_shards, list_shards, publish_shard, read_manifest, read_shard, remove_incomplete, write_shard,
    write_shards,
)


def samples(keys, tag=b""):
    return [(k, {"txt": k.encode() + tag, "json": b"{}"}) for k in keys]


def manifest(keys):
    return pa.table({"key": keys, "n": list(range(len(keys)))})


def test_write_shards_round_trip_with_deterministic_names(store_uri):
    keys = [f"k{i:03d}" for i in range(7)]
    assert write_shards(store_uri, samples(keys), shard_size=3) == 3
    assert write_shards(store_uri, samples(keys), shard_size=3) == 3  # replaces, never adds
    uris = list_shards(store_uri)
    assert [u.rsplit("/", 1)[1] for u in uris] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    read = [s for u in uris for s in read_shard(u)]
    assert read == samples(keys)
    assert write_shards(store_uri, samples(keys[:2]), shard_size=1) == 2  # fewer: the rest are gone
    assert [u.rsplit("/", 1)[1] for u in list_shards(store_uri)] == ["shard-000000.tar", "shard-000001.tar"]


def test_a_key_with_dots_in_its_folders_reads_back_as_written(tmp_path):
    keys = ["v1.0/abc", "v1.0/sub.dir/def"]
    write_shards(str(tmp_path), samples(keys), shard_size=2)
    assert [s for u in list_shards(str(tmp_path)) for s in read_shard(u)] == samples(keys)


def test_write_shard_rejects_dotted_keys_and_list_shards_wants_some(store_uri):
    with pytest.raises(UserError, match="dot"):
        write_shard(storage.open_store(store_uri), "a.tar", samples(["x.y"]))
    with pytest.raises(NotFoundError):
        list_shards(store_uri)


def test_read_shard_counts_a_corrupt_tar(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 100)
    stats = {}
    assert list(read_shard(str(tmp_path / "bad.tar"), stats)) == [] and stats == {"corrupt": 1}


def test_a_shard_that_cannot_be_read_is_an_error_not_a_corrupt_tar(tmp_path, monkeypatch):
    """A failing disk or network must stop the reader, not silently drop the shard's samples."""
    stats = {}
    with pytest.raises(NotFoundError, match="gone.tar"):
        list(read_shard(str(tmp_path / "gone.tar"), stats))

    def failing_disk(uri: str) -> bytes:
        raise OSError(errno.EIO, "Input/output error", uri)

    monkeypatch.setattr(shards.storage, "read_bytes", failing_disk)
    with pytest.raises(OSError, match="Input/output error"):
        list(read_shard(str(tmp_path / "bad.tar"), stats))
    assert stats == {}


def test_no_damaged_byte_of_a_gzipped_shard_stops_the_reader(tmp_path):
    """tarfile opens compressed tars too; gzip's own damage errors are OSErrors (BadGzipFile)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in range(3):
            data = bytes((j * 7 + i) % 251 for j in range(3000))
            info = tarfile.TarInfo(f"k{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    for pos in range(len(raw)):
        damaged = bytearray(raw)
        damaged[pos] ^= 0xFF
        (tmp_path / "s.tar").write_bytes(damaged)
        assert len(list(read_shard(str(tmp_path / "s.tar"), {}))) <= 3


def test_read_shard_drops_the_sample_a_damaged_tar_cuts(tmp_path):
    store = storage.open_store(str(tmp_path))
    write_shard(store, "s.tar", [("k1", {"txt": b"k1", "json": b"{}"}), ("k2", {"txt": b"k2", "json": b" " * 5000})])
    whole = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[:whole.index(b"k2.json") + 1024])  # inside k2.json's data
    stats = {}
    assert list(read_shard(str(tmp_path / "cut.tar"), stats)) == [("k1", {"txt": b"k1", "json": b"{}"})]
    assert stats == {"corrupt": 1}


def test_a_shard_is_complete_only_with_its_manifest_part(store_uri):
    store = storage.open_store(store_uri)
    assert publish_shard(store, "s1", samples(["a", "b"]), manifest(["a", "b"])) is True
    # A writer that died between its two uploads leaves a tar without a manifest part.
    write_shard(store, "shards/s2.tar", samples(["c"]), if_absent=True)
    assert complete_shards(store) == ["s1"]
    assert read_manifest(store).column("key").to_pylist() == ["a", "b"]
    assert remove_incomplete(store) == ["s2"]
    assert store.list() == ["manifest/s1.parquet", "shards/s1.tar"]
    assert read_manifest(storage.open_store(store_uri + "-empty")) is None


def test_publishing_again_changes_nothing(store_uri):
    store = storage.open_store(store_uri)
    assert publish_shard(store, "s1", samples(["a"]), manifest(["a"])) is True
    tar, part = store.get_bytes("shards/s1.tar"), store.get_bytes("manifest/s1.parquet")
    # A retried attempt (other bytes, same shard) finds both objects published: first writer wins.
    assert publish_shard(store, "s1", samples(["a"], b"retry"), manifest(["a"]).append_column("x", pa.array([1]))) is False
    assert store.get_bytes("shards/s1.tar") == tar and store.get_bytes("manifest/s1.parquet") == part


def test_a_retry_completes_a_shard_whose_tar_is_already_there(store_uri):
    store = storage.open_store(store_uri)
    write_shard(store, "shards/s1.tar", samples(["a"]), if_absent=True)
    assert publish_shard(store, "s1", samples(["a"]), manifest(["a"])) is True
    assert complete_shards(store) == ["s1"]


def test_published_tars_read_with_the_webdataset_library(tmp_path):
    store = storage.open_store(str(tmp_path))
    publish_shard(store, "s1", samples(["k1", "k2"]), manifest(["k1", "k2"]))
    got = [(s["__key__"], s["txt"]) for s in wds.WebDataset(str(tmp_path / "shards" / "s1.tar"), shardshuffle=False)]
    assert got == [("k1", b"k1"), ("k2", b"k2")]
    with tarfile.open(fileobj=io.BytesIO(store.get_bytes("shards/s1.tar"))) as tar:
        assert tar.getnames() == ["k1.txt", "k1.json", "k2.txt", "k2.json"]  # grouped by key
