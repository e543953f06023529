"""The dashboard's live view of the grid: what one node knows, kept current for many pages.

Two threads, each with its own `Client` (a ZeroMQ socket must stay in one thread): the
*watcher* follows the node's `watch` views, which carry the island's totals the moment they
change; the *poller* asks for `graph` and `status` as soon as the watcher saw a change and at
least every GRAPH_POLL_S, so that a link that goes one-sided without moving any total still
reaches the page within a second. What they learn is turned into messages for the page (the
`hello` snapshot a new page starts from, then `grid`, `totals`, `events` and `link`) and
handed to every subscriber.

This module never serves HTTP (app.py does) and never changes a node: it sends read-only
requests only, so a dashboard is safe to leave running against a production grid.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from zgrid.client import Client
from zgrid.errors import ZgridError

GRAPH_POLL_S = 0.5  # a change no total shows (a link going one-sided) is on the page this late
# Between two graph requests at least this long, however fast the totals change: at 1,000
# nodes a reply is ~450 KiB and ~4 ms of the node's loop, and a page redraws ~5 times a second.
GRAPH_MIN_GAP_S = 0.2
SAMPLE_S = 1.0  # a totals point at least this often, so the charts' time axis keeps moving
HISTORY_POINTS = 3600  # an hour of samples at SAMPLE_S, plus the changes in between
EVENTS_KEPT = 200
RETRY_S = 1.0  # after the node stopped answering, ask again this often
BALANCED_KW = 1e-6  # |net| at or below this counts as balanced (colour, kind)

Send = Callable[[str], None]  # takes one encoded page message


@dataclass(frozen=True, slots=True)
class Source:
    """Which node to follow, and how to talk to it (as zgrid-ctl's global options say)."""

    node: str
    timeout_s: float
    keys_dir: Path | None = None
    as_name: str = "operator"

    def client(self, context: zmq.Context[zmq.Socket[bytes]]) -> Client:
        return Client(self.node, self.timeout_s, keys_dir=self.keys_dir, as_name=self.as_name,
                      context=context)


def kind_of(row: Mapping[str, Any]) -> str:
    """What a node is, read off its advert (which carries no kind): `battery` (flexible both
    ways with no base values), `plant` (production it can raise), `pv` (other production),
    `load` (consumption only), or `idle`."""
    production, consumption = row.get("production", 0.0), row.get("consumption", 0.0)
    up, down = row.get("flex_up", 0.0), row.get("flex_down", 0.0)
    if production == 0.0 and consumption == 0.0:
        return "battery" if up > 0.0 and down > 0.0 else "idle"
    if production > 0.0:
        return "plant" if up > 0.0 else "pv"
    return "load"


def page_grid(graph: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
    """The `grid` message: the graph request's reply with each node's kind and actual net
    (base net plus its activation), and the followed node's own status."""
    nodes = [{**row, "kind": kind_of(row), "actual_net": row["net"] + row["activation_kw"]}
             for row in graph["nodes"]]
    return {"id": graph["id"], "nodes": nodes, "edges": list(graph["edges"]),
            "islands": list(graph["islands"]), "status": dict(status)}


def totals_point(view: Mapping[str, Any], device: Mapping[str, Any] | None,
                 t: float) -> dict[str, Any]:
    """One sample for the charts: the island's totals and balancing at wall time `t`, and the
    followed node's battery state of charge (percent) when it runs a battery model."""
    keys = ("total_net", "total_production", "total_consumption", "island_size",
            "imbalance_kw", "balanced_net_kw", "clearing_price", "shortfall_kw")
    point: dict[str, Any] = {"t": t, **{k: view.get(k) for k in keys}}
    soc, capacity = (device or {}).get("soc_kwh"), (device or {}).get("capacity_kwh")
    point["soc_pct"] = (100.0 * soc / capacity) if soc is not None and capacity else None
    return point


def grid_events(old: Mapping[str, Any] | None, new: Mapping[str, Any], t: float
                ) -> list[dict[str, Any]]:
    """What happened between two `grid` messages, for the page's event list: nodes that joined
    or left the known grid or this island, links that came up or went down, islands that
    split or merged."""
    if old is None:
        return []
    out: list[dict[str, Any]] = []

    def event(kind: str, text: str) -> None:
        out.append({"t": t, "kind": kind, "text": text})

    before = {n["id"]: n for n in old["nodes"]}
    after = {n["id"]: n for n in new["nodes"]}
    for x in sorted(after.keys() - before.keys()):
        event("joined", f"{x} joined the grid")
    for x in sorted(before.keys() - after.keys()):
        event("left", f"{x} left the grid (forgotten)")
    for x in sorted(after.keys() & before.keys()):
        was, now = before[x]["reachable"], after[x]["reachable"]
        if was != now:
            event("joined" if now else "left",
                  f"{x} {'is reachable again' if now else 'is no longer reachable'}")
    edges_before = {(e["a"], e["b"]): e["state"] for e in old["edges"]}
    edges_after = {(e["a"], e["b"]): e["state"] for e in new["edges"]}
    for pair in sorted(edges_before.keys() | edges_after.keys()):
        was_up = edges_before.get(pair) == "up"
        now_up = edges_after.get(pair) == "up"
        if was_up != now_up:
            state = edges_after.get(pair, "gone")
            event("link_up" if now_up else "link_down",
                  f"link {pair[0]} - {pair[1]} {'up' if now_up else f'down ({state})'}")
    n_before, n_after = len(old["islands"]), len(new["islands"])
    if n_before != n_after:
        event("split" if n_after > n_before else "merge",
              f"{n_before} -> {n_after} island{'s' if n_after != 1 else ''}")
    return out


class Feed:
    """The followed node's grid, its totals over time and the events so far, kept current by
    two threads and offered to subscribers as encoded page messages (JSON text)."""

    def __init__(self, source: Source, clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self._clock = clock
        self._lock = threading.Lock()
        self._grid: dict[str, Any] | None = None
        self._view: dict[str, Any] | None = None
        self._history: deque[dict[str, Any]] = deque(maxlen=HISTORY_POINTS)
        self._events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self._link: dict[str, Any] = {"ok": False, "message": f"connecting to {source.node}"}
        self._subscribers: dict[int, Send] = {}
        self._next_subscriber = 0
        # Both threads' sockets live in this context: terminating it is how `stop` wakes a
        # thread blocked in a poll (ZeroMQ's way: the poll raises ContextTerminated).
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._changed = threading.Event()
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._watch_loop, name="dashboard-watch",
                                          daemon=True),
                         threading.Thread(target=self._poll_loop, name="dashboard-poll",
                                          daemon=True)]

    # ------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 3.0) -> None:
        """Stop both threads; returns once they have closed their sockets."""
        self._stopping.set()
        self._changed.set()
        self._context.term()  # returns once both threads have closed their sockets
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout_s)

    # ------------------------------------------------------------------------ subscribers

    def subscribe(self, send: Send) -> int:
        """Register `send` (called from the feed's threads: it must only hand the text over,
        e.g. to an event loop); it gets the `hello` snapshot first. Returns a handle."""
        with self._lock:
            handle = self._next_subscriber
            self._next_subscriber += 1
            self._subscribers[handle] = send
            send(self._encode("hello", self._snapshot_locked()))
        return handle

    def unsubscribe(self, handle: int) -> None:
        with self._lock:
            self._subscribers.pop(handle, None)

    def snapshot(self) -> dict[str, Any]:
        """Everything a new page starts from: grid, totals history, events, node link."""
        with self._lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> dict[str, Any]:
        return {"grid": self._grid, "history": list(self._history),
                "events": list(self._events), "link": self._link,
                "limits": {"history_points": HISTORY_POINTS, "sample_s": SAMPLE_S}}

    def _publish_locked(self, kind: str, body: Any) -> None:
        text = self._encode(kind, body)
        for send in list(self._subscribers.values()):
            send(text)

    @staticmethod
    def _encode(kind: str, body: Any) -> str:
        return json.dumps({"type": kind, "body": body}, separators=(",", ":"))

    # ------------------------------------------------------------------------ what they learn

    def _set_link(self, ok: bool, message: str) -> None:
        with self._lock:
            if self._link["ok"] == ok and self._link["message"] == message:
                return
            self._link = {"ok": ok, "message": message}
            self._publish_locked("link", self._link)

    def _on_view(self, view: dict[str, Any]) -> None:
        with self._lock:
            self._view = view
            self._add_point_locked()
        self._changed.set()  # the poller fetches the graph now: its values moved too

    def _on_grid(self, grid: dict[str, Any]) -> None:
        with self._lock:
            if grid == self._grid:
                return
            events = grid_events(self._grid, grid, self._clock()) if self._grid else [
                {"t": self._clock(), "kind": "joined",
                 "text": f"following {grid['id']}: {len(grid['nodes'])} nodes known, "
                         f"{len(grid['islands'])} island(s)"}]
            self._grid = grid
            self._publish_locked("grid", grid)
            if events:
                self._events.extend(events)
                self._publish_locked("events", events)

    def _sample(self) -> None:
        """A point with the current values when nothing changed for SAMPLE_S."""
        with self._lock:
            if self._view is not None and (
                    not self._history or self._clock() - self._history[-1]["t"] >= SAMPLE_S):
                self._add_point_locked()

    def _add_point_locked(self) -> None:
        assert self._view is not None
        device = (self._grid or {}).get("status", {}).get("device")
        point = totals_point(self._view, device, self._clock())
        self._history.append(point)
        self._publish_locked("totals", point)

    # ------------------------------------------------------------------------ threads

    def _watch_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                with self.source.client(self._context) as client:
                    for view in client.watch():
                        self._set_link(True, f"following {self.source.node}")
                        self._on_view(view)
                        if self._stopping.is_set():
                            return
            except ZgridError as exc:
                self._set_link(False, exc.message)
            except zmq.ContextTerminated:
                return  # stop() woke us
            self._stopping.wait(RETRY_S)

    def _poll_loop(self) -> None:
        client: Client | None = None
        try:
            while not self._stopping.is_set():
                self._changed.wait(GRAPH_POLL_S)
                self._changed.clear()
                if self._stopping.is_set():
                    return
                client = client or self.source.client(self._context)
                try:
                    status = client.status()
                    graph = client.graph()
                except zmq.ContextTerminated:
                    return  # stop() woke us
                except ZgridError as exc:
                    client.close()
                    client = None
                    self._set_link(False, exc.message)
                    self._stopping.wait(RETRY_S)
                    continue
                self._on_grid(page_grid(graph, status))
                self._sample()
                self._stopping.wait(GRAPH_MIN_GAP_S)
        finally:
            if client is not None:
                client.close()

