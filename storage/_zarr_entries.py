"""Staged, commit-marked entries in a Zarr v3 store: the crash and concurrency safety of the feature store.

Zarr has no atomic multi-key update, so every entry is written in two steps. A writer first writes its
arrays under a private *stage* name nobody reads, then publishes them by overwriting one small JSON object
(the commit marker) that names the stage. Single-object writes are atomic on object stores and on zarr's
LocalStore (temp file + rename), so a reader sees either the old entry or the complete new one, and a writer
killed before its marker leaves only an unreferenced stage that `gc` removes. Writers share no object except
the marker, where the last complete write wins.

Layout (every node is a plain Zarr v3 group or array, so `zarr.open_group(url)` can browse the store):

    <ns>/<fp>/<key>/zarr.json             commit marker: group attrs {"commit": <stage>, "n_rows": T, ...}
    <ns>/<fp>/<key>/<stage>/<array>       one write attempt; <stage> = "<time_ns:016x>-<12 hex>" (gc: age)
    overwrites/<ns>/<fp>/<key>/zarr.json  written when a committed entry is replaced: packs stop serving it

Arrays are stored uncompressed: dense float features barely compress, and decoding would cost more than it
saves on local disks. Per-entry arrays are one chunk. Packs (`_zarr_packs`) make bulk reads fast.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import zarr
import zarr.api.asynchronous as za
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import StorePath

from storage.errors import MamFusionError

T = TypeVar("T")

MAX_CONCURRENT = 64  # entries read or written at once (each is a few small objects)
_PROTOTYPE = default_buffer_prototype()
_STAGE = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{12}$")


class FeatureStoreError(MamFusionError):
    """Base class of feature-store errors: the store is unusable, damaged, or given invalid input."""


@dataclass(frozen=True)
class ArraySpec:
    """One array of an entry: its trailing shape (after the row axis), dtype and dimension names."""

    name: str
    trailing: tuple[int, ...]
    dtype: str
    dimension_names: tuple[str, ...]


@dataclass(frozen=True)
class Entry:
    """A committed entry as read back: which stage it came from, its marker metadata and its arrays."""

    key: str
    commit: str
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]


def new_stage_id() -> str:
    """A unique, time-ordered name for one write attempt."""
    return f"{time.time_ns():016x}-{secrets.token_hex(6)}"


def is_stage_id(name: str) -> bool:
    return bool(_STAGE.match(name))


def stage_age_s(stage: str) -> float:
    return time.time() - int(stage.split("-", 1)[0], 16) / 1e9


def entry_path(ns: str, fp: str, key: str) -> str:
    return f"{ns}/{fp}/{key}"


def overwrites_path(ns: str, fp: str) -> str:
    return f"overwrites/{ns}/{fp}"


def _meta_key(path: str) -> str:
    return f"{path}/zarr.json" if path else "zarr.json"


async def gather_limited(coros: Iterable[Awaitable[T]], limit: int = MAX_CONCURRENT) -> list[T]:
    """`asyncio.gather` with at most `limit` in flight: thousands of entries must not open as many files."""
    gate = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[T]) -> T:
        async with gate:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


async def get_attrs(store: Store, path: str) -> dict[str, Any] | None:
    """Attributes of the group at `path`, or None when there is no group there."""
    key = _meta_key(path)
    buf = await store.get(key, _PROTOTYPE)
    if buf is None:
        return None
    try:
        doc = json.loads(buf.to_bytes())
    except ValueError as exc:
        raise FeatureStoreError(
            f"store object {key!r} is not valid JSON ({exc}); the store is damaged"
        ) from exc
    if not isinstance(doc, dict) or doc.get("node_type") != "group":
        raise FeatureStoreError(f"store object {key!r} is not a Zarr group's metadata; the store is damaged")
    attrs = doc.get("attributes", {})
    return attrs if isinstance(attrs, dict) else {}


async def put_group(store: Store, path: str, attrs: Mapping[str, Any], *, exclusive: bool = False) -> None:
    """Write a group's metadata in one object write (atomic); `exclusive` keeps an existing one."""
    doc = {"zarr_format": 3, "node_type": "group", "attributes": dict(attrs)}
    buf = _PROTOTYPE.buffer.from_bytes(json.dumps(doc, allow_nan=False).encode())
    if exclusive:
        await store.set_if_not_exists(_meta_key(path), buf)
    else:
        await store.set(_meta_key(path), buf)


async def list_children(store: Store, path: str) -> list[str]:
    """Names directly under `path` (empty when it does not exist)."""
    try:
        return [name async for name in store.list_dir(path)]
    except FileNotFoundError:
        return []


async def write_array(store: Store, path: str, data: np.ndarray, spec: ArraySpec) -> None:
    """Write a whole per-entry array as a single uncompressed chunk.

    Stage paths are unique, so there is nothing to overwrite; `overwrite=True` would make zarr list and delete
    the path first, which races with concurrent writers on fsspec's in-memory filesystem.
    """
    await za.create_array(
        store,
        name=path,
        data=np.ascontiguousarray(data, dtype=spec.dtype),
        chunks=data.shape,
        compressors=None,
        fill_value=0,
        dimension_names=spec.dimension_names,
    )


async def open_array(store: Store, path: str) -> zarr.AsyncArray:
    try:
        return await zarr.AsyncArray.open(StorePath(store, path))
    except FileNotFoundError as exc:  # zarr's ArrayNotFoundError / NodeNotFoundError derive from it
        raise FeatureStoreError(
            f"array {path!r} is referenced by a commit but missing; the store is damaged"
        ) from exc


async def read_array(store: Store, path: str) -> np.ndarray:
    return np.asarray(await (await open_array(store, path)).getitem(slice(None)))


async def stage_entry(
    store: Store, ns: str, fp: str, key: str, arrays: Mapping[str, tuple[np.ndarray, ArraySpec]]
) -> str:
    """Write one attempt's arrays under a fresh stage name; nothing reads them until `commit_entry`."""
    stage = new_stage_id()
    base = f"{entry_path(ns, fp, key)}/{stage}"
    await asyncio.gather(
        *(write_array(store, f"{base}/{name}", data, spec) for name, (data, spec) in arrays.items())
    )
    return stage


async def commit_entry(store: Store, ns: str, fp: str, key: str, stage: str, meta: Mapping[str, Any]) -> None:
    """Publish a staged entry by writing its marker last; record the overwrite if an earlier stage exists."""
    base = entry_path(ns, fp, key)
    await put_group(store, base, {**meta, "commit": stage, "committed_s": time.time()})
    if any(is_stage_id(c) and c != stage for c in await list_children(store, base)):
        await put_group(store, f"{overwrites_path(ns, fp)}/{key}", {"key": key})


async def read_marker(store: Store, ns: str, fp: str, key: str) -> dict[str, Any] | None:
    """The commit marker's attributes, or None while the entry has no complete write."""
    attrs = await get_attrs(store, entry_path(ns, fp, key))
    if attrs is None or not is_stage_id(str(attrs.get("commit", ""))):
        return None
    return attrs


async def read_entry(store: Store, ns: str, fp: str, key: str, names: Sequence[str]) -> Entry | None:
    """One committed entry read through its marker (None when not committed)."""
    marker = await read_marker(store, ns, fp, key)
    if marker is None:
        return None
    base = f"{entry_path(ns, fp, key)}/{marker['commit']}"
    data = await asyncio.gather(*(read_array(store, f"{base}/{name}") for name in names))
    return Entry(key, marker["commit"], marker, dict(zip(names, data, strict=True)))


async def committed_keys(store: Store, ns: str, fp: str) -> list[tuple[str, dict[str, Any]]]:
    """(key, marker) of every committed entry, in commit-time order (the order extraction wrote them)."""
    keys = [k for k in await list_children(store, f"{ns}/{fp}") if k != "zarr.json"]
    markers = await gather_limited(read_marker(store, ns, fp, k) for k in keys)
    found = [(k, m) for k, m in zip(keys, markers, strict=True) if m is not None]
    return sorted(found, key=lambda km: km[1]["commit"])


def retired_long_ago(pointer: Mapping[str, Any] | None, min_age_s: float) -> bool:
    """Whether every stage the pointer no longer names was replaced at least `min_age_s` ago: each was
    replaced no later than the current commit, so readers that loaded an older pointer are long done."""
    return pointer is None or time.time() - float(pointer.get("committed_s", 0.0)) >= min_age_s


async def gc_entry(store: Store, ns: str, fp: str, key: str, min_age_s: float) -> int:
    """Delete an entry's stages that its marker does not name, once old and replaced long enough ago."""
    base = entry_path(ns, fp, key)
    marker = await read_marker(store, ns, fp, key)
    current = marker["commit"] if marker else None
    stages = [c for c in await list_children(store, base) if is_stage_id(c) and c != current]
    old = [s for s in stages if stage_age_s(s) >= min_age_s] if retired_long_ago(marker, min_age_s) else []
    for stage in old:
        await store.delete_dir(f"{base}/{stage}")
    if current is None and len(old) == len(stages):
        await store.delete(_meta_key(base))  # an entry that never committed: drop its empty group too
    return len(old)
