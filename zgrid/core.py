"""The zgrid protocol as a sans-IO state machine: events and the current time in, effects out.

Theory of operation
===================

Every node holds a table of *adverts*, one per node it has ever heard of (like the link-state
database of OSPF). An advert is written only by its origin and is versioned by
(incarnation, seq): incarnation grows on every restart of the origin, seq on every change.
A received advert replaces the stored one iff its version is greater, so the table converges
whatever order messages arrive in, and duplicates are harmless.

Flooding: an advert that was new to us is queued for every UP sibling except the one it came
from. Queues are per sibling and keyed by origin, so a burst of changes from one origin
coalesces to its newest version; `flush()` (called by the runtime once the mailbox is drained)
sends one batched `adverts` message per sibling.

Links: `link` makes us send HELLO; the receiver records us as a sibling, dials back, and
answers with a HELLO ack. Each side marks the link UP when it hears the other's HELLO, then
bumps its own advert (its `links` changed). A link is an edge of the grid only if *both*
adverts list each other (the two-way check), so a node that died or unlinked disappears as
soon as one side stops listing it. A node's *island* is everything reachable over such edges.

Totals: production and consumption of every island member are kept as exact integers in units
of 2**-1074 kW (every finite double is such an integer). Their sum is exact and independent of
order, and integer true division rounds correctly, so `total_net` is bit-identical on every
member of an island and equals `math.fsum` of the members' production and -consumption. A
production/consumption change costs O(1); the island is recomputed (O(N)) only when some
advert's `links` changed, and lazily, when a view is read.

Liveness: UP siblings ping each other every `ping_interval_s`; any message counts as life. A
sibling silent for `dead_after_s` goes DOWN (we drop it from our links and re-flood), and we
keep sending it HELLO with backoff until it answers. Only siblings watch each other.

Anti-entropy: HELLO carries a digest {origin: version}; the receiver sends what the sender
lacks. Pings carry a hash of the table; two mismatches in a row trigger a digest exchange.
This repairs lost messages, partitions and restarts without any global step.

Identity: each process has a random nonce. An advert about *us* that is newer than ours comes
from our past life (data dir wiped) or from a duplicate: we bump above it once per foreign
nonce; if the same foreign nonce then outbids us again, it is alive, and we report a conflict
instead of joining an endless bump war. A HELLO from an id that is alive elsewhere in our
island (other nonce, other endpoint) is refused with BYE duplicate_id.

This module must never import zmq, time, os or anything that does I/O: the runtime (node.py)
and the simulator (sim.py) drive it and perform the effects it returns.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeAlias

from zgrid.errors import ControlError, ProtocolError
from zgrid.wire import (
    MAX_ADVERTS_PER_MESSAGE,
    MAX_LINKS_PER_ADVERT,
    Advert,
    Adverts,
    Bye,
    ByeReason,
    ControlRequest,
    Digest,
    DigestMsg,
    Hello,
    LinkRequest,
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

# Exact totals: every finite double is an integer multiple of 2**-1074.
_UNIT_EXP = 1074
_UNIT_SCALE = 1 << _UNIT_EXP

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


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


ClientId: TypeAlias = tuple[bytes, ...]  # a control client's routing envelope, opaque here


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


@dataclass(frozen=True, slots=True)
class PersistedState:
    """What a node keeps on disk: enough to come back as itself after a crash."""

    node_id: str
    incarnation: int
    production: float
    consumption: float
    siblings: tuple[str, ...]  # "ID@ENDPOINT" once the id is known, else "ENDPOINT"


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
    client: ClientId
    reply: Reply


@dataclass(frozen=True, slots=True)
class Publish:
    """The view changed: log it, and push it (stamped with wall time) to every watcher."""

    view: Mapping[str, Any]
    watchers: tuple[ClientId, ...]


@dataclass(frozen=True, slots=True)
class Persist:
    """Make this durable before performing any later effect (replies acknowledge it)."""

    state: PersistedState


@dataclass(frozen=True, slots=True)
class Log:
    level: LogLevel
    text: str


Effect: TypeAlias = Send | SendOnce | Connect | Disconnect | Respond | Publish | Persist | Log

# ------------------------------------------------------------------------------------ helpers


def _units(kw: float) -> int:
    numerator, denominator = kw.as_integer_ratio()
    return numerator << (_UNIT_EXP + 1 - denominator.bit_length())


def _from_units(units: int) -> float:
    return units / _UNIT_SCALE  # int / int is correctly rounded, whatever the size


def _entry_hash(a: Advert) -> int:
    # Python's hash() of a str differs between processes; the table hash must not.
    key = f"{a.origin}\x00{a.incarnation}\x00{a.seq}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def _chunks(items: list[Advert], size: int) -> Iterator[tuple[Advert, ...]]:
    for start in range(0, len(items), size):
        yield tuple(items[start:start + size])


@dataclass(slots=True)
class _Sibling:
    endpoint: str  # as dialed: our DEALER connects here
    expected_id: str | None  # from ID@ENDPOINT: the peer must report this id
    id: str | None = None
    nonce: int | None = None
    state: LinkState = LinkState.CONNECTING
    last_heard: float = float("-inf")
    next_hello: float = 0.0
    hello_backoff_s: float = HELLO_RETRY_MIN_S
    error: str = ""
    hash_mismatches: int = 0

    @property
    def address(self) -> str:
        known = self.id or self.expected_id
        return f"{known}@{self.endpoint}" if known else self.endpoint

    @property
    def name(self) -> str:
        return self.id or self.expected_id or self.endpoint


class Core:
    """One node's protocol state. Not thread-safe by design: it is an actor's private state."""

    def __init__(self, config: Config, restored: PersistedState | None = None) -> None:
        self.config = config
        self.id = config.node_id
        self.incarnation = restored.incarnation + 1 if restored else 1
        self.seq = 0
        self.production = restored.production if restored else 0.0
        self.consumption = restored.consumption if restored else 0.0
        self.siblings: dict[str, _Sibling] = {}
        for address in restored.siblings if restored else ():
            expected, endpoint = parse_sibling_address(address)
            self.siblings[endpoint] = _Sibling(endpoint, expected)
        self.adverts: dict[str, Advert] = {}
        self.table_hash = 0
        # Counters are shared with the runtime, which adds what only it can see (bytes, drops).
        self.counters: dict[str, int] = {
            "messages_received": 0, "messages_sent": 0, "bytes_sent": 0, "bad_frames": 0,
            "ignored": 0, "adverts_received": 0, "adverts_accepted": 0, "sends_dropped": 0,
            "link_flaps": 0, "digests_sent": 0,
        }
        self.conflict = ""
        self._outbox: dict[str, dict[str, Advert]] = {}
        self._island: frozenset[str] = frozenset({self.id})
        self._island_dirty = True
        self._units_production = 0
        self._units_consumption = 0
        self._unreachable_since: dict[str, float] = {}
        self._tombstones: dict[str, tuple[tuple[int, int], float]] = {}
        self._foreign_nonces: dict[int, tuple[int, int]] = {}
        self._watchers: dict[ClientId, float] = {}
        self._published: tuple[int, int, frozenset[str]] | None = None
        self._next_ping = 0.0
        self._next_forget_check = config.forget_after_s / 10
        self._last_bad_log = float("-inf")
        self._bad_since_log = 0
        self._bump()

    # ------------------------------------------------------------------------ lifecycle

    def start(self, now: float) -> list[Effect]:
        """First effects of a process: persist the new incarnation, dial every known sibling."""
        out: list[Effect] = [Persist(self.persisted_state())]
        for sib in self.siblings.values():
            out.append(Connect(sib.endpoint, sib.expected_id))
            sib.next_hello = now
        self._next_ping = now + self.config.ping_interval_s
        self._next_forget_check = now + self.config.forget_after_s / 10
        out.extend(self.timer(now))
        return out

    def stop(self, now: float) -> list[Effect]:
        """Say goodbye: a stopped node cannot flood, so its siblings must drop it themselves."""
        out: list[Effect] = []
        for sib in self.siblings.values():
            if sib.state is LinkState.UP:
                out.append(Send(sib.endpoint, self._bye(ByeReason.STOPPING)))
        out.extend(Disconnect(sib.endpoint) for sib in self.siblings.values())
        return out

    def persisted_state(self) -> PersistedState:
        return PersistedState(self.id, self.incarnation, self.production, self.consumption,
                              tuple(sib.address for sib in self.siblings.values()))

    # ------------------------------------------------------------------------ peer messages

    def receive(self, msg: PeerMessage, now: float, authenticated_as: str | None = None
                ) -> list[Effect]:
        """A decoded message from another node. `authenticated_as`: the CURVE key's owner."""
        self.counters["messages_received"] += 1
        if authenticated_as is not None and authenticated_as != msg.sender:
            self.counters["ignored"] += 1
            return [Log(LogLevel.WARNING, f"dropped a {type(msg).__name__.lower()} claiming to "
                        f"be from {msg.sender!r} but signed by {authenticated_as!r}")]
        if isinstance(msg, Hello):
            return self._on_hello(msg, now)
        sib = self._sibling_by_id(msg.sender)
        if isinstance(msg, Bye):
            return self._on_bye(msg, sib, now)
        if sib is None or sib.state is not LinkState.UP or sib.nonce != msg.nonce:
            # Not (or no longer) our sibling, or its past life: only HELLO may (re)open a link.
            self.counters["ignored"] += 1
            return []
        sib.last_heard = now
        match msg:
            case Adverts():
                incarnation = self.incarnation
                for advert in msg.adverts:
                    self._learn(advert, now, source=sib.endpoint)
                if self.incarnation != incarnation:  # we outbid a past life: never reuse it
                    return [Persist(self.persisted_state())]
                return []
            case Ping():
                return self._on_ping(msg, sib)
            case DigestMsg():
                return self._on_digest(msg.entries, msg.reply, sib)
        raise AssertionError(f"unhandled message {msg!r}")

    def _on_hello(self, msg: Hello, now: float) -> list[Effect]:
        if msg.sender == self.id:
            if msg.nonce == self.config.nonce:  # we dialed ourselves under another name
                out: list[Effect] = [
                    Log(LogLevel.WARNING, f"{msg.dialed} is this node itself; not linked")]
                if self.siblings.pop(msg.dialed, None) is not None:
                    out += [Disconnect(msg.dialed), Persist(self.persisted_state())]
                return out
            return self._refuse_duplicate(msg, f"this node ({self.id}) is alive")
        known = self.adverts.get(msg.sender)
        if (known is not None and known.nonce != msg.nonce and known.endpoint != msg.endpoint
                and msg.sender in self._current_island(now)):
            return self._refuse_duplicate(
                msg, f"{msg.sender} is alive at {known.endpoint}")

        out = []
        sib = self._sibling_by_id(msg.sender)
        if sib is None and msg.ack and msg.dialed:
            sib = self.siblings.get(msg.dialed)
        if sib is None:
            sib = self.siblings.get(msg.endpoint)
        if sib is None:
            if len(self.siblings) >= MAX_LINKS_PER_ADVERT:
                return self._refuse(msg, f"{self.id} already has {MAX_LINKS_PER_ADVERT} siblings")
            sib = self.siblings[msg.endpoint] = _Sibling(msg.endpoint, None)
            out.append(Connect(msg.endpoint, msg.sender))
            out.append(Log(LogLevel.INFO, f"{msg.sender} ({msg.endpoint}) asked to link"))
        if sib.expected_id is not None and sib.expected_id != msg.sender:
            sib.state, sib.error = LinkState.REFUSED, (
                f"expected node {sib.expected_id} at {sib.endpoint}, found {msg.sender}")
            sib.next_hello = now + REFUSED_RETRY_S
            return [*out, Log(LogLevel.ERROR, sib.error)]

        id_learned = sib.id is None
        restarted = sib.nonce is not None and sib.nonce != msg.nonce
        was_up = sib.state is LinkState.UP
        sib.id, sib.nonce, sib.last_heard = msg.sender, msg.nonce, now
        sib.state, sib.error, sib.hash_mismatches = LinkState.UP, "", 0
        sib.hello_backoff_s = HELLO_RETRY_MIN_S
        if sib.endpoint in self._outbox and restarted:
            del self._outbox[sib.endpoint]
        if self.conflict and msg.ack:
            self.conflict = ""
        if not msg.ack:
            out.append(Send(sib.endpoint, self._hello(ack=True, dialed=msg.dialed)))
        out.extend(self._on_digest(msg.digest, False, sib))
        if id_learned:
            out.append(Persist(self.persisted_state()))
        if not was_up:
            out.append(Log(LogLevel.INFO, f"link to {sib.id} is up"))
            self._bump()
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

    def _on_bye(self, msg: Bye, sib: _Sibling | None, now: float) -> list[Effect]:
        if sib is None and msg.dialed:
            sib = self.siblings.get(msg.dialed)
        if sib is None or (sib.nonce is not None and sib.nonce != msg.nonce):
            self.counters["ignored"] += 1
            return []
        was_up = sib.state is LinkState.UP
        out: list[Effect] = []
        match msg.reason:
            case ByeReason.UNLINKED:
                self._remove_sibling(sib)
                out += [Disconnect(sib.endpoint), Persist(self.persisted_state()),
                        Log(LogLevel.INFO, f"{sib.name} unlinked us")]
            case ByeReason.DUPLICATE_ID | ByeReason.REFUSED:
                sib.state, sib.error = LinkState.REFUSED, msg.detail or str(msg.reason)
                sib.next_hello = now + REFUSED_RETRY_S
                if msg.reason is ByeReason.DUPLICATE_ID:
                    self.conflict = f"{msg.sender} refused us: {sib.error}"
                out.append(Log(LogLevel.ERROR, f"{msg.sender} refused the link: {sib.error}"))
            case _:
                if was_up:
                    sib.state, sib.next_hello = LinkState.DOWN, now + HELLO_RETRY_MIN_S
                    sib.hello_backoff_s = HELLO_RETRY_MIN_S
                    out.append(Log(LogLevel.INFO, f"{sib.name} said goodbye; link down"))
        if was_up and (sib.state is not LinkState.UP or sib.endpoint not in self.siblings):
            self._bump()
        return out

    def _on_ping(self, msg: Ping, sib: _Sibling) -> list[Effect]:
        if msg.table_hash == self.table_hash:
            sib.hash_mismatches = 0
            return []
        sib.hash_mismatches += 1
        if sib.hash_mismatches < HASH_MISMATCHES_BEFORE_DIGEST:
            return []
        sib.hash_mismatches = 0
        self.counters["digests_sent"] += 1
        return [Send(sib.endpoint, DigestMsg(self.id, self.config.nonce, self.digest(), True))]

    def _on_digest(self, theirs: Digest, reply: bool, sib: _Sibling) -> list[Effect]:
        """Queue what the sibling lacks; ask for what we lack by sending our digest back."""
        queue = self._outbox.setdefault(sib.endpoint, {})
        for origin, advert in self.adverts.items():
            version = theirs.get(origin)
            if version is None or version < advert.version:
                queue[origin] = advert
        if not reply:
            return []
        for origin, version in theirs.items():
            mine = self.adverts.get(origin)
            if mine is None or mine.version < version:
                self.counters["digests_sent"] += 1
                return [Send(sib.endpoint,
                             DigestMsg(self.id, self.config.nonce, self.digest(), False))]
        return []

    def _learn(self, a: Advert, now: float, source: str | None) -> None:
        # The hot path of the whole protocol (every advert of every message): keep it lean.
        counters = self.counters
        counters["adverts_received"] += 1
        origin = a.origin
        old = self.adverts.get(origin)
        if old is not None:
            if a.incarnation < old.incarnation or (
                    a.incarnation == old.incarnation and a.seq <= old.seq):
                return
            if origin == self.id:
                self._learn_about_self(a)
                return
        else:
            tomb = self._tombstones.get(origin)
            if tomb is not None and a.version <= tomb[0]:
                return  # forgotten on purpose: a sibling's stale copy must not resurrect it
            if len(self.adverts) >= self.config.max_nodes:
                counters["ignored"] += 1
                return
        counters["adverts_accepted"] += 1
        self._store(a, old)
        outbox = self._outbox
        for endpoint, sib in self.siblings.items():
            if sib.state is LinkState.UP and endpoint != source:
                queue = outbox.get(endpoint)
                if queue is None:
                    queue = outbox[endpoint] = {}
                queue[origin] = a

    def _learn_about_self(self, a: Advert) -> None:
        if a.nonce == self.config.nonce or a.version <= (self.incarnation, self.seq):
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

    def request(self, client: ClientId, req: ControlRequest, now: float) -> list[Effect]:
        """A decoded control request; always produces exactly one Respond."""
        try:
            out, body = self._control(client, req, now)
        except ControlError as exc:
            return [Respond(client, Reply(req.rid, False, code=exc.code, message=exc.message))]
        return [*out, Respond(client, Reply(req.rid, True, body))]

    def bad_frame(self, client: ClientId, error: ProtocolError, from_peer: bool, now: float
                  ) -> list[Effect]:
        """A frame that failed to decode: answer a control client, drop and count a peer's."""
        if not from_peer:
            return [Respond(client, Reply(None, False, code=error.code, message=error.message))]
        self.counters["bad_frames"] += 1
        self._bad_since_log += 1
        if now - self._last_bad_log < BAD_FRAME_LOG_INTERVAL_S:
            return []
        self._last_bad_log, count, self._bad_since_log = now, self._bad_since_log, 0
        return [Log(LogLevel.WARNING, f"dropped {count} bad frame(s) from peers; latest: "
                    f"{error.message}")]

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
            self._sibling_by_id(expected) if expected else None)
        if existing is not None:
            return [], {"sibling": self._sibling_row(existing), "created": False}
        if len(self.siblings) >= MAX_LINKS_PER_ADVERT:
            raise ControlError(f"{self.id} already has {MAX_LINKS_PER_ADVERT} siblings, the "
                               "most one node may have", "too_many_siblings")
        sib = self.siblings[endpoint] = _Sibling(endpoint, expected, next_hello=now)
        out: list[Effect] = [Persist(self.persisted_state()), Connect(endpoint, expected)]
        out.extend(self._send_hellos(now))
        return out, {"sibling": self._sibling_row(sib), "created": True}

    def _unlink(self, target: str) -> tuple[list[Effect], dict[str, Any]]:
        sib = self._find_sibling(target)
        if sib is None:
            names = ", ".join(s.name for s in self.siblings.values()) or "none"
            raise ControlError(f"{target} is not a sibling of {self.id} (siblings: {names})",
                               "unknown_sibling")
        out: list[Effect] = []
        if sib.state is LinkState.UP:
            out.append(Send(sib.endpoint, self._bye(ByeReason.UNLINKED)))
        self._remove_sibling(sib)
        if sib.state is LinkState.UP:
            self._bump()
        out += [Disconnect(sib.endpoint), Persist(self.persisted_state())]
        return out, {"unlinked": self._sibling_row(sib)}

    def client_gone(self, client: ClientId) -> None:
        """The runtime could not deliver to this client: it has gone away."""
        self._watchers.pop(client, None)

    def revoke(self, member_ids: Iterable[str], now: float) -> list[Effect]:
        """These ids are no longer members of the grid (their keys were removed): drop links."""
        out: list[Effect] = []
        revoked = set(member_ids)
        for sib in self.siblings.values():
            if sib.name in revoked and sib.error != _REVOKED:
                was_up = sib.state is LinkState.UP
                sib.state, sib.error, sib.next_hello = LinkState.REFUSED, _REVOKED, math.inf
                self._outbox.pop(sib.endpoint, None)
                out += [Disconnect(sib.endpoint),
                        Log(LogLevel.WARNING, f"{sib.name} revoked; link dropped")]
                if was_up:
                    self._bump()
        return out

    def restore_members(self, member_ids: Iterable[str], now: float) -> list[Effect]:
        """Revoked siblings whose keys are back may be dialed again."""
        allowed = set(member_ids)
        out: list[Effect] = []
        for sib in self.siblings.values():
            if sib.error == _REVOKED and sib.name in allowed:
                sib.state, sib.error, sib.next_hello = LinkState.DOWN, "", now
                out.append(Connect(sib.endpoint, sib.id or sib.expected_id))
        return out

    # ------------------------------------------------------------------------ time

    def timer(self, now: float) -> list[Effect]:
        """Pings, failure detection, HELLO retries, watcher leases, forgetting. Call when due."""
        out: list[Effect] = []
        cfg = self.config
        for sib in self.siblings.values():
            if sib.state is LinkState.UP and now - sib.last_heard >= cfg.dead_after_s:
                sib.state, sib.next_hello = LinkState.DOWN, now
                sib.hello_backoff_s = HELLO_RETRY_MIN_S
                self.counters["link_flaps"] += 1
                self._outbox.pop(sib.endpoint, None)
                out.append(Log(LogLevel.WARNING,
                               f"{sib.name} silent for {cfg.dead_after_s:g}s; link down"))
                self._bump()
        if now >= self._next_ping:
            self._next_ping = now + cfg.ping_interval_s
            ping = Ping(self.id, self.config.nonce, self.table_hash)
            out.extend(Send(sib.endpoint, ping) for sib in self.siblings.values()
                       if sib.state is LinkState.UP)
        out.extend(self._send_hellos(now))
        for client, expiry in list(self._watchers.items()):
            if now >= expiry:
                del self._watchers[client]
        if now >= self._next_forget_check:
            self._next_forget_check = now + cfg.forget_after_s / 10
            self._forget(now)
        return out

    def next_deadline(self) -> float:
        """When `timer` next has something to do (the runtime's poll timeout)."""
        deadline = min(self._next_ping, self._next_forget_check)
        for sib in self.siblings.values():
            if sib.state is LinkState.UP:
                deadline = min(deadline, sib.last_heard + self.config.dead_after_s)
            else:
                deadline = min(deadline, sib.next_hello)
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

    def _forget(self, now: float) -> None:
        self._current_island(now)
        limit = now - self.config.forget_after_s
        for origin, since in list(self._unreachable_since.items()):
            if since <= limit and origin in self.adverts:
                old = self.adverts.pop(origin)
                self.table_hash ^= _entry_hash(old)
                self._tombstones[origin] = (old.version, now)
                del self._unreachable_since[origin]
        for origin, (_, at) in list(self._tombstones.items()):
            if at <= limit:  # long enough for every stale copy in the grid to be forgotten too
                del self._tombstones[origin]

    # ------------------------------------------------------------------------ flushing

    def flush(self, now: float) -> list[Effect]:
        """One batched `adverts` message per sibling, then the view if it changed."""
        out: list[Effect] = []
        for endpoint, queue in self._outbox.items():
            sib = self.siblings.get(endpoint)
            if not queue or sib is None or sib.state is not LinkState.UP:
                continue
            for chunk in _chunks(list(queue.values()), MAX_ADVERTS_PER_MESSAGE):
                out.append(Send(endpoint, Adverts(self.id, self.config.nonce, chunk)))
        self._outbox.clear()
        if self.config.track_view or self._watchers:
            island = self._current_island(now)
            key = (self._units_production, self._units_consumption, island)
            if key != self._published:
                self._published = key
                out.append(Publish(self.watch_view(now), tuple(self._watchers)))
        return out

    # ------------------------------------------------------------------------ table

    def _bump(self) -> None:
        """Publish a new version of our own advert (values or links changed)."""
        self.seq += 1
        links = tuple(sorted(sib.id for sib in self.siblings.values()
                             if sib.state is LinkState.UP and sib.id is not None))
        advert = Advert(self.id, self.incarnation, self.seq, self.production, self.consumption,
                        links, self.config.endpoint, self.config.nonce)
        old = self.adverts.get(self.id)
        self._store(advert, old)
        for endpoint, sib in self.siblings.items():
            if sib.state is LinkState.UP:
                self._outbox.setdefault(endpoint, {})[self.id] = advert

    def _store(self, a: Advert, old: Advert | None) -> None:
        self.adverts[a.origin] = a
        self._tombstones.pop(a.origin, None)
        if old is not None:
            self.table_hash ^= _entry_hash(old)
        self.table_hash ^= _entry_hash(a)
        if old is None or old.links != a.links:
            if a.links or old is not None:
                self._island_dirty = True
        elif not self._island_dirty and a.origin in self._island:
            self._units_production += _units(a.production) - _units(old.production)
            self._units_consumption += _units(a.consumption) - _units(old.consumption)

    def _current_island(self, now: float) -> frozenset[str]:
        if not self._island_dirty:
            return self._island
        adverts = self.adverts
        seen = {self.id}
        stack = [self.id]
        while stack:
            x = stack.pop()
            for y in adverts[x].links:
                if y not in seen and (ay := adverts.get(y)) is not None and x in ay.links:
                    seen.add(y)
                    stack.append(y)
        self._island = frozenset(seen)
        self._island_dirty = False
        self._units_production = sum(_units(adverts[x].production) for x in seen)
        self._units_consumption = sum(_units(adverts[x].consumption) for x in seen)
        for origin in adverts:
            if origin in seen:
                self._unreachable_since.pop(origin, None)
            else:
                self._unreachable_since.setdefault(origin, now)
        return self._island

    def digest(self) -> dict[str, tuple[int, int]]:
        return {origin: a.version for origin, a in self.adverts.items()}

    # ------------------------------------------------------------------------ views

    def totals(self, now: float) -> tuple[float, float, float]:
        """(total_net, total_production, total_consumption) of our island, exactly rounded."""
        self._current_island(now)
        p, c = self._units_production, self._units_consumption
        return _from_units(p - c), _from_units(p), _from_units(c)

    def watch_view(self, now: float) -> dict[str, Any]:
        island = self._current_island(now)
        total_net, total_production, total_consumption = self.totals(now)
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
            "siblings": [self._sibling_row(s) for s in self.siblings.values()],
            "known_nodes": len(self.adverts),
            "conflict": self.conflict,
            "counters": dict(self.counters),
        }

    def nodes(self, now: float) -> list[dict[str, Any]]:
        island = self._current_island(now)
        return [{"id": a.origin, "production": a.production, "consumption": a.consumption,
                 "net": a.net, "reachable": a.origin in island, "endpoint": a.endpoint,
                 "incarnation": a.incarnation, "seq": a.seq, "links": list(a.links)}
                for a in sorted(self.adverts.values(), key=lambda a: a.origin)]

    def _sibling_row(self, sib: _Sibling) -> dict[str, Any]:
        return {"id": sib.id or sib.expected_id, "endpoint": sib.endpoint,
                "up": sib.state is LinkState.UP, "state": str(sib.state), "error": sib.error}

    # ------------------------------------------------------------------------ siblings

    def _sibling_by_id(self, node_id: str | None) -> _Sibling | None:
        for sib in self.siblings.values():
            if sib.id == node_id:
                return sib
        return None

    def _find_sibling(self, target: str) -> _Sibling | None:
        expected, sep, endpoint = target.partition("@")
        if sep:
            return self.siblings.get(endpoint) or self._sibling_by_id(expected)
        if target in self.siblings:
            return self.siblings[target]
        for sib in self.siblings.values():
            if target in (sib.id, sib.expected_id):
                return sib
        return None

    def _remove_sibling(self, sib: _Sibling) -> None:
        del self.siblings[sib.endpoint]
        self._outbox.pop(sib.endpoint, None)

    def _hello(self, ack: bool, dialed: str) -> Hello:
        return Hello(self.id, self.config.nonce, self.config.endpoint, ack, self.digest(), dialed)

    def _bye(self, reason: ByeReason) -> Bye:
        return Bye(self.id, self.config.nonce, reason)
