"""`mamfusion serve`: the search API and the search page over HTTP (FastAPI on uvicorn).

Routes (JSON unless said; every /api and /media route needs the token when one is set):

    GET  /                                    the search page (flows/static/: plain HTML/CSS/JS)
    GET  /healthz                             {"status": "ok" | "no-model", "version"}
    GET  /api/status                          served model, index, queue and cache state, limits
    GET  /api/search?q=TEXT&k=10              one query
    POST /api/search  {"queries": [...], "k"} several queries, scored together
    GET  /api/videos/{id}                     catalog metadata, codec, whether browsers play the file
    GET  /api/thumbnail/{id}?t=SECONDS        JPEG of the frame at t (decord), cached
    GET  /media/{id}                          the video file; Range requests answer 206 (416 past the end)
    GET  /media/{id}/preview?start=S&end=E    the span transcoded to H.264 for codecs browsers cannot play
    GET  /docs, /openapi.json                 FastAPI's OpenAPI pages

The logic lives in `tasks/serve.py` (model hot-swap, micro-batching, media); this module only maps it onto
HTTP: status codes, byte ranges, the token check, security headers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from storage.errors import MamFusionError
from tasks.search import QueryError
from tasks.serve import (
    MAX_K,
    MAX_QUERIES_PER_REQUEST,
    Answer,
    BadRequestError,
    BusyError,
    NoModelError,
    RangeNotSatisfiableError,
    SearchService,
    ServeError,
    VideoNotFoundError,
    iter_file,
    media_type,
    parse_range,
)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data:; media-src 'self' blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class ServeConfigError(MamFusionError):
    """A server setting refused before anything is bound (e.g. a public address without a token)."""


# --------------------------------------------------------------------------------------------- binding
def is_loopback(host: str) -> bool:
    """Only addresses that cannot be reached from another machine; a host name is not trusted to be one."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to expose the index and the videos beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise ServeConfigError(
            f"binding to {host} makes the server reachable from other machines; pass --token SECRET (or set "
            "MAMFUSION_SERVE_TOKEN): every /api and /media request must then carry it"
        )


# ------------------------------------------------------------------------------------------ middleware
class SecurityHeaders:
    """nosniff and no-referrer everywhere (tokens ride in media URLs); a strict CSP on the page itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        page = scope["path"] == "/" or scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                if page:
                    headers.setdefault("Content-Security-Policy", PAGE_CSP)
                    headers.setdefault("X-Frame-Options", "DENY")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def token_guard(token: str | None) -> Callable[[Request], None]:
    """The dependency every /api and /media route has: `Authorization: Bearer T`, `X-MamFusion-Token: T`
    or `?token=T` (the only way for <video>/<img> URLs)."""

    def check(request: Request) -> None:
        if not token:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = value.strip() if scheme.lower() == "bearer" else ""
        given = given or request.headers.get("x-mamfusion-token", "") or request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(
                401,
                "this server needs its token: send 'Authorization: Bearer TOKEN' or add ?token=TOKEN",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


# ------------------------------------------------------------------------------------------- responses
class SearchBody(BaseModel):
    """POST /api/search: several queries scored in one pass over the index."""

    queries: list[str] = Field(min_length=1, description=f"at most {MAX_QUERIES_PER_REQUEST} queries")
    k: int = Field(10, description=f"videos per query, 1..{MAX_K}")


class QueryResult(BaseModel):
    query: str
    hits: list[dict[str, Any]] = Field(
        description="rank, video_id, path, score, start, end (the matching span, s) and, when the model "
        "gives them, the per-clip score profile and its clip spans"
    )


class SearchResponse(BaseModel):
    """The fields of `mamfusion search --json`, plus the version that answered."""

    model: str
    version: str
    index: str
    results: list[QueryResult]


def hit_json(hit: Any) -> dict[str, Any]:
    """Every field of a Hit, fields added later included, as `dataclasses.asdict` gives them but without its
    deep copy of the profile tuples (0.4 ms a hit, on the event loop, under load; this is 100x less)."""
    out = {}
    for f in dataclasses.fields(hit):
        value = getattr(hit, f.name)
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def _search_json(answer: Answer, texts: Sequence[str]) -> dict[str, Any]:
    served = answer.served
    return {
        "model": str(served.model.path),
        "version": served.version,
        "index": served.index_url,
        "results": [
            {"query": q, "hits": [hit_json(h) for h in hits]}
            for q, hits in zip(texts, answer.hits, strict=True)
        ],
    }


def _ranged(
    request: Request,
    size: int,
    mime: str,
    chunks: Callable[[int, int], Iterable[bytes]],
    headers: dict[str, str] | None = None,
) -> Response:
    """200 with the whole body, or 206 with one byte range (a browser seeking); parse_range raises 416."""
    wanted = parse_range(request.headers.get("range"), size)
    first, last = wanted or (0, size - 1)
    out = {**(headers or {}), "Accept-Ranges": "bytes", "Content-Length": str(max(0, last - first + 1))}
    if wanted:
        out["Content-Range"] = f"bytes {first}-{last}/{size}"
    status = 206 if wanted else 200
    if request.method == "HEAD" or size == 0:
        return Response(status_code=status, headers=out, media_type=mime)
    return StreamingResponse(chunks(first, last), status_code=status, headers=out, media_type=mime)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Our errors -> status codes with their one-line message in `detail` (the page shows it as is)."""
    statuses: list[tuple[type[Exception], int]] = [
        (QueryError, 400),
        (BadRequestError, 400),
        (VideoNotFoundError, 404),
        (NoModelError, 503),
        (ServeError, 422),
    ]
    for cls, status in statuses:

        def handler(request: Request, exc: Exception, status: int = status) -> JSONResponse:
            return _error(status, str(exc))

        app.add_exception_handler(cls, handler)

    def busy(request: Request, exc: Exception) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": "1"})

    def unsatisfiable(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RangeNotSatisfiableError)
        return _error(416, str(exc), {"Content-Range": f"bytes */{exc.size}"})

    def ours(request: Request, exc: Exception) -> JSONResponse:  # a damaged index, a vanished model file
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return _error(500, str(exc))

    def bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal server error ({type(exc).__name__}); see the server log")

    app.add_exception_handler(BusyError, busy)
    app.add_exception_handler(RangeNotSatisfiableError, unsatisfiable)
    app.add_exception_handler(MamFusionError, ours)
    app.add_exception_handler(Exception, bug)


# ------------------------------------------------------------------------------------------------- app
def create_app(
    service: SearchService, *, token: str | None = None, cors_origins: Sequence[str] = ()
) -> FastAPI:
    """The ASGI app over a service; its lifespan starts the service if the caller has not, and stops it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not service.started:
            service.start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="MamFusion search",
        description="Partially relevant video retrieval: ranked videos and the moment that matched.",
        lifespan=lifespan,
    )
    _install_error_handlers(app)
    app.add_middleware(SecurityHeaders)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=["Authorization", "Content-Type", "Range", "X-MamFusion-Token"],
            expose_headers=["Content-Range", "Accept-Ranges", "Content-Length"],
        )
    guard = [Depends(token_guard(token))]
    api = APIRouter(prefix="/api", dependencies=guard)
    media = APIRouter(prefix="/media", dependencies=guard)

    async def search(texts: list[str], k: int) -> JSONResponse:
        future = service.submit(texts, k)  # raises 400/503 before anything is queued
        answer = await asyncio.wrap_future(future)
        return JSONResponse(_search_json(answer, texts))

    @api.get("/search", response_model=None, responses={200: {"model": SearchResponse}})
    async def search_one(q: str = "", k: int = 10) -> JSONResponse:
        """One query (`q`); `k` videos, at most 100."""
        return await search([q], k)

    @api.post("/search", response_model=None, responses={200: {"model": SearchResponse}})
    async def search_many(body: SearchBody) -> JSONResponse:
        """Several queries, scored together in one pass over the index."""
        return await search(body.queries, body.k)

    @api.get("/status")
    def status() -> dict[str, Any]:
        """What is served, how full the queue is, and the limits the page enforces."""
        return service.status()

    @api.get("/videos/{video_id}")
    def video_info(video_id: str) -> dict[str, Any]:
        """Catalog metadata (duration, fps, size, frame size) and whether browsers play the file."""
        return service.video_info(video_id)

    @api.get("/thumbnail/{video_id}", response_class=Response)
    def thumbnail(video_id: str, t: float = 0.0) -> Response:
        """JPEG of the frame shown at `t` seconds."""
        jpeg = service.thumbnail(video_id, t)
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @media.get("/{video_id}", response_class=Response)
    @media.head("/{video_id}", response_class=Response, include_in_schema=False)
    def media_file(video_id: str, request: Request) -> Response:
        """The video file as stored; Range requests give 206 so a player can seek."""
        video = service.video(video_id)
        try:
            stream = service.stream(video)
        except ServeError:
            stream = None
        path = video.path
        return _ranged(request, video.size, media_type(video, stream), lambda a, b: iter_file(path, a, b))

    @media.get("/{video_id}/preview", response_class=Response)
    @media.head("/{video_id}/preview", response_class=Response, include_in_schema=False)
    def media_preview(video_id: str, request: Request, start: float = 0.0, end: float = 5.0) -> Response:
        """`start`..`end` seconds re-encoded small as H.264 (at most 30 s), for files browsers cannot play."""
        preview = service.preview(video_id, start, end)
        data = preview.data
        headers = {"X-Preview-Start": f"{preview.start:.3f}", "Cache-Control": "private, max-age=3600"}
        return _ranged(request, len(data), preview.mime, lambda a, b: (data[a : b + 1],), headers)

    app.include_router(api)
    app.include_router(media)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness for supervisors: no token needed, nothing but the served version."""
        served = service.live.get()
        return {"status": "ok" if served else "no-model", "version": served.version if served else None}

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# ---------------------------------------------------------------------------------------------- running
def run_server(
    app: FastAPI,
    host: str,
    port: int,
    *,
    log_level: str = "info",
    on_started: Callable[[], None] | None = None,
) -> None:
    """uvicorn in the foreground until Ctrl-C / SIGTERM."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False))
    if on_started is not None:
        original = server.startup

        async def startup(sockets: list[socket.socket] | None = None) -> None:
            await original(sockets)
            if server.started:
                on_started()

        server.startup = startup  # type: ignore[method-assign]
    server.run()


class BackgroundServer:
    """uvicorn in a thread on a socket bound here (port 0: a free one), for tests and the benchmark."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only then, and without it
        # every keep-alive response stalls 40 ms (Nagle against the client's delayed ACK)
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
