"""The wire format: typed messages, and their msgpack encoding, decoding and validation.

This is the only module that touches msgpack. Everything that arrives from a socket goes
through `decode()`, which returns a frozen, fully validated message or raises `ProtocolError`
(and nothing else). It must never let through a value the core could choke on: NaN or infinite
power (one NaN would poison every total in the grid), negative power, oversized strings, lists
or frames, unknown versions or types. See docs/protocol.md for the same rules in prose.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import pairwise
from typing import Any, ClassVar, Final, TypeAlias

import msgpack

from zgrid.errors import ProtocolError

PROTOCOL_VERSION: Final = 1

# Limits. A frame larger than MAX_FRAME_BYTES is refused by ZeroMQ itself (ZMQ_MAXMSGSIZE);
# the rest bound what a single well-formed frame can make a node hold in memory.
MAX_FRAME_BYTES: Final = 4 * 1024 * 1024
MAX_ID_CHARS: Final = 64
MAX_ENDPOINT_CHARS: Final = 256
MAX_REASON_CHARS: Final = 200
MAX_LINKS_PER_ADVERT: Final = 64
# 200 worst-case adverts (64 links of 64 chars) stay under 1 MiB
MAX_ADVERTS_PER_MESSAGE: Final = 200
MAX_DIGEST_ENTRIES: Final = 40_000
MAX_POWER_KW: Final = 1e9  # a terawatt: larger than any single participant of any real grid
# Incarnation and seq: int64 so clients in any language can hold them
MAX_COUNTER: Final = 2**63 - 1
MAX_NONCE: Final = 2**64 - 1
MAX_ABS_PRICE: Final = 1e6  # per kWh: far beyond any market's price cap; catches kWh-vs-MWh typos
# A unix socket path must fit sockaddr_un.sun_path (108 bytes on Linux, NUL included): a longer
# ipc:// path makes ZeroMQ's connect fail, so it is refused as a value, before any socket exists.
MAX_IPC_PATH_BYTES: Final = 107
SIGNATURE_BYTES: Final = 64  # Ed25519
# Signed bytes start with this, so an advert signature can never be replayed as anything else.
SIGNING_CONTEXT: Final = b"zgrid-advert-v1\x00"

_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_ENDPOINT_RE: Final = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):([0-9]{1,5})|ipc://.+")


class MessageType(StrEnum):
    """The `t` field of every frame."""

    # sibling to sibling
    HELLO = "hello"
    ADVERTS = "adverts"
    DIGEST = "digest"
    PING = "ping"
    BYE = "bye"
    # control client to node
    STATUS = "status"
    SET = "set"
    FLEX = "flex"
    LINK = "link"
    UNLINK = "unlink"
    NODES = "nodes"
    GRAPH = "graph"
    WATCH = "watch"
    # node to control client
    REPLY = "reply"
    VIEW = "view"


class ByeReason(StrEnum):
    """Why a sibling says goodbye; each one asks the receiver for a different reaction."""

    STOPPING = "stopping"  # the sender is shutting down: mark the link DOWN now, keep the sibling
    UNLINKED = "unlinked"  # an operator removed the link: forget the sibling
    DUPLICATE_ID = "duplicate_id"  # the receiver's id is already taken by another live node
    REFUSED = "refused"  # not (or no longer) a member of the grid


# ----------------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Flex:
    """A node's (or a device's) offer: how far it can move its net each way, at what price per
    kWh. Up raises its net (discharge, start a generator, shed load); down lowers it (charge,
    curtail PV, switch on a load). A negative price_down: it would pay to go down."""

    flex_up_kw: float = 0.0
    price_up: float = 0.0
    flex_down_kw: float = 0.0
    price_down: float = 0.0

    def __post_init__(self) -> None:
        # A model with a bug must fail here, in its own name, not poison a clearing.
        for name in ("flex_up_kw", "price_up", "flex_down_kw", "price_down"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: must be finite, got {getattr(self, name)!r}")
        for name in ("flex_up_kw", "flex_down_kw"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")

    @property
    def offered(self) -> bool:
        return self.flex_up_kw > 0 or self.flex_down_kw > 0


NO_FLEX: Final = Flex()


def hash64(data: bytes) -> int:
    """blake2b-64 of `data`, read as a little-endian unsigned integer: the construction of
    the table hash and of the clearing hash (docs/protocol.md)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@dataclass(frozen=True, slots=True)
class Advert:
    """One node's self-description; only its origin ever writes one (docs/design.md, rule 1)."""

    origin: str
    incarnation: int
    seq: int
    production: float
    consumption: float
    links: tuple[str, ...]  # sorted ids of the siblings the origin has an UP link with
    endpoint: str
    nonce: int  # random per process: tells a restart (old nonce, silent) from a duplicate id
    signature: bytes = b""  # Ed25519 by the origin over `signed_bytes()`; empty without keys
    flex: Flex | None = None  # Phase II: the origin's offer (None: it offers nothing)
    activation_kw: float = 0.0  # what the origin applies now, from its clearing (+ up, - down)
    # `version_hash()` once computed: one blake2b per advert object, however many tables store
    # it (a flood hands the same object to every node of a simulator). Not on the wire.
    _version_hash: int = field(default=-1, init=False, repr=False, compare=False)

    @property
    def version(self) -> tuple[int, int]:
        return (self.incarnation, self.seq)

    def version_hash(self) -> int:
        """This version's 64-bit share of the table hash (docs/protocol.md): blake2b-64 of
        the UTF-8 bytes of `origin NUL incarnation NUL seq` (decimal), read as a little-endian
        unsigned integer. Python's own hash() of a str differs between processes, so it
        cannot be used here."""
        h = self._version_hash
        if h < 0:
            h = hash64(f"{self.origin}\x00{self.incarnation}\x00{self.seq}".encode())
            object.__setattr__(self, "_version_hash", h)  # a cache: frozen fields stay as they are
        return h

    def signed_bytes(self) -> bytes:
        """What the origin signs: SIGNING_CONTEXT, then the msgpack array of every field but
        the signature, in wire order (floats as float64, the shortest form of every int and
        string: msgpack's own rules), as docs/protocol.md specifies for other implementations.
        """
        row: list[Any] = [self.origin, self.incarnation, self.seq, float(self.production),
                          float(self.consumption), list(self.links), self.endpoint, self.nonce]
        if self.flex is not None:
            row.append(_flex_row(self))
        packed: bytes = msgpack.packb(row, use_bin_type=True)
        return SIGNING_CONTEXT + packed

    @property
    def net(self) -> float:
        return self.production - self.consumption


Digest: TypeAlias = Mapping[str, tuple[int, int]]


@dataclass(frozen=True, slots=True)
class Hello:
    """Asks for a link (ack=False) or accepts one (ack=True); carries a digest for resync."""

    sender: str
    nonce: int
    endpoint: str
    ack: bool
    digest: Digest = field(default_factory=dict)
    dialed: str = ""  # request: the endpoint the sender dialed; ack: echoed from the request
    # request: a challenge only the node at `dialed` can see; ack: echoed from the request, so
    # it proves that the acknowledging node receives at the endpoint the requester dialed
    token: int = 0
    linking: bool = False  # request: the sender's operator asked for this link (`link`)


class Record:
    """What a frozen dataclass gives besides its `__init__`: equality, a hash and a repr, by
    the fields `__match_args__` names. For the classes made once per message (`Adverts`,
    `core.Send`): mypyc compiles their own `__init__` but leaves the one a dataclass generates
    interpreted (about 380 ns a construction against 30 ns; 14 % of a simulation's
    instructions). Their `Final` fields are read-only when compiled, as frozen ones are (mypy
    refuses any assignment to them anywhere)."""

    __slots__ = ()
    __match_args__: ClassVar[tuple[str, ...]] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__match_args__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__match_args__)
        return f"{type(self).__name__}({fields})"


class Adverts(Record):
    """A batch of adverts from the sibling `sender` (its process `nonce`); a `Record`, not a
    dataclass like the other messages, for speed alone."""

    __slots__ = ("adverts", "nonce", "sender")
    __match_args__ = ("sender", "nonce", "adverts")

    def __init__(self, sender: str, nonce: int, adverts: tuple[Advert, ...]) -> None:
        self.sender: Final = sender
        self.nonce: Final = nonce
        self.adverts: Final = adverts


@dataclass(frozen=True, slots=True)
class DigestMsg:
    """Anti-entropy: what the sender holds; `reply` asks for the receiver's digest back."""

    sender: str
    nonce: int
    entries: Digest
    reply: bool


@dataclass(frozen=True, slots=True)
class Ping:
    sender: str
    nonce: int
    table_hash: int


@dataclass(frozen=True, slots=True)
class Bye:
    sender: str
    nonce: int
    reason: ByeReason
    dialed: str = ""  # on a refusal: the `dialed` of the refused HELLO, so the peer can match it
    detail: str = ""  # on a refusal: why, for the refused operator


PeerMessage: TypeAlias = Hello | Adverts | DigestMsg | Ping | Bye


@dataclass(frozen=True, slots=True)
class StatusRequest:
    rid: int | None = None


@dataclass(frozen=True, slots=True)
class SetRequest:
    production: float | None = None
    consumption: float | None = None
    rid: int | None = None


@dataclass(frozen=True, slots=True)
class FlexRequest:
    """Change this node's plain offer; fields left None keep their value."""

    flex_up_kw: float | None = None
    price_up: float | None = None
    flex_down_kw: float | None = None
    price_down: float | None = None
    rid: int | None = None


@dataclass(frozen=True, slots=True)
class LinkRequest:
    endpoint: str  # "tcp://host:port" or "ID@tcp://host:port"
    rid: int | None = None


@dataclass(frozen=True, slots=True)
class UnlinkRequest:
    sibling: str  # an endpoint or a node id
    rid: int | None = None


@dataclass(frozen=True, slots=True)
class NodesRequest:
    rid: int | None = None


@dataclass(frozen=True, slots=True)
class GraphRequest:
    """Read-only: every known node with its island, and every link as an edge with its state."""

    rid: int | None = None


@dataclass(frozen=True, slots=True)
class WatchRequest:
    rid: int | None = None


ControlRequest: TypeAlias = (
    StatusRequest | SetRequest | FlexRequest | LinkRequest | UnlinkRequest | NodesRequest
    | GraphRequest | WatchRequest
)


@dataclass(frozen=True, slots=True)
class Reply:
    """The one reply to a control request: ok with a body, or an error with code and message."""

    rid: int | None
    ok: bool
    body: Mapping[str, Any] = field(default_factory=dict)
    code: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class ViewUpdate:
    """Pushed to `watch` clients when the node's view of its island changes."""

    view: Mapping[str, Any]
    ts: float  # wall-clock unix seconds, stamped by the runtime when it sent the update


Message: TypeAlias = PeerMessage | ControlRequest | Reply | ViewUpdate

PEER_TYPES: Final = frozenset(
    {MessageType.HELLO, MessageType.ADVERTS, MessageType.DIGEST, MessageType.PING, MessageType.BYE}
)

# The `t` each message class is sent with (the encoder's and the metrics' one table).
MESSAGE_TYPES: Final[Mapping[type, MessageType]] = {
    Hello: MessageType.HELLO, Adverts: MessageType.ADVERTS, DigestMsg: MessageType.DIGEST,
    Ping: MessageType.PING, Bye: MessageType.BYE, StatusRequest: MessageType.STATUS,
    SetRequest: MessageType.SET, FlexRequest: MessageType.FLEX, LinkRequest: MessageType.LINK,
    UnlinkRequest: MessageType.UNLINK, NodesRequest: MessageType.NODES,
    GraphRequest: MessageType.GRAPH, WatchRequest: MessageType.WATCH, Reply: MessageType.REPLY,
    ViewUpdate: MessageType.VIEW,
}

# ----------------------------------------------------------------------------------- encoding


def _flex_row(a: Advert) -> list[float]:
    f = a.flex
    assert f is not None
    return [float(f.flex_up_kw), float(f.price_up), float(f.flex_down_kw), float(f.price_down),
            float(a.activation_kw)]


def _advert_row(a: Advert) -> list[Any]:
    row: list[Any] = [a.origin, a.incarnation, a.seq, a.production, a.consumption,
                      list(a.links), a.endpoint, a.nonce]
    if a.flex is not None:  # the 10th element; the 9th is then present, empty if unsigned
        row += [a.signature, _flex_row(a)]
    elif a.signature:
        row.append(a.signature)
    return row


def _digest_map(d: Digest) -> dict[str, list[int]]:
    return {origin: [inc, seq] for origin, (inc, seq) in d.items()}


def to_wire(msg: Message) -> dict[str, Any]:
    """The msgpack-ready map of a message (before packing); the inverse of decode()."""
    v = PROTOCOL_VERSION
    match msg:
        case Hello():
            return {"v": v, "t": "hello", "from": msg.sender, "n": msg.nonce,
                    "endpoint": msg.endpoint, "ack": msg.ack, "digest": _digest_map(msg.digest),
                    "dialed": msg.dialed, "token": msg.token, "linking": msg.linking}
        case Adverts():
            return {"v": v, "t": "adverts", "from": msg.sender, "n": msg.nonce,
                    "adverts": [_advert_row(a) for a in msg.adverts]}
        case DigestMsg():
            return {"v": v, "t": "digest", "from": msg.sender, "n": msg.nonce,
                    "entries": _digest_map(msg.entries), "reply": msg.reply}
        case Ping():
            return {"v": v, "t": "ping", "from": msg.sender, "n": msg.nonce,
                    "hash": msg.table_hash}
        case Bye():
            return {"v": v, "t": "bye", "from": msg.sender, "n": msg.nonce,
                    "reason": str(msg.reason), "dialed": msg.dialed, "detail": msg.detail}
        case StatusRequest() | NodesRequest() | GraphRequest() | WatchRequest():
            return _with_rid({"v": v, "t": str(MESSAGE_TYPES[type(msg)])}, msg.rid)
        case SetRequest():
            out: dict[str, Any] = {"v": v, "t": "set"}
            if msg.production is not None:
                out["production"] = msg.production
            if msg.consumption is not None:
                out["consumption"] = msg.consumption
            return _with_rid(out, msg.rid)
        case FlexRequest():
            flex: dict[str, Any] = {"v": v, "t": "flex"}
            for key, value in (("flex_up", msg.flex_up_kw), ("price_up", msg.price_up),
                               ("flex_down", msg.flex_down_kw), ("price_down", msg.price_down)):
                if value is not None:
                    flex[key] = value
            return _with_rid(flex, msg.rid)
        case LinkRequest():
            return _with_rid({"v": v, "t": "link", "endpoint": msg.endpoint}, msg.rid)
        case UnlinkRequest():
            return _with_rid({"v": v, "t": "unlink", "sibling": msg.sibling}, msg.rid)
        case Reply():
            if msg.ok:
                return _with_rid({"v": v, "t": "reply", "ok": True, **msg.body}, msg.rid)
            error = {"code": msg.code, "message": msg.message}
            return _with_rid({"v": v, "t": "reply", "ok": False, "error": error}, msg.rid)
        case ViewUpdate():
            return {"v": v, "t": "view", "ts": msg.ts, **msg.view}
    raise TypeError(f"not a zgrid message: {msg!r}")


def _with_rid(out: dict[str, Any], rid: int | None) -> dict[str, Any]:
    if rid is not None:
        out["rid"] = rid
    return out


def encode(msg: Message) -> bytes:
    """One message as one msgpack frame."""
    frame: bytes = msgpack.packb(to_wire(msg), use_bin_type=True)
    return frame


# ----------------------------------------------------------------------------------- decoding


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not part of the zgrid protocol")


def decode_raw(frame: bytes) -> Any:
    """msgpack bytes to a plain value, within limits; raises ProtocolError and nothing else."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(
            f"frame of {len(frame)} bytes exceeds the {MAX_FRAME_BYTES} byte limit", "too_large")
    try:
        return msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            ext_hook=_no_ext,
            timestamp=0,
            max_str_len=MAX_FRAME_BYTES,
            max_bin_len=SIGNATURE_BYTES,  # the only binary field is an advert's signature
            max_array_len=MAX_DIGEST_ENTRIES,
            max_map_len=MAX_DIGEST_ENTRIES,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many kinds (ExtraData, StackError, ValueError ...)
        raise ProtocolError(f"frame is not valid msgpack: {type(exc).__name__}: {exc}",
                            "bad_frame") from None


def decode_or_error(frame: bytes) -> Message | ProtocolError:
    """The frame's message, or the ProtocolError saying why it is bad: what `Core.handle`
    takes, since the core (not the runtime) decides what a bad frame gets."""
    try:
        return decode(frame)
    except ProtocolError as exc:
        return exc


def decode(frame: bytes) -> Message:
    """One frame to a validated message; raises ProtocolError (only) on anything wrong."""
    obj = decode_raw(frame)
    if not isinstance(obj, dict):
        raise ProtocolError(f"a frame must be a msgpack map, got {_kind(obj)}", "bad_frame")
    raw_rid = obj.get("rid")
    rid = raw_rid if type(raw_rid) is int and 0 <= raw_rid <= MAX_NONCE else None
    version = obj.get("v")
    if version != PROTOCOL_VERSION:
        got = "no field 'v'" if "v" not in obj else f"version {_shown(version)}"
        raise ProtocolError(f"unsupported protocol version: the frame has {got}; this node "
                            f"speaks version {PROTOCOL_VERSION}", "unsupported_version", rid=rid)
    t = obj.get("t")
    try:
        kind = MessageType(t) if isinstance(t, str) else None
    except ValueError:
        kind = None
    if kind is None:
        what = "has no field 't'" if "t" not in obj else f"has the type {_shown(t)}"
        raise ProtocolError(f"unknown message type: the frame {what}; known types: "
                            f"{', '.join(m.value for m in MessageType)}", "unknown_type",
                            rid=rid)
    try:
        message: Message = _DECODERS[kind](_Fields(obj, kind))
    except ProtocolError as exc:
        raise ProtocolError(exc.message, exc.code, exc.message_type or str(kind),
                            rid=rid) from None
    return message


def _shown(value: Any) -> str:
    """A value for a person: strings quoted, other values as msgpack would name them."""
    if isinstance(value, str):
        return f'"{value[:40]}"'
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "nil"}[value]
    if isinstance(value, int | float):
        return str(value)
    return f"of kind {_kind(value)}"


class _Fields:
    """Typed accessors over one decoded map; each raises ProtocolError naming the bad field."""

    def __init__(self, obj: dict[str, Any], kind: MessageType) -> None:
        self.obj = obj
        self.kind = kind

    def _fail(self, key: str, why: str) -> ProtocolError:
        return ProtocolError(f"{self.kind} message: field {key!r} {why}", "bad_field",
                             str(self.kind))

    def get(self, key: str) -> Any:
        if key not in self.obj:
            raise self._fail(key, "is missing")
        return self.obj[key]

    def node_id(self, key: str) -> str:
        return check_node_id(self.get(key), lambda why: self._fail(key, why))

    def endpoint(self, key: str) -> str:
        return check_endpoint(self.get(key), lambda why: self._fail(key, why))

    def optional_endpoint(self, key: str) -> str:
        if self.obj.get(key) in (None, ""):
            return ""
        return self.endpoint(key)

    def uint(self, key: str, limit: int) -> int:
        return _uint(self.get(key), limit, lambda why: self._fail(key, why))

    def boolean(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            raise self._fail(key, f"must be true or false, got {_kind(value)}")
        return value

    def _refuse(self, key: str, why: str) -> ProtocolError:
        # The one rule (protocol.md): a field missing or of the wrong type is `bad_field`; a
        # number of the right type that is out of range (negative or non-finite power, an
        # absurd price) is `bad_value`.
        return ProtocolError(f"{key} {why}", "bad_value", str(self.kind))

    def _number(self, key: str, what: str) -> float | int | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, f"must be {what}, got {_kind(value)}")
        return value

    def power(self, key: str) -> float | None:
        value = self._number(key, "a number of kW")
        return None if value is None else check_power(value, lambda w: self._refuse(key, w))

    def price(self, key: str) -> float | None:
        value = self._number(key, "a number (price per kWh)")
        return None if value is None else check_price(value, lambda w: self._refuse(key, w))

    def string(self, key: str, max_chars: int) -> str:
        value = self.get(key)
        if not isinstance(value, str) or not 0 < len(value) <= max_chars:
            raise self._fail(key, f"must be a string of 1..{max_chars} characters")
        return value

    def rid(self) -> int | None:
        if self.obj.get("rid") is None:
            return None
        return self.uint("rid", MAX_NONCE)

    def digest(self, key: str) -> dict[str, tuple[int, int]]:
        value = self.get(key)
        if not isinstance(value, dict):
            raise self._fail(key, f"must be a map, got {_kind(value)}")
        out: dict[str, tuple[int, int]] = {}
        for origin, version in value.items():
            def fail(why: str, origin: Any = origin) -> ProtocolError:
                return self._fail(key, f"entry {origin!r} {why}")

            check_node_id(origin, fail)
            if not isinstance(version, list) or len(version) != 2:
                raise fail("must be [incarnation, seq]")
            out[origin] = (_uint(version[0], MAX_COUNTER, fail),
                           _uint(version[1], MAX_COUNTER, fail))
        return out

    def adverts(self, key: str) -> tuple[Advert, ...]:
        rows = self.get(key)
        if not isinstance(rows, list) or len(rows) > MAX_ADVERTS_PER_MESSAGE:
            raise self._fail(key, f"must be a list of at most {MAX_ADVERTS_PER_MESSAGE} adverts")
        return tuple(self._advert(i, row) for i, row in enumerate(rows))

    def _advert(self, i: int, row: Any) -> Advert:
        def fail(why: str) -> ProtocolError:
            return self._fail("adverts", f"item {i} {why}")

        if not isinstance(row, list) or len(row) not in (8, 9, 10):
            raise fail("must be [origin, incarnation, seq, production, consumption, links, "
                       "endpoint, nonce], then optionally a signature and a flex offer")
        origin, inc, seq, production, consumption, links, endpoint, nonce = row[:8]
        signature = row[8] if len(row) >= 9 else b""
        if not isinstance(signature, bytes) or len(signature) not in (0, SIGNATURE_BYTES):
            raise fail(f"signature must be binary of {SIGNATURE_BYTES} bytes")
        flex, activation = (None, 0.0) if len(row) < 10 else _flex_of(row[9], fail)
        if not isinstance(links, list) or len(links) > MAX_LINKS_PER_ADVERT:
            raise fail(f"links must be a list of at most {MAX_LINKS_PER_ADVERT} ids")
        for x in links:
            check_node_id(x, fail)
        # Senders list links sorted and unique; sort (and dedupe) only what is not.
        link_ids = tuple(links) if all(a < b for a, b in pairwise(links)) else tuple(
            sorted(set(links)))
        return Advert(
            origin=check_node_id(origin, fail),
            incarnation=_uint(inc, MAX_COUNTER, fail),
            seq=_uint(seq, MAX_COUNTER, fail),
            production=check_power(production, fail),
            consumption=check_power(consumption, fail),
            links=link_ids,
            endpoint=check_endpoint(endpoint, fail),
            nonce=_uint(nonce, MAX_NONCE, fail),
            signature=signature,
            flex=flex,
            activation_kw=activation,
        )


def _hello(f: _Fields) -> Hello:
    # token and linking are optional: a HELLO without them asks for no proof and no new link
    token = f.uint("token", MAX_NONCE) if f.obj.get("token") is not None else 0
    linking = f.boolean("linking") if f.obj.get("linking") is not None else False
    return Hello(f.node_id("from"), f.uint("n", MAX_NONCE), f.endpoint("endpoint"),
                 f.boolean("ack"), f.digest("digest"), f.optional_endpoint("dialed"), token,
                 linking)


def _adverts(f: _Fields) -> Adverts:
    return Adverts(f.node_id("from"), f.uint("n", MAX_NONCE), f.adverts("adverts"))


def _digest(f: _Fields) -> DigestMsg:
    return DigestMsg(f.node_id("from"), f.uint("n", MAX_NONCE), f.digest("entries"),
                     f.boolean("reply"))


def _ping(f: _Fields) -> Ping:
    return Ping(f.node_id("from"), f.uint("n", MAX_NONCE), f.uint("hash", MAX_NONCE))


def _bye(f: _Fields) -> Bye:
    reason = f.string("reason", MAX_REASON_CHARS)
    try:
        parsed = ByeReason(reason)
    except ValueError:
        parsed = ByeReason.STOPPING  # a newer peer's reason we do not know: treat as a goodbye
    detail = f.obj.get("detail", "")
    if not isinstance(detail, str) or len(detail) > MAX_REASON_CHARS:
        raise f._fail("detail", f"must be a string of at most {MAX_REASON_CHARS} characters")
    return Bye(f.node_id("from"), f.uint("n", MAX_NONCE), parsed, f.optional_endpoint("dialed"),
               detail)


def _set(f: _Fields) -> SetRequest:
    production, consumption = f.power("production"), f.power("consumption")
    if production is None and consumption is None:
        raise ProtocolError("set needs production, consumption or both", "bad_value")
    return SetRequest(production, consumption, f.rid())


def _flex(f: _Fields) -> FlexRequest:
    up, down = f.power("flex_up"), f.power("flex_down")
    price_up, price_down = f.price("price_up"), f.price("price_down")
    if up is None and down is None and price_up is None and price_down is None:
        raise ProtocolError("flex needs flex_up, price_up, flex_down or price_down",
                            "bad_value")
    return FlexRequest(up, price_up, down, price_down, f.rid())


def _flex_of(value: Any, fail: Fail) -> tuple[Flex, float]:
    if not isinstance(value, list) or len(value) != 5:
        raise fail("flex must be [flex_up, price_up, flex_down, price_down, activation]")
    up, price_up, down, price_down, activation = value
    flex = Flex(check_power(up, lambda why: fail(f"flex_up {why}")),
                check_price(price_up, lambda why: fail(f"price_up {why}")),
                check_power(down, lambda why: fail(f"flex_down {why}")),
                check_price(price_down, lambda why: fail(f"price_down {why}")))
    if isinstance(activation, bool) or not isinstance(activation, int | float) or not (
            math.isfinite(activation) and abs(activation) <= MAX_POWER_KW):
        raise fail(f"activation must be a finite number of kW within +-{MAX_POWER_KW:g}")
    return flex, float(activation)


def _link(f: _Fields) -> LinkRequest:
    target = f.string("endpoint", MAX_ID_CHARS + 1 + MAX_ENDPOINT_CHARS)
    parse_sibling_address(target, lambda why: ProtocolError(why, "bad_value"))
    return LinkRequest(target, f.rid())


def _unlink(f: _Fields) -> UnlinkRequest:
    return UnlinkRequest(f.string("sibling", MAX_ID_CHARS + 1 + MAX_ENDPOINT_CHARS), f.rid())


def _reply(f: _Fields) -> Reply:
    ok = f.boolean("ok")
    if ok:
        body = {k: v for k, v in f.obj.items() if k not in ("v", "t", "ok", "rid")}
        return Reply(f.rid(), True, body)
    error = f.get("error")
    if not isinstance(error, dict):
        raise f._fail("error", "must be a map with code and message")
    return Reply(f.rid(), False, {}, str(error.get("code", "")), str(error.get("message", "")))


def _view(f: _Fields) -> ViewUpdate:
    ts = f.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise f._fail("ts", "must be a number")
    return ViewUpdate({k: v for k, v in f.obj.items() if k not in ("v", "t", "ts")}, float(ts))


_DECODERS: Final[dict[MessageType, Any]] = {
    MessageType.HELLO: _hello,
    MessageType.ADVERTS: _adverts,
    MessageType.DIGEST: _digest,
    MessageType.PING: _ping,
    MessageType.BYE: _bye,
    MessageType.STATUS: lambda f: StatusRequest(f.rid()),
    MessageType.SET: _set,
    MessageType.FLEX: _flex,
    MessageType.LINK: _link,
    MessageType.UNLINK: _unlink,
    MessageType.NODES: lambda f: NodesRequest(f.rid()),
    MessageType.GRAPH: lambda f: GraphRequest(f.rid()),
    MessageType.WATCH: lambda f: WatchRequest(f.rid()),
    MessageType.REPLY: _reply,
    MessageType.VIEW: _view,
}

# ---------------------------------------------------------------------------- value checks
# Shared by the decoder, the core (for values typed at a prompt) and the CLI.

Fail: TypeAlias = Any  # a callable taking the reason and returning the exception to raise


def _default_fail(why: str) -> ProtocolError:
    return ProtocolError(why, "bad_value")


def _kind(value: Any) -> str:
    return type(value).__name__


def _uint(value: Any, limit: int, fail: Fail) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise fail(f"must be an integer in 0..{limit}, got {value!r}")
    return value


# Every advert repeats ids and endpoints the node has validated many times before (a grid has
# at most MAX_DIGEST_ENTRIES nodes); remembering the valid ones spares the regex on the hot
# path. Bounded, and only exact `str` values that passed the full check are remembered.
_VALID_IDS: Final[set[str]] = set()
_VALID_ENDPOINTS: Final[set[str]] = set()
_MAX_REMEMBERED: Final = 2 * MAX_DIGEST_ENTRIES


def check_node_id(value: Any, fail: Fail = _default_fail) -> str:
    if type(value) is str and value in _VALID_IDS:
        return value
    if (not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS
            or not _ID_RE.fullmatch(value)):
        raise fail(f"must be a node id (1..{MAX_ID_CHARS} of A-Z a-z 0-9 _ . -, starting with "
                   f"a letter or digit), got {value!r}")
    if type(value) is str and len(_VALID_IDS) < _MAX_REMEMBERED:
        _VALID_IDS.add(value)
    return value


def check_endpoint(value: Any, fail: Fail = _default_fail) -> str:
    if type(value) is str and value in _VALID_ENDPOINTS:
        return value
    if (not isinstance(value, str) or len(value) > MAX_ENDPOINT_CHARS
            or not _ENDPOINT_RE.fullmatch(value)):
        raise fail(f"must be an endpoint like tcp://127.0.0.1:5001, got {value!r}")
    if value.startswith("tcp://") and not 0 < int(value.rsplit(":", 1)[1]) < 65536:
        raise fail(f"has a port out of range 1..65535: {value!r}")
    if value.startswith("ipc://") and len(value[len("ipc://"):].encode()) > MAX_IPC_PATH_BYTES:
        raise fail(f"has an ipc path longer than the {MAX_IPC_PATH_BYTES} bytes a unix socket "
                   f"path may have: {value[:40]!r}...")
    if type(value) is str and len(_VALID_ENDPOINTS) < _MAX_REMEMBERED:
        _VALID_ENDPOINTS.add(value)
    return value


def check_power(value: Any, fail: Fail = _default_fail) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(f"must be a number of kW, got {_kind(value)}")
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= MAX_POWER_KW:
        raise fail(f"must be a finite number of kW in 0..{MAX_POWER_KW:g}, got {value!r}")
    return number


def check_price(value: Any, fail: Fail = _default_fail) -> float:
    """A price per kWh: finite, within +-MAX_ABS_PRICE (negative: paid to take energy)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(f"must be a number (price per kWh), got {_kind(value)}")
    number = float(value)
    if not math.isfinite(number) or abs(number) > MAX_ABS_PRICE:
        raise fail(f"must be a finite price within +-{MAX_ABS_PRICE:g} per kWh, got {value!r}")
    return number


def parse_sibling_address(text: str, fail: Fail = _default_fail) -> tuple[str | None, str]:
    """`tcp://host:port` or `ID@tcp://host:port` to (expected id or None, endpoint)."""
    expected, sep, endpoint = text.partition("@")
    if not sep:
        return None, check_endpoint(text, fail)
    return check_node_id(expected, fail), check_endpoint(endpoint, fail)
