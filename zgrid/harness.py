"""The harness that tests and benchmarks run real zgrid-node processes with.

What it is for: one place for the plumbing that `tests/conftest.py` and
`scripts/bench_converge.py` share: free loopback ports, bounded waiting, nearest-rank
percentiles, a `zgrid-node` process (`NodeProc`), the real `zgrid-ctl` (`ctl`), and a
multiplexed control client that watches many nodes at once without threads (`ControlFleet`).
The binaries are the ones installed next to the running interpreter, so a test or a benchmark
always exercises the code of the environment it runs in.

What it must never do: bind or dial anything but 127.0.0.0/8 (every endpoint it makes is on
`HOST`, and `ControlFleet` refuses any other); leave a process behind (`NodeProc.kill` reaps,
and `start(die_with_parent=True)` makes the kernel kill a node whose parent dies, even by
kill -9); wait without a bound (every wait has a deadline or a count, and `subprocess` calls
have timeouts).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import ipaddress
import itertools
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import zmq

from zgrid.client import WATCH_RENEW_S, Client
from zgrid.errors import ProtocolError
from zgrid.wire import (
    ControlRequest,
    Reply,
    StatusRequest,
    ViewUpdate,
    WatchRequest,
    decode,
    encode,
)

HOST = "127.0.0.1"  # loopback only, always
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
BIN = Path(sys.executable).parent  # the venv's bin dir: zgrid-node and zgrid-ctl live there
DEFAULT_WAIT_S = 10.0
WAIT_INTERVAL_S = 0.02
CTL_TIMEOUT_S = 2.0  # zgrid-ctl's own --timeout for one request
CTL_PROCESS_TIMEOUT_S = 30.0  # the whole zgrid-ctl process, interpreter start included
STOP_TIMEOUT_S = 10.0
POLL_SLICE_MS = 50  # longest single poll: every ControlFleet wait re-checks its deadline this often
RECONNECT_IVL_MS = 10
MAX_DRAIN_FRAMES = 10_000  # frames read from one socket per pump: bounds one pump's work
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on HOST that was free a moment ago (the kernel picks it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def require_loopback(endpoint: str) -> str:
    """`endpoint` (tcp://IP:PORT) if its IP is in 127.0.0.0/8, else ValueError."""
    host = endpoint.removeprefix("tcp://").rpartition(":")[0]
    try:
        on_loopback = ipaddress.ip_address(host) in LOOPBACK
    except ValueError:
        on_loopback = False
    if not on_loopback:
        raise ValueError(f"{endpoint!r} is not a tcp:// endpoint on 127.0.0.0/8")
    return endpoint


def wait_until(predicate: Callable[[], T | None], timeout: float = DEFAULT_WAIT_S,
               interval: float = WAIT_INTERVAL_S, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy and return that; at the deadline
    raise AssertionError (a test failure) naming `what` and the last exception seen."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # e.g. a node still starting: keep polling until the deadline
            last_error = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f" (last error: {last_error!r})" if last_error else ""))
        time.sleep(interval)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in 0..100: always a value that occurred (with 50 samples,
    p99 is the maximum). NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, p50, p99, max and mean of `values` (NaN where there are none)."""
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "max": max(values) if values else math.nan,
            "mean": statistics.fmean(values) if values else math.nan}


def die_with_parent_preexec() -> Callable[[], None]:
    """A `preexec_fn` for Popen: the kernel SIGKILLs the child when this process dies.

    Linux only (prctl PR_SET_PDEATHSIG). It runs in the child between fork and exec, so a
    benchmark killed with -9 cannot leave nodes listening on loopback ports. The caller must
    be single-threaded: the signal follows the thread that forked, and `preexec_fn` is not
    safe with threads anyway.
    """
    if not sys.platform.startswith("linux"):
        raise RuntimeError("dying with the parent needs Linux (prctl PR_SET_PDEATHSIG)")
    return functools.partial(_set_death_signal, os.getpid())


def _set_death_signal(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    # The parent may have died between fork and prctl: then the signal would never come.
    if os.getppid() != parent_pid:
        os._exit(1)


def ctl(*args: str, node: str | None = None, timeout: float = CTL_TIMEOUT_S,
        check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the real zgrid-ctl; with `check`, a non-zero exit raises AssertionError."""
    cmd = [str(BIN / "zgrid-ctl"), "--timeout", str(timeout)]
    if node:
        cmd += ["--node", node]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True,
                          timeout=CTL_PROCESS_TIMEOUT_S, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"zgrid-ctl {' '.join(args)} exited {proc.returncode}: "
                             f"{proc.stderr.strip()}")
    return proc


@dataclass
class NodeProc:
    """One real zgrid-node process on HOST; `start` may be called again after it ended."""

    id: str
    port: int
    data_dir: Path
    log_path: Path
    extra: tuple[str, ...] = ()  # arguments of every start, e.g. fast failure detection
    keys: Path | None = None  # a CurveZMQ keys directory: then everything speaks CURVE
    log_level: str = "debug"
    proc: subprocess.Popen[bytes] | None = None
    # A command that execs the node, e.g. nsenter into the mount namespace of a test's small
    # disk; it must exec (not fork), so that `proc` is the node itself.
    wrapper: tuple[str, ...] = ()

    @property
    def endpoint(self) -> str:
        return f"tcp://{HOST}:{self.port}"

    @property
    def address(self) -> str:
        """How others must name this node: ID@ENDPOINT with keys, else the endpoint."""
        return f"{self.id}@{self.endpoint}" if self.keys else self.endpoint

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.id} was never started")
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *args: str, die_with_parent: bool = False) -> NodeProc:
        """Spawn the node (stdout and stderr appended to log_path); `args` for this start only.

        die_with_parent: the node gets SIGKILL when this process dies (Linux only).
        """
        keys = ("--keys", str(self.keys)) if self.keys else ()
        cmd = [*self.wrapper, str(BIN / "zgrid-node"), "--id", self.id, "--bind", self.endpoint,
               "--data-dir", str(self.data_dir), "--log-level", self.log_level, *keys,
               *self.extra, *args]
        preexec = die_with_parent_preexec() if die_with_parent else None
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         preexec_fn=preexec)
        return self

    def send(self, sig: int) -> None:
        if self.proc is None:
            raise RuntimeError(f"{self.id} was never started")
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Signal the node and reap it; its exit status (raises TimeoutExpired at `timeout`)."""
        if self.proc is None:
            raise RuntimeError(f"{self.id} was never started")
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGKILL and reap, if it is still running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen process must be able to die
            self.proc.kill()
            self.proc.wait(timeout=timeout)

    def ctl(self, *args: str, timeout: float = CTL_TIMEOUT_S, check: bool = False
            ) -> subprocess.CompletedProcess[str]:
        keys = ("--keys", str(self.keys)) if self.keys else ()
        return ctl(*keys, *args, node=self.address, timeout=timeout, check=check)

    def ctl_json(self, *args: str, timeout: float = CTL_TIMEOUT_S) -> Any:
        return json.loads(self.ctl("--json", *args, timeout=timeout, check=True).stdout)

    def client(self, timeout: float = CTL_TIMEOUT_S) -> Client:
        return Client(self.address, timeout, keys_dir=self.keys)

    def status(self, timeout: float = CTL_TIMEOUT_S) -> dict[str, Any]:
        with self.client(timeout) as client:
            return client.status()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class _Pending:
    node: str
    kind: Literal["watch", "request"]
    sent_at: float


class ControlFleet:
    """Control connections to many nodes: one DEALER per node, all in one zmq.Poller.

    It speaks the control protocol of zgrid/wire.py without threads, so a benchmark can time
    many nodes at once from one loop. `send` issues a request and returns its rid; `pump`
    reads whatever has arrived and files replies under their rid in `replies` with their
    arrival time (time.perf_counter(), stamped when the frame is read). A node connected
    with `watch=True` is sent a `watch` request whose lease is renewed every WATCH_RENEW_S:
    it answers with its current view and then pushes a `view` message whenever its view
    changes; the latest view per node is in `views` (with `view_at`, and `first_view_at`
    since connect) and `on_view`, if set, is called for each. Plain TCP only (no CURVE).
    """

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.ctx = ctx
        self.poller = zmq.Poller()
        self.socks: dict[str, zmq.Socket[bytes]] = {}
        self.node_of: dict[zmq.Socket[bytes], str] = {}
        self.views: dict[str, dict[str, Any]] = {}
        self.view_at: dict[str, float] = {}
        self.first_view_at: dict[str, float] = {}
        self.pending: dict[int, _Pending] = {}
        self.replies: dict[int, tuple[Reply, float]] = {}
        self.watching: dict[str, float] = {}  # node -> when to renew its lease
        self.on_view: Callable[[str, dict[str, Any], float], None] | None = None
        self._rids = itertools.count(1)

    def connect(self, node: str, endpoint: str, watch: bool = False) -> None:
        require_loopback(endpoint)
        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Re-dial a restarted node quickly, so our own reconnect backoff does not inflate the
        # measured restart time of the node we watch.
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.connect(endpoint)
        self.socks[node] = sock
        self.node_of[sock] = node
        self.poller.register(sock, zmq.POLLIN)
        if watch:
            self._renew(node, time.perf_counter())

    def disconnect(self, node: str) -> None:
        """Forget the node: its socket, its view, and requests still waiting for it."""
        sock = self.socks.pop(node, None)
        if sock is not None:
            self.poller.unregister(sock)
            del self.node_of[sock]
            sock.close(linger=0)
        self.watching.pop(node, None)
        self.views.pop(node, None)
        self.view_at.pop(node, None)
        self.first_view_at.pop(node, None)
        for rid in [r for r, p in self.pending.items() if p.node == node]:
            del self.pending[rid]

    def close(self) -> None:
        for node in list(self.socks):
            self.disconnect(node)

    def send(self, node: str, req: ControlRequest,
             kind: Literal["watch", "request"] = "request") -> int:
        """Queue `req` to `node` without blocking (zmq.Again if it cannot); its rid."""
        rid = next(self._rids)
        now = time.perf_counter()
        self.socks[node].send(encode(replace(req, rid=rid)), zmq.NOBLOCK)
        self.pending[rid] = _Pending(node, kind, now)
        return rid

    def _renew(self, node: str, now: float) -> None:
        self.watching[node] = now + WATCH_RENEW_S
        # zmq.Again: not connected yet (a restarting node); the next renewal retries.
        with contextlib.suppress(zmq.Again):
            self.send(node, WatchRequest(), "watch")

    def pump(self, timeout_s: float) -> None:
        """Wait up to timeout_s (at most POLL_SLICE_MS) for frames, then read all that are
        ready; renews watch leases that are due."""
        now = time.perf_counter()
        for node, renew_at in list(self.watching.items()):
            if now >= renew_at:
                self._renew(node, now)
        timeout_ms = min(POLL_SLICE_MS, max(0, math.ceil(timeout_s * 1000)))
        for sock in dict(self.poller.poll(timeout_ms)):
            owner = self.node_of.get(sock)
            if owner is not None:
                self._drain(owner, sock)

    def _drain(self, node: str, sock: zmq.Socket[bytes]) -> None:
        for _ in range(MAX_DRAIN_FRAMES):
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            at = time.perf_counter()
            try:
                msg = decode(frame)
            except ProtocolError:
                continue
            if isinstance(msg, ViewUpdate):
                self._set_view(node, {**msg.view, "ts": msg.ts}, at)
            elif isinstance(msg, Reply) and msg.rid is not None:
                pend = self.pending.pop(msg.rid, None)
                if pend is None:  # a reply to a request we gave up on
                    continue
                if pend.kind == "request":
                    self.replies[msg.rid] = (msg, at)
                elif msg.ok:
                    self._set_view(node, dict(msg.body), at)

    def _set_view(self, node: str, view: dict[str, Any], at: float) -> None:
        self.views[node] = view
        self.view_at[node] = at
        self.first_view_at.setdefault(node, at)
        if self.on_view is not None:
            self.on_view(node, view, at)

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> float | None:
        """Pump until `predicate()`; the perf_counter time it became true, None at the deadline."""
        deadline = time.perf_counter() + timeout_s
        while True:
            if predicate():
                return time.perf_counter()
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return None
            self.pump(remaining)

    def request_all(self, nodes: Iterable[str], make: Callable[[], ControlRequest],
                    timeout_s: float) -> dict[str, Reply]:
        """The same request to several nodes at once; the replies that came within timeout_s."""
        rids: dict[int, str] = {}
        for node in nodes:
            with contextlib.suppress(zmq.Again):  # a full queue: no reply to expect
                rids[self.send(node, make())] = node
        self.wait(lambda: all(r in self.replies for r in rids), timeout_s)
        out: dict[str, Reply] = {}
        for rid, node in rids.items():
            got = self.replies.pop(rid, None)
            if got is not None:
                out[node] = got[0]
            self.pending.pop(rid, None)
        return out

    def statuses(self, nodes: Iterable[str], timeout_s: float) -> dict[str, dict[str, Any]]:
        """`status` of several nodes at once: the bodies of the successful replies."""
        return {n: dict(r.body) for n, r in self.request_all(nodes, StatusRequest, timeout_s)
                .items() if r.ok}
