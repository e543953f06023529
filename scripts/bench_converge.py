"""Benchmark of real zgrid-node processes on loopback: convergence, faults, idle cost, load.

What it is for: measuring, on this machine, the figures issues 2 and 3 ask for, with real
`zgrid-node` processes talking ZeroMQ over 127.0.0.1 TCP (`make bench` runs it):

  converge  N = 4 and 16 nodes on a random connected topology; 50 `set` changes one at a time;
            time from sending the set until every node's `watch` stream shows the new total
            (p50/p99/max) and the number of adverts received per change.
  faults    N = 16, degree ~4: kill -9 a node, time until every other node's island excludes
            it; restart it (same --id and --data-dir), time until it is back in every island.
  idle      N = 16 idle nodes: CPU seconds per second and TCP bytes per second sent per node.
  load      N = 16, every node changing its values 20 times a second for 30 s: link flaps.

It prints one table per part and writes bench-results/converge.json.

What it must never do: bind or dial anything but 127.0.0.1; leave a process behind (every node is
killed in a `finally`, on Ctrl-C and SIGTERM too, and dies with this process via
PR_SET_PDEATHSIG); wait without a bound (every loop has a count or a deadline); put numbers in
the output that were not measured in this run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zmq

from zgrid.client import WATCH_RENEW_S
from zgrid.errors import ProtocolError
from zgrid.wire import (
    ControlRequest,
    Ping,
    Reply,
    SetRequest,
    StatusRequest,
    ViewUpdate,
    WatchRequest,
    decode,
    encode,
)

HOST = "127.0.0.1"  # loopback only, always
REPO = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO / "bench-results" / "converge.json"

# Node settings (the zgrid-node defaults, passed explicitly so the run documents them).
PING_INTERVAL_S = 0.25
DEAD_AFTER_S = 1.0

# Topologies: average degree per part. N=4 with degree 3 would be the complete graph (diameter 1),
# so N=4 uses 2.5 (5 of the 6 possible edges) to keep at least one 2-hop path.
CONVERGE_SIZES = (4, 16)
CONVERGE_DEGREE = {4: 2.5, 16: 3.5}
FAULT_NODES = 16
FAULT_DEGREE = 4.0
IDLE_NODES = 16
IDLE_DEGREE = 4.0
LOAD_NODES = 16
LOAD_DEGREE = 4.0

# Workload sizes (full run / --quick).
CHANGES_FULL, CHANGES_QUICK = 50, 10
FAULT_TRIALS_FULL, FAULT_TRIALS_QUICK = 5, 1
IDLE_WINDOW_FULL_S, IDLE_WINDOW_QUICK_S = 10.0, 3.0
LOAD_DURATION_FULL_S, LOAD_DURATION_QUICK_S = 30.0, 5.0
LOAD_RATE_HZ = 20.0  # changes per second per node (issue 3)

# Bounds on every wait.
STARTUP_TIMEOUT_S = 60.0  # 16 Python interpreters importing pyzmq on 2 cores take a while
CHANGE_TIMEOUT_S = 5.0  # one change that has not converged by then is recorded as a timeout
REQUEST_TIMEOUT_S = 5.0
FAULT_TIMEOUT_S = 15.0  # per kill and per restart
LOAD_DRAIN_TIMEOUT_S = 5.0
LOAD_CONVERGE_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
SETTLE_BETWEEN_CHANGES_S = 0.05  # lets redundant flood copies land before counters are read
SETTLE_BETWEEN_TRIALS_S = 1.0
IDLE_WARMUP_S = 2.0  # after agreement, so start-up handshakes are not counted as idle traffic
POLL_SLICE_MS = 50  # longest single poll: every wait re-checks its deadline this often

# Targets (issues 2 and 3) and the physical yardstick.
LOOPBACK_HOP_US = 60.0  # one hop over loopback TCP on this class of machine (issue 2)
TARGET_P50_MS = {4: 2.0, 16: 10.0}
TARGET_EXCLUSION_MARGIN_S = 0.050  # p50 exclusion within dead_after + 50 ms
TARGET_IDLE_CPU_FRACTION = 0.01
TARGET_IDLE_BYTES_PER_S = 2048.0
TARGET_LOAD_FLAPS = 0

PREFLIGHT_SAMPLE_S = 1.0  # how long the machine's own load is sampled before starting
BUSY_WARNING_CORES = 0.1  # other processes' CPU above which a part's figures are flagged
TCP_IP_HEADER_BYTES = 52  # IPv4 (20) + TCP with timestamps (32), per segment on loopback
PR_SET_PDEATHSIG = 1


# ============================================================================ small helpers


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (so with 50 samples, p99 is the maximum)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(values_s: Sequence[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values_s]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "max_ms": max(ms) if ms else math.nan,
            "mean_ms": statistics.fmean(ms) if ms else math.nan}


def fmt(x: float | int | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}"


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def machine_info() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": sys.version.split()[0],
            "platform": platform.platform(), "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version()}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/PID/stat, in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # the comm field may contain spaces
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of the whole line
    return ticks / os.sysconf("SC_CLK_TCK")


def sched_ns(pid: int) -> tuple[int, int]:
    """(ns run on a CPU, ns runnable but waiting for a CPU), summed over the process's threads.

    From /proc/PID/task/*/schedstat: exact (not tick-based), and it includes libzmq's I/O
    thread. The waiting time is the direct measure of CPU contention.
    """
    run = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:  # a thread that just ended
            continue
        run += int(fields[0])
        wait += int(fields[1])
    return run, wait


def machine_busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


@dataclass
class Background:
    """How busy the machine was with processes other than ours during a part of the run.

    Other work on a 2-core machine skews every latency here, so each part reports it.
    """

    start_busy: tuple[int, int] = (0, 0)
    start_ours: float = 0.0
    start_t: float = 0.0

    @staticmethod
    def ours() -> float:
        """CPU seconds of this process, of its reaped children and of its live nodes."""
        t = os.times()
        total = t.user + t.system + t.children_user + t.children_system
        for node in STARTED:
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(OSError):
                    total += cpu_seconds(node.proc.pid)
        return total

    def begin(self) -> None:
        self.start_busy, self.start_ours = machine_busy_jiffies(), self.ours()
        self.start_t = time.perf_counter()

    def end(self) -> dict[str, float]:
        busy, total = machine_busy_jiffies()
        ours = self.ours()
        elapsed = time.perf_counter() - self.start_t
        tck = os.sysconf("SC_CLK_TCK")
        machine_s = (busy - self.start_busy[0]) / tck
        cores = (total - self.start_busy[1]) / tck / elapsed if elapsed > 0 else math.nan
        other_s = max(0.0, machine_s - (ours - self.start_ours))
        return {"elapsed_s": elapsed, "machine_busy_cores": machine_s / elapsed,
                "ours_cores": (ours - self.start_ours) / elapsed,
                "other_processes_cores": other_s / elapsed, "cores_seen": cores,
                "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0])}


_SS_USER_RE = re.compile(r"pid=(\d+)")
_SS_BYTES_RE = re.compile(r"\bbytes_sent:(\d+)")
_SS_SEGS_RE = re.compile(r"\bsegs_out:(\d+)")


def tcp_sent_by_socket() -> dict[tuple[int, str], tuple[int, int]]:
    """{(pid, "local peer"): (bytes_sent, segs_out)} for every established TCP socket we may see.

    From `ss -tinp`: the kernel's tcp_info per socket. bytes_sent is TCP payload (ZMTP frames,
    retransmissions included), segs_out counts every segment (pure ACKs included).
    """
    out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True,
                         text=True, timeout=10, check=True).stdout
    result: dict[tuple[int, str], tuple[int, int]] = {}
    lines = out.splitlines()
    key: tuple[int, str] | None = None
    for line in lines:
        if not line.startswith((" ", "\t")):
            parts = line.split()
            pids = _SS_USER_RE.findall(line)
            # state filter given: columns are Recv-Q Send-Q Local Peer [users]
            key = (int(pids[0]), f"{parts[2]} {parts[3]}") if pids and len(parts) >= 4 else None
        elif key is not None:
            b, s = _SS_BYTES_RE.search(line), _SS_SEGS_RE.search(line)
            result[key] = (int(b.group(1)) if b else 0, int(s.group(1)) if s else 0)
            key = None
    return result


def tcp_sent_delta(before: dict[tuple[int, str], tuple[int, int]],
                   after: dict[tuple[int, str], tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """Per pid: bytes and segments sent between two snapshots (new sockets count in full)."""
    per_pid: dict[int, list[int]] = {}
    for key, (b1, s1) in after.items():
        b0, s0 = before.get(key, (0, 0))
        acc = per_pid.setdefault(key[0], [0, 0])
        acc[0] += max(0, b1 - b0)
        acc[1] += max(0, s1 - s0)
    return {pid: (v[0], v[1]) for pid, v in per_pid.items()}


# ============================================================================ topology


def random_topology(n: int, avg_degree: float, rng: random.Random) -> list[tuple[int, int]]:
    """A random spanning tree (so it is connected) plus random extra edges up to avg_degree."""
    order = list(range(n))
    rng.shuffle(order)
    edges: set[tuple[int, int]] = set()
    for i in range(1, n):
        a, b = order[i], order[rng.randrange(i)]
        edges.add((min(a, b), max(a, b)))
    target = min(round(n * avg_degree / 2), n * (n - 1) // 2)
    for _ in range(100 * n * n):  # bounded; a dense target fills long before this
        if len(edges) >= target:
            break
        a, b = rng.sample(range(n), 2)
        edges.add((min(a, b), max(a, b)))
    return sorted(edges)


def hop_distances(n: int, edges: Sequence[tuple[int, int]]) -> list[list[int]]:
    adjacent: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        adjacent[a].append(b)
        adjacent[b].append(a)
    table = []
    for src in range(n):
        dist = [-1] * n
        dist[src] = 0
        queue = deque([src])
        while queue:
            x = queue.popleft()
            for y in adjacent[x]:
                if dist[y] < 0:
                    dist[y] = dist[x] + 1
                    queue.append(y)
        table.append(dist)
    return table


# ============================================================================ processes


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if this benchmark dies (even by kill -9), the
    # kernel kills the node too, so no run can leave orphans listening on loopback ports.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


STARTED: list[NodeProc] = []  # every node ever started, for CPU accounting


@dataclass
class NodeProc:
    id: str
    port: int
    data_dir: Path
    log_path: Path
    args: tuple[str, ...]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        node_bin = shutil.which("zgrid-node") or str(Path(sys.executable).parent / "zgrid-node")
        cmd = [node_bin, "--id", self.id, "--bind", self.endpoint, "--data-dir",
               str(self.data_dir), *self.args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
        if self not in STARTED:
            STARTED.append(self)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill9()


@dataclass
class Fleet:
    """N node processes on one topology; `close()` kills every one of them."""

    tmp: Path
    n: int
    edges: list[tuple[int, int]]
    values: list[tuple[float, float]]  # (production, consumption) per node
    log_level: str
    nodes: list[NodeProc] = field(default_factory=list)

    def start(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        ports = [free_port() for _ in range(self.n)]
        for i in range(self.n):
            node_id = f"n{i:02d}"
            # Each edge is given to one end only; the other end links back by itself.
            siblings = [f"tcp://{HOST}:{ports[a]}" for a, b in self.edges if b == i]
            args = ["--production", repr(self.values[i][0]), "--consumption",
                    repr(self.values[i][1]), "--ping-interval", str(PING_INTERVAL_S),
                    "--dead-after", str(DEAD_AFTER_S), "--log-level", self.log_level]
            for s in siblings:
                args += ["--sibling", s]
            node = NodeProc(node_id, ports[i], self.tmp / node_id, self.tmp / f"{node_id}.log",
                            tuple(args))
            self.nodes.append(node)
            node.start()

    @property
    def ids(self) -> list[str]:
        return [node.id for node in self.nodes]

    def expected_total(self) -> float:
        return math.fsum(itertools.chain.from_iterable((p, -c) for p, c in self.values))

    def close(self) -> None:
        for node in self.nodes:
            try:
                node.kill9()
            except (OSError, subprocess.TimeoutExpired) as exc:
                print(f"warning: could not kill {node.id}: {exc}", file=sys.stderr)


# ============================================================================ the multiplexer


@dataclass
class Pending:
    node: str
    kind: str  # "watch" or "request"
    sent_at: float


class Mux:
    """One DEALER per node in one zmq.Poller: watch streams and requests without threads.

    It speaks the control protocol of zgrid/wire.py: a `watch` request is answered with the
    current view and then the node pushes a `view` message whenever its view changes, as long
    as the lease is renewed (every WATCH_RENEW_S). Arrival times are stamped with
    time.perf_counter() when a frame is read.
    """

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.ctx = ctx
        self.poller = zmq.Poller()
        self.socks: dict[str, zmq.Socket[bytes]] = {}
        self.node_of: dict[zmq.Socket[bytes], str] = {}
        self.views: dict[str, dict[str, Any]] = {}
        self.view_at: dict[str, float] = {}  # latest view's arrival
        self.first_view_at: dict[str, float] = {}  # first view since connect()
        self.pending: dict[int, Pending] = {}
        self.replies: dict[int, tuple[Reply, float]] = {}
        self.watching: dict[str, float] = {}  # node -> when to renew the lease
        self.on_view: Callable[[str, dict[str, Any], float], None] | None = None
        self._rids = itertools.count(1)

    def connect(self, node: str, endpoint: str, watch: bool = False) -> None:
        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Re-dial a restarted node quickly, so our own reconnect backoff does not inflate the
        # measured restart time of the node we watch.
        sock.setsockopt(zmq.RECONNECT_IVL, 10)
        sock.connect(endpoint)
        self.socks[node] = sock
        self.node_of[sock] = node
        self.poller.register(sock, zmq.POLLIN)
        if watch:
            self.watching[node] = 0.0
            self._renew(node, time.perf_counter())

    def disconnect(self, node: str) -> None:
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

    def send(self, node: str, req: ControlRequest, kind: str = "request") -> int:
        rid = next(self._rids)
        now = time.perf_counter()
        self.socks[node].send(encode(replace(req, rid=rid)), zmq.NOBLOCK)
        self.pending[rid] = Pending(node, kind, now)
        return rid

    def _renew(self, node: str, now: float) -> None:
        self.watching[node] = now + WATCH_RENEW_S
        # zmq.Again: not connected yet (a restarting node); the next renewal retries.
        with contextlib.suppress(zmq.Again):
            self.send(node, WatchRequest(), "watch")

    def pump(self, timeout_s: float) -> None:
        """Wait up to timeout_s for frames, then read every frame that is ready."""
        now = time.perf_counter()
        for node, renew_at in list(self.watching.items()):
            if now >= renew_at:
                self._renew(node, now)
        timeout_ms = min(POLL_SLICE_MS, max(0, math.ceil(timeout_s * 1000)))
        ready = dict(self.poller.poll(timeout_ms))
        for sock in ready:
            node = self.node_of.get(sock)
            if node is None:
                continue
            for _ in range(10_000):  # bounded drain
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                at = time.perf_counter()
                try:
                    msg = decode(frame)
                except ProtocolError:
                    continue
                if isinstance(msg, ViewUpdate):
                    self._set_view(node, {**msg.view, "ts": msg.ts}, at)
                elif isinstance(msg, Reply):
                    pend = self.pending.pop(msg.rid, None) if msg.rid is not None else None
                    if pend is None:
                        continue
                    if pend.kind == "watch":
                        if msg.ok:
                            self._set_view(node, dict(msg.body), at)
                    else:
                        self.replies[msg.rid] = (msg, at)  # type: ignore[index]

    def _set_view(self, node: str, view: dict[str, Any], at: float) -> None:
        self.views[node] = view
        self.view_at[node] = at
        self.first_view_at.setdefault(node, at)
        if self.on_view is not None:
            self.on_view(node, view, at)

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> float | None:
        """perf_counter time at which predicate became true, or None at the deadline."""
        deadline = time.perf_counter() + timeout_s
        while True:
            if predicate():
                return time.perf_counter()
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return None
            self.pump(remaining)

    def request_all(self, nodes: Iterable[str], make: Callable[[], ControlRequest],
                    timeout_s: float = REQUEST_TIMEOUT_S) -> dict[str, Reply]:
        """The same request to several nodes at once; the replies that came within timeout_s."""
        rids = {}
        for node in nodes:
            with contextlib.suppress(zmq.Again):  # a queue that is full: no reply to expect
                rids[self.send(node, make())] = node
        self.wait(lambda: all(r in self.replies for r in rids), timeout_s)
        out = {}
        for rid, node in rids.items():
            got = self.replies.pop(rid, None)
            if got is not None:
                out[node] = got[0]
            self.pending.pop(rid, None)
        return out

    def statuses(self, nodes: Iterable[str]) -> dict[str, dict[str, Any]]:
        return {n: dict(r.body) for n, r in self.request_all(nodes, StatusRequest).items()
                if r.ok}


def wait_agreement(mux: Mux, fleet: Fleet, timeout_s: float = STARTUP_TIMEOUT_S
                   ) -> dict[str, dict[str, Any]]:
    """Poll status until every node sees the whole grid, all links up, the expected total."""
    ids = sorted(fleet.ids)
    expected = fleet.expected_total()
    deadline = time.perf_counter() + timeout_s
    last: dict[str, dict[str, Any]] = {}
    for _ in range(100_000):
        last = mux.statuses(ids)
        if len(last) == len(ids) and all(
                s["island"] == ids and s["total_net"] == expected
                and all(sib["up"] for sib in s["siblings"]) for s in last.values()):
            return last
        if time.perf_counter() >= deadline:
            break
        time.sleep(0.05)
    seen = {n: (s.get("island_size"), s.get("total_net")) for n, s in last.items()}
    raise RuntimeError(f"grid did not agree within {timeout_s}s (expected {expected!r}); "
                       f"views: {seen}")


def counters_sum(statuses: dict[str, dict[str, Any]], name: str) -> int:
    return sum(int(s.get("counters", {}).get(name, 0)) for s in statuses.values())


def start_fleet(tmp: Path, ctx: zmq.Context[zmq.Socket[bytes]], n: int, degree: float,
                rng: random.Random, log_level: str, watch: bool) -> tuple[Fleet, Mux]:
    edges = random_topology(n, degree, rng)
    values = [(round(rng.uniform(0, 100), 3), round(rng.uniform(0, 100), 3)) for _ in range(n)]
    fleet = Fleet(tmp, n, edges, values, log_level)
    mux = Mux(ctx)
    try:
        fleet.start()
        for node in fleet.nodes:
            mux.connect(node.id, node.endpoint, watch=watch)
        wait_agreement(mux, fleet)
    except BaseException:
        mux.close()
        fleet.close()
        raise
    return fleet, mux


def topology_info(fleet: Fleet) -> dict[str, Any]:
    dist = hop_distances(fleet.n, fleet.edges)
    return {"nodes": fleet.n, "edges": len(fleet.edges),
            "avg_degree": 2 * len(fleet.edges) / fleet.n,
            "diameter": max(max(row) for row in dist), "edge_list": fleet.edges}


# ============================================================================ part 1: converge

# A bare pyzmq ROUTER echo in a second process: the transport cost of one hop on this machine,
# with no zgrid code in the path. Bounded by a count and a poll timeout; killed in `finally`.
_ECHO_SERVER = """
import sys, zmq
ctx = zmq.Context(); r = ctx.socket(zmq.ROUTER); r.setsockopt(zmq.LINGER, 0)
print(r.bind_to_random_port("tcp://127.0.0.1"), flush=True)
for _ in range(int(sys.argv[1])):
    if not r.poll(5000):
        break
    r.send_multipart(r.recv_multipart())
"""
CALIBRATION_ROUNDS = 400
CALIBRATION_GAP_S = 0.005  # long enough for both processes' threads to go idle between rounds


def calibrate_loopback(ctx: zmq.Context[zmq.Socket[bytes]]) -> dict[str, float]:
    """Round trip of a 100-byte frame between two Python pyzmq processes: hot and spaced."""
    proc = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER, str(3 * CALIBRATION_ROUNDS)],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent)
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        assert proc.stdout is not None
        sock.connect(f"tcp://{HOST}:{int(proc.stdout.readline())}")
        sock.send(b"warm-up")
        sock.recv()
        out: dict[str, float] = {}
        for name, gap_s in (("hot", 0.0), ("spaced", CALIBRATION_GAP_S)):
            rtts = []
            for _ in range(CALIBRATION_ROUNDS):
                if gap_s:
                    time.sleep(gap_s)
                t = time.perf_counter()
                sock.send(b"x" * 100)
                sock.recv()
                rtts.append(time.perf_counter() - t)
            out[f"{name}_rtt_p50_us"] = percentile(rtts, 50) * 1e6
            out[f"{name}_rtt_p99_us"] = percentile(rtts, 99) * 1e6
        return out
    finally:
        sock.close(linger=0)
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


def bench_converge(tmp: Path, ctx: zmq.Context[zmq.Socket[bytes]], n: int, changes: int,
                   rng: random.Random, log_level: str) -> dict[str, Any]:
    fleet, mux = start_fleet(tmp / f"converge{n}", ctx, n, CONVERGE_DEGREE[n], rng, log_level,
                             watch=True)
    try:
        topo = topology_info(fleet)
        dist = hop_distances(n, fleet.edges)
        ids = fleet.ids
        pids = [node.pid for node in fleet.nodes]
        mux.wait(lambda: len(mux.views) == n, REQUEST_TIMEOUT_S)
        records: list[dict[str, Any]] = []
        before = mux.statuses(ids)
        for k in range(changes):
            origin = rng.randrange(n)
            old_total = fleet.expected_total()
            for _ in range(1000):  # a change must move the total, or "converged" is vacuous
                new = (round(rng.uniform(0, 100), 3), round(rng.uniform(0, 100), 3))
                values = list(fleet.values)
                values[origin] = new
                expected = math.fsum(itertools.chain.from_iterable((p, -c) for p, c in values))
                if expected != old_total:
                    break
            fleet.values = values
            arrived: dict[str, float] = {}
            stamped: dict[str, float] = {}

            def on_view(node: str, view: dict[str, Any], at: float, expected: float = expected,
                        arrived: dict[str, float] = arrived,
                        stamped: dict[str, float] = stamped) -> None:
                if view.get("total_net") == expected and node not in arrived:
                    arrived[node] = at
                    stamped[node] = float(view.get("ts", math.nan))

            mux.on_view = on_view
            sched0 = [sched_ns(p) for p in pids]
            t0_wall = time.time()
            t0 = time.perf_counter()
            rid = mux.send(ids[origin], SetRequest(new[0], new[1]))
            done_at = mux.wait(lambda arrived=arrived: len(arrived) == n, CHANGE_TIMEOUT_S)
            mux.wait(lambda rid=rid: rid in mux.replies, REQUEST_TIMEOUT_S)
            ack = mux.replies.pop(rid, None)
            mux.on_view = None
            time.sleep(SETTLE_BETWEEN_CHANGES_S)
            sched1 = [sched_ns(p) for p in pids]
            cpu_ns = sum(a[0] - b[0] for a, b in zip(sched1, sched0, strict=True))
            wait_ns = sum(a[1] - b[1] for a, b in zip(sched1, sched0, strict=True))
            after = mux.statuses(ids)
            rec = {
                "change": k, "origin": ids[origin], "eccentricity": max(dist[origin]),
                "converged_ms": None if done_at is None else (done_at - t0) * 1000,
                "ack_ms": None if ack is None else (ack[1] - t0) * 1000,
                "ack_ok": None if ack is None else ack[0].ok,
                "per_node_ms": {nd: (t - t0) * 1000 for nd, t in arrived.items()},
                # The node's own wall-clock stamp of the view it pushed: free of this
                # process's scheduling delay (same machine, same clock).
                "node_stamped_ms": None if done_at is None else
                (max(stamped.values()) - t0_wall) * 1000,
                "node_cpu_ms": cpu_ns / 1e6,  # includes the settle pause (pings)
                "node_runqueue_wait_ms": wait_ns / 1e6,
                "hops": {ids[j]: dist[origin][j] for j in range(n)},
                "adverts_received": counters_sum(after, "adverts_received")
                - counters_sum(before, "adverts_received"),
                "adverts_accepted": counters_sum(after, "adverts_accepted")
                - counters_sum(before, "adverts_accepted"),
                "digests_sent": counters_sum(after, "digests_sent")
                - counters_sum(before, "digests_sent"),
                "sends_dropped": counters_sum(after, "sends_dropped")
                - counters_sum(before, "sends_dropped"),
            }
            records.append(rec)
            before = after
        conv = [r["converged_ms"] / 1000 for r in records if r["converged_ms"] is not None]
        acks = [r["ack_ms"] / 1000 for r in records if r["ack_ms"] is not None]
        stamped_all = [r["node_stamped_ms"] / 1000 for r in records
                       if r["node_stamped_ms"] is not None]
        # Mean arrival time per hop distance from the origin: the per-hop cost, measured.
        by_hop: dict[int, list[float]] = {}
        for r in records:
            for nd, ms in r["per_node_ms"].items():
                by_hop.setdefault(r["hops"][nd], []).append(ms)
        flaps = counters_sum(mux.statuses(ids), "link_flaps")
        return {
            "topology": topo,
            "changes": changes,
            "timeouts": sum(1 for r in records if r["converged_ms"] is None),
            "converged": summary_ms(conv),
            "set_ack": summary_ms(acks),
            "node_stamped": summary_ms(stamped_all),
            "node_cpu_ms_per_change": statistics.fmean(r["node_cpu_ms"] for r in records),
            "node_runqueue_wait_ms_per_change": statistics.fmean(
                r["node_runqueue_wait_ms"] for r in records),
            "arrival_by_hops_ms": {h: {"n": len(v), "mean_ms": statistics.fmean(v),
                                       "p50_ms": percentile(v, 50)}
                                   for h, v in sorted(by_hop.items())},
            "adverts_received_per_change": statistics.fmean(
                r["adverts_received"] for r in records),
            "adverts_accepted_per_change": statistics.fmean(
                r["adverts_accepted"] for r in records),
            "flood_model_adverts_per_change": 2 * len(fleet.edges) - (n - 1),
            "digests_sent_total": sum(r["digests_sent"] for r in records),
            "sends_dropped_total": sum(r["sends_dropped"] for r in records),
            "link_flaps_total": flaps,
            "physical_limit_ms": topo["diameter"] * LOOPBACK_HOP_US / 1000,
            "target_p50_ms": TARGET_P50_MS[n],
            "records": records,
        }
    finally:
        mux.close()
        fleet.close()


# ============================================================================ part 2: faults


def bench_faults(tmp: Path, ctx: zmq.Context[zmq.Socket[bytes]], trials: int,
                 rng: random.Random, log_level: str) -> dict[str, Any]:
    fleet, mux = start_fleet(tmp / "faults", ctx, FAULT_NODES, FAULT_DEGREE, rng, log_level,
                             watch=True)
    try:
        topo = topology_info(fleet)
        ids = fleet.ids
        everyone = sorted(ids)
        expected = fleet.expected_total()
        mux.wait(lambda: len(mux.views) == fleet.n, REQUEST_TIMEOUT_S)
        victims = rng.sample(range(fleet.n), trials)
        results: list[dict[str, Any]] = []
        for trial, v in enumerate(victims):
            victim = fleet.nodes[v]
            others = [i for i in ids if i != victim.id]
            # kill -9, then wait until no other node's island contains the victim.
            mux.disconnect(victim.id)  # its watch stream dies with it; do not wait on it
            t_kill = time.perf_counter()
            victim.kill9()
            excluded_at = mux.wait(
                lambda others=others, vid=victim.id: all(
                    o in mux.views and vid not in mux.views[o]["island"] for o in others),
                FAULT_TIMEOUT_S)
            per_node_excl = {o: (mux.view_at[o] - t_kill) * 1000 for o in others}
            # Restart with the same --id and --data-dir, wait until every island is whole again.
            others_back: dict[str, float] = {}

            def on_view(node: str, view: dict[str, Any], at: float, vid: str = victim.id,
                        others_back: dict[str, float] = others_back) -> None:
                if node != vid and vid in view.get("island", ()):
                    others_back.setdefault(node, at)

            mux.on_view = on_view
            t_start = time.perf_counter()
            victim.start()
            mux.connect(victim.id, victim.endpoint, watch=True)
            back_at = mux.wait(
                lambda: all(n in mux.views and mux.views[n]["island"] == everyone
                            and mux.views[n]["total_net"] == expected for n in ids),
                FAULT_TIMEOUT_S)
            mux.on_view = None
            others_back_ms = ((max(others_back.values()) - t_start) * 1000
                              if len(others_back) == len(others) else None)
            first_view_ms = ((mux.first_view_at[victim.id] - t_start) * 1000
                             if victim.id in mux.first_view_at else None)
            # When the restarted node itself saw its whole island again (the others' views
            # may get there first: they still hold its previous life's advert).
            own_view_whole_ms = (mux.view_at[victim.id] - t_start) * 1000 if (
                back_at is not None and victim.id in mux.view_at) else None
            results.append({
                "trial": trial, "victim": victim.id,
                "victim_degree": sum(1 for e in fleet.edges if v in e),
                "exclusion_ms": None if excluded_at is None else (excluded_at - t_kill) * 1000,
                "exclusion_per_node_ms": per_node_excl,
                "rejoin_ms": None if back_at is None else (back_at - t_start) * 1000,
                "victim_first_reply_ms": first_view_ms,
                "others_see_it_back_ms": others_back_ms,
                "victim_sees_whole_island_ms": own_view_whole_ms,
            })
            time.sleep(SETTLE_BETWEEN_TRIALS_S)
            mux.pump(0)
        statuses = mux.statuses(ids)
        excl = [r["exclusion_ms"] / 1000 for r in results if r["exclusion_ms"] is not None]
        rejoin = [r["rejoin_ms"] / 1000 for r in results if r["rejoin_ms"] is not None]
        return {
            "topology": topo, "trials": trials,
            "ping_interval_s": PING_INTERVAL_S, "dead_after_s": DEAD_AFTER_S,
            "exclusion": summary_ms(excl), "rejoin": summary_ms(rejoin),
            "exclusion_timeouts": sum(1 for r in results if r["exclusion_ms"] is None),
            "rejoin_timeouts": sum(1 for r in results if r["rejoin_ms"] is None),
            "target_exclusion_p50_ms": (DEAD_AFTER_S + TARGET_EXCLUSION_MARGIN_S) * 1000,
            "final_agreement": len(statuses) == fleet.n and all(
                s["island"] == everyone and s["total_net"] == expected
                for s in statuses.values()),
            "results": results,
        }
    finally:
        mux.close()
        fleet.close()


# ============================================================================ part 3: idle


def bench_idle(tmp: Path, ctx: zmq.Context[zmq.Socket[bytes]], window_s: float,
               rng: random.Random, log_level: str) -> dict[str, Any]:
    fleet, mux = start_fleet(tmp / "idle", ctx, IDLE_NODES, IDLE_DEGREE, rng, log_level,
                             watch=False)
    try:
        topo = topology_info(fleet)
        ids = fleet.ids
        before_status = mux.statuses(ids)
        # Close our control connections so that nothing but the nodes' own traffic is measured.
        mux.close()
        time.sleep(IDLE_WARMUP_S)
        pids = {node.id: node.pid for node in fleet.nodes}
        cpu0 = {n: sched_ns(p)[0] for n, p in pids.items()}
        tcp0 = tcp_sent_by_socket()
        t0 = time.perf_counter()
        time.sleep(window_s)
        elapsed = time.perf_counter() - t0
        cpu1 = {n: sched_ns(p)[0] for n, p in pids.items()}
        tcp1 = tcp_sent_by_socket()
        for node in fleet.nodes:
            mux.connect(node.id, node.endpoint)
        after_status = mux.statuses(ids)
        sent = tcp_sent_delta(tcp0, tcp1)
        per_node = {}
        for n, pid in pids.items():
            b, segs = sent.get(pid, (0, 0))
            per_node[n] = {
                "cpu_fraction": (cpu1[n] - cpu0[n]) / 1e9 / elapsed,
                "tcp_payload_bytes_per_s": b / elapsed,
                "tcp_wire_bytes_per_s": (b + segs * TCP_IP_HEADER_BYTES) / elapsed,
                "degree": sum(1 for e in fleet.edges if int(n[1:]) in e),
            }
        # Cross-check from the protocol: pings per second x encoded ping size.
        ping_bytes = len(encode(Ping("n00", 2**63, 2**63)))
        pings_model = statistics.fmean(v["degree"] for v in per_node.values()) / PING_INTERVAL_S
        cpu = [v["cpu_fraction"] for v in per_node.values()]
        payload = [v["tcp_payload_bytes_per_s"] for v in per_node.values()]
        wire = [v["tcp_wire_bytes_per_s"] for v in per_node.values()]
        return {
            "topology": topo, "window_s": elapsed,
            "cpu_fraction": {"mean": statistics.fmean(cpu), "max": max(cpu)},
            "tcp_payload_bytes_per_s": {"mean": statistics.fmean(payload), "max": max(payload)},
            "tcp_wire_bytes_per_s": {"mean": statistics.fmean(wire), "max": max(wire)},
            "model_ping_bytes": ping_bytes,
            "model_payload_bytes_per_s": pings_model * ping_bytes,
            "counter_deltas": {name: counters_sum(after_status, name)
                               - counters_sum(before_status, name)
                               for name in ("adverts_received", "digests_sent", "link_flaps",
                                            "sends_dropped")},
            "per_node": per_node,
            "target_cpu_fraction": TARGET_IDLE_CPU_FRACTION,
            "target_bytes_per_s": TARGET_IDLE_BYTES_PER_S,
        }
    finally:
        mux.close()
        fleet.close()


# ============================================================================ part 4: load


def bench_load(tmp: Path, ctx: zmq.Context[zmq.Socket[bytes]], duration_s: float,
               rng: random.Random, log_level: str) -> dict[str, Any]:
    fleet, mux = start_fleet(tmp / "load", ctx, LOAD_NODES, LOAD_DEGREE, rng, log_level,
                             watch=False)
    try:
        topo = topology_info(fleet)
        ids = fleet.ids
        n = fleet.n
        before = mux.statuses(ids)
        pids = {node.id: node.pid for node in fleet.nodes}
        cpu0 = {nd: sched_ns(p)[0] for nd, p in pids.items()}
        period_s = 1.0 / LOAD_RATE_HZ
        t_begin = time.perf_counter()
        # Staggered schedules: node i changes at t_begin + i*period/n + k*period.
        next_due = [t_begin + i * period_s / n for i in range(n)]
        outstanding: dict[int, int] = {}  # rid -> node index; at most one per node
        sent_at: dict[int, float] = {}
        busy = [False] * n
        sent = acked = refused = skipped = 0
        ack_s: list[float] = []
        deadline = t_begin + duration_s
        for _ in range(int(duration_s * LOAD_RATE_HZ * n * 4) + 1000):  # bounded
            now = time.perf_counter()
            if now >= deadline:
                break
            for i in range(n):
                if now >= next_due[i]:
                    # Missed ticks are skipped, not bunched: the rate stays at most 20/s/node.
                    while next_due[i] <= now:
                        next_due[i] += period_s
                    if busy[i]:
                        skipped += 1
                        continue
                    p, c = round(rng.uniform(0, 100), 3), round(rng.uniform(0, 100), 3)
                    fleet.values[i] = (p, c)
                    rid = mux.send(ids[i], SetRequest(p, c))
                    outstanding[rid], sent_at[rid] = i, time.perf_counter()
                    busy[i] = True
                    sent += 1
            mux.pump(max(0.0, min(next_due) - time.perf_counter()))
            for rid in [r for r in outstanding if r in mux.replies]:
                reply, at = mux.replies.pop(rid)
                i = outstanding.pop(rid)
                busy[i] = False
                if reply.ok:
                    acked += 1
                else:
                    refused += 1
                ack_s.append(at - sent_at.pop(rid))
        load_elapsed = time.perf_counter() - t_begin
        cpu1 = {nd: sched_ns(p)[0] for nd, p in pids.items()}
        mux.wait(lambda: not any(r not in mux.replies for r in outstanding),
                 LOAD_DRAIN_TIMEOUT_S)
        for rid in list(outstanding):
            got = mux.replies.pop(rid, None)
            if got is not None:
                acked += got[0].ok
                refused += not got[0].ok
        # Did every node end with the same, exact total?
        expected = fleet.expected_total()
        t_end = time.perf_counter()
        final: dict[str, dict[str, Any]] = {}
        for _ in range(10_000):
            final = mux.statuses(ids)
            if len(final) == n and all(s["total_net"] == expected for s in final.values()):
                break
            if time.perf_counter() - t_end > LOAD_CONVERGE_TIMEOUT_S:
                break
            time.sleep(0.02)
        settle_ms = (time.perf_counter() - t_end) * 1000
        not_up = sum(1 for s in final.values() for sib in s["siblings"] if not sib["up"])
        cpu = [(cpu1[nd] - cpu0[nd]) / 1e9 / load_elapsed for nd in ids]
        return {
            "topology": topo, "duration_s": load_elapsed, "rate_hz_per_node": LOAD_RATE_HZ,
            "sets_sent": sent, "sets_acked": acked, "sets_refused": refused,
            "ticks_skipped_reply_pending": skipped,
            "achieved_changes_per_s_per_node": sent / load_elapsed / n,
            "link_flaps": counters_sum(final, "link_flaps") - counters_sum(before, "link_flaps"),
            "siblings_not_up_at_end": not_up,
            "digests_sent": counters_sum(final, "digests_sent")
            - counters_sum(before, "digests_sent"),
            "sends_dropped": counters_sum(final, "sends_dropped")
            - counters_sum(before, "sends_dropped"),
            "adverts_received": counters_sum(final, "adverts_received")
            - counters_sum(before, "adverts_received"),
            "final_agreement": len(final) == n and all(
                s["total_net"] == expected for s in final.values()),
            "final_settle_ms": settle_ms,
            "cpu_fraction_per_node": {"mean": statistics.fmean(cpu), "max": max(cpu)},
            "set_ack_under_load": summary_ms(ack_s),
            "target_link_flaps": TARGET_LOAD_FLAPS,
        }
    finally:
        mux.close()
        fleet.close()


# ============================================================================ reporting


def report_converge(results: dict[str, Any]) -> None:
    rows = []
    for n, r in results.items():
        c = r["converged"]
        rows.append([f"N={n}", r["topology"]["edges"], fmt(r["topology"]["avg_degree"], 1),
                     r["topology"]["diameter"], c["n"], fmt(c["p50_ms"]), fmt(c["p99_ms"]),
                     fmt(c["max_ms"]), fmt(r["node_stamped"]["p50_ms"]),
                     fmt(r["set_ack"]["p50_ms"]), fmt(r["node_cpu_ms_per_change"], 1),
                     fmt(r["node_runqueue_wait_ms_per_change"], 1),
                     fmt(r["adverts_received_per_change"], 1),
                     r["flood_model_adverts_per_change"], fmt(r["physical_limit_ms"], 3),
                     f"< {r['target_p50_ms']:g}",
                     "met" if c["p50_ms"] < r["target_p50_ms"] else "MISSED", r["timeouts"]])
    print_table("Convergence: send `set` -> every node's watch shows the new total "
                "(nearest-rank percentiles: with 50 changes p99 is the max)",
                ["grid", "edges", "deg", "diam", "changes", "p50 ms", "p99 ms", "max ms",
                 "stamped p50", "ack p50 ms", "cpu ms/chg", "wait ms/chg",
                 "adverts/chg", "flood model",
                 "phys ms", "target p50", "", "timeouts"], rows)
    for n, r in results.items():
        print_table(f"N={n}: when the new total reached a node, by hops from the changed node",
                    ["hops", "samples", "mean ms", "p50 ms"],
                    [[h, v["n"], fmt(v["mean_ms"]), fmt(v["p50_ms"])]
                     for h, v in r["arrival_by_hops_ms"].items()])


def report_faults(r: dict[str, Any]) -> None:
    e, j = r["exclusion"], r["rejoin"]
    print_table(f"Faults: N={r['topology']['nodes']}, avg degree "
                f"{r['topology']['avg_degree']:.1f}, ping {r['ping_interval_s']} s, dead_after "
                f"{r['dead_after_s']} s, {r['trials']} trial(s)",
                ["measure", "p50 ms", "max ms", "target", "", "timeouts"],
                [["kill -9 -> excluded from every island", fmt(e["p50_ms"], 1),
                  fmt(e["max_ms"], 1), f"p50 <= {r['target_exclusion_p50_ms']:.0f} ms",
                  "met" if e["p50_ms"] <= r["target_exclusion_p50_ms"] else "MISSED",
                  r["exclusion_timeouts"]],
                 ["restart -> back in every island", fmt(j["p50_ms"], 1), fmt(j["max_ms"], 1),
                  "-", "", r["rejoin_timeouts"]]])
    print_table("Faults, per trial (restart columns: ms after the restarted process was "
                "spawned)",
                ["trial", "victim", "degree", "excluded ms", "rejoined ms", "1st reply ms",
                 "others see it ms", "it sees all ms"],
                [[t["trial"], t["victim"], t["victim_degree"], fmt(t["exclusion_ms"], 1),
                  fmt(t["rejoin_ms"], 1), fmt(t["victim_first_reply_ms"], 1),
                  fmt(t["others_see_it_back_ms"], 1), fmt(t["victim_sees_whole_island_ms"], 1)]
                 for t in r["results"]])


def report_idle(r: dict[str, Any]) -> None:
    cpu, pay, wire = r["cpu_fraction"], r["tcp_payload_bytes_per_s"], r["tcp_wire_bytes_per_s"]
    print_table(f"Idle: {r['topology']['nodes']} nodes, avg degree "
                f"{r['topology']['avg_degree']:.1f}, {r['window_s']:.1f} s window",
                ["measure (per node)", "mean", "max", "target", ""],
                [["CPU, % of one core", fmt(cpu["mean"] * 100, 3), fmt(cpu["max"] * 100, 3),
                  f"< {TARGET_IDLE_CPU_FRACTION * 100:g}",
                  "met" if cpu["max"] < TARGET_IDLE_CPU_FRACTION else "MISSED"],
                 ["TCP payload sent, B/s", fmt(pay["mean"], 0), fmt(pay["max"], 0),
                  f"< {TARGET_IDLE_BYTES_PER_S:g}",
                  "met" if pay["max"] < TARGET_IDLE_BYTES_PER_S else "MISSED"],
                 ["incl. TCP/IP headers, B/s", fmt(wire["mean"], 0), fmt(wire["max"], 0),
                  f"< {TARGET_IDLE_BYTES_PER_S:g}",
                  "met" if wire["max"] < TARGET_IDLE_BYTES_PER_S else "MISSED"],
                 ["model: pings x encoded size, B/s", fmt(r["model_payload_bytes_per_s"], 0),
                  "", "", ""]])
    print(f"  counters during the window (sum over nodes): {r['counter_deltas']}")


def report_load(r: dict[str, Any]) -> None:
    print_table(f"Load: {r['topology']['nodes']} nodes, avg degree "
                f"{r['topology']['avg_degree']:.1f}, {r['rate_hz_per_node']:g} changes/s per "
                f"node for {r['duration_s']:.1f} s",
                ["measure", "value", "target"],
                [["link flaps (counter)", r["link_flaps"], r["target_link_flaps"]],
                 ["siblings not up at the end", r["siblings_not_up_at_end"], 0],
                 ["sets sent / acked / refused",
                  f"{r['sets_sent']} / {r['sets_acked']} / {r['sets_refused']}", ""],
                 ["achieved changes/s per node", fmt(r["achieved_changes_per_s_per_node"], 1),
                  f"{r['rate_hz_per_node']:g}"],
                 ["ticks skipped (previous set unanswered)", r["ticks_skipped_reply_pending"],
                  ""],
                 ["set acknowledged, ms (p50 / p99 / max)",
                  f"{fmt(r['set_ack_under_load']['p50_ms'])} / "
                  f"{fmt(r['set_ack_under_load']['p99_ms'])} / "
                  f"{fmt(r['set_ack_under_load']['max_ms'])}", ""],
                 ["adverts received (sum over nodes)", r["adverts_received"], ""],
                 ["digests sent / sends dropped", f"{r['digests_sent']} / {r['sends_dropped']}",
                  ""],
                 ["CPU per node, % of a core (mean / max)",
                  f"{r['cpu_fraction_per_node']['mean'] * 100:.1f} / "
                  f"{r['cpu_fraction_per_node']['max'] * 100:.1f}", ""],
                 ["all nodes agree on the exact total after", "yes" if r["final_agreement"]
                  else "NO", ""],
                 ["  ... reached within ms after the load stopped", fmt(r["final_settle_ms"], 0),
                  ""]])


# ============================================================================ main


def wait_quiet(max_wait_s: float) -> dict[str, float]:
    """Sample the machine for PREFLIGHT_SAMPLE_S at a time until other processes are quiet."""
    deadline = time.perf_counter() + max_wait_s
    sample: dict[str, float] = {}
    for _ in range(int(max_wait_s / PREFLIGHT_SAMPLE_S) + 1):
        probe = Background()
        probe.begin()
        time.sleep(PREFLIGHT_SAMPLE_S)
        sample = probe.end()
        if sample["other_processes_cores"] <= BUSY_WARNING_CORES:
            break
        if time.perf_counter() >= deadline:
            break
    print(f"machine now: other processes use {sample['other_processes_cores']:.2f} cores, "
          f"load average {sample['loadavg_1m']:.2f}")
    return sample


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 10 changes, 1 fault trial, 3 s idle, 5 s load")
    parser.add_argument("--only", choices=["converge", "faults", "idle", "load"],
                        action="append", help="run only this part (repeatable)")
    parser.add_argument("--changes", type=int, help="changes per grid size in the converge "
                        f"part (default {CHANGES_FULL}, {CHANGES_QUICK} with --quick)")
    parser.add_argument("--seed", type=int, default=1, help="topologies and values")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="the nodes' --log-level (their logs go to files in the temp dir)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each part, wait up to this long for other processes to "
                        "stop using CPU (they skew every figure on a small machine)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the temp dir with every node's log and data dir")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    parts = args.only or ["converge", "faults", "idle", "load"]
    rng = random.Random(args.seed)

    # SIGTERM must reach the `finally` below just as Ctrl-C does.
    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited as ignored
    info = machine_info()
    print(f"machine: {info['nproc']} CPUs, {info['cpu_model']}, Python {info['python']}, "
          f"pyzmq {info['pyzmq']} / libzmq {info['libzmq']}, {info['platform']}")
    results: dict[str, Any] = {"machine": info, "seed": args.seed, "quick": args.quick,
                               "node_log_level": args.log_level, "started": time.time()}
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    tmp = Path(tempfile.mkdtemp(prefix="zgrid-bench-"))
    results["temp_dir"] = str(tmp)
    failed: list[str] = []
    try:
        for part in ("converge", "faults", "idle", "load"):
            if part not in parts:
                continue
            results[f"{part}_machine_before"] = wait_quiet(args.wait_quiet)
            background = Background()
            background.begin()
            try:
                result = run_part(part, tmp, ctx, rng, args.quick, args.log_level, args.changes)
            except (RuntimeError, OSError, zmq.ZMQError, subprocess.SubprocessError) as exc:
                # One broken part must not hide the others' figures; its nodes are already
                # killed by the part's own `finally`. Keep their logs for the post-mortem.
                failed.append(part)
                result = {"error": repr(exc)}
                print(f"\n{part}: FAILED: {exc!r}", file=sys.stderr)
            bg = background.end()
            results[part] = result
            results[f"{part}_machine_load"] = bg
            print(f"  machine during this part: {bg['machine_busy_cores']:.2f} cores busy, of "
                  f"which this benchmark and its nodes {bg['ours_cores']:.2f}, other processes "
                  f"{bg['other_processes_cores']:.2f}; load average {bg['loadavg_1m']:.2f}")
            if bg["other_processes_cores"] > BUSY_WARNING_CORES:
                print("  WARNING: other processes were using CPU during this part; its "
                      "figures are skewed by them")
            write_results(args.output, results)  # after each part: a later failure loses none
    except KeyboardInterrupt:
        print("\ninterrupted: every node was killed", file=sys.stderr)
        return 130
    finally:
        ctx.destroy(linger=0)
        if failed or args.keep_logs:
            print(f"node logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results["failed_parts"] = failed
    results["finished"] = time.time()
    write_results(args.output, results)
    print(f"\nwrote {args.output}")
    return 1 if failed else 0


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)  # a reader never sees half a file


def run_part(part: str, tmp: Path, ctx: zmq.Context[zmq.Socket[bytes]], rng: random.Random,
             quick: bool, log_level: str, changes: int | None = None) -> dict[Any, Any]:
    if part == "converge":
        changes = changes or (CHANGES_QUICK if quick else CHANGES_FULL)
        conv: dict[str, Any] = {str(n): bench_converge(tmp, ctx, n, changes, rng, log_level)
                                for n in CONVERGE_SIZES}
        calibration = calibrate_loopback(ctx)
        report_converge(conv)
        print(f"  bare pyzmq round trip between two Python processes on loopback: "
              f"p50 {calibration['hot_rtt_p50_us']:.0f} us back-to-back, "
              f"{calibration['spaced_rtt_p50_us']:.0f} us with {CALIBRATION_GAP_S * 1000:g} ms "
              "gaps (one hop is about half of that)")
        conv["loopback_calibration"] = calibration
        return conv
    if part == "faults":
        faults = bench_faults(tmp, ctx, FAULT_TRIALS_QUICK if quick else FAULT_TRIALS_FULL, rng,
                              log_level)
        report_faults(faults)
        return faults
    if part == "idle":
        idle = bench_idle(tmp, ctx, IDLE_WINDOW_QUICK_S if quick else IDLE_WINDOW_FULL_S, rng,
                          log_level)
        report_idle(idle)
        return idle
    load = bench_load(tmp, ctx, LOAD_DURATION_QUICK_S if quick else LOAD_DURATION_FULL_S, rng,
                      log_level)
    report_load(load)
    return load


if __name__ == "__main__":
    sys.exit(main())
