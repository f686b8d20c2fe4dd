"""Everything `mamfusion serve` does except HTTP: which model to serve and when to switch to a newer one,
micro-batching of concurrent queries, video lookup by id, byte ranges, thumbnails and browser previews.

`flows/serve.py` maps these onto routes. Keeping them here keeps the web framework out of `tasks/` and lets
the tests and the benchmark drive the same objects the server uses.

Safety rules that live here rather than in the routes:
- a request never names a file: a video id is looked up in the served index (and the catalog), and only
  paths those records hold are opened;
- the model folder, the index and the videos are only read; thumbnails and previews are cached in memory;
- the work queue is bounded: past `max_pending` queued queries a search is refused (`BusyError`, HTTP 503)
  instead of queueing without limit.
"""

from __future__ import annotations

import io
import logging
import math
import mimetypes
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from storage.catalog import Catalog, VideoRecord, read_frame_times
from storage.errors import MamFusionError
from storage.index import VideoIndex
from storage.registry import CONFIG_FILE, ModelDir, ModelRegistry, RegistryError
from tasks.scan import Kernel
from tasks.search import MAX_QUERY_CHARS, Hit, QueryError, Searcher, default_index_url

log = logging.getLogger(__name__)

MAX_K = 100  # as the CLI's limits: a page of results, not a dump of the index
MAX_QUERIES_PER_REQUEST = 100
DEFAULT_MAX_BATCH = 64  # queries per `search` call; a request larger than this still runs whole
DEFAULT_MAX_PENDING = 256  # queued queries before searches are refused with 503
RELOAD_RETRY_S = 30.0  # a version that failed to load is tried again after this long (or when it changes)
PREVIEW_MAX_SECONDS = 30.0
_VIDEO_ID = re.compile(r"[A-Za-z0-9._-]{1,255}")  # storage.catalog's id alphabet

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


# ------------------------------------------------------------------------------------------------ errors
class ServeError(MamFusionError):
    """A request the server cannot answer as asked; the message says why (HTTP 422 unless a subclass)."""


class VideoNotFoundError(ServeError):
    """No such video in the served index (or its file is gone): HTTP 404."""


class NoModelError(ServeError):
    """No model is loaded yet (nothing published, or the current one failed to load): HTTP 503."""


class BusyError(ServeError):
    """The search queue is full or the server is stopping: HTTP 503, try again shortly."""


class BadRequestError(ServeError):
    """A parameter outside its limits (k, number of queries, a time): HTTP 400."""


class RangeNotSatisfiableError(ServeError):
    """A byte range that starts past the end of the file: HTTP 416."""

    def __init__(self, size: int) -> None:
        super().__init__(f"requested range starts past the end ({size} bytes)")
        self.size = size


# ------------------------------------------------------------------------------------------------ caches
class LRUCache(Generic[K, V]):
    """Thread-safe LRU bounded by entry count and by total `size(value)` (bytes for media)."""

    def __init__(
        self, max_entries: int, max_bytes: int | None = None, size: Callable[[V], int] = len
    ) -> None:
        self.max_entries, self.max_bytes, self._size = max_entries, max_bytes, size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: K) -> V | None:
        with self._lock:
            if key not in self._items:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: K, value: V) -> None:
        n = self._size(value)
        if self.max_bytes is not None and n > self.max_bytes:
            return  # larger than the whole cache: serve it, do not keep it
        with self._lock:
            if key in self._items:
                self._bytes -= self._size(self._items.pop(key))
            self._items[key] = value
            self._bytes += n
            while len(self._items) > self.max_entries or (
                self.max_bytes is not None and self._bytes > self.max_bytes
            ):
                _, old = self._items.popitem(last=False)
                self._bytes -= self._size(old)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._items),
                "bytes": self._bytes,
                "hits": self.hits,
                "misses": self.misses,
            }


# ----------------------------------------------------------------------------------------- model source
@dataclass(frozen=True)
class ModelSource:
    """What `--model` named: one version folder (served as is) or a models folder whose `current` moves."""

    path: Path
    registry: ModelRegistry | None
    catalog_path: Path | None

    @classmethod
    def from_path(
        cls, path: str | os.PathLike[str], catalog: str | os.PathLike[str] | None = None
    ) -> ModelSource:
        """Recognise the folder by its contents, as `resolve_model_dir` does, but keep the registry so a newer
        `current` can be picked up later. A models/output folder with nothing published yet is accepted (the
        server says "no model yet" until the pipeline publishes one)."""
        p = Path(path)
        if not p.is_dir():
            raise RegistryError(f"{p}: no such model folder")
        registry: ModelRegistry | None
        if (p / CONFIG_FILE).is_file():
            registry = None
            near = p.parent.parent / "catalog.json" if (p.parent / "current").is_file() else None
        elif (p / "current").is_file():
            registry, near = ModelRegistry(p), p.parent / "catalog.json"
        elif (p / "models").is_dir() or (p / "catalog.json").is_file():
            registry, near = ModelRegistry(p / "models"), p / "catalog.json"
        else:
            raise RegistryError(
                f"{p}: not a model: expected a version folder ({CONFIG_FILE}), a models folder with "
                "`current`, or a pipeline output folder (models/, catalog.json)"
            )
        chosen = Path(catalog) if catalog is not None else near
        if catalog is not None and not chosen.is_file():
            raise ServeError(f"{chosen}: no such catalog file")
        return cls(p, registry, chosen)

    def current(self) -> ModelDir | None:
        """The model to serve now (None before the first publish)."""
        return ModelDir(self.path) if self.registry is None else self.registry.current()

    def describe(self) -> str:
        return (
            f"version folder {self.path}" if self.registry is None else f"models folder {self.registry.path}"
        )


@dataclass(frozen=True)
class IndexState:
    """What identifies one state of an index cheaply (no vectors read): a change means reload."""

    model_fingerprint: str
    count: int
    complete: bool
    stamp: int  # mtime_ns of the local index's zarr.json (rewritten by every build); 0 elsewhere


def index_state(url: str) -> IndexState:
    """Open the index read-only and read its attributes; raises the index's own errors when it is absent."""
    index = VideoIndex.open(url)
    stamp = 0
    if "://" not in url or url.startswith("file://"):
        try:
            stamp = (Path(url.removeprefix("file://")) / "zarr.json").stat().st_mtime_ns
        except OSError:
            stamp = 0
    return IndexState(index.model_fingerprint, index.count, index.complete, stamp)


@dataclass(frozen=True)
class Served:
    """One loaded model with its index, as requests see it. Replaced whole on a swap, never changed."""

    searcher: Searcher
    model: ModelDir
    index_url: str
    state: IndexState
    videos: dict[str, str]  # alive video id -> path recorded in the index
    loaded_at: float

    @property
    def version(self) -> str:
        return self.model.version


Loader = Callable[[ModelDir, str], Searcher]


def default_loader(kernel: Kernel = "auto") -> Loader:
    """Searcher.from_model_dir with the scoring kernel chosen on the command line."""

    def load(model: ModelDir, index_url: str) -> Searcher:
        return Searcher.from_model_dir(model, index_url, kernel=kernel)

    return load


class LiveModel:
    """The served model, switched to a newer `current` (or a rebuilt index) without a restart.

    A background thread polls every `poll_s` seconds: reading `current` and the index's attributes costs a
    few file reads. A change loads the new Searcher beside the old one and then replaces one reference, so
    every batch runs wholly on one model and batches already running finish on the old one. A new version
    whose index is still being built (the pipeline moves `current` before it indexes) is not swapped in
    until the index is complete; a version that fails to load leaves the old one serving.
    """

    def __init__(self, source: ModelSource, loader: Loader | None = None, *, poll_s: float = 2.0) -> None:
        self.source = source
        self.loader = loader or default_loader()
        self.poll_s = poll_s
        self._served: Served | None = None
        self._problem: str | None = None
        self._failed: tuple[tuple[str, IndexState], float] | None = None
        self._check_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swaps = 0

    def get(self) -> Served | None:
        return self._served

    @property
    def problem(self) -> str | None:
        """Why nothing (or not the newest model) is served, for the status page; None when all is well."""
        return self._problem

    def load_initial(self) -> None:
        """Load what `current` names now; errors propagate (the command line reports them, exit 2).

        Nothing published yet in a models folder is not an error: the server starts and waits for it.
        """
        model = self.source.current()
        if model is None:
            self._problem = f"no model has been published yet in {self.source.describe()}"
            return
        url = default_index_url(model)
        self._install(model, url, index_state(url))

    def check(self) -> bool:
        """One poll; True when it swapped in a new model or index. Never raises: problems go to `problem`."""
        with self._check_lock:
            try:
                model = self.source.current()
                if model is None:
                    if self._served is None:
                        self._problem = f"no model has been published yet in {self.source.describe()}"
                    return False
                url = default_index_url(model)
                state = index_state(url)
            except MamFusionError as exc:
                self._problem = str(exc)
                return False
            except Exception as exc:  # a half-written attribute file, a vanished folder: try again next poll
                self._problem = f"cannot read the current model: {type(exc).__name__}: {exc}"
                return False
            served = self._served
            key = (str(model.path), state)
            if served is not None and (str(served.model.path), served.state) == key:
                return False
            if served is not None and not state.complete:
                self._problem = (
                    f"version {model.version}: its index is being built; still serving {served.version}"
                )
                return False
            if (
                self._failed
                and self._failed[0] == key
                and time.monotonic() - self._failed[1] < RELOAD_RETRY_S
            ):
                return False
            try:
                self._install(model, url, state)
            except Exception as exc:
                if not isinstance(exc, MamFusionError):
                    log.exception("loading version %s failed", model.version)
                self._failed = (key, time.monotonic())
                still = f"; still serving {served.version}" if served else ""
                self._problem = f"version {model.version} failed to load: {exc}{still}"
                return False
            return True

    def _install(self, model: ModelDir, url: str, state: IndexState) -> None:
        searcher = self.loader(model, url)
        scanner = searcher.scanner
        alive = np.asarray(scanner.alive, dtype=bool)
        videos = {
            str(vid): str(path)
            for vid, path, ok in zip(scanner.video_ids, scanner.paths, alive, strict=True)
            if ok
        }
        old = self._served
        self._served = Served(searcher, model, url, state, videos, time.time())  # the swap: one assignment
        self._problem, self._failed = None, None
        if old is not None:
            self.swaps += 1
            log.info("now serving version %s (was %s), %d videos", model.version, old.version, len(videos))

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mamfusion-model-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check()


# ------------------------------------------------------------------------------------------ micro-batching
@dataclass(frozen=True)
class Answer:
    """One request's hits and the model that produced them."""

    served: Served
    hits: list[list[Hit]]


@dataclass
class _Job:
    texts: list[str]
    k: int
    future: Future[Answer] = field(default_factory=Future)


class SearchBatcher:
    """Runs every query queued while the previous `search` call ran in one call (up to `max_batch`).

    Scoring a batch reads the index once for all its queries, so under load a query costs a fraction of a
    single search; with one client there is no waiting for company, a lone query runs at once. The queue holds
    at most `max_pending` queries: beyond that `submit` raises `BusyError` rather than queueing without bound.

    Convoys: when a batch of N returns, its N clients send their next queries a few milliseconds later, but
    the queries that arrived meanwhile would start a scan without them, and the N would wait for it: batches
    then alternate (1, N-1, 1, ... or two halves) and scans serve a fraction of the load each. So the next
    batch waits for the last batch's clients to come back: up to `linger_s` (and at most a quarter of the last
    scan's time), until what was queued when it finished plus its size is queued. A lone client never waits:
    nothing was queued behind its query, and its one query is back at once.
    """

    def __init__(
        self,
        live: LiveModel,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_pending: int = DEFAULT_MAX_PENDING,
        linger_s: float = 0.05,
    ) -> None:
        self.live, self.max_batch, self.max_pending, self.linger_s = live, max_batch, max_pending, linger_s
        self._pending: deque[_Job] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="mamfusion-search", daemon=True)
        self._expect, self._last_s = 0, 0.0  # queries the next batch waits for, the last scan's seconds
        self.batches = self.queries = self.largest = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def pending(self) -> int:
        """Queries waiting for the search thread (not counting the batch it runs now)."""
        return self._queued

    def submit(self, texts: Sequence[str], k: int) -> Future[Answer]:
        job = _Job(list(texts), k)
        with self._cond:
            if self._stopped:
                raise BusyError("the server is shutting down")
            if self._queued + len(job.texts) > self.max_pending:
                raise BusyError(
                    f"the server is busy: {self._queued} queries are queued (limit {self.max_pending}); "
                    "retry in a moment"
                )
            self._pending.append(job)
            self._queued += len(job.texts)
            self._cond.notify()
        return job.future

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._pending and not self._stopped:
                self._cond.wait()
            want = min(self.max_batch, self._expect)
            deadline = time.monotonic() + min(self.linger_s, self._last_s / 4)
            while self._queued < want and not self._stopped and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            if self._stopped:
                for job in self._pending:
                    job.future.set_exception(BusyError("the server is shutting down"))
                self._pending.clear()
                return None
            jobs = [self._pending.popleft()]
            n = len(jobs[0].texts)
            while self._pending and n + len(self._pending[0].texts) <= self.max_batch:
                jobs.append(self._pending.popleft())
                n += len(jobs[-1].texts)
            self._queued -= n
        # a request whose client went away was cancelled: skip its queries
        return [job for job in jobs if job.future.set_running_or_notify_cancel()]

    def _run(self) -> None:
        while (jobs := self._take()) is not None:
            if jobs:
                self._answer(jobs)

    def _answer(self, jobs: list[_Job]) -> None:
        served = self.live.get()
        if served is None:
            error = NoModelError(f"no model is loaded: {self.live.problem or 'none published yet'}")
            for job in jobs:
                job.future.set_exception(error)
            return
        texts = [t for job in jobs for t in job.texts]
        t0 = time.monotonic()
        try:
            hits = served.searcher.search(texts, max(job.k for job in jobs))
        except Exception as exc:
            self._expect = 0
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            for job in jobs:  # one bad request must not fail its batch-mates: answer each alone
                try:
                    job.future.set_result(Answer(served, served.searcher.search(job.texts, job.k)))
                except Exception as one:
                    job.future.set_exception(one)
            return
        with self._cond:  # before any answer goes out: the queue now holds only queries of other clients
            self._expect, self._last_s = self._queued + len(texts), time.monotonic() - t0
        self.batches += 1
        self.queries += len(texts)
        self.largest = max(self.largest, len(texts))
        start = 0
        for job in jobs:
            mine = hits[start : start + len(job.texts)]
            start += len(job.texts)
            job.future.set_result(Answer(served, [h[: job.k] for h in mine]))


# ------------------------------------------------------------------------------------------------ videos
@dataclass(frozen=True)
class VideoFile:
    """A served video: its id, the file the index (or catalog) records, and that file's identity now."""

    video_id: str
    path: str
    size: int
    mtime_ns: int
    record: VideoRecord | None

    @property
    def key(self) -> tuple[str, int, int]:
        """Cache key: a file replaced in place gets new thumbnails and previews."""
        return (self.path, self.size, self.mtime_ns)


@dataclass(frozen=True)
class StreamInfo:
    """What PyAV says about a file's first video stream; `mime` is set when browsers play it as is."""

    container: str
    codec: str
    duration: float | None
    fps: float | None
    width: int
    height: int
    mime: str | None


def browser_mime(container: str, codec: str) -> str | None:
    """The MIME type a browser plays this container/codec pair under, or None (then it gets a preview).

    Conservative on purpose: H.264/VP9/AV1 in MP4 and VP8/VP9/AV1 in WebM play in Chrome, Firefox and
    Safari alike; MPEG-4 Part 2, AVI, Matroska with H.264 and the rest do not everywhere.
    """
    names = set(container.split(","))
    if names & {"mp4", "mov"} and codec in {"h264", "vp9", "av1"}:
        return "video/mp4"
    if names & {"webm", "matroska"} and codec in {"vp8", "vp9", "av1"}:
        return "video/webm"
    return None


def probe_stream(path: str) -> StreamInfo:
    """Container, codec and stream facts from the file's headers (no frame decoded)."""
    import av

    try:
        with av.open(path, metadata_errors="ignore") as container:
            if not container.streams.video:
                raise ServeError(f"{Path(path).name}: no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            duration = None
            if container.duration:
                duration = float(container.duration) / 1e6
            elif stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            fps = float(stream.average_rate) if stream.average_rate else None
            fmt = container.format.name
            return StreamInfo(
                fmt, ctx.name, duration, fps, ctx.width, ctx.height, browser_mime(fmt, ctx.name)
            )
    except av.error.FFmpegError as exc:
        raise ServeError(f"{Path(path).name}: cannot be read ({exc})") from None


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive byte positions of a single `Range: bytes=...` request, None for the whole file.

    Headers we do not serve (other units, several ranges, malformed) are ignored, as RFC 9110 allows: the
    answer is then the whole file with 200. A range starting at or past the end raises
    `RangeNotSatisfiableError` (416).
    """
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header, re.ASCII | re.IGNORECASE)
    if m is None or (not m[1] and not m[2]):
        return None
    if not m[1]:  # suffix: the last N bytes
        n = int(m[2])
        if n == 0 or size == 0:
            raise RangeNotSatisfiableError(size)
        return max(0, size - n), size - 1
    first = int(m[1])
    if m[2] and int(m[2]) < first:
        return None
    if first >= size:
        raise RangeNotSatisfiableError(size)
    return first, min(int(m[2]) if m[2] else size - 1, size - 1)


def iter_file(path: str, first: int, last: int, chunk: int = 256 * 1024) -> Iterator[bytes]:
    """Bytes first..last (inclusive) of a file, in chunks, so a large video is never held in memory."""
    with open(path, "rb") as f:
        f.seek(first)
        left = last - first + 1
        while left > 0:
            block = f.read(min(chunk, left))
            if not block:
                return
            left -= len(block)
            yield block


# ---------------------------------------------------------------------------------------- frames/preview
def _check_time(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise BadRequestError(f"{name} must be a finite number of seconds >= 0, got {value}")
    return value


def grab_jpeg(path: str, t: float, width: int = 320, quality: int = 80) -> bytes:
    """The frame shown at `t` seconds (decord, the pipeline's decoder), scaled to `width`, as JPEG."""
    import decord
    from PIL import Image

    try:
        reader = decord.VideoReader(path, num_threads=1)
        starts = read_frame_times(reader).starts
        i = int(np.clip(np.searchsorted(starts, t, side="right") - 1, 0, len(reader) - 1))
        frame = reader[i].asnumpy()
    except (RuntimeError, ValueError) as exc:  # decord raises DECORDError, a RuntimeError
        raise ServeError(
            f"{Path(path).name}: no frame at {t:.2f} s ({str(exc).splitlines()[0][:200]})"
        ) from None
    image = Image.fromarray(frame)
    if image.width > width:
        image = image.resize((width, max(1, round(image.height * width / image.width))), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


@dataclass(frozen=True)
class Preview:
    """A short browser-playable clip of a span; `start`/`end` are the source seconds it covers."""

    data: bytes
    mime: str
    start: float
    end: float
    frames: int

    def __len__(self) -> int:
        return len(self.data)


def _preview_codec() -> tuple[str, str, str, dict[str, str], dict[str, str]]:
    """(encoder, container format, MIME, container options, encoder options): H.264 in fragmented MP4 (plays
    from memory without seeking back to write an index), else VP8 WebM where libx264 is not built in."""
    import av

    if "libx264" in av.codecs_available:
        frag = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}
        return "libx264", "mp4", "video/mp4", frag, {"preset": "ultrafast", "tune": "zerolatency"}
    return "libvpx", "webm", "video/webm", {}, {"deadline": "realtime", "cpu-used": "8"}


class _NoTimestamps(Exception):
    """A frame without a timestamp after a seek: its time cannot be known, so decode from the start."""


def transcode_span(path: str, start: float, end: float, width: int = 480) -> Preview:
    """Decode `start`..`end` seconds with PyAV and re-encode them small, for videos browsers cannot play.

    Frame times are the stream's own, counted from its first frame (as the catalog's decord times are); a
    stream without timestamps is timed by its nominal rate, decoding from the start instead of seeking.
    """
    import av

    try:
        try:
            return _transcode(path, start, end, width, seek=start > 1.0)
        except _NoTimestamps:
            return _transcode(path, start, end, width, seek=False)
    except (av.error.FFmpegError, IndexError, ZeroDivisionError) as exc:
        raise ServeError(f"{Path(path).name}: cannot make a preview ({exc})") from None


def _transcode(path: str, start: float, end: float, width: int, *, seek: bool) -> Preview:
    import av

    codec, fmt, mime, container_options, options = _preview_codec()
    out = io.BytesIO()
    frames, first, last_pts = 0, None, -1
    with av.open(path, metadata_errors="ignore") as src:
        stream = src.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or 25)
        tb = stream.time_base
        origin = float(stream.start_time * tb) if stream.start_time and tb else 0.0
        if seek and tb:
            src.seek(int((start + origin - 0.5) / tb), stream=stream, backward=True)
        w = max(2, min(width, stream.codec_context.width) // 2 * 2)
        h = max(2, round(stream.codec_context.height * w / stream.codec_context.width) // 2 * 2)
        with av.open(out, "w", format=fmt, options=container_options) as dst:
            enc = dst.add_stream(codec, rate=min(30, max(1, round(rate))))
            enc.width, enc.height, enc.pix_fmt = w, h, "yuv420p"
            enc.options = options
            enc.codec_context.time_base = Fraction(1, 1000)
            for n, frame in enumerate(src.decode(stream)):
                if frame.time is None and seek:
                    raise _NoTimestamps
                t = frame.time - origin if frame.time is not None else n / rate
                if t < start - 0.5 / rate:
                    continue
                if t >= end:
                    break
                first = t if first is None else first
                pts = round((t - first) * 1000)
                if pts <= last_pts:  # duplicate or reordered stamp: keep the stream monotonic
                    continue
                last_pts = pts
                small = frame.reformat(width=w, height=h, format="yuv420p")
                small.pts, small.time_base = pts, Fraction(1, 1000)
                for packet in enc.encode(small):
                    dst.mux(packet)
                frames += 1
            for packet in enc.encode():
                dst.mux(packet)
    if not frames or first is None:
        raise ServeError(f"{Path(path).name}: no frames between {start:.2f} and {end:.2f} s")
    return Preview(out.getvalue(), mime, max(0.0, first), end, frames)


# ----------------------------------------------------------------------------------------------- service
class _CatalogCache:
    """The pipeline's catalog, re-read when its file changes (a rescan replaces it atomically)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._catalog: Catalog | None = None
        self._lock = threading.Lock()

    def get(self) -> Catalog | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return self._catalog
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._catalog = Catalog.load(self.path)
                except (MamFusionError, OSError) as exc:
                    log.warning("catalog %s not reloaded: %s", self.path, exc)
                self._stamp = stamp
            return self._catalog


class SearchService:
    """The server's state: the live model, the batcher, the catalog and the media caches."""

    def __init__(
        self,
        source: ModelSource,
        *,
        loader: Loader | None = None,
        poll_s: float = 2.0,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_pending: int = DEFAULT_MAX_PENDING,
        linger_s: float = 0.05,
        thumbnail_cache_mb: int = 32,
        preview_cache_mb: int = 128,
    ) -> None:
        self.source = source
        self.live = LiveModel(source, loader, poll_s=poll_s)
        self.batcher = SearchBatcher(
            self.live, max_batch=max_batch, max_pending=max_pending, linger_s=linger_s
        )
        self.catalog = _CatalogCache(source.catalog_path)
        self.thumbnails: LRUCache[tuple[Any, ...], bytes] = LRUCache(4096, thumbnail_cache_mb << 20)
        self.previews: LRUCache[tuple[Any, ...], Preview] = LRUCache(256, preview_cache_mb << 20)
        self.streams: LRUCache[tuple[Any, ...], StreamInfo] = LRUCache(8192, size=lambda _: 1)
        self._decoding = threading.BoundedSemaphore(2)  # frames decoded at once: the scan needs the cores
        self._transcoding = threading.BoundedSemaphore(1)
        self.started = False

    # lifecycle
    def start(self) -> None:
        """Load the current model (errors propagate) and start the search and watch threads."""
        self.live.load_initial()
        self.batcher.start()
        self.live.start()
        self.started = True

    def close(self) -> None:
        self.live.stop()
        self.batcher.stop()

    # searching
    def served(self) -> Served:
        served = self.live.get()
        if served is None:
            raise NoModelError(f"no model is loaded: {self.live.problem or 'none published yet'}")
        return served

    def submit(self, texts: Sequence[str], k: int) -> Future[Answer]:
        """Check the request against the CLI's limits, then queue it for the next batch."""
        if not 1 <= k <= MAX_K:
            raise BadRequestError(f"k must be between 1 and {MAX_K}, got {k}")
        if len(texts) > MAX_QUERIES_PER_REQUEST:
            raise BadRequestError(
                f"{len(texts)} queries in one request; the limit is {MAX_QUERIES_PER_REQUEST}"
            )
        self.served().searcher.check_queries(texts)  # QueryError: empty, too long, not UTF-8
        return self.batcher.submit(texts, k)

    # videos
    def video(self, video_id: str) -> VideoFile:
        """The file of an indexed video. The id is only ever a dictionary key, never part of a path."""
        if not _VIDEO_ID.fullmatch(video_id) or video_id in {".", ".."}:
            raise VideoNotFoundError(f"no video {video_id[:80]!r} in the index")
        served = self.served()
        path = served.videos.get(video_id)
        if path is None:
            raise VideoNotFoundError(f"no video {video_id!r} in the index of version {served.version}")
        catalog = self.catalog.get()
        record = catalog.get(video_id) if catalog is not None and video_id in catalog else None
        for candidate in (path, record.path if record else ""):
            if candidate and os.path.isfile(candidate):
                st = os.stat(candidate)
                return VideoFile(video_id, candidate, st.st_size, st.st_mtime_ns, record)
        raise VideoNotFoundError(f"video {video_id!r}: its file is gone ({path or 'no path recorded'})")

    def stream(self, video: VideoFile) -> StreamInfo:
        info = self.streams.get(video.key)
        if info is None:
            info = probe_stream(video.path)
            self.streams.put(video.key, info)
        return info

    def video_info(self, video_id: str) -> dict[str, Any]:
        """Catalog metadata (duration, fps, size, frame size) plus codec and whether browsers play it."""
        video = self.video(video_id)
        rec = video.record
        try:
            stream: StreamInfo | None = self.stream(video)
            problem = None
        except ServeError as exc:
            stream, problem = None, str(exc)
        duration = rec.duration if rec and rec.duration else (stream.duration if stream else None)
        return {
            "video_id": video_id,
            "duration": duration,
            "fps": rec.fps if rec and rec.fps else (stream.fps if stream else None),
            "n_frames": rec.n_frames if rec else None,
            "width": rec.width if rec and rec.width else (stream.width if stream else None),
            "height": rec.height if rec and rec.height else (stream.height if stream else None),
            "size": video.size,
            "container": stream.container if stream else None,
            "codec": stream.codec if stream else None,
            "playable": bool(stream and stream.mime),
            "mime": media_type(video, stream),
            "source": "catalog" if rec else "probe",
            "error": problem,
        }

    def thumbnail(self, video_id: str, t: float) -> bytes:
        video = self.video(video_id)
        t = round(_check_time("t", t), 1)
        key = (*video.key, t)
        jpeg = self.thumbnails.get(key)
        if jpeg is None:
            with self._decoding:
                jpeg = grab_jpeg(video.path, t)
            self.thumbnails.put(key, jpeg)
        return jpeg

    def preview(self, video_id: str, start: float, end: float) -> Preview:
        video = self.video(video_id)
        start, end = round(_check_time("start", start), 1), round(_check_time("end", end), 1)
        if end <= start:
            raise BadRequestError(f"end ({end}) must be after start ({start})")
        end = min(end, start + PREVIEW_MAX_SECONDS)
        key = (*video.key, start, end)
        preview = self.previews.get(key)
        if preview is None:
            with self._transcoding:
                preview = self.previews.get(key) or transcode_span(video.path, start, end)
            self.previews.put(key, preview)
        return preview

    def status(self) -> dict[str, Any]:
        served = self.live.get()
        return {
            "status": "ok" if served else "no-model",
            "problem": self.live.problem,
            "source": self.source.describe(),
            "version": served.version if served else None,
            "model": str(served.model.path) if served else None,
            "index": served.index_url if served else None,
            "videos": len(served.videos) if served else 0,
            "index_complete": served.state.complete if served else None,
            "loaded_at": served.loaded_at if served else None,
            "swaps": self.live.swaps,
            "limits": {
                "k": MAX_K,
                "queries_per_request": MAX_QUERIES_PER_REQUEST,
                "query_chars": MAX_QUERY_CHARS,
            },
            "queue": {
                "pending": self.batcher.pending,
                "max_pending": self.batcher.max_pending,
                "max_batch": self.batcher.max_batch,
                "batches": self.batcher.batches,
                "queries": self.batcher.queries,
                "largest_batch": self.batcher.largest,
            },
            "caches": {"thumbnails": self.thumbnails.stats(), "previews": self.previews.stats()},
        }


def media_type(video: VideoFile, stream: StreamInfo | None) -> str:
    """Content-Type for the raw file: the playable type when known, else from the extension."""
    if stream is not None and stream.mime:
        return stream.mime
    guessed, _ = mimetypes.guess_type(video.path)
    return guessed or "application/octet-stream"


__all__ = [
    "MAX_K",
    "Answer",
    "BadRequestError",
    "BusyError",
    "LiveModel",
    "ModelSource",
    "NoModelError",
    "QueryError",
    "RangeNotSatisfiableError",
    "SearchBatcher",
    "SearchService",
    "ServeError",
    "VideoNotFoundError",
]
