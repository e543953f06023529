"""The zgrid protocol as a sans-IO state machine: events and the current time in, effects out.

Theory of operation
===================

Every node holds a table of *adverts* (zgrid/table.py), one per node it has heard of, like the
link-state database of OSPF. An advert is written only by its origin and is versioned by
(incarnation, seq): incarnation grows on every restart of the origin, seq on every change.
A received advert replaces the stored one iff its version is greater, so the table converges
whatever order messages arrive in, and duplicates are harmless.

Flooding: an advert that was new to us is queued in the outbox of every UP sibling except the
one it came from; once our topology has settled, only in those of the siblings whose parent we
are in the shortest-path tree of its origin (zgrid/flood.py says when, and why that is safe).
Outboxes are keyed by origin, so a burst of changes from one origin coalesces to its newest
version; `flush()` (called by the runtime once its mailbox is drained) sends one batched
`adverts` message per sibling.

Links: `link` makes us send HELLO; the receiver dials back and answers with a HELLO ack. A
HELLO is a claim, not a proof: a request carries a token only the node at the dialed endpoint
sees, and only an ack echoing it says who is there. So a stranger's request makes an
*unproved* sibling (in memory only, for UNPROVED_SIBLING_TTL_S) that we ask back, and it is a
sibling only once it answers from the endpoint it claimed; HELLOs to an unproved endpoint carry
no digest, so a forged one cannot make us send our table anywhere. A link comes UP with a HELLO
that carries a digest, and each side then bumps its own advert (its `links` changed). A link
is an edge of the grid only if *both* adverts list each other (the two-way check), so a node
that died or unlinked disappears as soon as one side stops listing it. A node's *island* is
everything reachable over such edges; its totals are exact (see table.py) and bit-identical on
every member.

An edge counts only between live lives: a sibling whose HELLO came from a new life (it
restarted) is not listed in our advert while we hold the advert of its previous life, which
still lists us and would make the two-way check count that past life; it is listed again once
we hold an advert of the new one (`_links`). The HELLO that brings a link UP also gives the
sibling a `Route`, the connection it dialed to us: what our DEALER to it cannot take yet
(libzmq may still be reconnecting it, with a backoff of up to 5 s) goes back over that, so an
answer never waits on a reconnect. HELLO requests never do (`Send.dealer_only`).

Every change of a link's state goes through `Core._transition` (the table `TRANSITIONS` says
which are legal): it alone clears the sibling's outbox, resets its HELLO schedule, counts flaps
and bumps our advert when the link stops or starts counting as an edge.

Liveness: a sibling whose process exits (crash or stop) closes its connections, and the
runtime reports ours closing (`connection_lost`): the link goes DOWN at once (we drop it from
our links and re-flood), and we keep sending it HELLO with backoff until it answers. What
closes nothing (a frozen process, a partition) is found by silence: UP siblings ping each
other every `ping_interval_s`, any message counts as life, and a sibling silent for
`dead_after_s` goes DOWN the same way. Only siblings watch each other. Because crashes do not
wait for silence, pings can be rare (PING_INTERVAL_S): an idle node's cost is its pings.

Anti-entropy: HELLO carries a digest {origin: version}; the receiver sends what the sender
lacks. Pings carry the table hash; two mismatches in a row trigger a digest exchange. This
repairs lost messages, partitions and restarts without any global step.

Identity: each process has a random nonce. An advert about *us* that is newer than ours was
not written by us: our past life (data dir wiped), a duplicate, or a forgery. We outbid it, so
the grid ends up holding what we say; a nonce that outbids us again is outbid only every
RIVAL_OUTBID_INTERVAL_S and reported as a conflict, so duplicates cannot bump-war. The maximum
version retracts its origin for a forget period instead of winning. With keys, adverts carry
their origin's signature and nobody else can write ours (see `Trust`, `Seal`). A HELLO from an
id that is alive elsewhere in our island (other nonce, other endpoint) is refused with BYE
duplicate_id.

Balancing (Phase II): adverts may carry a flexibility offer; every member runs the same
clearing (zgrid/clearing.py) over its island and applies only its own activation (`_balance`).
The island's offers are kept in an `OfferBook` updated from the table's changed origins, so a
node asks for its own share without sorting the island. It does so BALANCE_HOLDOFF_S after
the imbalance or an offer in its view first moved, once, so one flood's intermediate tables are
neither each cleared nor each advertised.

What one peer may cost us (one frame must never take a node down): refusal BYEs are budgeted
(`LinkGate`), a sibling gets and has answered at most one digest per ping interval, it may
fill at most a share of the table with origins our island cannot reach, and an unlink is
remembered (persisted) so that a stopped sibling coming back cannot undo it.

Durability: a change is flooded before it is durable, and acknowledged only once it is
(`Persist.new_incarnation` says when that order must not be relaxed). A node that crashes before
the save restarts with the next incarnation, which outbids the unsaved version everywhere:
docs/design.md gives the whole argument. A save that fails (disk full ...) is reported by the
runtime (`save_failed`): the change is undone, a newer advert supersedes the flooded one, the
client is refused, and saves are retried until one works (`save_succeeded`).

Entry points: `handle` (everything that arrives: a decoded message or the error decoding it),
`timer` (when `next_deadline` is due), `flush` (when the mailbox is drained), `start`, `stop`,
`membership_changed`, `save_succeeded`/`save_failed` (the outcome of a Persist), and
`connect_failed`/`connection_lost` (what the transport says about a DEALER). This
module must never import zmq, time, os or anything that does I/O: the runtime (node.py) and
the simulator (zgrid/sim/) drive it and perform its effects.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final, Protocol, TypeAlias

from zgrid.clearing import Clearing, OfferBook
from zgrid.devices import meaningful_change
from zgrid.errors import ControlError, ProtocolError
from zgrid.flood import FloodPlan, FloodPruner
from zgrid.persisted import PersistedState
from zgrid.table import AdvertTable, Merge, exact_units, from_units
from zgrid.wire import (
    MAX_ADVERTS_PER_MESSAGE,
    MAX_COUNTER,
    MAX_LINKS_PER_ADVERT,
    NO_FLEX,
    PEER_TYPES,
    Advert,
    Adverts,
    Bye,
    ByeReason,
    ControlRequest,
    Digest,
    DigestMsg,
    Flex,
    FlexRequest,
    GraphRequest,
    Hello,
    LinkRequest,
    Message,
    NodesRequest,
    PeerMessage,
    Ping,
    Record,
    Reply,
    SetRequest,
    StatusRequest,
    UnlinkRequest,
    WatchRequest,
    check_power,
    check_price,
    parse_sibling_address,
)

# A node computes (and applies) its share this long after its view of the imbalance or the
# offers first moved: the adverts of one burst (a quarter hour's meter readings, every
# battery's new offer) land over a few flood times, and applying each intermediate clearing
# made most activated nodes re-advertise twice per change (measured in the simulated day).
# Short against AGC's 2-4 s.
BALANCE_HOLDOFF_S: Final = 0.002
# Silence detects only what closes no connection (a frozen process, a partition; a crash is
# `connection_lost` at once), so pings can be rare: an idle node's CPU is its pings, 0.36 % of
# a core with 8 siblings at 0.25 s and 0.09 % at 1 s (docs/benchmarks.md). Three intervals of
# silence: a ping may be late behind a busy turn (a 40,000-entry digest) without a flap.
PING_INTERVAL_S: Final = 1.0
DEAD_AFTER_S: Final = 3.0
FORGET_AFTER_S: Final = 600.0
# The first HELLO on a fresh connection is often dropped (IMMEDIATE)
HELLO_RETRY_MIN_S: Final = 0.01
HELLO_RETRY_MAX_S: Final = 1.0
REFUSED_RETRY_S: Final = 5.0  # a refused link is retried slowly: the id may become free
# A watch client re-sends `watch` more often than this to stay subscribed
WATCH_LEASE_S: Final = 5.0
BAD_FRAME_LOG_INTERVAL_S: Final = 10.0  # at most one log line per interval about bad frames
HASH_MISMATCHES_BEFORE_DIGEST: Final = 2  # one mismatch is normal while a flood is in flight
# The pruned flood (zgrid/flood.py) waits until a node's topology has not moved for this long:
# until then the nodes' views may differ, and a full flood does not depend on them.
PRUNED_FLOOD_SETTLE_S: Final = 1.0
# Above this island size the flood goes over every link. A node's plan takes a breadth-first
# search from itself, each sibling and their neighbours, and keeps an entry per origin; the
# simulator, which holds every node in one process, cannot afford that for 10,000 nodes.
PRUNED_FLOOD_MAX_NODES: Final = 512
# A node that took part in an anti-entropy repair (sent or answered a digest) floods in full
# this long: a version was lost or held up on the way, and a tree has no second copy of it.
PRUNED_FLOOD_AFTER_REPAIR_S: Final = 2.0
# A rival writing our id (a live duplicate, or a forger) is outbid at most this often, so two
# live duplicates cannot start a bump war, yet a forgery is always outbid once it stops.
RIVAL_OUTBID_INTERVAL_S: Final = 5.0
MAX_RIVALS_REMEMBERED: Final = 1024  # foreign nonces seen writing our id (oldest forgotten first)
BAD_SIGNATURE_LOG_INTERVAL_S: Final = 10.0
# While saves fail, one is retried this often, so storage health and changes recover by
# themselves once the disk has room again (a save costs one fsync: cheap at this rate).
STORAGE_RETRY_S: Final = 2.0
STORAGE_LOG_INTERVAL_S: Final = 30.0  # at most one log line per interval while saves keep failing
# The error code of a change refused because it cannot be saved
STORAGE_FAILING: Final = "storage_failing"
# What one peer's frames may cost us (issue 8: one frame must never take a node down).
# Refusal BYEs (each a one-shot send) per window; the rest dropped.
MAX_REFUSALS_PER_WINDOW: Final = 16
REFUSAL_WINDOW_S: Final = 1.0
REFUSAL_LOG_INTERVAL_S: Final = 10.0  # at most one log line per interval about refused links
# A sibling made by an inbound HELLO must prove, by answering our own HELLO, that it receives
# at the endpoint it claims; until then it is kept in memory only, and only this long.
UNPROVED_SIBLING_TTL_S: Final = 5.0
MAX_UNPROVED_SIBLINGS: Final = 16  # besides the MAX_LINKS_PER_ADVERT siblings an operator may keep
# Unlinked nodes whose HELLOs we answer `bye unlinked` (oldest out)
MAX_UNLINKED_REMEMBERED: Final = 256
# One sibling may fill at most this share of the table with origins our island cannot reach
# (a forged flood), so that real nodes always find room; counted again at most every interval.
UNREACHABLE_SHARE_PER_SIBLING: Final = 0.25
INTRODUCED_RECOUNT_INTERVAL_S: Final = 1.0
_REVOKED: Final = "revoked: its key is no longer in the keys directory"
_UNPROVED: Final = "asked to link; waiting for it to answer our HELLO from its endpoint"


class LinkState(StrEnum):
    CONNECTING = "connecting"  # we sent HELLO, heard nothing yet
    UP = "up"
    DOWN = "down"  # was UP, then went silent or said goodbye; we keep knocking
    REFUSED = "refused"  # the peer refused us (or we it): wrong id, duplicate id, not a member


# Which link state may follow which. UP -> UP is a sibling's restart (a new nonce), REFUSED ->
# DOWN a revoked member whose key came back, REFUSED -> REFUSED a refusal for a new reason.
TRANSITIONS: Final[Mapping[LinkState, frozenset[LinkState]]] = {
    LinkState.CONNECTING: frozenset({LinkState.UP, LinkState.REFUSED}),
    LinkState.UP: frozenset({LinkState.UP, LinkState.DOWN, LinkState.REFUSED}),
    LinkState.DOWN: frozenset({LinkState.UP, LinkState.REFUSED}),
    LinkState.REFUSED: frozenset({LinkState.UP, LinkState.DOWN, LinkState.REFUSED}),
}


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


ClientId: TypeAlias = tuple[bytes, ...]  # the routing envelope a message arrived with, opaque
# The "envelope" of a message that arrived on one of our DEALERs: a sibling answered over the
# connection we dialed to it (see `Route`). No reply can go back but over that DEALER.
ON_OUR_DEALER: Final[ClientId] = ()


class Seal(Protocol):
    """Signs our own adverts and verifies everyone else's (zgrid/signing.py does it with
    Ed25519). Pure computation: no I/O, so the core may call it."""

    def sign(self, advert: Advert) -> Advert:
        """`advert` with our signature."""
        ...

    def verify(self, advert: Advert) -> bool:
        """Whether `advert` carries a valid signature by the member named as its origin."""
        ...


@dataclass(frozen=True, slots=True)
class Trust:
    """With keys: who is in the grid, who may change this node, and how adverts are sealed.

    members: the ids allowed in the grid. operators: members who may change *this* node
    (`set`, `link`, `unlink`), besides the node's own key. seal: None means adverts are not
    signed (a grid of CURVE links only; tests of the core).
    """

    members: frozenset[str]
    operators: frozenset[str] = frozenset()
    seal: Seal | None = None


@dataclass(frozen=True, slots=True)
class Config:
    node_id: str
    endpoint: str  # where our ROUTER is reachable; advertised to everyone
    nonce: int  # random per process
    ping_interval_s: float = PING_INTERVAL_S
    dead_after_s: float = DEAD_AFTER_S
    forget_after_s: float = FORGET_AFTER_S
    max_nodes: int = 40_000
    track_view: bool = True  # compute the view after every flush (False: only when read)
    require_sibling_ids: bool = False  # with CurveZMQ: a sibling's key is found by its id
    pruned_flood_max_nodes: int = PRUNED_FLOOD_MAX_NODES  # 0: always flood over every link
    # Random per process and never sent: keys the challenge (token) of our HELLOs, so nobody
    # can answer one without receiving it. 0: derived from the nonce (simulations, tests).
    secret: int = 0


# ------------------------------------------------------------------------------------ effects


class Send(Record):
    """Send to a sibling over our DEALER connected to `endpoint`. If that DEALER cannot take
    it now (not connected: e.g. still in libzmq's reconnect backoff after the sibling
    restarted), send it over the sibling's `Route` instead, if it has one; else drop it.
    `dealer_only`: never over a route (a HELLO request: its token must reach the endpoint
    dialed, which is what an ack echoing it proves).

    A `wire.Record`, not a dataclass like the other effects, for speed alone: one is made per
    message sent.
    """

    __slots__ = ("dealer_only", "endpoint", "message")
    __match_args__ = ("endpoint", "message", "dealer_only")

    def __init__(self, endpoint: str, message: PeerMessage, dealer_only: bool = False
                 ) -> None:
        self.endpoint: Final = endpoint
        self.message: Final = message
        self.dealer_only: Final = dealer_only


@dataclass(frozen=True, slots=True)
class SendOnce:
    """Send one message to a node that is not our sibling (a refusal), then forget it."""

    endpoint: str
    peer_id: str
    message: PeerMessage


@dataclass(frozen=True, slots=True)
class Connect:
    endpoint: str
    peer_id: str | None  # the id we expect there (needed to pick its CURVE key)


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close our DEALER to `endpoint` (and forget its `Route`)."""

    endpoint: str


@dataclass(frozen=True, slots=True)
class Route:
    """The sibling we dial at `endpoint` dialed us too: `via` is the routing envelope its
    HELLO arrived with at our ROUTER, the connection its own DEALER made to us. A `Send` to
    `endpoint` that our DEALER cannot take goes back over that connection (our ROUTER, to
    `via`), so an answer never waits on our reconnect backoff. Kept until the next `Route` or
    `Disconnect` of the endpoint; one that no longer leads anywhere drops what is sent."""

    endpoint: str
    via: ClientId


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer a control client. `with_runtime_counters`: a status reply, to which the runtime
    adds the counters only it can keep (messages and bytes sent, sends dropped).
    `acknowledges`: the reply confirms a change made durable by the `Persist` before it; if
    that save fails, the runtime sends `Core.refuse_unsaved(reply)` instead."""

    client: ClientId
    reply: Reply
    with_runtime_counters: bool = False
    acknowledges: bool = False


@dataclass(frozen=True, slots=True)
class Publish:
    """The view changed: log it, and push it (stamped with wall time) to every watcher."""

    view: Mapping[str, Any]
    watchers: tuple[ClientId, ...]


@dataclass(frozen=True, slots=True)
class Persist:
    """Make `state` durable before performing any later `Respond` (replies acknowledge it).

    new_incarnation: `state` starts a new incarnation, so it must be durable before anything
    at all is sent: after a crash, the next life must come back with a higher one. Otherwise
    the runtime may send (flood) first and save afterwards, before it acknowledges.

    The runtime reports every outcome: `Core.save_succeeded`, or `Core.save_failed`, which
    undoes what was not saved. A new incarnation that cannot be saved cannot be undone (our
    old one is outbid) nor sent: then the runtime stops, sending nothing but goodbyes.
    """

    state: PersistedState
    new_incarnation: bool = False


@dataclass(frozen=True, slots=True)
class Log:
    level: LogLevel
    text: str


Effect: TypeAlias = (Send | SendOnce | Connect | Disconnect | Route | Respond | Publish | Persist
                     | Log)


# ------------------------------------------------------------------------------------ siblings


@dataclass(slots=True, eq=False)
class Sibling:
    """One link as we see it. Its state changes only through `Core._transition`."""

    endpoint: str  # as dialed: our DEALER connects here
    expected_id: str | None  # from ID@ENDPOINT: the peer must report this id
    id: str | None = None
    nonce: int | None = None
    state: LinkState = LinkState.CONNECTING
    last_heard: float = -math.inf
    next_hello: float = 0.0
    hello_backoff_s: float = HELLO_RETRY_MIN_S
    error: str = ""
    hash_mismatches: int = 0
    outbox: dict[str, Advert] = field(default_factory=dict)  # origin -> newest advert to send
    # The endpoint it advertises, once an ack to our HELLO proved that it receives there (it may
    # differ from the one we dialed, e.g. localhost for 127.0.0.1). A HELLO of its id naming
    # any endpoint but these two is not from it.
    peer_endpoint: str = ""
    # Made by an inbound HELLO and not yet proved (see UNPROVED_SIBLING_TTL_S): since when.
    unproved_since: float | None = None
    # Our HELLOs say the operator asked for this link (until it is UP), which undoes an unlink
    # the other side remembers; for an unproved sibling: its HELLO said so.
    linking: bool = False
    # (dialed, token) of a request of its that we answered without our digest (we had not
    # proved it yet): once the link is UP we answer it again, with the digest.
    owed_answer: tuple[str, int] | None = None
    # The routing envelope its HELLO of this life came with at our ROUTER (see `Route`): ()
    # until one brings the link UP. What our DEALER cannot take goes back over it.
    route: ClientId = ()
    # The new origins it gave us, maybe unreachable (see `Core._may_introduce`). A list: an
    # origin is new only once while it is held, and 8 bytes an entry instead of a set's ~40
    # matters, since until the cap is reached it holds its share of every advert we hold.
    introduced: list[str] = field(default_factory=list)
    introduced_counted_at: float = -math.inf
    digest_sent_at: float = -math.inf  # at most one digest each way per ping interval
    digest_handled_at: float = -math.inf

    @property
    def address(self) -> str:
        known = self.id or self.expected_id
        return f"{known}@{self.endpoint}" if known else self.endpoint

    @property
    def name(self) -> str:
        return self.id or self.expected_id or self.endpoint

    @property
    def up(self) -> bool:
        return self.state is LinkState.UP

    def row(self) -> dict[str, Any]:
        return {"id": self.id or self.expected_id, "endpoint": self.endpoint, "up": self.up,
                "state": str(self.state), "error": self.error}


class LinkGate:
    """Who may ask us for a link, and what refusing costs (issue 8). Pure bookkeeping.

    Unlinked: nodes the operator unlinked (by id once known, else by endpoint), oldest first,
    at most MAX_UNLINKED_REMEMBERED. Their HELLOs are answered `bye unlinked` until a link
    request of either operator links them again, so an unlink of a stopped node sticks.
    Refusals: at most MAX_REFUSALS_PER_WINDOW refusal BYEs per REFUSAL_WINDOW_S, one per
    endpoint: each costs the runtime a socket, and a flood of HELLOs must not cost one each.
    """

    def __init__(self, unlinked: Iterable[str] = ()) -> None:
        self._unlinked: dict[str, tuple[str | None, str]] = {}  # address -> (id, endpoint)
        self._ids: set[str] = set()
        self._endpoints: set[str] = set()  # of entries without an id
        for address in unlinked:
            try:
                node_id, endpoint = parse_sibling_address(address)
            except ProtocolError:  # saved by an older version that accepted it: skip it
                continue
            self.remember(node_id, endpoint)
        self._window_start = -math.inf
        self._window_endpoints: set[str] = set()
        self._last_log = -math.inf
        self.unlogged = 0  # refusals (sent or dropped) since the last log line

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(self._unlinked)

    def remember(self, node_id: str | None, endpoint: str) -> None:
        self.forget(node_id, endpoint)
        address = f"{node_id}@{endpoint}" if node_id else endpoint
        self._unlinked[address] = (node_id, endpoint)
        while len(self._unlinked) > MAX_UNLINKED_REMEMBERED:
            del self._unlinked[next(iter(self._unlinked))]
        self._reindex()

    def forget(self, node_id: str | None, endpoint: str) -> bool:
        """Forget every entry of this id or this endpoint; whether there was one."""
        gone = [a for a, (i, e) in self._unlinked.items()
                if e == endpoint or (node_id is not None and i == node_id)]
        for address in gone:
            del self._unlinked[address]
        if gone:
            self._reindex()
        return bool(gone)

    def is_unlinked(self, node_id: str, endpoint: str) -> bool:
        return node_id in self._ids or endpoint in self._endpoints

    def may_refuse(self, endpoint: str, now: float) -> bool:
        self.unlogged += 1
        if now - self._window_start >= REFUSAL_WINDOW_S:
            self._window_start = now
            self._window_endpoints.clear()
        if (endpoint in self._window_endpoints
                or len(self._window_endpoints) >= MAX_REFUSALS_PER_WINDOW):
            return False
        self._window_endpoints.add(endpoint)
        return True

    def may_log(self, now: float) -> bool:
        if now - self._last_log < REFUSAL_LOG_INTERVAL_S:
            return False
        self._last_log = now
        return True

    def _reindex(self) -> None:
        self._ids = {i for i, _ in self._unlinked.values() if i is not None}
        self._endpoints = {e for i, e in self._unlinked.values() if i is None}


def _chunks(items: tuple[Advert, ...], size: int) -> list[tuple[Advert, ...]]:
    if len(items) <= size:
        return [items]
    return [items[start:start + size] for start in range(0, len(items), size)]


def _same_items(a: tuple[Advert, ...], b: tuple[Advert, ...]) -> bool:
    """Whether `a` and `b` hold the same objects in the same order. Not `==`: two outboxes
    differ at some item, and Advert's field-by-field __eq__ there costs more than this walk
    (by index: compiled, a zip is a generic iterator, most of a one-advert flush's cost)."""
    return len(a) == len(b) and all(a[i] is b[i] for i in range(len(a)))


_CONTROL_REQUESTS: Final = (StatusRequest, SetRequest, FlexRequest, LinkRequest, UnlinkRequest,
                     NodesRequest, GraphRequest, WatchRequest)
_PEER_MESSAGE_TYPES: Final = frozenset((Hello, Adverts, DigestMsg, Ping, Bye))
_CHANGING_REQUESTS: Final = (SetRequest, FlexRequest, LinkRequest, UnlinkRequest)


_UNSEEN: Final = object()  # an origin whose offer the book never held (unlike None: it holds none)


def _flex_body(f: Flex) -> dict[str, float]:
    return {"flex_up": f.flex_up_kw, "price_up": f.price_up, "flex_down": f.flex_down_kw,
            "price_down": f.price_down}


class Core:
    """One node's protocol state. Not thread-safe by design: it is an actor's private state.

    trust: with keys, who is in the grid and may change us, and the seal of adverts (None: an
    open grid, nobody is checked and nothing is signed).
    """

    def __init__(self, config: Config, restored: PersistedState | None = None,
                 trust: Trust | None = None) -> None:
        self.config = config
        self.id = config.node_id
        # At MAX_COUNTER (only a forgery in an unsigned grid gets a node there) a restart stays
        # on it: its past life's adverts then look newer, and are outbid by seq like any rival.
        self.incarnation = min(restored.incarnation + 1, MAX_COUNTER) if restored else 1
        self.seq = 0
        self.production = restored.production if restored else 0.0
        self.consumption = restored.consumption if restored else 0.0
        self.flex = restored.flex if restored else NO_FLEX  # our plain offer (Phase II)
        self.activation_kw = 0.0  # what our clearing asks of us now; carried in our advert
        self.device_state: dict[str, Any] | None = None  # the runtime's device, for status
        self._clearing: tuple[tuple[int, frozenset[str]], Clearing] | None = None
        # The island's offers kept sorted (clearing.OfferBook), updated from the table's
        # changed origins: clearing again after one advert changed costs O(log island), not a
        # sort of the island, which a node offering flexibility does after every table change.
        self._book = OfferBook()
        self._book_island: frozenset[str] | None = None
        self._book_flex: dict[str, Flex] = {}  # the offer object the book holds, by origin
        # (imbalance, book, book version) our share was last computed for.
        self._balanced_at: tuple[int, OfferBook, int] | None = None
        self._balance_due = math.inf  # when our share is computed (and applied) next
        self._activations: tuple[tuple[int, frozenset[str]], int] | None = None
        self.trust = trust
        self._seal = None if trust is None else trust.seal
        self.siblings: dict[str, Sibling] = {}  # by endpoint
        self._by_id: dict[str, Sibling] = {}
        linking = frozenset(restored.linking) if restored else frozenset()
        for address in restored.siblings if restored else ():
            expected, endpoint = parse_sibling_address(address)
            # A link request acknowledged before a crash is still one: the other side may
            # remember an unlink that only a `linking` HELLO undoes.
            self.siblings[endpoint] = Sibling(endpoint, expected, linking=address in linking)
        self.table = AdvertTable(self.id, config.max_nodes)
        self._pruner = FloodPruner(config.pruned_flood_max_nodes, PRUNED_FLOOD_SETTLE_S)
        self.counters: dict[str, int] = {
            "messages_received": 0, "bad_frames": 0, "ignored": 0, "adverts_received": 0,
            "adverts_accepted": 0, "link_flaps": 0, "connections_lost": 0, "digests_sent": 0,
            "bad_signatures": 0, "outbids": 0,
        }
        self.conflict = ""
        # Nonces seen writing our id (foreign, or ours in a forgery) -> when we last outbid one.
        self._rivals: dict[int, float] = {}
        self._rival: Advert | None = None  # the newest advert of our id not yet outbid
        self._next_outbid = math.inf
        self._durable_incarnation = self.incarnation  # last handed to Persist(new_incarnation)
        self._last_bad_signature_log = -math.inf
        self._bad_signatures_logged = 0
        self._watchers: dict[ClientId, float] = {}
        self._published: tuple[int, int, frozenset[str], int] | None = None
        self._next_ping = 0.0
        self._next_forget_check = config.forget_after_s / 10
        self._last_bad_log = -math.inf
        self._bad_since_log = 0
        # Issue 8 (one frame must never take a node down): sticky unlinks, refusal budget.
        self._gate = LinkGate(restored.unlinked if restored else ())
        self.counters.update(refusals_dropped=0, digests_limited=0, origins_refused=0)
        # Durability, as the runtime reports it. `_durable` starts as what `start` persists:
        # if that save fails the node never runs, so it is durable before any save can fail.
        self._durable = self.persisted_state()
        # Siblings a control request changed since the last durable save: endpoint -> the
        # sibling as the durable state has it (None: not a sibling), for `save_failed`.
        self._unsaved_siblings: dict[str, Sibling | None] = {}
        self.storage_error = ""  # why the last save failed; "" once one works again
        self._next_storage_retry = math.inf
        self._last_storage_log = -math.inf
        self._storage_failures_unlogged = 0
        self._bump()

    @classmethod
    def converged(cls, config: Config, table: AdvertTable,
                  siblings: Iterable[tuple[str, str, int]], now: float,
                  trust: Trust | None = None) -> Core:
        """A core as a cold start leaves it once its grid agrees, for simulators at scale.

        `table` holds the current advert of every member of our island, our own included (its
        version, values and links become ours); `siblings` are (id, endpoint, nonce) of the
        nodes we have an UP link with, as HELLO would have told us. Call `start` next.
        """
        own = table.get(config.node_id)
        if own is None:
            raise ValueError(f"the table holds no advert of {config.node_id}")
        core = cls(config, trust=trust)
        core.table = table
        core.incarnation, core.seq = own.incarnation, own.seq
        core._durable_incarnation = own.incarnation
        core.production, core.consumption = own.production, own.consumption
        for peer_id, endpoint, nonce in siblings:
            sib = core.siblings[endpoint] = Sibling(endpoint, peer_id, peer_id, nonce,
                                                    LinkState.UP, last_heard=now)
            core._by_id[peer_id] = sib
        core._durable = core.persisted_state()
        return core

    # ------------------------------------------------------------------------ lifecycle

    def start(self, now: float) -> list[Effect]:
        """First effects of a process: persist the new incarnation, dial every known sibling."""
        self._durable_incarnation = self.incarnation
        out: list[Effect] = [Persist(self.persisted_state(), new_incarnation=True)]
        for sib in self.siblings.values():
            out.append(Connect(sib.endpoint, sib.expected_id))
            if not sib.up:
                sib.next_hello = now
        self._next_ping = self._ping_after(now)
        self._next_forget_check = now + self.config.forget_after_s / 10
        out.extend(self.timer(now))
        return out

    def stop(self, now: float) -> list[Effect]:
        """Say goodbye: a stopped node cannot flood, so its siblings must drop it themselves."""
        out: list[Effect] = [Send(sib.endpoint, self._bye(ByeReason.STOPPING))
                             for sib in self.siblings.values() if sib.up]
        out.extend(Disconnect(sib.endpoint) for sib in self.siblings.values())
        return out

    def persisted_state(self) -> PersistedState:
        # An unproved sibling is a stranger's claim: kept in memory, for a while, and no more.
        kept = [sib for sib in self.siblings.values() if sib.unproved_since is None]
        return PersistedState(self.id, self.incarnation, self.production, self.consumption,
                              tuple(sib.address for sib in kept), self._gate.addresses,
                              self.flex, tuple(sib.address for sib in kept if sib.linking))

    def membership_changed(self, trust: Trust, now: float) -> list[Effect]:
        """The keys directory was reloaded: drop links to members whose keys are gone (and
        their adverts: they leave every island), dial again those whose keys came back."""
        self.trust, self._seal = trust, trust.seal
        members = trust.members
        out: list[Effect] = []
        gone = [origin for origin in self.table.by_origin
                if origin not in members and origin != self.id]
        for origin in gone:
            self.table.discard(origin)
        if gone:
            out.append(Log(LogLevel.WARNING, f"dropped the adverts of {len(gone)} revoked "
                           f"member(s): {', '.join(sorted(gone)[:10])}"))
        for sib in self.siblings.values():
            allowed = sib.name in members
            if not allowed and sib.error != _REVOKED:
                self._transition(sib, LinkState.REFUSED, now, _REVOKED, retry_at=math.inf)
                out += [Disconnect(sib.endpoint),
                        Log(LogLevel.WARNING, f"{sib.name} revoked; link dropped")]
            elif allowed and sib.error == _REVOKED:
                self._transition(sib, LinkState.DOWN, now, retry_at=now)
                out.append(Connect(sib.endpoint, sib.id or sib.expected_id))
        return out

    # ------------------------------------------------------------------------ durability

    def save_succeeded(self, state: PersistedState, now: float) -> list[Effect]:
        """The runtime made `state` (its newest Persist) durable."""
        self._durable = state
        self._unsaved_siblings.clear()
        if not self.storage_error:
            return []
        why, self.storage_error = self.storage_error, ""
        self._next_storage_retry = math.inf
        self._storage_failures_unlogged = 0
        return [Log(LogLevel.INFO, f"saving works again (it failed: {why}); changes are "
                    "accepted")]

    def save_failed(self, state: PersistedState, why: str, now: float) -> list[Effect]:
        """The runtime could not make `state` durable (disk full, read-only, I/O error): go
        back to the last durable state, so that nothing a client was refused stays in force.

        Production and consumption return to their saved values, with a new version of our
        advert if they differ: the runtime flooded the unsaved one already, and the newer one
        supersedes it everywhere. Links and unlinks are undone. What no client asked for (a
        sibling's id learned, a sibling that linked or unlinked us) stays in memory: it is
        saved with the next save that works. Saves are retried every STORAGE_RETRY_S.
        Never for a new incarnation: that failure stops the node (see `Persist`).
        """
        out: list[Effect] = []
        for endpoint, before in self._unsaved_siblings.items():
            current = self.siblings.get(endpoint)
            if before is None and current is not None:  # a link that was not saved
                if current.up:
                    out.append(Send(endpoint, self._bye(ByeReason.UNLINKED)))
                self._remove(current)
                out.append(Disconnect(endpoint))
            elif before is not None and current is None and (
                    len(self.siblings) < MAX_LINKS_PER_ADVERT):
                # An unlink that was not saved: the sibling has dropped us already, so link
                # again; it takes our HELLO as a new link.
                name = before.id or before.expected_id
                self.siblings[endpoint] = Sibling(endpoint, name, next_hello=now)
                out.append(Connect(endpoint, name))
        self._unsaved_siblings.clear()
        durable = self._durable
        if (self.production, self.consumption, self.flex) != (
                durable.production, durable.consumption, durable.flex):
            self.production, self.consumption = durable.production, durable.consumption
            self.flex = durable.flex
            self._bump()
        changed = why != self.storage_error
        self.storage_error = why
        self._next_storage_retry = now + STORAGE_RETRY_S
        self._storage_failures_unlogged += 1
        if changed or now - self._last_storage_log >= STORAGE_LOG_INTERVAL_S:
            count, self._storage_failures_unlogged = self._storage_failures_unlogged, 0
            self._last_storage_log = now
            out.append(Log(LogLevel.ERROR, f"cannot save this node's state ({count} failed "
                           f"save(s) since the last report): {why}; serving the last saved "
                           f"state and refusing changes, retrying every {STORAGE_RETRY_S:g}s"))
        return out

    def refuse_unsaved(self, reply: Reply, stopping_because: str = "") -> Reply:
        """The error that replaces `reply`, which acknowledged a change that `save_failed`
        undid (or that a node stopping because `stopping_because` never saved): the client
        learns that nothing changed, and why."""
        if stopping_because:
            return Reply(reply.rid, False, code=STORAGE_FAILING, message=(
                f"{self.id} did not make this change: it is stopping because it cannot save "
                f"its state ({stopping_because})"))
        return Reply(reply.rid, False, code=STORAGE_FAILING, message=(
            f"{self.id} did not make this change: it cannot save its state "
            f"({self.storage_error or 'the save failed'}). It keeps running on its last saved "
            "state and accepts changes again once a save works"))

    def _check_storage(self, what: str) -> None:
        # A link or an unlink undone by `save_failed` disturbs the sibling (an unlink is undone
        # by linking again), so neither is tried while saves are known to fail. A `set` is:
        # undoing it costs one advert, and it succeeds as soon as the disk has room again.
        if self.storage_error:
            raise ControlError(
                f"{self.id} cannot {what} now: it cannot save its state ({self.storage_error});"
                f" it retries every {STORAGE_RETRY_S:g}s: try again once `zgrid-ctl status` "
                "shows storage ok", STORAGE_FAILING)

    # ------------------------------------------------------------------------ inbound

    def handle(self, sender: ClientId, message: Message | ProtocolError, now: float,
               authenticated_as: str | None = None) -> list[Effect]:
        """Everything that arrives at our ROUTER: a decoded message, or the error decoding it.

        sender: the routing envelope (where a reply goes), or ON_OUR_DEALER: it came back
        from a sibling's ROUTER over our DEALER to it (see `Route`), where only sibling
        messages belong. authenticated_as: with keys, the member whose key the connection was
        authenticated with (None: unknown or no keys). Decides whether it is sibling or control
        traffic, and whether the sender may talk.
        """
        # By exact type, a set lookup: this runs for every message, and isinstance() against a
        # tuple of classes is a generic call when compiled (messages are never subclassed).
        peer_message = type(message) in _PEER_MESSAGE_TYPES
        from_peer = peer_message or (
            isinstance(message, ProtocolError) and message.message_type in PEER_TYPES)
        if sender == ON_OUR_DEALER and not from_peer:  # nobody there to answer: a bad frame
            if not isinstance(message, ProtocolError):
                message = ProtocolError(f"a {type(message).__name__} on a sibling connection",
                                        "unknown_type")
            from_peer = True
        trust = self.trust
        if trust is not None and (
                authenticated_as is None or authenticated_as not in trust.members):
            # A connection authenticated before its key was removed: serve it nothing more.
            who = authenticated_as or "this client"
            error = ProtocolError(f"{who} is not a member of the grid (its key was revoked)",
                                  "revoked")
            return self._bad_frame(sender, error, from_peer, now)
        if isinstance(message, ProtocolError):
            return self._bad_frame(sender, message, from_peer, now)
        if peer_message:
            return self._receive(message, now, authenticated_as, sender)  # type: ignore[arg-type]
        if isinstance(message, _CONTROL_REQUESTS):
            return self._request(sender, message, now, authenticated_as)
        error = ProtocolError(f"a node does not accept {type(message).__name__} messages",
                              "unknown_type")
        return self._bad_frame(sender, error, False, now)

    def _bad_frame(self, sender: ClientId, error: ProtocolError, from_peer: bool, now: float
                   ) -> list[Effect]:
        """Answer a control client; drop and count a sibling's frame (logged at a rate)."""
        if not from_peer:
            return [Respond(sender, Reply(error.rid, False, code=error.code,
                                          message=error.message))]
        self.counters["bad_frames"] += 1
        self._bad_since_log += 1
        if now - self._last_bad_log < BAD_FRAME_LOG_INTERVAL_S:
            return []
        self._last_bad_log, count, self._bad_since_log = now, self._bad_since_log, 0
        return [Log(LogLevel.WARNING, f"dropped {count} bad frame(s) from peers; latest: "
                    f"{error.message}")]

    # ------------------------------------------------------------------------ peer messages

    def _receive(self, msg: PeerMessage, now: float, authenticated_as: str | None,
                 sender: ClientId = ON_OUR_DEALER) -> list[Effect]:
        self.counters["messages_received"] += 1
        if authenticated_as is not None and authenticated_as != msg.sender:
            self.counters["ignored"] += 1
            return [Log(LogLevel.WARNING, f"dropped a {type(msg).__name__.lower()} claiming to "
                        f"be from {msg.sender!r} but signed by {authenticated_as!r}")]
        kind = type(msg)
        if kind is Hello:
            return self._on_hello(msg, now, sender)  # type: ignore[arg-type]
        sib = self._by_id.get(msg.sender)
        if kind is Bye:
            return self._on_bye(msg, sib, now)  # type: ignore[arg-type]
        if sib is None or sib.state is not LinkState.UP or sib.nonce != msg.nonce:
            # Not (or no longer) our sibling, or its past life: only HELLO may (re)open a link.
            self.counters["ignored"] += 1
            return []
        sib.last_heard = now
        if kind is Adverts:
            return self._on_adverts(msg, sib, now)  # type: ignore[arg-type]
        if kind is Ping:
            return self._on_ping(msg, sib, now)  # type: ignore[arg-type]
        return self._on_digest_msg(msg, sib, now)  # type: ignore[arg-type]

    def _on_hello(self, msg: Hello, now: float, sender: ClientId = ON_OUR_DEALER
                  ) -> list[Effect]:
        if msg.sender == self.id:
            if msg.nonce == self.config.nonce:  # we dialed ourselves under another name
                out: list[Effect] = [
                    Log(LogLevel.WARNING, f"{msg.dialed} is this node itself; not linked")]
                dialed = self.siblings.get(msg.dialed)
                if dialed is not None:
                    self._remove(dialed)
                    out += [Disconnect(msg.dialed), Persist(self.persisted_state())]
                return out
            return self._refuse_duplicate(msg, f"this node ({self.id}) is alive", now)
        known = self.table.get(msg.sender)
        if known is not None and known.nonce == msg.nonce and known.endpoint != msg.endpoint:
            # One process advertises one endpoint: this HELLO borrows a node's nonce (read off
            # its advert) to claim another endpoint for it.
            self.counters["ignored"] += 1
            return []
        if (known is not None and known.nonce != msg.nonce and known.endpoint != msg.endpoint
                and msg.sender in self.table.island(now)):
            return self._refuse_duplicate(msg, f"{msg.sender} is alive at {known.endpoint}", now)
        if msg.ack:
            return self._on_hello_ack(msg, now, sender)
        sib = self._by_id.get(msg.sender) or self._dialed_as(msg.sender)
        if sib is None:
            sib = self.siblings.get(msg.endpoint)
        elif msg.endpoint not in (sib.endpoint, sib.peer_endpoint):
            # A sibling stays bound to the endpoint we dialed or the one it proved: a HELLO of
            # its id from anywhere else is someone else's claim (a node that really moved is
            # unlinked and linked again by its operator).
            self.counters["ignored"] += 1
            return []
        if sib is None:
            return self._on_hello_from_stranger(msg, now)
        known_as = sib.id or sib.expected_id
        if known_as is not None and known_as != msg.sender and sib.unproved_since is None:
            self.counters["ignored"] += 1  # only an ack (a proof) may say another node is there
            return []
        if sib.unproved_since is not None or known_as is None or not msg.digest:
            # Not UP yet. Who is at sib.endpoint is learned only from the ack to our own HELLO
            # (it carries our token back), and a requester that sends no digest has not proved
            # us yet: answering lets it, and the link comes UP with the HELLO that follows.
            return [self._answer(msg, sib)]
        return self._heard_hello(msg, sib, now, False, sender)

    def _answer(self, msg: Hello, sib: Sibling) -> Send:
        """The ack to a request: its dialed and token echoed, and our digest if the endpoint
        it goes to is proved (else none, and we owe it one, sent once the link is UP)."""
        proved = sib.unproved_since is None
        if not proved:
            sib.owed_answer = (msg.dialed, msg.token)
        return Send(sib.endpoint, self._hello(True, msg.dialed, msg.token, proved=proved))

    def _on_hello_ack(self, msg: Hello, now: float, sender: ClientId = ON_OUR_DEALER
                      ) -> list[Effect]:
        """The answer to a HELLO of ours: the endpoint we dialed, echoed with our token."""
        sib = self.siblings.get(msg.dialed) if msg.dialed else None
        if sib is None or msg.token != self._token(sib.endpoint):
            # Not an answer to a HELLO of ours (a past life's, one to a sibling since removed)
            # or a forgery: only a node receiving at the endpoint we dialed saw the token.
            self.counters["ignored"] += 1
            return []
        expected = sib.expected_id or sib.id
        if expected is not None and expected != msg.sender:
            why = f"expected node {expected} at {sib.endpoint}, found {msg.sender}"
            if sib.unproved_since is not None:  # it asked to link under a name not its own
                self._remove(sib)
                return [Disconnect(sib.endpoint), Log(LogLevel.WARNING, f"not linked: {why}")]
            self._transition(sib, LinkState.REFUSED, now, why)
            return [Log(LogLevel.ERROR, why)]
        proved = sib.unproved_since is not None
        if proved:
            refusal = self._admit(msg, sib, now)
            if refusal is not None:
                return refusal
        sib.peer_endpoint = msg.endpoint
        if msg.digest:
            return self._heard_hello(msg, sib, now, proved, sender)
        # It answered from the endpoint we dialed but has not proved ours yet (no digest): we
        # know who is there, and the link comes UP with its next HELLO, which tells us more.
        if sib.id is None:
            sib.id = msg.sender
            self._by_id[msg.sender] = sib
            proved = True
        return [Persist(self.persisted_state())] if proved else []

    def _admit(self, msg: Hello, sib: Sibling, now: float) -> list[Effect] | None:
        """A sibling made by an inbound HELLO proved its endpoint: None if it may stay (it is
        persisted from now on), else what to do instead."""
        other = self._by_id.get(msg.sender)
        if other is not None and other is not sib:  # another route to a sibling we have
            self._remove(sib)
            return [Disconnect(sib.endpoint)]
        if not sib.linking and self._gate.is_unlinked(msg.sender, sib.endpoint):
            self._remove(sib)
            return [Disconnect(sib.endpoint), *self._refuse_unlinked(msg, now)]
        if self._count_siblings(proved=True) >= MAX_LINKS_PER_ADVERT:
            self._remove(sib)
            return [Disconnect(sib.endpoint), *self._refuse(
                msg, f"{self.id} already has {MAX_LINKS_PER_ADVERT} siblings", now)]
        sib.unproved_since = None
        return None

    def _on_hello_from_stranger(self, msg: Hello, now: float) -> list[Effect]:
        """A link request from a node that is not our sibling: a new sibling, unproved."""
        if not msg.linking and self._gate.is_unlinked(msg.sender, msg.endpoint):
            return self._refuse_unlinked(msg, now)
        if self._count_siblings(proved=True) >= MAX_LINKS_PER_ADVERT:
            return self._refuse(msg, f"{self.id} already has {MAX_LINKS_PER_ADVERT} siblings",
                                now)
        if self._count_siblings(proved=False) >= MAX_UNPROVED_SIBLINGS:
            self.counters["ignored"] += 1  # it asks again; room comes within the TTL
            return []
        sib = self.siblings[msg.endpoint] = Sibling(
            msg.endpoint, msg.sender, next_hello=now, error=_UNPROVED, unproved_since=now,
            linking=msg.linking)
        out: list[Effect] = [
            Connect(msg.endpoint, msg.sender),
            Log(LogLevel.INFO, f"{msg.sender} ({msg.endpoint}) asked to link"),
            self._answer(msg, sib)]
        out.extend(self._send_hellos(now))  # ours, which only the node at msg.endpoint can answer
        return out

    def _heard_hello(self, msg: Hello, sib: Sibling, now: float, proved: bool,
                     sender: ClientId = ON_OUR_DEALER) -> list[Effect]:
        """A HELLO that shows the sibling alive and who it is: the link is UP.

        `sender`: the connection it came over. If that is the sibling's own connection to our
        ROUTER, it becomes the sibling's `Route`, over which our answer (and anything else our
        DEALER cannot take yet) goes back at once. A duplicate ack (the link is UP with this
        life already) is life and nothing more: its request was answered, and each side queues
        by the other's digest once."""
        out: list[Effect] = []
        if sender != ON_OUR_DEALER and sender != sib.route:
            sib.route = sender
            out.append(Route(sib.endpoint, sender))
        id_learned = sib.id is None
        restarted = sib.nonce is not None and sib.nonce != msg.nonce
        was_up = sib.up
        if msg.ack and was_up and not restarted and not proved:
            sib.last_heard = now
            self.conflict = ""
            return out
        if id_learned:
            sib.id = msg.sender
            self._by_id[msg.sender] = sib
        sib.nonce = msg.nonce
        was_linking, sib.linking = sib.linking, False
        if restarted:
            sib.outbox.clear()  # queued for its past life; the digest says what it lacks now
        self._transition(sib, LinkState.UP, now)
        forgotten = self._gate.forget(msg.sender, sib.endpoint)  # linked again: no longer unlinked
        if self.conflict and msg.ack:
            self.conflict = ""
        # Answer its request with our digest: this one, or the one we answered without it
        # (an ack is never answered, so each side queues by the other's digest exactly once).
        answer = (msg.dialed, msg.token) if not msg.ack else sib.owed_answer
        sib.owed_answer = None
        if answer is not None:
            out.append(Send(sib.endpoint, self._hello(True, *answer)))
        out.extend(self._on_digest(msg.digest, False, sib))
        # A link request answered is saved as done, so that a restart does not undo an unlink
        # the other side's operator makes after it.
        if id_learned or proved or forgotten or was_linking:
            out.append(Persist(self.persisted_state()))
        if not was_up:
            out.append(Log(LogLevel.INFO, f"link to {sib.id} is up"))
        elif restarted:
            out.append(Log(LogLevel.INFO, f"{sib.id} restarted"))
        return out

    def _dialed_as(self, node_id: str) -> Sibling | None:
        """A sibling we dialed as ID@ENDPOINT that has not confirmed its id in this life."""
        for sib in self.siblings.values():
            if sib.id is None and sib.expected_id == node_id and sib.unproved_since is None:
                return sib
        return None

    def _count_siblings(self, proved: bool) -> int:
        return sum(1 for sib in self.siblings.values()
                   if (sib.unproved_since is None) is proved)

    def _refuse_duplicate(self, msg: Hello, why: str, now: float) -> list[Effect]:
        return self._refuse(msg, f"duplicate node id {msg.sender!r}: {why}", now,
                            ByeReason.DUPLICATE_ID)

    def _refuse_unlinked(self, msg: Hello, now: float) -> list[Effect]:
        return self._refuse(msg, f"{self.id} was unlinked from {msg.sender} by its operator; "
                            f"a `link` on either node links them again", now,
                            ByeReason.UNLINKED)

    def _refuse(self, msg: Hello, why: str, now: float, reason: ByeReason = ByeReason.REFUSED
                ) -> list[Effect]:
        """A refusal BYE, within the gate's budget (the rest are dropped and counted), and a
        log line at most every REFUSAL_LOG_INTERVAL_S."""
        self.counters["ignored"] += 1
        out: list[Effect] = []
        gate = self._gate
        if gate.may_refuse(msg.endpoint, now):
            bye = Bye(self.id, self.config.nonce, reason, dialed=msg.dialed, detail=why)
            out.append(SendOnce(msg.endpoint, msg.sender, bye))
        else:
            self.counters["refusals_dropped"] += 1
        if gate.may_log(now):
            count, gate.unlogged = gate.unlogged, 0
            more = f" ({count - 1} other refusal(s) since the last report)" if count > 1 else ""
            out.insert(0, Log(LogLevel.ERROR, f"refused link from {msg.endpoint}: {why}{more}"))
        return out

    def _on_bye(self, msg: Bye, sib: Sibling | None, now: float) -> list[Effect]:
        if sib is None and msg.dialed:
            sib = self.siblings.get(msg.dialed)
        # A BYE naming the endpoint we knock at answers our HELLO: whoever is there now said
        # it, so the nonce of a past life we remember does not make it stale.
        answers_us = sib is not None and not sib.up and msg.dialed == sib.endpoint
        if sib is None or (sib.nonce is not None and sib.nonce != msg.nonce and not answers_us):
            self.counters["ignored"] += 1
            return []
        match msg.reason:
            case ByeReason.UNLINKED:
                self._remove(sib)
                return [Disconnect(sib.endpoint), Persist(self.persisted_state()),
                        Log(LogLevel.INFO, f"{sib.name} unlinked us")]
            case ByeReason.DUPLICATE_ID | ByeReason.REFUSED:
                why = msg.detail or str(msg.reason)
                self._transition(sib, LinkState.REFUSED, now, why)
                if msg.reason is ByeReason.DUPLICATE_ID:
                    self.conflict = f"{msg.sender} refused us: {why}"
                return [Log(LogLevel.ERROR, f"{msg.sender} refused the link: {why}")]
            case _:
                if not sib.up:
                    return []
                self._transition(sib, LinkState.DOWN, now)
                return [Log(LogLevel.INFO, f"{sib.name} said goodbye; link down")]

    def _on_adverts(self, msg: Adverts, sib: Sibling, now: float) -> list[Effect]:
        """Merge a batch of adverts into the table and queue what is new for the other
        siblings. The hot path of the whole protocol (every advert of every message passes
        here, N times per change in an N-node grid): the common cases, a version we hold and a
        newer one to store, cost the table's merge and a few dict operations, no call of their
        own; counters move once per message."""
        counters = self.counters
        adverts = msg.adverts
        counters["adverts_received"] += len(adverts)
        bad_signatures = counters["bad_signatures"]
        # `table.merge` is called as a method, not bound to a local: compiled (mypyc), a
        # method call on a known class is a direct C call, a bound method a generic one.
        table = self.table
        verify = None if self._seal is None else self._seal.verify
        own_id, by_id = self.id, self._by_id
        came_back = sib.outbox
        # The other UP siblings' outboxes, each with its bit in the pruned flood's plan (-1:
        # the plan cannot place it); None until a version new to us needs them.
        targets: list[tuple[int, dict[str, Advert]]] | None = None
        plan: FloodPlan | None = None
        accepted = ignored = unverified = 0
        for a in adverts:
            origin = a.origin
            if origin == own_id:
                self._learn_about_self(a, now)
                continue
            if a.incarnation == MAX_COUNTER and a.seq == MAX_COUNTER:
                self._retract(a, now)
                continue
            new_origin = origin not in table and origin != sib.id
            if new_origin and not self._may_introduce(sib, now):
                continue
            # The seal is asked only about versions new to us: one verification per version.
            merged = table.merge(a, verify)
            if merged is Merge.NEW:
                accepted += 1
                if targets is None:
                    plan, targets = self._flood_targets(sib, now)
                elif plan is not None and plan.version != table.links_version:
                    plan = None  # this advert moved the topology: the plan is for the old one
                # -1 (every bit set): in full, for the cases zgrid/flood.py gives.
                children = (plan.children.get(origin, -1)
                            if plan is not None and plan.sender_is_nearer(sib.id, origin)
                            else -1)
                if children == -1:
                    for _, outbox in targets:
                        outbox[origin] = a
                else:
                    for bit, outbox in targets:
                        if bit < 0 or (children >> bit) & 1:
                            outbox[origin] = a
                if new_origin:
                    sib.introduced.append(origin)
                known = by_id.get(origin)
                if known is not None and known.state is LinkState.UP and (
                        (a.nonce == known.nonce) != (origin in self.own_advert.links)):
                    self._relist()  # the first advert of a sibling's new life (or one of another)
            elif merged is Merge.STALE:
                # The sender holds this version already: if we queued it (or an older one) for
                # the sender, since it arrived from elsewhere first, sending it back is waste.
                queued = came_back.get(origin)
                if queued is not None and (queued.incarnation, queued.seq) <= (
                        a.incarnation, a.seq):
                    del came_back[origin]
            elif merged is Merge.UNVERIFIED:
                unverified += 1
            elif merged is Merge.FULL:
                ignored += 1
        if accepted:  # most messages of a flood bring nothing new: no dict writes then
            counters["adverts_accepted"] += accepted
        if ignored:
            counters["ignored"] += ignored
        if unverified:
            counters["bad_signatures"] += unverified
        out = self._save_incarnation()
        if counters["bad_signatures"] != bad_signatures:
            out.extend(self._log_bad_signatures(msg.sender, now))
        return out

    def _flood_targets(self, sender: Sibling, now: float
                       ) -> tuple[FloodPlan | None, list[tuple[int, dict[str, Advert]]]]:
        """Where a version new to us may go: the pruned flood's plan (None: flood in full), and
        the outboxes of the UP siblings but `sender`, each with its bit in the plan (-1: none)."""
        up = [s for s in self.siblings.values() if s.state is LinkState.UP]
        pruner = self._pruner
        # Asked first, so that a grid that floods in full (a cold start, a large island) builds
        # no id tuple per message.
        if not self.config.pruned_flood_max_nodes or not pruner.settled(self.table, now):
            return None, [(-1, s.outbox) for s in up if s is not sender]
        plan = pruner.settled_plan(self.table, [s.id for s in up if s.id is not None], now)
        bits = plan.bit
        return plan, [(bits.get(s.id, -1) if s.id is not None else -1, s.outbox)
                      for s in up if s is not sender]

    def _may_introduce(self, sib: Sibling, now: float) -> bool:
        """Whether `sib` may give us one more origin we have never heard of. Each sibling may
        hold at most UNREACHABLE_SHARE_PER_SIBLING of the table in origins that our island
        cannot reach, so one peer's inventions cannot fill it; those that became reachable (or
        left the table) are recounted at most every INTRODUCED_RECOUNT_INTERVAL_S. The origins
        refused come back through anti-entropy once there is room."""
        cap = max(1, int(self.config.max_nodes * UNREACHABLE_SHARE_PER_SIBLING))
        if len(sib.introduced) < cap:
            return True
        if now - sib.introduced_counted_at >= INTRODUCED_RECOUNT_INTERVAL_S:
            sib.introduced_counted_at = now
            table, island = self.table, self.table.island(now)
            # dict.fromkeys: an origin forgotten and introduced again is counted once.
            sib.introduced = list(dict.fromkeys(
                o for o in sib.introduced if o in table and o not in island))
            if len(sib.introduced) < cap:
                return True
        self.counters["origins_refused"] += 1
        return False

    def _log_bad_signatures(self, sender: str, now: float) -> list[Effect]:
        new = self.counters["bad_signatures"] - self._bad_signatures_logged
        if now - self._last_bad_signature_log < BAD_SIGNATURE_LOG_INTERVAL_S:
            return []
        self._last_bad_signature_log = now
        self._bad_signatures_logged = self.counters["bad_signatures"]
        return [Log(LogLevel.WARNING, f"dropped {new} advert(s) whose signature does not verify "
                    f"against the key of their origin (latest forwarded by {sender})")]

    def _on_ping(self, msg: Ping, sib: Sibling, now: float) -> list[Effect]:
        if msg.table_hash == self.table.hash:
            sib.hash_mismatches = 0
            return []
        sib.hash_mismatches += 1
        if sib.hash_mismatches < HASH_MISMATCHES_BEFORE_DIGEST:
            return []
        if not self._may_send_digest(sib, now):
            return []  # the mismatch count stands: the first ping after the interval sends it
        sib.hash_mismatches = 0
        self._pruner.stand_down(now, PRUNED_FLOOD_AFTER_REPAIR_S)
        return [Send(sib.endpoint, DigestMsg(self.id, self.config.nonce, self.table.digest(),
                                             True))]

    def _may_send_digest(self, sib: Sibling, now: float) -> bool:
        """At most one digest to a sibling per ping interval: a digest is the whole table
        (40,000 entries at most), and pings, however many, must not each draw one."""
        if now - sib.digest_sent_at < self.config.ping_interval_s:
            self.counters["digests_limited"] += 1
            return False
        sib.digest_sent_at = now
        self.counters["digests_sent"] += 1
        return True

    def _on_digest_msg(self, msg: DigestMsg, sib: Sibling, now: float) -> list[Effect]:
        """A sibling's digest, answered at most once per ping interval: each answer may queue
        the whole table for it."""
        if now - sib.digest_handled_at < self.config.ping_interval_s:
            self.counters["digests_limited"] += 1
            return []
        sib.digest_handled_at = now
        self._pruner.stand_down(now, PRUNED_FLOOD_AFTER_REPAIR_S)
        out = self._on_digest(msg.entries, False, sib)
        if msg.reply and self.table.lacks_any_of(msg.entries) and self._may_send_digest(sib, now):
            out.append(Send(sib.endpoint,
                            DigestMsg(self.id, self.config.nonce, self.table.digest(), False)))
        return out

    def _on_digest(self, theirs: Digest, reply: bool, sib: Sibling) -> list[Effect]:
        """Queue what the sibling lacks; ask for what we lack by sending our digest back."""
        outbox = sib.outbox
        for advert in self.table.newer_than(theirs):
            outbox[advert.origin] = advert
        if reply and self.table.lacks_any_of(theirs):
            self.counters["digests_sent"] += 1
            return [Send(sib.endpoint,
                         DigestMsg(self.id, self.config.nonce, self.table.digest(), False))]
        return []

    def _retract(self, a: Advert, now: float) -> None:
        """The maximum version can never be outbid, so no origin ever uses it and it cannot
        mean "newest": it retracts its origin. We drop the origin's advert and keep a
        tombstone at that version for `forget_after_s`; then anti-entropy brings the origin's
        real advert back. So a forgery at the maximum costs its victim one forget period, not
        its id for good. With keys it must carry the origin's signature, like any advert."""
        if self._seal is not None and not self._seal.verify(a):
            self.counters["bad_signatures"] += 1
            return
        if self.table.tombstone(a.origin) == a.version:
            return  # retracted already: a flood brings the same copy over many paths
        self.table.retract(a.origin, now)
        for sib in self.siblings.values():
            if sib.state is LinkState.UP:
                sib.outbox[a.origin] = a  # every holder must drop it too
        if a.origin in self._by_id:
            self._relist()  # no advert of it held: a past life no longer stands in its way

    def _retract_self(self) -> None:
        """Flood a retraction of our own id (our advert at the maximum version): every node
        drops whatever it holds of us, the rival included, for one forget period, after which
        anti-entropy brings our current advert back. Our own advert and version stay."""
        self.conflict = (f"an advert of {self.id} at (or next to) the maximum version was "
                         "forged, which nothing can outbid: this node retracted itself from "
                         "every table for --forget-after and then returns by itself; run the "
                         "grid with --keys to stop forgeries")
        own = self.own_advert
        retraction = replace(own, incarnation=MAX_COUNTER, seq=MAX_COUNTER, signature=b"")
        if self._seal is not None:
            retraction = self._seal.sign(retraction)
        for sib in self.siblings.values():
            if sib.state is LinkState.UP:
                sib.outbox[self.id] = retraction

    def _learn_about_self(self, a: Advert, now: float) -> None:
        """An advert of our id. Not newer than ours: our echo, or a past life. Newer: we never
        wrote it (our nonce or not): a past life of ours whose data dir was lost, a live
        duplicate, or a forgery. Each time, we outbid it, so the grid always ends up holding
        what *we* say; a rival seen before is outbid at most every RIVAL_OUTBID_INTERVAL_S
        and reported as a conflict, so two live duplicates cannot bump-war."""
        if a.version <= (self.incarnation, self.seq):
            return
        if self._seal is not None and not self._seal.verify(a):
            self.counters["bad_signatures"] += 1  # with keys nobody else can write our id
            return
        if a.version == (MAX_COUNTER, MAX_COUNTER):
            # A retraction of us: it drops us for a forget period wherever it went; here it
            # changes nothing (we never store a rival), and we come back by ourselves. (It
            # may be our own retraction's echo: keep the reason we gave then.)
            self.conflict = self.conflict or (
                f"someone retracted {self.id} with a forged advert at the maximum version: its "
                "holders drop this node for --forget-after; run the grid with --keys to stop "
                "forgeries")
            return
        if self._rival is None or a.version > self._rival.version:
            self._rival = a
        last = self._rivals.pop(a.nonce, None)
        if last is not None:
            if not self.conflict:
                self.conflict = (f"another live node uses the id {self.id} (at "
                                 f"{a.endpoint}): stop one of them; if there is none, someone "
                                 "forges its adverts: run the grid with --keys")
            if now - last < RIVAL_OUTBID_INTERVAL_S:
                self._rivals[a.nonce] = last
                self._next_outbid = min(self._next_outbid, last + RIVAL_OUTBID_INTERVAL_S)
                return
        self._rivals[a.nonce] = now
        if len(self._rivals) > MAX_RIVALS_REMEMBERED:
            del self._rivals[next(iter(self._rivals))]
        self._outbid()

    def _save_incarnation(self) -> list[Effect]:
        """A Persist that makes a new incarnation durable before anything else is sent (an
        outbid or an exhausted seq moved us to one), or nothing."""
        if self.incarnation == self._durable_incarnation:
            return []
        self._durable_incarnation = self.incarnation
        return [Persist(self.persisted_state(), new_incarnation=True)]

    def _outbid(self) -> None:
        """Go above the newest rival. A forgery within our own life (our nonce and incarnation)
        is outbid within it, by seq; anything else is another life, so we start a new one
        above it, as a restart would. Where counters are exhausted we take the least version
        above, but never the maximum itself (it retracts, see `_retract`). A rival nothing can
        outbid, only possible in an unsigned grid, makes us retract ourselves instead."""
        rival, self._rival = self._rival, None
        self._next_outbid = math.inf
        if rival is None or rival.version <= (self.incarnation, self.seq):
            return
        incarnation, seq = rival.version
        own_life = rival.nonce == self.config.nonce and incarnation == self.incarnation
        target: tuple[int, int] | None
        if not own_life and incarnation < MAX_COUNTER:
            target = (incarnation + 1, 0)
        elif seq < MAX_COUNTER:
            target = (incarnation, seq + 1)
        elif incarnation < MAX_COUNTER:
            target = (incarnation + 1, 0)
        else:
            target = None
        if target is None or target == (MAX_COUNTER, MAX_COUNTER):
            # Nothing we may take is above it (the maximum itself retracts, it never wins):
            # retract ourselves instead, which drops the rival everywhere for a forget period.
            self._retract_self()
            return
        self.incarnation, self.seq = target[0], target[1] - 1  # _bump takes the seq to target
        self.counters["outbids"] += 1
        self._bump()

    # ------------------------------------------------------------------------ control

    def _request(self, client: ClientId, req: ControlRequest, now: float,
                 authenticated_as: str | None) -> list[Effect]:
        """A decoded control request; always produces exactly one Respond."""
        try:
            if isinstance(req, _CHANGING_REQUESTS):
                self._check_operator(authenticated_as)
            out, body = self._control(client, req, now)
        except ControlError as exc:
            return [Respond(client, Reply(req.rid, False, code=exc.code, message=exc.message))]
        status = isinstance(req, StatusRequest)
        changed = any(isinstance(effect, Persist) for effect in out)
        return [*out, Respond(client, Reply(req.rid, True, body), with_runtime_counters=status,
                              acknowledges=changed)]

    def _check_operator(self, who: str | None) -> None:
        """With keys, only our own key and our operators may change us; reading is open."""
        trust = self.trust
        if trust is None or who == self.id or who in trust.operators:
            return
        operators = ", ".join(sorted(trust.operators)) or "none"
        raise ControlError(
            f"key {who!r} may not change {self.id}: only {self.id}'s own key and operator keys "
            f"may (operators: {operators}; mark one with `zgrid-ctl keygen --operator`). "
            "Read-only requests (status, nodes, graph, watch) are open to every member",
            "not_operator")

    def _control(self, client: ClientId, req: ControlRequest, now: float
                 ) -> tuple[list[Effect], dict[str, Any]]:
        match req:
            case StatusRequest():
                return [], self.status(now)
            case NodesRequest():
                return [], {"nodes": self.nodes(now)}
            case GraphRequest():
                return [], self.graph(now)
            case WatchRequest():
                self._watchers[client] = now + WATCH_LEASE_S
                return [], self.watch_view(now)
            case SetRequest():
                return self._set(req)
            case FlexRequest():
                return self._flex(req)
            case LinkRequest():
                return self._link(req.endpoint, now)
            case UnlinkRequest():
                return self._unlink(req.sibling)
        raise AssertionError(f"unhandled request {req!r}")

    def _set(self, req: SetRequest) -> tuple[list[Effect], dict[str, Any]]:
        def refuse(why: str) -> ControlError:
            return ControlError(why, "bad_value")

        production = self.production if req.production is None else check_power(
            req.production, lambda why: refuse(f"production {why}"))
        consumption = self.consumption if req.consumption is None else check_power(
            req.consumption, lambda why: refuse(f"consumption {why}"))
        self.production, self.consumption = production, consumption
        self._bump()
        body = {"production": production, "consumption": consumption,
                "net": production - consumption, "seq": self.seq}
        return [Persist(self.persisted_state())], body

    def _flex(self, req: FlexRequest) -> tuple[list[Effect], dict[str, Any]]:
        def refuse(why: str) -> ControlError:
            return ControlError(why, "bad_value")

        old = self.flex
        flex = Flex(
            old.flex_up_kw if req.flex_up_kw is None else check_power(
                req.flex_up_kw, lambda why: refuse(f"flex_up {why}")),
            old.price_up if req.price_up is None else check_price(
                req.price_up, lambda why: refuse(f"price_up {why}")),
            old.flex_down_kw if req.flex_down_kw is None else check_power(
                req.flex_down_kw, lambda why: refuse(f"flex_down {why}")),
            old.price_down if req.price_down is None else check_price(
                req.price_down, lambda why: refuse(f"price_down {why}")))
        self.flex = flex
        self._bump()
        return [Persist(self.persisted_state())], {**_flex_body(flex), "seq": self.seq}

    def _link(self, address: str, now: float) -> tuple[list[Effect], dict[str, Any]]:
        expected, endpoint = parse_sibling_address(
            address, lambda why: ControlError(f"link: {why}", "bad_value"))
        if endpoint == self.config.endpoint or expected == self.id:
            raise ControlError(f"cannot link {self.id} to itself", "bad_value")
        if expected is None and self.config.require_sibling_ids:
            raise ControlError(f"this grid uses keys: write the sibling as ID@{endpoint}",
                               "bad_value")
        existing = self.siblings.get(endpoint) or (
            self._by_id.get(expected) if expected else None)
        if existing is not None and existing.unproved_since is None:
            return [], {"sibling": existing.row(), "created": False}
        # Siblings that asked us and have not proved their endpoint take no operator's slot.
        if self._count_siblings(proved=True) >= MAX_LINKS_PER_ADVERT:
            raise ControlError(f"{self.id} already has {MAX_LINKS_PER_ADVERT} siblings, the "
                               "most one node may have", "too_many_siblings")
        self._check_storage(f"link {address}")
        self._unsaved_siblings.setdefault(endpoint, None)
        self._gate.forget(expected, endpoint)  # the operator links it again: no longer unlinked
        out: list[Effect] = []
        if existing is not None:  # it asked to link, unproved: the operator's link keeps it
            if existing.endpoint != endpoint or existing.expected_id != expected:
                self._remove(existing)
                out.append(Disconnect(existing.endpoint))
            else:
                existing.unproved_since, existing.linking, existing.error = None, True, ""
        sib = self.siblings.get(endpoint)
        if sib is None:
            sib = self.siblings[endpoint] = Sibling(endpoint, expected, next_hello=now,
                                                    linking=True)
        out += [Persist(self.persisted_state()), Connect(endpoint, expected)]
        out.extend(self._send_hellos(now))
        return out, {"sibling": sib.row(), "created": True}

    def _unlink(self, target: str) -> tuple[list[Effect], dict[str, Any]]:
        sib = self._find_sibling(target)
        if sib is None:
            names = ", ".join(s.name for s in self.siblings.values()) or "none"
            raise ControlError(f"{target} is not a sibling of {self.id} (siblings: {names})",
                               "unknown_sibling")
        self._check_storage(f"unlink {target}")
        self._unsaved_siblings.setdefault(sib.endpoint, sib)
        out: list[Effect] = []
        if sib.up:
            out.append(Send(sib.endpoint, self._bye(ByeReason.UNLINKED)))
        # Remembered, so that its HELLOs (it may be stopped now and never get our BYE) are
        # answered `bye unlinked` instead of linking it again. An unproved sibling's id is only
        # a claim: its endpoint is what the operator unlinked.
        self._gate.remember(sib.id or (sib.expected_id if sib.unproved_since is None else None),
                            sib.endpoint)
        self._remove(sib)
        out += [Disconnect(sib.endpoint), Persist(self.persisted_state())]
        return out, {"unlinked": sib.row()}

    def client_gone(self, client: ClientId) -> None:
        """The runtime could not deliver to this client: it has gone away."""
        self._watchers.pop(client, None)

    def connect_failed(self, endpoint: str, why: str, now: float) -> list[Effect]:
        """The runtime could not dial `endpoint` (ZeroMQ refused the address, no key for its
        id ...): the sibling there can never be reached, so it stops counting and we stop
        knocking. An operator's link stays (REFUSED, with the reason, until it is unlinked);
        one a stranger asked for is dropped."""
        sib = self.siblings.get(endpoint)
        if sib is None:
            return []
        if sib.unproved_since is not None:
            self._remove(sib)
            return [Log(LogLevel.WARNING, f"not linked with {endpoint}: cannot dial it: {why}")]
        self._transition(sib, LinkState.REFUSED, now, f"cannot dial {endpoint}: {why}",
                         retry_at=math.inf)
        return [Log(LogLevel.ERROR, f"cannot dial {sib.name} at {endpoint}: {why}; the link "
                    "stays refused until it is unlinked")]

    def connection_lost(self, endpoint: str, now: float) -> list[Effect]:
        """Our DEALER's connection to `endpoint` closed (the runtime's libzmq monitor says so):
        the sibling's process is gone, crashed or stopping, and its kernel closed the socket.
        An UP link goes DOWN now rather than after `dead_after_s` of silence, and we knock
        again (it may be restarting). Not a flap: nothing was guessed from silence. A failure
        that closes nothing (a frozen process, a cut cable) is still the pings' to find."""
        sib = self.siblings.get(endpoint)
        if sib is None or sib.state is not LinkState.UP:
            return []  # a goodbye, or silence, got there first; or never UP
        self._transition(sib, LinkState.DOWN, now)
        self.counters["connections_lost"] += 1
        return [Log(LogLevel.WARNING, f"{sib.name} closed its connection; link down")]

    # ------------------------------------------------------------------------ time

    def timer(self, now: float) -> list[Effect]:
        """Pings, failure detection, HELLO retries, watcher leases, forgetting. Call when due."""
        out: list[Effect] = []
        cfg = self.config
        if now >= self._next_outbid:
            self._outbid()
            out.extend(self._save_incarnation())
        for sib in self.siblings.values():
            if sib.state is LinkState.UP and now - sib.last_heard >= cfg.dead_after_s:
                self._transition(sib, LinkState.DOWN, now, retry_at=now)
                self.counters["link_flaps"] += 1
                out.append(Log(LogLevel.WARNING,
                               f"{sib.name} silent for {cfg.dead_after_s:g}s; link down"))
        expired = [sib for sib in self.siblings.values() if sib.unproved_since is not None
                   and now - sib.unproved_since >= UNPROVED_SIBLING_TTL_S]
        for sib in expired:  # it never answered from the endpoint it claimed: not a sibling
            self._remove(sib)
            out.append(Disconnect(sib.endpoint))
        self._pruner.note(self.table, now)
        if now >= self._next_ping:
            self._next_ping = self._ping_after(now)
            ping = Ping(self.id, self.config.nonce, self.table.hash)
            out.extend(Send(sib.endpoint, ping) for sib in self.siblings.values() if sib.up)
        out.extend(self._send_hellos(now))
        for client, expiry in list(self._watchers.items()):
            if now >= expiry:
                del self._watchers[client]
        if now >= self._next_forget_check:
            self._next_forget_check = now + cfg.forget_after_s / 10
            self.table.forget(now, cfg.forget_after_s)
        if now >= self._next_storage_retry:  # saves are failing: see whether one works now
            self._next_storage_retry = now + STORAGE_RETRY_S
            out.append(Persist(self.persisted_state()))
        return out

    def _ping_after(self, now: float) -> float:
        """The next multiple of the ping interval after `now`. Every node of a machine (one
        monotonic clock) pings at the same instants, so a node's siblings' pings arrive
        together and one wakeup takes them all: idle cost goes with the ping interval, not
        with the number of siblings."""
        interval = self.config.ping_interval_s
        return (math.floor(now / interval) + 1) * interval

    def next_deadline(self) -> float:
        """When `timer` next has something to do (the runtime's poll timeout)."""
        # min() of two floats each time: compiled, that is a compare, and min() of five a
        # generic call (the simulator asks this after every message a node handles).
        deadline = min(min(self._next_ping, self._next_forget_check),
                       min(self._next_outbid, min(self._next_storage_retry, self._balance_due)))
        dead_after_s = self.config.dead_after_s
        for sib in self.siblings.values():
            due = sib.last_heard + dead_after_s if sib.state is LinkState.UP else sib.next_hello
            if sib.unproved_since is not None:  # a REFUSED one knocks only every 5 s
                due = min(due, sib.unproved_since + UNPROVED_SIBLING_TTL_S)
            if due < deadline:
                deadline = due
        if self._watchers:
            deadline = min(deadline, min(self._watchers.values()))
        return deadline

    def _send_hellos(self, now: float) -> list[Effect]:
        out: list[Effect] = []
        for sib in self.siblings.values():
            if sib.state is LinkState.UP or now < sib.next_hello:
                continue
            proved = sib.unproved_since is None
            out.append(Send(sib.endpoint, self._hello(
                False, sib.endpoint, self._token(sib.endpoint), proved=proved,
                linking=sib.linking and proved), dealer_only=True))
            if sib.state is LinkState.REFUSED:
                sib.next_hello = now + REFUSED_RETRY_S
            else:
                sib.next_hello = now + sib.hello_backoff_s
                sib.hello_backoff_s = min(sib.hello_backoff_s * 2, HELLO_RETRY_MAX_S)
        return out

    # ------------------------------------------------------------------------ links

    def _transition(self, sib: Sibling, state: LinkState, now: float, error: str = "",
                    retry_at: float | None = None) -> None:
        """The one place a link changes state (see TRANSITIONS).

        Leaving UP empties the sibling's outbox (nothing queued may reach it once it is back:
        the HELLO digest decides what it gets). Entering UP resets the HELLO backoff and the
        hash-mismatch count. `retry_at`: when to send the next HELLO (default: soon after DOWN,
        slowly after REFUSED). Our advert is bumped iff the link starts or stops counting as
        an edge (`_links`: UP, and not only known by an advert of the sibling's past life).
        """
        if state not in TRANSITIONS[sib.state]:
            raise AssertionError(f"link {sib.name}: {sib.state} -> {state} is not a transition")
        sib.state, sib.error = state, error
        if state is LinkState.UP:
            sib.last_heard, sib.hash_mismatches = now, 0
            sib.hello_backoff_s = HELLO_RETRY_MIN_S
        else:
            sib.outbox.clear()
            if state is LinkState.DOWN:
                sib.hello_backoff_s = HELLO_RETRY_MIN_S
                sib.next_hello = now + HELLO_RETRY_MIN_S if retry_at is None else retry_at
            else:
                sib.next_hello = now + REFUSED_RETRY_S if retry_at is None else retry_at
        self._relist()

    def _links(self) -> tuple[str, ...]:
        """The `links` of our advert: the siblings whose link is UP with a live life of theirs.

        An edge counts only between live lives. A sibling whose HELLO came from a new life
        (nonce) while we still hold an advert of its previous one is not listed until we hold
        one of the new life: that old advert still lists us, and the two-way check would count
        the past life (its values and links) in every island until the new one arrives."""
        table = self.table
        return tuple(sorted(
            sib.id for sib in self.siblings.values()
            if sib.state is LinkState.UP and sib.id is not None
            and ((held := table.get(sib.id)) is None or held.nonce == sib.nonce)))

    def _relist(self) -> None:
        """Bump our advert iff the siblings it lists changed."""
        if self._links() != self.own_advert.links:
            self._bump()

    def _remove(self, sib: Sibling) -> None:
        """Forget a sibling altogether (unlinked, or it was ourselves)."""
        del self.siblings[sib.endpoint]
        if sib.id is not None and self._by_id.get(sib.id) is sib:
            del self._by_id[sib.id]
        if sib.up:
            self._relist()

    def _find_sibling(self, target: str) -> Sibling | None:
        expected, sep, endpoint = target.partition("@")
        if sep:
            return self.siblings.get(endpoint) or self._by_id.get(expected)
        if target in self.siblings:
            return self.siblings[target]
        for sib in self.siblings.values():
            if target in (sib.id, sib.expected_id):
                return sib
        return None

    # ------------------------------------------------------------------------ flushing

    def flush(self, now: float) -> list[Effect]:
        """Apply our share of the clearing, then one batched `adverts` message per sibling,
        then the view if it changed."""
        out = self._save_incarnation()
        if self.flex.offered or self.activation_kw:
            self._balance(now)
        # A flood queues the same adverts for most siblings: the same message objects for all
        # of them let the runtime encode each once.
        shared: tuple[Advert, ...] = ()
        messages: list[Adverts] = []
        for sib in self.siblings.values():
            outbox = sib.outbox
            if not outbox:
                continue
            if sib.state is LinkState.UP:
                adverts = tuple(outbox.values())
                if not _same_items(adverts, shared):
                    shared = adverts
                    messages = [Adverts(self.id, self.config.nonce, chunk)
                                for chunk in _chunks(adverts, MAX_ADVERTS_PER_MESSAGE)]
                out.extend(Send(sib.endpoint, message) for message in messages)
            outbox.clear()
        if self.config.track_view or self._watchers:
            units = self.table.exact_units(now)
            island = self.table.island(now)
            key = (units[0], units[1], island, self._activation_units(island))
            if key != self._published:
                self._published = key
                out.append(Publish(self.watch_view(now), tuple(self._watchers)))
        return out

    def _bump(self) -> None:
        """Publish a new version of our own advert (values or links changed)."""
        if self.seq < MAX_COUNTER:
            self.seq += 1
        elif self.incarnation < MAX_COUNTER:  # seq exhausted (only an outbid gets it there)
            self.incarnation, self.seq = self.incarnation + 1, 0
        links = self._links()
        offers = self.flex.offered or self.activation_kw != 0.0
        advert = Advert(self.id, self.incarnation, self.seq, self.production, self.consumption,
                        links, self.config.endpoint, self.config.nonce,
                        flex=self.flex if offers else None, activation_kw=self.activation_kw)
        if self._seal is not None:
            advert = self._seal.sign(advert)
        self.table.put(advert)
        for sib in self.siblings.values():
            if sib.state is LinkState.UP:
                sib.outbox[self.id] = advert

    # ------------------------------------------------------------------------ balancing

    def clearing(self, now: float) -> Clearing:
        """The island's clearing (zgrid/clearing.py) over its members' base values and offers,
        as every member computes it from the bit-identical table. Cached per table version."""
        island = self._sync_book(now)
        key = (self.table.hash, island)
        if self._clearing is not None and self._clearing[0] == key:
            return self._clearing[1]
        production, consumption = self.table.exact_units(now)
        result = self._book.clearing(production - consumption)
        self._clearing = (key, result)
        return result

    def _sync_book(self, now: float) -> frozenset[str]:
        """Bring the offer book up to the table: the origins whose offer changed only, unless
        the island itself changed (then every member's offer is read again)."""
        island = self.table.island(now)
        changed = self.table.take_offers_changed()
        adverts = self.table.by_origin
        if island is not self._book_island and island != self._book_island:
            self._book, self._book_flex = OfferBook(), {}
            members: Iterable[str] = island
        else:
            members = changed
        book, seen = self._book, self._book_flex
        for origin in members:
            a = adverts.get(origin)
            f = None if a is None or origin not in island else a.flex
            if f is seen.get(origin, _UNSEEN):
                continue
            if f is None:
                book.remove(origin)
                seen.pop(origin, None)
            else:
                book.set(origin, f.flex_up_kw, f.price_up, f.flex_down_kw, f.price_down)
                seen[origin] = f
        self._book_island = island
        return island

    def _balance(self, now: float) -> None:
        """Apply our own activation (and advertise it) when the clearing changed it.

        Our share depends on the island's imbalance and offers only: an advert that moves
        neither (an activation, a link elsewhere) costs nothing here. Once either moves, the
        share is computed BALANCE_HOLDOFF_S later, once, from the view that one burst's flood
        has settled to, rather than at every intermediate table. The clearing reads base
        values and offers only, so applying it cannot feed back. Only our own share is asked
        of the book: the whole clearing is built only when it is read."""
        table = self.table
        if self._balance_due == math.inf:
            production, consumption = table.exact_units(now)
            # The book as our share last read it: a status read may have synced it since.
            if ((production - consumption, self._book, self._book.version) == self._balanced_at
                    and table.island(now) is self._book_island
                    and not table.offers_changed_pending()):
                return
            self._balance_due = now + BALANCE_HOLDOFF_S
            return
        if now < self._balance_due:
            return
        self._balance_due = math.inf
        self._sync_book(now)
        production, consumption = table.exact_units(now)
        self._balanced_at = (production - consumption, self._book, self._book.version)
        wanted = from_units(self._book.activation_units(self.id, production - consumption))
        if wanted != self.activation_kw:
            self.activation_kw = wanted
            self._bump()

    def device_changed(self, offer: Flex, rating_kw: float, state: Mapping[str, Any]
                       ) -> list[Effect]:
        """Our device (zgrid/devices.py, run by the runtime, which integrates our activation
        into it) now offers `offer` and is in `state` (shown in `status`). Not a control
        request: nobody is acknowledged and the core persists nothing, since a restart rebuilds
        the offer from the device (the runtime saves the device's own state, such as a
        battery's charge, with ours). The offer is advertised only if it differs meaningfully
        from the one we advertise (`devices.meaningful_change`), so the grid does not chatter."""
        self.device_state = dict(state)
        if meaningful_change(self.flex, offer, rating_kw):
            self.flex = offer
            self._bump()
        return []

    def _activation_units(self, island: frozenset[str]) -> int:
        """The exact sum of the activations the island's members say they apply. O(island),
        so cached per table version: flush asks for it after every mailbox drain."""
        key = (self.table.hash, island)
        if self._activations is not None and self._activations[0] == key:
            return self._activations[1]
        adverts = self.table.by_origin
        total = sum(exact_units(a.activation_kw) for x in island
                    if (a := adverts.get(x)) is not None and a.activation_kw)
        self._activations = (key, total)
        return total

    def balance_view(self, now: float) -> dict[str, Any]:
        """The island's balancing: the imbalance of base values, the net once every member's
        advertised activation is applied, and the clearing that asks for them."""
        island = self.table.island(now)
        c = self.clearing(now)
        balanced = from_units(c.imbalance_units + self._activation_units(island))
        return {"imbalance_kw": c.imbalance_kw, "balanced_net_kw": balanced,
                "clearing_price": c.clearing_price, "shortfall_kw": c.shortfall_kw,
                "shortfall": str(c.shortfall), "clearing_hash": c.hash}

    # ------------------------------------------------------------------------ views

    @property
    def own_advert(self) -> Advert:
        own = self.table.get(self.id)
        assert own is not None  # put by __init__, never forgotten (we are in our own island)
        return own

    def totals(self, now: float) -> tuple[float, float, float]:
        """(total_net, total_production, total_consumption) of our island, exactly rounded."""
        return self.table.totals(now)

    def island(self, now: float) -> frozenset[str]:
        return self.table.island(now)

    def watch_view(self, now: float) -> dict[str, Any]:
        island = self.table.island(now)
        total_net, total_production, total_consumption = self.table.totals(now)
        return {"id": self.id, "total_net": total_net, "total_production": total_production,
                "total_consumption": total_consumption, "island_size": len(island),
                "island": sorted(island), **self.balance_view(now),
                "activation_kw": self.activation_kw}  # this node's share, for watchers

    def status(self, now: float) -> dict[str, Any]:
        view = self.watch_view(now)
        return {
            **view,
            "endpoint": self.config.endpoint,
            "production": self.production,
            "consumption": self.consumption,
            "net": self.production - self.consumption,
            **_flex_body(self.flex),
            "activation_kw": self.activation_kw,
            "device": self.device_state,
            "incarnation": self.incarnation,
            "seq": self.seq,
            "siblings": [s.row() for s in self.siblings.values()],
            "known_nodes": len(self.table),
            "conflict": self.conflict,
            "storage": f"failing: {self.storage_error}" if self.storage_error else "ok",
            "counters": {**self.counters, "adverts_evicted": self.table.evicted},
        }

    def nodes(self, now: float) -> list[dict[str, Any]]:
        island = self.table.island(now)
        return [{"id": a.origin, "production": a.production, "consumption": a.consumption,
                 "net": a.net, "reachable": a.origin in island, "endpoint": a.endpoint,
                 "incarnation": a.incarnation, "seq": a.seq, "links": list(a.links),
                 "nonce": a.nonce, **_flex_body(a.flex or NO_FLEX),
                 "activation_kw": a.activation_kw}
                for a in sorted(self.table, key=lambda a: a.origin)]

    def graph(self, now: float) -> dict[str, Any]:
        """The grid as this node knows it, for pictures of it: every known node (its `nodes`
        row and the index of its island), every link as one edge, and the islands.

        An edge is `up` when both adverts list each other (the two-way check the totals use),
        `one_way` when only one does (a link coming up or going down, or a stale advert of
        another island), `down` for a link of ours that is not up (whatever adverts say).
        Islands are the components of the `up` edges; ours is first, the others largest
        first."""
        adverts = self.table.by_origin
        groups = self.table.components()
        ours = next(i for i, g in enumerate(groups) if self.id in g)
        groups.insert(0, groups.pop(ours))
        island_of = {x: i for i, g in enumerate(groups) for x in g}
        edges: dict[tuple[str, str], str] = {}
        for a in adverts.values():
            for y in a.links:
                if y == a.origin or y not in adverts:
                    continue  # no node to draw it to (yet)
                pair = (a.origin, y) if a.origin < y else (y, a.origin)
                edges[pair] = "up" if a.origin in adverts[y].links else "one_way"
        for sib in self.siblings.values():  # our own links: we know better than adverts
            other = sib.id or sib.expected_id
            if not sib.up and other is not None and other != self.id and other in adverts:
                edges[(self.id, other) if self.id < other else (other, self.id)] = "down"
        return {"id": self.id,
                "nodes": [{**row, "island": island_of[row["id"]]} for row in self.nodes(now)],
                "edges": [{"a": a, "b": b, "state": state}
                          for (a, b), state in sorted(edges.items())],
                "islands": groups}

    def sibling(self, name: str) -> Sibling | None:
        """A sibling by endpoint or id (None if there is no such sibling)."""
        return self._find_sibling(name)

    # ------------------------------------------------------------------------ messages

    def _hello(self, ack: bool, dialed: str, token: int, proved: bool = True,
               linking: bool = False) -> Hello:
        """A request (its `token`: our challenge) or an ack (the request's token, echoed). To
        an endpoint not proved yet it carries no digest: a forged HELLO must not make us send
        our whole table to an address of the forger's choosing."""
        digest = self.table.digest() if proved else {}
        return Hello(self.id, self.config.nonce, self.config.endpoint, ack, digest, dialed,
                     token, linking)

    def _token(self, endpoint: str) -> int:
        """The challenge of our HELLOs to `endpoint`: seen only by whoever receives there, and
        not computable without our secret, so an ack echoing it proves the endpoint."""
        key = (self.config.secret or self.config.nonce).to_bytes(8, "little")
        digest = hashlib.blake2b(endpoint.encode(), key=key, digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def _bye(self, reason: ByeReason) -> Bye:
        return Bye(self.id, self.config.nonce, reason)


