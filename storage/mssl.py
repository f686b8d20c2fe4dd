"""Import the MS-SL benchmark bundle (MODEL_SPEC §12) into a FeatureStore, so the paper's data trains as-is.

Bundle layout under ROOT (ROOT may also be the collection folder itself):

    <collection>/FeatureData/<feature>/{feature.bin, id.txt, shape.txt, video2frames.txt}
    <collection>/TextData/<collection>{train,val,test}.caption.txt
    <collection>/TextData/roberta_<collection>_query_feat.hdf5

Keys in the store:
- a video's entry is keyed by the sha256 of its feature rows as raw little-endian float32 bytes, in
  video2frames order (the bundle has no video files to hash), under `mssl-<collection>-<feature>-<D>`; the
  video-id index maps the bundle's video ids to these hashes;
- a caption's token features are keyed by its text (as `read_annotations` normalises it) under
  `mssl-<collection>-roberta-<D>`.
The bundle has no timestamps: row k gets times [k, k+1) x `seconds_per_row` (1.0 unless the caller knows the
feature rate); the entry's attrs say so. Text files are decoded as ISO-8859-1, as MS-SL's BigFile does, so
names in id.txt and video2frames.txt always match byte for byte.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from storage.annotations import AnnotationSet, QueryRecord, read_annotations
from storage.errors import MamFusionError
from storage.feature_store import FeatureStore

log = logging.getLogger(__name__)

COLLECTIONS = ("tvr", "activitynet", "charades")
SPLITS = ("train", "val", "test")
_WRITE_THREADS = 8
_BATCH = 256  # videos or captions held in memory at once


class MsslFormatError(MamFusionError, ValueError):
    """A bundle file that is missing or malformed: `path` and `reason`."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class BigFile:
    """MS-SL's BigFile: N named rows of D float32 in feature.bin, names in id.txt, "N D" in shape.txt."""

    directory: Path
    names: tuple[str, ...]
    dim: int

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> BigFile:
        """Check that the three files agree before anything is read from them."""
        directory = Path(directory)
        shape_path, id_path, bin_path = (directory / n for n in ("shape.txt", "id.txt", "feature.bin"))
        n_rows, dim = _read_shape(shape_path)
        names = tuple(_read_text(id_path).split())
        if len(names) != n_rows:
            raise MsslFormatError(id_path, f"has {len(names)} names but shape.txt says {n_rows} rows")
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise MsslFormatError(id_path, f"row name {name!r} appears twice")
            seen.add(name)
        size, expected = _size(bin_path), n_rows * dim * 4
        if size != expected:
            raise MsslFormatError(
                bin_path, f"has {size} bytes; shape.txt's {n_rows} x {dim} float32 needs {expected}"
            )
        return cls(directory, names, dim)

    def row_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def read_rows(self, rows: Sequence[int]) -> np.ndarray:
        """Rows in the given order as (len(rows), D) float32 (memory-mapped: only these rows are read)."""
        data = np.memmap(
            self.directory / "feature.bin", dtype="<f4", mode="r", shape=(len(self.names), self.dim)
        )
        return np.asarray(data[np.asarray(rows, dtype=np.int64)], dtype=np.float32)


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("iso-8859-1")
    except FileNotFoundError:
        raise MsslFormatError(path, "file not found") from None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise MsslFormatError(path, "file not found") from None


def _read_shape(path: Path) -> tuple[int, int]:
    fields = (_read_text(path).splitlines() or [""])[0].split()
    if len(fields) != 2 or not all(f.isdigit() for f in fields) or int(fields[1]) == 0:
        raise MsslFormatError(
            path, f"first line must be 'N D' (row count, positive dim), got {' '.join(fields)!r}"
        )
    return int(fields[0]), int(fields[1])


def read_video2frames(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Parse the video -> row names dict literal safely (`ast.literal_eval`; the original code `eval`s it)."""
    path = Path(path)
    try:
        value = ast.literal_eval(_read_text(path).strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise MsslFormatError(path, f"not a Python dict literal of video id -> row names ({exc})") from None
    if not isinstance(value, dict):
        raise MsslFormatError(path, f"must hold a dict, got {type(value).__name__}")
    for video_id, frames in value.items():
        ok = isinstance(frames, list | tuple) and all(isinstance(f, str) for f in frames)
        if not isinstance(video_id, str) or not ok:
            raise MsslFormatError(
                path, f"entry {video_id!r} must map a video id string to a list of row names"
            )
    return {video_id: list(frames) for video_id, frames in value.items()}


@dataclass(frozen=True)
class BundlePaths:
    """Where one collection's files are, checked to exist before the import starts."""

    collection_dir: Path
    feature_dir: Path
    captions: dict[str, Path]  # split -> caption file (only the splits present)
    query_hdf5: Path


def locate_bundle(root: str | os.PathLike[str], collection: str, feature: str) -> BundlePaths:
    if collection not in COLLECTIONS:
        raise ValueError(f"unknown MS-SL collection {collection!r}; known: {', '.join(COLLECTIONS)}")
    root = Path(root)
    base = root if (root / "FeatureData").is_dir() and not (root / collection).is_dir() else root / collection
    feature_dir = base / "FeatureData" / feature
    if not feature_dir.is_dir():
        found = sorted(p.name for p in (base / "FeatureData").glob("*") if p.is_dir())
        raise MsslFormatError(feature_dir, f"feature folder not found (found: {', '.join(found) or 'none'})")
    text = base / "TextData"
    captions = {s: text / f"{collection}{s}.caption.txt" for s in SPLITS}
    captions = {s: p for s, p in captions.items() if p.is_file()}
    if not captions:
        raise MsslFormatError(text, f"no caption file {collection}{{train,val,test}}.caption.txt")
    hdf5 = text / f"roberta_{collection}_query_feat.hdf5"
    if not hdf5.is_file():
        raise MsslFormatError(hdf5, "query feature file not found")
    return BundlePaths(base, feature_dir, captions, hdf5)


@dataclass
class MsslImport:
    """What an import stored and what it left out, with reasons (nothing is dropped silently)."""

    collection: str
    feature: str
    store: str
    visual_fingerprint: str
    text_fingerprint: str | None
    videos_imported: int = 0
    videos_already_present: int = 0
    videos_skipped: list[dict[str, str]] = field(default_factory=list)  # {"video_id", "reason"}
    queries_imported: int = 0
    queries_already_present: int = 0
    queries_skipped: list[dict[str, str]] = field(default_factory=list)  # {"query_id", "reason"}
    captions_without_video: list[dict[str, str]] = field(default_factory=list)  # {"query_id", "video_id"}
    text_conflicts: list[dict[str, str]] = field(default_factory=list)  # same text, different features
    caption_lines_skipped: list[dict[str, Any]] = field(default_factory=list)  # malformed caption lines
    splits: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> {"queries", "videos"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _content_sha256(features: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(features, dtype="<f4").tobytes()).hexdigest()


def _video_rows(
    bigfile: BigFile, video2frames: dict[str, list[str]], report: MsslImport
) -> Iterator[tuple[str, np.ndarray]]:
    """(video id, rows) for every video whose rows are all present and finite; the others go to the report."""
    index = bigfile.row_index()
    for video_id, frames in video2frames.items():
        missing = [f for f in frames if f not in index]
        if not frames or missing:
            reason = (
                "video2frames.txt lists no rows"
                if not frames
                else f"{len(missing)} of {len(frames)} rows missing from id.txt (first: {missing[0]!r})"
            )
            report.videos_skipped.append({"video_id": video_id, "reason": reason})
            continue
        rows = bigfile.read_rows([index[f] for f in frames])
        if not np.isfinite(rows).all():
            report.videos_skipped.append({"video_id": video_id, "reason": "non-finite values in feature.bin"})
            continue
        yield video_id, rows


def _import_videos(
    store: FeatureStore,
    fp: str,
    bigfile: BigFile,
    video2frames: dict[str, list[str]],
    report: MsslImport,
    *,
    attrs: dict[str, Any],
    seconds_per_row: float,
) -> set[str]:
    """Write every usable video, a bounded batch at a time in parallel threads; returns the ids now stored."""
    known = store.resolve_video_ids(fp, list(video2frames))
    imported: set[str] = set()

    def write(item: tuple[str, np.ndarray]) -> bool:
        video_id, rows = item
        sha = _content_sha256(rows)
        if known.get(video_id) == sha and store.has_video(sha, fp):
            return False
        start = np.arange(len(rows), dtype=np.float64) * seconds_per_row
        times = np.stack([start, start + seconds_per_row], axis=1)
        store.write_video(sha, fp, rows, times, video_id=video_id, attrs=attrs)
        return True

    videos = _video_rows(bigfile, video2frames, report)
    with ThreadPoolExecutor(_WRITE_THREADS) as pool:
        while batch := list(islice(videos, _BATCH)):  # a whole bundle's rows would not fit in memory
            for (video_id, _), wrote in zip(batch, pool.map(write, batch), strict=True):
                imported.add(video_id)
                report.videos_imported += wrote
                report.videos_already_present += not wrote
    return imported


def _read_captions(paths: BundlePaths, report: MsslImport) -> list[QueryRecord]:
    queries: list[QueryRecord] = []
    for split, path in paths.captions.items():
        annotations: AnnotationSet = read_annotations(path, format="mssl", skip_malformed=True, split=split)
        report.caption_lines_skipped += [asdict(s) for s in annotations.skipped]
        report.splits[split] = {"queries": len(annotations), "videos": len(annotations.video_ids())}
        queries += annotations.queries
    return queries


def _query_features(hdf5: h5py.File, path: Path, query: QueryRecord, dim: int | None) -> np.ndarray | str:
    """The caption's (n_tokens, D) features, or why it has none."""
    node = hdf5.get(query.query_id)
    if not isinstance(node, h5py.Dataset):
        return f"no dataset {query.query_id!r} in {path.name}"
    data = np.asarray(node[()], dtype=np.float32)
    if data.ndim != 2 or data.shape[0] == 0 or (dim is not None and data.shape[1] != dim):
        return f"dataset shape {data.shape} is not (n_tokens, {dim or 'D'})"
    if not np.isfinite(data).all():
        return "non-finite values"
    return data


def _import_queries(
    store: FeatureStore, paths: BundlePaths, queries: list[QueryRecord], report: MsslImport, collection: str
) -> None:
    """Write each distinct caption text's token features once, a batch at a time; gaps and conflicts are
    reported (equal texts are one entry, so a second caption with other features keeps the first's)."""
    seen: dict[str, tuple[str, str]] = {}  # text -> (first query id, digest of its features)
    fp: str | None = None
    dim: int | None = None
    with h5py.File(paths.query_hdf5, "r") as hdf5:
        for start in range(0, len(queries), _BATCH):
            batch: dict[str, np.ndarray] = {}
            for query in queries[start : start + _BATCH]:
                data = _query_features(hdf5, paths.query_hdf5, query, dim)
                if isinstance(data, str):
                    report.queries_skipped.append({"query_id": query.query_id, "reason": data})
                    continue
                dim, digest = data.shape[1], _content_sha256(data)
                first_id, first_digest = seen.setdefault(query.text, (query.query_id, digest))
                if first_id == query.query_id:
                    batch[query.text] = data
                elif first_digest != digest:
                    report.text_conflicts.append(
                        {"query_id": query.query_id, "kept": first_id, "text": query.text}
                    )
            if not batch:
                continue
            if fp is None:
                fp = report.text_fingerprint = f"mssl-{collection}-roberta-{dim}"
                config = {
                    "source": "mssl",
                    "collection": collection,
                    "model": "roberta",
                    "file": paths.query_hdf5.name,
                }
                store.register_extractor(fp, kind="text", dim=int(dim), config=config)
            texts = list(batch)
            todo = [t for t, present in zip(texts, store.has_queries(fp, texts), strict=True) if not present]
            store.write_queries(fp, todo, [batch[t] for t in todo])
            report.queries_imported += len(todo)
            report.queries_already_present += len(texts) - len(todo)


def import_mssl(
    root: str | os.PathLike[str],
    collection: str,
    feature: str,
    store: FeatureStore,
    *,
    seconds_per_row: float = 1.0,
) -> MsslImport:
    """Import one collection's visual feature set and query features, then pack both for fast bulk reads."""
    if not np.isfinite(seconds_per_row) or seconds_per_row <= 0:
        raise ValueError(f"seconds_per_row must be a positive number, got {seconds_per_row!r}")
    paths = locate_bundle(root, collection, feature)
    bigfile = BigFile.open(paths.feature_dir)
    video2frames = read_video2frames(paths.feature_dir / "video2frames.txt")
    fp = f"mssl-{collection}-{feature}-{bigfile.dim}"
    report = MsslImport(collection, feature, store.url, fp, None)
    queries = _read_captions(paths, report)
    config = {
        "source": "mssl",
        "collection": collection,
        "feature": feature,
        "seconds_per_row": seconds_per_row,
    }
    store.register_extractor(fp, kind="visual", dim=bigfile.dim, config=config)
    attrs = {
        "source": "mssl",
        "collection": collection,
        "feature": feature,
        "times": f"row index x {seconds_per_row:g} s (the bundle has no timestamps)",
    }
    imported = _import_videos(
        store, fp, bigfile, video2frames, report, attrs=attrs, seconds_per_row=seconds_per_row
    )
    report.captions_without_video = [
        {"query_id": q.query_id, "video_id": q.video_id} for q in queries if q.video_id not in imported
    ]
    _import_queries(store, paths, queries, report, collection)
    store.pack(fp)
    if report.text_fingerprint:
        store.pack(report.text_fingerprint)
    log.info(
        "imported %d videos (%d skipped) and %d query texts (%d captions skipped) into %s",
        report.videos_imported + report.videos_already_present,
        len(report.videos_skipped),
        report.queries_imported + report.queries_already_present,
        len(report.queries_skipped),
        store.url,
    )
    return report
