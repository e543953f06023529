"""The deterministic simulator: many unmodified `Core`s, one event heap, one virtual clock.

What this file is for
=====================

The core (zgrid/core.py) is sans-IO: events and the current time go in, effects come out. This
module plays the part of the network and the clock for thousands of cores in one process:

- one `heapq` of events (deliveries, timers, scheduled actions), one virtual clock `now`, one
  seeded `random.Random`; every random choice (latency, loss, duplication, nonces, values,
  topology seeds) comes from that generator, so a seed and the arguments fix the whole run;
- each `Send`/`SendOnce` effect becomes a delivery after a sampled latency, subject to per-link
  loss, duplication and cut links; after a node has handled every event of one instant the
  simulator calls `core.flush(now)` (the runtime's "drain the mailbox, then flush");
- faults on a schedule: cut/restore links, crash (drop the core, keep its last `Persist`) and
  restart (a new `Core` with a new nonce restored from that state), freeze/thaw (deliveries and
  timers are held, then released);
- measurement: per-change convergence (virtual seconds and hops), messages and bytes per change,
  cold-start convergence, and `agreed` (every island holds the bit-identical exact total).

What it must never do
=====================

- Duplicate protocol logic: it only moves messages and time. Links are made by feeding cores
  `LinkRequest`s; values change by `SetRequest`s. The one exception is `preload_converged`,
  which, by name and on purpose, writes an already-agreed state into fresh cores so a 10,000
  node run does not spend its budget on a cold start (see docs/simulator.md).
- Read the wall clock inside the simulation logic (only `wall_s` is measured with it).
- Order events by iterating a set or dict of strings in a way that depends on PYTHONHASHSEED:
  ties in the heap are broken by a sequence number, node order is the integer index.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import heapq
import json
import math
import random
import resource
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import click
import networkx as nx

from zgrid import wire
from zgrid.core import (
    Config,
    Connect,
    Core,
    Disconnect,
    Effect,
    LinkState,
    Log,
    LogLevel,
    Persist,
    PersistedState,
    Publish,
    Respond,
    Send,
    SendOnce,
    _entry_hash,
    _Sibling,
    _units,
)
from zgrid.errors import ProtocolError
from zgrid.wire import Advert, Adverts, LinkRequest, SetRequest, UnlinkRequest

DEFAULT_LATENCY_S = 60e-6  # one loopback hop through ZeroMQ on a laptop
ENDPOINT_PORT = 7000
CONTROL_CLIENT: tuple[bytes, ...] = (b"zgrid-sim",)
SAMPLE_EVERY_MESSAGES = 64  # --wire fast: encode+decode one message in this many
EXACT_DIAMETER_MAX_NODES = 2000  # above this, nx.diameter (all-pairs BFS) costs minutes
PROGRESS_EVERY_EVENTS = 1 << 14
MIN_TIMER_STEP_S = 1e-9  # guards against a timer that keeps asking to run at the same instant
TOPOLOGIES = ("line", "ring", "grid", "random-regular", "small-world", "scale-free", "edges")
WIRE_MODES = ("full", "fast")

# Event kinds; the heap holds (time, seq, kind, dst, src, payload). `seq` is unique, so tuples
# never compare past it and ties are broken in scheduling order, identically in every process.
_DELIVER, _TIMER, _ACTION = 0, 1, 2
_TYPE_CODE = {"Hello": 1, "Adverts": 2, "DigestMsg": 3, "Ping": 4, "Bye": 5}

Event = tuple[float, int, int, int, int, Any]


class SimError(ValueError):
    """A scenario the simulator cannot run (bad topology parameters, unreadable file ...)."""


# --------------------------------------------------------------------------------- network model


@dataclass(frozen=True, slots=True)
class Latency:
    """One-way delay of a message: constant, uniform(low, high) or lognormal(median, sigma)."""

    kind: str = "constant"
    a_s: float = DEFAULT_LATENCY_S
    b: float = 0.0

    def sample(self, rng: random.Random) -> float:
        if self.kind == "constant":
            return self.a_s
        if self.kind == "uniform":
            return rng.uniform(self.a_s, self.b)
        return self.a_s * math.exp(rng.gauss(0.0, self.b))

    @property
    def median_s(self) -> float:
        return (self.a_s + self.b) / 2 if self.kind == "uniform" else self.a_s

    @classmethod
    def parse(cls, text: str) -> Latency:
        """`60e-6`, `constant:60e-6`, `uniform:40e-6:80e-6` or `lognormal:60e-6:0.5`."""
        parts = text.split(":")
        try:
            numbers = [float(p) for p in parts[1:]] if not _is_number(parts[0]) else [
                float(parts[0])]
        except ValueError:
            raise SimError(f"latency {text!r}: numbers expected after the kind") from None
        kind = "constant" if _is_number(parts[0]) else parts[0]
        shapes = {"constant": 1, "uniform": 2, "lognormal": 2}
        if kind not in shapes or len(numbers) != shapes[kind]:
            raise SimError(f"latency {text!r}: use SECONDS, constant:S, uniform:LOW:HIGH or "
                           "lognormal:MEDIAN:SIGMA")
        if not all(math.isfinite(x) and x >= 0 for x in numbers):
            raise SimError(f"latency {text!r}: values must be finite and >= 0")
        if kind == "uniform" and numbers[1] < numbers[0]:
            raise SimError(f"latency {text!r}: HIGH must be >= LOW")
        return cls(kind, numbers[0], numbers[1] if len(numbers) > 1 else 0.0)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class LinkModel:
    """How one link (both directions) treats a message."""

    latency: Latency = field(default_factory=Latency)
    loss: float = 0.0
    duplicate: float = 0.0
    # Messages on one link arrive in order (ZeroMQ over TCP is FIFO per connection) unless this
    # probability lets one take its own sampled latency and overtake earlier ones.
    reorder: float = 0.0


# --------------------------------------------------------------------------------- measurements


@dataclass(slots=True)
class Change:
    """One SetRequest being tracked until every member of its island holds the new advert."""

    origin: int
    incarnation: int
    seq: int
    at_s: float
    target: int  # island size of the origin (true graph) when the change was made
    eccentricity: int  # hops from the origin to the farthest member of its island
    hops: dict[int, int] = field(default_factory=dict)
    max_hops: int = 0
    converged_at_s: float | None = None
    superseded: bool = False
    messages: int = 0
    bytes: float = 0.0

    @property
    def converge_s(self) -> float | None:
        return None if self.converged_at_s is None else self.converged_at_s - self.at_s


@dataclass(slots=True)
class Agreement:
    agreed: bool
    islands: int
    checked_nodes: int
    problems: list[str]


@dataclass(slots=True)
class Stats:
    events: int = 0
    delivered: int = 0
    delivered_bytes: int = 0
    sampled_messages: int = 0
    sampled_bytes: int = 0
    timers: int = 0
    actions: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    dropped_cut: int = 0
    dropped_dead: int = 0
    dropped_unconnected: int = 0
    dropped_unknown: int = 0
    bad_frames: int = 0
    warnings: int = 0


# --------------------------------------------------------------------------------- simulator


class Simulator:
    """Many cores, one virtual clock. Node `i` has id `names[i]` and endpoint `endpoints[i]`."""

    def __init__(
        self,
        names: Sequence[str],
        *,
        seed: int = 1,
        link: LinkModel | None = None,
        wire_mode: str = "full",
        ping_interval_s: float = 0.25,
        dead_after_s: float = 1.0,
        forget_after_s: float = 600.0,
        track_view: bool = False,
        keep_logs: bool = False,
        track_crossings: bool = False,
    ) -> None:
        if wire_mode not in WIRE_MODES:
            raise SimError(f"wire mode must be one of {', '.join(WIRE_MODES)}")
        self.rng = random.Random(seed)
        self.names = list(names)
        self.n = len(self.names)
        self.index = {name: i for i, name in enumerate(self.names)}
        if len(self.index) != self.n:
            raise SimError("node ids must be unique")
        self.endpoints = [f"tcp://{name}:{ENDPOINT_PORT}" for name in self.names]
        self.endpoint_index = {ep: i for i, ep in enumerate(self.endpoints)}
        self.default_link = link or LinkModel()
        self.link_overrides: dict[tuple[int, int], LinkModel] = {}
        self.cut: set[tuple[int, int]] = set()  # membership only, never iterated for order
        self.wire_mode = wire_mode
        self.core_params = {"ping_interval_s": ping_interval_s, "dead_after_s": dead_after_s,
                            "forget_after_s": forget_after_s, "track_view": track_view}
        self.keep_logs = keep_logs
        self.track_crossings = track_crossings

        self.now = 0.0
        self.heap: list[Event] = []
        self._seq = 0
        n = self.n
        self.cores: list[Core | None] = [None] * n
        self.frozen = [False] * n
        self.held: list[list[Event]] = [[] for _ in range(n)]
        self.timer_at = [math.inf] * n
        self.timer_ran_at = [-math.inf] * n
        self.connected: list[set[int]] = [set() for _ in range(n)]
        self.persisted: list[PersistedState | None] = [None] * n
        self.values: list[tuple[float, float]] = [(0.0, 0.0)] * n
        # The true graph: pairs the operator linked (adjacency of ints, membership only).
        self.adjacency: list[set[int]] = [set() for _ in range(n)]
        self._dirty: list[int] = []
        self._is_dirty = [False] * n

        # Convergence bookkeeping: O(1) per advert delivered.
        self.own: list[Advert | None] = [None] * n  # each live origin's current advert
        self.held_count = [0] * n  # how many live nodes hold origin's current advert
        self.held_total = 0
        self.active: dict[int, Change] = {}  # origin -> its latest tracked change
        self.counting: dict[str, Change] = {}  # the same, keyed by origin id (hot path)
        self.changes: list[Change] = []
        self.crossings: dict[tuple[int, int, int, int, int], int] = {}
        self.watch_cold_start = False
        self.cold_start_converged_s: float | None = None
        self.stop_requested = False

        self.stats = Stats()
        self._trace = hashlib.blake2b(digest_size=16)
        self._encode_cache: tuple[object, bytes] | None = None
        self._last_arrival: dict[tuple[int, int], float] = {}  # per directed link (FIFO)
        self._sample_counter = 0
        self.replies: list[tuple[float, int, wire.Reply]] = []
        self.logs: deque[tuple[float, int, LogLevel, str]] = deque(maxlen=10_000)
        self.progress: Callable[[float], None] | None = None
        self.loop_wall_s = 0.0  # wall time spent inside run_until (speed measurement only)

    # ------------------------------------------------------------------ scheduling

    def _push(self, t: float, kind: int, dst: int, src: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (t, self._seq, kind, dst, src, payload))

    def at(self, t: float, action: Callable[[], object], node: int = -1) -> None:
        """Run `action` at virtual time `t` (held while `node` is frozen, if given)."""
        self._push(max(t, self.now), _ACTION, node, -1, action)

    # ------------------------------------------------------------------ node lifecycle

    def _config(self, i: int) -> Config:
        return Config(self.names[i], self.endpoints[i], self.rng.getrandbits(64),
                      **self.core_params)  # type: ignore[arg-type]

    def start_node(self, i: int, production: float = 0.0, consumption: float = 0.0) -> None:
        """Boot a fresh node now: a new Core, `start`, then its initial values via SetRequest."""
        if self.cores[i] is not None:
            raise SimError(f"{self.names[i]} is already running")
        self.cores[i] = Core(self._config(i))
        self._handle(i, self.cores[i].start(self.now))  # type: ignore[union-attr]
        if production or consumption:
            reply = self.control(i, SetRequest(production, consumption))
            if reply is None or not reply.ok:
                raise SimError(f"{self.names[i]}: initial values refused: "
                               f"{reply.message if reply else 'no reply'}")
        self.values[i] = (production, consumption)

    def crash(self, i: int) -> None:
        """Kill the process: in-memory state and in-flight inbound messages are gone."""
        core = self.cores[i]
        if core is None:
            return
        for origin, advert in core.adverts.items():  # it no longer holds anything
            o = self.index.get(origin)
            if o is not None and advert is self.own[o]:
                self.held_count[o] -= 1
                self.held_total -= 1
        self.cores[i] = None
        self.frozen[i] = False
        self.held[i].clear()
        self.connected[i].clear()
        self.timer_at[i] = math.inf

    def restart(self, i: int, wiped: bool = False) -> None:
        """Start again from what was persisted (a new process: new nonce, next incarnation).

        wiped: the data directory was lost, so the node starts as if new (incarnation 1).
        """
        if self.cores[i] is not None:
            return
        if wiped:
            self.persisted[i] = None
        core = self.cores[i] = Core(self._config(i), restored=self.persisted[i])
        self._handle(i, core.start(self.now))

    def freeze(self, i: int) -> None:
        self.frozen[i] = True

    def thaw(self, i: int) -> None:
        """Release what was held, in arrival order, at the current instant."""
        if not self.frozen[i]:
            return
        self.frozen[i] = False
        held, self.held[i] = self.held[i], []
        for _t, _seq, kind, dst, src, payload in held:
            self._push(self.now, kind, dst, src, payload)
        self._mark_dirty(i)

    # ------------------------------------------------------------------ links and values

    def _pair(self, i: int, j: int) -> tuple[int, int]:
        return (i, j) if i < j else (j, i)

    def link(self, i: int, j: int) -> wire.Reply | None:
        """The operator links i to j: a LinkRequest to i naming j (the real protocol path)."""
        reply = self.control(i, LinkRequest(f"{self.names[j]}@{self.endpoints[j]}"))
        if reply is not None and reply.ok:
            self.adjacency[i].add(j)
            self.adjacency[j].add(i)
        return reply

    def unlink(self, i: int, j: int) -> wire.Reply | None:
        """The operator unlinks j from i (only i is told; j hears BYE if the link is up)."""
        reply = self.control(i, UnlinkRequest(self.names[j]))
        if reply is not None and reply.ok:
            self.adjacency[i].discard(j)
            self.adjacency[j].discard(i)
        return reply

    def set_value(self, i: int, production: float | None = None,
                  consumption: float | None = None, track: bool = False) -> wire.Reply | None:
        reply = self.control(i, SetRequest(production, consumption))
        core = self.cores[i]
        if core is not None and reply is not None and reply.ok:
            self.values[i] = (core.production, core.consumption)
            if track:
                self._track_change(i)
        return reply

    def cut_links(self, pairs: Sequence[tuple[int, int]]) -> None:
        self.cut.update(self._pair(i, j) for i, j in pairs)

    def restore_links(self, pairs: Sequence[tuple[int, int]]) -> None:
        for i, j in pairs:
            self.cut.discard(self._pair(i, j))

    def set_link_model(self, i: int, j: int, model: LinkModel) -> None:
        self.link_overrides[self._pair(i, j)] = model

    def control(self, i: int, req: Any) -> wire.Reply | None:
        """Hand a control request to node i now; its reply (None if the node is down)."""
        core = self.cores[i]
        if core is None or self.frozen[i]:
            return None  # a dead or frozen process answers nothing
        before = len(self.replies)
        self._handle(i, core.request(CONTROL_CLIENT, req, self.now))
        return self.replies[-1][2] if len(self.replies) > before else None

    # ------------------------------------------------------------------ the true graph

    def alive(self, i: int) -> bool:
        return self.cores[i] is not None and not self.frozen[i]

    def true_neighbors(self, i: int) -> list[int]:
        return sorted(j for j in self.adjacency[i]
                      if self.alive(j) and self._pair(i, j) not in self.cut)

    def component(self, i: int) -> list[int]:
        """i's connected component of the true graph (live, unfrozen nodes; uncut links)."""
        if not self.alive(i):
            return []
        seen = {i}
        stack = [i]
        while stack:
            x = stack.pop()
            for y in self.true_neighbors(x):
                if y not in seen:
                    seen.add(y)
                    stack.append(y)
        return sorted(seen)

    def components(self) -> list[list[int]]:
        seen: set[int] = set()
        out = []
        for i in range(self.n):
            if i not in seen and self.alive(i):
                comp = self.component(i)
                seen.update(comp)
                out.append(comp)
        return out

    def _reach(self, i: int) -> tuple[int, int]:
        """(size of i's component, eccentricity of i in it): one BFS, O(component)."""
        depth = {i: 0}
        queue = deque([i])
        cores, frozen, cut = self.cores, self.frozen, self.cut
        while queue:
            x = queue.popleft()
            dx = depth[x] + 1
            for y in self.adjacency[x]:
                if (y not in depth and cores[y] is not None and not frozen[y]
                        and not (cut and self._pair(x, y) in cut)):
                    depth[y] = dx
                    queue.append(y)
        return len(depth), max(depth.values())

    # ------------------------------------------------------------------ measurement

    def _track_change(self, i: int) -> None:
        own = self.own[i]
        assert own is not None
        size, eccentricity = self._reach(i) if self.alive(i) else (1, 0)
        change = Change(i, own.incarnation, own.seq, self.now, size, eccentricity, hops={i: 0})
        if size <= self.held_count[i]:
            change.converged_at_s = self.now
        self.active[i] = change
        self.counting[self.names[i]] = change
        self.changes.append(change)

    def check_agreement(self, strict: bool = False) -> Agreement:
        """Every component's members hold the bit-identical total equal to the true fsum.

        strict: also require each member's island to be exactly its component (no node counts
        a node it cannot reach). That reads every node's island: O(N) per node.
        """
        problems: list[str] = []
        comps = self.components()
        checked = 0
        for comp in comps:
            terms: list[float] = []
            for i in comp:
                core = self.cores[i]
                assert core is not None
                terms += (core.production, -core.consumption)
            expected = math.fsum(terms)
            names = sorted(self.names[i] for i in comp) if strict else []
            for i in comp:
                core = self.cores[i]
                assert core is not None
                checked += 1
                total = core.totals(self.now)[0]
                if total.hex() != expected.hex():
                    problems.append(f"{self.names[i]}: total {total!r} != {expected!r} "
                                    f"(island of {len(comp)})")
                if strict:
                    island = core.watch_view(self.now)["island"]
                    if island != names:
                        problems.append(f"{self.names[i]}: island {island} != true {names}")
            if len(problems) > 20:
                break
        return Agreement(not problems, len(comps), checked, problems[:20])

    def trace_hash(self) -> str:
        return self._trace.hexdigest()

    # ------------------------------------------------------------------ the event loop

    def run_until(self, t_end: float, stop_when_converged: bool = False) -> None:
        """Process every event up to virtual time t_end (inclusive); then now = t_end."""
        started = time.perf_counter()  # wall clock: measurement only
        try:
            self._run_until(t_end, stop_when_converged)
        finally:
            self.loop_wall_s += time.perf_counter() - started

    def _run_until(self, t_end: float, stop_when_converged: bool) -> None:
        heap = self.heap
        stats = self.stats
        self.stop_requested = False
        next_progress = stats.events + PROGRESS_EVERY_EVENTS
        while True:
            if self._dirty and (not heap or heap[0][0] > self.now):
                self._flush_dirty()
                if stop_when_converged and self.stop_requested:
                    return
                continue
            if not heap or heap[0][0] > t_end:
                break
            t, _seq, kind, dst, src, payload = heapq.heappop(heap)
            self.now = t
            stats.events += 1
            if kind == _DELIVER:
                self._deliver(t, dst, src, payload)
            elif kind == _TIMER:
                self._fire_timer(t, dst)
            else:
                if dst >= 0 and self.frozen[dst]:
                    self.held[dst].append((t, _seq, kind, dst, src, payload))
                    continue
                stats.actions += 1
                payload()
            if stats.events >= next_progress:
                next_progress = stats.events + PROGRESS_EVERY_EVENTS
                if self.progress is not None:
                    self.progress(self.now)
        self.now = max(self.now, t_end)

    def _fire_timer(self, t: float, i: int) -> None:
        if self.timer_at[i] != t:
            return  # superseded by a later reschedule
        self.timer_at[i] = math.inf
        core = self.cores[i]
        if core is None or self.frozen[i]:
            return  # a frozen node's timer waits for thaw (thaw reschedules it)
        self.stats.timers += 1
        self.timer_ran_at[i] = t
        self._handle(i, core.timer(t))

    def _deliver(self, t: float, dst: int, src: int, payload: Any) -> None:
        core = self.cores[dst]
        stats = self.stats
        if core is None:
            stats.dropped_dead += 1
            return
        if self.frozen[dst]:
            self.held[dst].append((t, 0, _DELIVER, dst, src, payload))
            return
        stats.delivered += 1
        if type(payload) is bytes:
            size = len(payload)
            stats.delivered_bytes += size
            self._trace.update(struct.pack("<dII", t, dst, size))
            self._trace.update(payload)
            try:
                msg = wire.decode(payload)
            except ProtocolError as exc:
                stats.bad_frames += 1
                self._handle(dst, core.bad_frame(CONTROL_CLIENT, exc, True, t))
                return
        else:
            msg, size = payload
            stats.delivered_bytes += size
            self._trace.update(struct.pack("<dIIB", t, dst, src, _TYPE_CODE[type(msg).__name__]))
        if type(msg) is Adverts:
            self._deliver_adverts(t, dst, src, core, msg, size)
        else:
            self._handle(dst, core.receive(msg, t))  # type: ignore[arg-type]

    def _deliver_adverts(self, t: float, dst: int, src: int, core: Core, msg: Adverts,
                         size: int) -> None:
        # Before/after comparison of the receiver's table: counts who holds each origin's
        # current advert (cold start and change convergence) at O(1) per advert.
        # Outside a cold start only origins with a tracked change are looked at, so the
        # common case is one dict lookup per advert.
        table = core.adverts
        track_all = self.watch_cold_start
        counting = self.counting
        own = self.own
        share = size / len(msg.adverts) if msg.adverts else 0.0
        candidates = []
        for a in msg.adverts:
            change = counting.get(a.origin)
            if change is not None:
                o = change.origin
            elif track_all:
                o = self.index.get(a.origin, -1)
                if o < 0:
                    continue
            else:
                continue
            cur = own[o]
            if cur is None or a.seq != cur.seq or a.incarnation != cur.incarnation:
                continue
            if change is not None and change.seq == a.seq and change.incarnation == a.incarnation:
                change.messages += 1
                change.bytes += share
                if self.track_crossings:
                    key = (o, a.incarnation, a.seq, src, dst)
                    self.crossings[key] = self.crossings.get(key, 0) + 1
                if not track_all and change.converged_at_s is not None:
                    continue
            elif not track_all:
                continue
            old = table.get(a.origin)
            if old is None or old.version != cur.version:
                candidates.append((o, a.origin, cur))
        self._handle(dst, core.receive(msg, t))
        for o, origin, cur in candidates:
            new = table.get(origin)
            if new is None or new.version != cur.version or own[o] is not cur:
                continue
            self.held_count[o] += 1
            self.held_total += 1
            change = self.active.get(o)
            if change is not None and change.seq == cur.seq and change.converged_at_s is None:
                hops = change.hops.get(src, 0) + 1
                change.hops[dst] = hops
                if hops > change.max_hops:
                    change.max_hops = hops
                if self.held_count[o] >= change.target:
                    change.converged_at_s = t
        if self.watch_cold_start and self.held_total >= self._cold_target:
            self._check_cold_start(t)

    # ------------------------------------------------------------------ effects

    def _mark_dirty(self, i: int) -> None:
        if not self._is_dirty[i]:
            self._is_dirty[i] = True
            self._dirty.append(i)

    def _handle(self, i: int, effects: list[Effect], mark: bool = True) -> None:
        core = self.cores[i]
        for effect in effects:
            kind = type(effect)
            if kind is Send:
                self._send(i, effect.endpoint, effect.message, True)  # type: ignore[union-attr]
            elif kind is SendOnce:
                self._send(i, effect.endpoint, effect.message, False)  # type: ignore[union-attr]
            elif kind is Connect:
                j = self.endpoint_index.get(effect.endpoint)  # type: ignore[union-attr]
                if j is not None:
                    self.connected[i].add(j)
            elif kind is Disconnect:
                j = self.endpoint_index.get(effect.endpoint)  # type: ignore[union-attr]
                if j is not None:
                    self.connected[i].discard(j)
            elif kind is Persist:
                self.persisted[i] = effect.state  # type: ignore[union-attr]
            elif kind is Respond:
                self.replies.append((self.now, i, effect.reply))  # type: ignore[union-attr]
            elif kind is Log:
                level = effect.level  # type: ignore[union-attr]
                if level is not LogLevel.DEBUG and level is not LogLevel.INFO:
                    self.stats.warnings += 1
                if self.keep_logs:
                    self.logs.append((self.now, i, level, effect.text))  # type: ignore[union-attr]
            elif kind is not Publish:
                raise AssertionError(f"unknown effect {effect!r}")
        if core is not None:
            own = core.adverts[core.id]
            if own is not self.own[i]:
                self._own_bumped(i, own)
            if mark:
                self._mark_dirty(i)

    def _own_bumped(self, i: int, own: Advert) -> None:
        self.own[i] = own
        self.held_total += 1 - self.held_count[i]
        self.held_count[i] = 1  # every other copy is now stale
        change = self.active.get(i)
        if change is not None and change.converged_at_s is None and change.seq != own.seq:
            change.superseded = True
        if self.watch_cold_start:
            self._cold_links_ok[i] = own.links == self._cold_expected_links[i]

    def _send(self, i: int, endpoint: str, msg: wire.PeerMessage, needs_connection: bool) -> None:
        stats = self.stats
        j = self.endpoint_index.get(endpoint)
        if j is None:
            stats.dropped_unknown += 1
            return
        if needs_connection and j not in self.connected[i]:
            stats.dropped_unconnected += 1  # the runtime has no DEALER there either
            return
        pair = (i, j) if i < j else (j, i)
        if self.cut and pair in self.cut:
            stats.dropped_cut += 1
            return
        model = self.link_overrides.get(pair, self.default_link) if self.link_overrides \
            else self.default_link
        rng = self.rng
        if model.loss and rng.random() < model.loss:
            stats.lost += 1
            return
        payload: Any
        if self.wire_mode == "full":
            cache = self._encode_cache
            if cache is not None and cache[0] is msg:
                payload = cache[1]
            else:
                payload = wire.encode(msg)
                self._encode_cache = (msg, payload)
        else:
            payload = (msg, self._sample_size(msg))
        self._push(self._arrival(i, j, model), _DELIVER, j, i, payload)
        if model.duplicate and rng.random() < model.duplicate:
            stats.duplicated += 1
            self._push(self._arrival(i, j, model), _DELIVER, j, i, payload)

    def _arrival(self, i: int, j: int, model: LinkModel) -> float:
        at = self.now + model.latency.sample(self.rng)
        if model.reorder and self.rng.random() < model.reorder:
            self.stats.reordered += 1
            return at
        last = self._last_arrival.get((i, j), at)
        if at < last:
            at = last  # FIFO: equal times keep send order (the heap breaks ties by seq)
        self._last_arrival[(i, j)] = at
        return at

    def _sample_size(self, msg: wire.PeerMessage) -> int:
        """--wire fast: encode and decode one message in SAMPLE_EVERY_MESSAGES, check it.

        Returns the encoded size of the sampled message and 0 for the others; bytes per change
        are then estimated from the sample (see `estimated_bytes_factor`).
        """
        self._sample_counter += 1
        if self._sample_counter % SAMPLE_EVERY_MESSAGES:
            return 0
        frame = wire.encode(msg)
        if wire.decode(frame) != msg:
            raise AssertionError(f"wire round trip changed {msg!r}")
        self.stats.sampled_messages += 1
        self.stats.sampled_bytes += len(frame)
        return len(frame) * SAMPLE_EVERY_MESSAGES

    def _flush_dirty(self) -> None:
        now = self.now
        dirty, self._dirty = self._dirty, []
        for i in dirty:
            self._is_dirty[i] = False
            core = self.cores[i]
            if core is None or self.frozen[i]:
                continue
            effects = core.flush(now)
            if effects:
                self._handle(i, effects, mark=False)
            deadline = core.next_deadline()
            if deadline <= now and self.timer_ran_at[i] == now:
                deadline = now + MIN_TIMER_STEP_S
            deadline = max(deadline, now)
            if deadline != self.timer_at[i]:
                self.timer_at[i] = deadline
                self._push(deadline, _TIMER, i, -1, None)

    # ------------------------------------------------------------------ cold start

    def watch_for_cold_start(self) -> None:
        """Stop `run_until(..., stop_when_converged=True)` once every link is up everywhere
        and every node holds every other node's current advert."""
        self._cold_expected_links = [tuple(sorted(self.names[j] for j in self.true_neighbors(i)))
                                     for i in range(self.n)]
        self._cold_links_ok = [own is not None and own.links == self._cold_expected_links[i]
                               for i, own in enumerate(self.own)]
        self._cold_target = sum(len(c) ** 2 for c in self.components())
        self.watch_cold_start = True
        if self.held_total >= self._cold_target:
            self._check_cold_start(self.now)

    def _check_cold_start(self, t: float) -> None:
        if all(self._cold_links_ok):
            self.cold_start_converged_s = t
            self.watch_cold_start = False
            self.stop_requested = True

    def heal(self) -> None:
        """End every fault now: restore cut links, lossless links, thaw, restart the crashed."""
        self.cut.clear()
        self.link_overrides.clear()
        for i in range(self.n):
            self.thaw(i)
            if self.cores[i] is None:
                self.restart(i)

    def run_until_agreed(self, limit_s: float, step_s: float = 0.25, strict: bool = True
                         ) -> Agreement:
        """Advance in steps until `check_agreement` holds or limit_s more virtual seconds."""
        deadline = self.now + limit_s
        while True:
            agreement = self.check_agreement(strict=strict)
            if agreement.agreed or self.now >= deadline:
                return agreement
            self.run_until(min(deadline, self.now + step_s))

    def all_changes_settled(self) -> bool:
        return all(c.converged_at_s is not None or c.superseded for c in self.changes)


# --------------------------------------------------------------------------------- warm-up


def cold_start(sim: Simulator, edges: Sequence[tuple[int, int]],
               values: Sequence[tuple[float, float]], limit_s: float = 60.0) -> float | None:
    """The protocol path: start every node at t=0 with its values, feed each edge (u, v) to u
    as a LinkRequest, and run until agreement (virtual seconds) or limit_s (None)."""
    for i in range(sim.n):
        sim.start_node(i, *values[i])
    for u, v in edges:
        sim.link(u, v)
    sim.watch_for_cold_start()
    if sim.cold_start_converged_s is None:
        sim.run_until(sim.now + limit_s, stop_when_converged=True)
    return sim.cold_start_converged_s


def converged_sim(edges: Sequence[tuple[int, int]], values: Sequence[tuple[float, float]],
                  seed: int = 1, limit_s: float = 10.0, **options: Any) -> Simulator:
    """A simulator of len(values) nodes n0.. cold-started over `edges` until they agree
    (raises SimError if they do not within limit_s virtual seconds). For tests and notebooks."""
    sim = Simulator([f"n{i}" for i in range(len(values))], seed=seed, **options)
    if cold_start(sim, edges, values, limit_s) is None:
        raise SimError(f"no agreement within {limit_s} virtual seconds")
    sim.run_until(sim.now + 1e-3)  # let the last batch land everywhere
    return sim


def preload_converged(sim: Simulator, edges: Sequence[tuple[int, int]],
                      values: Sequence[tuple[float, float]]) -> None:
    """Install an ALREADY AGREED state into fresh cores, bypassing the protocol's cold start.

    This is a shortcut for scale runs (10,000 nodes), clearly not the protocol path: each core
    gets UP siblings, the full advert table (the same immutable `Advert` objects shared by every
    node, as a real node would hold after a cold start), its island and exact totals, exactly as
    if `link` requests and flooding had already converged. Everything after it (changes,
    flooding, pings, faults) runs the real protocol. Cold start itself is measured by
    `start_cold` at the sizes where it fits.
    """
    n = sim.n
    neighbors: list[list[int]] = [[] for _ in range(n)]
    for u, v in edges:
        neighbors[u].append(v)
        neighbors[v].append(u)
        sim.adjacency[u].add(v)
        sim.adjacency[v].add(u)
    configs = [sim._config(i) for i in range(n)]
    adverts = [Advert(sim.names[i], 1, 2, values[i][0], values[i][1],
                      tuple(sorted(sim.names[j] for j in neighbors[i])), sim.endpoints[i],
                      configs[i].nonce) for i in range(n)]
    component_of: dict[int, int] = {}
    islands: list[frozenset[str]] = []
    units: list[tuple[int, int]] = []
    table: dict[int, dict[str, Advert]] = {}
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from(edges)
    for members in sorted((sorted(c) for c in nx.connected_components(graph)), key=lambda c: c[0]):
        k = len(islands)
        for i in members:
            component_of[i] = k
        islands.append(frozenset(sim.names[i] for i in members))
        units.append((sum(_units(values[i][0]) for i in members),
                      sum(_units(values[i][1]) for i in members)))
        # A node holds only what it could have heard: its own island's adverts.
        table[k] = {sim.names[i]: adverts[i] for i in members}
    hashes: dict[int, int] = {}
    for i in range(n):
        core = Core(configs[i])
        k = component_of[i]
        core.seq = 2
        core.production, core.consumption = values[i]
        core.adverts = dict(table[k])
        if k not in hashes:
            h = 0
            for a in core.adverts.values():
                h ^= _entry_hash(a)
            hashes[k] = h
        core.table_hash = hashes[k]
        for j in neighbors[i]:
            core.siblings[sim.endpoints[j]] = _Sibling(
                sim.endpoints[j], sim.names[j], id=sim.names[j], nonce=configs[j].nonce,
                state=LinkState.UP, last_heard=sim.now)
        core._island = islands[k]  # shared: identical for every member of the island
        core._island_dirty = False
        core._units_production, core._units_consumption = units[k]
        sim.cores[i] = core
        sim.values[i] = values[i]
        sim.own[i] = adverts[i]  # so that start() is not mistaken for a bump
    for i in range(n):
        started = sim.cores[i]
        assert started is not None
        sim._handle(i, started.start(sim.now))
    for island in islands:
        for name in island:
            sim.held_count[sim.index[name]] = len(island)
        sim.held_total += len(island) ** 2


# --------------------------------------------------------------------------------- scenarios


def build_graph(topology: str, nodes: int, degree: int, seed: int,
                edges_file: str | None = None) -> tuple[list[str], list[tuple[int, int]]]:
    """Node ids and edges (index pairs) of a networkx-generated topology, or an edge list."""
    if topology not in TOPOLOGIES:
        raise SimError(f"unknown topology {topology!r}; one of {', '.join(TOPOLOGIES)}")
    if topology == "edges":
        if edges_file is None:
            raise SimError("--topology edges needs --edges FILE")
        return read_edge_list(edges_file)
    if nodes < 1:
        raise SimError("--nodes must be at least 1")
    graph: Any
    if topology == "line":
        graph = nx.path_graph(nodes)
    elif topology == "ring":
        graph = nx.cycle_graph(nodes)
    elif topology == "grid":
        rows = max(1, math.isqrt(nodes))
        grid = nx.grid_2d_graph(rows, -(-nodes // rows))
        keep = sorted(grid.nodes())[:nodes]  # row-major: trimming the last row keeps it connected
        graph = nx.convert_node_labels_to_integers(grid.subgraph(keep), ordering="sorted")
    elif topology == "random-regular":
        if degree >= nodes or (degree * nodes) % 2:
            raise SimError(f"random-regular needs degree < nodes and degree x nodes even "
                           f"(got degree {degree}, nodes {nodes})")
        graph = nx.random_regular_graph(degree, nodes, seed=seed)
    elif topology == "small-world":
        if not 2 <= degree < nodes:
            raise SimError(f"small-world needs 2 <= degree < nodes (got {degree}, {nodes})")
        graph = nx.connected_watts_strogatz_graph(nodes, degree, 0.1, seed=seed)
    else:
        m = max(1, degree // 2)
        if m >= nodes:
            raise SimError(f"scale-free needs degree/2 < nodes (got {degree}, {nodes})")
        graph = nx.barabasi_albert_graph(nodes, m, seed=seed)
    edges = sorted((min(u, v), max(u, v)) for u, v in graph.edges())
    return [f"n{i}" for i in range(nodes)], edges


def read_edge_list(path: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Lines `A B` (node ids; `#` comments). Ids are kept if valid, in order of appearance."""
    names: dict[str, int] = {}
    edges: set[tuple[int, int]] = set()
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split("#", 1)[0].split()
                if not parts:
                    continue
                if len(parts) != 2 or parts[0] == parts[1]:
                    raise SimError(f"{path}:{lineno}: expected two different node ids")
                ids = []
                for part in parts:
                    wire.check_node_id(part, lambda why, n=lineno: SimError(f"{path}:{n}: {why}"))
                    ids.append(names.setdefault(part, len(names)))
                edges.add((min(ids), max(ids)))
    except OSError as exc:
        raise SimError(f"cannot read edge list {path}: {exc.strerror}") from None
    if not names:
        raise SimError(f"{path}: no edges")
    return list(names), sorted(edges)


def read_values(path: str, names: Sequence[str]) -> list[tuple[float, float]]:
    """CSV `id,production,consumption` (header optional); unlisted nodes get 0, 0."""
    index = {name: i for i, name in enumerate(names)}
    out = [(0.0, 0.0)] * len(names)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for lineno, row in enumerate(csv.reader(f), 1):
                if not row or row[0].startswith("#") or (lineno == 1 and row[0] == "id"):
                    continue
                if len(row) != 3:
                    raise SimError(f"{path}:{lineno}: expected id,production,consumption")
                if row[0] not in index:
                    raise SimError(f"{path}:{lineno}: unknown node id {row[0]!r}")
                try:
                    values = [float(row[1]), float(row[2])]
                except ValueError:
                    raise SimError(f"{path}:{lineno}: numbers expected") from None
                checked = tuple(wire.check_power(v, lambda why, n=lineno: SimError(
                    f"{path}:{n}: {why}")) for v in values)
                out[index[row[0]]] = (checked[0], checked[1])
    except OSError as exc:
        raise SimError(f"cannot read values {path}: {exc.strerror}") from None
    return out


def random_values(rng: random.Random, n: int) -> list[tuple[float, float]]:
    """A few producers, many consumers; raw floats so exact summation is really exercised."""
    out = []
    for _ in range(n):
        production = rng.uniform(5.0, 50.0) if rng.random() < 0.2 else rng.uniform(0.0, 3.0)
        out.append((production, rng.uniform(0.2, 6.0)))
    return out


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault window: from `start_s` to `end_s` (virtual seconds after warm-up; end may be
    None: never healed). kind: partition (targets: links), crash, freeze (targets: nodes)."""

    kind: str
    start_s: float
    end_s: float | None
    nodes: tuple[int, ...] = ()
    links: tuple[tuple[int, int], ...] = ()


def parse_fault(kind: str, text: str, names: Sequence[str],
                edges: Sequence[tuple[int, int]]) -> Fault:
    """`START[-END]:TARGETS`. Partition targets: `half`, or links `n1-n2,n3-n4`, or a node set
    `n1+n2+n3` (cut every link between those nodes and the rest). Crash/freeze targets: `n1,n2`.
    """
    index = {name: i for i, name in enumerate(names)}
    when, sep, targets = text.partition(":")
    if not sep or not targets:
        raise SimError(f"--{kind} {text!r}: expected START[-END]:TARGETS, e.g. 0.5-2:n3")
    start_text, dash, end_text = when.partition("-")
    try:
        start = float(start_text)
        end = float(end_text) if dash else None
    except ValueError:
        raise SimError(f"--{kind} {text!r}: START and END are virtual seconds") from None
    if not math.isfinite(start) or start < 0 or (end is not None and not start < end < math.inf):
        raise SimError(f"--{kind} {text!r}: need 0 <= START < END")

    def node(name: str) -> int:
        if name not in index:
            raise SimError(f"--{kind} {text!r}: unknown node {name!r}")
        return index[name]

    if kind in ("crash", "freeze"):
        return Fault(kind, start, end, nodes=tuple(node(x) for x in targets.split(",")))
    if targets == "half" or "+" in targets or "-" not in targets:
        if targets == "half":
            side = set(range(len(names) // 2))
        else:
            side = {node(x) for x in targets.split("+")}
        links = tuple((u, v) for u, v in edges if (u in side) != (v in side))
        return Fault(kind, start, end, links=links)
    links_list = []
    for item in targets.split(","):
        a, _, b = item.partition("-")
        links_list.append((node(a), node(b)))
    return Fault(kind, start, end, links=tuple(links_list))


@dataclass(slots=True)
class Scenario:
    nodes: int = 100
    topology: str = "random-regular"
    degree: int = 4
    seed: int = 1
    changes: int = 100
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    latency: Latency = field(default_factory=Latency)
    faults: list[tuple[str, str]] = field(default_factory=list)  # (kind, START[-END]:TARGETS)
    edges_file: str | None = None
    values_file: str | None = None
    start: str = "auto"  # cold | preload | auto (cold up to COLD_START_MAX_NODES)
    wire_mode: str = "full"
    change_spacing_s: float = 0.005
    settle_s: float = 10.0
    cold_start_limit_s: float = 120.0
    strict: bool = False


COLD_START_MAX_NODES = 2000


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: every reported value really occurred)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def graph_diameter(n: int, edges: Sequence[tuple[int, int]]) -> tuple[int, bool]:
    """Diameter of the largest component; exact up to EXACT_DIAMETER_MAX_NODES, else the
    2-sweep lower bound of networkx.algorithms.approximation (flagged as not exact)."""
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from(edges)
    largest = max(nx.connected_components(graph), key=len)
    sub = graph.subgraph(largest)
    if len(largest) <= 1:
        return 0, True
    if len(largest) <= EXACT_DIAMETER_MAX_NODES:
        return int(nx.diameter(sub, usebounds=True)), True
    return int(nx.approximation.diameter(sub, seed=0)), False


def run_scenario(sc: Scenario, progress: Callable[[float, float], None] | None = None
                 ) -> dict[str, Any]:
    """Build, warm up (cold start or preload), make the changes under the faults, heal, check."""
    # Millions of long-lived adverts: with the cyclic GC on, every full pass walks all of them
    # and a 10,000-node run is 4x slower. The simulation creates no garbage cycles worth
    # collecting mid-run; the collector is back on (and runs) when the scenario ends.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _run_scenario(sc, progress)
    finally:
        if enabled:
            gc.enable()


def _run_scenario(sc: Scenario, progress: Callable[[float, float], None] | None
                  ) -> dict[str, Any]:
    wall_start = time.perf_counter()  # wall clock: measurement only
    rng = random.Random(sc.seed)
    names, edges = build_graph(sc.topology, sc.nodes, sc.degree, rng.randrange(2**32),
                               sc.edges_file)
    n = len(names)
    faults = [parse_fault(kind, text, names, edges) for kind, text in sc.faults]
    values = read_values(sc.values_file, names) if sc.values_file else random_values(rng, n)
    diameter, diameter_exact = graph_diameter(n, edges)
    start_mode = sc.start if sc.start != "auto" else (
        "cold" if n <= COLD_START_MAX_NODES else "preload")
    sim = Simulator(names, seed=rng.randrange(2**32), wire_mode=sc.wire_mode,
                    link=LinkModel(sc.latency, sc.loss, sc.duplicate, sc.reorder))

    def report(phase_end: float) -> None:
        if progress is not None:
            progress(sim.now, phase_end)

    sim.progress = lambda now: report(now)
    cold_start_s: float | None = None
    if start_mode == "cold":
        cold_start_s = cold_start(sim, edges, values, sc.cold_start_limit_s)
    elif start_mode == "preload":
        preload_converged(sim, edges, values)
    else:
        raise SimError("start must be cold, preload or auto")

    t0 = sim.now + 0.01
    change_times = sorted(t0 + rng.uniform(0, sc.changes * sc.change_spacing_s)
                          for _ in range(sc.changes))
    for t in change_times:
        node = rng.randrange(n)
        production = rng.uniform(0.0, 20.0)
        consumption = rng.uniform(0.0, 8.0)
        sim.at(t, partial(sim.set_value, node, production, consumption, True), node)
    last_fault = t0
    for fault in faults:
        start, end = t0 + fault.start_s, None if fault.end_s is None else t0 + fault.end_s
        last_fault = max(last_fault, end if end is not None else start)
        if fault.kind == "partition":
            sim.at(start, partial(sim.cut_links, fault.links))
            if end is not None:
                sim.at(end, partial(sim.restore_links, fault.links))
        else:
            for i in fault.nodes:
                down, up = (sim.crash, sim.restart) if fault.kind == "crash" else (
                    sim.freeze, sim.thaw)
                sim.at(start, partial(down, i))
                if end is not None:
                    sim.at(end, partial(up, i))
    t_changes_end = change_times[-1] if change_times else t0
    horizon = max(t_changes_end, last_fault)
    sim.run_until(horizon)
    # Settle: faults healed; run until every change is accounted for, in small steps.
    deadline = horizon + sc.settle_s
    step = 0.05
    while sim.now < deadline and not sim.all_changes_settled():
        sim.run_until(min(deadline, sim.now + step))
    if sc.faults or sc.loss or sc.reorder:
        # Anti-entropy after heal needs pings (hash mismatch twice) and HELLO retries.
        sim.run_until(min(deadline, sim.now + 3.0))
    agreement = sim.check_agreement(strict=sc.strict)
    wall_s = time.perf_counter() - wall_start

    done = [c for c in sim.changes if c.converged_at_s is not None and not c.superseded]
    conv = [c.converge_s for c in done if c.converge_s is not None]
    hops = [float(c.max_hops) for c in done]
    messages = [c.messages for c in done]
    byte_counts = [c.bytes for c in done]
    stats = sim.stats
    memory_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {
        "nodes": n,
        "edges": len(edges),
        "topology": sc.topology,
        "degree": sc.degree,
        "seed": sc.seed,
        "diameter": diameter,
        "diameter_exact": diameter_exact,
        "start": start_mode,
        "wire": sc.wire_mode,
        "cold_start_converge_s": cold_start_s,
        "changes": len(sim.changes),
        "changes_converged": len(done),
        "changes_superseded": sum(c.superseded for c in sim.changes),
        "converge_s_p50": percentile(conv, 50),
        "converge_s_p99": percentile(conv, 99),
        "converge_s_max": max(conv) if conv else None,
        "hops_p50": percentile(hops, 50),
        "hops_p99": percentile(hops, 99),
        "hops_max": max(hops) if hops else None,
        "changes_within_eccentricity_hops": sum(c.max_hops <= c.eccentricity for c in done),
        "messages_per_change": sum(messages) / len(messages) if messages else None,
        "messages_per_change_max": max(messages) if messages else None,
        "bytes_per_change": sum(byte_counts) / len(byte_counts) if byte_counts else None,
        "bytes_estimated": sc.wire_mode != "full",
        "delivered": stats.delivered,
        "lost": stats.lost,
        "duplicated": stats.duplicated,
        "reordered": stats.reordered,
        "dropped_cut": stats.dropped_cut,
        "events": stats.events,
        "virtual_s": sim.now,
        "agreed": agreement.agreed,
        "islands": agreement.islands,
        "problems": agreement.problems,
        "trace_hash": sim.trace_hash(),
        "memory_peak_mb": round(memory_peak_mb, 1),
        "wall_s": round(wall_s, 3),
        "loop_wall_s": round(sim.loop_wall_s, 3),
        "events_per_s": round(stats.events / sim.loop_wall_s) if sim.loop_wall_s else None,
        "messages_per_s": round(stats.delivered / sim.loop_wall_s) if sim.loop_wall_s else None,
    }


NONDETERMINISTIC_KEYS = ("memory_peak_mb", "wall_s", "loop_wall_s", "events_per_s",
                         "messages_per_s")


# --------------------------------------------------------------------------------- CLI


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    keys = [k for k in result if k != "problems"]
    width = max(len(k) for k in keys)
    lines = [f"{k:<{width}}  {_fmt(result[k])}" for k in keys]
    lines += [f"problem: {p}" for p in result.get("problems", [])]
    return "\n".join(lines)


class _LatencyType(click.ParamType):  # type: ignore[type-arg]
    name = "latency"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Latency:
        if isinstance(value, Latency):
            return value
        try:
            return Latency.parse(str(value))
        except SimError as exc:
            self.fail(str(exc), param, ctx)


@click.command(name="zgrid-sim")
@click.option("--nodes", "-n", type=click.IntRange(1, 200_000), default=100, show_default=True)
@click.option("--topology", "-t", type=click.Choice(TOPOLOGIES), default="random-regular",
              show_default=True)
@click.option("--degree", "-k", type=click.IntRange(1, 64), default=4, show_default=True,
              help="random-regular degree; small-world neighbours; scale-free: 2 x edges/node")
@click.option("--seed", "-s", type=int, default=1, show_default=True)
@click.option("--changes", "-c", type=click.IntRange(0, 1_000_000), default=100,
              show_default=True, help="SetRequests made at random nodes and random times")
@click.option("--loss", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True, help="probability that a message is lost")
@click.option("--duplicate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="probability that a message is delivered twice")
@click.option("--reorder", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="probability that a message ignores per-link FIFO order (may overtake)")
@click.option("--latency", type=_LatencyType(), default="60e-6", show_default=True,
              help="SECONDS | constant:S | uniform:LOW:HIGH | lognormal:MEDIAN:SIGMA")
@click.option("--partition", multiple=True, metavar="START[-END]:LINKS",
              help="cut links: half | n1-n2,n3-n4 | n1+n2+n3 (that set vs the rest)")
@click.option("--crash", multiple=True, metavar="START[-END]:NODES",
              help="crash nodes n1,n2 at START, restart them from disk at END")
@click.option("--freeze", multiple=True, metavar="START[-END]:NODES",
              help="freeze nodes at START (messages and timers held), thaw at END")
@click.option("--edges", "edges_file", type=click.Path(dir_okay=False),
              help="edge list file (use with --topology edges)")
@click.option("--values", "values_file", type=click.Path(dir_okay=False),
              help="CSV id,production,consumption")
@click.option("--start", type=click.Choice(["auto", "cold", "preload"]), default="auto",
              show_default=True, help=f"auto: cold start up to {COLD_START_MAX_NODES} nodes, "
              "else preload an already agreed state")
@click.option("--wire", "wire_mode", type=click.Choice(WIRE_MODES), default="full",
              show_default=True, help="full: encode+decode every message; fast: one in "
              f"{SAMPLE_EVERY_MESSAGES} (bytes estimated)")
@click.option("--strict", is_flag=True, help="also check every island equals its component")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
def sim_command(nodes: int, topology: str, degree: int, seed: int, changes: int, loss: float,
                duplicate: float, reorder: float, latency: Latency, partition: tuple[str, ...],
                crash: tuple[str, ...], freeze: tuple[str, ...], edges_file: str | None,
                values_file: str | None, start: str, wire_mode: str, strict: bool,
                as_json: bool, quiet: bool) -> None:
    """Simulate a zgrid of NODES nodes under a virtual clock and report convergence."""
    faults = [(kind, text) for kind, texts in (("partition", partition), ("crash", crash),
                                               ("freeze", freeze)) for text in texts]
    try:
        sc = Scenario(nodes=nodes, topology=topology, degree=degree, seed=seed, changes=changes,
                      loss=loss, duplicate=duplicate, reorder=reorder, latency=latency,
                      faults=faults, edges_file=edges_file, values_file=values_file, start=start,
                      wire_mode=wire_mode, strict=strict)
    except SimError as exc:
        raise click.UsageError(str(exc)) from None
    bar: Any = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm  # type: ignore[import-untyped]

        bar = tqdm(total=None, unit="vs", file=sys.stderr, desc="virtual s",
                   bar_format="{desc}: {n:.3f} [{elapsed}]")

    def progress(now: float, _end: float) -> None:
        if bar is not None:
            bar.n = now
            bar.refresh()

    try:
        result = run_scenario(sc, progress)
    except SimError as exc:
        raise click.UsageError(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))
    if not result["agreed"]:
        sys.exit(1)
