"""zgrid-ctl top: a node's island kept on screen, from its watch stream and a table thread.

What it is for: `TopScreen` holds the latest watch view and node table and draws them
(`zgrid.views.top_view`) in place on a terminal (rich Live, full screen), or prints a plain
snapshot each time what it shows changes when stdout is not a terminal. `NodesPoller` asks
for the node table every --interval and soon after each change of the view, on a Client of
its own. The `top` command in cli.py feeds the screen from the watch stream on its own
Client and decides the exit code.

What it must never do: exit, share a Client between threads (a Client is not thread-safe),
or draw after the screen has been left. rich loads only when a screen is made.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from zgrid.errors import ZgridError

if TYPE_CHECKING:
    from rich.live import Live

    from zgrid.client import Client

TOP_INTERVAL_S = 1.0  # `top --interval`: seconds between two requests for the node table
TOP_MIN_GAP_S = 0.25  # a burst of changes asks for the node table at most this often
TOP_JOIN_S = 1.0  # after Ctrl-C, how long (beyond --timeout) `top` waits for its table thread


class TopScreen:
    """What `top` shows: the latest watch view and node table. On a terminal it is drawn in
    place (rich Live, full screen); otherwise printed as a snapshot each time it changes.
    The watch (main thread) and the table thread both update it, under one lock."""

    def __init__(self, node: str, interval_s: float) -> None:
        from rich.console import Console

        self.node = node
        self.interval_s = interval_s
        self.console = Console(highlight=False)
        self.lock = threading.Lock()
        self.latest: dict[str, Any] | None = None
        self.rows: list[dict[str, Any]] | None = None
        self.problem: str | None = None
        self.updated = "never"
        self.live_display: Live | None = None
        self.printed: str | None = None  # what the last plain snapshot showed

    @contextmanager
    def live(self) -> Iterator[None]:
        if not self.console.is_terminal:
            yield
            return
        from rich.live import Live

        with Live(console=self.console, screen=True, auto_refresh=False,
                  redirect_stdout=False, redirect_stderr=False) as live:
            with self.lock:
                self.live_display = live
            try:
                yield
            finally:  # no more drawing, from either thread, once the screen is left
                with self.lock:
                    self.live_display = None

    def view(self, view: dict[str, Any]) -> None:
        with self.lock:
            self.latest = view
            self._draw()

    def table(self, rows: list[dict[str, Any]] | None, problem: str | None = None) -> None:
        with self.lock:
            if rows is not None:
                self.rows = rows
                self.updated = datetime.now().strftime("%H:%M:%S")
            self.problem = problem
            self._draw()

    def _draw(self) -> None:
        from zgrid import views

        if self.latest is None:
            return  # nothing to show before the node's first view
        live = self.console.is_terminal
        screen = views.top_view(self.latest, self.rows, node=self.node, updated=self.updated,
                                interval_s=self.interval_s, problem=self.problem, live=live)
        if live:
            if self.live_display is not None:
                self.live_display.update(screen, refresh=True)
            return
        if self.rows is None and self.problem is None:
            return  # a snapshot is the whole view: wait for the node table
        # Plain snapshots only when something shown changed (not the time of the request).
        shown = json.dumps([{k: v for k, v in self.latest.items() if k != "ts"}, self.rows,
                            self.problem], sort_keys=True, default=str)
        if shown != self.printed:
            self.printed = shown
            self.console.print(screen)
            self.console.print()
            sys.stdout.flush()


class NodesPoller(threading.Thread):
    """`top`'s table thread: asks for `nodes` every --interval, and soon after `poke` (a
    change of the view), on a Client of its own (a Client is not thread-safe, and the main
    thread's is busy with the watch). A failed request is shown and tried again; the watch
    decides when the node is gone."""

    def __init__(self, connect: Callable[[], Client], interval_s: float, screen: TopScreen
                 ) -> None:
        super().__init__(name="zgrid-top-nodes", daemon=True)  # never keeps zgrid-ctl alive
        self.connect, self.interval_s, self.screen = connect, interval_s, screen
        self.wake = threading.Event()
        self.done = threading.Event()

    def poke(self) -> None:
        self.wake.set()

    def stop(self, timeout_s: float) -> None:
        self.done.set()
        self.wake.set()
        self.join(timeout_s)

    def run(self) -> None:
        try:
            client = self.connect()
        except ZgridError as exc:
            self.screen.table(None, exc.message)
            return
        with client:
            while not self.done.is_set():
                self.wake.clear()  # a change from now on asks again
                try:
                    self.screen.table(client.nodes())
                except ZgridError as exc:
                    self.screen.table(None, exc.message)
                if self.done.wait(TOP_MIN_GAP_S):
                    break
                self.wake.wait(self.interval_s - TOP_MIN_GAP_S)
