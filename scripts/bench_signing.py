"""Benchmark of signed adverts: what Ed25519 costs, per call and in one real zgrid-node.

What it is for: measuring the cost issue 8 asks for (`make bench` runs it before
bench_converge.py):

  micro  `AdvertSeal.sign` and `Keyring.verify` (zgrid/signing.py) on realistic adverts (4
         links, a real endpoint, a 16-member keyring), each call timed with
         time.perf_counter(): p50/p99/max in microseconds, and the verifications per second
         of one core from a tight loop. Also the forged path (a bad signature) and
         `Advert.signed_bytes()` alone, which both operations pay.
  node   one real `zgrid-node` fed new versions of other members' adverts as fast as it takes
         them, by a sibling this script plays over ZeroMQ (it answers the node's HELLO, so
         the link is UP, then sends `adverts` messages). With `--keys` (CURVE and
         signed adverts, every one verified) and without, 1 and 50 adverts per message:
         adverts accepted per wall second (the node's `adverts_accepted` counter) and the
         node's CPU per accepted advert (schedstat: all threads, and the main thread alone).

It prints one table per part and writes bench-results/signing.json. Machine load, process
accounting and table printing are bench_converge.py's.

What it must never do: bind or dial anything but 127.0.0.1; leave a process behind (the node
is killed in a `finally` and dies with this process via PR_SET_PDEATHSIG); wait without a
bound; put numbers in the output that were not measured in this run.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import bench_converge as bc
import zmq

from zgrid.client import Client
from zgrid.errors import ProtocolError, ZgridError
from zgrid.harness import HOST, NodeProc, free_port, summary
from zgrid.security import Membership, ZapHandler, keygen, secure_client, secure_server
from zgrid.signing import AdvertSeal, Keyring, new_keypair
from zgrid.views import stderr_progress
from zgrid.wire import Advert, Adverts, Hello, Ping, decode, encode

REPO = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO / "bench-results" / "signing.json"

# Realistic adverts: a 16-member grid, 4 links each, loopback endpoints, 3-decimal kW values.
MEMBERS = 16
OWN_INDEX = 7  # the member whose seal signs in `micro` (any one: all keys are alike)
LINKS_PER_ADVERT = 4
VALUE_MAX_KW = 100.0
VALUE_DECIMALS = 3
FIRST_PORT = 5001  # the endpoints written into the adverts (nobody dials them)

# micro: iterations per operation (full / --quick), and the untimed warm-up before each.
MICRO_ITERATIONS_FULL, MICRO_ITERATIONS_QUICK = 20_000, 2_000
MICRO_WARMUP = 500

# node: adverts per run (full / --quick), adverts per message, origins the adverts are from.
NODE_ADVERTS_FULL, NODE_ADVERTS_QUICK = 50_000, 5_000
NODE_BATCHES = (1, 50)  # 1: how floods arrive one change at a time; 50: a burst, anti-entropy
NODE_ORIGINS = 4  # members whose adverts are fed (not running: only their keys exist)
SIBLING_NAME, TARGET_NAME, OPERATOR_NAME = "m", "t", "operator"
SIBLING_NONCE = 4242
STATUS_POLL_S = 0.02  # how often the node's counters are read during a run
STATUS_TIMEOUT_S = 5.0
LINK_TIMEOUT_S = 30.0  # interpreter start and imports on a busy 2-core machine
RUN_TIMEOUT_S = 120.0
KEEPALIVE_S = bc.PING_INTERVAL_S  # our sibling must not go silent for the node's dead_after
ROUTER_POLL_MS = 20  # one wait for the node's HELLO or ZAP request, between status checks
MAX_DRAIN_FRAMES = 10_000  # frames read from our ROUTER per pump: bounds one pump's work
SETTLE_AFTER_LINK_S = 0.5  # the link-up flood and digest exchange are over before we measure
STOP_TIMEOUT_S = 5.0
NS_PER_US, NS_PER_S, US_PER_S = 1e3, 1e9, 1e6


# ============================================================================ adverts


def member_names() -> list[str]:
    return [f"n{i:02d}" for i in range(MEMBERS)]


def realistic_advert(origin: str, index: int, seq: int, rng: random.Random) -> Advert:
    """An advert as a node of a 16-member grid writes it: 4 sorted links, its endpoint."""
    names = [n for n in member_names() if n != origin]
    links = tuple(sorted(rng.sample(names, LINKS_PER_ADVERT)))
    return Advert(origin, 3, seq, round(rng.uniform(0, VALUE_MAX_KW), VALUE_DECIMALS),
                  round(rng.uniform(0, VALUE_MAX_KW), VALUE_DECIMALS), links,
                  f"tcp://{HOST}:{FIRST_PORT + index}", rng.getrandbits(64))


# ============================================================================ part 1: micro


def time_calls(fn: Callable[[Advert], object], adverts: Sequence[Advert]) -> list[float]:
    """Seconds per call of fn on each advert, one perf_counter pair per call."""
    out = []
    clock = time.perf_counter
    for a in adverts:
        t = clock()
        fn(a)
        out.append(clock() - t)
    return out


def loop_rate(fn: Callable[[Advert], object], adverts: Sequence[Advert]) -> float:
    """Calls per second in a tight loop, no per-call timer (what one core sustains)."""
    t = time.perf_counter()
    for a in adverts:
        fn(a)
    return len(adverts) / (time.perf_counter() - t)


def summary_us(values_s: Sequence[float]) -> dict[str, float]:
    return {k if k == "n" else f"{k}_us": v if k == "n" else v * US_PER_S
            for k, v in summary(values_s).items()}


def bench_micro(iterations: int, rng: random.Random) -> dict[str, Any]:
    names = member_names()
    seeds, publics = {}, {}
    for name in names:
        publics[name], seeds[name] = new_keypair()
    keyring = Keyring(publics)
    seals = {name: AdvertSeal(seeds[name], keyring) for name in names}
    own = names[OWN_INDEX]
    # Fresh adverts for every call (new seq, values, links): nothing is cached between calls.
    mine = [realistic_advert(own, OWN_INDEX, seq, rng)
            for seq in range(MICRO_WARMUP + iterations)]
    others = []
    for seq in range(MICRO_WARMUP + iterations):
        i = seq % MEMBERS
        others.append(seals[names[i]].sign(realistic_advert(names[i], i, seq, rng)))
    forged = [replace(a, seq=a.seq + 1) for a in others]  # signed, then changed: invalid
    assert all(keyring.verify(a) for a in others[:100])
    assert not any(keyring.verify(a) for a in forged[:100])
    seal = seals[own]
    ops: dict[str, tuple[Callable[[Advert], object], list[Advert]]] = {
        "sign": (seal.sign, mine),
        "verify": (keyring.verify, others),
        "verify_forged": (keyring.verify, forged),
        "signed_bytes": (Advert.signed_bytes, others),
    }
    results: dict[str, Any] = {}
    with stderr_progress("micro: operations timed", total=len(ops)) as move:
        for done, (op, (fn, adverts)) in enumerate(ops.items(), 1):
            warm, timed = adverts[:MICRO_WARMUP], adverts[MICRO_WARMUP:]
            for a in warm:
                fn(a)
            results[op] = {**summary_us(time_calls(fn, timed)),
                           "loop_calls_per_s": loop_rate(fn, timed)}
            move(done)  # between operations: the bar never draws inside a timed loop
    return {"iterations": iterations, "members": MEMBERS, "links_per_advert": LINKS_PER_ADVERT,
            # one signed advert alone in an `adverts` message, as encoded on the wire
            "signed_message_bytes": len(encode(Adverts(own, 1, (others[0],)))),
            "operations": results,
            "verifications_per_s_one_core": results["verify"]["loop_calls_per_s"],
            "signatures_per_s_one_core": results["sign"]["loop_calls_per_s"]}


# ============================================================================ part 2: node


def thread_run_ns(pid: int) -> tuple[int, int, int]:
    """(run ns of every thread, run ns of the main thread, ns the main thread was runnable but
    waiting for a CPU) from schedstat. The main thread runs the whole protocol, so its run
    time bounds the node's rate; its waiting time is the contention from other processes."""
    total = bc.sched_ns(pid)[0]
    main = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    return total, int(main[0]), int(main[1])


@dataclass
class Sibling:
    """The sibling this script plays: a ROUTER the node dials, a DEALER back to the node."""

    ctx: zmq.Context[zmq.Socket[bytes]]
    router: zmq.Socket[bytes]
    dealer: zmq.Socket[bytes]
    zap: ZapHandler | None
    endpoint: str
    last_sent: float = 0.0

    def pump(self, timeout_ms: int) -> list[Hello]:
        """Answer ZAP, read what the node sent us; the HELLO requests among it."""
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        if self.zap is not None:
            poller.register(self.zap.socket, zmq.POLLIN)
        ready = dict(poller.poll(timeout_ms))
        if self.zap is not None and self.zap.socket in ready:
            refusal = self.zap.handle()
            if refusal:
                print(f"  sibling: {refusal}", file=sys.stderr)
        hellos = []
        for _ in range(MAX_DRAIN_FRAMES):
            try:
                _, frame = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            with contextlib.suppress(ProtocolError):  # not ours to judge: the node sent it
                msg = decode(frame)
                if isinstance(msg, Hello) and not msg.ack:
                    hellos.append(msg)
        return hellos

    def send(self, frame: bytes) -> None:
        self.dealer.send(frame)  # SNDHWM 0: queued here, never refused
        self.last_sent = time.perf_counter()

    def keepalive(self) -> None:
        if time.perf_counter() - self.last_sent >= KEEPALIVE_S:
            self.send(encode(Ping(SIBLING_NAME, SIBLING_NONCE, 0)))


@contextlib.contextmanager
def played_sibling(keys: Path | None, node: NodeProc, port: int) -> Iterator[Sibling]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    zap = None
    try:
        router: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        dealer: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        # Unlimited: the whole run is queued at once, so the node is never waiting for us.
        dealer.setsockopt(zmq.SNDHWM, 0)
        if keys is not None:
            membership = Membership(keys)
            zap = ZapHandler(ctx, membership)
            secure_server(router, membership, SIBLING_NAME)
            secure_client(dealer, membership, SIBLING_NAME, node.id)
        endpoint = f"tcp://{HOST}:{port}"
        router.bind(endpoint)
        dealer.connect(node.endpoint)
        yield Sibling(ctx, router, dealer, zap, endpoint)
    finally:
        if zap is not None:
            zap.close()
        ctx.destroy(linger=0)


def link_up(sib: Sibling, client: Client, node: NodeProc) -> None:
    """Answer the node's HELLO as a real sibling does (echo `dialed` and `token`), until the
    node reports the link UP."""
    deadline = time.perf_counter() + LINK_TIMEOUT_S
    while time.perf_counter() < deadline:
        if not node.alive:  # e.g. its port was taken before it could bind
            raise RuntimeError(f"{node.id} exited: {node.log_text().strip()[-300:]}")
        for hello in sib.pump(ROUTER_POLL_MS):
            # The ack carries a digest, as a real sibling's does (the node brings a link up
            # only on an ack with one); echoing the node's own says we hold what it holds, so
            # the handshake triggers no exchange of adverts.
            sib.send(encode(Hello(SIBLING_NAME, SIBLING_NONCE, sib.endpoint, True,
                                  dict(hello.digest), hello.dialed, hello.token)))
        if sib.last_sent:
            sib.keepalive()
            with contextlib.suppress(ZgridError):  # still starting: keep answering
                if any(s["id"] == SIBLING_NAME and s["up"]
                       for s in client.status()["siblings"]):
                    return
    raise RuntimeError(f"the node did not take {SIBLING_NAME} as an UP sibling within "
                       f"{LINK_TIMEOUT_S}s")


def fed_adverts(keys: Path | None, total: int, rng: random.Random) -> list[Advert]:
    """`total` new versions of NODE_ORIGINS members' adverts, signed by them with keys."""
    seals = {}
    origins = [f"o{i}" for i in range(NODE_ORIGINS)]
    if keys is not None:
        membership = Membership(keys)
        keyring = Keyring(membership.signing_keys())
        seals = {o: AdvertSeal(membership.load_own_signing(o), keyring) for o in origins}
    out = []
    for k in range(total):
        i = k % NODE_ORIGINS
        a = realistic_advert(origins[i], i, 1 + k // NODE_ORIGINS, rng)
        out.append(seals[origins[i]].sign(a) if seals else a)
    return out


def node_run(tmp: Path, keys: Path | None, batch: int, total: int, rng: random.Random,
             log_level: str) -> dict[str, Any]:
    label = f"{'keys' if keys else 'plain'}-batch{batch}"
    sib_port = free_port()
    node = NodeProc(TARGET_NAME, free_port(), tmp / label / "data", tmp / f"{label}.log",
                    ("--sibling", f"{SIBLING_NAME}@tcp://{HOST}:{sib_port}",
                     "--ping-interval", str(bc.PING_INTERVAL_S),
                     "--dead-after", str(bc.DEAD_AFTER_S)), keys=keys,
                    log_level=log_level)
    (tmp / label).mkdir(parents=True)
    adverts = fed_adverts(keys, total, rng)
    frames = [encode(Adverts(SIBLING_NAME, SIBLING_NONCE, tuple(adverts[i:i + batch])))
              for i in range(0, total, batch)]
    bc.STARTED.append(node)
    try:
        node.start(die_with_parent=True)
        with played_sibling(keys, node, sib_port) as sib, node.client(STATUS_TIMEOUT_S) as cl:
            link_up(sib, cl, node)
            settle_until = time.perf_counter() + SETTLE_AFTER_LINK_S
            while time.perf_counter() < settle_until:
                sib.pump(ROUTER_POLL_MS)
                sib.keepalive()
            before = cl.status()["counters"]
            cpu0 = thread_run_ns(node.pid)
            t0 = time.perf_counter()
            for frame in frames:
                sib.send(frame)
            done_at = None
            counters = before
            deadline = t0 + RUN_TIMEOUT_S
            while time.perf_counter() < deadline:
                sib.pump(0)
                counters = cl.status()["counters"]
                if counters["adverts_accepted"] - before["adverts_accepted"] >= total:
                    done_at = time.perf_counter()
                    break
                time.sleep(STATUS_POLL_S)
            cpu1 = thread_run_ns(node.pid)
            siblings = cl.status()["siblings"]
    finally:
        node.kill(timeout=STOP_TIMEOUT_S)
    accepted = counters["adverts_accepted"] - before["adverts_accepted"]
    elapsed = (done_at or time.perf_counter()) - t0
    all_ns, main_ns, wait_ns = (b - a for a, b in zip(cpu0, cpu1, strict=True))
    return {
        "keys": keys is not None, "adverts_per_message": batch, "adverts_sent": total,
        "messages_sent": len(frames), "frame_bytes_mean": statistics.fmean(map(len, frames)),
        "adverts_accepted": accepted,
        "bad_signatures": counters["bad_signatures"] - before["bad_signatures"],
        "completed": done_at is not None, "elapsed_s": elapsed,
        "accepted_per_s": accepted / elapsed if elapsed > 0 else None,
        "cpu_us_per_advert_all_threads": all_ns / NS_PER_US / accepted if accepted else None,
        "cpu_us_per_advert_main_thread": main_ns / NS_PER_US / accepted if accepted else None,
        "main_thread_busy_fraction": main_ns / NS_PER_S / elapsed if elapsed > 0 else None,
        "main_thread_waiting_fraction": wait_ns / NS_PER_S / elapsed if elapsed > 0 else None,
        "sibling_up_at_end": any(s["id"] == SIBLING_NAME and s["up"] for s in siblings),
    }


def bench_node(tmp: Path, total: int, rng: random.Random, log_level: str) -> dict[str, Any]:
    keys = tmp / "keys"
    for name in (TARGET_NAME, SIBLING_NAME, *(f"o{i}" for i in range(NODE_ORIGINS))):
        keygen(keys, name)
    keygen(keys, OPERATOR_NAME, operator=True)
    runs = []
    with stderr_progress(f"node: runs of {total} adverts",
                         total=len(NODE_BATCHES) * 2) as move:
        for batch in NODE_BATCHES:
            # Plain, then keys, per batch size: each pair runs close together in time, so
            # the machine's other load skews both alike.
            for k in (None, keys):
                runs.append(node_run(tmp, k, batch, total, rng, log_level))
                move(len(runs))
    by = {(r["keys"], r["adverts_per_message"]): r for r in runs}
    added = {}
    for batch in NODE_BATCHES:
        plain, signed = by[(False, batch)], by[(True, batch)]
        if plain["cpu_us_per_advert_all_threads"] and signed["cpu_us_per_advert_all_threads"]:
            added[str(batch)] = {
                "cpu_us_per_advert_all_threads": signed["cpu_us_per_advert_all_threads"]
                - plain["cpu_us_per_advert_all_threads"],
                "cpu_us_per_advert_main_thread": signed["cpu_us_per_advert_main_thread"]
                - plain["cpu_us_per_advert_main_thread"],
                "accepted_per_s_ratio": signed["accepted_per_s"] / plain["accepted_per_s"]}
    return {"runs": runs, "keys_added_per_advert": added, "origins": NODE_ORIGINS,
            "ping_interval_s": bc.PING_INTERVAL_S, "dead_after_s": bc.DEAD_AFTER_S}


# ============================================================================ reporting


def report_micro(r: dict[str, Any]) -> None:
    ops = r["operations"]
    bc.print_table(f"Signing cost per call ({r['iterations']} calls each, a fresh advert with "
                   f"{r['links_per_advert']} links per call, time.perf_counter() around each; "
                   "one core)",
                   ["operation", "p50 us", "p99 us", "max us", "mean us", "loop calls/s"],
                   [[op, bc.fmt(v["p50_us"], 1), bc.fmt(v["p99_us"], 1), bc.fmt(v["max_us"], 1),
                     bc.fmt(v["mean_us"], 1), bc.fmt(v["loop_calls_per_s"], 0)]
                    for op, v in ops.items()])
    print(f"  one core verifies {r['verifications_per_s_one_core']:,.0f} adverts/s and signs "
          f"{r['signatures_per_s_one_core']:,.0f} adverts/s (tight loop, no per-call timer)")


def report_node(r: dict[str, Any]) -> None:
    bc.print_table("One real zgrid-node fed new versions of other members' adverts by a "
                   "sibling, as fast as it takes them (CPU from schedstat)",
                   ["mode", "adverts/msg", "adverts", "accepted/s", "cpu us/advert",
                    "main thread us/advert", "main thread running / waiting for a CPU",
                    "bad sigs", "done"],
                   [["--keys" if x["keys"] else "no keys", x["adverts_per_message"],
                     x["adverts_accepted"], bc.fmt(x["accepted_per_s"], 0),
                     bc.fmt(x["cpu_us_per_advert_all_threads"], 1),
                     bc.fmt(x["cpu_us_per_advert_main_thread"], 1),
                     f"{x['main_thread_busy_fraction'] * 100:.0f} % / "
                     f"{x['main_thread_waiting_fraction'] * 100:.0f} %", x["bad_signatures"],
                     "yes" if x["completed"] else "NO"] for x in r["runs"]])
    for batch, d in r["keys_added_per_advert"].items():
        print(f"  {batch} advert(s) per message: --keys adds "
              f"{d['cpu_us_per_advert_all_threads']:.1f} us of CPU per advert (main thread "
              f"{d['cpu_us_per_advert_main_thread']:.1f} us); accepted/s x "
              f"{d['accepted_per_s_ratio']:.2f}")


# ============================================================================ main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help=f"{MICRO_ITERATIONS_QUICK} calls per operation, "
                        f"{NODE_ADVERTS_QUICK} adverts per node run")
    parser.add_argument("--only", choices=["micro", "node"], action="append",
                        help="run only this part (repeatable)")
    bc.add_run_options(parser, RESULTS_PATH, "advert contents")
    args = parser.parse_args(argv)
    parts = args.only or ["micro", "node"]

    bc.stop_on_sigterm()
    info = bc.machine_info()
    print(f"machine: {info['nproc']} CPUs, {info['cpu_model']}, Python {info['python']}, "
          f"pyzmq {info['pyzmq']} / libzmq {info['libzmq']}")
    results: dict[str, Any] = {"machine": info, "seed": args.seed, "quick": args.quick,
                               "started": time.time()}
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="zgrid-bench-signing-"))
    failed: list[str] = []
    try:
        for part in ("micro", "node"):
            if part not in parts:
                continue
            results[f"{part}_machine_before"] = bc.wait_quiet(args.wait_quiet)
            background = bc.Background()
            background.begin()
            try:
                if part == "micro":
                    result = bench_micro(
                        MICRO_ITERATIONS_QUICK if args.quick else MICRO_ITERATIONS_FULL, rng)
                    report_micro(result)
                else:
                    result = bench_node(tmp, NODE_ADVERTS_QUICK if args.quick
                                        else NODE_ADVERTS_FULL, rng, args.log_level)
                    report_node(result)
            except (RuntimeError, OSError, AssertionError, zmq.ZMQError) as exc:
                failed.append(part)
                result = {"error": repr(exc)}
                print(f"\n{part}: FAILED: {exc!r}", file=sys.stderr)
            bg = background.end()
            results[part] = result
            results[f"{part}_machine_load"] = bg
            bc.report_machine_load(bg)
            bc.write_results(args.output, results)
    except KeyboardInterrupt:
        print("\ninterrupted: the node was killed", file=sys.stderr)
        return 130
    finally:
        bc.keep_or_remove(tmp, bool(failed) or args.keep_logs)
    return bc.finish(args.output, results, failed)


if __name__ == "__main__":
    sys.exit(main())
