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
half-way leaves rows nobody reads, and the next append overwrites them. One writer at a time (Zarr appends are
not atomic, ECOSYSTEM_NOTES §2); any number of readers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from storage._zarr_entries import gather_limited
from storage.catalog import sha256_file
from storage.errors import MamFusionError

FORMAT = "mamfusion-index"
VERSION = 1
MODEL_FILES = ("config.json", "model.pt", "features.json")
DEFAULT_CHUNK_ROWS = 512  # 512 videos x 33 x 384 fp16 = 13 MB per chunk: big sequential reads, bounded memory
Dtype = Literal["float16", "float32"]
_BUFFERS = default_buffer_prototype()
T = TypeVar("T")


class SearchIndexError(MamFusionError):
    """Base of every index problem; the message says which index and what to do."""


class IndexNotFoundError(SearchIndexError, FileNotFoundError):
    """There is no index at the URL (never built, or the wrong URL)."""


class IndexFormatError(SearchIndexError, ValueError):
    """Something is at the URL but it is not an index this code can read, or an append does not fit it."""


class IndexModelMismatchError(SearchIndexError):
    """The index was built by a different model than the one searching it."""


class ModelDirError(SearchIndexError, FileNotFoundError):
    """The model directory lacks a file that a published model has."""


def model_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """sha256 over the files that define a published model (weights, config, feature extractors).

    Computed from the bytes, never taken from a name, so retraining into the same directory changes it.
    """
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        path = Path(model_dir) / name
        if not path.is_file():
            raise ModelDirError(f"{path}: missing; a published model directory has {', '.join(MODEL_FILES)}")
        digest.update(f"{name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def read_features_json(model_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The feature store URL and the visual/text extractor fingerprints the model was trained on."""
    path = Path(model_dir) / "features.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelDirError(f"{path}: missing; it names the feature store the model was trained on") from None
    except json.JSONDecodeError as e:
        raise IndexFormatError(f"{path}: not valid JSON ({e})") from None
    missing = [
        k for k in ("store", "visual_fingerprint", "text_fingerprint") if not isinstance(info.get(k), str)
    ]
    if missing:
        raise IndexFormatError(f"{path}: field(s) {', '.join(missing)} missing or not a string")
    return info


@dataclass(frozen=True)
class IndexRows:
    """Who each committed row is; arrays of length `count`."""

    video_ids: np.ndarray
    paths: np.ndarray
    sha256: np.ndarray
    alive: np.ndarray


class _Attr(Generic[T]):
    """Reads one group attribute on every access: `count` and `complete` change while an index is updated."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, index: VideoIndex, owner: type | None = None) -> T:
        return index._group.attrs[self.name]


class VideoIndex:
    """An open index group. Create with `VideoIndex.create`, open with `VideoIndex.open`."""

    model_fingerprint = _Attr[str]()
    dim = _Attr[int]()
    n_clips = _Attr[int]()
    dtype = _Attr[Dtype]()
    count = _Attr[int]()  # committed rows, alive or tombstoned
    complete = _Attr[bool]()  # False while a build runs or after one was killed: videos may be missing

    def __init__(self, group: zarr.Group, url: str) -> None:
        self._group = group
        self.url = url
        attrs = group.attrs.asdict()
        if attrs.get("format") != FORMAT or attrs.get("version") != VERSION:
            raise IndexFormatError(
                f"{url}: not a {FORMAT} v{VERSION} group (format={attrs.get('format')!r}, "
                f"version={attrs.get('version')!r})"
            )

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
        """A new empty index; anything at `url` is replaced (callers decide when that is right)."""
        url = str(url)
        group = zarr.open_group(url, mode="w", **_options(storage_options))
        per_row = {
            "vectors": ((n_clips + 1, dim), dtype),
            "spans": ((n_clips, 2), "float32"),
            "video_ids": ((), str),
            "paths": ((), str),
            "sha256": ((), str),
            "alive": ((), bool),
        }
        for name, (tail, dt) in per_row.items():
            group.create_array(
                name,
                shape=(0, *tail),
                dtype=dt,
                chunks=(chunk_rows, *tail),
                compressors=None if name == "vectors" else "auto",
                fill_value=False if dt is bool else None,
            )
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
        return cls(group, url)

    @classmethod
    def open(
        cls,
        url: str | os.PathLike[str],
        *,
        mode: Literal["r", "r+"] = "r",
        storage_options: dict[str, Any] | None = None,
    ) -> VideoIndex:
        """Open an existing index; `IndexNotFoundError` names the URL and how to build one."""
        url = str(url)
        try:
            group = zarr.open_group(url, mode=mode, use_consolidated=False, **_options(storage_options))
        except FileNotFoundError:
            raise IndexNotFoundError(f"no search index at {url}; build it with `mamfusion index`") from None
        return cls(group, url)

    # --------------------------------------------------------------------------------------- metadata
    @property
    def chunk_rows(self) -> int:
        return self._group["vectors"].chunks[0]

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

    def rows(self) -> IndexRows:
        """Ids, paths, content keys and tombstones of the committed rows."""
        n = self.count
        return IndexRows(*(self._group[name][:n] for name in ("video_ids", "paths", "sha256", "alive")))

    # ----------------------------------------------------------------------------------------- writes
    def append(
        self,
        vectors: np.ndarray,
        spans: np.ndarray,
        video_ids: Sequence[str],
        paths: Sequence[str],
        sha256s: Sequence[str],
    ) -> None:
        """Add rows; they become visible when `count` is raised at the end."""
        k = len(video_ids)
        expected = (k, self.n_clips + 1, self.dim)
        spans_shape = (k, self.n_clips, 2)
        if vectors.shape != expected or spans.shape != spans_shape or not len(paths) == len(sha256s) == k:
            raise IndexFormatError(
                f"{self.url}: append of {k} videos needs vectors {expected} and spans {spans_shape}, "
                f"got {vectors.shape} and {spans.shape} with {len(paths)} paths, {len(sha256s)} sha256s"
            )
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
            array = self._group[name]
            array.resize((n + k, *array.shape[1:]))
            array[n : n + k] = values
        self._group.attrs["count"] = n + k

    def remove(self, rows: Sequence[int]) -> None:
        """Tombstone rows: they stay on disk (no rewrite) but never appear in results."""
        alive = self._group["alive"]
        mask = alive[: self.count]
        mask[np.asarray(rows, dtype=np.int64)] = False
        alive[: self.count] = mask

    def set_complete(self, complete: bool) -> None:
        self._group.attrs["complete"] = complete

    # ------------------------------------------------------------------------------------------ reads
    def read_chunk(self, i: int) -> np.ndarray:
        """The committed rows of vector chunk `i`, straight from the store's bytes.

        Vector chunks are uncompressed little-endian (see `create`), so a chunk's bytes are the array: reading
        them directly skips zarr's decode-and-copy pipeline, which ran at a third of the store's read speed.
        """
        array = self._group["vectors"]
        raw = sync((array.store_path / array.metadata.encode_chunk_key((i, 0, 0))).get(prototype=_BUFFERS))
        start = i * self.chunk_rows
        n = min(self.chunk_rows, self.count - start)
        if raw is None:  # never written: zarr's fill value
            return np.zeros((n, self.n_clips + 1, self.dim), dtype=self.dtype)
        tail = (self.n_clips + 1, self.dim)
        return np.frombuffer(raw.as_buffer_like(), dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(
            -1, *tail
        )[:n]

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
        few hundred candidates read gigabytes.
        """
        rows, url = np.asarray(rows, dtype=np.int64), self.url
        if len(rows) and (rows.min() < 0 or rows.max() >= self.count):
            raise IndexError(f"{url}: rows must be in [0, {self.count}), got {rows.min()}..{rows.max()}")
        array = self._group["vectors"]
        tail = (self.n_clips + 1, self.dim)
        dtype = np.dtype(self.dtype).newbyteorder("<")
        row_bytes = dtype.itemsize * tail[0] * tail[1]
        chunk_rows = self.chunk_rows  # read here: the coroutines below must not call back into sync()
        out = np.empty((len(rows), *tail), dtype=self.dtype)

        async def read(i: int, row: int) -> None:
            chunk, offset = divmod(int(row), chunk_rows)
            path = array.store_path / array.metadata.encode_chunk_key((chunk, 0, 0))
            wanted = RangeByteRequest(offset * row_bytes, (offset + 1) * row_bytes)
            raw = await path.get(prototype=_BUFFERS, byte_range=wanted)
            if raw is None:  # never written: zarr's fill value
                out[i] = 0
                return
            data = raw.as_buffer_like()
            if len(data) != row_bytes:
                raise IndexFormatError(f"{url}: chunk {chunk} is truncated at row {offset}; rebuild it")
            out[i] = np.frombuffer(data, dtype=dtype).reshape(tail)

        async def read_all() -> None:
            await gather_limited(read(i, row) for i, row in enumerate(rows))

        sync(read_all())
        return out

    def read_spans(self) -> np.ndarray:
        """(count, n_clips, 2) seconds; small next to the vectors (1% at d=384), so it is read whole."""
        return self._group["spans"][: self.count]


def _options(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """zarr accepts storage_options only for fsspec URLs; pass them only when given."""
    return {"storage_options": storage_options} if storage_options else {}
