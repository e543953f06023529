"""Benchmark of real zgrid-node processes on loopback: convergence, faults, idle cost, load.

What it is for: measuring, on this machine, the figures issues 2 and 3 ask for, with real
`zgrid-node` processes talking ZeroMQ over 127.0.0.1 TCP (`make bench` runs it):

  converge  N = 4, 16 and 64 nodes on a random connected topology; 50 `set` changes one at a
            time; time from sending the set until every node's `watch` stream shows the new
            total (p50/p99/max), messages received per change (the nodes' messages_received
            counter) and CPU per handled message (schedstat CPU of all nodes / those messages).
            N = 4 and 16 run a second time with `--keys` (CurveZMQ and signed adverts) on the
            same topology, values and changes, and the difference is reported (issue 8).
  faults    N = 16, degree ~4: kill -9 a node, time until every other node's island excludes
            it; restart it (same --id and --data-dir), time until it is back in every island.
  idle      N = 16 idle nodes, node n00 with 8 siblings: CPU seconds per second and TCP bytes
            per second sent per node, and the CPU of the node with the most siblings.
  load      N = 16, every node changing its values 20 times a second for 30 s: link flaps.

It prints one table per part and writes bench-results/converge.json. The plumbing (node
processes, the multiplexed control client, percentiles) is zgrid.harness, shared with the tests.

What it must never do: bind or dial anything but 127.0.0.1; leave a process behind (every node is
killed in a `finally`, on Ctrl-C and SIGTERM too, and dies with this process via
PR_SET_PDEATHSIG); wait without a bound (every loop has a count or a deadline); put numbers in
the output that were not measured in this run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import zmq

from zgrid import core
from zgrid.harness import (
    HOST,
    RECONNECT_IVL_MS,
    ControlFleet,
    NodeProc,
    die_with_parent_preexec,
    free_port,
    percentile,
    require_loopback,
    summary,
    wait_until,
)
from zgrid.security import Membership, keygen, secure_client
from zgrid.views import stderr_progress
from zgrid.wire import Ping, SetRequest, encode

REPO = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO / "bench-results" / "converge.json"

# Node settings (the zgrid-node defaults, passed explicitly so the run documents them).
PING_INTERVAL_S = core.PING_INTERVAL_S
DEAD_AFTER_S = core.DEAD_AFTER_S

# Topologies: average degree per part. N=4 with degree 3 would be the complete graph (diameter 1),
# so N=4 uses 2.5 (5 of the 6 possible edges) to keep at least one 2-hop path.
CONVERGE_SIZES = (4, 16, 64)
CONVERGE_DEGREE = {4: 2.5, 16: 3.5, 64: 4.0}
CONVERGE_KEYS_SIZES = (4, 16)  # run again with --keys (issue 8)
CONVERGE_ATTEMPTS = 2  # per grid: a second start if the first grid could not start
OPERATOR_NAME = "operator"  # the control fleet's key: only an operator may `set` any node
FAULT_NODES, FAULT_DEGREE = 16, 4.0
IDLE_NODES, IDLE_DEGREE = 16, 4.0
IDLE_HUB_SIBLINGS = 8  # node n00 gets exactly this many: the idle target is about such a node
LOAD_NODES, LOAD_DEGREE = 16, 4.0
VALUE_MAX_KW = 100.0
VALUE_DECIMALS = 3

# Workload sizes (full run / --quick).
CHANGES_FULL, CHANGES_QUICK = 50, 10
FAULT_TRIALS_FULL, FAULT_TRIALS_QUICK = 5, 1
IDLE_WINDOW_FULL_S, IDLE_WINDOW_QUICK_S = 10.0, 3.0
LOAD_DURATION_FULL_S, LOAD_DURATION_QUICK_S = 30.0, 5.0
LOAD_RATE_HZ = 20.0  # changes per second per node (issue 3)

# Bounds on every wait.
STARTUP_TIMEOUT_MIN_S = 60.0  # 16 Python interpreters importing pyzmq on 2 cores take a while
STARTUP_TIMEOUT_PER_NODE_S = 1.5  # ... and 64 take proportionally longer
CHANGE_TIMEOUT_S = 5.0  # one change that has not converged by then is recorded as a timeout
REQUEST_TIMEOUT_S = 5.0
FAULT_TIMEOUT_S = 15.0  # per kill and per restart
LOAD_DRAIN_TIMEOUT_S = 5.0
LOAD_CONVERGE_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
AGREEMENT_POLL_S = 0.05
LOAD_SETTLE_POLL_S = 0.02
SETTLE_BETWEEN_CHANGES_S = 0.05  # lets redundant flood copies land before counters are read
SETTLE_BETWEEN_TRIALS_S = 1.0
IDLE_WARMUP_S = 2.0  # after agreement, so start-up handshakes are not counted as idle traffic
MAX_VALUE_DRAWS = 1000  # a change must move the total; bounded redraws until it does

# Targets (issues 2 and 3) and the physical yardstick.
LOOPBACK_HOP_US = 60.0  # the issues' figure for one loopback TCP hop; measured below too
TARGET_P50_MS = {4: 1.0, 16: 5.0, 64: 20.0}
TARGET_CPU_PER_MESSAGE_US = 100.0
# A killed node's siblings hear its connections close, so exclusion is one flood, not
# dead_after of silence (which was the target, plus 50 ms, while silence was all there was).
TARGET_EXCLUSION_P50_MS = 100.0
TARGET_IDLE_HUB_CPU_FRACTION = 0.003  # a node with IDLE_HUB_SIBLINGS siblings
TARGET_IDLE_BYTES_PER_S = 2048.0
TARGET_LOAD_FLAPS = 0

PREFLIGHT_SAMPLE_S = 1.0  # how long the machine's own load is sampled before starting
PROGRESS_SLICE_S = 1.0  # a timed window (idle) is slept in slices this long, to move its bar
BUSY_WARNING_CORES = 0.1  # other processes' CPU above which a part's figures are flagged
TCP_IP_HEADER_BYTES = 52  # IPv4 (20) + TCP with timestamps (32), per segment on loopback
NS_PER_S, NS_PER_MS, NS_PER_US = 1e9, 1e6, 1e3
MS_PER_S, US_PER_S, US_PER_MS = 1e3, 1e6, 1e3

# ============================================================================ small helpers


def summary_ms(values_s: Sequence[float]) -> dict[str, float]:
    """harness.summary of seconds, in milliseconds, keys suffixed `_ms` (except n)."""
    return {k if k == "n" else f"{k}_ms": v if k == "n" else v * MS_PER_S
            for k, v in summary(values_s).items()}


def fmt(x: float | int | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}"


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def counters_sum(statuses: dict[str, dict[str, Any]], name: str) -> int:
    return sum(int(s.get("counters", {}).get(name, 0)) for s in statuses.values())


def counter_deltas(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]],
                   names: Iterable[str]) -> dict[str, int]:
    return {name: counters_sum(after, name) - counters_sum(before, name) for name in names}


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": sys.version.split()[0],
            "platform": platform.platform(), "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version()}


# ============================================================================ /proc and ss


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


STARTED: list[NodeProc] = []  # every node ever started, for Background's CPU accounting


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
            if node.alive:
                with contextlib.suppress(OSError):
                    total += cpu_seconds(node.pid)
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
SS_TIMEOUT_S = 10.0


def tcp_sent_by_socket() -> dict[tuple[int, str], tuple[int, int]]:
    """{(pid, "local peer"): (bytes_sent, segs_out)} for every established TCP socket we may see.

    From `ss -tinp`: the kernel's tcp_info per socket. bytes_sent is TCP payload (ZMTP frames,
    retransmissions included), segs_out counts every segment (pure ACKs included).
    """
    out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True,
                         text=True, timeout=SS_TIMEOUT_S, check=True).stdout
    result: dict[tuple[int, str], tuple[int, int]] = {}
    key: tuple[int, str] | None = None
    for line in out.splitlines():
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


def random_topology(n: int, avg_degree: float, rng: random.Random, hub_siblings: int = 0
                    ) -> list[tuple[int, int]]:
    """A random connected graph: a random spanning tree plus random extra edges up to
    avg_degree. With hub_siblings, node 0 has exactly that many siblings and, as far as the
    extra edges decide, the most (the tree and the extra edges are drawn among the others;
    node 0 hangs on its siblings)."""
    others = list(range(1, n)) if hub_siblings else list(range(n))
    edges: set[tuple[int, int]] = {(0, b) for b in rng.sample(others, hub_siblings)}
    order = list(others)
    rng.shuffle(order)
    for i in range(1, len(order)):
        a, b = order[i], order[rng.randrange(i)]
        edges.add((min(a, b), max(a, b)))
    degree = [sum(1 for e in edges if i in e) for i in range(n)]
    possible = hub_siblings + len(others) * (len(others) - 1) // 2
    target = min(round(n * avg_degree / 2), possible)
    for _ in range(100 * n * n):  # bounded; a dense target fills long before this
        if len(edges) >= target:
            break
        a, b = rng.sample(others, 2)
        edge = (min(a, b), max(a, b))
        if edge in edges or (hub_siblings and max(degree[a], degree[b]) >= hub_siblings):
            continue
        edges.add(edge)
        degree[a] += 1
        degree[b] += 1
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


def random_values(rng: random.Random) -> tuple[float, float]:
    return (round(rng.uniform(0, VALUE_MAX_KW), VALUE_DECIMALS),
            round(rng.uniform(0, VALUE_MAX_KW), VALUE_DECIMALS))


def exact_total(values: Iterable[tuple[float, float]]) -> float:
    """What every node must agree on: computed exactly, so floats compare with ==."""
    return math.fsum(itertools.chain.from_iterable((p, -c) for p, c in values))


# ============================================================================ one grid per part


@dataclass
class Run:
    """What every part shares: where nodes live, the zmq context, the RNG, the log level."""

    tmp: Path
    ctx: zmq.Context[zmq.Socket[bytes]]
    rng: random.Random
    log_level: str


class SecureFleet(ControlFleet):
    """harness.ControlFleet over CURVE, authenticated as `as_name` (ControlFleet itself speaks
    plain TCP only). Each connection expects the node's own key, as zgrid-ctl does."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], keys: Path,
                 as_name: str = OPERATOR_NAME) -> None:
        super().__init__(ctx)
        self.membership = Membership(keys)
        self.as_name = as_name

    def connect(self, node: str, endpoint: str, watch: bool = False) -> None:
        # ControlFleet.connect with the CURVE options set before the socket connects.
        require_loopback(endpoint)
        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        secure_client(sock, self.membership, self.as_name, node)
        sock.connect(endpoint)
        self.socks[node] = sock
        self.node_of[sock] = node
        self.poller.register(sock, zmq.POLLIN)
        if watch:
            self._renew(node, time.perf_counter())


def make_keys(directory: Path, node_ids: Iterable[str]) -> Path:
    """A keys directory for a grid: every node's keys and one operator's (the control fleet)."""
    for node_id in node_ids:
        keygen(directory, node_id)
    keygen(directory, OPERATOR_NAME, operator=True)
    return directory


@dataclass
class BenchGrid:
    """N node processes on one topology, and one ControlFleet connected to all of them."""

    edges: list[tuple[int, int]]
    values: list[tuple[float, float]]  # (production, consumption) per node, as last set
    nodes: list[NodeProc]
    control: ControlFleet

    @property
    def n(self) -> int:
        return len(self.nodes)

    @property
    def ids(self) -> list[str]:
        return [node.id for node in self.nodes]

    def degree(self, i: int) -> int:
        return sum(1 for e in self.edges if i in e)

    def expected_total(self) -> float:
        return exact_total(self.values)

    def statuses(self) -> dict[str, dict[str, Any]]:
        return self.control.statuses(self.ids, REQUEST_TIMEOUT_S)

    def topology(self) -> dict[str, Any]:
        dist = hop_distances(self.n, self.edges)
        return {"nodes": self.n, "edges": len(self.edges),
                "avg_degree": 2 * len(self.edges) / self.n,
                "max_degree": max(self.degree(i) for i in range(self.n)),
                "diameter": max(max(row) for row in dist), "edge_list": self.edges}


def wait_agreement(grid: BenchGrid, timeout_s: float,
                   agreeing: Callable[[int], None] = lambda count: None
                   ) -> dict[str, dict[str, Any]]:
    """Poll status until every node sees the whole grid, all links up, the expected total;
    `agreeing(count)` after each poll, with how many nodes already do (a progress bar)."""
    ids = sorted(grid.ids)
    expected = grid.expected_total()
    last: dict[str, dict[str, Any]] = {}

    def agreed() -> tuple[list[str], dict[str, dict[str, Any]]] | None:
        # A node that exited (e.g. its port was taken before it could bind) ends the wait at
        # once: the grid can no longer agree.
        dead = [node.id for node in grid.nodes if not node.alive]
        if dead:
            return dead, {}
        last.clear()
        last.update(grid.statuses())
        done = sum(1 for s in last.values() if s["island"] == ids and s["total_net"] == expected
                   and all(sib["up"] for sib in s["siblings"]))
        agreeing(done)
        return ([], dict(last)) if len(last) == len(ids) == done else None

    try:
        dead, statuses = wait_until(agreed, timeout_s, AGREEMENT_POLL_S, "the grid to agree")
    except AssertionError as exc:
        seen = {n: (s.get("island_size"), s.get("total_net")) for n, s in last.items()}
        raise RuntimeError(f"grid did not agree within {timeout_s}s (expected {expected!r}); "
                           f"views: {seen}") from exc
    if dead:
        tails = {nd.id: nd.log_text().strip().splitlines()[-1:] for nd in grid.nodes
                 if nd.id in dead and nd.log_path.exists()}
        raise RuntimeError(f"node(s) exited before the grid agreed: {tails}")
    return statuses


@contextlib.contextmanager
def running_grid(run: Run, name: str, n: int, avg_degree: float, *, watch: bool,
                 hub_siblings: int = 0, keys: bool = False,
                 node_args: Callable[[int], Sequence[str]] | None = None
                 ) -> Iterator[BenchGrid]:
    """Start N nodes on a random topology, connect the control fleet (watching every node if
    `watch`), wait until they agree; kill every node on the way out, whatever happens.
    With `keys`, every node runs with --keys (one keys directory for the grid, as in the
    README) and the control fleet speaks CURVE as the operator. `node_args(i)`: extra
    zgrid-node arguments of node i (e.g. a flexibility offer)."""
    edges = random_topology(n, avg_degree, run.rng, hub_siblings)
    values = [random_values(run.rng) for _ in range(n)]
    tmp = run.tmp / name
    tmp.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(n)]
    ids = [f"n{i:02d}" for i in range(n)]
    keys_dir = make_keys(tmp / "keys", ids) if keys else None
    nodes = []
    for i, node_id in enumerate(ids):
        args = ["--production", repr(values[i][0]), "--consumption", repr(values[i][1]),
                "--ping-interval", str(PING_INTERVAL_S), "--dead-after", str(DEAD_AFTER_S),
                *(node_args(i) if node_args else ())]
        # Each edge is given to one end only; the other end links back by itself. With keys
        # a sibling is named ID@ENDPOINT, so its CURVE key can be looked up.
        for a, _ in (e for e in edges if e[1] == i):
            args += ["--sibling", f"{ids[a]}@tcp://{HOST}:{ports[a]}" if keys
                     else f"tcp://{HOST}:{ports[a]}"]
        nodes.append(NodeProc(node_id, ports[i], tmp / node_id, tmp / f"{node_id}.log",
                              tuple(args), keys=keys_dir, log_level=run.log_level))
    control = ControlFleet(run.ctx) if keys_dir is None else SecureFleet(run.ctx, keys_dir)
    grid = BenchGrid(edges, values, nodes, control)
    try:
        # Starting 64 interpreters on 2 cores takes a while: a bar (on a terminal) counts the
        # nodes that agree. It ends before the grid is used, so it never nests with another.
        with stderr_progress(f"{name}: {n} nodes starting, agreeing", total=n) as agreeing:
            for node in nodes:
                STARTED.append(node)
                node.start(die_with_parent=True)
            for node in nodes:
                grid.control.connect(node.id, node.endpoint, watch=watch)
            wait_agreement(grid, max(STARTUP_TIMEOUT_MIN_S, n * STARTUP_TIMEOUT_PER_NODE_S),
                           agreeing)
        if watch:
            grid.control.wait(lambda: len(grid.control.views) == n, REQUEST_TIMEOUT_S)
        yield grid
    finally:
        grid.control.close()
        for node in nodes:
            try:
                node.kill(timeout=STOP_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as exc:
                print(f"warning: could not kill {node.id}: {exc}", file=sys.stderr)


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
CALIBRATION_RCVTIMEO_MS = 5000
CALIBRATION_FRAME = b"x" * 100


def calibrate_loopback(ctx: zmq.Context[zmq.Socket[bytes]]) -> dict[str, float]:
    """Round trip of a 100-byte frame between two Python pyzmq processes: hot and spaced."""
    proc = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER, str(3 * CALIBRATION_ROUNDS)],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            preexec_fn=die_with_parent_preexec())
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, CALIBRATION_RCVTIMEO_MS)
    try:
        assert proc.stdout is not None
        sock.connect(f"tcp://{HOST}:{int(proc.stdout.readline())}")
        sock.send(b"warm-up")
        sock.recv()
        out: dict[str, float] = {}
        for name, gap_s in (("hot", 0.0), ("spaced", CALIBRATION_GAP_S)):
            rtts = []
            echo_run_before = sched_ns(proc.pid)[0]
            for _ in range(CALIBRATION_ROUNDS):
                if gap_s:
                    time.sleep(gap_s)
                t = time.perf_counter()
                sock.send(CALIBRATION_FRAME)
                sock.recv()
                rtts.append(time.perf_counter() - t)
            out[f"{name}_rtt_p50_us"] = percentile(rtts, 50) * US_PER_S
            out[f"{name}_rtt_p99_us"] = percentile(rtts, 99) * US_PER_S
            # The physical floor of a forwarding node: a bare pyzmq process woken by one
            # frame, receiving it and sending one back (both of its threads, kernel included).
            out[f"{name}_echo_cpu_us_per_message"] = (
                (sched_ns(proc.pid)[0] - echo_run_before) / 1e3 / CALIBRATION_ROUNDS)
        return out
    finally:
        sock.close(linger=0)
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


def one_change(grid: BenchGrid, origin: int, rng: random.Random,
               before: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Set a new value on `origin`, time it until every watch shows the new exact total, then
    count what all nodes did for it: CPU (schedstat), messages and adverts (status counters
    since `before`). The record, and the statuses after it (the next change's `before`)."""
    n, ids, ctl = grid.n, grid.ids, grid.control
    old_total = grid.expected_total()
    for _ in range(MAX_VALUE_DRAWS):  # a change must move the total, or "converged" is vacuous
        new = random_values(rng)
        values = [*grid.values[:origin], new, *grid.values[origin + 1:]]
        expected = exact_total(values)
        if expected != old_total:
            break
    grid.values = values
    arrived: dict[str, float] = {}
    stamped: dict[str, float] = {}

    def on_view(node: str, view: dict[str, Any], at: float) -> None:
        if view.get("total_net") == expected and node not in arrived:
            arrived[node] = at
            stamped[node] = float(view.get("ts", math.nan))

    pids = [node.pid for node in grid.nodes]
    ctl.on_view = on_view
    sched0 = [sched_ns(p) for p in pids]
    t0_wall = time.time()
    t0 = time.perf_counter()
    rid = ctl.send(ids[origin], SetRequest(new[0], new[1]))
    done_at = ctl.wait(lambda: len(arrived) == n, CHANGE_TIMEOUT_S)
    ctl.wait(lambda: rid in ctl.replies, REQUEST_TIMEOUT_S)
    ack = ctl.replies.pop(rid, None)
    ctl.on_view = None
    time.sleep(SETTLE_BETWEEN_CHANGES_S)
    sched1 = [sched_ns(p) for p in pids]
    after = grid.statuses()  # after sched1: answering status is not the change's CPU
    cpu_ns = sum(a[0] - b[0] for a, b in zip(sched1, sched0, strict=True))
    wait_ns = sum(a[1] - b[1] for a, b in zip(sched1, sched0, strict=True))
    deltas = counter_deltas(before, after, ("messages_received", "adverts_received",
                                            "adverts_accepted", "digests_sent", "sends_dropped",
                                            "bad_signatures"))
    messages = deltas["messages_received"]
    return {
        "origin": ids[origin],
        "converged_ms": None if done_at is None else (done_at - t0) * MS_PER_S,
        "ack_ms": None if ack is None else (ack[1] - t0) * MS_PER_S,
        "ack_ok": None if ack is None else ack[0].ok,
        "per_node_ms": {nd: (t - t0) * MS_PER_S for nd, t in arrived.items()},
        # The node's own wall-clock stamp of the view it pushed: free of this process's
        # scheduling delay (same machine, same clock).
        "node_stamped_ms": None if done_at is None else
        (max(stamped.values()) - t0_wall) * MS_PER_S,
        "node_cpu_ms": cpu_ns / NS_PER_MS,  # includes the settle pause (and its pings)
        "node_runqueue_wait_ms": wait_ns / NS_PER_MS,
        # Pings of the same window are in both the CPU and the message count.
        "cpu_us_per_message": cpu_ns / NS_PER_US / messages if messages else None,
        **deltas,
    }, after


def bench_converge(run: Run, n: int, changes: int, keys: bool = False) -> dict[str, Any]:
    with running_grid(run, f"converge{n}{'-keys' if keys else ''}", n, CONVERGE_DEGREE[n],
                      watch=True, keys=keys) as grid:
        topo = grid.topology()
        dist = hop_distances(n, grid.edges)
        records: list[dict[str, Any]] = []
        statuses = grid.statuses()
        with stderr_progress(f"converge N={n}{' --keys' if keys else ''}: changes",
                             total=changes) as move:
            for k in range(changes):
                origin = run.rng.randrange(n)
                rec, statuses = one_change(grid, origin, run.rng, statuses)
                records.append({"change": k, "eccentricity": max(dist[origin]),
                                "hops": {grid.ids[j]: dist[origin][j] for j in range(n)},
                                **rec})
                move(k + 1)  # between changes: never inside a timed one
        flaps = counters_sum(statuses, "link_flaps")
    conv = [r["converged_ms"] / MS_PER_S for r in records if r["converged_ms"] is not None]
    acks = [r["ack_ms"] / MS_PER_S for r in records if r["ack_ms"] is not None]
    stamped_all = [r["node_stamped_ms"] / MS_PER_S for r in records
                   if r["node_stamped_ms"] is not None]
    per_message = [r["cpu_us_per_message"] for r in records
                   if r["cpu_us_per_message"] is not None]
    # Arrival time per hop distance from the origin: the per-hop cost, measured.
    by_hop: dict[int, list[float]] = {}
    for r in records:
        for nd, ms in r["per_node_ms"].items():
            by_hop.setdefault(r["hops"][nd], []).append(ms)
    total_messages = sum(r["messages_received"] for r in records)

    def mean_of(key: str) -> float:
        return statistics.fmean(r[key] for r in records)

    return {
        "topology": topo, "changes": changes, "keys": keys,
        "timeouts": sum(1 for r in records if r["converged_ms"] is None),
        "converged": summary_ms(conv), "set_ack": summary_ms(acks),
        "node_stamped": summary_ms(stamped_all),
        "node_cpu_ms_per_change": mean_of("node_cpu_ms"),
        "node_runqueue_wait_ms_per_change": mean_of("node_runqueue_wait_ms"),
        "messages_received_per_change": mean_of("messages_received"),
        "cpu_us_per_message": summary(per_message),
        "cpu_us_per_message_all_changes": sum(r["node_cpu_ms"] for r in records)
        * US_PER_MS / total_messages if total_messages else None,
        "arrival_by_hops_ms": {h: {"n": len(v), "mean_ms": statistics.fmean(v),
                                   "p50_ms": percentile(v, 50)}
                               for h, v in sorted(by_hop.items())},
        "adverts_received_per_change": mean_of("adverts_received"),
        "adverts_accepted_per_change": mean_of("adverts_accepted"),
        "flood_model_adverts_per_change": 2 * len(grid.edges) - (n - 1),
        # Once the topology has settled the flood is pruned to a tree (zgrid/flood.py): one
        # advert per node but the origin. The median shows it; the mean includes the changes
        # made while the topology was still settling, which go over every link.
        "tree_model_adverts_per_change": n - 1,
        "adverts_received_per_change_p50": statistics.median(
            r["adverts_received"] for r in records),
        "digests_sent_total": sum(r["digests_sent"] for r in records),
        "sends_dropped_total": sum(r["sends_dropped"] for r in records),
        "bad_signatures_total": sum(r["bad_signatures"] for r in records),
        "link_flaps_total": flaps,
        "physical_limit_ms": topo["diameter"] * LOOPBACK_HOP_US / MS_PER_S,
        "target_p50_ms": TARGET_P50_MS[n],
        "target_cpu_us_per_message": TARGET_CPU_PER_MESSAGE_US,
        "records": records,
    }


KEYS_COMPARED = (("converged", "p50_ms"), ("converged", "p99_ms"), ("converged", "max_ms"),
                 ("node_stamped", "p50_ms"), ("set_ack", "p50_ms"))


def add_transport_floor(result: dict[str, Any], hop_us: float) -> None:
    """What a change would take with no zgrid code at all: the `set` to the origin, one hop
    per eccentricity to the farthest node, and that node's view back to the benchmark, each a
    bare pyzmq hop between processes asleep when the frame arrives (`hop_us`, half the spaced
    round trip measured in the same run). The target minus this is what all the processing on
    a change's critical path may take."""
    floors = [(r["eccentricity"] + 2) * hop_us / US_PER_MS for r in result["records"]]
    result["transport_floor_ms"] = summary(floors)
    result["woken_hop_us"] = hop_us


def keys_difference(plain: dict[str, Any], keyed: dict[str, Any]) -> dict[str, Any]:
    """keyed - plain for the latency figures and the CPU per change, of two runs on the same
    topology, values and changes; and the extra CPU per advert accepted (each one verified)."""
    diff: dict[str, Any] = {f"{part}_{key}": keyed[part][key] - plain[part][key]
                            for part, key in KEYS_COMPARED}
    diff["converged_p50_pct"] = (100.0 * diff["converged_p50_ms"] / plain["converged"]["p50_ms"]
                                 if plain["converged"]["p50_ms"] else None)
    cpu = keyed["node_cpu_ms_per_change"] - plain["node_cpu_ms_per_change"]
    diff["node_cpu_ms_per_change"] = cpu
    accepted = keyed["adverts_accepted_per_change"]
    diff["node_cpu_us_per_advert_accepted"] = cpu * US_PER_MS / accepted if accepted else None
    diff["same_topology"] = plain["topology"]["edge_list"] == keyed["topology"]["edge_list"]
    diff["same_changes"] = ([r["origin"] for r in plain["records"]]
                            == [r["origin"] for r in keyed["records"]])
    return diff


def bench_converge_sizes(run: Run, sizes: Sequence[int], changes: int,
                         keys_sizes: Sequence[int]) -> dict[str, Any]:
    """bench_converge for each size; sizes in keys_sizes run again with --keys right after
    their unsigned run (close in time, so other load skews both alike), from the same RNG
    state: the same topology, values and changes. run.rng continues from the unsigned runs
    only, so the other parts draw the topologies they drew before keys were measured."""
    conv: dict[str, Any] = {}
    keyed: dict[str, Any] = {}
    failed: list[str] = []

    def attempt(label: str, n: int, rng: random.Random, state: Any, keys: bool
                ) -> dict[str, Any]:
        # A grid that fails to start (typically a node whose free port was taken before it
        # bound it, on a machine busy with other tests) is started again once from the same
        # RNG state, i.e. the same topology, values and changes; the retry is recorded.
        errors: list[str] = []
        for _ in range(CONVERGE_ATTEMPTS):
            rng.setstate(state)
            try:
                result = bench_converge(replace(run, rng=rng), n, changes, keys=keys)
            except (RuntimeError, OSError, zmq.ZMQError, subprocess.SubprocessError) as exc:
                errors.append(repr(exc))
                print(f"\nconverge {label}: attempt {len(errors)} FAILED: {exc!r}"[:400],
                      file=sys.stderr)
                continue
            return {**result, "attempts": len(errors) + 1, "failed_attempts": errors}
        failed.append(label)
        return {"error": errors[-1], "failed_attempts": errors}

    for n in sizes:
        state = run.rng.getstate()
        conv[str(n)] = attempt(f"N={n}", n, run.rng, state, keys=False)
        if n in keys_sizes:
            keyed[str(n)] = attempt(f"N={n} --keys", n, random.Random(), state, keys=True)
            if "error" not in keyed[str(n)] and "error" not in conv[str(n)]:
                keyed[str(n)]["difference_vs_unsigned"] = keys_difference(conv[str(n)],
                                                                          keyed[str(n)])
    if keyed:
        conv["with_keys"] = keyed
    conv["failed"] = failed
    return conv


# ============================================================================ part 2: faults


def one_fault(grid: BenchGrid, v: int) -> dict[str, Any]:
    """kill -9 node v and time its exclusion; restart it and time its return."""
    ctl, ids, victim = grid.control, grid.ids, grid.nodes[v]
    everyone, expected = sorted(ids), grid.expected_total()
    others = [i for i in ids if i != victim.id]
    ctl.disconnect(victim.id)  # its watch stream dies with it; do not wait on it
    t_kill = time.perf_counter()
    victim.kill(timeout=STOP_TIMEOUT_S)
    excluded_at = ctl.wait(lambda: all(o in ctl.views and victim.id not in ctl.views[o]["island"]
                                       for o in others), FAULT_TIMEOUT_S)
    per_node_excl = {o: (ctl.view_at[o] - t_kill) * MS_PER_S for o in others}
    # Restart with the same --id and --data-dir, wait until every island is whole again.
    others_back: dict[str, float] = {}

    def on_view(node: str, view: dict[str, Any], at: float) -> None:
        if node != victim.id and victim.id in view.get("island", ()):
            others_back.setdefault(node, at)

    ctl.on_view = on_view
    t_start = time.perf_counter()
    victim.start(die_with_parent=True)
    ctl.connect(victim.id, victim.endpoint, watch=True)
    back_at = ctl.wait(lambda: all(n in ctl.views and ctl.views[n]["island"] == everyone
                                   and ctl.views[n]["total_net"] == expected for n in ids),
                       FAULT_TIMEOUT_S)
    ctl.on_view = None

    def since_start(at: float | None) -> float | None:
        return None if at is None else (at - t_start) * MS_PER_S

    return {
        "victim": victim.id, "victim_degree": grid.degree(v),
        "exclusion_ms": None if excluded_at is None else (excluded_at - t_kill) * MS_PER_S,
        "exclusion_per_node_ms": per_node_excl,
        "rejoin_ms": since_start(back_at),
        "victim_first_reply_ms": since_start(ctl.first_view_at.get(victim.id)),
        "others_see_it_back_ms": since_start(max(others_back.values()))
        if len(others_back) == len(others) else None,
        # When the restarted node itself saw its whole island again (the others' views may
        # get there first: they still hold its previous life's advert).
        "victim_sees_whole_island_ms": since_start(ctl.view_at.get(victim.id))
        if back_at is not None else None,
    }


def bench_faults(run: Run, trials: int) -> dict[str, Any]:
    with running_grid(run, "faults", FAULT_NODES, FAULT_DEGREE, watch=True) as grid:
        topo = grid.topology()
        results: list[dict[str, Any]] = []
        with stderr_progress("faults: kill -9 and restart trials", total=trials) as move:
            for trial, v in enumerate(run.rng.sample(range(grid.n), trials)):
                results.append({"trial": trial, **one_fault(grid, v)})
                move(trial + 1)
                time.sleep(SETTLE_BETWEEN_TRIALS_S)
                grid.control.pump(0)
        statuses = grid.statuses()
        everyone, expected = sorted(grid.ids), grid.expected_total()
    excl = [r["exclusion_ms"] / MS_PER_S for r in results if r["exclusion_ms"] is not None]
    rejoin = [r["rejoin_ms"] / MS_PER_S for r in results if r["rejoin_ms"] is not None]
    return {
        "topology": topo, "trials": trials,
        "ping_interval_s": PING_INTERVAL_S, "dead_after_s": DEAD_AFTER_S,
        "exclusion": summary_ms(excl), "rejoin": summary_ms(rejoin),
        "exclusion_timeouts": sum(1 for r in results if r["exclusion_ms"] is None),
        "rejoin_timeouts": sum(1 for r in results if r["rejoin_ms"] is None),
        "target_exclusion_p50_ms": TARGET_EXCLUSION_P50_MS,
        "final_agreement": len(statuses) == topo["nodes"] and all(
            s["island"] == everyone and s["total_net"] == expected for s in statuses.values()),
        "results": results,
    }


# ============================================================================ part 3: idle

IDLE_COUNTERS = ("messages_received", "messages_sent", "bytes_sent", "adverts_received",
                 "digests_sent", "link_flaps", "sends_dropped")


def bench_idle(run: Run, window_s: float) -> dict[str, Any]:
    with running_grid(run, "idle", IDLE_NODES, IDLE_DEGREE, watch=False,
                      hub_siblings=IDLE_HUB_SIBLINGS) as grid:
        topo = grid.topology()
        before_status = grid.statuses()
        t_before_status = time.perf_counter()
        # Close our control connections so that nothing but the nodes' own traffic is measured.
        grid.control.close()
        time.sleep(IDLE_WARMUP_S)
        pids = {node.id: node.pid for node in grid.nodes}
        cpu0 = {n: sched_ns(p)[0] for n, p in pids.items()}
        tcp0 = tcp_sent_by_socket()
        t0 = time.perf_counter()
        with stderr_progress(f"idle: {IDLE_NODES} nodes, a {window_s:g} s window",
                             total=window_s) as move:
            while (left := t0 + window_s - time.perf_counter()) > 0:  # ends at the deadline
                time.sleep(min(left, PROGRESS_SLICE_S))
                move(min(window_s, time.perf_counter() - t0))
        elapsed = time.perf_counter() - t0
        cpu1 = {n: sched_ns(p)[0] for n, p in pids.items()}
        tcp1 = tcp_sent_by_socket()
        for node in grid.nodes:
            grid.control.connect(node.id, node.endpoint)
        after_status = grid.statuses()
        status_span_s = time.perf_counter() - t_before_status
    sent = tcp_sent_delta(tcp0, tcp1)
    per_node = {}
    for i, (n, pid) in enumerate(pids.items()):
        b, segs = sent.get(pid, (0, 0))
        counted = (after_status.get(n, {}).get("counters", {}).get("bytes_sent", 0)
                   - before_status.get(n, {}).get("counters", {}).get("bytes_sent", 0))
        per_node[n] = {
            "cpu_fraction": (cpu1[n] - cpu0[n]) / NS_PER_S / elapsed,
            "tcp_payload_bytes_per_s": b / elapsed,
            "tcp_wire_bytes_per_s": (b + segs * TCP_IP_HEADER_BYTES) / elapsed,
            # The node's own count of frame bytes, over the span between the two statuses.
            "counter_bytes_sent_per_s": counted / status_span_s,
            "degree": grid.degree(i),
        }
    busiest = max(per_node, key=lambda nd: per_node[nd]["degree"])
    # Cross-check from the protocol: pings per second x encoded ping size.
    ping_bytes = len(encode(Ping("n00", 2**63, 2**63)))
    pings_model = statistics.fmean(v["degree"] for v in per_node.values()) / PING_INTERVAL_S

    def mean_max(key: str) -> dict[str, float]:
        vals = [v[key] for v in per_node.values()]
        return {"mean": statistics.fmean(vals), "max": max(vals),
                "most_siblings": per_node[busiest][key]}

    return {
        "topology": topo, "window_s": elapsed,
        "most_siblings_node": busiest, "most_siblings": per_node[busiest]["degree"],
        "cpu_fraction": mean_max("cpu_fraction"),
        "tcp_payload_bytes_per_s": mean_max("tcp_payload_bytes_per_s"),
        "tcp_wire_bytes_per_s": mean_max("tcp_wire_bytes_per_s"),
        "counter_bytes_sent_per_s": mean_max("counter_bytes_sent_per_s"),
        "model_ping_bytes": ping_bytes,
        "model_payload_bytes_per_s": pings_model * ping_bytes,
        "counter_deltas": counter_deltas(before_status, after_status, IDLE_COUNTERS),
        "per_node": per_node,
        "target_most_siblings_cpu_fraction": TARGET_IDLE_HUB_CPU_FRACTION,
        "target_bytes_per_s": TARGET_IDLE_BYTES_PER_S,
    }


# ============================================================================ part 4: load

LOAD_COUNTERS = ("link_flaps", "digests_sent", "sends_dropped", "adverts_received",
                 "messages_received")


def drive_load(grid: BenchGrid, rng: random.Random, duration_s: float,
               move: Callable[[float], None] = lambda elapsed_s: None) -> dict[str, Any]:
    """Send `set` to every node on its own LOAD_RATE_HZ schedule for duration_s; at most one
    unanswered `set` per node (a tick that finds one pending is skipped and counted).
    `move(elapsed_s)` after each pump (a progress bar, which redraws rarely)."""
    n, ids, ctl = grid.n, grid.ids, grid.control
    period_s = 1.0 / LOAD_RATE_HZ
    t_begin = time.perf_counter()
    # Staggered schedules: node i changes at t_begin + i*period/n + k*period.
    next_due = [t_begin + i * period_s / n for i in range(n)]
    outstanding: dict[int, tuple[int, float]] = {}  # rid -> (node index, sent at)
    sent = acked = refused = skipped = 0
    ack_s: list[float] = []
    deadline = t_begin + duration_s
    for _ in range(int(duration_s * LOAD_RATE_HZ * n * 4) + 1000):  # bounded
        now = time.perf_counter()
        if now >= deadline:
            break
        busy = {i for i, _ in outstanding.values()}
        for i in range(n):
            if now < next_due[i]:
                continue
            # Missed ticks are skipped, not bunched: the rate stays at most LOAD_RATE_HZ.
            while next_due[i] <= now:
                next_due[i] += period_s
            if i in busy:
                skipped += 1
                continue
            grid.values[i] = random_values(rng)
            rid = ctl.send(ids[i], SetRequest(*grid.values[i]))
            outstanding[rid] = (i, time.perf_counter())
            sent += 1
        ctl.pump(max(0.0, min(next_due) - time.perf_counter()))
        move(now - t_begin)
        for rid in [r for r in outstanding if r in ctl.replies]:
            reply, at = ctl.replies.pop(rid)
            acked += reply.ok
            refused += not reply.ok
            ack_s.append(at - outstanding.pop(rid)[1])
    elapsed = time.perf_counter() - t_begin
    ctl.wait(lambda: all(r in ctl.replies for r in outstanding), LOAD_DRAIN_TIMEOUT_S)
    for rid in list(outstanding):
        got = ctl.replies.pop(rid, None)
        if got is not None:
            acked += got[0].ok
            refused += not got[0].ok
    return {"duration_s": elapsed, "sets_sent": sent, "sets_acked": acked,
            "sets_refused": refused, "ticks_skipped_reply_pending": skipped,
            "set_ack_under_load": summary_ms(ack_s)}


def bench_load(run: Run, duration_s: float) -> dict[str, Any]:
    with running_grid(run, "load", LOAD_NODES, LOAD_DEGREE, watch=False) as grid:
        topo, n = grid.topology(), grid.n
        before = grid.statuses()
        pids = [node.pid for node in grid.nodes]
        cpu0 = [sched_ns(p)[0] for p in pids]
        with stderr_progress(f"load: {n} nodes at {LOAD_RATE_HZ:g} Hz each, {duration_s:g} s",
                             total=duration_s) as move:
            driven = drive_load(grid, run.rng, duration_s, move)
        cpu1 = [sched_ns(p)[0] for p in pids]
        # Did every node end with the same, exact total?
        expected = grid.expected_total()
        t_end = time.perf_counter()
        final: dict[str, dict[str, Any]] = {}

        def agreed() -> bool:
            final.clear()
            final.update(grid.statuses())
            return len(final) == n and all(s["total_net"] == expected for s in final.values())

        try:
            wait_until(agreed, LOAD_CONVERGE_TIMEOUT_S, LOAD_SETTLE_POLL_S, "final agreement")
            agreement = True
        except AssertionError:
            agreement = False
        settle_ms = (time.perf_counter() - t_end) * MS_PER_S
    deltas = counter_deltas(before, final, LOAD_COUNTERS)
    cpu_ns = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    cpu = [ns / NS_PER_S / driven["duration_s"] for ns in cpu_ns]
    return {
        "topology": topo, "rate_hz_per_node": LOAD_RATE_HZ, **driven,
        "achieved_changes_per_s_per_node": driven["sets_sent"] / driven["duration_s"] / n,
        "siblings_not_up_at_end": sum(1 for s in final.values() for sib in s["siblings"]
                                      if not sib["up"]),
        **deltas,
        # CPU of the load window over every message of the run (the final polls add a few).
        "cpu_us_per_message": sum(cpu_ns) / NS_PER_US / deltas["messages_received"]
        if deltas["messages_received"] else None,
        "final_agreement": agreement, "final_settle_ms": settle_ms,
        "cpu_fraction_per_node": {"mean": statistics.fmean(cpu), "max": max(cpu)},
        "target_link_flaps": TARGET_LOAD_FLAPS,
    }


# ============================================================================ reporting


def report_converge(results: dict[str, Any]) -> None:
    print_table("Convergence: send `set` -> every node's watch shows the new total "
                "(random connected topologies, average degree `deg`; nearest-rank "
                "percentiles: with 50 changes p99 is the max)",
                ["grid", "edges", "deg", "diam", "changes", "p50 ms", "p99 ms", "max ms",
                 "stamped p50", "ack p50 ms", "phys ms", "floor p50", "target p50", "",
                 "timeouts"],
                [[f"N={n}", r["topology"]["edges"], fmt(r["topology"]["avg_degree"], 1),
                  r["topology"]["diameter"], r["converged"]["n"], fmt(r["converged"]["p50_ms"]),
                  fmt(r["converged"]["p99_ms"]), fmt(r["converged"]["max_ms"]),
                  fmt(r["node_stamped"]["p50_ms"]), fmt(r["set_ack"]["p50_ms"]),
                  fmt(r["physical_limit_ms"], 3),
                  fmt(r.get("transport_floor_ms", {}).get("p50"), 3), f"<= {r['target_p50_ms']:g}",
                  met(r["converged"]["p50_ms"] <= r["target_p50_ms"]), r["timeouts"]]
                 for n, r in results.items()])
    print_table("Convergence, cost per change (all nodes; messages = the messages_received "
                "counter, pings of the same window included; us/msg = CPU / messages)",
                ["grid", "cpu ms/chg", "wait ms/chg", "msgs/chg", "adverts/chg",
                 "adverts p50", "flood model", "tree model", "us/msg p50", "us/msg max",
                 "target", ""],
                [[f"N={n}", fmt(r["node_cpu_ms_per_change"], 1),
                  fmt(r["node_runqueue_wait_ms_per_change"], 1),
                  fmt(r["messages_received_per_change"], 1),
                  fmt(r["adverts_received_per_change"], 1),
                  fmt(r["adverts_received_per_change_p50"], 1),
                  r["flood_model_adverts_per_change"], r["tree_model_adverts_per_change"],
                  fmt(r["cpu_us_per_message"]["p50"], 0), fmt(r["cpu_us_per_message"]["max"], 0),
                  f"<= {r['target_cpu_us_per_message']:g}",
                  met(r["cpu_us_per_message"]["p50"] <= r["target_cpu_us_per_message"])]
                 for n, r in results.items()])
    for n, r in results.items():
        print_table(f"N={n}: when the new total reached a node, by hops from the changed node",
                    ["hops", "samples", "mean ms", "p50 ms"],
                    [[h, v["n"], fmt(v["mean_ms"]), fmt(v["p50_ms"])]
                     for h, v in r["arrival_by_hops_ms"].items()])


def report_converge_keys(plain: dict[str, Any], keyed: dict[str, Any]) -> None:
    def signed(x: float | None, digits: int = 2) -> str:
        return "-" if x is None or math.isnan(x) else f"{x:+.{digits}f}"

    rows = []
    for n, k in keyed.items():
        p, d = plain[n], k["difference_vs_unsigned"]
        rows.append([f"N={n}", fmt(k["converged"]["p50_ms"]), fmt(k["converged"]["p99_ms"]),
                     fmt(k["converged"]["max_ms"]), signed(d["converged_p50_ms"]),
                     signed(d["converged_p99_ms"]), signed(d["converged_max_ms"]),
                     signed(d["converged_p50_pct"], 0) + " %",
                     signed(d["node_stamped_p50_ms"]), fmt(k["set_ack"]["p50_ms"]),
                     f"{fmt(k['node_cpu_ms_per_change'], 1)} / "
                     f"{fmt(p['node_cpu_ms_per_change'], 1)}",
                     fmt(k["adverts_accepted_per_change"], 1),
                     signed(d["node_cpu_us_per_advert_accepted"], 0),
                     k["bad_signatures_total"], k["timeouts"],
                     "yes" if d["same_topology"] and d["same_changes"] else "NO"])
    print_table("Convergence with --keys (CurveZMQ, every advert signed and verified): the same "
                "topology, values and changes as the unsigned run; d = keys - unsigned",
                ["grid", "p50 ms", "p99 ms", "max ms", "d p50", "d p99", "d max", "d p50 %",
                 "d stamped p50", "ack p50 ms", "cpu ms/chg keys / unsigned",
                 "verified/chg", "d cpu us/verified", "bad sigs", "timeouts", "same run"],
                rows)


def report_faults(r: dict[str, Any]) -> None:
    e, j = r["exclusion"], r["rejoin"]
    print_table(f"Faults: N={r['topology']['nodes']}, avg degree "
                f"{r['topology']['avg_degree']:.1f}, ping {r['ping_interval_s']} s, dead_after "
                f"{r['dead_after_s']} s, {r['trials']} trial(s)",
                ["measure", "p50 ms", "max ms", "target", "", "timeouts"],
                [["kill -9 -> excluded from every island", fmt(e["p50_ms"], 1),
                  fmt(e["max_ms"], 1), f"p50 <= {r['target_exclusion_p50_ms']:.0f} ms",
                  met(e["p50_ms"] <= r["target_exclusion_p50_ms"]), r["exclusion_timeouts"]],
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
    hub, cpu_target = r["most_siblings_node"], r["target_most_siblings_cpu_fraction"]
    bytes_target = r["target_bytes_per_s"]

    def row(label: str, key: str, scale: float, digits: int, target: str, ok: bool | None
            ) -> list[str]:
        v = r[key]
        return [label, fmt(v["mean"] * scale, digits), fmt(v["max"] * scale, digits),
                fmt(v["most_siblings"] * scale, digits), target, "" if ok is None else met(ok)]

    print_table(f"Idle: {r['topology']['nodes']} nodes, avg degree "
                f"{r['topology']['avg_degree']:.1f}, {r['window_s']:.1f} s window",
                ["measure (per node)", "mean", "max", f"{hub} ({r['most_siblings']} siblings)",
                 "target", ""],
                [row("CPU, % of one core", "cpu_fraction", 100, 3,
                     f"{hub}: < {cpu_target * 100:g}",
                     r["cpu_fraction"]["most_siblings"] < cpu_target),
                 row("TCP payload sent, B/s", "tcp_payload_bytes_per_s", 1, 0,
                     f"max: < {bytes_target:g}",
                     r["tcp_payload_bytes_per_s"]["max"] < bytes_target),
                 row("incl. TCP/IP headers, B/s", "tcp_wire_bytes_per_s", 1, 0,
                     f"max: < {bytes_target:g}",
                     r["tcp_wire_bytes_per_s"]["max"] < bytes_target),
                 row("node's bytes_sent counter, B/s", "counter_bytes_sent_per_s", 1, 0, "",
                     None),
                 ["model: pings x encoded size, B/s", fmt(r["model_payload_bytes_per_s"], 0),
                  "", "", "", ""]])
    print(f"  counters during the window (sum over nodes): {r['counter_deltas']}")


def report_load(r: dict[str, Any]) -> None:
    ack = r["set_ack_under_load"]
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
                  f"{fmt(ack['p50_ms'])} / {fmt(ack['p99_ms'])} / {fmt(ack['max_ms'])}", ""],
                 ["messages / adverts received (sum over nodes)",
                  f"{r['messages_received']} / {r['adverts_received']}", ""],
                 ["CPU per message received, us", fmt(r["cpu_us_per_message"], 0), ""],
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
    with stderr_progress("sampling the machine's load" + (
            f", waiting up to {max_wait_s:g} s for quiet" if max_wait_s else "")) as move:
        for _ in range(int(max_wait_s / PREFLIGHT_SAMPLE_S) + 1):
            probe = Background()
            probe.begin()
            time.sleep(PREFLIGHT_SAMPLE_S)
            sample = probe.end()
            if sample["other_processes_cores"] <= BUSY_WARNING_CORES:
                break
            if time.perf_counter() >= deadline:
                break
            move(0)
    print(f"machine now: other processes use {sample['other_processes_cores']:.2f} cores, "
          f"load average {sample['loadavg_1m']:.2f}")
    return sample


def run_part(part: str, run: Run, quick: bool, changes: int | None,
             sizes: Sequence[int] = CONVERGE_SIZES,
             keys_sizes: Sequence[int] = CONVERGE_KEYS_SIZES) -> dict[str, Any]:
    if part == "converge":
        per_size = changes or (CHANGES_QUICK if quick else CHANGES_FULL)
        # Before and after the grids: this VM's wakeup cost moves within minutes.
        calibration_before = calibrate_loopback(run.ctx)
        conv = bench_converge_sizes(run, sizes, per_size, keys_sizes)
        calibration = calibrate_loopback(run.ctx)
        hop_us = min(calibration_before["spaced_rtt_p50_us"],
                     calibration["spaced_rtt_p50_us"]) / 2
        for r in [*conv.values(), *conv.get("with_keys", {}).values()]:
            if isinstance(r, dict) and "records" in r:
                add_transport_floor(r, hop_us)
        plain = {n: r for n, r in conv.items()
                 if n not in ("with_keys", "failed") and "error" not in r}
        report_converge(plain)
        keyed = {n: r for n, r in conv.get("with_keys", {}).items()
                 if "difference_vs_unsigned" in r}
        if keyed:
            report_converge_keys(plain, keyed)
        for label in conv["failed"]:
            print(f"  converge {label}: FAILED twice, no figures (see the errors in the JSON)")
        print(f"  bare pyzmq round trip between two Python processes on loopback: "
              f"p50 {calibration['hot_rtt_p50_us']:.0f} us back-to-back, "
              f"{calibration['spaced_rtt_p50_us']:.0f} us with "
              f"{CALIBRATION_GAP_S * MS_PER_S:g} ms gaps (one hop is about half of that; "
              f"{calibration_before['spaced_rtt_p50_us']:.0f} us before the grids; the floor "
              f"takes the smaller)")
        print(f"  bare pyzmq echo process, CPU per frame received and sent back: "
              f"{calibration['spaced_echo_cpu_us_per_message']:.0f} us when woken by each "
              f"frame, {calibration['hot_echo_cpu_us_per_message']:.0f} us back-to-back "
              "(the floor of the CPU per message above)")
        conv["loopback_calibration_before"] = calibration_before
        conv["loopback_calibration"] = calibration
        return conv
    if part == "faults":
        faults = bench_faults(run, FAULT_TRIALS_QUICK if quick else FAULT_TRIALS_FULL)
        report_faults(faults)
        return faults
    if part == "idle":
        idle = bench_idle(run, IDLE_WINDOW_QUICK_S if quick else IDLE_WINDOW_FULL_S)
        report_idle(idle)
        return idle
    load = bench_load(run, LOAD_DURATION_QUICK_S if quick else LOAD_DURATION_FULL_S)
    report_load(load)
    return load


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)  # a reader never sees half a file


def add_run_options(parser: argparse.ArgumentParser, output: Path, seed_help: str) -> None:
    """The options every bench script takes: seed, node log level, quiet wait, logs, output."""
    parser.add_argument("--seed", type=int, default=1, help=seed_help)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="the nodes' --log-level (their logs go to files in the temp dir)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each part, wait up to this long for other processes to "
                        "stop using CPU (they skew every figure on a small machine)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the temp dir with every node's log and data dir")
    parser.add_argument("--output", type=Path, default=output)


def stop_on_sigterm() -> None:
    """SIGTERM must reach a script's `finally` just as Ctrl-C does: nodes killed, temp dir
    handled. SIGINT too, even if it was inherited as ignored."""
    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def report_machine_load(bg: dict[str, float]) -> None:
    print(f"  machine during this part: {bg['machine_busy_cores']:.2f} cores busy, of "
          f"which this benchmark and its nodes {bg['ours_cores']:.2f}, other processes "
          f"{bg['other_processes_cores']:.2f}; load average {bg['loadavg_1m']:.2f}")
    if bg["other_processes_cores"] > BUSY_WARNING_CORES:
        print("  WARNING: other processes were using CPU during this part; its "
              "figures are skewed by them")


def keep_or_remove(tmp: Path, keep: bool) -> None:
    """The temp dir of node logs and data dirs: kept after a failure or on request."""
    if keep:
        print(f"node logs kept in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def finish(output: Path, results: dict[str, Any], failed: list[str]) -> int:
    """Write the final results; the exit status (1 if a part failed)."""
    results["failed_parts"] = failed
    results["finished"] = time.time()
    write_results(output, results)
    print(f"\nwrote {output}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 10 changes, 1 fault trial, 3 s idle, 5 s load")
    parser.add_argument("--only", choices=["converge", "faults", "idle", "load"],
                        action="append", help="run only this part (repeatable)")
    parser.add_argument("--changes", type=int, help="changes per grid size in the converge "
                        f"part (default {CHANGES_FULL}, {CHANGES_QUICK} with --quick)")
    parser.add_argument("--sizes", type=int, nargs="+", choices=CONVERGE_SIZES,
                        default=list(CONVERGE_SIZES), metavar="N",
                        help="grid sizes in the converge part (default: 4 16 64). A size's "
                        "topology depends on the sizes run before it: `--sizes 4 16` draws "
                        "what the full run draws")
    parser.add_argument("--no-keys", action="store_true",
                        help="skip the second converge run of N=4 and 16 with --keys")
    add_run_options(parser, RESULTS_PATH, "topologies and values")
    args = parser.parse_args(argv)
    parts = args.only or ["converge", "faults", "idle", "load"]

    stop_on_sigterm()
    info = machine_info()
    print(f"machine: {info['nproc']} CPUs, {info['cpu_model']}, Python {info['python']}, "
          f"pyzmq {info['pyzmq']} / libzmq {info['libzmq']}, {info['platform']}")
    results: dict[str, Any] = {"machine": info, "seed": args.seed, "quick": args.quick,
                               "node_log_level": args.log_level, "started": time.time()}
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    tmp = Path(tempfile.mkdtemp(prefix="zgrid-bench-"))
    run = Run(tmp, ctx, random.Random(args.seed), args.log_level)
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
                result = run_part(part, run, args.quick, args.changes, sorted(args.sizes),
                                  () if args.no_keys else CONVERGE_KEYS_SIZES)
            except (RuntimeError, OSError, zmq.ZMQError, subprocess.SubprocessError) as exc:
                # One broken part must not hide the others' figures; its nodes are already
                # killed by running_grid. Keep their logs for the post-mortem.
                failed.append(part)
                result = {"error": repr(exc)}
                print(f"\n{part}: FAILED: {exc!r}", file=sys.stderr)
            if result.get("failed"):  # converge: some grid sizes failed, the others measured
                failed.append(part)
            bg = background.end()
            results[part] = result
            results[f"{part}_machine_load"] = bg
            report_machine_load(bg)
            write_results(args.output, results)  # after each part: a later failure loses none
    except KeyboardInterrupt:
        print("\ninterrupted: every node was killed", file=sys.stderr)
        return 130
    finally:
        ctx.destroy(linger=0)
        keep_or_remove(tmp, bool(failed) or args.keep_logs)
    return finish(args.output, results, failed)


if __name__ == "__main__":
    sys.exit(main())
