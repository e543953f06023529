"""The engine: many unmodified `Core`s, one event heap, one virtual clock.

What this file is for
=====================

The core (zgrid/core.py) is sans-IO: events and the current time go in, effects come out. The
engine plays the runtime's part for thousands of cores in one process:

- one agenda of events (deliveries, timers, scheduled actions) and one virtual clock `now`:
  a `heapq` of the distinct times at which something is due, and per time the events due
  then, in the order they were scheduled, so events at the same instant run in scheduling
  order in every process;
- node lifecycle: start, crash (drop the core, keep its last `Persist`), restart (a new `Core`
  with a new nonce, restored from that state), freeze and thaw (deliveries and timers held,
  then released in order);
- effects: `Send`/`SendOnce` go to the network (network.py decides if and when they arrive),
  `Connect`/`Disconnect` keep the DEALER connections the runtime would have, `Route` the way
  back over a sibling's own connection that a `Send` takes when the DEALER is not connected
  (a DEALER whose peer crashed reconnects with libzmq's backoff), `Persist` keeps
  what a crash leaves behind (and is reported saved: a simulated disk never fails),
  `Respond` collects control replies; `Log` and `Publish` are dropped (nobody reads them in a
  simulation);
- after a node has handled every event of one instant the engine calls `core.flush(now)` (the
  runtime's "drain the mailbox, then flush") and schedules `core.timer` at
  `core.next_deadline()`;
- hooks for measurement (measurement.py): observers are told about deliveries, own-advert
  bumps and crashes. With no observer attached the engine does no measurement work at all.

What it must never do
=====================

- Duplicate protocol logic: it only moves messages and time. Links are made by feeding cores
  `LinkRequest`s; values change by `SetRequest`s. (preload.py is the one, named, exception.)
- Hand a message to a core anywhere but `_to_core`: the core's inbound API is one door.
- Read the wall clock inside the simulation (only `loop_wall_s` is measured with it), or draw
  randomness from anything but `self.rng`.
- Order events by iterating a set or dict of strings in a way that depends on PYTHONHASHSEED:
  ties are broken by scheduling order, node order is the integer index.
"""

from __future__ import annotations

import gc
import heapq
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Final, TypeVar

from zgrid import wire
from zgrid.core import (
    ON_OUR_DEALER,
    ClientId,
    Config,
    Connect,
    Core,
    Disconnect,
    Effect,
    Log,
    Persist,
    Publish,
    Respond,
    Route,
    Send,
    SendOnce,
    Trust,
)
from zgrid.errors import ProtocolError
from zgrid.persisted import PersistedState
from zgrid.signing import AdvertSeal, Keyring, public_of
from zgrid.sim.errors import SimError
from zgrid.sim.measurement import (
    Agreement,
    Change,
    Convergence,
    Delivered,
    Observer,
    TraceHash,
    check_agreement,
)
from zgrid.sim.network import LinkModel, LinkStats, Network, Pair
from zgrid.wire import Advert, Flex, LinkRequest, SetRequest, UnlinkRequest

ENDPOINT_PORT: Final = 7000
CONTROL_CLIENT: Final[ClientId] = (b"zgrid-sim",)
SAMPLE_EVERY_MESSAGES: Final = 256  # --wire fast: encode+decode one message in this many
PROGRESS_EVERY_EVENTS: Final = 1 << 14
# --wire full: equal frames decoded in a row; a sender's siblings get theirs within one latency.
DECODE_CACHE_MAX_FRAMES: Final = 4096
# Guards against a timer that keeps asking to run at the same instant
MIN_TIMER_STEP_S: Final = 1e-9
WIRE_MODES: Final = ("full", "fast")
# A DEALER whose peer went away reconnects as libzmq does with node.py's ZMQ_RECONNECT_IVL and
# ZMQ_RECONNECT_IVL_MAX: a first attempt after 100 ms, each interval doubling up to 5 s (no
# jitter: the simulation stays a function of its seed). Until one attempt finds the peer
# listening again, sends over it are dropped (ZMQ_IMMEDIATE) or take the sibling's Route.
RECONNECT_IVL_S: Final = 0.1
RECONNECT_IVL_MAX_S: Final = 5.0

@contextmanager
def cyclic_gc_off() -> Iterator[None]:
    """For a long run: the cyclic garbage collector off until it ends (then on, if it was).

    A simulated grid holds millions of long-lived adverts (every node's table), and every full
    pass of the collector walks all of them: 10-15 % of a 1,000-node day, 4x at 10,000 nodes.
    The simulation makes no garbage cycles worth collecting mid-run (reference counting frees
    what it drops), so nothing is lost but that time.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# Event kinds; an event is (kind, dst, src, payload, size), kept in the agenda under its time.
# A delivery's payload is the frame (--wire full) or the message, with the bytes it stands for
# in `size` (--wire fast); a timer's is None, an action's the callable.
# _DELIVER_BACK: a delivery over the receiver's own DEALER (a sibling's Route back to it).
_DELIVER: Final = 0
_TIMER: Final = 1
_ACTION: Final = 2
_DELIVER_BACK: Final = 3

Event = tuple[int, int, int, Any, int]
_RAN: Final[Event] = (_TIMER, -1, -1, None, 0)  # in the agenda's place of an event that ran
AnObserver = TypeVar("AnObserver", bound=Observer)


@dataclass(slots=True)
class Stats(LinkStats):
    """What the engine counted (and, inherited, what the links did to messages)."""

    events: int = 0
    delivered: int = 0
    dropped_unconnected: int = 0  # sends over a DEALER not connected (reconnect backoff)
    routed_back: int = 0  # sends that took a Route instead (the sibling's own connection)


class Simulator:
    """Many cores, one virtual clock. Node `i` has id `names[i]` and endpoint `endpoints[i]`.

    measure: attach the observers a scenario reports from (`convergence`, `trace`); without
    them `changes`, `trace_hash` and cold-start watching are unavailable and the hot path does
    no measurement work. Other observers can be added with `attach`.

    signed: every node gets an Ed25519 key and signs its adverts, as with `zgrid-node --keys`
    (every delivery counts as authenticated by its sender's key, as CURVE would make it).
    """

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
        track_crossings: bool = False,
        measure: bool = True,
        signed: bool = False,
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
        # The routing envelope a delivery arrives with (the runtime's ROUTER identity): one
        # per process, as a new connection gets a new routing id; `_owner` maps it back.
        self.envelopes: list[ClientId] = [(name.encode(),) for name in self.names]
        self._owner: dict[ClientId, int] = {e: i for i, e in enumerate(self.envelopes)}
        self._lives = [0] * len(self.names)
        self.stats = Stats()
        self.network = Network(self.rng, self.stats, link)
        self.wire_mode = wire_mode
        self._full_wire = wire_mode == "full"
        self.core_params = {"ping_interval_s": ping_interval_s, "dead_after_s": dead_after_s,
                            "forget_after_s": forget_after_s, "track_view": track_view}
        self.signed = signed
        self._seeds: list[bytes] = []
        self._keyring: Keyring | None = None
        self._members = frozenset(self.names)
        if signed:
            keys_rng = random.Random(seed)  # its own stream: signing keeps the event order
            self._seeds = [keys_rng.randbytes(32) for _ in self.names]
            self._keyring = Keyring({name: public_of(seed_bytes)
                                     for name, seed_bytes in zip(self.names, self._seeds,
                                                                 strict=True)})

        self.now = 0.0
        # The agenda. Only times are compared (floats): a heap of (time, seq, ...) tuples spent
        # a sixth of a run comparing them. The events due at one time are one event, or a list
        # of them in scheduling order; `_taken` events of the earliest time's list have run.
        self._times: list[float] = []
        self._due: dict[float, Event | list[Event]] = {}
        self._taken = 0
        n = self.n
        self.cores: list[Core | None] = [None] * n
        self.frozen = [False] * n
        self.held: list[list[Event]] = [[] for _ in range(n)]  # in arrival order
        self.timer_at = [math.inf] * n
        self.timer_ran_at = [-math.inf] * n
        self.connected: list[set[int]] = [set() for _ in range(n)]
        # DEALER i -> j not connected since (j crashed, or was down when i dialed): i -> t.
        self.down_since: list[dict[int, float]] = [{} for _ in range(n)]
        self.started_at = [0.0] * n  # when each node's current process started
        self.routes: list[dict[int, ClientId]] = [{} for _ in range(n)]  # i: j -> envelope
        self.persisted: list[PersistedState | None] = [None] * n
        self.values: list[tuple[float, float]] = [(0.0, 0.0)] * n
        # The true graph: pairs the operator linked (adjacency of ints, membership only).
        self.adjacency: list[set[int]] = [set() for _ in range(n)]
        self._dirty: list[int] = []
        self._is_dirty = [False] * n
        self.stop_requested = False  # set by an observer: run_until(stop_when_converged) ends

        # Each node's current own advert, as last seen after it handled something; kept only
        # while observers are attached (a change of it is what `own_bumped` reports).
        self.own: list[Advert | None] = [None] * n
        self.observers: tuple[Observer, ...] = ()
        # Bound delivery hooks, for the hot path: of observers that only look at a delivery
        # (`notify`), and (before, after) of those that also want to see its outcome.
        # The observers whose delivery hooks run: `before_deliver` only, and both. Observers,
        # not bound methods: compiled, a method call on one is a direct (vtable) call.
        self._notified: tuple[Observer, ...] = ()
        self._paired: tuple[Observer, ...] = ()
        self.convergence: Convergence | None = None
        self.trace: TraceHash | None = None
        if measure:
            self.trace = self.attach(TraceHash())
            self.convergence = self.attach(Convergence(self, track_crossings))

        # --wire full: a message sent to several siblings is encoded once (the core sends the
        # same object to each), and equal frames are decoded once: decoding is a pure function
        # of the bytes and messages are immutable, so every receiver can share the result.
        self._encode_cache: tuple[object, bytes] | None = None
        self._decoded: dict[bytes, wire.Message] = {}
        self._sample_counter = 0
        self.replies: list[tuple[float, int, wire.Reply]] = []
        self.progress: Callable[[float], None] | None = None
        self.loop_wall_s = 0.0  # wall time spent inside run_until (speed measurement only)

    def attach(self, observer: AnObserver) -> AnObserver:
        """Call `observer`'s hooks from now on (it sees nothing that happened before)."""
        if not self.observers:
            for i, core in enumerate(self.cores):
                self.own[i] = None if core is None else core.own_advert
        self.observers = (*self.observers, observer)
        wants_outcome = [type(o).after_deliver is not Observer.after_deliver
                         for o in self.observers]
        # An observer that looks at no delivery at all (the day's NetMeter) costs none.
        self._notified = tuple(
            o for o, paired in zip(self.observers, wants_outcome, strict=True)
            if not paired and type(o).before_deliver is not Observer.before_deliver)
        self._paired = tuple(o for o, paired in zip(self.observers, wants_outcome, strict=True)
                             if paired)
        return observer

    # ------------------------------------------------------------------ scheduling

    def _push(self, t: float, kind: int, dst: int, src: int, payload: Any, size: int = 0
              ) -> None:
        """Schedule an event at `t` (>= now), after every event already due then."""
        event = (kind, dst, src, payload, size)
        due = self._due.get(t)
        if due is None:
            self._due[t] = event
            heapq.heappush(self._times, t)
        elif isinstance(due, list):
            due.append(event)
        else:
            self._due[t] = [due, event]

    def at(self, t: float, action: Callable[[], object], node: int = -1) -> None:
        """Run `action` at virtual time `t` (held while `node` is frozen, if given)."""
        self._push(max(t, self.now), _ACTION, node, -1, action)

    # ------------------------------------------------------------------ node lifecycle

    def _trust(self, i: int) -> Trust | None:
        if self._keyring is None:
            return None
        return Trust(self._members, frozenset(), AdvertSeal(self._seeds[i], self._keyring))

    def _config(self, i: int) -> Config:
        return Config(self.names[i], self.endpoints[i], self.rng.getrandbits(64),
                      **self.core_params)  # type: ignore[arg-type]

    def start_node(self, i: int, production: float = 0.0, consumption: float = 0.0,
                   node_id: str | None = None) -> None:
        """Boot a fresh node now: a new Core, `start`, then its initial values via SetRequest.

        node_id: run node i under another node's id (a misconfigured duplicate), at its own
        endpoint; by default its id is `names[i]`.
        """
        if self.cores[i] is not None:
            raise SimError(f"{self.names[i]} is already running")
        config = self._config(i)
        if node_id is not None:
            config = replace(config, node_id=node_id)
        core = self.cores[i] = Core(config, trust=self._trust(i))
        self._new_life(i)
        self._handle(i, core.start(self.now))
        if production or consumption:
            reply = self.control(i, SetRequest(production, consumption))
            if reply is None or not reply.ok:
                raise SimError(f"{self.names[i]}: initial values refused: "
                               f"{reply.message if reply else 'no reply'}")
        self.values[i] = (production, consumption)

    def stop(self, i: int) -> None:
        """SIGTERM: the node stops answering, says goodbye (its `stop` effects), and is gone,
        as a crash leaves it."""
        core = self.cores[i]
        if core is None:
            return
        self._handle(i, core.stop(self.now), mark=False)
        self.crash(i)

    def crash(self, i: int) -> None:
        """Kill the process: in-memory state and in-flight inbound messages are gone."""
        core = self.cores[i]
        if core is None:
            return
        for observer in self.observers:
            observer.crashed(i, core)
        now = self.now
        for k in range(self.n):  # every DEALER connected to it starts reconnecting
            if i in self.connected[k] and self._dealer_up(k, i):
                self.down_since[k][i] = now
                closed_at = self.network.closure(i, k, now)
                if closed_at is not None:  # the runtime's monitor of that DEALER tells k
                    self.at(closed_at, partial(self._connection_closed, k, i, self._lives[k]),
                            node=k)
        self.cores[i] = None
        self.frozen[i] = False
        self.held[i].clear()
        self.connected[i].clear()
        self.down_since[i].clear()
        self.routes[i].clear()
        # Its connections are gone with it; its next process connects anew, with new ids.
        self._owner.pop(self.envelopes[i], None)
        self._lives[i] += 1
        self.envelopes[i] = (f"{self.names[i]}#{self._lives[i]}".encode(),)
        self.timer_at[i] = math.inf

    def restart(self, i: int, wiped: bool = False) -> None:
        """Start again from what was persisted (a new process: new nonce, next incarnation).

        wiped: the data directory was lost, so the node starts as if new (incarnation 1).
        """
        if self.cores[i] is not None:
            return
        if wiped:
            self.persisted[i] = None
        core = self.cores[i] = Core(self._config(i), restored=self.persisted[i],
                                    trust=self._trust(i))
        self._new_life(i)
        self._handle(i, core.start(self.now))

    def _connection_closed(self, k: int, i: int, life: int) -> None:
        """k's DEALER to the crashed i reports its connection closed, if that DEALER is still
        the one that was connected: k has not crashed since, nor closed it."""
        core = self.cores[k]
        if core is not None and self._lives[k] == life and i in self.connected[k]:
            self._handle(k, core.connection_lost(self.endpoints[i], self.now))

    def _new_life(self, i: int) -> None:
        """A process starts: the routing envelope of its connections leads to it."""
        self.started_at[i] = self.now
        self._owner[self.envelopes[i]] = i

    def freeze(self, i: int) -> None:
        self.frozen[i] = True

    def thaw(self, i: int) -> None:
        """Release what was held, in arrival order, at the current instant."""
        if not self.frozen[i]:
            return
        self.frozen[i] = False
        held, self.held[i] = self.held[i], []
        for kind, dst, src, payload, size in held:
            self._push(self.now, kind, dst, src, payload, size)
        self._mark_dirty(i)

    # ------------------------------------------------------------------ links and values

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
        """A SetRequest to node i; track: follow the change until its island holds it."""
        reply = self.control(i, SetRequest(production, consumption))
        core = self.cores[i]
        if core is not None and reply is not None and reply.ok:
            self.values[i] = (core.production, core.consumption)
            if track:
                self._measured().track_change(i)
        return reply

    def device_changed(self, i: int, offer: Flex, rating_kw: float,
                       state: Mapping[str, Any]) -> None:
        """Node i's device now offers `offer` (the runtime's device step: node.py integrates
        the device and reports it the same way). Nothing happens while i is down or frozen."""
        core = self.cores[i]
        if core is None or self.frozen[i]:
            return
        self._handle(i, core.device_changed(offer, rating_kw, state))

    def cut_links(self, pairs: Sequence[Pair]) -> None:
        self.network.cut_links(pairs)

    def restore_links(self, pairs: Sequence[Pair]) -> None:
        self.network.restore_links(pairs)

    def set_link_model(self, i: int, j: int, model: LinkModel) -> None:
        self.network.set_link_model(i, j, model)

    @property
    def default_link(self) -> LinkModel:
        return self.network.default_link

    @default_link.setter
    def default_link(self, model: LinkModel) -> None:
        self.network.default_link = model

    @property
    def link_overrides(self) -> dict[Pair, LinkModel]:
        return self.network.link_overrides

    def control(self, i: int, req: wire.ControlRequest) -> wire.Reply | None:
        """Hand a control request to node i now; its reply (None if the node is down)."""
        core = self.cores[i]
        if core is None or self.frozen[i]:
            return None  # a dead or frozen process answers nothing
        before = len(self.replies)
        self._handle(i, self._to_core(core, CONTROL_CLIENT, req, i))
        return self.replies[-1][2] if len(self.replies) > before else None

    def inject(self, dst: int, src: int, message: wire.PeerMessage) -> None:
        """Deliver `message`, encoded, to node `dst` now, as if node `src`'s connection carried
        it: an attacker holding src's key (or anyone, in an unsigned grid). For adversarial
        tests; the frame passes through decoding and the core's one door like any other."""
        self._push(self.now, _DELIVER, dst, src, wire.encode(message))

    # ------------------------------------------------------------------ the true graph

    def alive(self, i: int) -> bool:
        return self.cores[i] is not None and not self.frozen[i]

    def true_neighbors(self, i: int) -> list[int]:
        return sorted(j for j in self.adjacency[i]
                      if self.alive(j) and not self.network.is_cut(i, j))

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

    # ------------------------------------------------------------------ measurement access

    def _measured(self) -> Convergence:
        if self.convergence is None:
            raise SimError("this simulator was built with measure=False: nothing is tracked")
        return self.convergence

    @property
    def changes(self) -> list[Change]:
        return self._measured().changes

    @property
    def crossings(self) -> dict[tuple[int, int, int, int, int], int]:
        return self._measured().crossings

    def all_changes_settled(self) -> bool:
        return self._measured().all_changes_settled()

    def check_agreement(self, strict: bool = False) -> Agreement:
        return check_agreement(self, strict)

    def trace_hash(self) -> str:
        if self.trace is None:
            raise SimError("this simulator was built with measure=False: no trace is kept")
        return self.trace.hexdigest()

    # preload.py sets these: a preloaded grid starts with every advert held by its island.
    @property
    def held_count(self) -> list[int]:
        return self._measured().held_count

    @property
    def held_total(self) -> int:
        return self._measured().held_total

    @held_total.setter
    def held_total(self, value: int) -> None:
        self._measured().held_total = value

    # ------------------------------------------------------------------ the event loop

    def run_until(self, t_end: float, stop_when_converged: bool = False) -> None:
        """Process every event up to virtual time t_end (inclusive); then now = t_end."""
        started = time.perf_counter()  # wall clock: measurement only
        try:
            self._run_until(t_end, stop_when_converged)
        finally:
            self.loop_wall_s += time.perf_counter() - started

    def _run_until(self, t_end: float, stop_when_converged: bool) -> None:
        times, due = self._times, self._due
        stats = self.stats
        self.stop_requested = False
        next_progress = stats.events + PROGRESS_EVERY_EVENTS
        while True:
            if self._dirty and (not times or times[0] > self.now):
                self._flush_dirty()
                if stop_when_converged and self.stop_requested:
                    return
                continue
            if not times or times[0] > t_end:
                break
            t = times[0]
            events = due[t]
            if isinstance(events, list):
                kind, dst, src, payload, size = events[self._taken]
                # Let go of what ran: a list can grow while it runs (the default latency is
                # fixed, so a cold start's messages arrive in bursts), and holding its messages
                # until it ends took a 10,000-node cold start from 7.84 to 8.46 GB.
                events[self._taken] = _RAN
                self._taken += 1
                if self._taken == len(events):  # what this event schedules at t goes in anew
                    heapq.heappop(times)
                    del due[t]
                    self._taken = 0
            else:
                kind, dst, src, payload, size = events
                heapq.heappop(times)
                del due[t]
            self.now = t
            stats.events += 1
            if kind in (_DELIVER, _DELIVER_BACK):
                self._deliver(t, dst, src, payload, size, kind)
            elif kind == _TIMER:
                self._fire_timer(t, dst)
            else:
                if dst >= 0 and self.frozen[dst]:
                    self.held[dst].append((kind, dst, src, payload, size))
                    continue
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
        self.timer_ran_at[i] = t
        self._handle(i, core.timer(t))

    def _deliver(self, t: float, dst: int, src: int, payload: Any, size: int,
                 kind: int = _DELIVER) -> None:
        core = self.cores[dst]
        if core is None:
            return  # the process is gone, and what was in flight to it with it
        if self.frozen[dst]:
            self.held[dst].append((kind, dst, src, payload, size))
            return
        # At its ROUTER, from the sender's connection; or back over its own DEALER.
        sender = self.envelopes[src] if kind == _DELIVER else ON_OUR_DEALER
        self.stats.delivered += 1
        msg: Delivered
        frame: bytes | None
        if type(payload) is bytes:
            frame, size = payload, len(payload)
            cached = self._decoded.get(frame)
            if cached is not None:
                msg = cached
            else:
                try:
                    decoded = wire.decode(frame)
                except ProtocolError as exc:
                    msg = exc
                else:
                    if len(self._decoded) >= DECODE_CACHE_MAX_FRAMES:
                        self._decoded.clear()
                    self._decoded[frame] = msg = decoded
        else:
            frame = None
            msg = payload
        for observer in self._notified:
            observer.before_deliver(t, dst, src, msg, size, frame)
        paired = self._paired
        if not paired:
            self._handle(dst, self._to_core(core, sender, msg, src))
            return
        if len(paired) == 1:  # the usual case (Convergence): no lists on the hot path
            only = paired[0]
            token = only.before_deliver(t, dst, src, msg, size, frame)
            self._handle(dst, self._to_core(core, sender, msg, src))
            only.after_deliver(t, dst, src, msg, token)
            return
        tokens = [o.before_deliver(t, dst, src, msg, size, frame) for o in paired]
        self._handle(dst, self._to_core(core, sender, msg, src))
        for observer, token in zip(paired, tokens, strict=True):
            observer.after_deliver(t, dst, src, msg, token)

    def _to_core(self, core: Core, sender: ClientId, message: wire.Message | ProtocolError,
                 src: int) -> list[Effect]:
        """The one door through which anything that arrives enters a core (a peer's message,
        the error decoding its frame, or a control request): the core decides what it is.
        `src`: the node it comes from (signed: its key authenticated the connection; a control
        request is made with the node's own key)."""
        if not self.signed:
            return core.handle(sender, message, self.now)
        return core.handle(sender, message, self.now, self.names[src])

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
                self._send_to_sibling(i, effect)  # type: ignore[arg-type]
            elif kind is SendOnce:
                self._send(i, effect.endpoint, effect.message)  # type: ignore[union-attr]
            elif kind is Connect:
                j = self.endpoint_index.get(effect.endpoint)  # type: ignore[union-attr]
                if j is not None and j not in self.connected[i]:
                    self.connected[i].add(j)
                    if self.cores[j] is None:  # nobody listens there yet: it keeps trying
                        self.down_since[i][j] = self.now
            elif kind is Disconnect:
                j = self.endpoint_index.get(effect.endpoint)  # type: ignore[union-attr]
                if j is not None:
                    self.connected[i].discard(j)
                    self.down_since[i].pop(j, None)
                    self.routes[i].pop(j, None)
            elif kind is Route:
                j = self.endpoint_index.get(effect.endpoint)  # type: ignore[union-attr]
                if j is not None:
                    self.routes[i][j] = effect.via  # type: ignore[union-attr]
            elif kind is Persist:
                self.persisted[i] = effect.state  # type: ignore[union-attr]
                if core is not None:  # a simulated disk never fails: report every save done
                    core.save_succeeded(effect.state, self.now)  # type: ignore[union-attr]
            elif kind is Respond:
                self.replies.append((self.now, i, effect.reply))  # type: ignore[union-attr]
            elif kind is not Log and kind is not Publish:  # nobody reads a simulated log
                raise AssertionError(f"unknown effect {effect!r}")
        if core is not None:
            if self.observers:
                own = core.own_advert
                if own is not self.own[i]:
                    self.own[i] = own
                    for observer in self.observers:
                        observer.own_bumped(i, own)
            if mark and not self._is_dirty[i]:
                self._is_dirty[i] = True
                self._dirty.append(i)

    def _send_to_sibling(self, i: int, effect: Send) -> None:
        """Over i's DEALER to the endpoint, as the runtime sends; if that DEALER is not
        connected, back over the sibling's own connection (its Route), else dropped."""
        j = self.endpoint_index.get(effect.endpoint)
        if j is None or j not in self.connected[i]:
            return  # nobody listens there, or the runtime has no DEALER there either
        if self._dealer_up(i, j):
            self._send_to(i, j, effect.message)
            return
        via = None if effect.dealer_only else self.routes[i].get(j)
        k = None if via is None else self._owner.get(via)
        if k is None or i not in self.connected[k] or not self._dealer_up(k, i):
            self.stats.dropped_unconnected += 1  # ZMQ_IMMEDIATE: nothing queues meanwhile
            return
        self.stats.routed_back += 1
        self._send_to(i, k, effect.message, _DELIVER_BACK)

    def _dealer_up(self, i: int, j: int) -> bool:
        """Whether i's DEALER to j is connected now: it was, or a reconnect attempt (libzmq's
        backoff, RECONNECT_IVL_S doubling to RECONNECT_IVL_MAX_S) has found j listening."""
        since = self.down_since[i].get(j)
        if since is None:
            return True
        if self.cores[j] is None:
            return False
        interval = RECONNECT_IVL_S
        attempt = since + interval
        started = self.started_at[j]
        while attempt < started:
            interval = min(2 * interval, RECONNECT_IVL_MAX_S)
            attempt += interval
        if attempt > self.now:
            return False
        del self.down_since[i][j]
        return True

    def _send(self, i: int, endpoint: str, msg: wire.PeerMessage) -> None:
        j = self.endpoint_index.get(endpoint)
        if j is not None:  # else nobody listens there
            self._send_to(i, j, msg)

    def _send_to(self, i: int, j: int, msg: wire.PeerMessage, kind: int = _DELIVER) -> None:
        times = self.network.arrivals(i, j, self.now)
        if not times:
            return
        payload: Any
        size = 0
        if self._full_wire:
            cache = self._encode_cache
            if cache is not None and cache[0] is msg:
                payload = cache[1]
            else:
                payload = wire.encode(msg)
                self._encode_cache = (msg, payload)
        else:
            payload, size = msg, self._sample_size(msg)
        for at in times:
            self._push(at, kind, j, i, payload, size)

    def _sample_size(self, msg: wire.PeerMessage) -> int:
        """--wire fast: encode and decode one message in SAMPLE_EVERY_MESSAGES, check it.

        Returns the encoded size of the sampled message times SAMPLE_EVERY_MESSAGES and 0 for
        the others, so that bytes summed over many messages estimate the real total.
        """
        self._sample_counter += 1
        if self._sample_counter % SAMPLE_EVERY_MESSAGES:
            return 0
        frame = wire.encode(msg)
        if wire.decode(frame) != msg:
            raise AssertionError(f"wire round trip changed {msg!r}")
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

    # ------------------------------------------------------------------ whole-grid steps

    def heal(self) -> None:
        """End every fault now: restore cut links, lossless links, thaw, restart the crashed."""
        self.network.heal()
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
