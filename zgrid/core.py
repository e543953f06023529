"""The zgrid protocol as a sans-IO state machine: events and the current time in, effects out.

Theory of operation
===================

Every node holds a table of *adverts* (zgrid/table.py), one per node it has heard of, like the
link-state database of OSPF. An advert is written only by its origin and is versioned by
(incarnation, seq): incarnation grows on every restart of the origin, seq on every change.
A received advert replaces the stored one iff its version is greater, so the table converges
whatever order messages arrive in, and duplicates are harmless.

Flooding: an advert that was new to us is queued in the outbox of every UP sibling except the
one it came from. Outboxes are keyed by origin, so a burst of changes from one origin coalesces
to its newest version; `flush()` (called by the runtime once its mailbox is drained) sends one
batched `adverts` message per sibling.

Links: `link` makes us send HELLO; the receiver records us as a sibling, dials back, and
answers with a HELLO ack. Each side marks the link UP when it hears the other's HELLO, then
bumps its own advert (its `links` changed). A link is an edge of the grid only if *both*
adverts list each other (the two-way check), so a node that died or unlinked disappears as
soon as one side stops listing it. A node's *island* is everything reachable over such edges;
its totals are exact (see table.py) and bit-identical on every member.

Every change of a link's state goes through `Core._transition` (the table `TRANSITIONS` says
which are legal): it alone clears the sibling's outbox, resets its HELLO schedule, counts flaps
and bumps our advert when the link stops or starts counting as an edge.

Liveness: UP siblings ping each other every `ping_interval_s`; any message counts as life. A
sibling silent for `dead_after_s` goes DOWN (we drop it from our links and re-flood), and we
keep sending it HELLO with backoff until it answers. Only siblings watch each other.

Anti-entropy: HELLO carries a digest {origin: version}; the receiver sends what the sender
lacks. Pings carry the table hash; two mismatches in a row trigger a digest exchange. This
repairs lost messages, partitions and restarts without any global step.

Identity: each process has a random nonce. An advert about *us* that is newer than ours comes
from our past life (data dir wiped) or from a duplicate: we bump above it once per foreign
nonce; if the same foreign nonce then outbids us again, it is alive, and we report a conflict
instead of joining an endless bump war. A HELLO from an id that is alive elsewhere in our
island (other nonce, other endpoint) is refused with BYE duplicate_id.

Durability: a change is flooded before it is durable, and acknowledged only once it is
(`Persist.new_incarnation` says when that order must not be relaxed). A node that crashes before
the save restarts with the next incarnation, which outbids the unsaved version everywhere:
docs/design.md gives the whole argument.

Entry points: `handle` (everything that arrives: a decoded message or the error decoding it),
`timer` (when `next_deadline` is due), `flush` (when the mailbox is drained), `start`, `stop`
and `membership_changed`. This module must never import zmq, time, os or anything that does
I/O: the runtime (node.py) and the simulator (zgrid/sim/) drive it and perform its effects.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeAlias

from zgrid.errors import ControlError, ProtocolError
from zgrid.persisted import PersistedState
from zgrid.table import AdvertTable, Merge
from zgrid.wire import (
    MAX_ADVERTS_PER_MESSAGE,
    MAX_LINKS_PER_ADVERT,
    PEER_TYPES,
    Advert,
    Adverts,
    Bye,
    ByeReason,
    ControlRequest,
    Digest,
    DigestMsg,
    Hello,
    LinkRequest,
    Message,
    NodesRequest,
    PeerMessage,
    Ping,
    Reply,
    SetRequest,
    StatusRequest,
    UnlinkRequest,
    WatchRequest,
    check_power,
    parse_sibling_address,
)

HELLO_RETRY_MIN_S = 0.01  # the first HELLO on a fresh connection is often dropped (IMMEDIATE)
HELLO_RETRY_MAX_S = 1.0
REFUSED_RETRY_S = 5.0  # a refused link is retried slowly: the id may become free
WATCH_LEASE_S = 5.0  # a watch client re-sends `watch` more often than this to stay subscribed
BAD_FRAME_LOG_INTERVAL_S = 10.0  # at most one log line per interval about bad frames
HASH_MISMATCHES_BEFORE_DIGEST = 2  # one mismatch is normal while a flood is in flight
_REVOKED = "revoked: its key is no longer in the keys directory"


class LinkState(StrEnum):
    CONNECTING = "connecting"  # we sent HELLO, heard nothing yet
    UP = "up"
    DOWN = "down"  # was UP, then went silent or said goodbye; we keep knocking
    REFUSED = "refused"  # the peer refused us (or we it): wrong id, duplicate id, not a member


# Which link state may follow which. UP -> UP is a sibling's restart (a new nonce), REFUSED ->
# DOWN a revoked member whose key came back, REFUSED -> REFUSED a refusal for a new reason.
TRANSITIONS: Mapping[LinkState, frozenset[LinkState]] = {
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


@dataclass(frozen=True, slots=True)
class Config:
    node_id: str
    endpoint: str  # where our ROUTER is reachable; advertised to everyone
    nonce: int  # random per process
    ping_interval_s: float = 0.25
    dead_after_s: float = 1.0
    forget_after_s: float = 600.0
    max_nodes: int = 40_000
    track_view: bool = True  # compute the view after every flush (False: only when read)
    require_sibling_ids: bool = False  # with CurveZMQ: a sibling's key is found by its id


# ------------------------------------------------------------------------------------ effects


@dataclass(frozen=True, slots=True)
class Send:
    """Send to a sibling over our DEALER connected to `endpoint`; drop it if it cannot go now."""

    endpoint: str
    message: PeerMessage


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
    endpoint: str


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer a control client. `with_runtime_counters`: a status reply, to which the runtime
    adds the counters only it can keep (messages and bytes sent, sends dropped)."""

    client: ClientId
    reply: Reply
    with_runtime_counters: bool = False


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
    """

    state: PersistedState
    new_incarnation: bool = False


@dataclass(frozen=True, slots=True)
class Log:
    level: LogLevel
    text: str


Effect: TypeAlias = Send | SendOnce | Connect | Disconnect | Respond | Publish | Persist | Log


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


def _same(a: tuple[Advert, ...], b: tuple[Advert, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _chunks(items: tuple[Advert, ...], size: int) -> Iterator[tuple[Advert, ...]]:
    for start in range(0, len(items), size):
        yield tuple(items[start:start + size])


_CONTROL_REQUESTS = (StatusRequest, SetRequest, LinkRequest, UnlinkRequest, NodesRequest,
                     WatchRequest)
_PEER_MESSAGES = (Hello, Adverts, DigestMsg, Ping, Bye)


class Core:
    """One node's protocol state. Not thread-safe by design: it is an actor's private state.

    members: with keys, the ids allowed in the grid (None: an open grid, nobody is checked).
    """

    def __init__(self, config: Config, restored: PersistedState | None = None,
                 members: Iterable[str] | None = None) -> None:
        self.config = config
        self.id = config.node_id
        self.incarnation = restored.incarnation + 1 if restored else 1
        self.seq = 0
        self.production = restored.production if restored else 0.0
        self.consumption = restored.consumption if restored else 0.0
        self.members = None if members is None else frozenset(members)
        self.siblings: dict[str, Sibling] = {}  # by endpoint
        self._by_id: dict[str, Sibling] = {}
        for address in restored.siblings if restored else ():
            expected, endpoint = parse_sibling_address(address)
            self.siblings[endpoint] = Sibling(endpoint, expected)
        self.table = AdvertTable(self.id, config.max_nodes)
        self.counters: dict[str, int] = {
            "messages_received": 0, "bad_frames": 0, "ignored": 0, "adverts_received": 0,
            "adverts_accepted": 0, "link_flaps": 0, "digests_sent": 0,
        }
        self.conflict = ""
        self._foreign_nonces: dict[int, tuple[int, int]] = {}
        self._watchers: dict[ClientId, float] = {}
        self._published: tuple[int, int, frozenset[str]] | None = None
        self._next_ping = 0.0
        self._next_forget_check = config.forget_after_s / 10
        self._last_bad_log = -math.inf
        self._bad_since_log = 0
        self._bump()

    @classmethod
    def converged(cls, config: Config, table: AdvertTable,
                  siblings: Iterable[tuple[str, str, int]], now: float) -> Core:
        """A core as a cold start leaves it once its grid agrees, for simulators at scale.

        `table` holds the current advert of every member of our island, our own included (its
        version, values and links become ours); `siblings` are (id, endpoint, nonce) of the
        nodes we have an UP link with, as HELLO would have told us. Call `start` next.
        """
        own = table.get(config.node_id)
        if own is None:
            raise ValueError(f"the table holds no advert of {config.node_id}")
        core = cls(config)
        core.table = table
        core.incarnation, core.seq = own.incarnation, own.seq
        core.production, core.consumption = own.production, own.consumption
        for peer_id, endpoint, nonce in siblings:
            sib = core.siblings[endpoint] = Sibling(endpoint, peer_id, peer_id, nonce,
                                                    LinkState.UP, last_heard=now)
            core._by_id[peer_id] = sib
        return core

    # ------------------------------------------------------------------------ lifecycle

    def start(self, now: float) -> list[Effect]:
        """First effects of a process: persist the new incarnation, dial every known sibling."""
        out: list[Effect] = [Persist(self.persisted_state(), new_incarnation=True)]
        for sib in self.siblings.values():
            out.append(Connect(sib.endpoint, sib.expected_id))
            if not sib.up:
                sib.next_hello = now
        self._next_ping = now + self.config.ping_interval_s
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
        return PersistedState(self.id, self.incarnation, self.production, self.consumption,
                              tuple(sib.address for sib in self.siblings.values()))

    def membership_changed(self, members: Iterable[str], now: float) -> list[Effect]:
        """The keys directory was reloaded: drop links to members whose keys are gone, dial
        again those whose keys came back."""
        self.members = frozenset(members)
        out: list[Effect] = []
        for sib in self.siblings.values():
            allowed = sib.name in self.members
            if not allowed and sib.error != _REVOKED:
                self._transition(sib, LinkState.REFUSED, now, _REVOKED, retry_at=math.inf)
                out += [Disconnect(sib.endpoint),
                        Log(LogLevel.WARNING, f"{sib.name} revoked; link dropped")]
            elif allowed and sib.error == _REVOKED:
                self._transition(sib, LinkState.DOWN, now, retry_at=now)
                out.append(Connect(sib.endpoint, sib.id or sib.expected_id))
        return out

    # ------------------------------------------------------------------------ inbound

    def handle(self, sender: ClientId, message: Message | ProtocolError, now: float,
               authenticated_as: str | None = None) -> list[Effect]:
        """Everything that arrives at our ROUTER: a decoded message, or the error decoding it.

        sender: the routing envelope (where a reply goes). authenticated_as: with keys, the
        member whose key the connection was authenticated with (None: unknown or no keys).
        Decides whether it is sibling or control traffic, and whether the sender may talk.
        """
        from_peer = isinstance(message, _PEER_MESSAGES) or (
            isinstance(message, ProtocolError) and message.message_type in PEER_TYPES)
        if self.members is not None and (
                authenticated_as is None or authenticated_as not in self.members):
            # A connection authenticated before its key was removed: serve it nothing more.
            who = authenticated_as or "this client"
            error = ProtocolError(f"{who} is not a member of the grid (its key was revoked)",
                                  "revoked")
            return self._bad_frame(sender, error, from_peer, now)
        if isinstance(message, ProtocolError):
            return self._bad_frame(sender, message, from_peer, now)
        if isinstance(message, _PEER_MESSAGES):
            return self._receive(message, now, authenticated_as)
        if isinstance(message, _CONTROL_REQUESTS):
            return self._request(sender, message, now)
        error = ProtocolError(f"a node does not accept {type(message).__name__} messages",
                              "unknown_type")
        return self._bad_frame(sender, error, False, now)

    def _bad_frame(self, sender: ClientId, error: ProtocolError, from_peer: bool, now: float
                   ) -> list[Effect]:
        """Answer a control client; drop and count a sibling's frame (logged at a rate)."""
        if not from_peer:
            return [Respond(sender, Reply(None, False, code=error.code, message=error.message))]
        self.counters["bad_frames"] += 1
        self._bad_since_log += 1
        if now - self._last_bad_log < BAD_FRAME_LOG_INTERVAL_S:
            return []
        self._last_bad_log, count, self._bad_since_log = now, self._bad_since_log, 0
        return [Log(LogLevel.WARNING, f"dropped {count} bad frame(s) from peers; latest: "
                    f"{error.message}")]

    # ------------------------------------------------------------------------ peer messages

    def _receive(self, msg: PeerMessage, now: float, authenticated_as: str | None
                 ) -> list[Effect]:
        self.counters["messages_received"] += 1
        if authenticated_as is not None and authenticated_as != msg.sender:
            self.counters["ignored"] += 1
            return [Log(LogLevel.WARNING, f"dropped a {type(msg).__name__.lower()} claiming to "
                        f"be from {msg.sender!r} but signed by {authenticated_as!r}")]
        kind = type(msg)
        if kind is Hello:
            return self._on_hello(msg, now)  # type: ignore[arg-type]
        sib = self._by_id.get(msg.sender)
        if kind is Bye:
            return self._on_bye(msg, sib, now)  # type: ignore[arg-type]
        if sib is None or sib.state is not LinkState.UP or sib.nonce != msg.nonce:
            # Not (or no longer) our sibling, or its past life: only HELLO may (re)open a link.
            self.counters["ignored"] += 1
            return []
        sib.last_heard = now
        if kind is Adverts:
            return self._on_adverts(msg, sib)  # type: ignore[arg-type]
        if kind is Ping:
            return self._on_ping(msg, sib)  # type: ignore[arg-type]
        return self._on_digest(msg.entries, msg.reply, sib)  # type: ignore[union-attr]

    def _on_hello(self, msg: Hello, now: float) -> list[Effect]:
        if msg.sender == self.id:
            if msg.nonce == self.config.nonce:  # we dialed ourselves under another name
                out: list[Effect] = [
                    Log(LogLevel.WARNING, f"{msg.dialed} is this node itself; not linked")]
                dialed = self.siblings.get(msg.dialed)
                if dialed is not None:
                    self._remove(dialed)
                    out += [Disconnect(msg.dialed), Persist(self.persisted_state())]
                return out
            return self._refuse_duplicate(msg, f"this node ({self.id}) is alive")
        known = self.table.get(msg.sender)
        if (known is not None and known.nonce != msg.nonce and known.endpoint != msg.endpoint
                and msg.sender in self.table.island(now)):
            return self._refuse_duplicate(msg, f"{msg.sender} is alive at {known.endpoint}")

        out = []
        sib = self._by_id.get(msg.sender)
        if sib is None and msg.ack and msg.dialed:
            sib = self.siblings.get(msg.dialed)
        if sib is None:
            sib = self.siblings.get(msg.endpoint)
        if sib is None:
            if len(self.siblings) >= MAX_LINKS_PER_ADVERT:
                return self._refuse(msg, f"{self.id} already has {MAX_LINKS_PER_ADVERT} siblings")
            sib = self.siblings[msg.endpoint] = Sibling(msg.endpoint, None)
            out.append(Connect(msg.endpoint, msg.sender))
            out.append(Log(LogLevel.INFO, f"{msg.sender} ({msg.endpoint}) asked to link"))
        if sib.expected_id is not None and sib.expected_id != msg.sender:
            why = f"expected node {sib.expected_id} at {sib.endpoint}, found {msg.sender}"
            self._transition(sib, LinkState.REFUSED, now, why)
            return [*out, Log(LogLevel.ERROR, why)]

        id_learned = sib.id is None
        restarted = sib.nonce is not None and sib.nonce != msg.nonce
        was_up = sib.up
        if id_learned:
            sib.id = msg.sender
            self._by_id[msg.sender] = sib
        sib.nonce = msg.nonce
        if restarted:
            sib.outbox.clear()  # queued for its past life; the digest says what it lacks now
        self._transition(sib, LinkState.UP, now)
        if self.conflict and msg.ack:
            self.conflict = ""
        if not msg.ack:
            out.append(Send(sib.endpoint, self._hello(ack=True, dialed=msg.dialed)))
        out.extend(self._on_digest(msg.digest, False, sib))
        if id_learned:
            out.append(Persist(self.persisted_state()))
        if not was_up:
            out.append(Log(LogLevel.INFO, f"link to {sib.id} is up"))
        elif restarted:
            out.append(Log(LogLevel.INFO, f"{sib.id} restarted"))
        return out

    def _refuse_duplicate(self, msg: Hello, why: str) -> list[Effect]:
        return self._refuse(msg, f"duplicate node id {msg.sender!r}: {why}",
                            ByeReason.DUPLICATE_ID)

    def _refuse(self, msg: Hello, why: str, reason: ByeReason = ByeReason.REFUSED
                ) -> list[Effect]:
        self.counters["ignored"] += 1
        bye = Bye(self.id, self.config.nonce, reason, dialed=msg.dialed, detail=why)
        return [Log(LogLevel.ERROR, f"refused link from {msg.endpoint}: {why}"),
                SendOnce(msg.endpoint, msg.sender, bye)]

    def _on_bye(self, msg: Bye, sib: Sibling | None, now: float) -> list[Effect]:
        if sib is None and msg.dialed:
            sib = self.siblings.get(msg.dialed)
        if sib is None or (sib.nonce is not None and sib.nonce != msg.nonce):
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

    def _on_adverts(self, msg: Adverts, sib: Sibling) -> list[Effect]:
        incarnation = self.incarnation
        for advert in msg.adverts:
            self._learn(advert, sib)
        if self.incarnation != incarnation:  # we outbid a past life: never reuse it
            return [Persist(self.persisted_state(), new_incarnation=True)]
        return []

    def _on_ping(self, msg: Ping, sib: Sibling) -> list[Effect]:
        if msg.table_hash == self.table.hash:
            sib.hash_mismatches = 0
            return []
        sib.hash_mismatches += 1
        if sib.hash_mismatches < HASH_MISMATCHES_BEFORE_DIGEST:
            return []
        sib.hash_mismatches = 0
        self.counters["digests_sent"] += 1
        return [Send(sib.endpoint, DigestMsg(self.id, self.config.nonce, self.table.digest(),
                                             True))]

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

    def _learn(self, a: Advert, source: Sibling) -> None:
        # The hot path of the whole protocol (every advert of every message): keep it lean.
        counters = self.counters
        counters["adverts_received"] += 1
        if a.origin == self.id:
            self._learn_about_self(a)
            return
        merged = self.table.merge(a)
        if merged is not Merge.NEW:
            if merged is Merge.FULL:
                counters["ignored"] += 1
            elif merged is Merge.STALE:
                # The sender holds this version already: if we queued it (or an older one) for
                # the sender, since it arrived from elsewhere first, sending it back is waste.
                queued = source.outbox.get(a.origin)
                if queued is not None and (queued.incarnation, queued.seq) <= (
                        a.incarnation, a.seq):
                    del source.outbox[a.origin]
            return
        counters["adverts_accepted"] += 1
        for sib in self.siblings.values():
            if sib.state is LinkState.UP and sib is not source:
                sib.outbox[a.origin] = a

    def _learn_about_self(self, a: Advert) -> None:
        if a.nonce == self.config.nonce or (a.incarnation, a.seq) <= (self.incarnation, self.seq):
            return  # our own echo, or an older life of ours
        seen = self._foreign_nonces.get(a.nonce)
        self._foreign_nonces[a.nonce] = max(a.version, seen) if seen is not None else a.version
        if seen is not None:
            # It outbid us after we outbid it (or it re-sends a version we already met: a flood
            # reaches us over several paths): a live duplicate. Never bump-war; report.
            if not self.conflict:
                self.conflict = (f"another live node uses the id {self.id} (at {a.endpoint}); "
                                 "stop one of them")
            return
        self.incarnation, self.seq = a.incarnation + 1, -1
        self._bump()

    # ------------------------------------------------------------------------ control

    def _request(self, client: ClientId, req: ControlRequest, now: float) -> list[Effect]:
        """A decoded control request; always produces exactly one Respond."""
        try:
            out, body = self._control(client, req, now)
        except ControlError as exc:
            return [Respond(client, Reply(req.rid, False, code=exc.code, message=exc.message))]
        status = isinstance(req, StatusRequest)
        return [*out, Respond(client, Reply(req.rid, True, body), with_runtime_counters=status)]

    def _control(self, client: ClientId, req: ControlRequest, now: float
                 ) -> tuple[list[Effect], dict[str, Any]]:
        match req:
            case StatusRequest():
                return [], self.status(now)
            case NodesRequest():
                return [], {"nodes": self.nodes(now)}
            case WatchRequest():
                self._watchers[client] = now + WATCH_LEASE_S
                return [], self.watch_view(now)
            case SetRequest():
                return self._set(req)
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
        if existing is not None:
            return [], {"sibling": existing.row(), "created": False}
        if len(self.siblings) >= MAX_LINKS_PER_ADVERT:
            raise ControlError(f"{self.id} already has {MAX_LINKS_PER_ADVERT} siblings, the "
                               "most one node may have", "too_many_siblings")
        sib = self.siblings[endpoint] = Sibling(endpoint, expected, next_hello=now)
        out: list[Effect] = [Persist(self.persisted_state()), Connect(endpoint, expected)]
        out.extend(self._send_hellos(now))
        return out, {"sibling": sib.row(), "created": True}

    def _unlink(self, target: str) -> tuple[list[Effect], dict[str, Any]]:
        sib = self._find_sibling(target)
        if sib is None:
            names = ", ".join(s.name for s in self.siblings.values()) or "none"
            raise ControlError(f"{target} is not a sibling of {self.id} (siblings: {names})",
                               "unknown_sibling")
        out: list[Effect] = []
        if sib.up:
            out.append(Send(sib.endpoint, self._bye(ByeReason.UNLINKED)))
        self._remove(sib)
        out += [Disconnect(sib.endpoint), Persist(self.persisted_state())]
        return out, {"unlinked": sib.row()}

    def client_gone(self, client: ClientId) -> None:
        """The runtime could not deliver to this client: it has gone away."""
        self._watchers.pop(client, None)

    # ------------------------------------------------------------------------ time

    def timer(self, now: float) -> list[Effect]:
        """Pings, failure detection, HELLO retries, watcher leases, forgetting. Call when due."""
        out: list[Effect] = []
        cfg = self.config
        for sib in self.siblings.values():
            if sib.state is LinkState.UP and now - sib.last_heard >= cfg.dead_after_s:
                self._transition(sib, LinkState.DOWN, now, retry_at=now)
                self.counters["link_flaps"] += 1
                out.append(Log(LogLevel.WARNING,
                               f"{sib.name} silent for {cfg.dead_after_s:g}s; link down"))
        if now >= self._next_ping:
            self._next_ping = now + cfg.ping_interval_s
            ping = Ping(self.id, self.config.nonce, self.table.hash)
            out.extend(Send(sib.endpoint, ping) for sib in self.siblings.values() if sib.up)
        out.extend(self._send_hellos(now))
        for client, expiry in list(self._watchers.items()):
            if now >= expiry:
                del self._watchers[client]
        if now >= self._next_forget_check:
            self._next_forget_check = now + cfg.forget_after_s / 10
            self.table.forget(now, cfg.forget_after_s)
        return out

    def next_deadline(self) -> float:
        """When `timer` next has something to do (the runtime's poll timeout)."""
        deadline = min(self._next_ping, self._next_forget_check)
        dead_after_s = self.config.dead_after_s
        for sib in self.siblings.values():
            due = sib.last_heard + dead_after_s if sib.state is LinkState.UP else sib.next_hello
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
            out.append(Send(sib.endpoint, self._hello(ack=False, dialed=sib.endpoint)))
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
        slowly after REFUSED). Our advert is bumped iff the link starts or stops counting.
        """
        if state not in TRANSITIONS[sib.state]:
            raise AssertionError(f"link {sib.name}: {sib.state} -> {state} is not a transition")
        was_up = sib.state is LinkState.UP
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
        if was_up != (state is LinkState.UP):
            self._bump()

    def _remove(self, sib: Sibling) -> None:
        """Forget a sibling altogether (unlinked, or it was ourselves)."""
        del self.siblings[sib.endpoint]
        if sib.id is not None and self._by_id.get(sib.id) is sib:
            del self._by_id[sib.id]
        if sib.up:
            self._bump()

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
        """One batched `adverts` message per sibling, then the view if it changed."""
        out: list[Effect] = []
        shared: Adverts | None = None
        for sib in self.siblings.values():
            outbox = sib.outbox
            if not outbox:
                continue
            if sib.state is LinkState.UP:
                adverts = tuple(outbox.values())
                if len(adverts) <= MAX_ADVERTS_PER_MESSAGE:
                    # A flood queues the same adverts for most siblings: one message object
                    # for all of them lets the runtime encode it once.
                    if shared is None or not _same(shared.adverts, adverts):
                        shared = Adverts(self.id, self.config.nonce, adverts)
                    out.append(Send(sib.endpoint, shared))
                else:
                    out.extend(Send(sib.endpoint, Adverts(self.id, self.config.nonce, chunk))
                               for chunk in _chunks(adverts, MAX_ADVERTS_PER_MESSAGE))
            outbox.clear()
        if self.config.track_view or self._watchers:
            units = self.table.exact_units(now)
            key = (units[0], units[1], self.table.island(now))
            if key != self._published:
                self._published = key
                out.append(Publish(self.watch_view(now), tuple(self._watchers)))
        return out

    def _bump(self) -> None:
        """Publish a new version of our own advert (values or links changed)."""
        self.seq += 1
        links = tuple(sorted(sib.id for sib in self.siblings.values()
                             if sib.state is LinkState.UP and sib.id is not None))
        advert = Advert(self.id, self.incarnation, self.seq, self.production, self.consumption,
                        links, self.config.endpoint, self.config.nonce)
        self.table.put(advert)
        for sib in self.siblings.values():
            if sib.state is LinkState.UP:
                sib.outbox[self.id] = advert

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
                "island": sorted(island)}

    def status(self, now: float) -> dict[str, Any]:
        view = self.watch_view(now)
        return {
            **view,
            "endpoint": self.config.endpoint,
            "production": self.production,
            "consumption": self.consumption,
            "net": self.production - self.consumption,
            "incarnation": self.incarnation,
            "seq": self.seq,
            "siblings": [s.row() for s in self.siblings.values()],
            "known_nodes": len(self.table),
            "conflict": self.conflict,
            "counters": dict(self.counters),
        }

    def nodes(self, now: float) -> list[dict[str, Any]]:
        island = self.table.island(now)
        return [{"id": a.origin, "production": a.production, "consumption": a.consumption,
                 "net": a.net, "reachable": a.origin in island, "endpoint": a.endpoint,
                 "incarnation": a.incarnation, "seq": a.seq, "links": list(a.links)}
                for a in sorted(self.table, key=lambda a: a.origin)]

    def sibling(self, name: str) -> Sibling | None:
        """A sibling by endpoint or id (None if there is no such sibling)."""
        return self._find_sibling(name)

    # ------------------------------------------------------------------------ messages

    def _hello(self, ack: bool, dialed: str) -> Hello:
        return Hello(self.id, self.config.nonce, self.config.endpoint, ack, self.table.digest(),
                     dialed)

    def _bye(self, reason: ByeReason) -> Bye:
        return Bye(self.id, self.config.nonce, reason)


