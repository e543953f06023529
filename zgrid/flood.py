"""Which siblings a new advert goes to: a flood pruned to a shortest-path tree of its origin.

Theory: in a full flood, a version of origin O that is new to node X goes to every UP sibling
of X but the one it came from, so it crosses every link of the grid at least once. Every node
holds the topology (the links of every advert), and so can tell how many hops over two-way
edges separate any two nodes. A node Y h hops from O has neighbours h - 1 hops from O (its
*candidate parents*); let its *parent* be the one of them with the smallest id. X sends a
version of O to a sibling Y only if X is Y's parent. Y then receives it once, from its parent,
along a shortest path, as early as in a full flood: a change costs N - 1 adverts instead of
about 2E - (N - 1) (on a random graph of degree 4, 63 instead of 193 at 64 nodes;
docs/benchmarks.md). O itself is everyone's parent at one hop, and sends to all its siblings.

That argument needs the nodes' views of the topology to agree, so the pruning stands down
wherever they may not:

- while X's topology moved less than `settle_s` ago (a cold start, a link coming up or going
  down), and in islands larger than `max_nodes`, X floods in full;
- an origin or a sibling that X cannot place in its island is sent to;
- a version that came from a sibling no nearer O than X (one that, in X's view, would not
  have sent it: its view differs) X floods in full, and so is one that moves the topology
  (and everything after it in the same message: the plan was made for the topology before).

Views that differ without X noticing cost a delay, not the version: pings compare table
hashes, and the digest exchange they trigger repairs what a pruned flood missed. So does a
version lost on the way: a tree has no second copy to fall back on, so a node that takes part
in a repair floods in full for a while (`stand_down`), and where links keep losing messages
the grid keeps the redundancy of a full flood.

What it must never do: decide what is stored or sent (the core does), or do I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from zgrid.table import AdvertTable


@dataclass(frozen=True, slots=True)
class FloodPlan:
    """For one topology and one set of UP siblings: sibling i is bit i of the masks."""

    version: int  # the table's links_version it was made for
    siblings: tuple[str, ...]
    bit: Mapping[str, int]  # sibling id -> its bit
    # origin -> the siblings whose parent we are for it, or that cannot be placed: those a
    # version of it goes to. Origins not in it (outside our island) are flooded in full.
    children: Mapping[str, int]
    nearer: Mapping[str, int]  # origin -> the siblings nearer to it than we are

    def sender_is_nearer(self, sender: str | None, origin: str) -> bool:
        """Whether `sender` is a sibling nearer `origin` than we are, as one that sends a
        version of it to us is when our views agree."""
        bit = self.bit.get(sender) if sender is not None else None
        return bit is not None and (self.nearer.get(origin, 0) >> bit) & 1 == 1


class FloodPruner:
    """The current `FloodPlan` of one node, or None while its topology is not settled."""

    __slots__ = ("_full_until", "_moved_at", "_plan", "_version", "max_nodes", "settle_s")

    def __init__(self, max_nodes: int, settle_s: float) -> None:
        self.max_nodes = max_nodes
        self.settle_s = settle_s
        self._version = -1
        self._moved_at = 0.0
        self._full_until = -math.inf
        self._plan: FloodPlan | None = None

    def note(self, table: AdvertTable, now: float) -> None:
        """Notice a topology change (the core calls this on every timer too, so that a quiet
        node knows when its topology last moved)."""
        if table.links_version != self._version:
            self._version = table.links_version
            self._moved_at = now
            self._plan = None

    def stand_down(self, now: float, hold_s: float) -> None:
        """Flood in full for `hold_s`: the node took part in an anti-entropy repair, so
        something was lost or held up on the way, and a tree has no second copy."""
        self._full_until = max(self._full_until, now + hold_s)

    def settled(self, table: AdvertTable, now: float) -> bool:
        """Whether the flood may be pruned now: the topology has not moved for `settle_s`,
        no repair asked for a full flood, and the island is small enough. Cheap: every
        message with news asks it (the core, before `settled_plan`)."""
        self.note(table, now)
        return (now - self._moved_at >= self.settle_s and now >= self._full_until
                and len(table.island(now)) <= self.max_nodes)

    def plan(self, table: AdvertTable, siblings: Sequence[str], now: float
             ) -> FloodPlan | None:
        """The plan for `siblings` (the ids of our UP siblings, in order), or None: flood."""
        if not self.settled(table, now):
            return None
        return self.settled_plan(table, siblings, now)

    def settled_plan(self, table: AdvertTable, siblings: Sequence[str], now: float
                     ) -> FloodPlan:
        """`plan`, once `settled` said yes at `now`: the core asks that first, so that a grid
        flooding in full builds no sibling list per message, and need not ask twice."""
        plan = self._plan
        if plan is None or plan.siblings != tuple(siblings):
            self._plan = plan = _plan(table, tuple(siblings), table.island(now))
        return plan


def _plan(table: AdvertTable, siblings: tuple[str, ...], island: frozenset[str]
          ) -> FloodPlan:
    """Per origin: the siblings whose parent we are (`children`), and those nearer it. One
    breadth-first search from us, each sibling and each of their neighbours (the candidate
    parents we compete with), over the island."""
    owner = table.owner
    searched: dict[str, dict[str, int]] = {}

    def hops(x: str) -> dict[str, int]:
        found = searched.get(x)
        if found is None:
            found = searched[x] = table.hops_from(x)
        return found

    mine = hops(owner)
    theirs = [hops(s) if s in island else {} for s in siblings]
    # The neighbours of each sibling that might be its parent instead of us: a smaller id.
    rivals = [[z for z in table.neighbours(s) if z < owner] if s in island else []
              for s in siblings]
    children_of: dict[str, int] = {}
    nearer: dict[str, int] = {}
    for origin, d in mine.items():
        children = near = 0
        for i, their in enumerate(theirs):
            h = their.get(origin)
            if h is None:
                children |= 1 << i  # cannot place it: send
            elif h < d:
                near |= 1 << i
            elif h == d + 1 and not any(hops(z).get(origin) == d for z in rivals[i]):
                children |= 1 << i
        children_of[origin] = children
        nearer[origin] = near
    return FloodPlan(table.links_version, siblings, {s: i for i, s in enumerate(siblings)},
                     children_of, nearer)
