"""Hostile frames against real nodes (issue 8: one frame must never take a node down).

Each test replays an input that was found to take a live node down, against real zgrid-node
processes on 127.0.0.1: a sibling endpoint ZeroMQ cannot dial, a flood of refused HELLOs, a
flood of strangers' HELLOs, an unlink of a killed sibling, and a sibling flooding pings. The
rules themselves are checked in the sans-IO core by tests/test_core_guards.py; these check that
the runtime survives them: it answers, it does not leak sockets, and it stops (and starts
again) within a deadline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from zgrid.core import MAX_REFUSALS_PER_WINDOW, UNPROVED_SIBLING_TTL_S
from zgrid.node import MAX_ONE_SHOT_SOCKETS
from zgrid.persisted import PersistedState
from zgrid.store import Store
from zgrid.wire import Hello, Ping, decode, encode

from conftest import HOST, Grid, NodeProc, free_port, wait_until

TOO_LONG_IPC = "ipc://" + "x" * 200  # valid by length (256), too long for a unix socket path
UNDIALABLE = "tcp://_:5001"  # a valid endpoint that ZeroMQ's connect refuses (EINVAL)
ANSWER_TIMEOUT_S = 0.5
FLOOD_HELLOS = 3000
JUNK_HELLOS = 70
# Sockets the node may hold beyond its idle count while it refuses a flood: the one-shot
# sockets it keeps (each a mailbox and, while it connects, a TCP socket) and a few closing.
SPARE_FDS = 4 * MAX_ONE_SHOT_SOCKETS + 16
FLOOD_PINGS = 20_000


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


def raw(ctx: zmq.Context[Any], node: NodeProc) -> zmq.Socket[Any]:
    """A DEALER to the node's ROUTER that sends whatever frames a test makes."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(node.endpoint)
    return sock


def restart(node: NodeProc) -> None:
    node.start()
    wait_until(lambda: node.status(timeout=ANSWER_TIMEOUT_S), what=f"{node.id} to answer")


def received(node: NodeProc) -> int:
    count: int = node.status()["counters"]["messages_received"]
    return count


def open_fds(node: NodeProc) -> int:
    return len(os.listdir(f"/proc/{node.pid}/fd"))


def siblings(node: NodeProc) -> list[tuple[str, str]]:
    return [(s["endpoint"], s["state"]) for s in node.status()["siblings"]]


# ------------------------------------------------------------------------ 1: undialable endpoints


def test_a_link_zeromq_cannot_dial_is_refused_and_the_node_still_stops_and_starts_again(
        grid: Grid) -> None:
    n1 = grid.add("n1")
    too_long = n1.ctl("link", TOO_LONG_IPC)
    assert too_long.returncode == 1 and "ipc path longer" in too_long.stderr
    undialable = n1.ctl("link", UNDIALABLE)
    assert undialable.returncode == 1 and "cannot dial" in undialable.stderr
    assert siblings(n1) == [(UNDIALABLE, "refused")]
    assert n1.stop() == 0, "the node must not hang on a socket it could not connect"
    restart(n1)  # the operator's link was saved: the restart dials it again, and survives
    assert siblings(n1) == [(UNDIALABLE, "refused")]
    n1.ctl("unlink", UNDIALABLE, check=True)
    assert n1.stop() == 0
    assert "Traceback" not in n1.log_text()


def test_a_hello_naming_an_undialable_or_oversized_endpoint_changes_nothing(
        grid: Grid, ctx: zmq.Context[Any]) -> None:
    n1 = grid.add("n1")
    sock = raw(ctx, n1)
    bad_frames = n1.status()["counters"]["bad_frames"]
    sock.send(encode(Hello("junk", 5, UNDIALABLE, False, {}, n1.endpoint)))
    sock.send(encode(Hello("junk", 5, TOO_LONG_IPC, False, {}, n1.endpoint)))
    wait_until(lambda: n1.status()["counters"]["bad_frames"] == bad_frames + 1,
               what="the oversized endpoint to be dropped as a bad frame")
    wait_until(lambda: received(n1) >= 1, what="the undialable HELLO to be handled")
    assert siblings(n1) == [], "a stranger that cannot be dialled is no sibling"
    assert n1.stop() == 0


def test_a_saved_sibling_an_older_zgrid_accepted_is_dropped_at_start(grid: Grid) -> None:
    data_dir = grid.tmp / "n1"
    with Store.open(data_dir, "n1") as store:  # as saved before ipc paths were checked
        store.save(PersistedState("n1", 1, 2.0, 0.0, (TOO_LONG_IPC,)))
    n1 = grid.add("n1", data_dir=data_dir)
    assert siblings(n1) == [] and n1.status()["production"] == 2.0
    assert "dropping the saved sibling" in n1.log_text()
    assert n1.stop() == 0


# ------------------------------------------------------------------------ 2: a flood of refusals


def test_a_flood_of_hellos_claiming_the_nodes_own_id_costs_a_bounded_number_of_sockets(
        grid: Grid, ctx: zmq.Context[Any]) -> None:
    n1 = grid.add("n1")
    idle = open_fds(n1)
    endpoints = [f"tcp://{HOST}:{free_port()}" for _ in range(50)]  # nobody listens there
    sock = raw(ctx, n1)
    start = received(n1)
    for k in range(FLOOD_HELLOS):
        sock.send(encode(Hello("n1", 10_000 + k, endpoints[k % len(endpoints)], False, {},
                               n1.endpoint)))
    most = 0

    def handled() -> bool:
        nonlocal most
        most = max(most, open_fds(n1))
        return received(n1) >= start + FLOOD_HELLOS

    wait_until(handled, what="every HELLO to be handled")
    counters = n1.status()["counters"]
    assert counters["refusals_dropped"] >= FLOOD_HELLOS - 10 * MAX_REFUSALS_PER_WINDOW
    assert most <= idle + SPARE_FDS, f"{most} open files, {idle} when idle"
    assert "Too many open files" not in n1.log_text()
    assert n1.stop() == 0


# ------------------------------------------------------------------------ 4: strangers' HELLOs


def test_hellos_from_strangers_leave_no_sibling_behind_and_the_operator_can_still_link(
        grid: Grid, ctx: zmq.Context[Any]) -> None:
    n1, n2 = grid.add("n1"), grid.add("n2")
    sock = raw(ctx, n1)
    start = received(n1)
    for k in range(JUNK_HELLOS):  # fresh ids, endpoints where nobody listens
        sock.send(encode(Hello(f"junk{k}", k + 1, f"tcp://{HOST}:{free_port()}", False, {},
                               n1.endpoint)))
    wait_until(lambda: received(n1) >= start + JUNK_HELLOS, what="the HELLOs to be handled")
    assert all(state == "connecting" for _, state in siblings(n1))
    linked = n1.ctl("link", n2.endpoint, check=True)
    assert ": up" in linked.stdout
    wait_until(lambda: siblings(n1) == [(n2.endpoint, "up")],
               timeout=UNPROVED_SIBLING_TTL_S + 5.0, what="the strangers to expire")
    assert n1.stop() == 0
    restart(n1)
    assert [endpoint for endpoint, _ in siblings(n1)] == [n2.endpoint], "none was persisted"
    grid.wait_island([n1, n2])


# ------------------------------------------------------------------------ 8: sticky unlinks


def test_unlinking_a_killed_sibling_sticks_when_it_comes_back(grid: Grid) -> None:
    n1, n2 = grid.line(("n1", 10, 0), ("n2", 0, 4))
    grid.wait_island([n1, n2])
    n2.kill()
    n1.ctl("unlink", "n2", check=True)  # acknowledged while n2 cannot hear the goodbye
    assert n1.stop() == 0  # and the unlink is remembered across n1's own restart
    restart(n1)
    restart(n2)  # it comes back with its record of n1 and knocks
    wait_until(lambda: siblings(n2) == [], what="n2 to be told it was unlinked")
    assert siblings(n1) == []
    assert {s["total_net"] for s in grid.wait_island([n1])} == {10.0}
    assert {s["total_net"] for s in grid.wait_island([n2])} == {-4.0}
    n1.ctl("link", n2.endpoint, check=True)  # until the operator links it again
    grid.wait_island([n1, n2])


# ------------------------------------------------------------------------ 7: ping floods


class FakeSibling:
    """A sibling of the test's own making on HOST: a ROUTER it is reached on, a DEALER to the
    node, and just enough protocol to link."""

    def __init__(self, ctx: zmq.Context[Any], node: NodeProc, node_id: str = "fake",
                 nonce: int = 77) -> None:
        self.id, self.nonce, self.node = node_id, nonce, node
        self.endpoint = f"tcp://{HOST}:{free_port()}"
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(self.endpoint)
        self.dealer = raw(ctx, node)

    def link(self) -> None:
        """Ask the node for a link, then answer its HELLO (echoing its token) until it is up."""
        self.dealer.send(encode(Hello(self.id, self.nonce, self.endpoint, False, {},
                                      self.node.endpoint, token=1)))

        def up() -> bool:
            while self.router.poll(0):
                msg = decode(self.router.recv_multipart()[-1])
                if isinstance(msg, Hello) and not msg.ack:
                    self.dealer.send(encode(Hello(self.id, self.nonce, self.endpoint, True,
                                                  {self.id: (1, 1)}, msg.dialed, msg.token)))
            return (self.endpoint, "up") in siblings(self.node)

        wait_until(up, what=f"{self.node.id} to link with {self.id}")


def test_a_sibling_flooding_pings_draws_at_most_one_digest_per_ping_interval(
        grid: Grid, ctx: zmq.Context[Any]) -> None:
    n1 = grid.add("n1")  # FAST: one ping interval is 0.1 s
    ping_interval_s = 0.1
    fake = FakeSibling(ctx, n1)
    fake.link()
    before = n1.status()["counters"]
    started = time.monotonic()
    mismatching = encode(Ping(fake.id, fake.nonce, 12345))  # never n1's table hash
    for _ in range(FLOOD_PINGS):  # and it never reads what n1 sends it
        fake.dealer.send(mismatching)
    wait_until(lambda: received(n1) >= before["messages_received"] + FLOOD_PINGS,
               what="every ping to be handled")
    elapsed = time.monotonic() - started
    after = n1.status()["counters"]
    digests = after["digests_sent"] - before["digests_sent"]
    assert digests <= elapsed / ping_interval_s + 2, (digests, elapsed)
    assert after["digests_limited"] - before["digests_limited"] >= FLOOD_PINGS / 2 - digests
    asked = time.monotonic()
    n1.status()
    assert time.monotonic() - asked < 0.5, "the node keeps answering"
    assert n1.stop() == 0
