"""Video catalog: which videos a folder holds, their content hash and the stream facts decord reports.

The catalog is the pipeline's source of truth for "what is new": features are keyed by content sha256, so a
re-scan that reports new / changed / removed videos lets retraining touch only new work. Probing runs decord
in a separate worker process, because decord can hang (holding the GIL) or crash natively on broken files; a
dead or stuck worker costs one video its metadata (recorded as an error), never the scan.

Width and height are those of the frames decord decodes. decord applies the container's rotation flag, so they
are the display orientation (a phone clip flagged 90° reports portrait size), which is what extractors see.
Duration and frame times come from `read_frame_times`, the one definition the decoder (`tasks.decode`) uses
too, so a catalogued duration is the length the feature rows cover. Running this file as a script starts the
probe worker (see `VideoProber`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import reprlib
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from storage.errors import MamFusionError, clean_reason

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".avi", ".mov", ".webm"})
ID_SEPARATOR = "__"  # joins folder names in a video id: videos/a/b.mp4 -> a__b
CATALOG_FORMAT = "mamfusion-catalog"
CATALOG_VERSION = 1
DEFAULT_PROBE_TIMEOUT = 120.0
PROGRESS_EVERY_S = 10.0  # a long scan logs how far it got this often
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_DOT_RUNS = re.compile(r"\.{2,}")
_SAFE_ID = re.compile(r"(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9._-]*")


class CatalogError(MamFusionError, ValueError):
    """A catalog file that cannot be trusted (bad JSON, wrong field type); names the file and the field."""


class VideoFolderError(MamFusionError, NotADirectoryError):
    """The folder to scan does not exist or is not a folder (still a NotADirectoryError: never retried)."""


class UnknownVideoError(KeyError):
    """A video id that the catalog cannot resolve to exactly one video."""

    def __str__(self) -> str:  # KeyError would print the repr of its message
        return str(self.args[0])


@dataclass(frozen=True)
class VideoRecord:
    """One video file: identity (id, path, hash), stream facts, and why it is unreadable if it is."""

    video_id: str
    path: str
    rel_path: str
    size: int
    mtime_ns: int
    sha256: str | None
    duration: float | None
    fps: float | None
    n_frames: int | None
    width: int | None
    height: int | None
    error: str | None

    @property
    def readable(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "readable": self.readable}


_RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "video_id": (str,),
    "path": (str,),
    "rel_path": (str,),
    "size": (int,),
    "mtime_ns": (int,),
    "sha256": (str, type(None)),
    "duration": (float, int, type(None)),
    "fps": (float, int, type(None)),
    "n_frames": (int, type(None)),
    "width": (int, type(None)),
    "height": (int, type(None)),
    "error": (str, type(None)),
}


@dataclass(frozen=True)
class VideoProbe:
    """What decoding a file told us; `error` set means it could not be read."""

    duration: float | None = None
    fps: float | None = None
    n_frames: int | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None


@dataclass
class Catalog:
    """All video files under `root`, sorted by relative path (build a new one rather than edit `videos`)."""

    root: str
    videos: list[VideoRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_id = {v.video_id: v for v in self.videos}
        if len(self._by_id) != len(self.videos):
            raise CatalogError(f"catalog of {self.root} has duplicate video ids")
        self._by_stem: dict[str, list[VideoRecord]] = {}
        for v in self.videos:
            self._by_stem.setdefault(Path(v.rel_path).stem, []).append(v)

    def __len__(self) -> int:
        return len(self.videos)

    def __contains__(self, video_id: object) -> bool:
        return video_id in self._by_id

    def get(self, video_id: str) -> VideoRecord:
        """The record with exactly this id (UnknownVideoError otherwise)."""
        try:
            return self._by_id[video_id]
        except KeyError:
            raise UnknownVideoError(f"no video with id {video_id!r} in the catalog of {self.root}") from None

    def resolve(self, video_id: str) -> VideoRecord:
        """The record an annotation's video id means: the exact id, else the one file whose stem is that id.

        Annotation files name videos by their dataset id (`v_GGSY1Qvo990`), which matches our id only when the
        file sits at the top of the folder; the stem match covers videos kept in sub-folders.
        """
        if video_id in self._by_id:
            return self._by_id[video_id]
        matches = self._by_stem.get(video_id, [])
        if len(matches) == 1:
            return matches[0]
        if matches:
            names = ", ".join(v.rel_path for v in matches)
            raise UnknownVideoError(f"video id {video_id!r} is ambiguous: it matches {names}")
        raise UnknownVideoError(f"no video with id or file stem {video_id!r} in the catalog of {self.root}")

    def readable(self) -> list[VideoRecord]:
        return [v for v in self.videos if v.readable]

    def unreadable(self) -> list[VideoRecord]:
        return [v for v in self.videos if not v.readable]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CATALOG_FORMAT,
            "version": CATALOG_VERSION,
            "root": self.root,
            "videos": [asdict(v) for v in self.videos],
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write JSON atomically: a crash mid-write never leaves a half catalog that a re-scan would trust."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Catalog:
        """Read a catalog written by `save`; CatalogError names the file and the offending field.

        Any content, even a video passed by mistake, gives a CatalogError; only I/O problems are OSErrors.
        """
        raw = Path(path).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise CatalogError(f"{path}:{line}: not a catalog: not UTF-8 text (a binary file?)") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CatalogError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        except RecursionError:
            raise CatalogError(f"{path}: not a catalog: JSON nested too deeply") from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise CatalogError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != CATALOG_FORMAT:
            raise CatalogError(f"{path}: not a MamFusion catalog (field 'format' is not {CATALOG_FORMAT!r})")
        if data.get("version") != CATALOG_VERSION:
            raise CatalogError(f"{path}: unsupported catalog version {data.get('version')!r}")
        if not isinstance(data.get("root"), str) or not isinstance(data.get("videos"), list):
            raise CatalogError(f"{path}: fields 'root' (string) and 'videos' (list) are required")
        return cls(data["root"], [_record_from_dict(path, i, v) for i, v in enumerate(data["videos"])])


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel = 60, 60, 3


def short_repr(value: Any) -> str:
    """A bounded repr for messages: a huge or deeply nested value in a file never floods or crashes them."""
    try:
        return _SHORT.repr(value)
    except (RecursionError, ValueError):  # ValueError: an int too long to print
        return f"<{type(value).__name__}>"


def _record_from_dict(path: str | os.PathLike[str], index: int, item: Any) -> VideoRecord:
    if not isinstance(item, dict):
        raise CatalogError(f"{path}: videos[{index}] is not an object")
    values = {}
    for f in fields(VideoRecord):
        value = item.get(f.name)
        where = f"{path}: videos[{index}].{f.name}"
        if f.name not in item or isinstance(value, bool) or not isinstance(value, _RECORD_TYPES[f.name]):
            raise CatalogError(f"{where} is missing or of the wrong type ({short_repr(value)})")
        if isinstance(value, int | float):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number) or number < 0:
                raise CatalogError(f"{where} must be a finite, non-negative number, got {short_repr(value)}")
            if f.name in ("duration", "fps"):
                value = number
        values[f.name] = value
    return VideoRecord(**values)


@dataclass
class ScanResult:
    """A scan's catalog and how it differs from the previous one (lists of video ids)."""

    catalog: Catalog
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    walk_errors: list[str] = field(default_factory=list)


# ---- frame times: shared with tasks.decode, so catalog durations and feature rows agree ----

TimestampSource = Literal["container", "nominal"]


@dataclass(frozen=True)
class FrameTimes:
    """When each frame starts (seconds from the first frame), how long the video lasts, and the source."""

    starts: np.ndarray  # (n,) float64, non-decreasing, starts[0] == 0
    duration: float  # starts[-1] + 1 / fps: the last frame is shown for one nominal frame interval
    source: TimestampSource


def stream_problem(n_frames: int, fps: float) -> str | None:
    """Why a stream cannot be timed (no frames, no frame rate), or None when it can."""
    if n_frames <= 0 or not math.isfinite(fps) or fps <= 0:
        return f"no usable video stream ({n_frames} frames, {fps:g} fps)"
    return None


def frame_times(stamps: Any, fps: float) -> FrameTimes:
    """Frame starts from the container's per-frame stamps, or i / fps where those cannot be trusted.

    Containers without presentation timestamps (AVI; any reordered stream in it) give decord AV_NOPTS_VALUE
    for some or all frames, which it scales to about -3e17 s: taken as is, a 3.4 s AVI was catalogued as
    lasting -307445750596370432 s. Stamps count only if every one is finite, the first is not negative and
    they never go back; otherwise the nominal rate times every frame (what AVI means anyway).
    """
    starts = np.asarray(stamps, dtype=np.float64).reshape(-1)
    problem = stream_problem(len(starts), fps)
    if problem:
        raise ValueError(problem)
    if np.all(np.isfinite(starts)) and starts[0] >= -1e-3 and np.all(np.diff(starts) >= 0):
        starts, source = starts - starts[0], "container"
    else:
        starts, source = np.arange(len(starts), dtype=np.float64) / fps, "nominal"
    return FrameTimes(starts, float(starts[-1] + 1.0 / fps), source)


def read_frame_times(reader: Any) -> FrameTimes:
    """`frame_times` of an open `decord.VideoReader` (start stamps of all its frames, its average rate)."""
    n, fps = len(reader), float(reader.get_avg_fps())
    problem = stream_problem(n, fps)
    if problem:
        raise ValueError(problem)
    stamps = np.asarray(reader.get_frame_timestamp(list(range(n))), dtype=np.float64).reshape(n, -1)
    return frame_times(stamps[:, 0], fps)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a temp file in the same folder, then `os.replace`: readers see the old or the new file."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Content hash read in chunks, so multi-GB videos never sit in memory."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_video_file(name: str) -> bool:
    return Path(name).suffix.lower() in VIDEO_EXTENSIONS


def find_videos(root: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """Relative POSIX paths of every video file under root (sorted), and the folders that could not be listed.

    Symlinked files are listed; symlinked folders are not followed (they can loop).
    """
    errors: list[str] = []
    found = []

    def on_error(exc: OSError) -> None:
        errors.append(f"{exc.filename}: {exc.strerror}")

    for folder, dirs, files in os.walk(root, onerror=on_error):
        dirs.sort()
        for name in files:
            if is_video_file(name):
                found.append(Path(folder, name).relative_to(root).as_posix())
    return sorted(found), errors


def _safe_part(part: str) -> str:
    """Accents dropped (café -> cafe), unsafe runs -> `_`, no `..`, no leading `.` or `-`, never empty."""
    text = "".join(c for c in unicodedata.normalize("NFKD", part) if not unicodedata.combining(c))
    text = _DOT_RUNS.sub(".", _UNSAFE_ID_CHARS.sub("_", text))
    return "_" + text[1:] if not text or text[0] in ".-" else text


def base_video_id(rel_path: str) -> str:
    """Id from the relative path minus extension: folders joined by `__`, only [A-Za-z0-9._-], never `..`."""
    parts = list(Path(rel_path).parts)
    parts[-1] = Path(parts[-1]).stem
    return ID_SEPARATOR.join(_safe_part(p) for p in parts)


def _short_hash(text: str, n: int) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


def assign_video_ids(rel_paths: Sequence[str], previous: Catalog | None = None) -> dict[str, str]:
    """Map each relative path to a unique id.

    A file listed in `previous` keeps the id it had there, so ids stay stable across re-scans. Other files get
    their base id, or `<base>-<hash of rel path>` when that is taken or shared (`clip.mp4` / `clip.mkv`,
    `a b.mp4` / `a_b.mp4`): deterministic, and never dependent on scan order.
    """
    present = set(rel_paths)
    old = {v.rel_path: v.video_id for v in previous.videos} if previous else {}
    ids = {rel: vid for rel, vid in old.items() if rel in present and _SAFE_ID.fullmatch(vid)}
    taken = set(ids.values())
    bases = {rel: base_video_id(rel) for rel in rel_paths if rel not in ids}
    groups: dict[str, int] = {}
    for base in bases.values():
        groups[base] = groups.get(base, 0) + 1
    for rel, base in bases.items():
        if groups[base] == 1 and base not in taken:
            ids[rel] = base
            continue
        hashed = f"{base}-{_short_hash(rel, 8)}"
        clash = hashed in taken or hashed in groups  # another file is literally named like that
        ids[rel] = f"{base}-{_short_hash(rel, 40)}" if clash else hashed
    return ids


def _stat(path: str) -> tuple[int, int, str | None]:
    """(size, mtime_ns, error): a broken symlink still gets a record with the reason."""
    try:
        st = os.stat(path)
    except OSError as exc:
        try:
            st = os.lstat(path)
        except OSError:
            return 0, 0, f"cannot stat: {exc.strerror}"
        return st.st_size, st.st_mtime_ns, f"cannot stat: {exc.strerror}"
    return st.st_size, st.st_mtime_ns, None


def scan_videos(
    root: str | os.PathLike[str],
    previous: Catalog | None = None,
    *,
    rehash: bool = False,
    probe_timeout: float = DEFAULT_PROBE_TIMEOUT,
    prober: VideoProber | None = None,
) -> ScanResult:
    """Catalog every video under root and compare it with `previous` (matched by relative path).

    A file whose (size, mtime_ns) match the previous record keeps its hash, unless `rehash`; a file whose hash
    is unchanged keeps its probe unless it was unreadable (then it is probed again). Every file found gets a
    record; problems go into `error`.
    Without `previous`, every video counts as new.
    """
    root_path = Path(root).absolute()
    if not root_path.is_dir():
        raise VideoFolderError(f"video folder {root_path} does not exist or is not a folder")
    rel_paths, walk_errors = find_videos(root_path)
    for err in walk_errors:
        logger.warning("cannot list folder %s", err)
    ids = assign_video_ids(rel_paths, previous)
    before = {v.rel_path: v for v in previous.videos} if previous else {}
    active = prober or VideoProber(timeout=probe_timeout)
    records = []
    last_report = time.monotonic()
    try:
        for rel in rel_paths:
            records.append(_catalog_one(root_path, rel, ids[rel], before.get(rel), active, rehash))
            if time.monotonic() - last_report > PROGRESS_EVERY_S:
                logger.info("catalogued %d of %d videos", len(records), len(rel_paths))
                last_report = time.monotonic()
    finally:
        if prober is None:
            active.close()
    result = ScanResult(Catalog(str(root_path), records), walk_errors=walk_errors)
    for record in records:
        old = before.get(record.rel_path)
        if old is None:
            result.new.append(record.video_id)
        elif _same_content(old, record):
            result.unchanged.append(record.video_id)
        else:
            result.changed.append(record.video_id)
    seen = set(rel_paths)
    result.removed = [v.video_id for v in before.values() if v.rel_path not in seen]
    n_bad = len(result.catalog.unreadable())
    logger.info("catalogued %d videos under %s (%d unreadable)", len(records), root_path, n_bad)
    return result


def _same_content(old: VideoRecord, new: VideoRecord) -> bool:
    """Equal hashes; a file that could not be hashed either time is the same only if size and mtime agree."""
    if old.sha256 is None and new.sha256 is None:
        return (old.size, old.mtime_ns) == (new.size, new.mtime_ns)
    return old.sha256 == new.sha256


def _catalog_one(
    root: Path, rel: str, video_id: str, old: VideoRecord | None, prober: VideoProber, rehash: bool
) -> VideoRecord:
    path = str(root / rel)
    size, mtime_ns, error = _stat(path)
    base = VideoRecord(video_id, path, rel, size, mtime_ns, None, None, None, None, None, None, error)
    if error is not None:
        return base
    known = old if old is not None and old.sha256 is not None and not rehash else None
    if known is not None and (known.size, known.mtime_ns) == (size, mtime_ns):
        digest = known.sha256
    else:
        try:
            digest = sha256_file(path)
        except OSError as exc:
            return replace(base, error=f"cannot read: {exc.strerror or exc}")
    if known is not None and known.sha256 == digest and known.readable:
        return replace(known, video_id=video_id, path=path, size=size, mtime_ns=mtime_ns)
    # New or changed content, or unreadable last time (a timeout or an older decoder may have been the cause).
    probe = prober.probe(path)
    if probe.error:
        logger.warning("unreadable video %s: %s", rel, probe.error)
    return replace(base, sha256=digest, **asdict(probe))


# ---- probing in a worker process ----


class VideoProber:
    """Probes videos with decord in a long-lived worker process, restarting it after a crash or a timeout.

    One worker serves many files (starting Python and decord per file would dominate small videos). `command`
    replaces the worker, which tests use to simulate hangs and crashes.
    """

    def __init__(self, timeout: float = DEFAULT_PROBE_TIMEOUT, command: Sequence[str] | None = None) -> None:
        self.timeout = timeout
        self.command = list(command or [sys.executable, "-P", os.path.abspath(__file__)])
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._buffer = b""

    def __enter__(self) -> VideoProber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def probe(self, path: str) -> VideoProbe:
        proc = self._start()
        assert proc.stdin is not None and self._log is not None
        # The log then holds this file's messages only. Seek first: truncating alone left the shared file
        # offset where the last file's messages ended, so the worker wrote after a hole of NUL bytes.
        self._log.seek(0)
        self._log.truncate()
        try:
            proc.stdin.write(json.dumps(path).encode("utf-8") + b"\n")
            proc.stdin.flush()
            reply = self._read_reply(proc)
        except (OSError, ValueError, _WorkerDied, TimeoutError) as exc:
            reason = self._failure_reason(exc, proc)
            self._stop()
            return VideoProbe(error=clean_reason(reason + _decoder_log(self._log_text())))
        probe = VideoProbe(**reply)
        if probe.error:
            probe = replace(probe, error=clean_reason(probe.error + _decoder_log(self._log_text())))
        return probe

    def close(self) -> None:
        self._stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            if self._log is None:
                self._log = tempfile.TemporaryFile(mode="w+b")  # noqa: SIM115 (lives as long as the prober)
                # O_APPEND: the worker always writes at the end, wherever we seek or truncate (mode "a" on
                # the descriptor tempfile opens does not set it)
                fd = self._log.fileno()
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
            self._buffer = b""
            self._proc = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, bufsize=0
            )
        return self._proc

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):  # the worker may already be gone
                proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def _read_reply(self, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        assert proc.stdout is not None
        deadline = time.monotonic() + self.timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    proc.kill()
                    raise TimeoutError
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise _WorkerDied
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        reply = json.loads(line)
        return {f.name: reply.get(f.name) for f in fields(VideoProbe)}

    def _failure_reason(self, exc: BaseException, proc: subprocess.Popen[bytes]) -> str:
        if isinstance(exc, TimeoutError):
            return f"probing timed out after {self.timeout:g} s (decoder hung)"
        if isinstance(exc, ValueError):
            proc.kill()
            return f"decoder process sent a malformed reply ({exc})"
        code = proc.wait()
        if code < 0:
            return f"decoder process crashed ({signal.Signals(-code).name})"
        return f"decoder process exited with code {code}"

    def _log_text(self) -> str:
        assert self._log is not None
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")


class _WorkerDied(Exception):
    pass


# "[00:20:10] /github/workspace/src/video/video_reader.cc:83: " and "[h264 @ 0x5636f086ee00] " prefixes
_LOG_NOISE = re.compile(r"\[\d\d:\d\d:\d\d\]\s*\S+:\d+:\s*|\[[^\]]* @ 0x[0-9a-f]+\]\s*")


def _decoder_log(text: str, keep: int = 3) -> str:
    """The last few distinct decoder log lines, cleaned, as context for an error."""
    lines = []
    for raw in text.splitlines():
        line = clean_reason(_LOG_NOISE.sub("", raw))
        if line and line not in lines:
            lines.append(line)
    return f" (decoder log: {'; '.join(lines[-keep:])})" if lines else ""


def probe_with_decord(path: str) -> VideoProbe:
    """Open with decord and decode the first and last frame, so truncated or corrupt streams show up here."""
    import decord

    try:
        reader = decord.VideoReader(path, num_threads=1)
        n_frames = len(reader)
        if n_frames <= 0:
            return VideoProbe(n_frames=n_frames, error="no video frames")
        fps = float(reader.get_avg_fps())
        problem = stream_problem(n_frames, fps)
        if problem:
            return VideoProbe(n_frames=n_frames, error=problem)
        duration = round(read_frame_times(reader).duration, 6)
        height, width = reader[0].shape[:2]
        facts = VideoProbe(duration, fps, n_frames, int(width), int(height))
        try:
            reader[n_frames - 1]
        except Exception as exc:  # decord raises its own DECORDError (a RuntimeError) or others
            reason = f"frame {n_frames - 1} of {n_frames} does not decode: {_error_text(exc)}"
            return replace(facts, error=reason)
        return facts
    except Exception as exc:
        return VideoProbe(error=_error_text(exc))


def _error_text(exc: BaseException) -> str:
    message = " ".join(_LOG_NOISE.sub("", line.strip()) for line in str(exc).splitlines() if line.strip())
    return clean_reason(f"{type(exc).__name__}: {message}")[:500]


def serve_probes(requests: Iterable[bytes], reply: IO[bytes]) -> None:
    """Worker loop: one JSON path per line in, one JSON probe per line out."""
    for line in requests:
        probe = probe_with_decord(json.loads(line))
        reply.write(json.dumps(asdict(probe)).encode("utf-8") + b"\n")
        reply.flush()


def _worker_main() -> None:
    # Native libraries may print to fd 1; keep the protocol on a private copy and send fd 1 to the log (fd 2).
    reply = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve_probes(sys.stdin.buffer, reply)


if __name__ == "__main__":
    _worker_main()
