"""Packs: every committed entry of a fingerprint concatenated, so a bulk read is a few large reads.

One array per entry is trivially safe to write concurrently, but reading thousands of them means thousands of
small objects. A pack is built from committed entries only and published like an entry, by a pointer written
last, so it is as crash- and concurrency-safe:

    packs/<ns>/<fp>/zarr.json          pack pointer: group attrs {"current": <stage>, "committed_s": ...}
    packs/<ns>/<fp>/<stage>/<array>    every packed entry's rows concatenated, in row chunks; the group
                                       attrs hold keys, commits, row offsets and each entry's meta

A pack records the commit of each entry it holds; an entry replaced later (see `overwrites/`) is read from
its own arrays until the next pack. On local disks uncompressed chunk files are read straight into the
result (one copy, close to `np.load`); other stores go through zarr.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.api.asynchronous as za
from zarr.abc.store import Store
from zarr.codecs import BytesCodec
from zarr.codecs.bytes import Endian
from zarr.core.metadata import ArrayV3Metadata
from zarr.storage import LocalStore

from storage import _zarr_entries as entries
from storage._zarr_entries import ArraySpec, Entry, FeatureStoreError, gather_limited, get_attrs, put_group

# ~8 MiB row chunks: few objects to open in a scan. Local reads fetch only the rows asked for, so a split's
# subset does not read whole chunks there; object stores fetch whole chunks, and 8 MiB objects suit them too.
PACK_CHUNK_BYTES = 8 << 20
CHUNK_READERS = 4  # chunk files read at once on local disks (more only contends for CPU on small machines)


@dataclass(frozen=True)
class Pack:
    """Index of one committed pack (immutable once written, so it is cached by stage id)."""

    stage: str
    keys: list[str]
    commits: list[str]
    offsets: np.ndarray
    meta: list[dict[str, Any]]
    chunk_rows: int
    position: dict[str, int]

    def commit_of(self, key: str) -> str:
        return self.commits[self.position[key]]


def pack_path(ns: str, fp: str) -> str:
    return f"packs/{ns}/{fp}"


async def load_pack(store: Store, ns: str, fp: str, cache: dict[str, Pack]) -> Pack | None:
    """The current pack of (ns, fp), or None; pack indexes never change, so they are cached by stage."""
    pointer = await get_attrs(store, pack_path(ns, fp))
    stage = (pointer or {}).get("current")
    if not stage:
        return None
    if stage not in cache:
        attrs = await get_attrs(store, f"{pack_path(ns, fp)}/{stage}")
        if attrs is None:
            raise FeatureStoreError(
                f"pack {pack_path(ns, fp)}/{stage} is referenced but missing; the store is damaged"
            )
        keys = list(attrs["keys"])
        cache[stage] = Pack(
            stage=stage,
            keys=keys,
            commits=list(attrs["commits"]),
            offsets=np.asarray(attrs["offsets"], dtype=np.int64),
            meta=list(attrs["meta"]),
            chunk_rows=int(attrs["chunk_rows"]),
            position={k: i for i, k in enumerate(keys)},
        )
    return cache[stage]


def _row_runs(spans: list[tuple[int, int]], max_gap: int) -> list[tuple[int, int]]:
    """Merge row spans (sorted) that touch or lie within `max_gap` rows, to read each region once."""
    runs: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if runs and lo <= runs[-1][1] + max_gap:
            runs[-1] = (runs[-1][0], max(runs[-1][1], hi))
        else:
            runs.append((lo, hi))
    return runs


def _plain_local_chunks(store: Store, array: zarr.AsyncArray) -> Path | None:
    """The array's directory when its chunks are raw little-endian bytes on a local disk, else None.

    Then chunk files can be read straight into the output array: one copy instead of zarr's read-then-copy,
    which is what keeps a bulk read close to `np.load` speed. Other stores and codecs take zarr's path.
    """
    md = array.metadata
    plain = (
        isinstance(store, LocalStore)
        and sys.byteorder == "little"
        and isinstance(md, ArrayV3Metadata)
        and len(md.codecs) == 1
        and isinstance(md.codecs[0], BytesCodec)
        and md.codecs[0].endian in (None, Endian.little)
        and md.fill_value == 0
    )
    return store.root / array.path if plain else None


def _read_chunk_into(
    directory: Path, array: zarr.AsyncArray, chunk: int, lo: int, hi: int, out: np.ndarray
) -> None:
    """Copy rows [lo, hi) of one row chunk into `out` (rows [lo, hi) of the caller's run, already offset)."""
    chunk_rows = array.chunks[0]
    row_bytes = out.itemsize * int(np.prod(out.shape[1:], dtype=np.int64))
    target = memoryview(out).cast("B")
    path = directory / array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))
    try:
        with open(path, "rb") as f:
            f.seek((lo - chunk * chunk_rows) * row_bytes)
            got = f.readinto(target)
    except FileNotFoundError:  # zarr does not store chunks equal to the fill value
        out[...] = 0
        return
    if got != len(target):
        raise FeatureStoreError(
            f"chunk {path} holds {got} bytes where {len(target)} were expected; store damaged"
        )


async def _read_rows(store: Store, array: zarr.AsyncArray, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of a pack array, chunk files read concurrently straight into the result when possible."""
    directory = _plain_local_chunks(store, array)
    if directory is None:
        return np.asarray(await array.getitem(slice(lo, hi)))
    out = np.empty((hi - lo, *array.shape[1:]), dtype=array.dtype)
    size = array.chunks[0]
    parts = []
    for chunk in range(lo // size, (hi - 1) // size + 1):
        c_lo, c_hi = max(lo, chunk * size), min(hi, (chunk + 1) * size)
        parts.append(
            asyncio.to_thread(
                _read_chunk_into, directory, array, chunk, c_lo, c_hi, out[c_lo - lo : c_hi - lo]
            )
        )
    await gather_limited(parts, limit=CHUNK_READERS)
    return out


async def _read_from_pack(
    store: Store, ns: str, fp: str, pack: Pack, keys: list[str], names: Sequence[str]
) -> list[Entry]:
    """Read entries' rows from a pack: a few large concurrent range reads instead of one object per entry."""
    idx = [pack.position[k] for k in keys]
    spans = [(int(pack.offsets[i]), int(pack.offsets[i + 1])) for i in idx]
    base = f"{pack_path(ns, fp)}/{pack.stage}"
    arrays = await asyncio.gather(*(entries.open_array(store, f"{base}/{name}") for name in names))
    # Direct reads fetch exactly the rows asked for; zarr fetches whole chunks, so runs sharing one merge.
    direct = all(_plain_local_chunks(store, a) is not None for a in arrays)
    runs = _row_runs(spans, 0 if direct else pack.chunk_rows)
    blocks = await asyncio.gather(*(_read_rows(store, a, lo, hi) for a in arrays for lo, hi in runs))
    per_name = {name: blocks[j * len(runs) : (j + 1) * len(runs)] for j, name in enumerate(names)}
    starts = np.array([lo for lo, _ in runs])
    out = []
    for key, i, (lo, hi) in zip(keys, idx, spans, strict=True):
        r = int(np.searchsorted(starts, lo, side="right")) - 1
        first = lo - runs[r][0]
        data = {name: per_name[name][r][first : first + hi - lo] for name in names}
        out.append(Entry(key, pack.commits[i], pack.meta[i], data))
    return out


async def split_packed(
    store: Store, ns: str, fp: str, keys: Sequence[str], cache: dict[str, Pack]
) -> tuple[Pack | None, list[str], list[str]]:
    """(current pack, keys it serves, the other keys) for distinct `keys`; the others are read one by one."""
    wanted = list(dict.fromkeys(keys))
    pack, overwritten = await asyncio.gather(
        load_pack(store, ns, fp, cache), entries.list_children(store, entries.overwrites_path(ns, fp))
    )
    packed = [k for k in wanted if pack is not None and k in pack.position]
    if pack is not None and overwritten:  # a replaced entry is still served from the pack if it was re-packed
        replaced = [k for k in packed if k in set(overwritten)]
        markers = await gather_limited(entries.read_marker(store, ns, fp, k) for k in replaced)
        stale = {
            k for k, m in zip(replaced, markers, strict=True) if not m or m["commit"] != pack.commit_of(k)
        }
        packed = [k for k in packed if k not in stale]
    packed_set = set(packed)
    return pack, packed, [k for k in wanted if k not in packed_set]


async def read_many(
    store: Store, ns: str, fp: str, keys: Sequence[str], names: Sequence[str], cache: dict[str, Pack]
) -> dict[str, Entry]:
    """Committed entries among `keys` (missing ones absent): from the current pack, else one by one."""
    pack, packed, loose = await split_packed(store, ns, fp, keys, cache)
    found = (
        {e.key: e for e in await _read_from_pack(store, ns, fp, pack, packed, names)}
        if pack and packed
        else {}
    )
    for entry in await gather_limited(entries.read_entry(store, ns, fp, k, names) for k in loose):
        if entry is not None:
            found[entry.key] = entry
    return found


def pack_chunk_rows(spec: ArraySpec) -> int:
    """Rows per pack chunk of this array: ~PACK_CHUNK_BYTES whatever its width (narrow times: few chunks)."""
    return max(1, PACK_CHUNK_BYTES // (int(np.prod(spec.trailing)) * np.dtype(spec.dtype).itemsize))


async def build_pack(
    store: Store, ns: str, fp: str, specs: Sequence[ArraySpec], cache: dict[str, Pack], batch: int = 256
) -> Pack | None:
    """Concatenate every committed entry into a new pack and point readers at it (no-op if unchanged)."""
    found = await entries.committed_keys(store, ns, fp)
    if not found:
        return None
    keys = [k for k, _ in found]
    current = await load_pack(store, ns, fp, cache)
    if current is not None and current.keys == keys and current.commits == [m["commit"] for _, m in found]:
        return current
    offsets = np.concatenate([[0], np.cumsum([int(m["n_rows"]) for _, m in found])]).astype(np.int64)
    chunk_rows = min(pack_chunk_rows(s) for s in specs)  # flush in whole chunks of the widest array
    stage = entries.new_stage_id()
    base = f"{pack_path(ns, fp)}/{stage}"
    arrays = {
        s.name: await za.create_array(
            store,
            name=f"{base}/{s.name}",
            shape=(int(offsets[-1]), *s.trailing),
            dtype=s.dtype,
            chunks=(pack_chunk_rows(s), *s.trailing),
            compressors=None,
            fill_value=0,
            dimension_names=s.dimension_names,
        )
        for s in specs
    }
    names = [s.name for s in specs]
    commits: list[str] = []
    metas: list[dict[str, Any]] = []
    pending: dict[str, list[np.ndarray]] = {n: [] for n in names}
    written = buffered = 0
    for start in range(0, len(keys), batch):
        chunk_keys = keys[start : start + batch]
        got = await read_many(store, ns, fp, chunk_keys, names, cache)
        for j, key in enumerate(chunk_keys, start):
            entry = got.get(key)
            n = int(offsets[j + 1] - offsets[j])
            if entry is None or int(entry.meta["n_rows"]) != n:
                raise FeatureStoreError(f"entry {ns}/{fp}/{key} changed while packing; run pack again")
            commits.append(entry.commit)
            metas.append({k: v for k, v in entry.meta.items() if k != "commit"})
            for name in names:
                pending[name].append(entry.arrays[name])
            buffered += n
        flush = buffered if start + batch >= len(keys) else buffered - buffered % chunk_rows
        if flush:
            for name in names:
                rows = np.concatenate(pending[name])
                await arrays[name].setitem(slice(written, written + flush), rows[:flush])
                pending[name] = [rows[flush:]]
            written += flush
            buffered -= flush
    attrs = {
        "keys": keys,
        "commits": commits,
        "offsets": offsets.tolist(),
        "meta": metas,
        "chunk_rows": chunk_rows,
    }
    await put_group(store, base, attrs)
    await put_group(store, pack_path(ns, fp), {"current": stage, "committed_s": time.time()})
    return await load_pack(store, ns, fp, cache)


@dataclass(frozen=True)
class GcReport:
    """What `gc` deleted: abandoned write attempts (killed or superseded writers) and superseded packs."""

    stages_removed: int
    packs_removed: int


async def gc_packs(store: Store, ns: str, fp: str, min_age_s: float) -> int:
    """Delete packs that are neither current nor in flight, replaced at least `min_age_s` ago."""
    pointer = await get_attrs(store, pack_path(ns, fp))
    if not entries.retired_long_ago(pointer, min_age_s):
        return 0
    old = [
        c
        for c in await entries.list_children(store, pack_path(ns, fp))
        if entries.is_stage_id(c)
        and c != (pointer or {}).get("current")
        and entries.stage_age_s(c) >= min_age_s
    ]
    for stage in old:
        await store.delete_dir(f"{pack_path(ns, fp)}/{stage}")
    return len(old)


async def collect_garbage(store: Store, namespaces: Sequence[str], min_age_s: float) -> GcReport:
    """Delete stages and packs no marker/pointer references, older than `min_age_s` and replaced at least
    that long ago: the age limit protects writers still in flight (their stage is young and unreferenced)
    and readers still reading what a newer commit replaced.
    """
    stages = packs = 0
    for ns in namespaces:
        for fp in [c for c in await entries.list_children(store, ns) if c != "zarr.json"]:
            keys = [k for k in await entries.list_children(store, f"{ns}/{fp}") if k != "zarr.json"]
            stages += sum(await gather_limited(entries.gc_entry(store, ns, fp, k, min_age_s) for k in keys))
        for fp in [c for c in await entries.list_children(store, f"packs/{ns}") if c != "zarr.json"]:
            packs += await gc_packs(store, ns, fp, min_age_s)
    return GcReport(stages, packs)
