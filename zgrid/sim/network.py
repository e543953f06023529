"""The simulated network: whether, and when, a message sent from one node reaches another.

What this file is for
=====================

Everything a real network decides about a message in flight, and nothing else:

- `Latency`: the one-way delay of a message (constant, uniform or lognormal);
- `LinkModel`: how one link (both directions) treats a message: latency, loss, duplication,
  and the probability of ignoring per-link FIFO order (reordering);
- `Network`: the links of one simulation: the default model, per-link overrides, cut links
  (partitions) and the last arrival time per directed link. The engine asks it once per sent
  message (`Network.arrivals`) and schedules one delivery per time it gets back, and once
  per connection a crash closes (`Network.closure`).

What it must never do
=====================

- Look at a message: a link does not know what it carries, so loss, delay and order never
  depend on the message type or size.
- Draw randomness from anything but the simulator's one seeded generator, in any order but
  the order of the sends (loss, then latency, then reordering, then duplication): that order
  is part of what a seed means, and changing it changes every trace hash.
- Iterate a set for order: the cut set is only ever tested for membership.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from zgrid.sim.errors import SimError

DEFAULT_LATENCY_S: Final = 60e-6  # one loopback hop through ZeroMQ on a laptop

Pair = tuple[int, int]  # an undirected link, as (lower index, higher index)


def pair(i: int, j: int) -> Pair:
    """The undirected link between nodes i and j (both directions share one model and cut)."""
    return (i, j) if i < j else (j, i)


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

    def __reduce__(self) -> tuple[type[Latency], tuple[str, float, float]]:
        # By the constructor: compiled with mypyc (scripts/mypyc_build.py), a frozen class
        # cannot be unpickled field by field, and scenarios go to worker processes.
        return Latency, (self.kind, self.a_s, self.b)

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

    def __reduce__(self) -> tuple[type[LinkModel], tuple[Latency, float, float, float]]:
        return LinkModel, (self.latency, self.loss, self.duplicate, self.reorder)  # as Latency


@dataclass(slots=True)
class LinkStats:
    """What the links did to messages (the engine's `Stats` adds its own counts to these)."""

    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    dropped_cut: int = 0


_NOT_DELIVERED: Final[tuple[float, ...]] = ()


class Network:
    """The links between the nodes of one simulation, by node index."""

    def __init__(self, rng: random.Random, stats: LinkStats, link: LinkModel | None = None
                 ) -> None:
        self.rng = rng  # the simulator's generator, shared: one stream of random choices
        self.stats = stats
        self.default_link = link or LinkModel()
        self.link_overrides: dict[Pair, LinkModel] = {}
        self.cut: set[Pair] = set()  # membership only, never iterated for order
        # The last arrival per directed link (FIFO), keyed by `_directed(i, j)`.
        self._last_arrival: dict[int, float] = {}

    # ------------------------------------------------------------------ faults

    def cut_links(self, pairs: Sequence[Pair]) -> None:
        self.cut.update(pair(i, j) for i, j in pairs)

    def restore_links(self, pairs: Sequence[Pair]) -> None:
        for i, j in pairs:
            self.cut.discard(pair(i, j))

    def set_link_model(self, i: int, j: int, model: LinkModel) -> None:
        self.link_overrides[pair(i, j)] = model

    def is_cut(self, i: int, j: int) -> bool:
        return bool(self.cut) and pair(i, j) in self.cut

    def heal(self) -> None:
        """Every link uncut and back to the default model."""
        self.cut.clear()
        self.link_overrides.clear()

    # ------------------------------------------------------------------ the send path

    def arrivals(self, i: int, j: int, now: float) -> tuple[float, ...]:
        """When a message i sends to j now arrives: no time (lost or cut), one, or two
        (duplicated). The random draws are made in a fixed order: loss, latency, reordering,
        duplication, then latency and reordering of the copy."""
        model = self.default_link
        if self.cut or self.link_overrides:  # the pair is built only when a fault needs it
            link = (i, j) if i < j else (j, i)
            if link in self.cut:
                self.stats.dropped_cut += 1
                return _NOT_DELIVERED
            model = self.link_overrides.get(link, model)
        rng = self.rng
        if model.loss and rng.random() < model.loss:
            self.stats.lost += 1
            return _NOT_DELIVERED
        # The first arrival is `_arrival`, inlined: this runs once per message of a run.
        first = now + model.latency.sample(rng)
        if model.reorder and rng.random() < model.reorder:
            self.stats.reordered += 1
        else:
            key = _directed(i, j)
            last = self._last_arrival.get(key, first)
            if first < last:
                first = last
            self._last_arrival[key] = first
        if model.duplicate and rng.random() < model.duplicate:
            self.stats.duplicated += 1
            return (first, self._arrival(i, j, model, now))
        return (first,)

    def closure(self, i: int, j: int, now: float) -> float | None:
        """When j's end of a connection with i hears that i's process died (its kernel closed
        the socket): one latency, after whatever i sent j before; never lost (TCP retransmits
        it). None over a cut link: j hears nothing, and only silence tells it."""
        link = pair(i, j)
        if self.cut and link in self.cut:
            return None
        model = self.link_overrides.get(link, self.default_link)
        return max(now + model.latency.sample(self.rng),
                   self._last_arrival.get(_directed(i, j), now))

    def _arrival(self, i: int, j: int, model: LinkModel, now: float) -> float:
        at = now + model.latency.sample(self.rng)
        if model.reorder and self.rng.random() < model.reorder:
            self.stats.reordered += 1
            return at
        key = _directed(i, j)
        last = self._last_arrival.get(key, at)
        if at < last:
            at = last  # FIFO: equal times keep send order (the agenda runs them as scheduled)
        self._last_arrival[key] = at
        return at


def _directed(i: int, j: int) -> int:
    """One int for the directed link i -> j: no tuple to build and hash once per message."""
    return (i << 32) | j
