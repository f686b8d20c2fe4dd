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

Arrays are stored uncompressed (dense float features barely compress, and decoding would cost more than it
saves on local disks) but every chunk ends with a crc32c (zarr's `Crc32cCodec`), and every chunk is stored,
even one equal to the fill value: a flipped byte or a truncated chunk is an error, and so is a missing chunk,
instead of zeros. Arrays written before checksums (codecs = bytes only) still read; `mamfusion store verify`
reports them as "no checksum". Per-entry arrays are one chunk. Packs (`_zarr_packs`) make bulk reads fast.

The chunk readers here (`StoredArray`) read a chunk's bytes themselves instead of going through zarr's
getitem: zarr turns a missing chunk into fill values, and a raw read straight into the result is one copy.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import google_crc32c
import numpy as np
import zarr
import zarr.api.asynchronous as za
from zarr.abc.store import Store
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.codecs.bytes import Endian
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.metadata import ArrayV3Metadata
from zarr.storage import FsspecStore, LocalStore, StorePath

from storage.errors import MamFusionError

T = TypeVar("T")

MAX_CONCURRENT = 64  # entries read or written at once (each is a few small objects)
MAX_CHUNK_BYTES = 1 << 31  # a chunk claiming more is damaged metadata, not data (never allocate for it)
_PROTOTYPE = default_buffer_prototype()
_STAGE = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{12}$")
CHECKSUM = True  # new arrays carry a crc32c; tests and benchmarks turn it off to write the old layout
WRITE_CONFIG = {"write_empty_chunks": True}  # a missing chunk must mean damage, so store fill-valued ones too


class FeatureStoreError(MamFusionError):
    """Base class of feature-store errors: the store is unusable, damaged, or given invalid input."""


class DamagedChunkError(MamFusionError):
    """A stored object is missing, truncated, fails its checksum or does not decode (raised by the readers
    here; the feature store and the index re-raise it naming the entry or rows it belongs to)."""

    def __init__(self, key: str, reason: str, rows: tuple[int, int] | None = None) -> None:
        super().__init__(f"{key}: {reason}")
        self.key, self.reason, self.rows = key, reason, rows  # rows: the array rows the object holds


class DamagedStoreError(FeatureStoreError):
    """Part of the feature store is damaged; names the store, the entry (or pack) and the object key."""

    def __init__(
        self,
        store: str,
        what: str,
        key: str,
        reason: str,
        *,
        namespace: str | None = None,
        fingerprint: str | None = None,
        entry: str | None = None,
    ) -> None:
        super().__init__(
            f"feature store {store}: {what} is damaged: {reason} (object {key}); run `mamfusion store verify "
            f"{store} --repair` to drop what is damaged so the next extraction writes it again"
        )
        self.store, self.what, self.key, self.reason = store, what, key, reason
        self.namespace, self.fingerprint, self.entry = namespace, fingerprint, entry


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


def store_url(store: Store) -> str:
    """A URL-like name of a zarr store for messages: the local path, or protocol://path."""
    if isinstance(store, LocalStore):
        return str(store.root)
    if isinstance(store, FsspecStore):
        protocol = store.fs.protocol
        protocol = protocol[0] if isinstance(protocol, tuple | list) else protocol
        return f"{protocol}://{store.path.lstrip('/')}"
    return repr(store)


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


def meta_key(path: str) -> str:
    return f"{path}/zarr.json" if path else "zarr.json"


async def gather_limited(coros: Iterable[Awaitable[T]], limit: int = MAX_CONCURRENT) -> list[T]:
    """`asyncio.gather` with at most `limit` in flight: thousands of entries must not open as many files."""
    gate = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[T]) -> T:
        async with gate:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


def parse_group_attrs(raw: bytes, key: str) -> dict[str, Any]:
    """A group's attributes from its zarr.json bytes; `DamagedChunkError` when it is not one."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DamagedChunkError(key, f"not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("node_type") != "group":
        raise DamagedChunkError(key, "not a Zarr group's metadata")
    attrs = doc.get("attributes", {})
    if not isinstance(attrs, dict):
        raise DamagedChunkError(key, "its attributes are not a JSON object")
    return attrs


async def get_attrs(store: Store, path: str) -> dict[str, Any] | None:
    """Attributes of the group at `path`, or None when there is no group there."""
    key = meta_key(path)
    buf = await store.get(key, _PROTOTYPE)
    if buf is None:
        return None
    try:
        return parse_group_attrs(buf.to_bytes(), key)
    except DamagedChunkError as exc:
        raise DamagedStoreError(store_url(store), f"metadata object {key!r}", key, exc.reason) from exc


async def put_group(store: Store, path: str, attrs: Mapping[str, Any], *, exclusive: bool = False) -> None:
    """Write a group's metadata in one object write (atomic); `exclusive` keeps an existing one."""
    doc = {"zarr_format": 3, "node_type": "group", "attributes": dict(attrs)}
    buf = _PROTOTYPE.buffer.from_bytes(json.dumps(doc, allow_nan=False).encode())
    if exclusive:
        await store.set_if_not_exists(meta_key(path), buf)
    else:
        await store.set(meta_key(path), buf)


async def list_children(store: Store, path: str) -> list[str]:
    """Names directly under `path` (empty when it does not exist)."""
    try:
        return [name async for name in store.list_dir(path)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def access_problem(exc: BaseException) -> str | None:
    """One line saying why a store cannot be reached or read (credentials, endpoint, permissions, missing
    bucket), or None when `exc` is not such a problem. botocore is imported only if installed."""
    try:
        import botocore.exceptions as bx
    except ImportError:  # no s3fs: only OS-level errors are possible
        bx = None
    if bx is not None:
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
            return (
                f"no credentials ({exc}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or pass "
                "storage_options key/secret"
            )
        if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ReadTimeoutError):
            return f"cannot connect ({exc}); check endpoint_url and that the server is up"
        if isinstance(exc, bx.BotoCoreError | bx.ClientError):
            return f"{type(exc).__name__}: {exc}"
    if type(exc).__module__.split(".")[0] in ("aiohttp", "botocore", "aiobotocore", "s3fs"):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, PermissionError):
        return f"permission denied ({exc}); check the credentials or file permissions"
    if isinstance(exc, FileNotFoundError):
        return f"not found ({exc}); for object storage, check that the bucket exists"
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc}"
    return None


# --- checksummed chunks -------------------------------------------------------------------------------------
def array_codecs(*, checksum: bool | None = None) -> dict[str, Any]:
    """`create_array` keywords: uncompressed, every chunk stored and ending with a crc32c (unless off)."""
    use = CHECKSUM if checksum is None else checksum
    return {"compressors": [Crc32cCodec()] if use else None, "config": WRITE_CONFIG}


class VerifiedChunks:
    """Chunk objects whose crc32c was checked whole in this process, so a later partial read of the same,
    unchanged object may read only the bytes it needs (a checksum covers a whole chunk, never a row).

    Local chunks are keyed by path, inode, size and mtime, so a rewritten file is checked again; remote ones
    by store and key (a remote chunk of committed rows is only rewritten with the same bytes for those rows).
    """

    def __init__(self, limit: int = 1 << 16) -> None:
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                return True
            return False

    def add(self, key: Hashable) -> None:
        with self._lock:
            self._seen[key] = None
            self._seen.move_to_end(key)
            while len(self._seen) > self._limit:
                self._seen.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()


VERIFIED = VerifiedChunks()


def check_crc(data: np.ndarray, key: str) -> np.ndarray:
    """The payload of a checksummed chunk object (`data` = payload + 4-byte little-endian crc32c)."""
    if len(data) < 4:
        raise DamagedChunkError(key, f"{len(data)} bytes, too short to hold its checksum")
    stored = int.from_bytes(bytes(data[-4:]), "little")
    payload = data[:-4]
    computed = google_crc32c.value(payload)
    if stored != computed:
        raise DamagedChunkError(
            key, f"fails its crc32c checksum (stored {stored:08x}, computed {computed:08x})"
        )
    return payload


class Fetched(NamedTuple):
    """A chunk object as read: its bytes, the local file's stat, the payload's crc32c if computed."""

    data: np.ndarray | None
    stat: os.stat_result | None
    crc: int | None


class StoredArray:
    """An opened array and how its chunks are laid out, for reading chunks as raw bytes.

    `raw_dtype` is set when the codecs are bytes (+ crc32c): a chunk's payload then *is* the little-endian
    values, so it can be read straight into the caller's array. Other codecs go through zarr's codec pipeline.
    """

    def __init__(self, store: Store, array: zarr.AsyncArray) -> None:
        md = array.metadata
        if not isinstance(md, ArrayV3Metadata) or not isinstance(md.chunk_grid, RegularChunkGrid):
            raise DamagedChunkError(meta_key(array.path), "not a Zarr v3 array with a regular chunk grid")
        self.store, self.array, self.path = store, array, array.path
        codecs = tuple(md.codecs)
        self.checksum = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
        inner = codecs[:-1] if self.checksum else codecs
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.chunks: tuple[int, ...] = tuple(md.chunk_grid.chunk_shape)
        self.dtype = np.dtype(array.dtype)
        plain = (
            len(inner) == 1
            and isinstance(inner[0], BytesCodec)
            and inner[0].endian in (None, Endian.little)
            and self.dtype.kind in "biuf"
        )
        self.raw_dtype = self.dtype.newbyteorder("<") if plain else None
        if self.dtype.kind not in "biufcT" and self.dtype != np.dtype(object):  # StringDType is "T"
            raise DamagedChunkError(meta_key(self.path), f"unexpected dtype {self.dtype}")
        if len(self.chunks) != len(self.shape) or not self.shape or min(self.chunks, default=1) < 1:
            raise DamagedChunkError(
                meta_key(self.path), f"chunks {self.chunks} do not fit shape {self.shape}"
            )
        self.payload_bytes = int(np.prod(self.chunks, dtype=np.int64)) * self.dtype.itemsize
        if self.payload_bytes > MAX_CHUNK_BYTES or self.payload_bytes <= 0:
            raise DamagedChunkError(meta_key(self.path), f"implausible chunk shape {self.chunks}")
        self.row_aligned = self.chunks[1:] == self.shape[1:]  # a chunk holds whole rows
        self.local: Path | None = store.root / self.path if isinstance(store, LocalStore) else None
        self.fill_value = md.fill_value

    @property
    def chunk_rows(self) -> int:
        return self.chunks[0]

    @property
    def object_bytes(self) -> int:
        """Bytes of one stored raw chunk object (payload + checksum)."""
        return self.payload_bytes + (4 if self.checksum else 0)

    def n_chunks(self, rows: int | None = None) -> int:
        """Row chunks holding rows [0, rows) (default: the whole array)."""
        rows = self.shape[0] if rows is None else rows
        return -(-rows // self.chunk_rows)

    def coords(self, i: int) -> tuple[int, ...]:
        return (i,) + (0,) * (len(self.shape) - 1)

    def key(self, i: int) -> str:
        """The store key of row chunk `i`."""
        return f"{self.path}/{self.array.metadata.encode_chunk_key(self.coords(i))}"

    def verified_key(self, i: int, stat: Any = None) -> Hashable:
        if stat is not None:
            return (str(self.local), self.key(i), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        return (store_url(self.store), self.key(i))

    def _fill(self) -> np.ndarray:
        return np.full(self.chunks, self.fill_value, dtype=self.dtype)

    async def fetch(self, i: int, *, copy: bool = True) -> Fetched:
        """Chunk `i`'s stored bytes as a uint8 array (None when not stored; writable unless `copy` is False
        for a remote store); local files also give the stat of the file read (what `VerifiedChunks` keys
        on) and the crc32c of the payload, computed while reading."""
        if self.local is not None and self.raw_dtype is not None:
            path = self.local / self.array.metadata.encode_chunk_key(self.coords(i))
            crc_bytes = self.payload_bytes if self.checksum else 0
            return Fetched(*await asyncio.to_thread(_read_file, path, self.object_bytes, crc_bytes))
        buf = await self.store.get(self.key(i), _PROTOTYPE)
        if buf is None:
            return Fetched(None, None, None)
        data = np.frombuffer(buf.as_buffer_like(), dtype=np.uint8)
        return Fetched(data.copy() if copy else data, None, None)

    def damage(self, i: int, reason: str) -> DamagedChunkError:
        """The error for chunk `i`, with the rows it holds (so callers can name the entries in them)."""
        return DamagedChunkError(self.key(i), reason, (i * self.chunk_rows, (i + 1) * self.chunk_rows))

    def missing(self, i: int) -> np.ndarray:
        """What a chunk that is not stored reads as: an error once chunks carry checksums (every chunk is
        written then), the fill value for arrays written before (zarr skipped chunks equal to it)."""
        if self.checksum:
            raise self.damage(i, "missing (deleted, or never completely written)")
        return self._fill()

    def check_size(self, i: int, size: int) -> None:
        if size != self.object_bytes:
            raise self.damage(
                i, f"holds {size} bytes where {self.object_bytes} were expected (truncated or overwritten)"
            )

    def payload(self, i: int, data: np.ndarray, crc: int | None = None) -> np.ndarray:
        """The checked raw payload of chunk `i` (length and crc32c), as uint8; `crc` is the payload's crc32c
        when the reader already computed it."""
        self.check_size(i, len(data))
        if not self.checksum:
            return data
        if crc is not None:
            stored = int.from_bytes(bytes(data[-4:]), "little")
            if stored != crc:
                raise self.damage(i, f"fails its crc32c checksum (stored {stored:08x}, computed {crc:08x})")
            return data[:-4]
        try:
            return check_crc(data, self.key(i))
        except DamagedChunkError as exc:
            raise self.damage(i, exc.reason) from None

    async def decode(self, i: int, data: np.ndarray, crc: int | None = None) -> np.ndarray:
        """Chunk `i`'s values (chunk shape) from its stored bytes, checked; any decode failure is damage."""
        if self.raw_dtype is not None:
            values = self.payload(i, data, crc).view(self.raw_dtype).reshape(self.chunks)
            return values if self.raw_dtype == self.dtype else values.astype(self.dtype)
        if self.checksum:
            try:
                check_crc(data, self.key(i))  # before zstd or vlen decoding sees garbage
            except DamagedChunkError as exc:
                raise self.damage(i, exc.reason) from None
        md = self.array.metadata
        spec = md.get_chunk_spec(self.coords(i), self.array.config, _PROTOTYPE)
        try:
            (out,) = await self.array.codec_pipeline.decode(
                [(_PROTOTYPE.buffer.from_bytes(data.tobytes()), spec)]
            )
            values = np.asarray(out.as_numpy_array()) if out is not None else None
        except Exception as exc:  # noqa: BLE001 - codecs raise anything on garbage bytes; all of it is damage
            raise self.damage(i, f"does not decode ({type(exc).__name__}: {exc})") from exc
        if values is None or values.shape != self.chunks:
            raise self.damage(i, f"decodes to the wrong shape (expected {self.chunks})")
        return values

    async def read_chunk(self, i: int) -> np.ndarray:
        """Chunk `i`'s checked values (chunk shape); a missing chunk is an error once checksummed."""
        data, stat, crc = await self.fetch(i)
        if data is None:
            return self.missing(i)
        values = await self.decode(i, data, crc)
        if self.checksum:
            VERIFIED.add(self.verified_key(i, stat))
        return values

    async def read_rows(self, rows: int) -> np.ndarray:
        """Rows [0, rows) of the array, every chunk they touch read whole and checked."""
        if rows > self.shape[0]:
            raise DamagedChunkError(
                meta_key(self.path), f"holds {self.shape[0]} rows where {rows} are committed"
            )
        n = self.n_chunks(rows)
        if n == 1:
            return (await self.read_chunk(0))[:rows]
        blocks = await gather_limited((self.read_chunk(i) for i in range(n)), limit=16)
        return np.concatenate(blocks)[:rows] if blocks else np.empty((0, *self.shape[1:]), self.dtype)


READ_BLOCK = 1 << 20  # bytes read per call, checksummed while still in the CPU cache


def readinto_crc(f: Any, target: np.ndarray, crc_bytes: int = 0) -> tuple[int, int]:
    """Fill the uint8 array `target` from file `f` in READ_BLOCK pieces; returns (bytes read, crc32c of the
    first `crc_bytes` of them). Checksumming each piece as it arrives, while it is in cache, costs a fraction
    of a second pass over the whole chunk from memory."""
    view = memoryview(target)
    got = crc = 0
    while got < len(target):
        n = f.readinto(view[got : got + READ_BLOCK])
        if not n:
            break
        hi = min(got + n, crc_bytes)
        if hi > got:
            crc = google_crc32c.extend(crc, target[got:hi])
        got += n
    return got, crc


def _read_file(
    path: Path, expected: int, crc_bytes: int = 0
) -> tuple[np.ndarray | None, os.stat_result | None, int | None]:
    """A whole file into a fresh writable buffer (one copy), its stat, and the crc32c of its first
    `crc_bytes` (None unless asked for and that many were read); (None, None, None) when missing. One byte
    more than `expected` is read so an over-long file shows as the wrong length."""
    try:
        with open(path, "rb", buffering=0) as f:
            stat = os.fstat(f.fileno())
            buf = np.empty(min(expected + 1, stat.st_size), dtype=np.uint8)
            got, crc = readinto_crc(f, buf, crc_bytes)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None, None, None
    return buf[:got], stat, (crc if crc_bytes and got >= crc_bytes else None)


async def open_stored(store: Store, path: str) -> StoredArray:
    """Open the array at `path`; missing or unparseable metadata is `DamagedChunkError`."""
    key = meta_key(path)
    try:
        array = await zarr.AsyncArray.open(StorePath(store, path))
    except FileNotFoundError as exc:  # zarr's ArrayNotFoundError / NodeNotFoundError derive from it
        raise DamagedChunkError(key, "missing") from exc
    except Exception as exc:  # noqa: BLE001 - zarr's metadata parser raises anything on garbage JSON
        raise DamagedChunkError(key, f"not valid array metadata ({type(exc).__name__}: {exc})") from exc
    return StoredArray(store, array)


# --- entries ------------------------------------------------------------------------------------------------
async def write_array(store: Store, path: str, data: np.ndarray, spec: ArraySpec) -> None:
    """Write a whole per-entry array as a single uncompressed, checksummed chunk.

    Stage paths are unique, so there is nothing to overwrite; `overwrite=True` would make zarr list and delete
    the path first, which races with concurrent writers on fsspec's in-memory filesystem.
    """
    await za.create_array(
        store,
        name=path,
        data=np.ascontiguousarray(data, dtype=spec.dtype),
        chunks=data.shape,
        fill_value=0,
        dimension_names=spec.dimension_names,
        **array_codecs(),
    )


async def open_array(store: Store, path: str) -> zarr.AsyncArray:
    try:
        return (await open_stored(store, path)).array
    except DamagedChunkError as exc:
        raise DamagedStoreError(store_url(store), f"array {path!r}", exc.key, exc.reason) from exc


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


def describe(ns: str, fp: str, key: str, meta: Mapping[str, Any] | None = None) -> str:
    """How messages name an entry: the video's sha256 and id, or the query's text key, and the extractor."""
    kind = {"videos": "video", "queries": "query"}.get(ns, ns)
    vid = (meta or {}).get("video_id")
    named = f" ({vid!r})" if isinstance(vid, str) else ""
    return f"{kind} {key}{named} of extractor {fp}"


def marker_problem(attrs: Mapping[str, Any]) -> str | None:
    """Why a commit marker (or a pack's copy of one) cannot be trusted, or None."""
    n = attrs.get("n_rows")
    if not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
        return f"n_rows {n!r}"
    if not isinstance(attrs.get("attrs", {}), dict):
        return "its attrs are not an object"
    return None


async def read_marker(store: Store, ns: str, fp: str, key: str) -> dict[str, Any] | None:
    """The commit marker's attributes, or None while the entry has no complete write."""
    path = entry_path(ns, fp, key)
    try:
        attrs = await get_attrs(store, path)
    except DamagedStoreError as exc:
        raise _entry_damage(store, ns, fp, key, None, meta_key(path), exc.reason) from exc
    if attrs is None or not is_stage_id(str(attrs.get("commit", ""))):
        return None
    problem = marker_problem(attrs)
    if problem:
        raise _entry_damage(store, ns, fp, key, attrs, meta_key(path), problem)
    return attrs


def _entry_damage(
    store: Store, ns: str, fp: str, key: str, meta: Mapping[str, Any] | None, obj: str, reason: str
) -> DamagedStoreError:
    return DamagedStoreError(
        store_url(store), describe(ns, fp, key, meta), obj, reason, namespace=ns, fingerprint=fp, entry=key
    )


async def read_entry_arrays(
    store: Store, ns: str, fp: str, key: str, marker: Mapping[str, Any], names: Sequence[str]
) -> tuple[dict[str, np.ndarray], bool]:
    """The arrays of a committed entry, checked (rows = the marker's n_rows), and whether all carry a
    checksum; `DamagedStoreError` names the entry and the object at fault."""
    base = f"{entry_path(ns, fp, key)}/{marker['commit']}"
    n_rows = int(marker["n_rows"])

    async def one(name: str) -> tuple[np.ndarray, bool]:
        stored = await open_stored(store, f"{base}/{name}")
        if stored.shape[0] != n_rows or len(stored.shape) != 2:
            raise DamagedChunkError(
                meta_key(stored.path), f"shape {stored.shape} where {n_rows} rows were committed"
            )
        return await stored.read_rows(n_rows), stored.checksum

    try:
        got = await asyncio.gather(*(one(name) for name in names))
    except DamagedChunkError as exc:
        raise _entry_damage(store, ns, fp, key, marker, exc.key, exc.reason) from exc
    return {n: a for n, (a, _) in zip(names, got, strict=True)}, all(c for _, c in got)


async def read_entry(store: Store, ns: str, fp: str, key: str, names: Sequence[str]) -> Entry | None:
    """One committed entry read through its marker (None when not committed)."""
    marker = await read_marker(store, ns, fp, key)
    if marker is None:
        return None
    arrays, _ = await read_entry_arrays(store, ns, fp, key, marker, names)
    return Entry(key, marker["commit"], marker, arrays)


async def committed_keys(store: Store, ns: str, fp: str) -> list[tuple[str, dict[str, Any]]]:
    """(key, marker) of every committed entry, in commit-time order (the order extraction wrote them)."""
    keys = [k for k in await list_children(store, f"{ns}/{fp}") if k != "zarr.json"]
    markers = await gather_limited(read_marker(store, ns, fp, k) for k in keys)
    found = [(k, m) for k, m in zip(keys, markers, strict=True) if m is not None]
    return sorted(found, key=lambda km: km[1]["commit"])


def retired_long_ago(pointer: Mapping[str, Any] | None, min_age_s: float) -> bool:
    """Whether every stage the pointer no longer names was replaced at least `min_age_s` ago: each was
    replaced no later than the current commit, so readers that loaded an older pointer are long done."""
    if pointer is None:
        return True
    committed = pointer.get("committed_s", 0.0)
    committed = committed if isinstance(committed, int | float) and not isinstance(committed, bool) else 0.0
    return time.time() - float(committed) >= min_age_s


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
        await store.delete(meta_key(base))  # an entry that never committed: drop its empty group too
    return len(old)
