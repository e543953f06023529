"""The ZeroMQ runtime of one node: sockets, the poll loop, the clock, the disk, signals.

It is deliberately thin. It moves bytes between sockets and `zgrid.core.Core`, tells the core
what time it is, and performs the effects the core returns, in order (a `Persist` before the
`Respond` that acknowledges it). It must never decide anything about the protocol itself: no
merging, no link states, no totals. Those live in core.py, where the simulator runs them too.

One ROUTER is bound for everything inbound (siblings and control clients alike); one DEALER
per sibling carries everything outbound. The single-threaded `zmq.Poller` loop is the actor's
mailbox: frames are handled one at a time, so the core needs no locks.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import random
import signal
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import zmq

from zgrid.core import (
    ClientId,
    Config,
    Connect,
    Core,
    Disconnect,
    Effect,
    Log,
    LogLevel,
    Persist,
    PersistedState,
    Publish,
    Respond,
    Send,
    SendOnce,
)
from zgrid.errors import ProtocolError, ZgridError
from zgrid.store import Store
from zgrid.wire import (
    MAX_FRAME_BYTES,
    Adverts,
    Bye,
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
    ViewUpdate,
    WatchRequest,
    decode,
    encode,
    parse_sibling_address,
)

log = logging.getLogger("zgrid.node")

MAX_DRAIN_FRAMES = 1000  # per loop turn, so one burst cannot delay flushes and timers unboundedly
SIBLING_SNDHWM_MSGS = 1000  # a slow sibling costs at most this much queue; then we drop
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 5000
HANDSHAKE_IVL_MS = 5000
CLOSE_LINGER_MS = 200  # long enough for a BYE to leave before its socket closes
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_LOG_LEVELS = {LogLevel.DEBUG: logging.DEBUG, LogLevel.INFO: logging.INFO,
               LogLevel.WARNING: logging.WARNING, LogLevel.ERROR: logging.ERROR}

_PEER_MESSAGES = (Hello, Adverts, DigestMsg, Ping, Bye)
_CONTROL_REQUESTS = (StatusRequest, SetRequest, LinkRequest, UnlinkRequest, NodesRequest,
                     WatchRequest)


@dataclass(frozen=True)
class NodeSettings:
    node_id: str
    bind: str
    advertise: str | None = None  # endpoint others dial; defaults to `bind`
    siblings: tuple[str, ...] = ()
    production: float = 0.0
    consumption: float = 0.0
    data_dir: Path | None = None  # default ./.zgrid/<id>
    ping_interval_s: float = 0.25
    dead_after_s: float = 1.0
    forget_after_s: float = 600.0
    keys_dir: Path | None = None
    drop_rate: float = 0.0  # testing only: drop this fraction of outgoing `adverts` messages

    @property
    def endpoint(self) -> str:
        return self.advertise or self.bind


class StartupError(ZgridError):
    """The node cannot start (bind failed, data dir in use ...): a one-line message, exit 2."""

    code = "startup"


class Node:
    """One running node. `run()` blocks until SIGINT/SIGTERM, then says goodbye and returns."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self._ctx = zmq.Context()
        self._dealers: dict[str, zmq.Socket[bytes]] = {}
        self._random = random.Random()
        self._signals: list[int] = []
        self._store = self._open_store()
        try:
            restored = self._restored_state()
            self._router = self._bind_router()
        except BaseException:
            self._store.close()
            self._ctx.destroy(linger=0)
            raise
        config = Config(
            node_id=settings.node_id,
            endpoint=settings.endpoint,
            nonce=random.SystemRandom().getrandbits(64),
            ping_interval_s=settings.ping_interval_s,
            dead_after_s=settings.dead_after_s,
            forget_after_s=settings.forget_after_s,
        )
        self.core = Core(config, restored)

    # ------------------------------------------------------------------------ setup

    def _open_store(self) -> Store:
        data_dir = self.settings.data_dir or Path(".zgrid") / self.settings.node_id
        try:
            return Store.open(data_dir, self.settings.node_id)
        except ZgridError as exc:
            raise StartupError(exc.message) from None

    def _restored_state(self) -> PersistedState:
        """Saved state wins; command-line values only seed a new node. Siblings are merged."""
        s = self.settings
        saved = self._store.load()
        for address in s.siblings:
            parse_sibling_address(address, lambda why: StartupError(f"--sibling {why}"))
        if saved is None:
            return PersistedState(s.node_id, 0, s.production, s.consumption, s.siblings)
        endpoints = {parse_sibling_address(a)[1] for a in saved.siblings}
        extra = tuple(a for a in s.siblings if parse_sibling_address(a)[1] not in endpoints)
        return replace(saved, siblings=saved.siblings + extra)

    def _bind_router(self) -> zmq.Socket[bytes]:
        router: zmq.Socket[bytes] = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDTIMEO, 0)
        router.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        try:
            router.bind(self.settings.bind)
        except zmq.ZMQError as exc:
            router.close(linger=0)
            raise StartupError(f"cannot bind {self.settings.bind}: {exc.strerror}") from None
        return router

    def _dealer(self, endpoint: str, immediate: bool) -> zmq.Socket[bytes]:
        dealer: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.IMMEDIATE, 1 if immediate else 0)
        dealer.setsockopt(zmq.SNDHWM, SIBLING_SNDHWM_MSGS)
        dealer.setsockopt(zmq.SNDTIMEO, 0)
        dealer.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        dealer.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        dealer.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        dealer.connect(endpoint)
        return dealer

    # ------------------------------------------------------------------------ the loop

    def run(self) -> None:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        previous_fd = signal.set_wakeup_fd(wake_w.fileno())
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (*STOP_SIGNALS, signal.SIGHUP)}
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        log.info("%s listening on %s", self.settings.node_id, self.settings.bind)
        if self.settings.keys_dir is None and not _is_loopback(self.settings.bind):
            log.warning("plain TCP on %s, which is not a loopback address: anyone who can "
                        "reach it can control this node; use --keys", self.settings.bind)
        try:
            self._perform(self.core.start(time.monotonic()))
            while not any(sig in STOP_SIGNALS for sig in self._signals):
                timeout_ms = max(0, math.ceil((self.core.next_deadline() - time.monotonic())
                                              * 1000))
                ready = dict(poller.poll(timeout_ms))
                if wake_r.fileno() in ready:
                    self._drain_wakeups(wake_r)
                if self._router in ready:
                    self._drain_router()
                now = time.monotonic()
                if now >= self.core.next_deadline():
                    self._perform(self.core.timer(now))
                self._perform(self.core.flush(now))
            log.info("%s stopping", self.settings.node_id)
            self._perform(self.core.stop(time.monotonic()))
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()
            self.close()

    def close(self) -> None:
        for dealer in self._dealers.values():
            dealer.close(linger=CLOSE_LINGER_MS)
        self._dealers.clear()
        self._router.close(linger=0)
        self._ctx.term()  # waits at most CLOSE_LINGER_MS for goodbyes still in flight
        self._store.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)  # the wakeup fd makes the poll return at once

    def _drain_wakeups(self, wake_r: socket.socket) -> None:
        try:
            while wake_r.recv(64):
                pass
        except BlockingIOError:
            pass
        if signal.SIGHUP in self._signals:
            self._signals.remove(signal.SIGHUP)
            log.info("SIGHUP: nothing to reload without --keys")

    def _drain_router(self) -> None:
        for _ in range(MAX_DRAIN_FRAMES):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            now = time.monotonic()
            client: ClientId = tuple(frames[:-1])
            self._perform(self._dispatch(client, frames[-1], now))

    def _dispatch(self, client: ClientId, payload: bytes, now: float) -> list[Effect]:
        try:
            msg = decode(payload)
        except ProtocolError as exc:
            return self.core.bad_frame(client, exc, exc.peer, now)
        if isinstance(msg, _CONTROL_REQUESTS):
            return self.core.request(client, msg, now)
        if isinstance(msg, _PEER_MESSAGES):
            return self.core.receive(msg, now)
        error = ProtocolError(f"a node does not accept {type(msg).__name__} messages")
        return self.core.bad_frame(client, error, False, now)

    # ------------------------------------------------------------------------ effects

    def _perform(self, effects: Iterable[Effect]) -> None:
        for effect in effects:
            match effect:
                case Send():
                    self._send(effect.endpoint, effect.message)
                case Respond():
                    self._respond(effect.client, effect.reply)
                case Persist():
                    self._store.save(effect.state)
                case Connect():
                    if effect.endpoint not in self._dealers:
                        self._dealers[effect.endpoint] = self._dealer(effect.endpoint, True)
                case Disconnect():
                    dealer = self._dealers.pop(effect.endpoint, None)
                    if dealer is not None:
                        dealer.close(linger=CLOSE_LINGER_MS)
                case SendOnce():
                    once = self._dealer(effect.endpoint, immediate=False)
                    once.send(encode(effect.message), zmq.NOBLOCK)
                    once.close(linger=CLOSE_LINGER_MS)
                case Publish():
                    self._publish(effect)
                case Log():
                    log.log(_LOG_LEVELS[effect.level], "%s", effect.text)

    def _send(self, endpoint: str, message: PeerMessage) -> None:
        dealer = self._dealers.get(endpoint)
        if dealer is None:
            return
        if self.settings.drop_rate and isinstance(message, Adverts) and (
                self._random.random() < self.settings.drop_rate):
            self.core.counters["sends_dropped"] += 1
            return
        try:
            dealer.send(encode(message), zmq.NOBLOCK)
        except zmq.Again:  # not connected, or the sibling is slow: anti-entropy repairs it
            self.core.counters["sends_dropped"] += 1

    def _respond(self, client: ClientId, reply: Reply | ViewUpdate) -> None:
        if isinstance(reply, Reply) and reply.ok:
            reply = replace(reply, body={**reply.body, "ts": time.time()})
        try:
            self._router.send_multipart([*client, encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:  # EHOSTUNREACH (client gone, ROUTER_MANDATORY) or a full queue
            self.core.client_gone(client)

    def _publish(self, effect: Publish) -> None:
        view = effect.view
        log.info("total_net=%+.3f kW (production %.3f, consumption %.3f) island of %d: %s",
                 view["total_net"], view["total_production"], view["total_consumption"],
                 view["island_size"], " ".join(view["island"]))
        update = ViewUpdate(view, time.time())
        for client in effect.watchers:
            self._respond(client, update)


def _is_loopback(endpoint: str) -> bool:
    if not endpoint.startswith("tcp://"):
        return True  # ipc:// and inproc:// never leave the machine
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost, or a wildcard
