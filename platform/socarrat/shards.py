"""Webdataset tar shards in object storage: write whole, publish atomically, read back tolerantly.

A shard is written to a local temporary file and uploaded whole when complete, so a reader never
sees a partial tar. Each sample's members (`{key}.png`, `{key}.txt`, `{key}.json`, ...) are written
next to each other, which webdataset readers require. Keys contain no dot (readers split the
member name at the first dot). Depends on storage only.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from socarrat import storage
from socarrat.errors import NotFoundError, UserError

Sample = tuple[str, dict[str, bytes]]  # (key, {extension: bytes})


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
    returns the number of shards. Deterministic names: writing again replaces, never adds."""
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
    return count


def list_shards(uri: str) -> list[str]:
    """Full URIs of the .tar shards under `uri` (a prefix), sorted; NotFoundError if none."""
    store = storage.open_store(uri)
    names = [k for k in store.list() if k.endswith(".tar")]
    if not names:
        raise NotFoundError(f"no .tar shards under {uri}")
    return [store.url(k) for k in names]


def read_shard(uri: str, stats: dict[str, int] | None = None) -> Iterator[Sample]:
    """Samples of one shard in order; an unreadable tar or member is skipped and counted in
    `stats["corrupt"]` rather than stopping the reader."""
    stats = stats if stats is not None else {}
    current: Sample | None = None
    try:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(uri))) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                if current and current[0] != key:
                    yield current
                    current = None
                current = current or (key, {})
                current[1][ext] = data
    except (tarfile.TarError, EOFError, OSError):
        stats["corrupt"] = stats.get("corrupt", 0) + 1
    if current:
        yield current
