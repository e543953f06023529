"""The dashboard's web face: a Starlette app served by uvicorn, fed by one `Feed`.

Routes: `/` the page, `/static/...` its script, styles and the vendored libraries,
`/events` the live stream (Server-Sent Events: a `hello` snapshot, then every `grid`,
`totals`, `events` and `link` message as it happens), `/api/snapshot` the same snapshot as
one JSON document (for scripts and curl), `/healthz`.

This module must never talk to a node itself (the feed does, read-only) nor parse HTTP (that
is uvicorn's job); it only moves the feed's messages to browsers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import webbrowser
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from zgrid.dashboard.feed import Feed

STATIC_DIR = Path(__file__).parent / "static"
KEEPALIVE_S = 15.0  # an SSE comment this often, so proxies and browsers keep the stream open
PAGE_QUEUE_MESSAGES = 512  # a page this far behind gets a fresh snapshot instead
SHUTDOWN_GRACE_S = 1  # Ctrl-C: open streams get this long, then the server stops anyway
RESYNC = "resync"  # a page's queue overflowed: send it a new hello
CLOSE = "close"  # the server is stopping: end the stream (so no request is left to cancel)


class _Streams:
    """The open pages' queues, so that stopping can end every stream at once: a stream that
    is still open when the grace period ends is cancelled, which uvicorn reports as an
    error."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[str]] = set()

    def close_all(self) -> None:
        for queue in self.queues:
            _put(queue, CLOSE)


def _put(queue: asyncio.Queue[str], text: str) -> None:
    """Queue `text`; a queue that is full is emptied first and told to resynchronise."""
    if queue.full():
        while not queue.empty():
            queue.get_nowait()
        text = text if text == CLOSE else RESYNC
    queue.put_nowait(text)


def create_app(feed: Feed, manage_feed: bool = True) -> Starlette:
    """The app for `feed`; with `manage_feed`, it starts and stops the feed with the server."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_feed:
            feed.start()
        try:
            yield
        finally:
            if manage_feed:
                await asyncio.to_thread(feed.stop)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def snapshot(request: Request) -> Response:
        return JSONResponse(feed.snapshot())

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    streams = _Streams()

    async def events(request: Request) -> Response:
        return StreamingResponse(_stream(feed, streams, request),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    app = Starlette(routes=[
        Route("/", page),
        Route("/events", events),
        Route("/api/snapshot", snapshot),
        Route("/healthz", healthz),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ], lifespan=lifespan)
    app.state.streams = streams
    return app


async def _stream(feed: Feed, streams: _Streams, request: Request) -> AsyncIterator[str]:
    """One page's event stream. The feed's threads hand messages to this loop; a page that
    falls PAGE_QUEUE_MESSAGES behind (a tab in the background) is resynchronised with a
    fresh snapshot rather than made to replay everything it missed."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue(PAGE_QUEUE_MESSAGES)

    def send(text: str) -> None:  # called in the feed's threads
        loop.call_soon_threadsafe(_put, queue, text)

    streams.queues.add(queue)
    handle = feed.subscribe(send)
    try:
        yield "retry: 1000\n\n"
        while True:
            try:
                text = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                yield ": keepalive\n\n"
                continue
            if text == CLOSE:
                return
            if text == RESYNC:
                feed.unsubscribe(handle)
                handle = feed.subscribe(send)
                continue
            yield f"data: {text}\n\n"
    finally:
        feed.unsubscribe(handle)
        streams.queues.discard(queue)


class _Server(uvicorn.Server):
    """uvicorn's server, which also ends the open streams as soon as it is asked to stop."""

    def __init__(self, config: uvicorn.Config, streams: _Streams) -> None:
        super().__init__(config)
        self.streams = streams
        self.loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self.loop is not None:  # a signal handler: hand the work to the loop
            self.loop.call_soon_threadsafe(self.streams.close_all)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is a clear error before anything
    starts (and port 0 picks a free one). Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(feed: Feed, sock: socket.socket, open_browser: bool,
          on_ready: Callable[[str], None]) -> None:
    """Serve the dashboard on `sock` until Ctrl-C or SIGTERM (uvicorn handles both; the
    caller makes SIGTERM raise KeyboardInterrupt once uvicorn hands it back)."""
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    app = create_app(feed)
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S, lifespan="on")
    server = _Server(config, app.state.streams)

    async def run() -> None:
        server.loop = asyncio.get_running_loop()
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            on_ready(url)
            if open_browser:
                await asyncio.to_thread(webbrowser.open, url)
        await task

    # uvicorn shuts down gracefully on Ctrl-C / SIGTERM, then raises the signal again for
    # whoever called it: that is us, and stopping is what was asked for.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
