"""Packs: every committed entry of a fingerprint concatenated, so a bulk read is a few large reads.

One array per entry is trivially safe to write concurrently, but reading thousands of them means thousands of
small objects. A pack is built from committed entries only and published like an entry, by a pointer written
last, so it is as crash- and concurrency-safe:

    packs/<ns>/<fp>/zarr.json          pack pointer: group attrs {"current": <stage>, "committed_s": ...}
    packs/<ns>/<fp>/<stage>/<array>    every packed entry's rows concatenated, in row chunks; the group
                                       attrs hold keys, commits, row offsets, each entry's meta, "checksum"

A pack records the commit of each entry it holds; an entry replaced later (see `overwrites/`) is read from
its own arrays until the next pack. On local disks uncompressed chunk files are read straight into the
result (one copy, close to `np.load`); other stores fetch whole chunk objects. Either way every chunk's
crc32c is checked: a chunk read whole is checked as it is read, and a chunk only part of which is wanted is
read whole the first time this process touches it (`VerifiedChunks`), then by byte range. A pack written
before checksums is rebuilt by the next `pack`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr.api.asynchronous as za
from zarr.abc.store import Store

from storage import _zarr_entries as entries
from storage._zarr_entries import (
    VERIFIED,
    ArraySpec,
    DamagedChunkError,
    DamagedStoreError,
    Entry,
    FeatureStoreError,
    StoredArray,
    gather_limited,
    get_attrs,
    meta_key,
    put_group,
    readinto_crc,
    store_url,
)

# ~8 MiB row chunks: few objects to open in a scan. Local reads of already checked chunks fetch only the rows
# asked for; object stores fetch whole chunks, and 8 MiB objects suit them too.
PACK_CHUNK_BYTES = 8 << 20
CHUNK_READERS = 4  # chunk files read at once on local disks (more only contends for CPU on small machines)
REMOTE_READERS = 16  # chunk objects fetched at once from other stores
ARRAYS = {"videos": ("features", "times"), "queries": ("features",)}  # what a pack of each namespace holds


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
    checksum: bool = False
    arrays: dict[str, StoredArray] = field(default_factory=dict, compare=False)  # opened lazily, cached

    def commit_of(self, key: str) -> str:
        return self.commits[self.position[key]]


def pack_path(ns: str, fp: str) -> str:
    return f"packs/{ns}/{fp}"


def _pack_damage(
    store: Store, ns: str, fp: str, stage: str | None, key: str, reason: str
) -> DamagedStoreError:
    where = f"pack of {ns}/{fp}" + (f" (stage {stage})" if stage else "")
    return DamagedStoreError(store_url(store), where, key, reason, namespace=ns, fingerprint=fp)


def _parse_pack(attrs: dict[str, Any], stage: str) -> Pack:
    """A `Pack` from its group attrs; ValueError says what does not hold together."""
    keys, commits, offsets, meta = (attrs.get(k) for k in ("keys", "commits", "offsets", "meta"))
    chunk_rows = attrs.get("chunk_rows")
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys) and len(set(keys)) == len(keys)):
        raise ValueError("its keys are not a list of distinct strings")
    n = len(keys)
    if not (isinstance(commits, list) and len(commits) == n and all(isinstance(c, str) for c in commits)):
        raise ValueError("its commits do not match its keys")
    if not (isinstance(meta, list) and len(meta) == n and all(isinstance(m, dict) for m in meta)):
        raise ValueError("its meta does not match its keys")
    if not (isinstance(offsets, list) and len(offsets) == n + 1) or not all(
        isinstance(o, int) and not isinstance(o, bool) for o in offsets
    ):
        raise ValueError("its offsets are not one integer per entry plus one")
    offs = np.asarray(offsets, dtype=np.int64)
    if n and (offs[0] != 0 or (np.diff(offs) <= 0).any()):
        raise ValueError("its offsets do not start at 0 and increase")
    if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1:
        raise ValueError(f"chunk_rows {chunk_rows!r}")
    for i, m in enumerate(meta):
        problem = entries.marker_problem(m)
        if problem or m["n_rows"] != offs[i + 1] - offs[i]:
            raise ValueError(f"entry {keys[i]}: {problem or 'n_rows does not match its offsets'}")
    return Pack(
        stage=stage,
        keys=list(keys),
        commits=list(commits),
        offsets=offs,
        meta=list(meta),
        chunk_rows=chunk_rows,
        position={k: i for i, k in enumerate(keys)},
        checksum=attrs.get("checksum") is True,
    )


async def load_pack(store: Store, ns: str, fp: str, cache: dict[str, Pack]) -> Pack | None:
    """The current pack of (ns, fp), or None; pack indexes never change, so they are cached by stage."""
    pointer = await get_attrs(store, pack_path(ns, fp))
    stage = (pointer or {}).get("current")
    if not stage:
        return None
    if not isinstance(stage, str) or not entries.is_stage_id(stage):
        raise _pack_damage(store, ns, fp, None, meta_key(pack_path(ns, fp)), f"current = {stage!r}")
    if stage not in cache:
        path = f"{pack_path(ns, fp)}/{stage}"
        attrs = await get_attrs(store, path)
        if attrs is None:
            raise _pack_damage(store, ns, fp, stage, meta_key(path), "referenced by the pointer but missing")
        try:
            cache[stage] = _parse_pack(attrs, stage)
        except ValueError as exc:
            raise _pack_damage(store, ns, fp, stage, meta_key(path), str(exc)) from None
    return cache[stage]


async def open_pack_array(store: Store, ns: str, fp: str, pack: Pack, name: str) -> StoredArray:
    """A pack's array, checked against the pack's rows (cached on the pack: packs never change)."""
    if name not in pack.arrays:
        path = f"{pack_path(ns, fp)}/{pack.stage}/{name}"
        try:
            stored = await entries.open_stored(store, path)
        except DamagedChunkError as exc:
            raise _pack_damage(store, ns, fp, pack.stage, exc.key, exc.reason) from None
        if stored.shape[0] != int(pack.offsets[-1]) or not stored.row_aligned:
            raise _pack_damage(
                store,
                ns,
                fp,
                pack.stage,
                meta_key(path),
                f"shape {stored.shape} / chunks {stored.chunks} do not fit {pack.offsets[-1]} pack rows",
            )
        pack.arrays[name] = stored
    return pack.arrays[name]


def _row_runs(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge row spans that touch or overlap (sorted), to read each region once."""
    runs: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if runs and lo <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], hi))
        else:
            runs.append((lo, hi))
    return runs


def _direct(stored: StoredArray) -> bool:
    """Whether chunk files can be read straight into the output (raw little-endian bytes on a local disk):
    one copy instead of zarr's read-then-copy, which keeps a bulk read close to `np.load` speed."""
    return stored.local is not None and stored.raw_dtype is not None


Piece = tuple[int, int, np.ndarray]  # rows [lo, hi) of the array and where they go


def _read_local_pieces(stored: StoredArray, chunk: int, pieces: list[Piece]) -> None:
    """Copy rows of local row chunk `chunk` into their targets, checking the chunk's crc32c.

    A chunk wanted whole is read straight into its target and checked there; parts of one are read by byte
    range when this process already checked that unchanged file, else the chunk is read whole and checked
    once, and every part copied from it.
    """
    first = chunk * stored.chunk_rows
    row_bytes = stored.payload_bytes // stored.chunk_rows
    path = stored.local / stored.array.metadata.encode_chunk_key(stored.coords(chunk))  # type: ignore[operator]
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below; opening is what may fail
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        values = stored.missing(chunk)
        for lo, hi, target in pieces:
            target[...] = values[lo - first : hi - first]
        return
    with f:
        stat = os.fstat(f.fileno())
        stored.check_size(chunk, stat.st_size)
        verified = stored.verified_key(chunk, stat)
        whole = len(pieces) == 1 and pieces[0][:2] == (first, first + stored.chunk_rows)
        short = "shorter than its size (changed while being read)"
        if not stored.checksum or (not whole and verified in VERIFIED):
            for lo, _, target in pieces:
                view = target.reshape(-1).view(np.uint8)
                f.seek((lo - first) * row_bytes)
                if readinto_crc(f, view)[0] != len(view):
                    raise stored.damage(chunk, short)
            return
        if whole:  # straight into the result, checksummed on the way
            view = pieces[0][2].reshape(-1).view(np.uint8)
            got, computed = readinto_crc(f, view, len(view))
            tail = f.read(4)
            if got != len(view) or len(tail) != 4:
                raise stored.damage(chunk, short)
            if int.from_bytes(tail, "little") != computed:
                stored_crc = int.from_bytes(tail, "little")
                raise stored.damage(
                    chunk, f"fails its crc32c checksum (stored {stored_crc:08x}, computed {computed:08x})"
                )
        else:
            buf = np.empty(stored.object_bytes, dtype=np.uint8)
            got, crc = readinto_crc(f, buf, stored.payload_bytes)
            if got != len(buf):
                raise stored.damage(chunk, short)
            values = stored.payload(chunk, buf, crc).view(stored.raw_dtype).reshape(stored.chunks)
            for lo, hi, target in pieces:
                target[...] = values[lo - first : hi - first]
        VERIFIED.add(verified)


async def _copy_pieces(stored: StoredArray, chunk: int, pieces: list[Piece]) -> None:
    """Other stores: fetch the chunk object once, check it, copy every part from it."""
    first = chunk * stored.chunk_rows
    values = await stored.read_chunk(chunk)
    for lo, hi, target in pieces:
        target[...] = values[lo - first : hi - first]


async def read_runs(stored: StoredArray, runs: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Row runs [lo, hi) of a pack array, each chunk read once (whatever number of runs share it) and checked;
    straight into the result on local disks."""
    outs = [np.empty((hi - lo, *stored.shape[1:]), dtype=stored.dtype) for lo, hi in runs]
    size = stored.chunk_rows
    pieces: dict[int, list[Piece]] = {}
    for (lo, hi), out in zip(runs, outs, strict=True):
        for chunk in range(lo // size, (hi - 1) // size + 1):
            c_lo, c_hi = max(lo, chunk * size), min(hi, (chunk + 1) * size)
            pieces.setdefault(chunk, []).append((c_lo, c_hi, out[c_lo - lo : c_hi - lo]))
    if _direct(stored):
        parts = [asyncio.to_thread(_read_local_pieces, stored, c, ps) for c, ps in pieces.items()]
        await gather_limited(parts, limit=CHUNK_READERS)
    else:
        await gather_limited((_copy_pieces(stored, c, ps) for c, ps in pieces.items()), limit=REMOTE_READERS)
    return outs


async def read_rows(stored: StoredArray, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of a pack array, every chunk checked."""
    return (await read_runs(stored, [(lo, hi)]))[0]


def _entries_in(pack: Pack, rows: tuple[int, int] | None, keys: Sequence[str]) -> list[str]:
    """Which of `keys` have rows in [rows) (all of them when the rows are unknown)."""
    if rows is None:
        return list(keys)
    lo, hi = rows
    return [
        k for k in keys if pack.offsets[pack.position[k]] < hi and pack.offsets[pack.position[k] + 1] > lo
    ]


async def _read_from_pack(
    store: Store, ns: str, fp: str, pack: Pack, keys: list[str], names: Sequence[str]
) -> list[Entry]:
    """Read entries' rows from a pack: a few large concurrent range reads instead of one object per entry."""
    idx = [pack.position[k] for k in keys]
    spans = [(int(pack.offsets[i]), int(pack.offsets[i + 1])) for i in idx]
    arrays = [await open_pack_array(store, ns, fp, pack, name) for name in names]
    runs = _row_runs(spans)  # each chunk is read once however many runs share it (see read_runs)
    try:
        per_array = await asyncio.gather(*(read_runs(a, runs) for a in arrays))
    except DamagedChunkError as exc:
        hit = _entries_in(pack, exc.rows, keys) or keys
        first = hit[0]
        what = entries.describe(ns, fp, first, pack.meta[pack.position[first]])
        more = f" and {len(hit) - 1} more entries in the same chunk" if len(hit) > 1 else ""
        raise DamagedStoreError(
            store_url(store),
            f"{what}{more} (served by pack {pack_path(ns, fp)}/{pack.stage})",
            exc.key,
            exc.reason,
            namespace=ns,
            fingerprint=fp,
            entry=first,
        ) from None
    per_name = dict(zip(names, per_array, strict=True))
    starts = np.array([lo for lo, _ in runs])
    out = []
    for key, i, (lo, hi) in zip(keys, idx, spans, strict=True):
        r = int(np.searchsorted(starts, lo, side="right")) - 1
        first_row = lo - runs[r][0]
        data = {name: per_name[name][r][first_row : first_row + hi - lo] for name in names}
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
    """Concatenate every committed entry into a new pack and point readers at it (no-op if unchanged and
    already checksummed)."""
    found = await entries.committed_keys(store, ns, fp)
    if not found:
        return None
    keys = [k for k, _ in found]
    current = await load_pack(store, ns, fp, cache)
    if (
        current is not None
        and current.keys == keys
        and current.commits == [m["commit"] for _, m in found]
        and (current.checksum or not entries.CHECKSUM)
    ):
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
            fill_value=0,
            dimension_names=s.dimension_names,
            **entries.array_codecs(),
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
        "checksum": entries.CHECKSUM,
    }
    await put_group(store, base, attrs)
    await put_group(store, pack_path(ns, fp), {"current": stage, "committed_s": time.time()})
    return await load_pack(store, ns, fp, cache)


async def drop_pack(store: Store, ns: str, fp: str) -> None:
    """Stop serving the current pack (reads go entry by entry until the next `pack`); `gc` deletes it."""
    await store.delete(meta_key(pack_path(ns, fp)))


@dataclass(frozen=True)
class PackDamage:
    """One damaged object of a pack, and the entries whose rows it holds."""

    key: str
    reason: str
    entries: list[str]


async def verify_pack(
    store: Store, ns: str, fp: str, cache: dict[str, Pack]
) -> tuple[Pack | None, list[PackDamage], bool]:
    """Read every chunk of the current pack whole and check it: (pack, damage found, all checksummed).

    A pack whose pointer or index cannot be read comes back as (None, [that damage], False).
    """
    try:
        pack = await load_pack(store, ns, fp, cache)
    except DamagedStoreError as exc:
        return None, [PackDamage(exc.key, exc.reason, [])], False
    if pack is None:
        return None, [], True
    found: list[PackDamage] = []
    checksummed = pack.checksum

    async def check(stored: StoredArray, chunk: int) -> PackDamage | None:
        try:
            await stored.read_chunk(chunk)
        except DamagedChunkError as exc:
            return PackDamage(exc.key, exc.reason, _entries_in(pack, exc.rows, pack.keys))
        return None

    for name in ARRAYS.get(ns, ("features",)):
        try:
            stored = await open_pack_array(store, ns, fp, pack, name)
        except DamagedStoreError as exc:
            found.append(PackDamage(exc.key, exc.reason, list(pack.keys)))
            continue
        checksummed = checksummed and stored.checksum
        bad = await gather_limited((check(stored, c) for c in range(stored.n_chunks())), limit=CHUNK_READERS)
        found.extend(d for d in bad if d is not None)
    return pack, found, checksummed


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
