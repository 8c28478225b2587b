"""Webdataset tar shards in object storage: write whole, publish atomically, read back tolerantly.

A shard is written to a local temporary file and uploaded whole when complete, so a reader never
sees a partial tar. Each sample's members (`{key}.png`, `{key}.txt`, `{key}.json`, ...) are written
next to each other, which webdataset readers require. Keys contain no dot (readers split the
member name at the first dot).

A *manifested* dataset adds one parquet manifest part per shard, which marks the shard complete:

    shards/{name}.tar          the samples, published first
    manifest/{name}.parquet    one row per sample (at least a `key` column), published last

A shard whose manifest part is missing is incomplete: its tar may be from a writer that died
between the two uploads, so readers of a manifested dataset go by the manifest, and
`remove_incomplete` deletes such tars before their samples are written again. Both uploads are
first-writer-wins (`if_absent`), so a published object never changes. Depends on storage and pyarrow.
"""

from __future__ import annotations

import io
import re
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from socarrat import storage
from socarrat.errors import NotFoundError, UserError

Sample = tuple[str, dict[str, bytes]]  # (key, {extension: bytes})
SHARD_DIR, MANIFEST_DIR = "shards", "manifest"
_READERS = 16  # manifest parts fetched at once: S3 GETs are latency-bound


def write_shard(store: storage.Store, name: str, samples: Iterable[Sample], if_absent: bool = False) -> bool:
    """Write `samples` as one tar `name` under `store`; False if `if_absent` and it already exists."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.tar"
        with tarfile.open(path, "w") as tar:
            for key, members in samples:
                if "." in key.rsplit("/", 1)[-1]:
                    raise UserError(f"shard key {key!r} must not contain a dot")
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode, info.mtime = len(data), 0o644, 0
                    tar.addfile(info, io.BytesIO(data))
        return store.put_file(name, path, if_absent=if_absent)


def write_shards(uri: str, samples: Iterable[Sample], shard_size: int) -> int:
    """Write `samples` as shards `shard-000000.tar`, ... of `shard_size` samples under `uri`;
    returns the number of shards. Deterministic names: writing again replaces, never adds (the
    shards of an earlier, larger write that this one did not replace are deleted)."""
    if shard_size < 1:
        raise UserError(f"shard_size must be >= 1, got {shard_size}")
    store, count, batch = storage.open_store(uri), 0, []
    for sample in samples:
        batch.append(sample)
        if len(batch) == shard_size:
            write_shard(store, f"shard-{count:06d}.tar", batch)
            count, batch = count + 1, []
    if batch:
        write_shard(store, f"shard-{count:06d}.tar", batch)
        count += 1
    for key in store.list("shard-"):
        if (m := re.fullmatch(r"shard-(\d{6})\.tar", key)) and int(m.group(1)) >= count:
            store.delete(key)
    return count


def list_shards(uri: str) -> list[str]:
    """Full URIs of the .tar shards under `uri` (a prefix), sorted; NotFoundError if none."""
    store = storage.open_store(uri)
    names = [k for k in store.list() if k.endswith(".tar")]
    if not names:
        raise NotFoundError(f"no .tar shards under {uri}")
    return [store.url(k) for k in names]


def read_shard(uri: str, stats: dict[str, int] | None = None) -> Iterator[Sample]:
    """Samples of one shard in order. A damaged tar ends the shard, counted in `stats["corrupt"]`,
    rather than stopping the reader: the samples before the damage are yielded, the one it cuts
    is dropped, since some of its members may be missing."""
    stats = stats if stats is not None else {}
    current: Sample | None = None
    raw = storage.read_bytes(uri)  # a failed read is an error to report, not a damaged shard
    try:
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")  # as write_shard: the key ends at the
                key, _, ext = name.partition(".")                # first dot of the last path segment
                key = f"{folder}/{key}" if folder else key
                data = tar.extractfile(member).read()
                if current and current[0] != key:
                    yield current
                    current = None
                current = current or (key, {})
                current[1][ext] = data
    except (tarfile.TarError, EOFError, OSError):  # OSError: a damaged compressed tar (BadGzipFile)
        stats["corrupt"] = stats.get("corrupt", 0) + 1
        return
    if current:
        yield current


def publish_shard(store: storage.Store, name: str, samples: Iterable[Sample], manifest: pa.Table,
                  before_manifest: Callable[[], None] = lambda: None) -> bool:
    """Publish shard `name` of a manifested dataset: its tar, then (after `before_manifest`, which
    may raise to stop it) its manifest part.

    Returns False when the manifest part was already there (another attempt completed the shard
    first); a tar already there is kept as it is, since only an attempt at the same shard writes it."""
    write_shard(store, f"{SHARD_DIR}/{name}.tar", samples, if_absent=True)
    before_manifest()
    buf = io.BytesIO()
    pq.write_table(manifest, buf)
    return store.put_bytes(f"{MANIFEST_DIR}/{name}.parquet", buf.getvalue(), if_absent=True)


def complete_shards(store: storage.Store) -> list[str]:
    """Names of the shards whose manifest part is published, sorted."""
    return [k.removeprefix(f"{MANIFEST_DIR}/").removesuffix(".parquet")
            for k in store.list(f"{MANIFEST_DIR}/") if k.endswith(".parquet")]


def remove_incomplete(store: storage.Store) -> list[str]:
    """Delete the tars that have no manifest part; returns their names. Only safe while no other
    writer is publishing into `store`: its tar in flight would look incomplete too."""
    done = set(complete_shards(store))
    names = [k.removeprefix(f"{SHARD_DIR}/").removesuffix(".tar")
             for k in store.list(f"{SHARD_DIR}/") if k.endswith(".tar")]
    orphans = [n for n in names if n not in done]
    for name in orphans:
        store.delete(f"{SHARD_DIR}/{name}.tar")
    return orphans


def read_manifest(store: storage.Store, columns: list[str] | None = None) -> pa.Table | None:
    """The manifest rows of every complete shard (None when there is none yet)."""
    def part(name: str) -> pa.Table:
        data = store.get_bytes(f"{MANIFEST_DIR}/{name}.parquet")
        return pq.read_table(io.BytesIO(data), columns=columns)

    names = complete_shards(store)
    if not names:
        return None
    with ThreadPoolExecutor(_READERS) as pool:
        return pa.concat_tables(pool.map(part, names), promote_options="permissive")
