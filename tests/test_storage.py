"""Behaviour of socarrat.storage; every test taking `store_uri` runs on both backends, so S3 == local."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from socarrat import storage
from socarrat.errors import NotFoundError, UserError
from socarrat.s3 import S3Store
from socarrat.storage import Store, is_remote, join, open_store, read_bytes, write_bytes

MIB = 1024 * 1024
PART_SIZE_BYTES = 5 * MIB  # S3's smallest allowed part (except the last)


def _small_parts(uri: str) -> Store:
    """The store at `uri`, uploading in 5 MiB parts on S3 so a test file of ~11 MiB goes multipart."""
    store = open_store(uri)
    if isinstance(store, S3Store):
        return S3Store(store.bucket, store.prefix, part_size_bytes=PART_SIZE_BYTES)
    return store


def test_parent_of_a_full_uri() -> None:
    assert [storage.parent(u) for u in ("x.png", "/x.png", "a/b/x.png", "file:///tmp/x.png", "s3://b/p/x.png")] == [
        ".", "/", "a/b", "/tmp", "s3://b/p"]
    with pytest.raises(UserError, match="an empty path"):
        storage.parent("")


def test_put_get_round_trip(store_uri: str) -> None:
    store = open_store(store_uri)
    data = os.urandom(1000)
    assert store.put_bytes("a/b/c.bin", data) is True
    assert store.get_bytes("a/b/c.bin") == data
    store.put_bytes("a/b/c.bin", b"replaced")
    assert store.get_bytes("a/b/c.bin") == b"replaced"


def test_exists_before_and_after(store_uri: str) -> None:
    store = open_store(store_uri)
    assert not store.exists("x/y")
    store.put_bytes("x/y", b"")
    assert store.exists("x/y")
    assert not store.exists("x"), "a folder of keys is not itself a key"


def test_list_is_recursive_relative_sorted_and_honours_prefix(store_uri: str) -> None:
    store = open_store(store_uri)
    keys = ["b.txt", "a/2", "a/1", "ab", "a/c/d"]
    for key in keys:
        store.put_bytes(key, key.encode())
    open_store(store_uri + "-sibling").put_bytes("outside", b"")

    assert store.list() == sorted(keys)
    assert store.list("a/") == ["a/1", "a/2", "a/c/d"]
    assert store.list("a") == ["a/1", "a/2", "a/c/d", "ab"]
    assert store.list("a/c/") == ["a/c/d"]
    assert store.list("zzz") == []


def test_s3_folder_markers_are_not_listed(s3_bucket: str) -> None:
    """The S3 console's "Create folder" writes an empty object named "folder/": not a file under it."""
    import boto3

    client = boto3.session.Session().client("s3")
    for key in ("prompts/", "prompts/sub/", "prompts/a.txt"):
        client.put_object(Bucket=s3_bucket.removeprefix("s3://"), Key=key, Body=b"")
    assert open_store(s3_bucket + "/prompts").list() == ["a.txt"]
    assert open_store(s3_bucket).list() == ["prompts/a.txt"]


def test_delete_removes_and_tolerates_missing(store_uri: str) -> None:
    store = open_store(store_uri)
    store.put_bytes("gone", b"1")
    store.put_bytes("kept", b"2")
    store.delete("gone")
    assert not store.exists("gone")
    assert store.list() == ["kept"]
    store.delete("gone")
    store.delete("never/there")


def test_if_absent_first_writer_wins(store_uri: str) -> None:
    store = open_store(store_uri)
    assert store.put_bytes("k", b"first", if_absent=True) is True
    assert store.put_bytes("k", b"second", if_absent=True) is False
    assert store.get_bytes("k") == b"first"
    assert store.list() == ["k"]


@pytest.mark.parametrize("size_bytes", [0, 1000, 11 * MIB], ids=["empty", "small", "multipart"])
def test_put_file_get_file_round_trip(store_uri: str, tmp_path: Path, size_bytes: int) -> None:
    store = _small_parts(store_uri)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(size_bytes))
    assert store.put_file("files/f.bin", src) is True

    dest = tmp_path / "deep" / "er" / "dest.bin"
    store.get_file("files/f.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert store.get_bytes("files/f.bin") == src.read_bytes()
    if isinstance(store, S3Store) and size_bytes > PART_SIZE_BYTES:
        head = boto3.session.Session().client("s3").head_object(Bucket=store.bucket, Key="prefix/files/f.bin")
        assert head["ETag"].endswith('-3"'), "S3 gives multipart objects an ETag ending in -<parts>"
    assert os.listdir(dest.parent) == ["dest.bin"], "no temp file is left beside the download"


@pytest.mark.parametrize("size_bytes", [1000, 11 * MIB], ids=["small", "multipart"])
def test_put_file_if_absent_first_writer_wins(store_uri: str, tmp_path: Path, size_bytes: int) -> None:
    store = _small_parts(store_uri)
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    first.write_bytes(os.urandom(size_bytes))
    second.write_bytes(os.urandom(size_bytes))

    assert store.put_file("f.bin", first, if_absent=True) is True
    assert store.put_file("f.bin", second, if_absent=True) is False
    assert store.get_bytes("f.bin") == first.read_bytes()
    if isinstance(store, S3Store):
        client = boto3.session.Session().client("s3")
        uploads = client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
        assert uploads == [], "the refused multipart upload was aborted, leaving no parts behind"


class _ConflictOnce:
    """An S3 client whose first `op` call answers 409 ConditionalRequestConflict, as S3 does when a
    conditional write races another operation on the key; S3's documentation says to retry."""

    def __init__(self, client, op: str):
        self.client, self.op, self.conflicts = client, op, 0

    def __getattr__(self, name: str):
        if name != self.op or self.conflicts:
            return getattr(self.client, name)

        def conflict(**kwargs):
            self.conflicts += 1
            raise ClientError({"Error": {"Code": "ConditionalRequestConflict", "Message": "retry"},
                               "ResponseMetadata": {"HTTPStatusCode": 409}}, name)
        return conflict


@pytest.mark.parametrize("size_bytes, op", [(1000, "put_object"), (11 * MIB, "complete_multipart_upload")],
                         ids=["small", "multipart"])
def test_a_conditional_write_that_meets_a_conflict_is_retried(s3_bucket: str, tmp_path: Path, size_bytes: int,
                                                              op: str) -> None:
    store = _small_parts(s3_bucket)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(size_bytes))
    store._client = _ConflictOnce(store._client, op)
    assert store.put_file("f.bin", src, if_absent=True) is True  # 409 is not "already there"
    assert store._client.conflicts == 1 and store.get_bytes("f.bin") == src.read_bytes()
    store._client.conflicts = 0
    assert store.put_file("f.bin", tmp_path / "src.bin", if_absent=True) is False  # now it is: 412
    assert store._client.conflicts == 1


def test_missing_key_names_its_uri(store_uri: str, tmp_path: Path) -> None:
    store = open_store(store_uri)
    store.put_bytes("dir/inside", b"")
    for key in ["missing", "dir/missing", "dir"]:
        with pytest.raises(NotFoundError, match=re.escape(store.url(key))):
            store.get_bytes(key)
        with pytest.raises(NotFoundError, match=re.escape(store.url(key))):
            store.get_file(key, tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_missing_bucket_names_the_bucket(s3_server: str, tmp_path: Path) -> None:
    store = open_store("s3://no-such-bucket-socarrat/prefix")
    for action in [
        lambda: store.get_bytes("k"),
        lambda: store.put_bytes("k", b""),
        lambda: store.list(),
        lambda: store.delete("k"),
    ]:
        with pytest.raises(NotFoundError, match="no-such-bucket-socarrat"):
            action()


@pytest.mark.parametrize("env, message", [
    ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "no AWS credentials for"),
    ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_PROFILE": "typo"}, "no AWS credentials for"),
    ({"AWS_ENDPOINT_URL": "http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1"}, "cannot reach S3 for"),
], ids=["no-credentials", "unknown-profile", "unreachable"])
def test_missing_credentials_or_an_unreachable_endpoint_name_the_uri(s3_bucket: str, tmp_path: Path, monkeypatch,
                                                                      env: dict, message: str) -> None:
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with socket.socket() as unused:  # bound, never listening: connections to it are refused
        unused.bind(("127.0.0.1", 0))
        for name, value in env.items():
            if value is None:
                monkeypatch.delenv(name)
            else:
                monkeypatch.setenv(name, value.format(port=unused.getsockname()[1]))
        store = open_store(f"{s3_bucket}/p")
        for action in [lambda: store.get_bytes("k"), lambda: store.put_bytes("k", b""), lambda: store.list(),
                       lambda: store.exists("k"), lambda: store.delete("k")]:
            with pytest.raises(UserError, match=message + " " + re.escape(f"{s3_bucket}/p")):
                action()


def test_an_invalid_bucket_name_is_one_line(s3_server: str) -> None:
    with pytest.raises(UserError, match='^s3://my bucket/p/k is not a valid S3 location: Invalid bucket name "my bucket"$'):
        open_store("s3://my bucket/p").get_bytes("k")


def test_read_write_bytes_agree_with_store(store_uri: str) -> None:
    uri = join(store_uri, "dir/", "f.bin")
    write_bytes(uri, b"hello")
    assert read_bytes(uri) == b"hello"
    assert open_store(store_uri).get_bytes("dir/f.bin") == b"hello"
    assert open_store(store_uri).url("dir/f.bin").endswith("/dir/f.bin")
    assert read_bytes(open_store(store_uri).url("dir/f.bin")) == b"hello"
    with pytest.raises(NotFoundError, match="nothing.bin"):
        read_bytes(join(store_uri, "nothing.bin"))


def test_uri_forms(store_uri: str, tmp_path: Path) -> None:
    store = open_store(store_uri + "/")
    assert not store.uri.endswith("/")
    assert is_remote(store.uri) == store_uri.startswith("s3://")
    assert open_store(store.uri).uri == store.uri, "a store's URI opens the same store"
    assert open_store(f"file://{tmp_path}").uri == open_store(str(tmp_path)).uri
    with pytest.raises(UserError, match="gs://"):
        open_store("gs://bucket/prefix")


@pytest.mark.parametrize("key", ["../escape", "a/../../escape", "/abs", "a//b", "", ".tmp-x"])
def test_bad_keys_are_rejected(store_uri: str, key: str) -> None:
    store = open_store(store_uri)
    with pytest.raises(UserError, match="not allowed"):
        store.put_bytes(key, b"x")
    with pytest.raises(UserError, match="not allowed"):
        store.get_bytes(key)
    assert store.list() == []
    with pytest.raises(UserError):
        store.list("../")


def test_local_list_skips_temp_files(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    store.put_bytes("a/real", b"")
    (tmp_path / "a" / ".tmp-partial").write_bytes(b"half a file")
    assert store.list() == ["a/real"]


def test_unwritable_local_folder_names_the_uri(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    store = open_store(str(tmp_path / "a-file" / "store"))
    with pytest.raises(UserError, match=re.escape(store.url("k"))):
        store.put_bytes("k", b"x")


def test_share_url_is_presigned_on_s3_and_a_file_uri_locally(s3_bucket, tmp_path):
    import requests

    remote, local = open_store(f"{s3_bucket}/p"), open_store(str(tmp_path))
    for store in (remote, local):
        store.put_bytes("a/b.bin", b"payload")
    url = remote.share_url("a/b.bin", expires_s=60)
    assert url.startswith(os.environ["AWS_ENDPOINT_URL"]) and "Signature=" in url
    assert requests.get(url).content == b"payload"
    assert local.share_url("a/b.bin", expires_s=60) == local.url("a/b.bin")


def test_local_use_does_not_load_boto3():
    # boto3 and botocore load with the first s3:// URI only: local runs and bare GPU machines need neither.
    code = ("import sys, tempfile; from socarrat import cli, generator, storage; "
            "storage.write_bytes(tempfile.mkdtemp() + '/x', b'1'); print('boto3' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stdout + done.stderr
