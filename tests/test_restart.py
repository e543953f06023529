"""A restarted node is not counted with its old life (issue 12): real processes on 127.0.0.1,
and the same in the simulator under virtual time.

The `make run` grid (a ring n1-n2-n3-n4 plus the chord n1-n3, default timing): n2 is stopped,
stays down long enough for its siblings' DEALERs to back off their reconnects, and is started
again with the same command. Its saved values were changed meanwhile, so a node that counted
n2's previous life would report a total no node should ever report. Every node must agree on
the island of 4 with n2's new values within 100 ms of n2's first HELLO, and no link may flap.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import zmq

from zgrid import node as runtime
from zgrid.core import Core, LinkState
from zgrid.harness import ControlFleet
from zgrid.persisted import PersistedState
from zgrid.security import keygen
from zgrid.sim import Simulator, converged_sim, engine
from zgrid.sim.measurement import Delivered, Observer
from zgrid.store import Store
from zgrid.wire import WatchRequest

from conftest import Grid, NodeProc

AGREE_WITHIN_S = 0.1  # the target of issue 12, from the restarted node's first HELLO
# The scenario, not a synchronisation: long enough down for libzmq's reconnect backoff of the
# siblings' DEALERs (100 ms doubling) to exceed a second, as after any real outage.
DOWNTIME_S = 2.5
HOLD_S = 2.5  # watched after agreement: more than twice the default dead-after (1 s)
WAIT_S = 10.0
LISTENING = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \S+\s+n2: n2 listening on ", re.M)


@pytest.fixture
def fleet() -> Iterator[ControlFleet]:
    ctx: zmq.Context[Any] = zmq.Context()
    watching = ControlFleet(ctx)
    try:
        yield watching
    finally:
        watching.close()
        ctx.destroy(linger=0)


def ring_with_chord(grid: Grid) -> list[NodeProc]:
    n1 = grid.add("n1", "--production", "50", extra=())
    n2 = grid.add("n2", "--production", "6", "--consumption", "2.5", "--sibling", n1.endpoint,
                  extra=())
    n3 = grid.add("n3", "--consumption", "3.2", "--sibling", n2.endpoint, "--sibling",
                  n1.endpoint, extra=())
    n4 = grid.add("n4", "--consumption", "38", "--sibling", n3.endpoint, "--sibling",
                  n1.endpoint, extra=())
    return [n1, n2, n3, n4]


def started_at(node: NodeProc, near: float) -> float:
    """Unix time of the node's last "listening" log line (it sends its first HELLO next)."""
    found = LISTENING.findall(node.log_text())
    assert found, f"{node.id} never logged that it listens"
    h, m, s, ms = (int(x) for x in found[-1])
    day = datetime.fromtimestamp(near).replace(hour=h, minute=m, second=s, microsecond=ms * 1000)
    candidates = [day + timedelta(days=d) for d in (-1, 0, 1)]  # the log has no date
    return min((c.timestamp() for c in candidates), key=lambda t: abs(t - near))


def flaps(node: NodeProc) -> int:
    count: int = node.status()["counters"]["link_flaps"]
    return count


def test_a_restarted_node_is_agreed_on_within_100ms_without_its_old_life_or_flaps(
        grid: Grid, fleet: ControlFleet) -> None:
    nodes = ring_with_chord(grid)
    n1, n2, n3, n4 = nodes
    ids = ["n1", "n2", "n3", "n4"]
    grid.wait_island(nodes)
    flaps_before = {n.id: flaps(n) for n in nodes}
    assert n2.stop() == 0
    grid.wait_island([n1, n3, n4])
    with Store.open(n2.data_dir, "n2") as store:  # its values change while it is down
        saved = store.load()
        assert saved is not None
        store.save(PersistedState(saved.node_id, saved.incarnation, 9.0, 1.0, saved.siblings,
                                  saved.unlinked, saved.flex))
    old_total = math.fsum([50.0, 6.0 - 2.5, -3.2, -38.0])
    new_total = math.fsum([50.0, 9.0 - 1.0, -3.2, -38.0])
    for node in nodes:
        fleet.connect(node.id, node.endpoint, watch=node is not n2)
    time.sleep(DOWNTIME_S)
    logs_before = {n.id: len(n.log_text()) for n in nodes}

    seen: list[tuple[str, dict[str, Any]]] = []
    agreed_at: dict[str, float] = {}

    def on_view(node: str, view: dict[str, Any], at: float) -> None:
        seen.append((node, view))
        if view["island"] == ids and view["total_net"] == new_total:
            agreed_at.setdefault(node, view["ts"])
        else:
            agreed_at.pop(node, None)

    fleet.on_view = on_view
    launched = time.time()
    n2.start()
    fleet.send("n2", WatchRequest(), "watch")  # queued until n2 listens: its first view
    fleet.watching["n2"] = time.perf_counter() + 1.0
    assert fleet.wait(lambda: len(agreed_at) == len(ids), WAIT_S) is not None, (
        f"no agreement on n2's new values within {WAIT_S}s: {seen[-8:]}")
    first_hello = started_at(n2, launched)
    took = max(agreed_at.values()) - first_hello
    print(f"\nrestart agreement: {took * 1000:.1f} ms after n2's first HELLO")
    fleet.wait(lambda: len(agreed_at) < len(ids), HOLD_S)  # any change away from it
    assert len(agreed_at) == len(ids), f"agreement was lost: {seen[-8:]}"
    stale = [(node, v) for node, v in seen if "n2" in v["island"] and v["total_net"] == old_total]
    assert not stale, f"n2's previous life was counted: {stale}"
    assert took < AGREE_WITHIN_S, f"agreed {took * 1000:.0f} ms after n2's first HELLO"
    assert {n.id: flaps(n) for n in nodes} == flaps_before
    for node in nodes:
        since = node.log_text()[logs_before[node.id]:]
        assert "link down" not in since and "silent for" not in since, (node.id, since)


def test_over_curve_a_restarted_nodes_answers_come_back_over_its_own_connection(
        grid: Grid, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    for name in ("n1", "n2", "n3"):
        keygen(keys, name)
    keygen(keys, "operator", operator=True)  # what the tests' control client speaks as
    n1 = grid.add("n1", "--production", "10", keys=keys, extra=())
    n2 = grid.add("n2", "--consumption", "3", "--sibling", n1.address, keys=keys, extra=())
    n3 = grid.add("n3", "--consumption", "1", "--sibling", n2.address, keys=keys, extra=())
    grid.wait_island([n1, n2, n3])
    assert n2.stop() == 0
    grid.wait_island([n1])
    time.sleep(DOWNTIME_S)  # the scenario: the siblings' DEALERs back off meanwhile
    routed = {n.id: n.status()["counters"]["sends_routed"] for n in (n1, n3)}
    n2.start()
    statuses = grid.wait_island([n1, n2, n3])
    assert {s["total_net"] for s in statuses} == {6.0}
    # Its siblings answered over the CURVE connection n2 made, and n2 took what came back.
    assert all(n.status()["counters"]["sends_routed"] > routed[n.id] for n in (n1, n3))
    assert all(s["counters"]["link_flaps"] == 0 for s in statuses)


def test_the_simulator_reconnects_as_the_runtime_configures_libzmq() -> None:
    assert engine.RECONNECT_IVL_S * 1000 == runtime.RECONNECT_IVL_MS
    assert engine.RECONNECT_IVL_MAX_S * 1000 == runtime.RECONNECT_IVL_MAX_MS


# ------------------------------------------------------------------------ the simulator

RING_WITH_CHORD = [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)]  # n0..n3: n1 restarts
SIM_STEP_S = 0.001


class OldLifeCounted(Observer):
    """After every delivery once n1 runs again: does any node count an advert of n1's past
    life in its island? (While n1 is down its goodbye takes a hop to be flooded, as any.)"""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.seen: list[tuple[float, str]] = []
        self.restarted: Core | None = None

    def after_deliver(self, t: float, dst: int, src: int, msg: Delivered, token: object
                      ) -> None:
        core, restarted = self.sim.cores[dst], self.sim.cores[1]
        if core is None or restarted is None or restarted is not self.restarted:
            return
        held = core.table.get("n1")
        if "n1" in core.island(t) and (held is None or held.nonce != restarted.config.nonce):
            self.seen.append((t, core.id))


def test_in_the_simulator_a_restarted_node_is_agreed_on_within_100ms_without_flaps() -> None:
    sim = converged_sim(RING_WITH_CHORD, [(50.0, 0.0), (6.0, 2.5), (0.0, 3.2), (0.0, 38.0)])
    old = sim.attach(OldLifeCounted(sim))
    flaps_before = [c.counters["link_flaps"] for c in sim.cores if c is not None]
    sim.stop(1)
    sim.run_until(sim.now + 0.1)
    state = sim.persisted[1]
    assert state is not None
    sim.persisted[1] = PersistedState(state.node_id, state.incarnation, 9.0, 1.0,
                                      state.siblings, state.unlinked, state.flex)
    sim.run_until(sim.now + DOWNTIME_S)
    first_hello = sim.now
    sim.restart(1)  # its first HELLOs leave now; its siblings' DEALERs are backing off
    old.restarted = sim.cores[1]
    total = math.fsum([50.0, 9.0 - 1.0, -3.2, -38.0])

    def agreed() -> bool:
        cores = [c for c in sim.cores if c is not None]
        return len(cores) == 4 and all(
            c.island(sim.now) == {"n0", "n1", "n2", "n3"} and c.totals(sim.now)[0] == total
            for c in cores)

    while not agreed() and sim.now < first_hello + WAIT_S:
        sim.run_until(sim.now + SIM_STEP_S)
    took = sim.now - first_hello
    assert took < AGREE_WITHIN_S, f"agreed {took * 1000:.0f} ms after n1's first HELLO"
    assert sim.stats.routed_back > 0, "the answers never needed the siblings' own connections"
    for _ in range(round(HOLD_S / SIM_STEP_S)):
        sim.run_until(sim.now + SIM_STEP_S)
        assert agreed(), f"agreement lost at {sim.now - first_hello:.3f}s after the restart"
    assert not old.seen, f"n1's previous life was counted: {old.seen[:5]}"
    assert [c.counters["link_flaps"] for c in sim.cores if c is not None] == flaps_before
    for core in sim.cores:
        assert core is not None
        assert all(s.state is LinkState.UP for s in core.siblings.values()), core.id
