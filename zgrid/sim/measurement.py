"""Measurement: what a simulation reports, computed from hooks the engine calls.

What this file is for
=====================

The engine (engine.py) moves messages and time; it knows nothing of convergence. It calls the
hooks of the observers attached to it (`Observer`): around every delivery, when a node's own
advert changes (a new version: values or links), and when a node crashes. This module holds
the observers a scenario uses and the checks run on the result:

- `TraceHash`: a hash of every delivered event (time, destination, encoded bytes), the
  fingerprint that proves two runs with the same seed were the same run;
- `Convergence`: per change, the virtual seconds and hops until every member of the origin's
  island holds the new advert, and the messages and bytes that carried it; cold-start
  convergence (every link up, every node holding every current advert); optionally, how often
  each change crossed each directed link;
- `check_agreement`: every island of the true graph holds the bit-identical exact total;
- `percentile`: nearest rank, so every reported value really occurred.

What it must never do
=====================

- Change the run: an observer reads cores and engine state but never writes them, sends
  nothing and draws no random number; a run with observers and one without make the same
  protocol decisions.
- Cost more than O(1) per advert delivered: convergence is counted (who holds each origin's
  current advert), never recomputed by scanning the nodes.
- Read the wall clock, or order anything by iterating a set or dict of strings.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from mypy_extensions import mypyc_attr

from zgrid.core import Core
from zgrid.errors import ProtocolError
from zgrid.wire import Advert, Adverts, Bye, DigestMsg, Hello, Message, Ping

if TYPE_CHECKING:
    from zgrid.sim.engine import Simulator

MAX_REPORTED_PROBLEMS: Final = 20
# --wire fast hashes the message type instead of the bytes it would have had.
_TYPE_CODE: Final[dict[type, int]] = {Hello: 1, Adverts: 2, DigestMsg: 3, Ping: 4, Bye: 5}

Delivered = Message | ProtocolError  # what a delivery hands a core: a message or the error


# Compiled (scripts/mypyc_build.py), a class is closed to interpreted subclasses unless it says
# otherwise: observers are the simulator's extension point, written in plain Python.
@mypyc_attr(allow_interpreted_subclasses=True)
class Observer:
    """The hooks the engine calls; each is a no-op here, so an observer overrides only what it
    needs. The engine calls them only when at least one observer is attached, and calls
    `after_deliver` only of observers that override it (for the others the value returned by
    `before_deliver` is dropped)."""

    def before_deliver(self, t: float, dst: int, src: int, msg: Delivered, size: int,
                       frame: bytes | None) -> object:
        """`msg` (sent by src, `size` bytes, `frame` with --wire full) is about to be handed to
        dst's core. The value returned comes back to `after_deliver`."""
        return None

    def after_deliver(self, t: float, dst: int, src: int, msg: Delivered, token: object
                      ) -> None:
        """dst's core handled `msg`, and the engine performed the effects."""

    def own_bumped(self, i: int, advert: Advert) -> None:
        """Node i published a new version of its own advert (the engine's `own[i]` is it)."""

    def crashed(self, i: int, core: Core) -> None:
        """Node i crashed; `core` is what it was (its table is lost with it)."""


# --------------------------------------------------------------------------------- trace


class TraceHash(Observer):
    """blake2b over every delivery: (time, destination, size) and the bytes with --wire full,
    (time, destination, source, message type) with --wire fast."""

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=16)

    def before_deliver(self, t: float, dst: int, src: int, msg: Delivered, size: int,
                       frame: bytes | None) -> object:
        if frame is not None:
            self._hash.update(struct.pack("<dII", t, dst, size))
            self._hash.update(frame)
        else:
            self._hash.update(struct.pack("<dIIB", t, dst, src, _TYPE_CODE[type(msg)]))
        return None

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


# --------------------------------------------------------------------------------- convergence


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


# (origin index, origin id, its current advert): new to the receiver before it handled the
# message; counted as held if the receiver's table has that version afterwards.
_Candidate = tuple[int, str, Advert]


class Convergence(Observer):
    """Counts, for each origin, the live nodes holding its current advert: O(1) per advert.

    A tracked change has converged when that count reaches the size of the origin's island
    (the true graph, when the change was made); a cold start has converged when every node
    holds every current advert of its component and every link is up on both sides.
    """

    def __init__(self, sim: Simulator, track_crossings: bool = False) -> None:
        self.sim = sim
        self.own = sim.own  # the engine's record of each node's current own advert (shared)
        self.held_count = [0] * sim.n  # how many live nodes hold origin's current advert
        self.held_total = 0
        self.active: dict[int, Change] = {}  # origin -> its latest tracked change
        self.counting: dict[str, Change] = {}  # the same, keyed by origin id (hot path)
        self.changes: list[Change] = []
        self.track_crossings = track_crossings
        self.crossings: dict[tuple[int, int, int, int, int], int] = {}
        self.watch_cold_start = False
        self.cold_start_converged_s: float | None = None
        self._cold_expected_links: list[tuple[str, ...]] = []
        self._cold_links_ok: list[bool] = []
        self._cold_target = 0

    # ------------------------------------------------------------------ what is tracked

    def track_change(self, i: int) -> None:
        """Node i's current advert is a change to follow until its island holds it."""
        sim = self.sim
        own = self.own[i]
        assert own is not None
        size, eccentricity = _reach(sim, i) if sim.alive(i) else (1, 0)
        change = Change(i, own.incarnation, own.seq, sim.now, size, eccentricity, hops={i: 0})
        if size <= self.held_count[i]:
            change.converged_at_s = sim.now
        self.active[i] = change
        self.counting[sim.names[i]] = change
        self.changes.append(change)

    def all_changes_settled(self) -> bool:
        return all(c.converged_at_s is not None or c.superseded for c in self.changes)

    def watch_for_cold_start(self) -> None:
        """Ask the engine to stop (`run_until(..., stop_when_converged=True)`) once every link
        is up everywhere and every node holds every other node's current advert."""
        sim = self.sim
        self._cold_expected_links = [tuple(sorted(sim.names[j] for j in sim.true_neighbors(i)))
                                     for i in range(sim.n)]
        self._cold_links_ok = [own is not None and own.links == self._cold_expected_links[i]
                               for i, own in enumerate(self.own)]
        self._cold_target = sum(len(c) ** 2 for c in sim.components())
        self.watch_cold_start = True
        if self.held_total >= self._cold_target:
            self._check_cold_start(sim.now)

    def _check_cold_start(self, t: float) -> None:
        if all(self._cold_links_ok):
            self.cold_start_converged_s = t
            self.watch_cold_start = False
            self.sim.stop_requested = True

    # ------------------------------------------------------------------ hooks

    def before_deliver(self, t: float, dst: int, src: int, msg: Delivered, size: int,
                       frame: bytes | None) -> object:
        # Before/after comparison of the receiver's table: which adverts of the message are
        # their origin's current one and new to the receiver (candidates, confirmed by
        # `after_deliver` once the core has handled the message). Outside a cold start only
        # origins with a tracked change are looked at: one dict lookup per advert. This runs
        # for every message of a run, hence one function with few calls.
        if type(msg) is not Adverts:
            return None
        counting = self.counting
        track_all = self.watch_cold_start
        if not counting:
            return self._before_cold_start(dst, msg) if track_all else None
        core = self.sim.cores[dst]
        assert core is not None
        table = core.table  # its own get, not the by_origin view: a compiled call, no proxy
        own = self.own
        index = self.sim.index
        share = size / len(msg.adverts) if msg.adverts else 0.0
        candidates: list[_Candidate] = []
        for a in msg.adverts:
            change = counting.get(a.origin)
            if change is not None:
                o = change.origin
            elif track_all:
                o = index.get(a.origin, -1)
                if o < 0:
                    continue
            else:
                continue
            cur = own[o]
            if cur is None or a.seq != cur.seq or a.incarnation != cur.incarnation:
                continue
            if change is not None and change.seq == a.seq and change.incarnation == a.incarnation:
                # A delivery that carries the change: counted whether or not it is news.
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
            if old is None or old.seq != cur.seq or old.incarnation != cur.incarnation:
                candidates.append((o, a.origin, cur))
        return candidates

    def _before_cold_start(self, dst: int, msg: Adverts) -> list[_Candidate]:
        """The candidates of a cold start with no change tracked yet: the hot loop of a whole
        run (every advert of every message, dozens per message), so identity is tried before
        versions: with --wire fast every copy of an advert is its origin's own object, and
        with --wire full the receivers of one frame share its decoded adverts."""
        core = self.sim.cores[dst]
        assert core is not None
        table = core.table  # called as a method: compiled, a direct call (a bound one is not)
        index_get = self.sim.index.get
        own = self.own
        candidates: list[_Candidate] = []
        for a in msg.adverts:
            origin = a.origin
            old = table.get(origin)
            if old is a:
                continue  # it holds this very advert already: nothing can change
            o = index_get(origin)
            if o is None:
                continue
            cur = own[o]
            if a is not cur and (cur is None or a.seq != cur.seq
                                 or a.incarnation != cur.incarnation):
                continue  # not (or no longer) the origin's current advert
            if old is cur or (old is not None and old.seq == cur.seq
                              and old.incarnation == cur.incarnation):
                continue  # held already
            candidates.append((o, origin, cur))
        return candidates

    def after_deliver(self, t: float, dst: int, src: int, msg: Delivered, token: object
                      ) -> None:
        if token is None:
            return
        candidates: list[_Candidate] = token  # type: ignore[assignment]
        if candidates:
            # Count the candidates the receiver now holds (it may have ignored the message).
            core = self.sim.cores[dst]
            assert core is not None
            table = core.table
            own, held_count, active = self.own, self.held_count, self.active
            for o, origin, cur in candidates:
                new = table.get(origin)
                if (new is None or own[o] is not cur or new.seq != cur.seq
                        or new.incarnation != cur.incarnation):
                    continue
                held_count[o] += 1
                self.held_total += 1
                change = active.get(o)
                if (change is not None and change.seq == cur.seq
                        and change.converged_at_s is None):
                    hops = change.hops.get(src, 0) + 1
                    change.hops[dst] = hops
                    if hops > change.max_hops:
                        change.max_hops = hops
                    if held_count[o] >= change.target:
                        change.converged_at_s = t
        if self.watch_cold_start and self.held_total >= self._cold_target:
            self._check_cold_start(t)

    def own_bumped(self, i: int, advert: Advert) -> None:
        self.held_total += 1 - self.held_count[i]
        self.held_count[i] = 1  # every other copy is now stale
        change = self.active.get(i)
        if change is not None and change.converged_at_s is None and change.seq != advert.seq:
            change.superseded = True
        if self.watch_cold_start:
            self._cold_links_ok[i] = advert.links == self._cold_expected_links[i]

    def crashed(self, i: int, core: Core) -> None:
        # It no longer holds anything. Only the origins' own advert objects are recognised:
        # with --wire full the others hold decoded copies (see docs/simulator.md).
        index, own = self.sim.index, self.own
        for origin, advert in core.table.by_origin.items():
            o = index.get(origin)
            if o is not None and advert is own[o]:
                self.held_count[o] -= 1
                self.held_total -= 1


def _reach(sim: Simulator, i: int) -> tuple[int, int]:
    """(size of i's component, eccentricity of i in it): one BFS, O(component)."""
    depth = [-1] * sim.n  # a list, not a dict: compiled, unboxed index reads and writes
    depth[i] = 0
    queue = deque([i])
    size = eccentricity = 0
    cores, frozen, adjacency, network = sim.cores, sim.frozen, sim.adjacency, sim.network
    while queue:
        x = queue.popleft()
        size += 1
        dx = depth[x]
        eccentricity = dx  # breadth first: the last node taken is among the farthest
        for y in adjacency[x]:
            if (depth[y] < 0 and cores[y] is not None and not frozen[y]
                    and not network.is_cut(x, y)):
                depth[y] = dx + 1
                queue.append(y)
    return size, eccentricity


# --------------------------------------------------------------------------------- agreement


@dataclass(slots=True)
class Agreement:
    agreed: bool
    islands: int
    checked_nodes: int
    problems: list[str]


def check_agreement(sim: Simulator, strict: bool = False) -> Agreement:
    """Every component's members hold the bit-identical total equal to the true fsum.

    strict: also require each member's island to be exactly its component (no node counts
    a node it cannot reach). That reads every node's island: O(N) per node.
    """
    problems: list[str] = []
    comps = sim.components()
    checked = 0
    for comp in comps:
        terms: list[float] = []
        for i in comp:
            core = sim.cores[i]
            assert core is not None
            terms += (core.production, -core.consumption)
        expected = math.fsum(terms)
        names = sorted(sim.names[i] for i in comp) if strict else []
        for i in comp:
            core = sim.cores[i]
            assert core is not None
            checked += 1
            total = core.totals(sim.now)[0]
            if total.hex() != expected.hex():
                problems.append(f"{sim.names[i]}: total {total!r} != {expected!r} "
                                f"(island of {len(comp)})")
            if strict:
                island = core.watch_view(sim.now)["island"]
                if island != names:
                    problems.append(f"{sim.names[i]}: island {island} != true {names}")
        if len(problems) > MAX_REPORTED_PROBLEMS:
            break
    return Agreement(not problems, len(comps), checked, problems[:MAX_REPORTED_PROBLEMS])


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: every reported value really occurred)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]
