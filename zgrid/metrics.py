"""Prometheus metrics of one node: `zgrid-node --metrics-port PORT`.

What it is for: to let Prometheus (or anyone with curl) read what a running node counts and
sees, without a control client: traffic by message type and direction, the core's and the
runtime's own counters (bad frames, flaps, digests, saves ...), link state changes, the
island's size and exact totals, this node's values, offer and activation, and how long the
poll loop takes to handle one frame.

How: the poll loop owns a `Meter`. With metrics on, it counts every frame in and out by type
and times each one it handles; at the end of a loop turn that changed something (at most every
SNAPSHOT_INTERVAL_S, and at least every SNAPSHOT_MAX_AGE_S) it publishes a fresh, immutable
`Snapshot` of those counts and of what the core and the runtime already keep. The HTTP server
(`MetricsServer`, daemon threads, a `CollectorRegistry` of its own) only ever reads the newest
Snapshot, through `SnapshotCollector.latest`.

What it must never do:
- Block or slow the poll loop. The one thing the loop and the server threads share is the
  reference `SnapshotCollector.latest`, which the loop replaces whole and never changes in
  place: reading or rebinding one attribute is atomic under the GIL, so there is no lock the
  loop could wait on, and a slow or stuck scrape costs the loop nothing. (The histogram is
  kept the same way, as bucket counts in the Meter, not a prometheus_client Histogram, whose
  lock a scrape holds while the loop would observe.)
- Touch the core, the runtime or their sockets from a server thread: everything the collector
  reads was copied into the Snapshot by the loop.
- Cost anything with metrics off: the runtime then has no Meter, and its hot path only checks
  for `None`.
- Count again what core.py (`Core.counters`) or node.py (`Node._counters`) count: those are
  copied into the Snapshot as they are. The Meter counts only what nobody else does: frames
  and bytes by type and direction, handling time, link state changes.
- Decide anything: it observes.
"""

from __future__ import annotations

import bisect
import math
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from zgrid import __version__
from zgrid.core import LinkState
from zgrid.errors import ProtocolError
from zgrid.wire import MESSAGE_TYPES

if TYPE_CHECKING:
    from zgrid.core import Core, Sibling

SNAPSHOT_INTERVAL_S = 0.2  # at most this often the loop copies its counters for the scraper
# At least this often, even when idle: `zgrid_snapshot_timestamp_seconds` older than this (plus
# a ping interval) means the poll loop is stuck, not that nothing happened.
SNAPSHOT_MAX_AGE_S = 5.0
SERVE_POLL_S = 0.05  # how often the server thread checks for shutdown: bounds how long stop waits
STOP_JOIN_S = 1.0
# Upper bounds of the handling-time buckets. A frame costs ~15 us of Python work; a big digest
# or an island-wide flood many times that; above 0.1 s something is wrong.
HANDLING_BUCKETS_S = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                      0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
INVALID_TYPE = "invalid"  # the `type` label of a frame that did not decode

# The `type` label of each message class: its `t` on the wire.
_TYPE_NAMES: Mapping[type, str] = {**{k: str(t) for k, t in MESSAGE_TYPES.items()},
                                   ProtocolError: INVALID_TYPE}

# Counters the core and the runtime keep already (their key in `status` counters), exported
# as they are: metric name (without _total) and help.
COUNTERS: Mapping[str, tuple[str, str]] = {
    "bad_frames": ("zgrid_bad_frames", "Sibling frames dropped as bad (not decodable, invalid, "
                   "from a revoked key, control on a sibling connection)."),
    "ignored": ("zgrid_messages_ignored", "Sibling messages ignored (not from an UP sibling, "
                "a past life, or claiming another sender)."),
    "adverts_received": ("zgrid_adverts_received", "Adverts received from siblings."),
    "adverts_accepted": ("zgrid_adverts_accepted", "Adverts newer than the one held, stored."),
    "adverts_evicted": ("zgrid_adverts_evicted", "Adverts dropped from a full table."),
    "digests_sent": ("zgrid_digests_sent", "Anti-entropy digests sent to siblings."),
    "digests_limited": ("zgrid_digests_limited", "Digests not sent or not answered: at most "
                        "one each way per sibling per ping interval."),
    "link_flaps": ("zgrid_link_flaps", "UP links that went DOWN because the sibling fell "
                   "silent for --dead-after."),
    "connections_lost": ("zgrid_connections_lost", "UP links that went DOWN because the "
                         "connection to the sibling closed (its process exited)."),
    "bad_signatures": ("zgrid_bad_signatures", "Adverts dropped for a bad signature (--keys)."),
    "outbids": ("zgrid_outbids", "Times this node outbid an advert of its own id."),
    "refusals_dropped": ("zgrid_refusals_dropped", "Refusals not sent (over the budget)."),
    "origins_refused": ("zgrid_origins_refused", "New origins refused (table room)."),
    "sends_dropped": ("zgrid_sends_dropped", "Messages dropped: the sibling was not connected "
                      "or slow (anti-entropy repairs it)."),
    "sends_routed": ("zgrid_sends_routed", "Messages sent back over the sibling's own "
                     "connection because our DEALER to it was not connected."),
    "saves": ("zgrid_saves", "Successful saves of this node's state (fsync)."),
    "save_failures": ("zgrid_save_failures", "Saves that failed (disk full, read-only ...)."),
}


def type_name(kind: type) -> str:
    return _TYPE_NAMES.get(kind) or kind.__name__.lower()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a scrape shows, copied by the poll loop at one moment; never changed afterwards."""

    node_id: str
    at_unix_s: float
    # (direction, type, messages, bytes)
    traffic: tuple[tuple[str, str, int, int], ...]
    # (type, count per bucket of HANDLING_BUCKETS_S then +Inf, not cumulative, sum of seconds)
    handling: tuple[tuple[str, tuple[int, ...], float], ...]
    counters: tuple[tuple[str, int], ...]  # the core's and the runtime's, by their key
    link_changes: tuple[tuple[str, int], ...]  # (state entered, times)
    siblings: tuple[tuple[str, int], ...]  # (state, siblings in it now)
    island_size: int
    known_nodes: int
    total_net_kw: float
    total_production_kw: float
    total_consumption_kw: float
    imbalance_kw: float
    balanced_net_kw: float
    shortfall_kw: float
    clearing_price: float | None  # None: nothing cleared
    production_kw: float
    consumption_kw: float
    activation_kw: float
    flex_up_kw: float
    price_up: float
    flex_down_kw: float
    price_down: float
    storage_failing: bool


class Meter:
    """The poll loop's side: counts frames, times their handling, publishes Snapshots.

    Only the poll loop calls it. `publish` hands each Snapshot to the collector by rebinding
    one attribute; nothing the Meter keeps is ever read by another thread.
    """

    def __init__(self, collector: SnapshotCollector) -> None:
        self._collector = collector
        self._in: dict[type, list[int]] = {}  # message class -> [messages, bytes]
        self._out: dict[type, list[int]] = {}
        self._handling: dict[type, list[int]] = {}  # class -> count per bucket, +Inf last
        self._handling_s: dict[type, float] = {}  # class -> sum of seconds
        self._links: dict[str, tuple[str, int | None]] = {}  # endpoint -> (state, nonce)
        self._link_changes: dict[str, int] = {}
        self._changed = True  # something may differ from the last Snapshot
        self._published_at = -math.inf  # monotonic

    # -------------------------------------------------------------- the hot path (cheap)

    def handled(self, message: object, size: int, seconds: float) -> None:
        """A frame of `size` bytes came in and took `seconds` to decode, handle and act on."""
        kind = type(message)
        entry = self._in.get(kind)
        if entry is None:
            entry = self._in[kind] = [0, 0]
            self._handling[kind] = [0] * (len(HANDLING_BUCKETS_S) + 1)
            self._handling_s[kind] = 0.0
        entry[0] += 1
        entry[1] += size
        self._handling[kind][bisect.bisect_left(HANDLING_BUCKETS_S, seconds)] += 1
        self._handling_s[kind] += seconds

    def sent(self, message: object, size: int) -> None:
        """A frame of `size` bytes left (a socket took it)."""
        kind = type(message)
        entry = self._out.get(kind)
        if entry is None:
            entry = self._out[kind] = [0, 0]
        entry[0] += 1
        entry[1] += size

    # -------------------------------------------------------------- once per loop turn

    def turn(self, core: Core, runtime_counters: Mapping[str, int], now: float, active: bool
             ) -> float:
        """The end of a loop turn (`active`: it handled a frame, a timer or a device step, so
        something may have changed). Publishes if due; returns when the next one is due
        (monotonic), for the loop's poll timeout."""
        if active:
            self._observe_links(core.siblings)
            self._changed = True
        if now >= self.next_due():
            self.publish(core, runtime_counters, now)
        return self.next_due()

    def next_due(self) -> float:
        wait = SNAPSHOT_INTERVAL_S if self._changed else SNAPSHOT_MAX_AGE_S
        return self._published_at + wait

    def _observe_links(self, siblings: Mapping[str, Sibling]) -> None:
        """Count the link state changes since the last turn. The core keeps no such count (only
        `link_flaps`), so its siblings are compared with what the last turn saw: a change and
        its reversal within one loop turn are not seen. A sibling's restart (UP with a new
        nonce) counts as entering UP again; a new sibling counts once it leaves CONNECTING."""
        seen = self._links
        for endpoint, sib in siblings.items():
            state = (sib.state.value, sib.nonce)
            before = seen.get(endpoint)
            if before != state:
                if before is not None or sib.state is not LinkState.CONNECTING:
                    self._link_changes[state[0]] = self._link_changes.get(state[0], 0) + 1
                seen[endpoint] = state
        if len(seen) != len(siblings):  # unlinked or expired: no longer a link to watch
            for endpoint in [e for e in seen if e not in siblings]:
                del seen[endpoint]

    def publish(self, core: Core, runtime_counters: Mapping[str, int], now: float) -> None:
        """Copy everything a scrape shows into a new Snapshot and hand it over."""
        total_net, total_production, total_consumption = core.totals(now)
        balance = core.balance_view(now)
        flex = core.flex
        states: dict[str, int] = {}
        for sib in core.siblings.values():
            states[sib.state.value] = states.get(sib.state.value, 0) + 1
        counters = {**core.counters, "adverts_evicted": core.table.evicted, **runtime_counters}
        traffic = tuple((direction, type_name(kind), n, size)
                        for direction, table in (("in", self._in), ("out", self._out))
                        for kind, (n, size) in table.items())
        snapshot = Snapshot(
            node_id=core.id,
            at_unix_s=time.time(),
            traffic=traffic,
            handling=tuple((type_name(kind), tuple(counts), self._handling_s[kind])
                           for kind, counts in self._handling.items()),
            counters=tuple((key, counters[key]) for key in COUNTERS if key in counters),
            link_changes=tuple(self._link_changes.items()),
            siblings=tuple(states.items()),
            island_size=len(core.island(now)),
            known_nodes=len(core.table),
            total_net_kw=total_net,
            total_production_kw=total_production,
            total_consumption_kw=total_consumption,
            imbalance_kw=balance["imbalance_kw"],
            balanced_net_kw=balance["balanced_net_kw"],
            shortfall_kw=balance["shortfall_kw"],
            clearing_price=balance["clearing_price"],
            production_kw=core.production,
            consumption_kw=core.consumption,
            activation_kw=core.activation_kw,
            flex_up_kw=flex.flex_up_kw,
            price_up=flex.price_up,
            flex_down_kw=flex.flex_down_kw,
            price_down=flex.price_down,
            storage_failing=bool(core.storage_error),
        )
        self._collector.latest = snapshot  # one reference rebound: atomic for the reader
        self._published_at, self._changed = now, False


class SnapshotCollector(Collector):
    """The server threads' side: turns the newest Snapshot into metric families.

    `latest` is the only thing it shares with the poll loop (see the module docstring)."""

    def __init__(self) -> None:
        self.latest: Snapshot | None = None

    def collect(self) -> Iterable[Metric]:
        snap = self.latest  # read once: the loop may publish a newer one meanwhile
        if snap is None:  # the node has not started its loop yet
            return []
        return list(_families(snap))


def _families(s: Snapshot) -> Iterator[Metric]:
    info = InfoMetricFamily("zgrid_node", "This node's id and zgrid version.",
                            labels=["id", "version"])
    info.add_metric([s.node_id, __version__], {})
    yield info
    yield GaugeMetricFamily("zgrid_snapshot_timestamp_seconds", "Unix time at which the poll "
                            f"loop published these values (at least every "
                            f"{SNAPSHOT_MAX_AGE_S:g} s while it runs).", value=s.at_unix_s)

    messages = CounterMetricFamily("zgrid_messages", "Frames received (in) and sent (out), by "
                                   "message type; invalid: frames that did not decode.",
                                   labels=["direction", "type"])
    size = CounterMetricFamily("zgrid_message_bytes", "Bytes of those frames (the message "
                               "frame, without the routing envelope).",
                               labels=["direction", "type"])
    for direction, kind, n, nbytes in s.traffic:
        messages.add_metric([direction, kind], n)
        size.add_metric([direction, kind], nbytes)
    yield messages
    yield size

    handling = HistogramMetricFamily(
        "zgrid_message_handling_seconds", "Time the poll loop took to decode, handle and act "
        "on one received frame (sends and replies included; the group-commit save is not).",
        labels=["type"])
    for kind, counts, total_s in s.handling:
        cumulative, buckets = 0, []
        for bound, count in zip((*HANDLING_BUCKETS_S, math.inf), counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == math.inf else repr(bound), float(cumulative)))
        handling.add_metric([kind], buckets, sum_value=total_s)
    yield handling

    for key, value in s.counters:
        name, doc = COUNTERS[key]
        yield CounterMetricFamily(name, doc, value=value)
    changes = CounterMetricFamily("zgrid_link_state_changes", "Times a link to a sibling "
                                  "entered this state (up again: also a sibling's restart).",
                                  labels=["state"])
    for state, times in s.link_changes:
        changes.add_metric([state], times)
    yield changes
    siblings = GaugeMetricFamily("zgrid_siblings", "Siblings in each link state now.",
                                 labels=["state"])
    for state, count in s.siblings:
        siblings.add_metric([state], count)
    yield siblings

    gauges: tuple[tuple[str, str, float], ...] = (
        ("zgrid_island_size", "Nodes in this node's island (itself included).", s.island_size),
        ("zgrid_known_nodes", "Nodes in this node's advert table.", s.known_nodes),
        ("zgrid_total_net_kw", "The island's exact total net (production - consumption).",
         s.total_net_kw),
        ("zgrid_total_production_kw", "The island's total production.", s.total_production_kw),
        ("zgrid_total_consumption_kw", "The island's total consumption.",
         s.total_consumption_kw),
        ("zgrid_imbalance_kw", "The island's imbalance before balancing.", s.imbalance_kw),
        ("zgrid_balanced_net_kw", "The island's net with every advertised activation applied.",
         s.balanced_net_kw),
        ("zgrid_shortfall_kw", "What the island's offers could not balance.", s.shortfall_kw),
        ("zgrid_production_kw", "This node's production.", s.production_kw),
        ("zgrid_consumption_kw", "This node's consumption.", s.consumption_kw),
        ("zgrid_activation_kw", "This node's activation: what the clearing asks of it "
         "(+ raises its net).", s.activation_kw),
        ("zgrid_storage_failing", "1 while this node's saves fail, else 0.",
         float(s.storage_failing)),
    )
    for name, doc, reading in gauges:
        yield GaugeMetricFamily(name, doc, value=reading)
    if s.clearing_price is not None:
        yield GaugeMetricFamily("zgrid_clearing_price_per_kwh", "The island's clearing price.",
                                value=s.clearing_price)
    flex = GaugeMetricFamily("zgrid_flex_kw", "This node's flexibility offer: kW it can raise "
                             "(up) or lower (down) its net by.", labels=["direction"])
    price = GaugeMetricFamily("zgrid_flex_price_per_kwh", "The price of that offer.",
                              labels=["direction"])
    for direction, kw, per_kwh in (("up", s.flex_up_kw, s.price_up),
                                   ("down", s.flex_down_kw, s.price_down)):
        flex.add_metric([direction], kw)
        price.add_metric([direction], per_kwh)
    yield flex
    yield price


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per scrape, daemon so a stuck scrape never holds the process up."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per scrape on stderr: the node's log is for events."""


class MetricsServer:
    """The HTTP endpoint (any path serves the metrics, as prometheus_client's server does).

    Like prometheus_client.start_http_server (the same WSGI app, a registry of our own), but
    its thread checks for shutdown every SERVE_POLL_S instead of 0.5 s, so a node stops
    promptly. Raises OSError if the address cannot be bound (in use, unknown host ...)."""

    def __init__(self, host: str, port: int) -> None:
        self.collector = SnapshotCollector()
        self.meter = Meter(self.collector)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        # The address family the host needs (an IPv6 host on an AF_INET socket fails).
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]

        class FamilyServer(_Server):
            address_family = family

        self._httpd = make_server(host, port, make_wsgi_app(registry), FamilyServer,
                                  handler_class=_QuietHandler)
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": SERVE_POLL_S},
                                        name="zgrid-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket (waits at most ~SERVE_POLL_S)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(STOP_JOIN_S)


def address(host: str, port: int) -> str:
    """host:port as a person (and a URL) writes it: [::1]:9100 for IPv6."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
