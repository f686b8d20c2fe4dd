"""`mamfusion serve` (flows/serve.py, tasks/serve.py) through a real uvicorn server on a loopback port.

The fixture is a pipeline-like output folder: real few-second videos written with PyAV (H.264 MP4, VP9 WebM
and MPEG-4 Part 2 AVI, which browsers cannot play), a catalog scanned from them, random features, a tiny
random model and its index. Queries go through a deterministic hash encoder instead of a real text backbone
(installed with `Searcher.from_model_dir` monkeypatched, as tests/test_search.py does), except in the one
slow test that runs the `mamfusion serve` command in a subprocess with MiniLM.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

from flows import cli
from flows.serve import BackgroundServer, check_bind, create_app, is_loopback
from models.config import MamFusionConfig
from models.mamfusion import MamFusion
from storage.catalog import Catalog, scan_videos
from storage.feature_store import FeatureStore
from storage.registry import ExtractorSnapshot, FeatureSource, ModelRegistry
from tasks.scan import fused_paths
from tasks.search import Searcher, build_index
from tasks.serve import (
    LRUCache,
    ModelSource,
    RangeNotSatisfiableError,
    SearchBatcher,
    SearchService,
    default_loader,
    parse_range,
)

REPO = Path(__file__).resolve().parents[1]
VISUAL_FP, TEXT_FP = "visual-serve-test", "text-serve-test"
TINY = MamFusionConfig(visual_dim=16, query_dim=12, hidden_size=16, n_heads=2, max_ctx_l=40, max_desc_l=10)
SECONDS, FPS, ROW_S = 6.0, 10, 0.5
# (file name, PyAV encoder, container): what browsers play as is, and what they do not (MPEG-4 Part 2 AVI)
VIDEOS = [
    ("walk_h264.mp4", "libx264", "mp4"),
    ("door_vp9.webm", "libvpx-vp9", "webm"),
    ("cook_mpeg4.avi", "mpeg4", "avi"),
    ("dog_h264.mp4", "libx264", "mp4"),
]
QUERIES = ["a person opens the door", "dog runs on a beach", "someone cooks dinner in a kitchen"]


class HashTextEncoder:
    """Deterministic per-word token features, for a model whose text backbone is a test stand-in."""

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [
            np.stack(
                [np.random.default_rng(list(w.encode())).standard_normal(TINY.query_dim) for w in t.split()]
            )
            for t in texts
        ]


def write_video(path: Path, codec: str, fmt: str, seed: int) -> None:
    """A few seconds of moving colour: each frame differs, so a thumbnail at t names its frame."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, 3)
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        # one encoder thread: libvpx's automatic thread count failed with EINVAL late in a full test run
        stream.codec_context.thread_count = 1
        if codec.startswith("libvpx"):
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
        for i in range(int(SECONDS * FPS)):
            img = np.empty((96, 160, 3), np.uint8)
            img[:] = base
            img[..., 0] = 30 + 3 * i  # the red level follows time: a frame's time can be read back
            x = (i * 3) % 140
            img[20:76, x : x + 20] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _snapshot(fp: str, kind: str, dim: int) -> ExtractorSnapshot:
    return ExtractorSnapshot(fingerprint=fp, kind=kind, dim=dim, config={})


def write_videos_in_a_fresh_process(folder: Path) -> None:
    """The fixture files, encoded in a child process: late in a full test run (hundreds of tests in one
    process) libvpx's encoder init failed with EINVAL, which a fresh process never does."""
    script = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from test_serve import VIDEOS, write_video; "
        "[write_video(Path(sys.argv[2]) / n, c, f, i) for i, (n, c, f) in enumerate(VIDEOS)]"
    )
    env = os.environ | {"PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-c", script, str(REPO / "tests"), str(folder)], check=True, env=env, timeout=300
    )


class ServeGallery:
    """videos/ + a pipeline output folder (catalog.json, models/<version>/ with index, models/current)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.videos_dir = root / "videos"
        self.videos_dir.mkdir(parents=True)
        write_videos_in_a_fresh_process(self.videos_dir)
        self.output = root / "out"
        self.output.mkdir()
        self.catalog: Catalog = scan_videos(self.videos_dir).catalog
        assert not self.catalog.unreadable(), [v.error for v in self.catalog.unreadable()]
        self.catalog.save(self.output / "catalog.json")
        self.store = FeatureStore(str(root / "store"))
        self.store.register_extractor(VISUAL_FP, kind="visual", dim=TINY.visual_dim, config={"test": 1})
        rows = int(SECONDS / ROW_S)
        edges = np.arange(rows + 1) * ROW_S
        times = np.stack([edges[:-1], edges[1:]], 1)
        for i, rec in enumerate(self.catalog.videos):
            feats = np.random.default_rng(100 + i).standard_normal((rows, TINY.visual_dim)).astype(np.float32)
            self.store.write_video(rec.sha256, VISUAL_FP, feats, times, video_id=rec.video_id)
        self.registry = ModelRegistry(self.output / "models")
        self.publish("v1", seed=0)

    @property
    def ids(self) -> list[str]:
        return [v.video_id for v in self.catalog.videos]

    def record(self, suffix: str):
        return next(v for v in self.catalog.videos if v.path.endswith(suffix))

    def publish(self, version: str, seed: int, *, make_current: bool = True) -> Path:
        """A new version folder with its own weights and a complete index, then (optionally) `current`."""
        directory = self.registry.path / version
        torch.manual_seed(seed)
        MamFusion(TINY).save_pretrained(directory)
        source = FeatureSource(
            store=self.store.url,
            visual=_snapshot(VISUAL_FP, "visual", TINY.visual_dim),
            text=_snapshot(TEXT_FP, "text", TINY.query_dim),
            data_digest="test",
        )
        (directory / "features.json").write_text(source.model_dump_json())
        build_index(directory, self.store, catalog=self.catalog, dtype="float32")
        if make_current:
            self.registry.set_current(version)
        return directory

    def searcher(self, version: str) -> Searcher:
        return Searcher.from_model_dir(self.registry.path / version, kernel="matmul")


@contextmanager
def hash_text_encoder() -> Iterator[None]:
    """Searcher.from_model_dir builds its text encoder from features.json: swap in the hash encoder."""
    import tasks.search

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks.search, "text_encoder_from_info", lambda info, fp: HashTextEncoder())
        yield


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Iterator[ServeGallery]:
    with hash_text_encoder():
        yield ServeGallery(tmp_path_factory.mktemp("serve"))


@pytest.fixture
def text_encoder() -> Iterator[None]:
    with hash_text_encoder():
        yield


def make_service(model: Path | str, **kwargs: Any) -> SearchService:
    service = SearchService(ModelSource.from_path(model), loader=default_loader("matmul"), **kwargs)
    service.start()
    return service


@contextmanager
def running(
    model: Path | str, *, token: str | None = None, **kwargs: Any
) -> Iterator[tuple[Client, SearchService]]:
    service = make_service(model, **kwargs)
    with BackgroundServer(create_app(service, token=token)) as server:
        yield Client(server.port, token), service


class Client:
    """http.client against 127.0.0.1: sends paths exactly as written (no client-side normalisation)."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port, self.token = port, token

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            hdrs = dict(headers or {})
            if auth and self.token:
                hdrs["Authorization"] = f"Bearer {self.token}"
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                hdrs["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def get(self, path: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, **kwargs)

    def json(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        status, _, data = self.request(method, path, body)
        assert status == expect, (status, data[:500])
        return json.loads(data)


def expected(searcher: Searcher, texts: list[str], k: int) -> list[list[dict[str, Any]]]:
    """The in-process answer in its JSON form (tuples become lists, floats round-trip exactly)."""
    return json.loads(
        json.dumps([[dataclasses.asdict(h) for h in hits] for hits in searcher.search(texts, k)])
    )


def assert_same_hits(got: list[dict[str, Any]], want: list[dict[str, Any]], rel: float = 0.0) -> None:
    """Same videos, ranks, spans and profiles; scores equal (or within `rel` when batches differ)."""
    assert [h["video_id"] for h in got] == [h["video_id"] for h in want]
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in g:
            if rel and isinstance(w[key], float):
                assert g[key] == pytest.approx(w[key], rel=rel, abs=1e-6), key
            elif rel and key in ("profile", "clip_spans"):
                # profiles are rounded to 5 places: a difference in rounding can flip the last one
                atol = 1.5e-5 if key == "profile" else 1e-6
                np.testing.assert_allclose(np.asarray(g[key]), np.asarray(w[key]), rtol=rel, atol=atol)
            else:
                assert g[key] == w[key], key


# ----------------------------------------------------------------------------------------------- search
def test_search_answers_equal_the_in_process_searcher(gallery, text_encoder):
    searcher = gallery.searcher("v1")
    singles = [expected(searcher, [q], 4)[0] for q in QUERIES]  # one at a time, as each GET runs alone
    together = expected(searcher, QUERIES, 2)  # one batch, as the POST is scored
    with running(gallery.output) as (client, _):
        for q, per_query in zip(QUERIES, singles, strict=True):
            body = client.json("GET", f"/api/search?q={q.replace(' ', '+')}&k=4")
            assert body["version"] == "v1" and body["model"] == str(gallery.registry.path / "v1")
            assert body["index"] == str(gallery.registry.path / "v1" / "index.zarr")
            assert [r["query"] for r in body["results"]] == [q]
            assert_same_hits(body["results"][0]["hits"], per_query)
            assert [h["rank"] for h in body["results"][0]["hits"]] == [1, 2, 3, 4]
        body = client.json("POST", "/api/search", {"queries": QUERIES, "k": 2})
        assert [r["query"] for r in body["results"]] == QUERIES
        for result, per_query in zip(body["results"], together, strict=True):
            assert_same_hits(result["hits"], per_query)
        # the CLI's limits, each a 400 with the reason
        for path, reason in [
            ("/api/search?q=&k=3", "query 0 is empty"),
            ("/api/search?q=+++", "query 0 is empty"),
            (f"/api/search?q={'a' * 1001}", "1001 characters; the limit is 1000"),
            ("/api/search?q=dog&k=101", "k must be between 1 and 100"),
            ("/api/search?q=dog&k=0", "k must be between 1 and 100"),
        ]:
            status, _, data = client.get(path)
            assert status == 400 and reason in json.loads(data)["detail"], (path, data)
        status, _, data = client.request("POST", "/api/search", {"queries": ["dog"] * 101})
        assert status == 400 and "101 queries" in json.loads(data)["detail"]
        status, _, data = client.request("POST", "/api/search", {"queries": ["dog", " "]})
        assert status == 400 and "query 1 is empty" in json.loads(data)["detail"]
        assert client.get("/api/search?q=dog&k=x")[0] == 422  # not a number at all: the framework says so


@pytest.mark.parametrize(
    "kernel",
    [
        "matmul",
        pytest.param("fused", marks=pytest.mark.skipif(not fused_paths(), reason="extension not built")),
    ],
)
def test_concurrent_queries_are_micro_batched_and_each_gets_its_own_answer(
    gallery, text_encoder, kernel, tmp_path
):
    """Each answer is its query's alone, on both kernels (the server's default, fused, reads fp16 indexes),
    up to rounding: the query encoder's padded batch rounds differently from one query (the fused scan
    itself gives a query the same bits in any batch: tests/test_scan.py)."""
    model = gallery.registry.path / "v1"
    if kernel == "fused":  # the same model with an fp16 index (the kernel's format), as a version folder
        model = Path(shutil.copytree(model, tmp_path / "v1"))
        build_index(model, gallery.store, catalog=gallery.catalog, dtype="float16")
    searcher = Searcher.from_model_dir(model, kernel=kernel)
    texts = [f"{q} number {i}" for i, q in enumerate(QUERIES * 2)]
    want = [expected(searcher, [t], 3)[0] for t in texts]
    gate, entered = threading.Event(), threading.Event()

    def loader(model, url):
        s = default_loader(kernel)(model, url)
        search = s.search

        def gated(batch, k):
            entered.set()
            assert gate.wait(30)
            return search(batch, k)

        s.search = gated  # type: ignore[method-assign]
        return s

    source = ModelSource.from_path(model if kernel == "fused" else gallery.output)
    service = SearchService(source, loader=loader)
    service.start()
    with BackgroundServer(create_app(service)) as server, ThreadPoolExecutor(8) as pool:
        client = Client(server.port)
        first = pool.submit(client.json, "GET", "/api/search?q=warm+up&k=3")
        assert entered.wait(10)  # the search thread holds the first batch
        futures = [pool.submit(client.json, "POST", "/api/search", {"queries": [t], "k": 3}) for t in texts]
        deadline = time.monotonic() + 10
        while service.batcher.pending < len(texts):
            assert time.monotonic() < deadline, service.status()["queue"]
            time.sleep(0.01)
        gate.set()
        first.result(timeout=30)
        for future, t, w in zip(futures, texts, want, strict=True):
            body = future.result(timeout=30)
            assert body["results"][0]["query"] == t
            assert_same_hits(body["results"][0]["hits"], w, rel=1e-5)
        queue = client.json("GET", "/api/status")["queue"]
    assert queue["batches"] == 2 and queue["largest_batch"] == len(texts)  # 6 requests, one search call
    assert queue["queries"] == len(texts) + 1


def test_a_full_queue_answers_503_at_once(gallery, text_encoder):
    gate, entered = threading.Event(), threading.Event()

    def loader(model, url):
        s = default_loader("matmul")(model, url)
        search = s.search

        def gated(batch, k):
            entered.set()
            assert gate.wait(30)
            return search(batch, k)

        s.search = gated  # type: ignore[method-assign]
        return s

    service = SearchService(ModelSource.from_path(gallery.output), loader=loader, max_pending=2)
    service.start()
    with BackgroundServer(create_app(service)) as server, ThreadPoolExecutor(4) as pool:
        client = Client(server.port)
        running_one = pool.submit(client.get, "/api/search?q=first")
        assert entered.wait(10)
        queued = [pool.submit(client.get, f"/api/search?q=queued+{i}") for i in range(2)]
        while service.batcher.pending < 2:
            time.sleep(0.01)
        t0 = time.monotonic()
        status, headers, data = client.get("/api/search?q=one+too+many")
        assert status == 503 and time.monotonic() - t0 < 5
        assert headers["retry-after"] == "1" and "busy" in json.loads(data)["detail"]
        status, _, data = client.request("POST", "/api/search", {"queries": ["a", "b", "c"]})
        assert status == 503  # 3 more queries never fit behind 2 queued
        gate.set()
        assert running_one.result(timeout=30)[0] == 200
        assert [f.result(timeout=30)[0] for f in queued] == [200, 200]
        assert client.get("/api/search?q=room+again")[0] == 200


# ------------------------------------------------------------------------------------------------ media
def test_media_serves_bytes_with_ranges(gallery, text_encoder):
    rec = gallery.record(".mp4")
    data = Path(rec.path).read_bytes()
    size = len(data)
    with running(gallery.output) as (client, _):
        path = f"/media/{rec.video_id}"
        status, headers, body = client.get(path)
        assert status == 200 and body == data and headers["accept-ranges"] == "bytes"
        assert headers["content-type"] == "video/mp4" and headers["content-length"] == str(size)
        for header, (first, last) in [
            ("bytes=0-99", (0, 99)),
            ("bytes=100-", (100, size - 1)),
            ("bytes=-50", (size - 50, size - 1)),
            (f"bytes=10-{size + 500}", (10, size - 1)),  # clipped to the end
            (f"bytes={size - 1}-{size - 1}", (size - 1, size - 1)),
        ]:
            status, headers, body = client.get(path, headers={"Range": header})
            assert status == 206, header
            assert body == data[first : last + 1], header
            assert headers["content-range"] == f"bytes {first}-{last}/{size}"
            assert headers["content-length"] == str(last - first + 1)
        for header in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
            status, headers, _ = client.get(path, headers={"Range": header})
            assert status == 416 and headers["content-range"] == f"bytes */{size}", header
        for ignored in (
            "bytes=5-2",
            "items=0-5",
            "bytes=0-1,4-5",
            "bytes=abc",
        ):  # served whole, as RFC 9110 allows
            status, _, body = client.get(path, headers={"Range": ignored})
            assert status == 200 and body == data, ignored
        status, headers, body = client.request("HEAD", path, headers={"Range": "bytes=0-9"})
        assert (status, body, headers["content-length"]) == (206, b"", "10")
        webm = gallery.record(".webm")
        status, headers, body = client.get(f"/media/{webm.video_id}")
        assert status == 200 and headers["content-type"] == "video/webm"
        assert body == Path(webm.path).read_bytes()


def test_traversal_and_unknown_ids_are_404(gallery, text_encoder):
    secret = gallery.root / "secret.txt"
    secret.write_text("top secret")
    model_file = (gallery.registry.path / "v1" / "model.pt").read_bytes()[:64]
    relative = os.path.relpath(secret, REPO)
    paths = [
        "/media/..",
        "/media/%2e%2e",
        "/media/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/media/..%2F..%2Fsecret.txt",
        "/media/../../secret.txt",
        f"/media/{relative.replace('/', '%2f')}",
        f"/media/{secret.as_posix().replace('/', '%2F')}",
        "/media/nope",
        "/media/secret.txt",
        "/media/walk_h264.mp4",  # a file name, not an id
        "/media/%00",
        "/media/nope/preview?start=0&end=1",
        "/api/videos/%2e%2e%2fcatalog.json",
        "/api/videos/nope",
        "/api/thumbnail/..%2fsecret.txt?t=0",
        "/api/thumbnail/nope?t=1",
        "/static/../out/catalog.json",
        "/static/%2e%2e/serve.py",
        "/static/..%2fserve.py",
        "/static/%2e%2e%2f%2e%2e%2fpyproject.toml",
    ]
    with running(gallery.output) as (client, _):
        for path in paths:
            status, _, body = client.get(path)
            assert status == 404, (path, status, body[:200])
            assert b"top secret" not in body and model_file not in body and b"import " not in body, path
        assert client.get("/static/app.js")[0] == 200  # the static mount does serve its own files


def test_video_metadata_and_thumbnails(gallery, text_encoder):
    rec = gallery.record(".mp4")
    with running(gallery.output) as (client, service):
        info = client.json("GET", f"/api/videos/{rec.video_id}")
        assert info["duration"] == pytest.approx(rec.duration) and info["duration"] == pytest.approx(SECONDS)
        assert (info["fps"], info["size"], info["width"], info["height"]) == (rec.fps, rec.size, 160, 96)
        assert (info["codec"], info["playable"], info["mime"], info["source"]) == (
            "h264",
            True,
            "video/mp4",
            "catalog",
        )
        avi = client.json("GET", f"/api/videos/{gallery.record('.avi').video_id}")
        assert (avi["codec"], avi["playable"]) == ("mpeg4", False)
        assert client.json("GET", f"/api/videos/{gallery.record('.webm').video_id}")["codec"] == "vp9"

        frames = {}
        for t in (0.0, 3.0, 5.9, 60.0):  # past the end: the last frame
            status, headers, jpeg = client.get(f"/api/thumbnail/{rec.video_id}?t={t}")
            assert status == 200 and headers["content-type"] == "image/jpeg" and jpeg[:3] == b"\xff\xd8\xff"
            frames[t] = jpeg
        from PIL import Image

        red = {
            t: np.asarray(Image.open(io.BytesIO(j)).convert("RGB"))[5:15, :, 0].mean()
            for t, j in frames.items()
        }
        for t, frame in [(0.0, 0), (3.0, 30), (5.9, 59), (60.0, 59)]:  # past the end: the last frame
            assert red[t] == pytest.approx(30 + 3 * frame, abs=8), t
        misses = service.thumbnails.stats()["misses"]
        assert client.get(f"/api/thumbnail/{rec.video_id}?t=3.0")[2] == frames[3.0]
        stats = service.thumbnails.stats()
        assert stats["misses"] == misses and stats["hits"] >= 1  # served from the cache, not decoded again
        for bad in ("nan", "-1", "inf"):
            assert client.get(f"/api/thumbnail/{rec.video_id}?t={bad}")[0] == 400, bad


def test_preview_makes_unplayable_video_playable(gallery, text_encoder):
    rec = gallery.record(".avi")
    with running(gallery.output) as (client, _):
        path = f"/media/{rec.video_id}/preview?start=2.0&end=4.0"
        status, headers, data = client.get(path)
        assert status == 200 and headers["content-type"] == "video/mp4"
        assert float(headers["x-preview-start"]) == pytest.approx(2.0, abs=0.11)
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            frames = list(container.decode(stream))
        assert len(frames) == pytest.approx(2.0 * FPS, abs=1)  # exactly the span's frames
        red = np.asarray(frames[0].to_ndarray(format="rgb24"))[5:15, :, 0].mean()
        assert red == pytest.approx(30 + 3 * 20, abs=8)  # the first frame is frame 20 = 2.0 s
        status, headers, part = client.get(path, headers={"Range": "bytes=0-99"})
        assert status == 206 and part == data[:100] and headers["content-range"] == f"bytes 0-99/{len(data)}"
        assert client.get(f"/media/{rec.video_id}/preview?start=3&end=2")[0] == 400
        long = client.get(f"/media/{rec.video_id}/preview?start=0&end=1000")
        assert long[0] == 200  # capped at 30 s, and the video is shorter anyway


# ------------------------------------------------------------------------------------------------ safety
def test_token_is_required_on_api_and_media_when_set(gallery, text_encoder):
    rec = gallery.record(".mp4")
    with running(gallery.output, token="s3cret") as (client, _):
        protected = [
            "/api/search?q=dog",
            "/api/status",
            f"/api/videos/{rec.video_id}",
            f"/media/{rec.video_id}",
            f"/api/thumbnail/{rec.video_id}?t=1",
            f"/media/{rec.video_id}/preview?start=0&end=1",
        ]
        for path in protected:
            status, headers, _ = client.get(path, auth=False)
            assert status == 401 and headers["www-authenticate"] == "Bearer", path
            assert client.get(path, auth=False, headers={"Authorization": "Bearer wrong"})[0] == 401, path
            sep = "&" if "?" in path else "?"
            assert client.get(f"{path}{sep}token=s3cre", auth=False)[0] == 401, path
            assert client.get(path)[0] == 200, path  # Authorization: Bearer
            assert client.get(f"{path}{sep}token=s3cret", auth=False)[0] == 200, path
            assert client.get(path, auth=False, headers={"X-MamFusion-Token": "s3cret"})[0] == 200, path
        assert client.request("POST", "/api/search", {"queries": ["a"]}, auth=False)[0] == 401
        for public in ("/", "/static/app.js", "/healthz", "/openapi.json"):
            assert client.get(public, auth=False)[0] == 200, public
        status, headers, _ = client.get("/")
        assert "default-src 'self'" in headers["content-security-policy"]
        assert "access-control-allow-origin" not in headers  # no CORS unless asked


def test_binding_beyond_loopback_needs_a_token(gallery, capsys):
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.7", "example.com", ""))
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "tok")  # allowed with a token (not bound here: tests stay on loopback)
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        assert cli.main(["serve", "--model", str(gallery.output), "--host", host]) == 2
        err = capsys.readouterr().err
        assert f"binding to {host}" in err and "--token" in err and "Traceback" not in err
    assert cli.main(["serve", "--model", str(gallery.root / "nowhere")]) == 2
    assert "no such model folder" in capsys.readouterr().err


def test_cors_only_for_the_origins_given(gallery, text_encoder):
    service = make_service(gallery.output)
    app = create_app(service, cors_origins=["http://app.example"])
    with BackgroundServer(app) as server:
        client = Client(server.port)
        _, headers, _ = client.get("/api/status", headers={"Origin": "http://app.example"})
        assert headers["access-control-allow-origin"] == "http://app.example"
        _, headers, _ = client.get("/api/status", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in headers


def test_serving_writes_nothing(gallery, text_encoder):
    """The model folder, index, catalog and videos are only read, whatever is requested."""

    def tree() -> dict[str, tuple[int, int]]:
        return {
            str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(gallery.root.rglob("*"))
            if p.is_file() and "secret" not in p.name
        }

    before = tree()
    avi, mp4 = gallery.record(".avi"), gallery.record(".mp4")
    with running(gallery.output) as (client, _):
        for path in (
            "/api/search?q=dog",
            f"/api/thumbnail/{mp4.video_id}?t=2",
            f"/api/videos/{avi.video_id}",
            f"/media/{avi.video_id}/preview?start=1&end=2",
            f"/media/{mp4.video_id}",
            "/api/status",
        ):
            assert client.get(path)[0] == 200, path
    assert tree() == before


# ---------------------------------------------------------------------------------------------- hot swap
def _wait(condition, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_hot_swap_to_a_newer_current_while_requests_are_in_flight(tmp_path, text_encoder):
    gallery = ServeGallery(tmp_path)
    held_queries = [*QUERIES, "held request"]
    want_v1 = expected(gallery.searcher("v1"), held_queries, 3)
    release, entered = threading.Event(), threading.Event()

    def loader(model, url):
        s = default_loader("matmul")(model, url)
        search = s.search

        def maybe_held(batch, k):
            if "held request" in batch:  # hold the batch that carries the marked request
                entered.set()
                assert release.wait(30)
            return search(batch, k)

        s.search = maybe_held  # type: ignore[method-assign]
        return s

    service = SearchService(ModelSource.from_path(gallery.output), loader=loader, poll_s=0.05)
    service.start()
    errors: list[str] = []
    versions: list[str] = []
    stop = threading.Event()

    def hammer(client: Client) -> None:  # a client searching all along: no request may fail
        while not stop.is_set():
            status, _, data = client.request("POST", "/api/search", {"queries": QUERIES, "k": 3})
            if status != 200:
                errors.append(f"{status} {data[:200]!r}")
            else:
                versions.append(json.loads(data)["version"])

    with BackgroundServer(create_app(service)) as server, ThreadPoolExecutor(4) as pool:
        client = Client(server.port)
        assert client.json("GET", "/healthz") == {"status": "ok", "version": "v1"}
        background = [pool.submit(hammer, client) for _ in range(2)]
        _wait(lambda: len(versions) >= 4, what="searches on v1")
        in_flight = pool.submit(client.json, "POST", "/api/search", {"queries": held_queries, "k": 3})
        assert entered.wait(10)  # a batch is running on v1 ...
        gallery.publish("v2", seed=1)  # ... when v2 is published and becomes current
        _wait(lambda: client.json("GET", "/healthz")["version"] == "v2", what="the swap to v2")
        release.set()
        old = in_flight.result(timeout=30)
        assert old["version"] == "v1"  # the in-flight batch finished on the model it started on
        for result, want in zip(old["results"], want_v1, strict=True):
            assert_same_hits(result["hits"], want, rel=1e-5)
        n = len(versions)
        _wait(lambda: len(versions) >= n + 4, what="searches on v2")
        stop.set()
        for f in background:
            f.result(timeout=30)
        new = client.json("POST", "/api/search", {"queries": QUERIES, "k": 3})
        status = client.json("GET", "/api/status")
    assert errors == []
    assert versions[0] == "v1" and versions[-1] == "v2"
    # once v2 answered, v1 can only still answer the held batch's batch-mates (one per background client)
    assert versions[versions.index("v2") :].count("v1") <= len(background)
    want_v2 = expected(gallery.searcher("v2"), QUERIES, 3)
    assert want_v2 != want_v1  # the models really differ
    assert new["version"] == "v2" and new["model"] == str(gallery.registry.path / "v2")
    for result, want in zip(new["results"], want_v2, strict=True):
        assert_same_hits(result["hits"], want, rel=1e-5)
    assert status["swaps"] == 1 and status["problem"] is None


def test_a_version_whose_index_is_not_built_yet_is_not_swapped_in(tmp_path, text_encoder):
    """The pipeline moves `current` before it indexes: the server keeps the old model until the index is
    complete (an incomplete one would answer from a part of the gallery), and a missing one is reported."""
    from storage.index import VideoIndex

    gallery = ServeGallery(tmp_path)
    with running(gallery.output, poll_s=0.05) as (client, service):
        v2 = gallery.publish("v2", seed=1, make_current=False)
        VideoIndex.open(str(v2 / "index.zarr"), mode="r+").set_complete(False)  # a build in progress
        gallery.registry.set_current("v2")
        _wait(lambda: "being built" in (service.live.problem or ""), what="the incomplete index")
        time.sleep(0.3)  # several polls
        assert client.json("GET", "/api/search?q=dog")["version"] == "v1"
        VideoIndex.open(str(v2 / "index.zarr"), mode="r+").set_complete(True)
        _wait(lambda: client.json("GET", "/healthz")["version"] == "v2", what="the swap once complete")

        v3 = gallery.publish("v3", seed=2, make_current=False)
        shutil.rmtree(v3 / "index.zarr")
        gallery.registry.set_current("v3")
        _wait(lambda: "no search index" in (service.live.problem or ""), what="the missing index")
        assert client.json("GET", "/api/search?q=dog")["version"] == "v2"
        assert "no search index" in client.json("GET", "/api/status")["problem"]
        build_index(v3, gallery.store, catalog=gallery.catalog, dtype="float32")
        _wait(lambda: client.json("GET", "/healthz")["version"] == "v3", what="the swap once indexed")
        assert client.json("GET", "/api/status")["problem"] is None


def test_no_model_yet_then_one_is_published(tmp_path, text_encoder):
    gallery = ServeGallery(tmp_path)
    empty = tmp_path / "fresh-output"
    (empty / "models").mkdir(parents=True)
    with running(empty, poll_s=0.05) as (client, _):
        assert client.json("GET", "/healthz") == {"status": "no-model", "version": None}
        status, _, data = client.get("/api/search?q=dog")
        assert status == 503 and "no model has been published yet" in json.loads(data)["detail"]
        assert client.get(f"/media/{gallery.ids[0]}")[0] == 503
        shutil.copytree(gallery.registry.path / "v1", empty / "models" / "v1")
        ModelRegistry(empty / "models").set_current("v1")
        _wait(lambda: client.json("GET", "/healthz")["version"] == "v1", what="the first model")
        assert len(client.json("GET", "/api/search?q=dog&k=2")["results"][0]["hits"]) == 2


# ------------------------------------------------------------------------------------------------- units
class _SlowSearcher:
    """Stands in for a Searcher whose scan costs the same for any batch size; records the batch sizes."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.sizes = seconds, []

    def search(self, texts, k):
        self.sizes.append(len(texts))
        time.sleep(self.seconds)
        return [[] for _ in texts]


class _FixedLive:
    def __init__(self, searcher) -> None:
        self.served = type("Served", (), {"searcher": searcher, "version": "fake"})()
        self.problem = None

    def get(self):
        return self.served


@pytest.mark.parametrize("linger_s, full", [(0.05, True), (0.0, False)])
def test_batches_do_not_split_into_convoys(linger_s, full):
    """8 clients in a closed loop: with the linger every scan serves all 8; without it batches alternate
    (1, 7, 1, 7, ...) as a query that arrives while the others' answers go out starts a scan on its own."""
    searcher = _SlowSearcher(0.1)
    batcher = SearchBatcher(_FixedLive(searcher), linger_s=linger_s)  # type: ignore[arg-type]
    batcher.start()
    start = threading.Barrier(8)

    def client(i: int) -> None:
        start.wait()
        for _ in range(6):
            batcher.submit([f"q{i}"], 1).result(timeout=30)
            time.sleep(0.002 * (i % 3))  # clients are not in lockstep

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(client, range(8)))
    finally:
        batcher.stop()
    steady = searcher.sizes[2:]
    if full:
        assert sum(size == 8 for size in steady) >= 0.75 * len(steady), searcher.sizes
    else:
        assert sum(size == 8 for size in steady) < 0.5 * len(steady), searcher.sizes


def test_parse_range_rules():
    assert parse_range(None, 10) is None and parse_range("", 10) is None
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=2-", 10) == (2, 9)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=-30", 10) == (0, 9)
    assert parse_range("BYTES = 1 - 2", 10) == (1, 2)
    for ignored in ("bytes=3-1", "bytes=1-2,4-5", "pages=1-2", "bytes=-", "bytes=١-٢", "bytes=0x1-2"):
        assert parse_range(ignored, 10) is None, ignored
    for bad in ("bytes=10-", "bytes=10-12", "bytes=-0"):
        with pytest.raises(RangeNotSatisfiableError):
            parse_range(bad, 10)
    with pytest.raises(RangeNotSatisfiableError):
        parse_range("bytes=0-", 0)


def test_lru_cache_is_bounded_by_entries_and_bytes():
    cache: LRUCache[str, bytes] = LRUCache(3, max_bytes=10)
    for key in "abc":
        cache.put(key, b"xx")
    assert cache.get("a") == b"xx"  # a is now the most recent
    cache.put("d", b"xx")
    assert cache.get("b") is None and cache.get("a") == b"xx"  # b was the least recent: evicted
    cache.put("e", b"x" * 8)
    assert cache.stats()["bytes"] <= 10 and cache.get("e") == b"x" * 8
    cache.put("huge", b"x" * 11)
    assert cache.get("huge") is None and cache.get("e") == b"x" * 8


def test_model_source_recognises_each_folder(gallery, tmp_path):
    assert ModelSource.from_path(gallery.output).registry.path == gallery.registry.path
    assert ModelSource.from_path(gallery.output).catalog_path == gallery.output / "catalog.json"
    assert ModelSource.from_path(gallery.registry.path).catalog_path == gallery.output / "catalog.json"
    fixed = ModelSource.from_path(gallery.registry.path / "v1")
    assert fixed.registry is None and fixed.current().path == gallery.registry.path / "v1"
    with pytest.raises(Exception, match="not a model"):
        ModelSource.from_path(tmp_path)


# ------------------------------------------------------------------------------------------------- CLI
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_serve_command_end_to_end(tmp_path):
    """`mamfusion serve` in a subprocess, with the real MiniLM text backbone the model names."""
    from tasks.extract import extract_queries
    from tasks.profiles import feature_profile

    with hash_text_encoder():
        gallery = ServeGallery(tmp_path)
    profile = feature_profile("lite", text={"device": "cpu"})
    text_fp = extract_queries(["a caption seen in training"], profile, gallery.store).fingerprint
    version = gallery.registry.path / "v-minilm"
    config = MamFusionConfig(**{**TINY.model_dump(), "query_dim": 384})
    MamFusion(config).save_pretrained(version)
    source = FeatureSource(
        store=gallery.store.url,
        visual=_snapshot(VISUAL_FP, "visual", TINY.visual_dim),
        text=ExtractorSnapshot(fingerprint=text_fp, **gallery.store.extractor_info(text_fp)),
        data_digest="test",
    )
    (version / "features.json").write_text(source.model_dump_json())
    build_index(version, gallery.store, catalog=gallery.catalog)
    gallery.registry.set_current("v-minilm")

    port = _free_port()
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--model", str(gallery.output), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = Client(port)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if client.get("/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        body = client.json("GET", "/api/search?q=a+person+turns+on+the+light&k=3")
        assert body["version"] == "v-minilm" and [h["rank"] for h in body["results"][0]["hits"]] == [1, 2, 3]
        assert client.get("/")[0] == 200 and client.get("/docs")[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "serving version v-minilm (4 videos)" in out
    assert f"http://127.0.0.1:{port}/" in out
