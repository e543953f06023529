"""The advert table: one node's copy of the grid's link-state database, and what follows from it.

What it is for: it stores at most one advert per origin (the newest version seen), keeps an
order-independent hash of its versions (what pings compare), and derives the node's *island*
(everything reachable over two-way edges), the island's exact totals, and the hop counts the
pruned flood compares (`hops_from`, `links_version`). It also forgets
origins that stayed unreachable for long, leaving tombstones so that a stale copy still
travelling the grid cannot bring them back.

Exact totals: every finite double is an integer multiple of 2**-1074, so production and
consumption are summed as Python integers in those units. The sum is exact whatever the order,
and integer true division rounds correctly, so `total_net` is bit-identical on every member of
an island and equals `math.fsum` of its terms. A value change of an island member costs O(1);
the island is recomputed (O(N)) only after some advert's `links` changed, and lazily.

What it must never do: decide anything about who sent an advert or whether it is about us (the
core does), or do I/O of any kind. Time comes in as an argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from enum import Enum
from types import MappingProxyType
from typing import Final
from weakref import WeakValueDictionary

from zgrid.wire import MAX_COUNTER, Advert, Digest, Flex

UNIT_EXPONENT: Final = 1074  # 2**-1074 is the smallest positive double
_UNIT_SCALE: Final = 1 << UNIT_EXPONENT


# Cached: a flood hands the same value to every node, and a simulator holds thousands of
# nodes in one process; the conversion (a 1074-bit shift) is most of a merge's arithmetic.
# A plain dict, emptied when full: functools.lru_cache's bookkeeping cost more than the
# conversion it saved (5 % of a simulation's instructions). 0.0 and -0.0 share an entry,
# and their units (0).
UNITS_CACHE_MAX_VALUES: Final = 1 << 16
_units_cache: Final[dict[float, int]] = {}


def exact_units(kw: float) -> int:
    """A finite double as an exact integer number of 2**-1074 kW."""
    units = _units_cache.get(kw)
    if units is None:
        numerator, denominator = kw.as_integer_ratio()
        units = numerator << (UNIT_EXPONENT + 1 - denominator.bit_length())
        if len(_units_cache) >= UNITS_CACHE_MAX_VALUES:
            _units_cache.clear()
        _units_cache[kw] = units
    return units


def from_units(units: int) -> float:
    return units / _UNIT_SCALE  # int / int is correctly rounded, whatever the size


def entry_hash(a: Advert) -> int:
    """The 64-bit share of one advert's version in the table hash (`Advert.version_hash`;
    docs/protocol.md): the table hash is the XOR of its entries' shares."""
    return a.version_hash()


def _offer_moved(new: Flex | None, old: Flex | None) -> bool:
    """`new != old`, field by field: Flex's dataclass __eq__ builds two tuples to compare, and
    every new version of an offering node is compared here."""
    if new is None or old is None:
        return new is not old
    return (new.flex_up_kw != old.flex_up_kw or new.price_up != old.price_up
            or new.flex_down_kw != old.flex_down_kw or new.price_down != old.price_down)


# Every member of an island computes the same island. Where many tables live in one process
# (the simulator: 10,000 nodes, each island a set of 10,000 ids, 5 GB if each kept its own
# copy) they share one frozenset. Immutable, so sharing cannot change any result.
_SHARED_ISLANDS: Final[WeakValueDictionary[frozenset[str], frozenset[str]]] = WeakValueDictionary()


class Merge(Enum):
    """What `AdvertTable.merge` did with an advert."""

    NEW = "new"  # stored: it is newer than what we held (or the first of its origin)
    STALE = "stale"  # we hold this version or a newer one
    FORGOTTEN = "forgotten"  # a stale copy of an origin we forgot on purpose
    FULL = "full"  # a new origin, but the table holds `max_nodes` reachable origins already
    UNVERIFIED = "unverified"  # newer than what we held, but `verify` refused it


class AdvertTable:
    """The adverts one node holds, keyed by origin. `owner` is the node holding the table."""

    __slots__ = ("_adverts", "_island", "_island_version", "_offers_changed", "_tombstones",
                 "_units_consumption", "_units_production", "_unreachable_since", "evicted",
                 "hash", "links_version", "max_nodes", "owner")

    def __init__(self, owner: str, max_nodes: int) -> None:
        self.owner = owner
        self.max_nodes = max_nodes
        self.hash = 0  # XOR of entry_hash over every stored advert
        self.evicted = 0  # unreachable adverts dropped to make room for a new origin
        self.links_version = 0  # grows whenever some advert's links (the topology) changed
        self._adverts: dict[str, Advert] = {}
        self._island: frozenset[str] = frozenset({owner})
        # The links_version `_island` (and its totals) was derived at: stale when they differ.
        self._island_version = -1
        self._units_production = 0
        self._units_consumption = 0
        self._unreachable_since: dict[str, float] = {}
        self._tombstones: dict[str, tuple[tuple[int, int], float]] = {}  # version, forgotten at
        # Origins whose offer may differ since `take_offers_changed` was last called (stored
        # for the first time with an offer, stored with another offer, or dropped): what the
        # core's offer book must read again. Most new versions move values only, and are not
        # in it.
        # Bounded by the origins held.
        self._offers_changed: set[str] = set()

    @classmethod
    def converged(cls, owner: str, adverts: Mapping[str, Advert], max_nodes: int
                  ) -> AdvertTable:
        """A table holding exactly `adverts`, as flooding leaves it once a grid agrees.

        For simulators that start from an agreed state instead of a cold start. The island and
        totals are derived from the adverts, as on any table; `copy_for` then gives every other
        member of the same island its own table at the cost of one dict copy.
        """
        table = cls(owner, max_nodes)
        for advert in adverts.values():
            table.hash ^= entry_hash(advert)
        table._adverts = dict(adverts)
        return table

    def copy_for(self, owner: str) -> AdvertTable:
        """The same adverts held by another node. The island (and its totals) carry over when
        that node is a member of it: the island is a connected component, the same for all."""
        copy = AdvertTable(owner, self.max_nodes)
        copy.hash = self.hash
        copy._adverts = dict(self._adverts)
        copy._tombstones = dict(self._tombstones)
        copy.links_version = self.links_version
        if self._island_version == self.links_version and owner in self._island:
            copy._island, copy._island_version = self._island, self._island_version
            copy._units_production = self._units_production
            copy._units_consumption = self._units_consumption
        return copy

    # ------------------------------------------------------------------------ reading

    def get(self, origin: str) -> Advert | None:
        return self._adverts.get(origin)

    @property
    def by_origin(self) -> Mapping[str, Advert]:
        """A read-only view of the stored adverts, keyed by origin."""
        return MappingProxyType(self._adverts)

    def __len__(self) -> int:
        return len(self._adverts)

    def __contains__(self, origin: object) -> bool:
        return origin in self._adverts

    def __iter__(self) -> Iterator[Advert]:
        return iter(self._adverts.values())

    def digest(self) -> dict[str, tuple[int, int]]:
        """{origin: (incarnation, seq)} of every stored advert."""
        return {origin: (a.incarnation, a.seq) for origin, a in self._adverts.items()}

    def newer_than(self, theirs: Digest) -> Iterator[Advert]:
        """Our adverts that a holder of `theirs` lacks or holds an older version of."""
        for origin, a in self._adverts.items():
            version = theirs.get(origin)
            if version is None or version < (a.incarnation, a.seq):
                yield a

    def lacks_any_of(self, theirs: Digest) -> bool:
        """Whether `theirs` lists a version newer than ours of some origin."""
        adverts = self._adverts
        for origin, version in theirs.items():
            mine = adverts.get(origin)
            if mine is None or (mine.incarnation, mine.seq) < version:
                return True
        return False

    # ------------------------------------------------------------------------ writing

    def merge(self, a: Advert, verify: Callable[[Advert], bool] | None = None) -> Merge:
        """Store `a` iff it is newer than the version held (and `verify`, if given, accepts it:
        it is asked only about versions that would be stored). The hot path of the protocol:
        every advert of every message passes here, so it does O(1) work."""
        origin = a.origin
        old = self._adverts.get(origin)
        if old is None:
            return self._merge_new_origin(a, verify)
        if a.incarnation < old.incarnation or (
                a.incarnation == old.incarnation and a.seq <= old.seq):
            return Merge.STALE
        if verify is not None and not verify(a):
            return Merge.UNVERIFIED
        self._store(a, old)
        return Merge.NEW

    def _merge_new_origin(self, a: Advert, verify: Callable[[Advert], bool] | None) -> Merge:
        victim: str | None = None
        tomb = self._tombstones.get(a.origin)
        if tomb is not None and (a.incarnation, a.seq) <= tomb[0]:
            return Merge.FORGOTTEN
        if len(self._adverts) >= self.max_nodes:
            # Full: an origin nobody in our island can reach makes room, or a peer that
            # filled the table with unreachable inventions would keep real nodes out.
            victim = self._unreachable_victim()
            if victim is None:
                return Merge.FULL
        if verify is not None and not verify(a):
            return Merge.UNVERIFIED
        if victim is not None:
            self._evict(victim)
        self._store(a, None)
        return Merge.NEW

    def _unreachable_victim(self) -> str | None:
        """What a full table drops for a new origin: the origin unreachable the longest (as
        `forget` dated it), else the oldest unreachable one; None if every origin is reachable.

        Reachability is the island last computed, not a fresh one: recomputing it (O(N)) for
        every new origin would let a flood of adverts cost O(N) each. At worst an origin that
        has just become reachable is dropped, and anti-entropy brings it back.
        """
        island, adverts = self._island, self._adverts
        if len(island) >= len(adverts):  # a full table of reachable origins: nothing to scan
            return None
        for origin in self._unreachable_since:
            if origin not in island and origin in adverts:
                return origin
        for origin in adverts:
            if origin not in island:
                return origin
        return None

    def _evict(self, origin: str) -> None:
        # No tombstone: it was dropped for room, not forgotten, and may be learned again. Not in
        # the island, so the island and its totals stay as they are.
        old = self._adverts.pop(origin)
        self.hash ^= entry_hash(old)
        self._unreachable_since.pop(origin, None)
        self._offers_changed.add(origin)
        self.evicted += 1

    def put(self, a: Advert) -> None:
        """Store `a` whatever is held: the owner's own new advert."""
        self._store(a, self._adverts.get(a.origin))

    def offers_changed_pending(self) -> bool:
        """Whether some origin's offer may have changed since `take_offers_changed`."""
        return bool(self._offers_changed)

    def take_offers_changed(self) -> set[str]:
        """The origins whose offer may have changed since the last call (and forget them)."""
        changed, self._offers_changed = self._offers_changed, set()
        return changed

    def _store(self, a: Advert, old: Advert | None) -> None:
        origin = a.origin
        self._adverts[origin] = a
        if old is None:
            # A new origin without an offer changes no book: the book holds nothing of it,
            # since its last removal was recorded here until the book read it. (Recording
            # every new origin cost one set entry per advert held during a cold start.)
            if a.flex is not None:
                self._offers_changed.add(origin)
            self._tombstones.pop(origin, None)
            self.hash ^= a.version_hash()
            if a.links:
                self.links_version += 1
            return
        if a.flex is not old.flex and _offer_moved(a.flex, old.flex):
            self._offers_changed.add(origin)
        self.hash ^= old.version_hash() ^ a.version_hash()
        if old.links != a.links:
            self.links_version += 1
        elif self._island_version == self.links_version and origin in self._island:
            # Most new versions move one value (or only an offer or activation): skip the rest.
            if a.production != old.production:
                self._units_production += (exact_units(a.production)
                                           - exact_units(old.production))
            if a.consumption != old.consumption:
                self._units_consumption += (exact_units(a.consumption)
                                            - exact_units(old.consumption))

    def retract(self, origin: str, now: float) -> None:
        """Drop an origin's advert and keep a tombstone at the maximum version, which stops
        every version of it until the tombstone expires (`forget`): what a received advert at
        the maximum version does (see the core's `_learn`)."""
        old = self._adverts.pop(origin, None)
        if old is not None:
            self.hash ^= entry_hash(old)
            self._unreachable_since.pop(origin, None)
            self._offers_changed.add(origin)
            self.links_version += 1
        self._tombstones[origin] = ((MAX_COUNTER, MAX_COUNTER), now)

    def discard(self, origin: str) -> None:
        """Drop an origin's advert with no tombstone (a revoked member: nothing of it can be
        stored again while its key is gone, and all of it may come back with the key)."""
        old = self._adverts.pop(origin, None)
        if old is None:
            return
        self.hash ^= entry_hash(old)
        self._unreachable_since.pop(origin, None)
        self._offers_changed.add(origin)
        self.links_version += 1

    def forget(self, now: float, forget_after_s: float) -> list[str]:
        """Drop origins unreachable for `forget_after_s` (leaving tombstones) and tombstones
        older than that; the origins dropped.

        An origin's unreachability is dated by the first call that finds it outside the island,
        so call this every `forget_after_s / k` (the core does, k = 10): an origin is then
        forgotten between `forget_after_s` and `(1 + 1/k) forget_after_s` after it left. Dating
        it here rather than at every island change keeps island changes O(island).
        """
        island = self.island(now)
        limit = now - forget_after_s
        since = self._unreachable_since
        if not since and not self._tombstones and len(island) >= len(self._adverts) and \
                self.owner in self._adverts:
            return []  # every origin held is reachable (the island holds only held ones)
        for origin in [o for o in since if o in island or o not in self._adverts]:
            del since[origin]  # back in the island (or gone): the clock restarts
        dropped = []
        for origin, old in list(self._adverts.items()):
            if origin not in island and since.setdefault(origin, now) <= limit:
                del self._adverts[origin]
                del since[origin]
                self._offers_changed.add(origin)
                self.hash ^= entry_hash(old)
                self._tombstones[origin] = ((old.incarnation, old.seq), now)
                dropped.append(origin)
        for origin, (_, at) in list(self._tombstones.items()):
            if at <= limit:  # long enough for every stale copy in the grid to be forgotten too
                del self._tombstones[origin]
        return dropped

    def tombstone(self, origin: str) -> tuple[int, int] | None:
        """The last version of a forgotten origin, while its tombstone lasts."""
        tomb = self._tombstones.get(origin)
        return None if tomb is None else tomb[0]

    # ------------------------------------------------------------------------ island, totals

    def island(self, now: float) -> frozenset[str]:
        """The owner and every origin reachable from it over two-way edges (both adverts list
        each other), recomputed only after some advert's links changed."""
        if self._island_version == self.links_version:
            return self._island
        adverts = self._adverts
        seen = {self.owner}
        self._reach(self.owner, seen)
        island = frozenset(seen)
        self._island = _SHARED_ISLANDS.setdefault(island, island)
        self._island_version = self.links_version
        self._units_production = sum(exact_units(adverts[x].production)
                                     for x in seen if x in adverts)
        self._units_consumption = sum(exact_units(adverts[x].consumption)
                                      for x in seen if x in adverts)
        return self._island

    def hops_from(self, start: str) -> dict[str, int]:
        """Hops from `start` to every origin it reaches over two-way edges (breadth first):
        what the pruned flood (zgrid/flood.py) compares. O(island)."""
        adverts = self._adverts
        hops = {start: 0}
        frontier = [start]
        depth = 0
        while frontier:
            depth += 1
            reached: list[str] = []
            for x in frontier:
                ax = adverts.get(x)
                for y in ax.links if ax is not None else ():
                    if y not in hops and (ay := adverts.get(y)) is not None and x in ay.links:
                        hops[y] = depth
                        reached.append(y)
            frontier = reached
        return hops

    def neighbours(self, origin: str) -> list[str]:
        """The origins `origin` has a two-way edge with (both adverts list each other)."""
        adverts = self._adverts
        held = adverts.get(origin)
        return [y for y in held.links if (ay := adverts.get(y)) is not None
                and origin in ay.links] if held is not None else []

    def components(self) -> list[list[str]]:
        """Every known origin grouped into islands as each would see itself: connected over
        two-way edges, sorted ids, largest first. For views only (O(table)): the protocol
        needs nothing but the owner's own island."""
        adverts = self._adverts
        seen: set[str] = set()
        groups: list[list[str]] = []
        for start in sorted(adverts):
            if start in seen:
                continue
            group = {start}
            self._reach(start, group)
            seen |= group
            groups.append(sorted(group))
        groups.sort(key=lambda g: (-len(g), g[0]))
        return groups

    def _reach(self, start: str, seen: set[str]) -> None:
        """Add to `seen` every origin reachable from `start` over two-way edges (both adverts
        list each other) without passing through what `seen` holds already."""
        adverts = self._adverts
        stack = [start]
        while stack:
            x = stack.pop()
            ax = adverts.get(x)
            for y in ax.links if ax is not None else ():
                if y not in seen and (ay := adverts.get(y)) is not None and x in ay.links:
                    seen.add(y)
                    stack.append(y)

    def totals(self, now: float) -> tuple[float, float, float]:
        """(total_net, total_production, total_consumption) of the island, exactly rounded."""
        self.island(now)
        p, c = self._units_production, self._units_consumption
        return from_units(p - c), from_units(p), from_units(c)

    def exact_units(self, now: float) -> tuple[int, int]:
        """The island's production and consumption in 2**-1074 kW: a change detector."""
        self.island(now)
        return self._units_production, self._units_consumption
