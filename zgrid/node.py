"""The ZeroMQ runtime of one node: sockets, the poll loop, the clock, the disk, signals.

It is deliberately thin. It moves bytes between sockets and `zgrid.core.Core`, tells the core
what time it is, and performs the effects the core returns, in order (a `Persist` before the
`Respond` that acknowledges it). It must never decide anything about the protocol itself: no
merging, no link states, no totals. Those live in core.py, where the simulator runs them too.

One ROUTER is bound for everything inbound (siblings and control clients alike); one DEALER
per sibling carries everything outbound. The single-threaded `zmq.Poller` loop is the actor's
mailbox: frames are handled one at a time, so the core needs no locks.

With --metrics-port the loop also counts what it receives and sends into a `zgrid.metrics.Meter`
and hands it snapshots to serve; zgrid/metrics.py does the rest, and with metrics off none of
it runs.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import random
import signal
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
from zmq.utils.monitor import recv_monitor_message

from zgrid.core import (
    DEAD_AFTER_S,
    FORGET_AFTER_S,
    ON_OUR_DEALER,
    PING_INTERVAL_S,
    ClientId,
    Config,
    Connect,
    Core,
    Disconnect,
    Effect,
    Log,
    LogLevel,
    Persist,
    Publish,
    Respond,
    Route,
    Send,
    SendOnce,
    Trust,
)
from zgrid.devices import (
    Device,
    base_values,
    device_record,
    restore_state,
    worth_saving,
)
from zgrid.errors import ProtocolError, StorageFailure, StoreError, ZgridError
from zgrid.persisted import PersistedState
from zgrid.security import (
    Membership,
    ZapHandler,
    authenticated_name,
    secure_client,
    secure_server,
)
from zgrid.signing import AdvertSeal, Keyring
from zgrid.store import Store
from zgrid.wire import (
    MAX_FRAME_BYTES,
    NO_FLEX,
    Adverts,
    Flex,
    Reply,
    ViewUpdate,
    decode_or_error,
    encode,
    parse_sibling_address,
)

if TYPE_CHECKING:  # zgrid.metrics (and prometheus_client) load only with --metrics-port
    from zgrid.metrics import Meter, MetricsServer

log = logging.getLogger("zgrid.node")

DEVICE_STEP_S = 1.0  # how often the device integrates its activation and may change its offer
MAX_DRAIN_FRAMES = 1000  # per loop turn, so one burst cannot delay flushes and timers unboundedly
SIBLING_SNDHWM_MSGS = 1000  # a slow sibling costs at most this much queue; then we drop
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 5000
HANDSHAKE_IVL_MS = 5000
CLOSE_LINGER_MS = 200  # long enough for a BYE to leave before its socket closes
# Refusals go to nodes that are not siblings, each over a DEALER of its own: these are kept for
# reuse (a refused node knocks again) but at most this many, each closed once idle this long,
# so a flood of refused HELLOs costs a bounded number of sockets (ZeroMQ allows 1023 at most).
MAX_ONE_SHOT_SOCKETS = 8
ONE_SHOT_IDLE_S = 1.0
DEFAULT_METRICS_HOST = "127.0.0.1"  # metrics tell a lot about a node: loopback unless asked
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CRASH_EXIT_CODE = 137  # what a shell reports for kill -9: the crash hook's exit looks the same
CRASH_HOOK_FLOOD_S = 0.2  # the crash hook waits this long so the flood is on the wire first
_LOG_LEVELS = {LogLevel.DEBUG: logging.DEBUG, LogLevel.INFO: logging.INFO,
               LogLevel.WARNING: logging.WARNING, LogLevel.ERROR: logging.ERROR}



@dataclass(frozen=True)
class NodeSettings:
    node_id: str
    bind: str
    advertise: str | None = None  # endpoint others dial; defaults to `bind`
    siblings: tuple[str, ...] = ()
    production: float = 0.0
    consumption: float = 0.0
    flex: Flex = NO_FLEX  # the initial plain offer (a node with saved state resumes its own)
    device: Device | None = None  # a device model whose offers replace the plain one
    data_dir: Path | None = None  # default ./.zgrid/<id>
    ping_interval_s: float = PING_INTERVAL_S
    dead_after_s: float = DEAD_AFTER_S
    forget_after_s: float = FORGET_AFTER_S
    keys_dir: Path | None = None
    metrics_port: int | None = None  # serve Prometheus metrics here (None: off)
    metrics_host: str = DEFAULT_METRICS_HOST
    drop_rate: float = 0.0  # testing only: drop this fraction of outgoing `adverts` messages
    # Testing only: exit at once (as kill -9 would) after flooding a change, before saving it.
    crash_before_save: bool = False
    # Testing only: while this file exists, every save fails as it does on a full disk.
    fail_saves_while: Path | None = None

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
        # A sibling may answer over the connection our DEALER made (see `Route`): each DEALER
        # is polled too, and what it brings is from the member we dialed (with keys).
        self._dealt: dict[zmq.Socket[bytes], str | None] = {}  # DEALER -> the id dialed
        self._routes: dict[str, ClientId] = {}  # endpoint -> the sibling's own connection
        # endpoint -> libzmq's monitor of our DEALER there: its connection closing is how a
        # sibling's crash is known at once (`Core.connection_lost`), and it costs nothing idle.
        self._monitors: dict[str, zmq.Socket[bytes]] = {}
        self._poller = zmq.Poller()
        # (endpoint, peer id) -> DEALER for refusals and when it was last used, oldest first
        self._one_shots: dict[tuple[str, str], tuple[zmq.Socket[bytes], float]] = {}
        self._random = random.Random()
        self._signals: list[int] = []
        self._membership: Membership | None = None
        self._signing_seed = b""  # with --keys: our Ed25519 secret, read once at startup
        self._zap: ZapHandler | None = None
        self._refusals_logged: set[str] = set()
        # What only the runtime sees; merged into every status reply.
        self._counters = {"messages_sent": 0, "bytes_sent": 0, "sends_dropped": 0, "saves": 0,
                          "save_failures": 0, "sends_routed": 0}
        self._unsaved: PersistedState | None = None  # flooded, not yet durable
        self._last_encoded: tuple[object, bytes] = (None, b"")
        self._held_replies: list[Respond] = []  # acknowledge `_unsaved`: wait for the save
        # The device's state as saved last (None: not yet), whether it moved enough since to
        # be saved again, when it was last stepped, and the base values it could not follow.
        self._device_saved: dict[str, float] | None = None
        self._device_save_due = False
        self._device_at = 0.0
        self._device_off: dict[str, float] = {}
        # With --metrics-port: the HTTP endpoint, and the Meter the loop counts into. None
        # otherwise, and then the hot path pays only an `is None` check.
        self._metrics: MetricsServer | None = None
        self._meter: Meter | None = None
        self._store = self._open_store()
        try:
            restored = self._restored_state()
            if settings.keys_dir is not None:
                self._membership, self._zap = self._install_security(settings.keys_dir)
            self._router = self._bind_router()
            if settings.metrics_port is not None:
                self._metrics = self._serve_metrics(settings.metrics_host,
                                                    settings.metrics_port)
                self._meter = self._metrics.meter
        except BaseException:
            if self._metrics is not None:
                self._metrics.stop()
            if self._zap is not None:
                self._zap.close()
            self._store.close()
            self._ctx.destroy(linger=0)
            raise
        config = Config(
            node_id=settings.node_id,
            endpoint=settings.endpoint,
            nonce=random.SystemRandom().getrandbits(64),
            secret=random.SystemRandom().getrandbits(64),
            ping_interval_s=settings.ping_interval_s,
            dead_after_s=settings.dead_after_s,
            forget_after_s=settings.forget_after_s,
            require_sibling_ids=settings.keys_dir is not None,
        )
        self.core = Core(config, restored, self._trust())

    # ------------------------------------------------------------------------ setup

    def _open_store(self) -> Store:
        data_dir = self.settings.data_dir or Path(".zgrid") / self.settings.node_id
        try:
            return Store.open(data_dir, self.settings.node_id,
                              fail_saves_while=self.settings.fail_saves_while)
        except StorageFailure:
            raise  # not a mistake in how the node was started: the storage needs fixing
        except ZgridError as exc:
            raise StartupError(exc.message) from None

    def _restored_state(self) -> PersistedState:
        """Saved state wins; command-line values only seed a new node. Siblings are merged."""
        s = self.settings
        saved = self._store.load()
        for address in s.siblings:
            parse_sibling_address(address, lambda why: StartupError(f"--sibling {why}"))
        if saved is None:
            state = PersistedState(s.node_id, 0, s.production, s.consumption, s.siblings,
                                   flex=s.flex)
        else:
            saved = replace(saved, siblings=tuple(a for a in saved.siblings if _valid_saved(a)))
            endpoints = {parse_sibling_address(a)[1] for a in saved.siblings}
            extra = tuple(a for a in s.siblings if parse_sibling_address(a)[1] not in endpoints)
            state = replace(saved, siblings=saved.siblings + extra)
            if (saved.production, saved.consumption, saved.flex) != (s.production,
                                                                      s.consumption, s.flex):
                log.info("resuming the saved values (production %g kW, consumption %g kW%s); "
                         "--production, --consumption and --flex-* only seed a new node: "
                         "change them with zgrid-ctl set / flex", saved.production,
                         saved.consumption, ", with a flexibility offer"
                         if saved.flex.offered else "")
        if s.device is not None:
            state = self._restore_device(s.device, state, resuming=saved is not None)
        return state

    def _restore_device(self, device: Device, state: PersistedState, resuming: bool
                        ) -> PersistedState:
        """Resume the device's saved state if the file still describes the same device (then
        the device follows the node's saved base values: they are the acknowledged ones);
        otherwise the base values the device gives (`devices.base_values`) replace the node's.
        """
        record = self._store.load_device() if resuming else None
        why = "nothing saved of a device"
        if record is not None:
            try:
                restore_state(device, record)
            except ValueError as exc:
                why = str(exc)
            else:
                log.info("%s device: resuming its saved state (%s); the device file's values "
                         "of these are only initial values", device.kind, _show(device.state()))
                self._device_follows(state.production, state.consumption)
                return state
        if resuming:
            log.info("%s device: starting from the device file (%s), not from a saved state: "
                     "%s", device.kind, _show(device.state()), why)
        given = base_values(device)
        for name, value in given.items():
            if resuming and value != getattr(state, name):
                log.info("%s %g kW, as the %s device gives it (the saved value was %g kW)",
                         name, value, device.kind, getattr(state, name))
        return replace(state, production=given.get("production", state.production),
                       consumption=given.get("consumption", state.consumption))

    def _install_security(self, keys_dir: Path) -> tuple[Membership, ZapHandler]:
        """The authenticator must be bound before the CURVE ROUTER: CURVE without ZAP lets
        anyone in, so any failure here stops the node from starting."""
        try:
            membership = Membership(keys_dir)
            membership.load_own(self.settings.node_id)
            self._signing_seed = membership.load_own_signing(self.settings.node_id)
            for address in self.settings.siblings:
                expected, endpoint = parse_sibling_address(address)
                if expected is None:
                    raise StartupError(f"with --keys, write --sibling as ID@{endpoint}, so "
                                       "its public key can be checked")
                membership.public_key(expected)
            for problem in membership.problems:
                log.warning("keys: %s", problem)
            return membership, ZapHandler(self._ctx, membership)
        except StartupError:
            raise
        except ZgridError as exc:
            raise StartupError(exc.message) from None

    def _bind_router(self) -> zmq.Socket[bytes]:
        router: zmq.Socket[bytes] = self._ctx.socket(zmq.ROUTER)
        if self._membership is not None:
            try:
                secure_server(router, self._membership, self.settings.node_id)
            except ZgridError as exc:
                router.close(linger=0)
                raise StartupError(exc.message) from None
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

    def _serve_metrics(self, host: str, port: int) -> MetricsServer:
        from zgrid.metrics import MetricsServer, address

        try:
            return MetricsServer(host, port)
        except OSError as exc:  # in use, no such address, a host name that does not resolve
            raise StartupError(f"cannot serve metrics on {address(host, port)}: "
                               f"{exc.strerror or exc}") from None

    def _dealer(self, endpoint: str, peer_id: str | None, immediate: bool) -> zmq.Socket[bytes]:
        """A DEALER connected to `endpoint`, or _CannotDial with nothing left open: a socket
        left open would make closing the context wait for it forever."""
        try:
            dealer: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        except zmq.ZMQError as exc:  # e.g. too many sockets
            raise _CannotDial(exc.strerror) from None
        try:
            if self._membership is not None:
                if peer_id is None:
                    raise ZgridError(f"no id for {endpoint}: with --keys, write ID@ENDPOINT")
                secure_client(dealer, self._membership, self.settings.node_id, peer_id)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.IMMEDIATE, 1 if immediate else 0)
            dealer.setsockopt(zmq.SNDHWM, SIBLING_SNDHWM_MSGS)
            dealer.setsockopt(zmq.SNDTIMEO, 0)
            dealer.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
            dealer.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
            dealer.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
            dealer.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
            dealer.connect(endpoint)  # raises for an address ZeroMQ cannot use (EINVAL ...)
        except (ZgridError, zmq.ZMQError) as exc:
            dealer.close(linger=0)
            raise _CannotDial(exc.message if isinstance(exc, ZgridError) else exc.strerror
                              ) from None
        return dealer

    def _connect(self, effect: Connect) -> None:
        if effect.endpoint in self._dealers:
            return
        try:
            dealer = self._dealer(effect.endpoint, effect.peer_id, immediate=True)
        except _CannotDial as exc:
            self._perform(self.core.connect_failed(effect.endpoint, str(exc), time.monotonic()))
            return
        try:
            monitor: zmq.Socket[bytes] = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        except zmq.ZMQError as exc:  # too many sockets, as when the DEALER cannot be made
            dealer.close(linger=0)
            self._perform(self.core.connect_failed(effect.endpoint, exc.strerror,
                                                   time.monotonic()))
            return
        self._dealers[effect.endpoint] = dealer
        self._dealt[dealer] = effect.peer_id
        self._poller.register(dealer, zmq.POLLIN)
        self._monitors[effect.endpoint] = monitor
        self._poller.register(monitor, zmq.POLLIN)

    def _disconnect(self, endpoint: str) -> None:
        self._routes.pop(endpoint, None)
        dealer = self._dealers.pop(endpoint, None)
        if dealer is not None:
            self._close_monitor(endpoint, dealer)
            self._poller.unregister(dealer)
            del self._dealt[dealer]
            dealer.close(linger=CLOSE_LINGER_MS)

    def _close_monitor(self, endpoint: str, dealer: zmq.Socket[bytes]) -> None:
        """Before its DEALER closes: what closing it does is not the sibling's doing."""
        monitor = self._monitors.pop(endpoint)
        self._poller.unregister(monitor)
        dealer.disable_monitor()
        monitor.close(linger=0)

    def _send_once(self, effect: SendOnce) -> None:
        """A message (a refusal) to a node that is not our sibling, over a one-shot DEALER
        that is kept for a while (see MAX_ONE_SHOT_SOCKETS)."""
        key = (effect.endpoint, effect.peer_id)
        entry = self._one_shots.pop(key, None)
        if entry is None:
            while len(self._one_shots) >= MAX_ONE_SHOT_SOCKETS:
                oldest, _ = self._one_shots.pop(next(iter(self._one_shots)))
                oldest.close(linger=CLOSE_LINGER_MS)
            try:
                # Not IMMEDIATE: the message waits for the connection (for a linger at most).
                once = self._dealer(effect.endpoint, effect.peer_id, immediate=False)
            except _CannotDial as exc:
                log.debug("cannot send to %s: %s", effect.endpoint, exc)
                return
        else:
            once = entry[0]
        self._one_shots[key] = (once, time.monotonic())
        frame = encode(effect.message)
        try:
            once.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self._counters["sends_dropped"] += 1
            return
        if self._meter is not None:
            self._meter.sent(effect.message, len(frame))

    def _close_idle_one_shots(self, now: float) -> None:
        while self._one_shots:
            key = next(iter(self._one_shots))
            once, used = self._one_shots[key]
            if now - used < ONE_SHOT_IDLE_S:
                return  # oldest first: the rest were used later
            del self._one_shots[key]
            once.close(linger=CLOSE_LINGER_MS)

    # ------------------------------------------------------------------------ the loop

    def run(self) -> int:
        """The actor loop; returns the process exit code (0, or 1 if state could not be saved)."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        previous_fd = signal.set_wakeup_fd(wake_w.fileno())
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (*STOP_SIGNALS, signal.SIGHUP)}
        poller = self._poller
        poller.register(self._router, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        if self._zap is not None:
            poller.register(self._zap.socket, zmq.POLLIN)
        log.info("%s listening on %s", self.settings.node_id, self.settings.bind)
        if self.settings.keys_dir is None and not _is_loopback(self.settings.bind):
            log.warning("plain TCP on %s, which is not a loopback address: anyone who can "
                        "reach it can control this node; use --keys", self.settings.bind)
        if self._metrics is not None:
            from zgrid.metrics import address

            shown = address(self.settings.metrics_host, self._metrics.port)
            log.info("metrics on http://%s/metrics", shown)
            if not _is_loopback(f"tcp://[{self.settings.metrics_host}]:{self._metrics.port}"):
                log.warning("metrics on %s, which is not a loopback address: anyone who can "
                            "reach it can read this node's values and traffic", shown)
        try:
            code = 0
            started = False
            try:
                self._perform(self.core.start(time.monotonic()))
                started = True
                if self._meter is not None:  # a scrape from now on sees the started node
                    self._meter.publish(self.core, self._counters, time.monotonic())
                self._loop(poller, wake_r)
            except StoreError as exc:
                # A new incarnation that cannot be saved (other failed saves are refusals, see
                # `_save_and_acknowledge`): it may not be sent, and our old incarnation cannot
                # stand for us, so the node leaves the grid, sending nothing but goodbyes.
                if started and isinstance(exc, StorageFailure):
                    log.error("cannot save this node's new incarnation, so it cannot stay in "
                              "the grid; stopping: %s", exc.message)
                elif started:  # not the storage: a state the store refuses to write
                    log.error("cannot save this node's state, stopping: %s", exc.message)
                else:
                    log.error("cannot start: the new incarnation of this node cannot be "
                              "saved: %s", exc.message)
                self._release_held(saved=False, stopping_because=exc.message)
                code = 1
            log.info("%s stopping", self.settings.node_id)
            self._perform(self.core.stop(time.monotonic()))
            if code == 0:
                code = self._stop_device()
            return code
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()
            self.close()

    def _loop(self, poller: zmq.Poller, wake_r: socket.socket) -> None:
        next_device_step = time.monotonic() if self.settings.device is not None else math.inf
        self._device_at = time.monotonic()
        meter = self._meter
        next_publish = math.inf  # when the Meter wants its next snapshot (never: metrics off)
        while not any(sig in STOP_SIGNALS for sig in self._signals):
            now = time.monotonic()
            stepped = now >= next_device_step
            if stepped:
                self._step_device(now - self._device_at)
                self._device_at, next_device_step = now, now + DEVICE_STEP_S
            deadline = min(self.core.next_deadline(), next_device_step, next_publish)
            timeout_ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
            ready = dict(poller.poll(timeout_ms))
            if wake_r.fileno() in ready:
                self._drain_wakeups(wake_r)
            if self._zap is not None and self._zap.socket in ready:
                self._drain_zap()  # before the ROUTER: its handshakes wait on us
            if self._router in ready:
                self._drain_router()
            for dealer in [d for d in self._dealt if d in ready]:
                self._drain_dealer(dealer)
            # After the sockets' frames: a stopping sibling's goodbye, if it came in the same
            # turn as its connection closing, says why.
            for endpoint in [e for e, m in self._monitors.items() if m in ready]:
                self._drain_monitor(endpoint)
            now = time.monotonic()
            timed = now >= self.core.next_deadline()
            if timed:
                self._perform(self.core.timer(now))
            self._perform(self.core.flush(now))
            self._save_and_acknowledge()
            self._close_idle_one_shots(now)
            if meter is not None:
                next_publish = meter.turn(self.core, self._counters, now,
                                          active=bool(ready) or timed or stepped)

    def _step_device(self, dt_s: float) -> None:
        """Integrate what the clearing asked of the device since the last step (its base output
        following the node's values first), then hand the core its offer and state (the core
        decides whether the offer is worth advertising); mark the state for saving at the end
        of the loop turn if it moved enough (`devices.worth_saving`)."""
        device = self.settings.device
        assert device is not None
        self._device_follows(self.core.production, self.core.consumption)
        device.apply(self.core.activation_kw, dt_s)
        state = {"kind": device.kind, **{f.name: getattr(device, f.name)
                                          for f in fields(device)}}  # type: ignore[arg-type]
        state["applied_kw"] = device.applied_kw
        self._perform(self.core.device_changed(device.offer(), device.rating_kw, state))
        if not self._device_save_due and worth_saving(device, self._device_saved):
            self._device_save_due = True

    def _device_follows(self, production: float, consumption: float) -> None:
        """The device's base output follows the node's base values (a `set` moved them);
        what it cannot follow (a plant set beyond its max_kw) is logged once."""
        device = self.settings.device
        assert device is not None
        device.follow(production, consumption)
        wanted = {"production": production, "consumption": consumption}
        off = {k: v for k, v in base_values(device).items() if v != wanted[k]}
        if off and off != self._device_off:
            log.warning("the %s device cannot follow this node's %s: its offers assume %s",
                        device.kind, ", ".join(f"{k} {wanted[k]:g} kW" for k in off),
                        ", ".join(f"{v:g} kW" for v in off.values()))
        self._device_off = off

    def _stop_device(self) -> int:
        """At a clean stop: the last partial step, then save the device's state if it moved
        since it was saved. 0, or 1 if it cannot be saved (the log says what is lost)."""
        device = self.settings.device
        if device is None:
            return 0
        device.apply(self.core.activation_kw, max(0.0, time.monotonic() - self._device_at))
        if device.state() == self._device_saved:
            return 0
        try:
            self._save(self.core.persisted_state())
        except StoreError as exc:
            log.error("cannot save the %s device's state at stop (%s); it restarts from the "
                      "state saved last (%s): %s", device.kind, _show(device.state()),
                      _show(self._device_saved or {}), exc.message)
            return 1
        return 0

    def _save_and_acknowledge(self) -> None:
        """Group commit: one save for every change of this loop turn, after their flood went
        out (the fsync no longer delays agreement), then the replies that acknowledge them.
        A device whose state moved enough is saved the same way (while saves fail, the core's
        retries carry it)."""
        if self._unsaved is None and self._device_save_due and not self.core.storage_error:
            self._unsaved = self.core.persisted_state()
        saved = True  # nothing to save, or saved
        if self._unsaved is not None:
            if self.settings.crash_before_save and self._held_replies:
                time.sleep(CRASH_HOOK_FLOOD_S)
                os._exit(CRASH_EXIT_CODE)
            state, self._unsaved = self._unsaved, None
            now = time.monotonic()
            try:
                self._save(state)
            except StorageFailure as exc:
                # A refusal, not a crash: the core undoes the change, and the advert that
                # restores the saved values leaves now rather than with the next ping.
                self._perform(self.core.save_failed(state, exc.message, now))
                self._perform(self.core.flush(now))
                saved = False
            else:
                self._perform(self.core.save_succeeded(state, now))
        self._release_held(saved)

    def _release_held(self, saved: bool, stopping_because: str = "") -> None:
        """Send the held replies; if what they acknowledge was not saved, acknowledgements
        become refusals (ok=true only ever follows a successful fsync)."""
        held, self._held_replies = self._held_replies, []
        for effect in held:
            if effect.acknowledges and not saved:
                effect = replace(effect, reply=self.core.refuse_unsaved(effect.reply,
                                                                        stopping_because))
            self._respond(effect)

    def _save(self, state: PersistedState) -> None:
        """Save `state` and, with it in one transaction, the device's state."""
        device = self.settings.device
        record = None
        if device is not None:
            self._device_follows(state.production, state.consumption)
            record = device_record(device)
        try:
            self._store.save(state, device=record)
        except StoreError:
            self._counters["save_failures"] += 1
            raise
        self._counters["saves"] += 1
        if record is not None:
            self._device_saved, self._device_save_due = record["state"], False

    def close(self) -> None:
        try:
            for endpoint, dealer in self._dealers.items():
                self._close_monitor(endpoint, dealer)
                dealer.close(linger=CLOSE_LINGER_MS)
            self._dealers.clear()
            self._dealt.clear()
            for once, _ in self._one_shots.values():
                once.close(linger=CLOSE_LINGER_MS)
            self._one_shots.clear()
            self._router.close(linger=0)
            if self._zap is not None:
                self._zap.close()
            # destroy, not term: any socket still open (there should be none) is closed with
            # no linger instead of making term wait for it forever. Those closed above keep
            # their linger: at most CLOSE_LINGER_MS for goodbyes still in flight.
            self._ctx.destroy(linger=0)
        finally:
            self._store.close()  # releases the data dir's lock, whatever happened above
            if self._metrics is not None:
                self._metrics.stop()  # the port is free once the node has stopped
                self._metrics = self._meter = None

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
            self._reload_membership()

    def _trust(self) -> Trust | None:
        """What the core needs to know about keys: members, operators, and the advert seal."""
        membership = self._membership
        if membership is None:
            return None
        seal = AdvertSeal(self._signing_seed, Keyring(membership.signing_keys()))
        return Trust(membership.names(), membership.operators(), seal)

    def _reload_membership(self) -> None:
        if self._membership is None:
            log.info("SIGHUP: nothing to reload without --keys")
            return
        try:
            removed = self._membership.reload()
        except ZgridError as exc:
            log.error("SIGHUP: keys not reloaded, the old membership stays: %s", exc.message)
            return
        log.info("SIGHUP: %d member(s); revoked: %s", len(self._membership.names()),
                 ", ".join(sorted(removed)) or "none")
        trust = self._trust()
        assert trust is not None  # we have a membership
        self._perform(self.core.membership_changed(trust, time.monotonic()))

    def _drain_zap(self) -> None:
        assert self._zap is not None
        for _ in range(MAX_DRAIN_FRAMES):
            pending = self._zap.socket.poll(0, zmq.POLLIN)
            if not pending:
                return
            refusal = self._zap.handle()
            if refusal is not None and refusal not in self._refusals_logged:
                self._refusals_logged.add(refusal)  # log each refused key once, not per retry
                log.warning("%s", refusal)

    def _drain_router(self) -> None:
        secure = self._membership is not None
        meter = self._meter
        for _ in range(MAX_DRAIN_FRAMES):
            member: str | None = None
            try:
                if secure:  # the frame objects carry the User-Id the ZAP handler set
                    frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
                    member = authenticated_name(frames[-1])
                    parts = [f.bytes for f in frames]
                else:  # plain bytes cost less per message
                    parts = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if meter is None:
                self._perform(self.core.handle(tuple(parts[:-1]), decode_or_error(parts[-1]),
                                               time.monotonic(), member))
            else:
                self._handle_metered(meter, tuple(parts[:-1]), parts[-1], member)

    def _drain_dealer(self, dealer: zmq.Socket[bytes]) -> None:
        """What a sibling sent back over our DEALER to it (its ROUTER answering over the
        connection we made; see `Route`): sibling messages, from the member we dialed."""
        meter = self._meter
        for _ in range(MAX_DRAIN_FRAMES):
            if dealer not in self._dealt:  # disconnected by what the last frame did
                return
            try:
                parts = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            member = self._dealt[dealer] if self._membership is not None else None
            if meter is None:
                self._perform(self.core.handle(ON_OUR_DEALER, decode_or_error(parts[-1]),
                                               time.monotonic(), member))
            else:
                self._handle_metered(meter, ON_OUR_DEALER, parts[-1], member)

    def _drain_monitor(self, endpoint: str) -> None:
        """libzmq's events about our DEALER to `endpoint`: only its disconnections are asked
        for. Bounded: a connection closes at most once per reconnect."""
        for _ in range(MAX_DRAIN_FRAMES):
            monitor = self._monitors.get(endpoint)
            if monitor is None:  # the last event's effects closed the DEALER
                return
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._perform(self.core.connection_lost(endpoint, time.monotonic()))

    def _handle_metered(self, meter: Meter, sender: ClientId, frame: bytes,
                        member: str | None) -> None:
        """What the drains do with a frame, timed and counted (only with --metrics-port)."""
        started = time.perf_counter()
        message = decode_or_error(frame)
        self._perform(self.core.handle(sender, message, time.monotonic(), member))
        meter.handled(message, len(frame), time.perf_counter() - started)

    # ------------------------------------------------------------------------ effects

    def _perform(self, effects: Iterable[Effect]) -> None:
        for effect in effects:
            match effect:
                case Send():
                    self._send(effect)
                case Respond():
                    if self._unsaved is not None:
                        self._held_replies.append(effect)
                    else:
                        self._respond(effect)
                case Persist():
                    if effect.new_incarnation:
                        self._unsaved = None  # superseded by this state
                        self._save(effect.state)  # a failure stops the node: see `run`
                        self._perform(self.core.save_succeeded(effect.state, time.monotonic()))
                        self._release_held(saved=True)  # what they acknowledge is in it
                    else:
                        self._unsaved = effect.state
                case Connect():
                    self._connect(effect)
                case Disconnect():
                    self._disconnect(effect.endpoint)
                case Route():
                    self._routes[effect.endpoint] = effect.via
                case SendOnce():
                    self._send_once(effect)
                case Publish():
                    self._publish(effect)
                case Log():
                    log.log(_LOG_LEVELS[effect.level], "%s", effect.text)

    def _send(self, effect: Send) -> None:
        endpoint, message = effect.endpoint, effect.message
        dealer = self._dealers.get(endpoint)
        if dealer is None:
            return
        if self.settings.drop_rate and isinstance(message, Adverts) and (
                self._random.random() < self.settings.drop_rate):
            self._counters["sends_dropped"] += 1
            return
        # A flood or a ping round hands the same message to every sibling: encode it once.
        if self._last_encoded[0] is message:
            frame = self._last_encoded[1]
        else:
            frame = encode(message)
            self._last_encoded = (message, frame)
        try:
            dealer.send(frame, zmq.NOBLOCK)
        except zmq.Again:  # not connected (reconnecting), or the sibling is slow
            via = None if effect.dealer_only else self._routes.get(endpoint)
            try:
                if via is None:
                    raise zmq.Again()
                # Back over the connection the sibling made to us: no reconnect to wait for.
                self._router.send_multipart([*via, frame], zmq.NOBLOCK)
            except zmq.ZMQError:  # that connection is gone too: anti-entropy repairs it
                self._counters["sends_dropped"] += 1
                return
            self._counters["sends_routed"] += 1
        self._counters["messages_sent"] += 1
        self._counters["bytes_sent"] += len(frame)
        if self._meter is not None:
            self._meter.sent(message, len(frame))

    def _respond(self, effect: Respond) -> None:
        reply = effect.reply
        if reply.ok:
            body = {**reply.body, "ts": time.time()}
            if effect.with_runtime_counters:
                body["counters"] = {**body["counters"], **self._counters}
            reply = replace(reply, body=body)
        self._deliver(effect.client, reply)

    def _deliver(self, client: ClientId, reply: Reply | ViewUpdate) -> None:
        frame = encode(reply)
        try:
            self._router.send_multipart([*client, frame], zmq.NOBLOCK)
        except zmq.ZMQError:  # EHOSTUNREACH (client gone, ROUTER_MANDATORY) or a full queue
            self.core.client_gone(client)
            return
        if self._meter is not None:
            self._meter.sent(reply, len(frame))

    def _publish(self, effect: Publish) -> None:
        view = effect.view
        # DEBUG, not INFO: one line per view change costs more than handling the change.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("total_net=%+.3f kW (production %.3f, consumption %.3f) island of %d: %s",
                     view["total_net"], view["total_production"], view["total_consumption"],
                     view["island_size"], " ".join(view["island"]))
        update = ViewUpdate(view, time.time())
        for client in effect.watchers:
            self._deliver(client, update)


class _CannotDial(Exception):
    """ZeroMQ cannot connect a DEALER to an endpoint; the message says why."""


def _show(state: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in state.items())


def _valid_saved(address: str) -> bool:
    """Whether a saved sibling address is still valid. An older zgrid saved some that are not
    (an ipc path too long for a unix socket): they are dropped, or the node could not start."""
    try:
        parse_sibling_address(address)
    except ProtocolError as exc:
        log.warning("dropping the saved sibling %.80r: %s", address, exc.message)
        return False
    return True


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
