"""Zarr feature store: video and query features keyed by content, safe for crashes and parallel writers.

Video features are keyed by (video sha256, extractor fingerprint), so the same video through the same
extractor is never computed twice, whatever its file name; query token features are keyed by
`text_key(text)`. The crash and concurrency machinery lives in `storage._zarr_entries` (staged writes
published by a commit marker, gc) and `storage._zarr_packs` (packs for fast bulk reads); this module
validates input and keeps the registry of extractors and the video-id index.

Store layout besides entries and packs (see those modules):

    zarr.json                         root group, attrs {"mamfusion_feature_store": {"layout": 1}}
    extractors/<fp>/zarr.json         {"kind": "visual"|"text", "dim": D, "config": {...}} (write-once)
    names/<fp>/<sha256(video_id)>/    group attrs {"video_id", "sha256"}: one object per name, last wins
    videos/<fp>/<sha>/...             features (T, D) float32, times (T, 2) float64 seconds
    queries/<fp>/<text_key>/...       features (N_tokens, D) float32

Integrity: every array chunk ends with a crc32c and every chunk is stored, so a flipped byte, a truncated or a
missing chunk raises `DamagedStoreError` naming the store, the entry and the object; `verify` (the CLI's
`mamfusion store verify`) checks everything and `verify(repair=True)` drops what is damaged so the next
extraction writes it again. Stores written before checksums still read; `verify` counts their arrays as
"no checksum", the next `pack` rewrites their packs with checksums, and re-extraction their entries.

`FeatureStore(url, read_only=True)` never writes (no root creation, no auto-pack); a local store the process
may not write to opens read-only by itself.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import os
import re
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from storage import _zarr_entries as entries
from storage import _zarr_packs as packs
from storage._zarr_entries import ArraySpec, DamagedStoreError, Entry, FeatureStoreError
from storage._zarr_packs import GcReport, Pack

__all__ = [
    "DamagedStoreError",
    "FeatureDimensionError",
    "FeatureStore",
    "FeatureStoreError",
    "FeatureStoreNotFoundError",
    "GcReport",
    "MissingFeatureError",
    "NotAFeatureStoreError",
    "PackInfo",
    "ReadOnlyStoreError",
    "StoreAccessError",
    "StoreDamage",
    "StoreVerifyReport",
    "VideoFeatures",
    "text_key",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

LAYOUT_VERSION = 1
_ROOT_ATTR = "mamfusion_feature_store"
VIDEOS, QUERIES = "videos", "queries"
_NAMESPACE = {"visual": VIDEOS, "text": QUERIES}
_RESERVED_ATTRS = frozenset({"sha256", "fingerprint", "video_id", "written_at"})
_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")
_TIMES = ArraySpec("times", (2,), "float64", ("row", "bound"))
PACK_RETENTION_S = 3600.0  # `pack` deletes packs replaced longer ago than this (readers are long done)
AUTO_PACK_MIN = 256  # loose entries in one bulk read that make it pack first (see FeatureStore.__init__)


class MissingFeatureError(FeatureStoreError, KeyError):
    """No complete entry for a key (or no registered extractor for a fingerprint)."""

    def __init__(self, message: str, *, fingerprint: str, keys: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.fingerprint = fingerprint
        self.keys = list(keys)

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class FeatureDimensionError(FeatureStoreError, ValueError):
    """Features whose width differs from the dimension registered for their extractor."""

    def __init__(self, fingerprint: str, expected: int, actual: int, what: str) -> None:
        super().__init__(
            f"{what}: features have dim {actual} but extractor {fingerprint!r} is registered with dim "
            f"{expected}"
        )
        self.fingerprint, self.expected, self.actual = fingerprint, expected, actual


class FeatureStoreNotFoundError(FeatureStoreError, FileNotFoundError):
    """Opening read-only (or with nothing to create) where there is no feature store."""


class NotAFeatureStoreError(FeatureStoreError):
    """The URL holds something else (a file, a folder of other files, another Zarr group): never adopted."""


class ReadOnlyStoreError(FeatureStoreError):
    """A write to a store opened read-only (asked for, or a store this process may not write to)."""


class StoreAccessError(FeatureStoreError):
    """The store cannot be reached or read: credentials, endpoint, permissions, a missing bucket."""


@dataclass
class VideoFeatures:
    """One video's feature rows, the start/end seconds of each row, and provenance attributes."""

    features: np.ndarray  # (T, D) float32
    times: np.ndarray  # (T, 2) float64 seconds
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PackInfo:
    """What `FeatureStore.pack` left current: how many entries and rows bulk reads get in one layout."""

    fingerprint: str
    entries: int
    rows: int


@dataclass
class StoreDamage:
    """One damaged thing `verify` found: an entry, a pack, an extractor registration or a name record."""

    kind: Literal["entry", "pack", "extractor", "name"]
    namespace: str | None
    fingerprint: str | None
    entry: str | None  # video sha256 / query text key (entries), pack stage, or the name record's key
    key: str  # the object at fault
    reason: str
    video_id: str | None = None
    affected: list[str] = field(default_factory=list)  # entries a damaged pack chunk holds
    repaired: bool = False


@dataclass
class StoreVerifyReport:
    """What `FeatureStore.verify` checked and found; `ok` when nothing is damaged (or all was repaired)."""

    url: str
    entries: int = 0  # committed entries checked
    entries_without_checksum: int = 0  # written before checksums: their bytes are only size-checked
    packs: int = 0
    packs_without_checksum: int = 0
    extractors: int = 0
    names: int = 0
    damaged: list[StoreDamage] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)  # what --repair did

    @property
    def ok(self) -> bool:
        return all(d.repaired for d in self.damaged)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": "feature-store", "ok": self.ok}


def text_key(text: str) -> str:
    """sha256 of the UTF-8 text: query features are keyed by content, so equal captions share one entry."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _name_key(video_id: str) -> str:
    return hashlib.sha256(video_id.encode("utf-8")).hexdigest()


def _check_segment(value: str, what: str) -> str:
    """Keys become store path segments: refuse anything that could escape or collide with Zarr metadata."""
    if not isinstance(value, str) or not _SEGMENT.match(value) or value == "zarr.json":
        raise FeatureStoreError(
            f"invalid {what} {value!r}: use 1-200 characters from A-Z a-z 0-9 . _ - (not starting with '.')"
        )
    return value


def _jsonable(value: Any, what: str) -> Any:
    """A deep copy through strict JSON, so what is stored is exactly what later reads return."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise FeatureStoreError(f"{what} must be JSON-serialisable without NaN/inf: {exc}") from exc


def _as_features(values: Any, *, fingerprint: str, dim: int, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise FeatureStoreError(f"{what}: features must be 2-D (rows, dim), got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise FeatureStoreError(f"{what}: features must be real numbers, got dtype {arr.dtype}")
    if arr.shape[1] != dim:
        raise FeatureDimensionError(fingerprint, dim, arr.shape[1], what)
    if arr.shape[0] == 0:
        raise FeatureStoreError(f"{what}: features have no rows")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    bad = np.argwhere(~np.isfinite(out))
    if len(bad):
        r, c = bad[0]
        raise FeatureStoreError(
            f"{what}: feature row {r} column {c} is {arr[r, c].item()!r} (not finite as float32)"
        )
    return out


def _as_times(values: Any, n_rows: int, what: str) -> np.ndarray:
    times = np.asarray(values, dtype=np.float64)
    if times.shape != (n_rows, 2):
        raise FeatureStoreError(
            f"{what}: times must have shape ({n_rows}, 2) (start, end seconds), got {times.shape}"
        )
    bad = np.flatnonzero(~np.isfinite(times).all(axis=1) | (times[:, 1] < times[:, 0]))
    if len(bad):
        raise FeatureStoreError(
            f"{what}: times row {bad[0]} = {times[bad[0]].tolist()} is not finite with end >= start"
        )
    return times


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _open_store(
    url: str | os.PathLike[str], storage_options: dict[str, Any] | None, read_only: bool
) -> tuple[Store, str, bool]:
    """(store, url, read_only): a LocalStore for paths and file:// URLs, an FsspecStore for every other URL
    (memory://, s3://, ...). A local store this process may not write to is opened read-only."""
    text = os.fspath(url)
    if "://" in text and not text.startswith("file://"):
        try:
            store = FsspecStore.from_url(text, storage_options=storage_options or {}, read_only=read_only)
        except (ImportError, ValueError, TypeError) as exc:  # s3:// without s3fs, a bad storage option
            raise FeatureStoreError(f"cannot open feature store {text!r}: {exc}") from exc
        return store, text, read_only
    if storage_options:
        raise FeatureStoreError(f"storage_options apply to fsspec URLs, not the local path {text!r}")
    path = Path(text.removeprefix("file://")).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise NotAFeatureStoreError(f"{path} is a file, not a feature store folder; pass a folder path")
    if read_only and not path.exists():
        raise FeatureStoreNotFoundError(
            f"no feature store at {path}: it does not exist (opened read-only, so it is not created)"
        )
    if not read_only and path.exists() and not os.access(path, os.W_OK):
        log.info("feature store %s is not writable by this process; opening it read-only", path)
        read_only = True
    return LocalStore(path, read_only=read_only), str(path), read_only


def _missing(fingerprint: str, keys: list[str], what: str) -> MissingFeatureError:
    shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
    return MissingFeatureError(
        f"no complete {what} under fingerprint {fingerprint!r} for: {shown}",
        fingerprint=fingerprint,
        keys=keys,
    )


class FeatureStore:
    """Feature arrays in one Zarr v3 store (local path or fsspec URL); safe to share between processes."""

    def __init__(
        self,
        url: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        *,
        auto_pack: bool = True,
        read_only: bool = False,
    ) -> None:
        """`auto_pack`: a bulk read that would read at least AUTO_PACK_MIN entries one by one (over half of
        what it asks for) first packs the fingerprint, so training is fast even if no step ran `pack`.

        `read_only`: never write anything (search, evaluation, verification): a missing store is an error
        instead of being created, and bulk reads read loose entries one by one instead of packing. Opening
        for writing creates a new store, but never adopts a non-empty folder or prefix that is not a store.
        """
        self._store, self.url, self.read_only = _open_store(url, storage_options, read_only)
        self.storage_options = dict(storage_options or {})
        self.auto_pack = auto_pack and not self.read_only
        self._extractors: dict[str, dict[str, Any]] = {}
        self._packs: dict[str, Pack] = {}
        try:
            self._run(self._open_root())
        except FeatureStoreError:
            raise
        except Exception as exc:
            problem = entries.access_problem(exc)
            if problem is None:
                raise
            raise StoreAccessError(f"cannot open feature store {self.url}: {problem}") from exc

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as (url, storage_options, auto_pack, read_only): Dask/Prefect workers reopen the store."""
        return _reopen, (self.url, self.storage_options, self.auto_pack, self.read_only)

    def __repr__(self) -> str:
        return f"FeatureStore({self.url!r}{', read_only=True' if self.read_only else ''})"

    @staticmethod
    def _run(coro: Coroutine[Any, Any, T]) -> T:
        return sync(coro)

    def _writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyStoreError(f"feature store {self.url} is open read-only; cannot {what}")

    async def _open_root(self) -> None:
        attrs = await entries.get_attrs(self._store, "")
        if attrs is None:
            if self.read_only:
                raise FeatureStoreNotFoundError(
                    f"no feature store at {self.url} (no zarr.json; opened read-only, so none is created)"
                )
            children = await entries.list_children(self._store, "")
            if children:  # another writer may have created the root since we looked: look again first
                attrs = await entries.get_attrs(self._store, "")
            if children and attrs is None:
                shown = ", ".join(repr(c) for c in sorted(children)[:3])
                raise NotAFeatureStoreError(
                    f"{self.url} is not empty and not a feature store (it holds {shown}"
                    f"{', ...' if len(children) > 3 else ''}); point the store at a new or existing store"
                )
            if attrs is None:
                root = {_ROOT_ATTR: {"layout": LAYOUT_VERSION}}
                await entries.put_group(self._store, "", root, exclusive=True)
                attrs = await entries.get_attrs(self._store, "") or {}
        info = attrs.get(_ROOT_ATTR)
        if not isinstance(info, dict):
            raise NotAFeatureStoreError(f"{self.url} is a Zarr group but not a MamFusion feature store")
        if info.get("layout") != LAYOUT_VERSION:
            raise FeatureStoreError(
                f"{self.url} has feature-store layout {info.get('layout')!r}; this code reads layout "
                f"{LAYOUT_VERSION}"
            )

    # --- extractor registry ---------------------------------------------------------------------------------
    def register_extractor(
        self, fingerprint: str, *, kind: Literal["visual", "text"], dim: int, config: dict[str, Any]
    ) -> None:
        """Record what a fingerprint means (idempotent); a different kind/dim/config for it is an error."""
        _check_segment(fingerprint, "extractor fingerprint")
        if not isinstance(kind, str) or kind not in _NAMESPACE:
            raise FeatureStoreError(
                f"extractor {fingerprint!r}: kind must be 'visual' or 'text', got {kind!r}"
            )
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim <= 0:
            raise FeatureStoreError(f"extractor {fingerprint!r}: dim must be a positive integer, got {dim!r}")
        if not isinstance(config, dict):
            raise FeatureStoreError(
                f"extractor {fingerprint!r}: config must be a dict, got {type(config).__name__}"
            )
        info = {
            "kind": kind,
            "dim": int(dim),
            "config": _jsonable(config, f"extractor {fingerprint!r} config"),
        }
        path = f"extractors/{fingerprint}"
        if not self.read_only:
            self._run(entries.put_group(self._store, path, info, exclusive=True))
        stored = self._run(entries.get_attrs(self._store, path))
        if stored is None:
            self._writable(f"register extractor {fingerprint!r}")
        if stored != info:
            differ = sorted(k for k in info if (stored or {}).get(k) != info[k])
            raise FeatureStoreError(
                f"extractor {fingerprint!r} is already registered with a different {', '.join(differ)}: "
                f"stored {stored!r}, given {info!r}"
            )
        self._extractors[fingerprint] = info

    def extractor_info(self, fingerprint: str) -> dict[str, Any]:
        """{"kind", "dim", "config"} of a registered fingerprint (a copy: the config rebuilds encoders)."""
        if fingerprint not in self._extractors:
            _check_segment(fingerprint, "extractor fingerprint")
            path = f"extractors/{fingerprint}"
            info = self._run(entries.get_attrs(self._store, path))
            if info is None:
                raise MissingFeatureError(
                    f"extractor fingerprint {fingerprint!r} is not registered in {self.url}",
                    fingerprint=fingerprint,
                )
            problem = _extractor_problem(info)
            if problem:
                raise DamagedStoreError(
                    self.url,
                    f"extractor registration {fingerprint!r}",
                    entries.meta_key(path),
                    problem,
                    fingerprint=fingerprint,
                )
            self._extractors[fingerprint] = info
        return copy.deepcopy(self._extractors[fingerprint])

    def extractors(self) -> dict[str, dict[str, Any]]:
        names = [n for n in self._run(entries.list_children(self._store, "extractors")) if n != "zarr.json"]
        return {name: self.extractor_info(name) for name in sorted(names)}

    def _info(self, fingerprint: str, kind: str) -> dict[str, Any]:
        info = self.extractor_info(fingerprint)
        if info["kind"] != kind:
            raise FeatureStoreError(f"fingerprint {fingerprint!r} is a {info['kind']} extractor, not {kind}")
        return info

    def _feature_spec(self, fingerprint: str, kind: str) -> ArraySpec:
        return ArraySpec("features", (self._info(fingerprint, kind)["dim"],), "float32", ("row", "dim"))

    # --- videos ---------------------------------------------------------------------------------------------
    def has_video(self, sha256: str, fingerprint: str) -> bool:
        """True only for a complete (committed) entry."""
        _check_segment(fingerprint, "extractor fingerprint")
        key = _check_segment(sha256, "video sha256")
        return self._run(entries.read_marker(self._store, VIDEOS, fingerprint, key)) is not None

    def stored_video_attrs(self, fingerprint: str, sha256s: Sequence[str]) -> list[dict[str, Any] | None]:
        """Per video, the attrs written with its complete entry (None where it has none), read concurrently:
        one call tells a flow which of thousands of videos need no extraction, and what was noted on them.
        A damaged marker is None too, not an error for the whole folder: that video's own extraction meets
        the damage and reports it, naming the entry, while the others go on."""
        _check_segment(fingerprint, "extractor fingerprint")
        keys = [_check_segment(s, "video sha256") for s in sha256s]

        async def attrs(key: str) -> dict[str, Any] | None:
            try:
                marker = await entries.read_marker(self._store, VIDEOS, fingerprint, key)
            except DamagedStoreError:
                return None
            return None if marker is None else dict(marker.get("attrs", {}))

        return self._run(entries.gather_limited(attrs(k) for k in keys))

    def write_video(
        self,
        sha256: str,
        fingerprint: str,
        features: Any,
        times: Any,
        *,
        video_id: str | None = None,
        attrs: dict[str, Any] | None = None,
    ) -> None:
        """Store one video's rows; readers see it only once complete, and a rewrite replaces it whole."""
        self._writable(f"write video {sha256}")
        key = _check_segment(sha256, "video sha256")
        what = f"video {sha256} ({fingerprint})"
        spec = self._feature_spec(fingerprint, "visual")
        feats = _as_features(features, fingerprint=fingerprint, dim=spec.trailing[0], what=what)
        times_arr = _as_times(times, len(feats), what)
        if video_id is not None and (not isinstance(video_id, str) or not video_id):
            raise FeatureStoreError(f"{what}: video_id must be a non-empty string, got {video_id!r}")
        user = _jsonable(attrs or {}, f"{what} attrs")
        if not isinstance(user, dict) or _RESERVED_ATTRS & user.keys():
            raise FeatureStoreError(
                f"{what}: attrs must be a dict without the reserved keys {sorted(_RESERVED_ATTRS)}"
            )
        meta = {"n_rows": len(feats), "video_id": video_id, "written_at": _now(), "attrs": user}
        self._run(
            self._write_video(
                fingerprint, key, {"features": (feats, spec), "times": (times_arr, _TIMES)}, meta
            )
        )

    async def _write_video(
        self, fp: str, key: str, arrays: dict[str, tuple[np.ndarray, ArraySpec]], meta: dict
    ) -> None:
        stage = await entries.stage_entry(self._store, VIDEOS, fp, key, arrays)
        if meta["video_id"] is not None:  # before the commit: a crash in between must not lose the name
            record = {"video_id": meta["video_id"], "sha256": key}
            await entries.put_group(self._store, f"names/{fp}/{_name_key(meta['video_id'])}", record)
        await entries.commit_entry(self._store, VIDEOS, fp, key, stage, meta)

    def read_video(self, sha256: str, fingerprint: str) -> VideoFeatures:
        return self.read_videos(fingerprint, [sha256])[0]

    def read_videos(self, fingerprint: str, sha256s: Sequence[str]) -> list[VideoFeatures]:
        """Bulk read in order: packed rows in a few large reads, the rest one by one, concurrently."""
        keys = [_check_segment(s, "video sha256") for s in sha256s]
        self._info(fingerprint, "visual")
        found = self._bulk_read(VIDEOS, fingerprint, keys, ["features", "times"])
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if missing:
            raise _missing(fingerprint, missing, "video features")
        return [self._video(fingerprint, found[k]) for k in keys]

    @staticmethod
    def _video(fingerprint: str, entry: Entry) -> VideoFeatures:
        meta = entry.meta
        attrs = {
            **meta.get("attrs", {}),
            "sha256": entry.key,
            "fingerprint": fingerprint,
            "video_id": meta.get("video_id"),
            "written_at": meta.get("written_at"),
        }
        return VideoFeatures(entry.arrays["features"], entry.arrays["times"], attrs)

    def resolve_video_ids(self, fingerprint: str, video_ids: Sequence[str]) -> dict[str, str]:
        """video_id -> sha256 for the ids whose latest named write is complete under `fingerprint`."""
        _check_segment(fingerprint, "extractor fingerprint")
        return self._run(self._resolve(fingerprint, list(dict.fromkeys(video_ids))))

    async def _resolve(self, fp: str, video_ids: list[str]) -> dict[str, str]:
        records = await entries.gather_limited(
            entries.get_attrs(self._store, f"names/{fp}/{_name_key(v)}") for v in video_ids
        )
        named = {
            v: r["sha256"]
            for v, r in zip(video_ids, records, strict=True)
            if r
            and r.get("video_id") == v
            and isinstance(r.get("sha256"), str)
            and _SEGMENT.match(r["sha256"])
        }
        pack = await packs.load_pack(self._store, VIDEOS, fp, self._packs)
        packed = pack.position if pack else {}
        loose = sorted({s for s in named.values() if s not in packed})
        markers = await entries.gather_limited(entries.read_marker(self._store, VIDEOS, fp, s) for s in loose)
        complete = set(packed) | {s for s, m in zip(loose, markers, strict=True) if m is not None}
        return {v: s for v, s in named.items() if s in complete}

    # --- queries --------------------------------------------------------------------------------------------
    def has_queries(self, fingerprint: str, texts: Sequence[str]) -> list[bool]:
        _check_segment(fingerprint, "extractor fingerprint")
        markers = self._run(
            entries.gather_limited(
                entries.read_marker(self._store, QUERIES, fingerprint, text_key(t)) for t in texts
            )
        )
        return [m is not None for m in markers]

    def write_queries(self, fingerprint: str, texts: Sequence[str], features: Sequence[Any]) -> None:
        """Store token features per text; a text given twice must come with equal features."""
        self._writable("write query features")
        spec = self._feature_spec(fingerprint, "text")
        if len(texts) != len(features):
            raise FeatureStoreError(f"write_queries: {len(texts)} texts but {len(features)} feature arrays")
        todo: dict[str, tuple[str, np.ndarray]] = {}
        for i, (text, values) in enumerate(zip(texts, features, strict=True)):
            if not isinstance(text, str):
                raise FeatureStoreError(f"query {i}: text must be a string, got {type(text).__name__}")
            what = f"query {i} {text[:60]!r} ({fingerprint})"
            feats = _as_features(values, fingerprint=fingerprint, dim=spec.trailing[0], what=what)
            key = text_key(text)
            if key in todo and not np.array_equal(todo[key][1], feats):
                raise FeatureStoreError(f"{what}: the same text was given twice with different features")
            todo[key] = (text, feats)
        self._run(
            entries.gather_limited(
                self._write_query(fingerprint, key, text, f, spec) for key, (text, f) in todo.items()
            )
        )

    async def _write_query(self, fp: str, key: str, text: str, feats: np.ndarray, spec: ArraySpec) -> None:
        stage = await entries.stage_entry(self._store, QUERIES, fp, key, {"features": (feats, spec)})
        meta = {"n_rows": len(feats), "text": text, "written_at": _now()}
        await entries.commit_entry(self._store, QUERIES, fp, key, stage, meta)

    def read_queries(self, fingerprint: str, texts: Sequence[str]) -> list[np.ndarray]:
        """(N_tokens, D) float32 per text, in order; every missing text is named in one error."""
        self._info(fingerprint, "text")
        keys = [text_key(t) for t in texts]
        found = self._bulk_read(QUERIES, fingerprint, keys, ["features"])
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys, strict=True) if k not in found))
        if missing:
            raise _missing(fingerprint, [repr(t[:80]) for t in missing], "query features")
        return [found[k].arrays["features"] for k in keys]

    def _bulk_read(self, ns: str, fp: str, keys: list[str], names: list[str]) -> dict[str, Entry]:
        if self.auto_pack and len(keys) >= AUTO_PACK_MIN:
            _, _, loose = self._run(packs.split_packed(self._store, ns, fp, keys, self._packs))
            if len(loose) >= AUTO_PACK_MIN and 2 * len(loose) > len(set(keys)):
                try:
                    self.pack(fp)
                except (FeatureStoreError, OSError) as exc:  # e.g. read-only credentials: read one by one
                    log.warning(
                        "could not pack %s before a bulk read (%s); reading entries one by one", fp, exc
                    )
        return self._run(packs.read_many(self._store, ns, fp, keys, names, self._packs))

    # --- maintenance ----------------------------------------------------------------------------------------
    def pack(self, fingerprint: str) -> PackInfo:
        """Concatenate every committed entry of `fingerprint` so bulk reads become a few large reads.

        Run it once after extraction (one writer is enough; concurrent packs are safe, the last wins).
        Entries written later are still read, one by one, until the next pack. Packs replaced more than
        PACK_RETENTION_S ago are deleted here, so repeated packing does not pile up copies.
        """
        self._writable(f"pack {fingerprint!r}")
        kind = self.extractor_info(fingerprint)["kind"]
        specs = [self._feature_spec(fingerprint, kind)] + ([_TIMES] if kind == "visual" else [])
        pack = self._run(packs.build_pack(self._store, _NAMESPACE[kind], fingerprint, specs, self._packs))
        self._run(packs.gc_packs(self._store, _NAMESPACE[kind], fingerprint, PACK_RETENTION_S))
        if pack is None:
            return PackInfo(fingerprint, 0, 0)
        log.info("packed %d entries (%d rows) of %s", len(pack.keys), int(pack.offsets[-1]), fingerprint)
        return PackInfo(fingerprint, len(pack.keys), int(pack.offsets[-1]))

    def gc(self, min_age_s: float = 3600.0) -> GcReport:
        """Delete write attempts and packs that nothing references and that are older than `min_age_s`.

        Killed or superseded writers leave such orphans; readers never see them. The age limit keeps
        writes still in flight safe, so use 0 only when no writer is running.
        """
        self._writable("collect garbage")
        return self._run(packs.collect_garbage(self._store, [VIDEOS, QUERIES], min_age_s))

    # --- integrity ------------------------------------------------------------------------------------------
    def verify(self, *, repair: bool = False) -> StoreVerifyReport:
        """Read and check every committed entry, every current pack chunk, extractor registration and name
        record (checksums, sizes, row counts, dims).

        `repair`: drop what is damaged so the next extraction writes it again. A damaged entry loses its
        commit marker; a (ns, fingerprint) that lost an entry, or whose pack is damaged, stops being served by
        its pack, which is rebuilt from the intact entries; damaged registrations and name records are
        deleted (the next extraction writes them again).
        """
        if repair:
            self._writable("repair it")
        report = StoreVerifyReport(self.url)
        self._run(self._verify(report))
        if repair and report.damaged:
            self._repair(report)
        return report

    async def _verify(self, report: StoreVerifyReport) -> None:
        store = self._store
        registered: dict[str, dict[str, Any]] = {}
        for fp in [n for n in await entries.list_children(store, "extractors") if n != "zarr.json"]:
            path = f"extractors/{fp}"
            try:
                info = await entries.get_attrs(store, path)
                problem = "missing" if info is None else _extractor_problem(info)
            except DamagedStoreError as exc:
                info, problem = None, exc.reason
            report.extractors += 1
            if problem or info is None:
                report.damaged.append(
                    StoreDamage("extractor", None, fp, None, entries.meta_key(path), problem or "missing")
                )
            else:
                registered[fp] = info
        for ns in (VIDEOS, QUERIES):
            for fp in [n for n in await entries.list_children(store, ns) if n != "zarr.json"]:
                keys = [k for k in await entries.list_children(store, f"{ns}/{fp}") if k != "zarr.json"]
                info = registered.get(fp)
                results = await entries.gather_limited(self._verify_entry(ns, fp, k, info) for k in keys)
                for result in results:
                    if isinstance(result, StoreDamage):
                        report.damaged.append(result)
                        report.entries += 1
                    elif result is not None:
                        report.entries += 1
                        report.entries_without_checksum += not result
            for fp in [n for n in await entries.list_children(store, f"packs/{ns}") if n != "zarr.json"]:
                pack, found, checksummed = await packs.verify_pack(store, ns, fp, self._packs)
                if pack is None and not found:
                    continue
                report.packs += 1
                report.packs_without_checksum += not checksummed and not found
                stage = pack.stage if pack else None
                report.damaged.extend(
                    StoreDamage("pack", ns, fp, stage, d.key, d.reason, affected=d.entries) for d in found
                )
        for fp in [n for n in await entries.list_children(store, "names") if n != "zarr.json"]:
            names = [k for k in await entries.list_children(store, f"names/{fp}") if k != "zarr.json"]
            found = await entries.gather_limited(self._verify_name(fp, k) for k in names)
            report.names += len(names)
            report.damaged.extend(d for d in found if d is not None)

    async def _verify_entry(
        self, ns: str, fp: str, key: str, info: dict[str, Any] | None
    ) -> StoreDamage | bool | None:
        """None: not committed; True/False: intact, with/without checksums; else what is damaged."""
        try:
            marker = await entries.read_marker(self._store, ns, fp, key)
        except DamagedStoreError as exc:
            return StoreDamage("entry", ns, fp, key, exc.key, exc.reason)
        if marker is None:
            return None
        vid = marker.get("video_id") if isinstance(marker.get("video_id"), str) else None
        try:
            names = packs.ARRAYS[ns]
            arrays, checksummed = await entries.read_entry_arrays(self._store, ns, fp, key, marker, names)
        except DamagedStoreError as exc:
            return StoreDamage("entry", ns, fp, key, exc.key, exc.reason, video_id=vid)
        widths = {"features": info["dim"] if info else None, "times": 2}
        for name, values in arrays.items():
            if widths.get(name) is not None and values.shape[1] != widths[name]:
                base = f"{entries.entry_path(ns, fp, key)}/{marker['commit']}/{name}"
                reason = f"{name} have width {values.shape[1]}, expected {widths[name]}"
                return StoreDamage("entry", ns, fp, key, entries.meta_key(base), reason, video_id=vid)
        return checksummed

    async def _verify_name(self, fp: str, key: str) -> StoreDamage | None:
        path = f"names/{fp}/{key}"
        try:
            record = await entries.get_attrs(self._store, path)
        except DamagedStoreError as exc:
            return StoreDamage("name", None, fp, key, exc.key, exc.reason)
        ok = (
            record is not None
            and isinstance(record.get("video_id"), str)
            and _name_key(record["video_id"]) == key
            and isinstance(record.get("sha256"), str)
            and bool(_SEGMENT.match(record["sha256"]))
        )
        if ok or record is None:
            return None
        return StoreDamage(
            "name", None, fp, key, entries.meta_key(path), f"not a name record: {record!r:.80}"
        )

    def _repair(self, report: StoreVerifyReport) -> None:
        store = self._store
        refresh: set[tuple[str, str]] = set()
        for damage in report.damaged:
            if damage.kind == "entry" and damage.namespace and damage.fingerprint and damage.entry:
                path = entries.entry_path(damage.namespace, damage.fingerprint, damage.entry)
                self._run(store.delete(entries.meta_key(path)))
                refresh.add((damage.namespace, damage.fingerprint))
                report.actions.append(f"dropped {damage.namespace}/{damage.fingerprint}/{damage.entry}")
            elif damage.kind == "pack" and damage.namespace and damage.fingerprint:
                refresh.add((damage.namespace, damage.fingerprint))
            elif damage.kind in ("extractor", "name"):
                self._run(store.delete(damage.key))
                report.actions.append(f"deleted {damage.key}")
            else:
                continue
            damage.repaired = True
        self._packs.clear()
        self._extractors.clear()
        for ns, fp in sorted(refresh):
            try:
                had_pack = self._run(entries.get_attrs(store, packs.pack_path(ns, fp))) is not None
            except DamagedStoreError:
                had_pack = True
            if not had_pack:
                continue
            self._run(packs.drop_pack(store, ns, fp))
            report.actions.append(f"stopped serving the pack of {ns}/{fp}")
            try:
                info = self.pack(fp)
            except FeatureStoreError as exc:
                report.actions.append(f"could not rebuild the pack of {ns}/{fp} ({exc}); run `pack` later")
            else:
                report.actions.append(f"rebuilt the pack of {ns}/{fp} ({info.entries} entries)")


def _extractor_problem(info: dict[str, Any]) -> str | None:
    """Why an extractor registration is unusable, or None."""
    dim, kind = info.get("dim"), info.get("kind")
    if not isinstance(kind, str) or kind not in _NAMESPACE:
        return f"kind {kind!r:.40}"
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        return f"dim {dim!r}"
    if not isinstance(info.get("config"), dict):
        return "config is not an object"
    return None


def _reopen(
    url: str, storage_options: dict[str, Any], auto_pack: bool, read_only: bool = False
) -> FeatureStore:
    return FeatureStore(url, storage_options, auto_pack=auto_pack, read_only=read_only)
