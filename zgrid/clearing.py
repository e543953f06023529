"""The Phase II decision: how one island balances itself, as a pure function of its offers.

What it is for: every member of an island holds the bit-identical table of adverts, so every
member can run `clear` over the same offers and get the same clearing price, the same
activation for every node and the same residual, with no auctioneer and no extra message. Each
node then applies only its own activation. `Clearing.hash` lets tests and `status` compare
the result across nodes.

What it must never do: do I/O, read a clock, draw a random number, depend on the order of its
input, or compute a decision in floating point (a float sum depends on its order, and one ulp
of difference between two nodes is two different clearings). It reads base values and offers
only, never the activations it produced, so it cannot feed back on itself.

The rule (enough to implement it in another language)
-----------------------------------------------------
kW are exact integers of 2**-1074 kW ("units", `zgrid.table.exact_units`: every finite double
is an integer multiple of 2**-1074, so sums are exact and order-independent). Prices are
integers of 1/1000 ("milli"): ``price_milli(p) = round_half_even(p * 1000)``, computed exactly
from the double's integer ratio (no float multiplication): 0.0625 -> 62 and -0.0625 -> -62
(exact ties go to the even neighbour), 0.0635 -> 64 (the double is 0.0635000000000000008...).

1. Offers are taken in node-id order (code point order, which is also UTF-8 byte order); a
   duplicate node id is a `ValueError`. Nothing below depends on the order of the input.
2. Imbalance ``N = sum(production - consumption)`` in units.
3. ``N < 0`` (deficit): direction UP, need ``R = -N``, candidates are offers with
   ``flex_up > 0`` priced at ``price_up``. ``N > 0`` (surplus): direction DOWN, ``R = N``,
   offers with ``flex_down > 0`` at ``price_down`` (a negative price, e.g. a battery that wants
   to charge, is the cheapest). ``N == 0``: nothing activates.
4. Candidates are grouped by milli price, cheapest group first. While ``R > 0``, for each group
   with total flex ``G``: if ``G <= R`` every member is activated fully and ``R -= G``;
   otherwise (the marginal group) member i gets ``floor(R * flex_i / G)`` units, and the
   ``L = R - sum of those`` leftover units (``0 <= L <`` group size) go one each to the first L
   members in node-id order; ``R = 0``. No member ever gets more than its flex.
5. Activations are signed: ``+`` raises the node's net (UP), ``-`` lowers it (DOWN). Nodes not
   activated are absent from `Clearing.activations` (read them with `activation_kw`, 0.0).
6. The clearing price is the milli price of the last group that got any activation (the
   marginal group, or the dearest one when flexibility ran out); None when ``N == 0`` or when
   no offer was activated.
7. Whatever ``R`` is left is the shortfall (load to shed in a deficit, generation to curtail in
   a surplus), reported, never hidden. ``balanced_net = N + sum(activations)``: exactly
   ``-shortfall`` in a deficit, ``+shortfall`` in a surplus, exactly 0 when flex sufficed.

Floats appear only at the boundary: every ``*_kw`` is ``from_units`` of its units (correctly
rounded), the price is ``milli / 1000`` (correctly rounded).

The clearing hash
-----------------
``hash`` is blake2b with ``digest_size=8`` over the bytes below, read as a little-endian
unsigned 64-bit integer. Every integer is written in ASCII decimal, ``-`` for negatives, no
``+``, no leading zeros; ``\\0`` is a NUL byte, ``\\n`` a line feed; ids are UTF-8::

    zgrid-clearing-v1\\n
    imbalance\\0<N units>\\n
    activations\\0<count>\\n
    <node_id>\\0<activation units>\\n      (count lines: nonzero activations, ids ascending)
    price\\0<price milli, or the word none>\\n
    shortfall\\0<shortfall units>\\n

The count line keeps the encoding unambiguous although a node may be called "price".
"""

from __future__ import annotations

import functools
import math
from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import pairwise
from types import MappingProxyType
from typing import Final

from zgrid.table import exact_units, from_units
from zgrid.wire import hash64

PRICE_SCALE_MILLI: Final = 1000  # prices are compared and hashed in integer thousandths
HASH_DOMAIN: Final = b"zgrid-clearing-v1\n"


class Direction(StrEnum):
    """Which flexibility the island needs."""

    NONE = "none"  # balanced already: nothing activates
    UP = "up"  # deficit: raise nets (generate, discharge, shed load)
    DOWN = "down"  # surplus: lower nets (curtail, charge, switch on load)


class Shortfall(StrEnum):
    """What the island must do about what flexibility could not cover."""

    NONE = "none"
    SHED_LOAD = "shed_load"  # deficit left over
    CURTAIL_GENERATION = "curtail_generation"  # surplus left over


def price_milli(price: float) -> int:
    """`price` in integer thousandths, rounded half to even, computed exactly.

    A double is n/d with d a power of two, so price*1000 = 1000n/d exactly; floor division and
    the remainder decide the rounding without any float arithmetic. `price` must be finite.
    """
    numerator, denominator = price.as_integer_ratio()
    quotient, remainder = divmod(numerator * PRICE_SCALE_MILLI, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


@dataclass(frozen=True, slots=True)
class Offer:
    """One island member's base values and flexibility, as its advert carries them.

    `price_up` and `price_down` are what the node asks per kWh for moving its net up or down;
    `price_down` may be negative (it would pay to lower its net, e.g. to charge a battery).
    """

    node_id: str
    production_kw: float
    consumption_kw: float
    flex_up_kw: float = 0.0
    price_up: float = 0.0
    flex_down_kw: float = 0.0
    price_down: float = 0.0

    def __post_init__(self) -> None:
        # The wire validates adverts already; this guard keeps one bad offer built elsewhere
        # (a simulator, a test) from failing deep inside integer arithmetic, or worse, a NaN
        # from being hashed into a clearing.
        if not isinstance(self.node_id, str) or not self.node_id or any(
                c in self.node_id for c in "\0\n"):
            raise ValueError(f"node_id: must be a non-empty id without NUL or newline, "
                             f"got {self.node_id!r}")
        for name in ("production_kw", "consumption_kw", "flex_up_kw", "price_up",
                     "flex_down_kw", "price_down"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} of {self.node_id}: must be finite, got {value!r}")
        for name in ("flex_up_kw", "flex_down_kw"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} of {self.node_id}: must be >= 0, "
                                 f"got {getattr(self, name)!r}")


@dataclass(frozen=True, slots=True)
class Clearing:
    """The result of `clear`: exact integers (the decision) and their floats (for display).

    `activations` holds only nonzero activations, in kW: + raises that node's net, - lowers it.
    """

    # The units are 300-digit integers: left out of repr, which shows the kW.
    direction: Direction
    imbalance_units: int = field(repr=False)  # N: sum of base nets in 2**-1074 kW
    activation_units: Mapping[str, int] = field(repr=False, hash=False)  # nonzero, by id
    price_milli: int | None
    shortfall_units: int = field(repr=False)  # >= 0
    shortfall: Shortfall
    balanced_net_units: int = field(repr=False)  # N + sum(activations): -/+ shortfall, or 0
    imbalance_kw: float
    activations: Mapping[str, float] = field(hash=False)
    clearing_price: float | None
    shortfall_kw: float
    balanced_net_kw: float
    hash: int  # see the module docstring for the exact bytes hashed

    def activation_kw(self, node_id: str) -> float:
        """What `node_id` must apply: 0.0 for a node not activated (or not in the island)."""
        return self.activations.get(node_id, 0.0)

    def canonical_bytes(self) -> bytes:
        """The bytes `hash` is computed over (module docstring)."""
        return canonical_bytes(self.imbalance_units, self.activation_units.items(),
                               self.price_milli, self.shortfall_units)


def canonical_bytes(imbalance_units: int, activation_units: Iterable[tuple[str, int]],
                    price: int | None, shortfall_units: int) -> bytes:
    """The canonical encoding of a clearing (module docstring); zero activations are left out
    and the rest sorted by id here, so any iterable of (id, units) gives the same bytes."""
    rows = sorted((node_id, units) for node_id, units in activation_units if units != 0)
    lines = [f"imbalance\0{imbalance_units}", f"activations\0{len(rows)}"]
    lines.extend(f"{node_id}\0{units}" for node_id, units in rows)
    lines.append(f"price\0{'none' if price is None else price}")
    lines.append(f"shortfall\0{shortfall_units}")
    return HASH_DOMAIN + "".join(line + "\n" for line in lines).encode()


class _Side:
    """One direction's offers: members grouped by milli price, the prices kept sorted."""

    __slots__ = ("groups", "prices", "totals")

    def __init__(self) -> None:
        self.prices: list[int] = []  # ascending: merit order
        self.groups: dict[int, dict[str, int]] = {}  # price -> {node id: flex units}
        self.totals: dict[int, int] = {}  # price -> sum of the group's flex units

    def add(self, node_id: str, price: int, units: int) -> None:
        group = self.groups.get(price)
        if group is None:
            insort(self.prices, price)
            group = self.groups[price] = {}
            self.totals[price] = 0
        group[node_id] = units
        self.totals[price] += units

    def remove(self, node_id: str, price: int) -> None:
        group = self.groups[price]
        self.totals[price] -= group.pop(node_id)
        if not group:
            del self.groups[price], self.totals[price]
            self.prices.pop(bisect_left(self.prices, price))

    def move(self, node_id: str, old_price: int, old_units: int, price: int, units: int
             ) -> None:
        """`node_id` offered `old_units` at `old_price` (0 units: nothing) and now offers
        `units` at `price`. A battery's offer drifts in size at one price: that is one
        group's entry and total updated in place."""
        if old_units and units and old_price == price:
            if old_units != units:
                self.groups[price][node_id] = units
                self.totals[price] += units - old_units
            return
        if old_units:
            self.remove(node_id, old_price)
        if units:
            self.add(node_id, price, units)

    def grant(self, need: int) -> tuple[dict[str, int], int | None, int]:
        """Rule step 4 over every group: (units granted by id, clearing price, remaining)."""
        granted: dict[str, int] = {}
        price: int | None = None
        for group_price in self.prices:
            if need == 0:
                break
            price = group_price
            group_flex = self.totals[group_price]
            if group_flex <= need:
                granted.update(self.groups[group_price])
                need -= group_flex
                continue
            granted.update(_marginal_shares(self.groups[group_price], need, group_flex))
            need = 0
        return granted, price, need

    def share(self, node_id: str, price: int, need: int) -> int:
        """What rule step 4 grants `node_id` (offering at `price`) alone: the groups below its
        price are summed, not walked member by member, and only a marginal group is shared."""
        below = 0
        totals = self.totals
        for group_price in self.prices:
            if group_price >= price:
                break
            below += totals[group_price]
            if below >= need:
                return 0
        left = need - below
        group = self.groups[price]
        if totals[price] <= left:
            return group[node_id]
        return _marginal_shares(group, left, totals[price]).get(node_id, 0)


def _marginal_shares(group: Mapping[str, int], need: int, group_flex: int) -> dict[str, int]:
    """The marginal group's pro rata shares of `need` < `group_flex`: floor shares, then the
    leftover units one each to the first members in node-id order (rule step 4)."""
    members = sorted(group.items())
    shares = [(node_id, need * flex // group_flex) for node_id, flex in members]
    leftover = need - sum(share for _, share in shares)
    granted: dict[str, int] = {}
    for index, (node_id, share) in enumerate(shares):
        # Fewer leftover units than members, and each member's floor share is below its flex
        # (need < group_flex), so one more unit each never exceeds a flex.
        units = share + (1 if index < leftover else 0)
        if units:
            granted[node_id] = units
    return granted


# A flood hands the same offer to every node it reaches, and a simulator runs a thousand nodes
# in one process: the exact conversion (two big-integer roundings, two 1074-bit shifts) is then
# done once per offer rather than once per node.
_NOTHING_HELD: Final = (0, 0, 0, 0)  # a book entry offering no units either way


@functools.lru_cache(maxsize=1 << 14)
def _book_entry(flex_up_kw: float, price_up: float, flex_down_kw: float, price_down: float
                ) -> tuple[int, int, int, int]:
    """(up price milli, up flex units, down price milli, down flex units) of an offer; a
    direction without flex is 0 units."""
    return (price_milli(price_up), exact_units(flex_up_kw) if flex_up_kw > 0 else 0,
            price_milli(price_down), exact_units(flex_down_kw) if flex_down_kw > 0 else 0)


class OfferBook:
    """An island's offers, kept grouped by price and sorted, so that the island can be cleared
    again after one member's offer changed without sorting the island again.

    The core keeps one per island and updates it as adverts change (an O(log n) step per
    changed offer); `clearing` gives exactly what `clear` gives for the same offers (`clear` is
    built on it), and `activation_units` one member's share alone, which costs the price groups
    below that member, not the island. A node asks for its own share after every table change,
    so this is what keeps balancing O(changes) rather than O(island) per message.
    Holds only offers with some flexibility; base values come in as the imbalance.
    """

    __slots__ = ("_down", "_held", "_up", "version")

    def __init__(self) -> None:
        self._up = _Side()
        self._down = _Side()
        self.version = 0  # moves whenever an offer held changes: a reader's cache key
        self._held: dict[str, tuple[int, int, int, int]] = {}  # up price, units; down price, units

    def __len__(self) -> int:
        return len(self._held)

    def set(self, node_id: str, flex_up_kw: float, price_up: float, flex_down_kw: float,
            price_down: float) -> None:
        """Hold `node_id`'s offer (replacing the one held); zero flex both ways removes it."""
        entry = _book_entry(flex_up_kw, price_up, flex_down_kw, price_down)
        old = self._held.get(node_id, _NOTHING_HELD)
        if old == entry:
            return
        if not entry[1] and not entry[3]:
            self.remove(node_id)
            return
        self.version += 1
        self._held[node_id] = entry
        self._up.move(node_id, old[0], old[1], entry[0], entry[1])
        self._down.move(node_id, old[2], old[3], entry[2], entry[3])

    def remove(self, node_id: str) -> None:
        entry = self._held.pop(node_id, None)
        if entry is None:
            return
        self.version += 1
        if entry[1]:
            self._up.remove(node_id, entry[0])
        if entry[3]:
            self._down.remove(node_id, entry[2])

    def activation_units(self, node_id: str, imbalance_units: int) -> int:
        """`node_id`'s signed activation in units, equal to `clearing(imbalance_units)`'s."""
        entry = self._held.get(node_id)
        if entry is None or imbalance_units == 0:
            return 0
        if imbalance_units < 0:
            return self._up.share(node_id, entry[0], -imbalance_units) if entry[1] else 0
        return -self._down.share(node_id, entry[2], imbalance_units) if entry[3] else 0

    def clearing(self, imbalance_units: int) -> Clearing:
        """Clear the island whose base values sum to `imbalance_units` (rule steps 3 to 7)."""
        if imbalance_units < 0:
            direction, sign = Direction.UP, 1
            granted, price, remaining = self._up.grant(-imbalance_units)
        elif imbalance_units > 0:
            direction, sign = Direction.DOWN, -1
            granted, price, remaining = self._down.grant(imbalance_units)
        else:
            direction, sign, granted, price, remaining = Direction.NONE, 0, {}, None, 0
        activation_units = {node_id: sign * units for node_id, units in sorted(granted.items())}
        balanced = imbalance_units + sum(activation_units.values())
        if remaining == 0:
            shortfall = Shortfall.NONE
        elif direction is Direction.UP:
            shortfall = Shortfall.SHED_LOAD
        else:
            shortfall = Shortfall.CURTAIL_GENERATION
        return Clearing(
            direction=direction,
            imbalance_units=imbalance_units,
            activation_units=MappingProxyType(activation_units),
            price_milli=price,
            shortfall_units=remaining,
            shortfall=shortfall,
            balanced_net_units=balanced,
            imbalance_kw=from_units(imbalance_units),
            activations=MappingProxyType({node_id: from_units(units)
                                          for node_id, units in activation_units.items()}),
            clearing_price=None if price is None else price / PRICE_SCALE_MILLI,
            shortfall_kw=from_units(remaining),
            balanced_net_kw=from_units(balanced),
            hash=hash64(canonical_bytes(imbalance_units, activation_units.items(), price,
                                               remaining)),
        )


def clear(offers: Sequence[Offer]) -> Clearing:
    """Balance an island: its members' offers in, who moves by how much out (module docstring).

    Pure and deterministic: the same set of offers in any order gives the bit-identical result.
    """
    ordered = sorted(offers, key=lambda o: o.node_id)
    for before, after in pairwise(ordered):
        if before.node_id == after.node_id:
            raise ValueError(f"node_id: duplicate offer for {before.node_id!r}")
    imbalance = sum(exact_units(o.production_kw) - exact_units(o.consumption_kw)
                    for o in ordered)
    book = OfferBook()
    for o in ordered:
        book.set(o.node_id, o.flex_up_kw, o.price_up, o.flex_down_kw, o.price_down)
    return book.clearing(imbalance)
