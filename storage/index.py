"""The search index of one published model: every gallery video encoded once, in Zarr, ready to scan.

Inference is query-independent (MODEL_SPEC §11), so a video's 32 clip vectors and its pooled vector are
computed once and searching is a scan of dot products. Layout of the group at `url` (a path or an fsspec URL):

    vectors   (N, n_clips + 1, d) float16|float32  rows 0..n_clips-1 = clip vectors, last = pooled vector,
              all L2-normalised; chunked along N only and uncompressed, so a scan is sequential reads
    spans     (N, n_clips, 2) float32   each clip's start/end seconds (the moment a hit reports)
    video_ids, paths, sha256  (N,) str  who each row is; sha256 = the video content key
    alive     (N,) bool                 tombstones: a removed video keeps its row, never its results
    attrs      format, version, model_fingerprint, dim, n_clips, dtype, count, complete

Rows `[0, count)` are committed: an append writes its rows first and raises `count` last, so an append killed
half-way leaves rows nobody reads, and the next append overwrites them. Zarr appends are not atomic
(ECOSYSTEM_NOTES §2), so every update holds the index lock (`<url>.lock` beside the index: an OS file lock
locally, a conditionally created object on object storage) and re-reads the index first; any number of
readers, who never lock.

Integrity: every chunk of every array ends with a crc32c and every chunk is stored, so a flipped byte, a
truncated or a missing chunk raises `DamagedIndexError` naming the index, the rows (and their video ids) and
the chunk. `verify` (`mamfusion store verify --index URL`) checks everything; `--repair` rewrites damaged
chunks blank and tombstones their rows. Indexes built before checksums still read (`verify` lists their
arrays as "no checksum"); rebuilding one (delete it, run `mamfusion index`) adds checksums.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import filelock
import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, Store
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.errors import ContainsArrayError
from zarr.storage import FsspecStore, LocalStore

from storage import _zarr_entries as entries
from storage._zarr_entries import (
    VERIFIED,
    WRITE_CONFIG,
    DamagedChunkError,
    StoredArray,
    access_problem,
    gather_limited,
    list_children,
    open_stored,
    parse_group_attrs,
    readinto_crc,
    store_url,
)
from storage.errors import MamFusionError

FORMAT = "mamfusion-index"
VERSION = 1
DEFAULT_CHUNK_ROWS = 512  # 512 videos x 33 x 384 fp16 = 13 MB per chunk: big sequential reads, bounded memory
LOCK_TIMEOUT_S = 300.0  # how long an update waits for another writer's lock before giving up
STALE_LOCK_S = 600.0  # an object-storage lock older than this was left by a killed writer: taken over
Dtype = Literal["float16", "float32"]
_BUFFERS = default_buffer_prototype()
T = TypeVar("T")
log = logging.getLogger(__name__)


class SearchIndexError(MamFusionError):
    """Base of every index problem; the message says which index and what to do."""


class IndexNotFoundError(SearchIndexError, FileNotFoundError):
    """There is no index at the URL (never built, or the wrong URL)."""


class IndexFormatError(SearchIndexError, ValueError):
    """Something is at the URL but it is not an index this code can read, or an append does not fit it."""


class IndexModelMismatchError(SearchIndexError):
    """The index was built by a different model than the one searching it."""


class DamagedIndexError(IndexFormatError):
    """A chunk or metadata object of the index is missing, truncated or fails its checksum."""

    def __init__(
        self,
        url: str,
        key: str,
        reason: str,
        *,
        rows: tuple[int, int] | None = None,
        video_ids: Sequence[str] = (),
    ) -> None:
        where = f" rows {rows[0]}..{rows[1] - 1}" if rows and rows[1] > rows[0] else ""
        if video_ids:
            where += f" (videos {', '.join(list(video_ids)[:3])}{', ...' if len(video_ids) > 3 else ''})"
        super().__init__(
            f"search index {url}:{where} damaged: {key} {reason}; run `mamfusion store verify --index {url} "
            "--repair` to tombstone the damaged rows (the next `mamfusion index` re-adds them), or rebuild it"
        )
        self.url, self.key, self.reason, self.rows, self.video_ids = url, key, reason, rows, list(video_ids)


class IndexLockError(SearchIndexError):
    """Another writer held the index lock for longer than the wait allows."""


class IndexConflictError(SearchIndexError):
    """Another writer changed the index during an update (its lock was bypassed or taken over)."""


class IndexAccessError(SearchIndexError):
    """The index cannot be reached or read: credentials, endpoint, permissions."""


@dataclass(frozen=True)
class IndexRows:
    """Who each committed row is; arrays of length `count`."""

    video_ids: np.ndarray
    paths: np.ndarray
    sha256: np.ndarray
    alive: np.ndarray


@dataclass
class IndexDamage:
    """One damaged chunk (or array) of an index, the committed rows it holds and who they are."""

    array: str
    key: str
    rows: tuple[int, int]
    reason: str
    video_ids: list[str] = field(default_factory=list)
    repaired: bool = False


@dataclass
class IndexVerifyReport:
    """What `VideoIndex.verify` checked; `rebuild` says why only a rebuild helps (unreadable structure)."""

    url: str
    count: int = 0
    chunks: int = 0
    arrays_without_checksum: list[str] = field(default_factory=list)
    damaged: list[IndexDamage] = field(default_factory=list)
    rebuild: str | None = None
    actions: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.rebuild is None and all(d.repaired for d in self.damaged)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": "index", "ok": self.ok}


class _Attr(Generic[T]):
    """Reads one group attribute on every access: `count` and `complete` change while an index is updated."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, index: VideoIndex, owner: type | None = None) -> T:
        return index._group.attrs[self.name]


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _attrs_problem(attrs: dict[str, Any]) -> str | None:
    """Why an index group's attributes cannot be used, or None."""
    checks = {
        "model_fingerprint": isinstance(attrs.get("model_fingerprint"), str),
        "dim": _is_int(attrs.get("dim"), 1),
        "n_clips": _is_int(attrs.get("n_clips"), 1),
        "dtype": attrs.get("dtype") in ("float16", "float32"),
        "count": _is_int(attrs.get("count"), 0),
        "complete": isinstance(attrs.get("complete"), bool),
    }
    bad = [name for name, ok in checks.items() if not ok]
    return f"attribute(s) {', '.join(bad)} missing or invalid" if bad else None


def _store_for(url: str, storage_options: dict[str, Any] | None, *, read_only: bool) -> Store:
    """The zarr store of an index URL; a local path that is a file is refused here, before anything runs."""
    if "://" in url and not url.startswith("file://"):
        try:
            return FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)
        except (ImportError, ValueError, TypeError) as exc:  # s3:// without s3fs, a bad storage option
            raise IndexFormatError(f"cannot open index {url}: {exc}") from exc
    if storage_options:
        raise IndexFormatError(f"storage_options apply to fsspec URLs, not the local path {url}")
    path = Path(url.removeprefix("file://")).expanduser()
    if path.exists() and not path.is_dir():
        raise IndexFormatError(f"{url} is a file, not an index folder; pass a new path (e.g. index.zarr)")
    return LocalStore(path, read_only=read_only)


def _probe(store: Store) -> str | None:
    """None when `store` is empty or holds an index (even a damaged one), else what it holds instead."""
    raw = sync(store.get("zarr.json", prototype=_BUFFERS))
    children = sync(list_children(store, ""))
    if raw is not None:
        try:
            attrs = parse_group_attrs(raw.to_bytes(), "zarr.json")
        except DamagedChunkError:
            attrs = None
        if (attrs or {}).get("format") == FORMAT or {"vectors", "alive"} <= set(children):
            return None
        return "a Zarr node that is not a search index"
    if not children:
        return None
    shown = ", ".join(repr(c) for c in sorted(children)[:3])
    return f"it holds {shown}{', ...' if len(children) > 3 else ''}"


def _reraise_access(url: str, exc: Exception) -> None:
    problem = access_problem(exc)
    if problem is not None:
        raise IndexAccessError(f"cannot open index {url}: {problem}") from exc


class _IndexLock:
    """One writer at a time per index, for the length of one update (create, append, remove, ...).

    Local index: an OS lock on `<index>.lock` beside it (`filelock`; released by the OS if the process
    dies). Object storage: a lock object `<index>.lock` created only if absent (S3 conditional put), which
    exactly one writer wins; a lock older than STALE_LOCK_S (a killed writer) is taken over. The lock lives
    beside the index because replacing an index deletes everything under its prefix.
    """

    _threads: dict[str, threading.Lock] = {}
    _threads_guard = threading.Lock()

    def __init__(self, store: Store, url: str, timeout: float | None = None) -> None:
        self.store, self.url = store, url
        self.timeout = LOCK_TIMEOUT_S if timeout is None else timeout
        self.token = secrets.token_hex(8)
        self._file: filelock.FileLock | None = None
        if isinstance(store, LocalStore):
            root = store.root.resolve()
            self.name = str(root.with_name(root.name + ".lock"))
        elif isinstance(store, FsspecStore):
            self.name = store.path.rstrip("/") + ".lock"
        else:
            raise IndexFormatError(f"{url}: cannot lock a {type(store).__name__} for writing")
        with self._threads_guard:
            self._thread = self._threads.setdefault(f"{store_url(store)}|{self.name}", threading.Lock())

    def _fail(self, holder: str = "") -> IndexLockError:
        return IndexLockError(
            f"{self.url}: another writer holds the index lock {self.name}{holder} for more than "
            f"{self.timeout:g} s; wait for it to finish (or delete the lock if no writer is running)"
        )

    def __enter__(self) -> _IndexLock:
        deadline = time.monotonic() + self.timeout
        if not self._thread.acquire(timeout=self.timeout):
            raise self._fail()
        try:
            if isinstance(self.store, LocalStore):
                self._file = filelock.FileLock(self.name, timeout=max(0.0, deadline - time.monotonic()))
                try:
                    Path(self.name).parent.mkdir(parents=True, exist_ok=True)
                    self._file.acquire()
                except filelock.Timeout:
                    raise self._fail() from None
                except OSError as exc:  # e.g. a read-only location: nothing can be updated there
                    raise IndexLockError(
                        f"{self.url}: cannot take the index lock {self.name}: {exc}"
                    ) from exc
            else:
                sync(self._acquire_object(deadline))
        except BaseException:
            self._thread.release()
            raise
        return self

    async def _acquire_object(self, deadline: float) -> None:
        fs = self.store.fs  # type: ignore[attr-defined]
        body = json.dumps(
            {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "acquired_s": time.time()}
        ).encode()
        for attempt in range(1_000_000):  # bounded by the deadline below
            try:
                await fs._pipe_file(self.name, body, mode="create")
                return
            except FileExistsError:
                pass
            holder = await self._holder()
            stale = holder is None or time.time() - holder.get("acquired_s", 0) > STALE_LOCK_S
            if time.monotonic() > deadline:
                who = f" (pid {holder.get('pid')} on {holder.get('host')})" if holder else ""
                raise self._fail(who)
            if stale:
                log.warning("index lock %s is stale (%s); taking it over", self.name, holder)
                with contextlib.suppress(FileNotFoundError):
                    await fs._rm_file(self.name)
                continue
            await asyncio.sleep(min(0.5, 0.01 * 2 ** min(attempt, 6)) * (0.5 + secrets.randbelow(100) / 100))

    async def _holder(self) -> dict[str, Any] | None:
        """The lock object's content; None when it is gone or unreadable (then it is stale)."""
        try:
            doc = json.loads(await self.store.fs._cat_file(self.name))  # type: ignore[attr-defined]
        except FileNotFoundError:
            return {"acquired_s": time.time()}  # released meanwhile: retry at once
        except ValueError:
            return None
        return doc if isinstance(doc, dict) and isinstance(doc.get("acquired_s"), int | float) else None

    def confirm(self) -> None:
        """Before a commit: the lock must still be ours (not taken over as stale while we were slow)."""
        if self._file is not None:
            return
        holder = sync(self._holder())
        if not holder or holder.get("token") != self.token:
            raise IndexConflictError(
                f"{self.url}: this writer's lock {self.name} was taken over (it held it longer than "
                f"{STALE_LOCK_S:g} s); nothing was committed, run the update again"
            )

    def __exit__(self, *exc: object) -> None:
        try:
            if self._file is not None:
                self._file.release()
            else:
                with contextlib.suppress(Exception):  # best effort: a stale lock is taken over anyway
                    holder = sync(self._holder())
                    if holder and holder.get("token") == self.token:
                        sync(self.store.fs._rm_file(self.name))  # type: ignore[attr-defined]
        finally:
            self._thread.release()


class VideoIndex:
    """An open index group. Create with `VideoIndex.create`, open with `VideoIndex.open`."""

    model_fingerprint = _Attr[str]()
    dim = _Attr[int]()
    n_clips = _Attr[int]()
    dtype = _Attr[Dtype]()
    count = _Attr[int]()  # committed rows, alive or tombstoned
    complete = _Attr[bool]()  # False while a build runs or after one was killed: videos may be missing

    def __init__(self, group: zarr.Group, url: str, *, read_only: bool = False) -> None:
        self._group = group
        self.url = url
        self.read_only = read_only
        self._stored: dict[str, StoredArray] = {}
        self._check_group()

    def _check_group(self) -> None:
        attrs = self._group.attrs.asdict()
        if attrs.get("format") != FORMAT or attrs.get("version") != VERSION:
            raise IndexFormatError(
                f"{self.url}: not a {FORMAT} v{VERSION} group (format={attrs.get('format')!r}, "
                f"version={attrs.get('version')!r})"
            )
        problem = _attrs_problem(attrs)
        if problem:
            raise DamagedIndexError(self.url, "zarr.json", problem)

    @property
    def _store(self) -> Store:
        return self._group.store

    @classmethod
    def create(
        cls,
        url: str | os.PathLike[str],
        *,
        model_fingerprint: str,
        dim: int,
        n_clips: int,
        dtype: Dtype = "float16",
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        storage_options: dict[str, Any] | None = None,
    ) -> VideoIndex:
        """A new empty index. An existing index at `url` is replaced (callers decide when that is right);
        anything else there (a file, a folder of other files, another Zarr node) is refused, never deleted."""
        url = str(url)
        store = _store_for(url, storage_options, read_only=False)
        try:
            with _IndexLock(store, url):
                other = _probe(store)
                if other is not None:
                    raise IndexFormatError(
                        f"{url} exists and is not a search index ({other}); refusing to replace it, "
                        "pass another path"
                    )
                group = zarr.open_group(store=store, mode="w")
                cls._create_arrays(group, dim=dim, n_clips=n_clips, dtype=dtype, chunk_rows=chunk_rows)
                group.attrs.update(
                    {
                        "format": FORMAT,
                        "version": VERSION,
                        "model_fingerprint": model_fingerprint,
                        "dim": dim,
                        "n_clips": n_clips,
                        "dtype": dtype,
                        "count": 0,
                        "complete": False,
                    }
                )
        except MamFusionError:
            raise
        except Exception as exc:
            _reraise_access(url, exc)
            raise
        return cls(group, url)

    @staticmethod
    def _create_arrays(group: zarr.Group, *, dim: int, n_clips: int, dtype: str, chunk_rows: int) -> None:
        per_row = {
            "vectors": ((n_clips + 1, dim), dtype),
            "spans": ((n_clips, 2), "float32"),
            "video_ids": ((), str),
            "paths": ((), str),
            "sha256": ((), str),
            "alive": ((), bool),
        }
        crc = [Crc32cCodec()] if entries.CHECKSUM else []
        for name, (tail, dt) in per_row.items():
            # Vectors, spans and tombstones stay raw bytes (a scan reads them straight); strings compress.
            compressors = crc if name in ("vectors", "spans", "alive") else [ZstdCodec(level=0), *crc]
            group.create_array(
                name,
                shape=(0, *tail),
                dtype=dt,
                chunks=(chunk_rows, *tail),
                compressors=compressors or None,
                fill_value=False if dt is bool else None,
                config=WRITE_CONFIG,
            )

    @classmethod
    def open(
        cls,
        url: str | os.PathLike[str],
        *,
        mode: Literal["r", "r+"] = "r",
        storage_options: dict[str, Any] | None = None,
    ) -> VideoIndex:
        """Open an existing index; `IndexNotFoundError` names the URL and how to build one, and a folder that
        holds something else is `IndexFormatError`. Mode "r" never writes (not even a lock)."""
        url = str(url)
        missing = IndexNotFoundError(f"no search index at {url}; build it with `mamfusion index`")
        local = "://" not in url or url.startswith("file://")
        if local and not Path(url.removeprefix("file://")).expanduser().exists():
            raise missing
        store = _store_for(url, storage_options, read_only=mode == "r")
        try:
            group = zarr.open_group(store=store, mode=mode, use_consolidated=False)
        except FileNotFoundError:  # zarr's GroupNotFoundError: no zarr.json (or an array's) at the root
            other = _probe(store)
            if other is not None:
                raise IndexFormatError(
                    f"{url} is not a search index ({other}); pass the index folder (e.g. <model>/index.zarr)"
                ) from None
            raise missing from None
        except MamFusionError:
            raise
        except ContainsArrayError:
            raise IndexFormatError(f"{url} is a Zarr array, not a search index group") from None
        except Exception as exc:
            _reraise_access(url, exc)
            raise DamagedIndexError(url, "zarr.json", f"unreadable ({type(exc).__name__}: {exc})") from exc
        return cls(group, url, read_only=mode == "r")

    # --------------------------------------------------------------------------------------- metadata
    def _array(self, name: str) -> StoredArray:
        """One of the index arrays, opened once and checked against the index's shape."""
        if name not in self._stored:
            try:
                stored = sync(open_stored(self._store, name))
            except DamagedChunkError as exc:
                raise DamagedIndexError(self.url, exc.key, exc.reason) from None
            tails = {"vectors": (self.n_clips + 1, self.dim), "spans": (self.n_clips, 2)}
            expected = tails.get(name, ())
            problem = None
            if stored.shape[1:] != expected or not stored.row_aligned:
                problem = (
                    f"shape {stored.shape} / chunks {stored.chunks} where rows of {expected} are expected"
                )
            elif name == "vectors" and stored.dtype != np.dtype(self.dtype):
                problem = f"dtype {stored.dtype} where the index says {self.dtype}"
            elif stored.shape[0] < self.count:
                problem = f"{stored.shape[0]} rows where {self.count} are committed"
            if problem:
                raise DamagedIndexError(self.url, f"{name}/zarr.json", problem)
            self._stored[name] = stored
        return self._stored[name]

    @property
    def chunk_rows(self) -> int:
        return self._array("vectors").chunk_rows

    @property
    def checksummed(self) -> bool:
        """Whether the vectors carry checksums (indexes built before checksums do not: rebuild them)."""
        return self._array("vectors").checksum

    @property
    def nbytes(self) -> int:
        """Bytes of vectors a full scan reads."""
        return self.count * (self.n_clips + 1) * self.dim * np.dtype(self.dtype).itemsize

    def check_model(self, fingerprint: str) -> None:
        """Refuse to serve results computed by another model's encoder: they would be silently wrong."""
        if fingerprint != self.model_fingerprint:
            raise IndexModelMismatchError(
                f"the index at {self.url} was built by model {self.model_fingerprint[:12]}, not by this "
                f"model ({fingerprint[:12]}); rebuild it with `mamfusion index --model DIR --out {self.url}`"
            )

    def _read_all(self, name: str, n: int | None = None) -> np.ndarray:
        """Committed rows of one array, every chunk read whole and checked."""
        stored = self._array(name)
        n = self.count if n is None else n
        try:
            return sync(stored.read_rows(n))
        except DamagedChunkError as exc:
            raise self._damage(name, exc) from None

    def rows(self) -> IndexRows:
        """Ids, paths, content keys and tombstones of the committed rows."""
        return IndexRows(*(self._read_all(name) for name in ("video_ids", "paths", "sha256", "alive")))

    def _damage(self, array: str, exc: DamagedChunkError) -> DamagedIndexError:
        """The error for a damaged chunk, naming its committed rows and, when readable, their video ids."""
        lo, hi = exc.rows or (0, self.count)
        hi = min(hi, self.count)
        ids: list[str] = []
        if array != "video_ids" and hi > lo:
            with contextlib.suppress(MamFusionError):
                stored = self._array("video_ids")
                chunk = lo // stored.chunk_rows
                values = sync(stored.read_chunk(chunk))[lo - chunk * stored.chunk_rows :][: hi - lo]
                ids = [str(v) for v in values]
        return DamagedIndexError(self.url, exc.key, exc.reason, rows=(lo, hi), video_ids=ids)

    def _check_chunk(self, name: str, chunk: int) -> None:
        """Read one chunk whole and check it (vectors through the scan path, where missing is damage)."""
        if name == "vectors":
            self.read_chunk(chunk)
            return
        try:
            sync(self._array(name).read_chunk(chunk))
        except DamagedChunkError as exc:
            raise self._damage(name, exc) from None

    # ----------------------------------------------------------------------------------------- writes
    @contextlib.contextmanager
    def _update(self) -> Iterator[_IndexLock]:
        """Hold the index lock and re-read the index from the store: another writer may have appended."""
        if self.read_only:
            raise IndexFormatError(f"{self.url}: opened read-only; open it with mode='r+' to update it")
        with _IndexLock(self._store, self.url) as lock:
            self._group = zarr.open_group(store=self._store, mode="r+", use_consolidated=False)
            self._stored.clear()
            try:
                self._check_group()
                yield lock
            finally:
                self._stored.clear()  # shapes changed (or may have, if the update failed half-way)

    def _writable(self, name: str) -> zarr.Array:
        return self._group[name].with_config(WRITE_CONFIG)  # type: ignore[union-attr]

    def _commit_count(self, lock: _IndexLock, expected_before: int, new: int) -> None:
        """Raise `count` last, then check nobody else moved it (a compare-and-swap check after the fact)."""
        lock.confirm()
        self._group.attrs["count"] = new
        raw = sync(self._store.get("zarr.json", prototype=_BUFFERS))
        stored = parse_group_attrs(raw.to_bytes(), "zarr.json").get("count") if raw is not None else None
        if stored != new:
            raise IndexConflictError(
                f"{self.url}: another writer changed the index during this append (count is {stored!r}, "
                f"expected {new} after {expected_before}); run the update again"
            )

    def append(
        self,
        vectors: np.ndarray,
        spans: np.ndarray,
        video_ids: Sequence[str],
        paths: Sequence[str],
        sha256s: Sequence[str],
    ) -> None:
        """Add rows; they become visible when `count` is raised at the end. Takes the index lock, so
        concurrent appends from other processes all land (each after the rows committed before it)."""
        k = len(video_ids)
        expected = (k, self.n_clips + 1, self.dim)
        spans_shape = (k, self.n_clips, 2)
        if vectors.shape != expected or spans.shape != spans_shape or not len(paths) == len(sha256s) == k:
            raise IndexFormatError(
                f"{self.url}: append of {k} videos needs vectors {expected} and spans {spans_shape}, "
                f"got {vectors.shape} and {spans.shape} with {len(paths)} paths, {len(sha256s)} sha256s"
            )
        with self._update() as lock:
            n = self.count
            data = {
                "vectors": vectors.astype(self.dtype, copy=False),
                "spans": spans.astype(np.float32, copy=False),
                "video_ids": np.asarray(video_ids, dtype=str),
                "paths": np.asarray(paths, dtype=str),
                "sha256": np.asarray(sha256s, dtype=str),
                "alive": np.ones(k, dtype=bool),
            }
            for name, values in data.items():
                array = self._writable(name)
                array.resize((n + k, *array.shape[1:]))
                array[n : n + k] = values
            self._commit_count(lock, n, n + k)

    def remove(self, rows: Sequence[int]) -> None:
        """Tombstone rows: they stay on disk (no rewrite) but never appear in results."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        with self._update():
            mask = self._read_all("alive").copy()
            mask[rows] = False
            self._writable("alive")[: self.count] = mask

    def set_complete(self, complete: bool) -> None:
        with self._update():
            self._group.attrs["complete"] = complete

    # ------------------------------------------------------------------------------------------ reads
    def read_chunk(self, i: int) -> np.ndarray:
        """The committed rows of vector chunk `i`, straight from the store's bytes, checksum checked.

        Vector chunks are uncompressed little-endian (see `create`), so a chunk's bytes are the array: reading
        them directly skips zarr's decode-and-copy pipeline, which ran at a third of the store's read speed.
        """
        stored = self._array("vectors")
        start = i * stored.chunk_rows
        n = min(stored.chunk_rows, self.count - start)
        try:
            if stored.raw_dtype is None:  # not written by this code: zarr's codecs decode it
                return sync(stored.read_chunk(i))[:n]
            data, stat, crc = sync(stored.fetch(i, copy=False))
            if data is None:  # vectors are L2-normalised, never all zeros: a missing chunk is damage
                raise stored.damage(i, "missing (deleted, or never completely written)")
            payload = stored.payload(i, data, crc)
        except DamagedChunkError as exc:
            raise self._damage("vectors", exc) from None
        if stored.checksum:
            VERIFIED.add(stored.verified_key(i, stat))
        return payload.view(stored.raw_dtype).reshape(stored.chunks)[:n]

    def iter_vectors(self, prefetch: int = 4) -> Iterator[tuple[int, np.ndarray]]:
        """Chunk by chunk `(first_row, vectors)`, with the next `prefetch` chunks read while one is used.

        Memory stays at `prefetch + 1` chunks whatever the index size, which is what lets a scan stream an
        index larger than RAM from disk or object storage.
        """
        n_chunks = -(-self.count // self.chunk_rows)
        with ThreadPoolExecutor(max_workers=prefetch) as pool:
            pending = deque(pool.submit(self.read_chunk, i) for i in range(min(prefetch, n_chunks)))
            for i in range(n_chunks):
                block = pending.popleft().result()
                if i + prefetch < n_chunks:
                    pending.append(pool.submit(self.read_chunk, i + prefetch))
                yield i * self.chunk_rows, block

    def load_vectors(self) -> np.ndarray:
        """All committed vectors in one (count, n_clips + 1, d) array, filled chunk by chunk."""
        out = np.empty((self.count, self.n_clips + 1, self.dim), dtype=self.dtype)
        for start, block in self.iter_vectors():
            out[start : start + len(block)] = block
        return out

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Vectors of scattered rows, e.g. the candidates an approximate stage re-scores.

        Each row is one byte-range read of its (uncompressed) chunk, issued concurrently: zarr's own indexing
        would fetch the whole 13 MB chunk for every scattered row, which at 1M videos made a re-scoring of a
        few hundred candidates read gigabytes. A checksum covers a whole chunk, so a chunk is read whole (and
        checked) the first time this process touches it, by a scan or here; after that, by byte range
        (`VerifiedChunks`; a local file that changed since is checked again).
        """
        rows, url = np.asarray(rows, dtype=np.int64), self.url
        if len(rows) and (rows.min() < 0 or rows.max() >= self.count):
            raise IndexError(f"{url}: rows must be in [0, {self.count}), got {rows.min()}..{rows.max()}")
        stored = self._array("vectors")
        tail = (self.n_clips + 1, self.dim)
        out = np.empty((len(rows), *tail), dtype=self.dtype)
        if stored.raw_dtype is None:  # foreign codecs: whole chunks through zarr's codecs
            for i, row in enumerate(rows):
                chunk, offset = divmod(int(row), stored.chunk_rows)
                out[i] = sync(stored.read_chunk(chunk))[offset]
            return out
        by_chunk: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_chunk.setdefault(int(row) // stored.chunk_rows, []).append(i)

        async def read_all() -> None:
            await gather_limited(
                (_read_chunk_rows(stored, chunk, picks, rows, out) for chunk, picks in by_chunk.items()),
                limit=16,
            )

        try:
            sync(read_all())
        except DamagedChunkError as exc:
            raise self._damage("vectors", exc) from None
        return out

    def read_spans(self) -> np.ndarray:
        """(count, n_clips, 2) seconds; small next to the vectors (1% at d=384), so it is read whole."""
        return self._read_all("spans")

    # -------------------------------------------------------------------------------------- integrity
    def verify(self, *, repair: bool = False) -> IndexVerifyReport:
        """Read every chunk of every array holding committed rows, whole, and check it.

        `repair` (needs mode "r+"): each damaged chunk is rewritten blank and its rows tombstoned, so searches
        work again and the next `mamfusion index` re-adds those videos. Damage to the structure (group or
        array metadata) can only be fixed by rebuilding; the report's `rebuild` says so.
        """
        report = IndexVerifyReport(self.url, count=self.count)
        names = ("vectors", "spans", "video_ids", "paths", "sha256", "alive")
        for name in names:
            try:
                stored = self._array(name)
            except DamagedIndexError as exc:
                report.rebuild = str(exc)
                report.damaged.append(IndexDamage(name, exc.key, (0, self.count), exc.reason))
                continue
            if not stored.checksum:
                report.arrays_without_checksum.append(name)
            for chunk in range(stored.n_chunks(self.count)):
                report.chunks += 1
                try:
                    self._check_chunk(name, chunk)
                except DamagedIndexError as exc:
                    rows = exc.rows or (0, self.count)
                    report.damaged.append(
                        IndexDamage(name, exc.key, rows, exc.reason, video_ids=exc.video_ids)
                    )
        if repair and report.damaged and report.rebuild is None:
            self._repair(report)
        return report

    def _repair(self, report: IndexVerifyReport) -> None:
        blank = {"vectors": 0, "spans": 0, "video_ids": "", "paths": "", "sha256": "", "alive": False}
        with self._update():
            for damage in report.damaged:
                stored = self._array(damage.array)
                chunk = damage.rows[0] // stored.chunk_rows
                lo, hi = chunk * stored.chunk_rows, min((chunk + 1) * stored.chunk_rows, stored.shape[0])
                sync(self._store.delete(damage.key))  # zarr must not read the damaged bytes to rewrite them
                array = self._writable(damage.array)
                array[lo:hi] = np.full((hi - lo, *array.shape[1:]), blank[damage.array], dtype=array.dtype)
            dead = [r for d in report.damaged for r in range(*d.rows)]
            mask = self._read_all("alive").copy()
            mask[np.asarray(dead, dtype=np.int64)] = False
            self._writable("alive")[: self.count] = mask
        for damage in report.damaged:
            damage.repaired = True
            report.actions.append(
                f"rewrote {damage.key} blank and tombstoned rows {damage.rows[0]}..{damage.rows[1] - 1}"
            )
        VERIFIED.clear()


async def _read_chunk_rows(
    stored: StoredArray, chunk: int, picks: list[int], rows: np.ndarray, out: np.ndarray
) -> None:
    """Rows of one vector chunk into out[picks]: byte ranges once the chunk is known good, else the whole
    chunk, checked (and remembered as checked)."""
    row_bytes = stored.payload_bytes // stored.chunk_rows
    offsets = [int(rows[i]) - chunk * stored.chunk_rows for i in picks]
    if stored.local is not None:
        await asyncio.to_thread(_read_local_chunk_rows, stored, chunk, picks, offsets, out)
        return
    verified = stored.verified_key(chunk)
    if stored.checksum and verified not in VERIFIED:
        data, _, _ = await stored.fetch(chunk, copy=False)
        if data is None:
            raise stored.damage(chunk, "missing (deleted, or never completely written)")
        values = stored.payload(chunk, data).view(stored.raw_dtype).reshape(stored.chunks)
        VERIFIED.add(verified)
        for i, offset in zip(picks, offsets, strict=True):
            out[i] = values[offset]
        return

    async def one(i: int, offset: int) -> None:
        wanted = RangeByteRequest(offset * row_bytes, (offset + 1) * row_bytes)
        raw = await stored.store.get(stored.key(chunk), prototype=_BUFFERS, byte_range=wanted)
        if raw is None:
            raise stored.damage(chunk, "missing (deleted, or never completely written)")
        data = raw.as_buffer_like()
        if len(data) != row_bytes:
            raise stored.damage(chunk, f"truncated at row {offset}")
        out[i] = np.frombuffer(data, dtype=stored.raw_dtype).reshape(out.shape[1:])

    await asyncio.gather(*(one(i, o) for i, o in zip(picks, offsets, strict=True)))


def _read_local_chunk_rows(
    stored: StoredArray, chunk: int, picks: list[int], offsets: list[int], out: np.ndarray
) -> None:
    """`_read_chunk_rows` for a local file: one open per chunk, `pread` per row once the file is checked."""
    row_bytes = stored.payload_bytes // stored.chunk_rows
    path = stored.local / stored.array.metadata.encode_chunk_key(stored.coords(chunk))  # type: ignore[operator]
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise stored.damage(chunk, "missing (deleted, or never completely written)") from None
    try:
        stat = os.fstat(fd)
        verified = stored.verified_key(chunk, stat)
        if not stored.checksum or verified in VERIFIED:
            if stored.checksum:
                stored.check_size(chunk, stat.st_size)
            for i, offset in zip(picks, offsets, strict=True):
                data = os.pread(fd, row_bytes, offset * row_bytes)
                if len(data) != row_bytes:
                    raise stored.damage(chunk, f"truncated at row {offset}")
                out[i] = np.frombuffer(data, dtype=stored.raw_dtype).reshape(out.shape[1:])
            return
        stored.check_size(chunk, stat.st_size)
        buf = np.empty(stored.object_bytes, dtype=np.uint8)
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            got, crc = readinto_crc(f, buf, stored.payload_bytes)
        stored.check_size(chunk, got)
        values = stored.payload(chunk, buf, crc).view(stored.raw_dtype).reshape(stored.chunks)
        VERIFIED.add(verified)
        for i, offset in zip(picks, offsets, strict=True):
            out[i] = values[offset]
    finally:
        os.close(fd)


def verify_index(
    url: str, *, repair: bool = False, storage_options: dict[str, Any] | None = None
) -> IndexVerifyReport:
    """`VideoIndex.verify` for a URL, reporting an index too damaged to open as "rebuild" (not raising)."""
    try:
        index = VideoIndex.open(url, mode="r+" if repair else "r", storage_options=storage_options)
    except DamagedIndexError as exc:
        report = IndexVerifyReport(url, rebuild=str(exc))
        report.damaged.append(IndexDamage("(group)", exc.key, (0, 0), exc.reason))
        return report
    return index.verify(repair=repair)


def is_index(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether `url` holds a search index (its root zarr.json says so); never writes, never raises for a
    missing or foreign URL."""
    local = "://" not in url or url.startswith("file://")
    if local and not (Path(url.removeprefix("file://")).expanduser() / "zarr.json").is_file():
        return False
    try:
        store = _store_for(url, storage_options, read_only=True)
        raw = sync(store.get("zarr.json", prototype=_BUFFERS))
        return raw is not None and parse_group_attrs(raw.to_bytes(), "zarr.json").get("format") == FORMAT
    except MamFusionError:
        return False
    except Exception as exc:
        if access_problem(exc) is None:  # unreachable: whoever opens it next reports why
            raise
        return False
