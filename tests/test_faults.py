"""Faults: crashes, freezes, restarts, lost messages. Real processes on 127.0.0.1."""

from __future__ import annotations

import shutil
import signal
import subprocess

import pytest

from conftest import BIN, FAST, Grid, NodeProc, free_port, wait_until


@pytest.fixture
def line3(grid: Grid) -> tuple[NodeProc, NodeProc, NodeProc]:
    n1, n2, n3 = grid.line(("n1", 10, 0), ("n2", 5, 1), ("n3", 0, 3))
    grid.wait_island([n1, n2, n3])
    return n1, n2, n3


def test_kill_9_of_the_middle_node_splits_the_line_then_restart_rejoins_it(
        grid: Grid, line3: tuple[NodeProc, NodeProc, NodeProc]) -> None:
    n1, n2, n3 = line3
    n2.ctl("set", "--production", "7", check=True)
    grid.wait_island([n1, n2, n3])
    n2.kill()
    assert {s["total_net"] for s in grid.wait_island([n1], timeout=5)} == {10.0}
    assert {s["total_net"] for s in grid.wait_island([n3], timeout=5)} == {-3.0}

    n2.start()  # same id and data dir, no flags: it must remember its values and siblings
    statuses = grid.wait_island([n1, n2, n3])
    assert {s["total_net"] for s in statuses} == {13.0}
    restarted = n2.status()
    assert (restarted["production"], restarted["consumption"]) == (7.0, 1.0)
    assert restarted["incarnation"] == 2


def test_a_killed_node_leaves_every_island_at_once_without_waiting_for_silence(
        grid: Grid) -> None:
    slow = ("--ping-interval", "1", "--dead-after", "30")  # silence cannot explain it
    n1, n2, n3 = grid.line(("n1", 10, 0), ("n2", 5, 1), ("n3", 0, 3), extra=slow)
    grid.wait_island([n1, n2, n3])
    n2.kill()
    # Its connections closed: each sibling's libzmq monitor says so, far within dead-after.
    assert {s["total_net"] for s in grid.wait_island([n1], timeout=3)} == {10.0}
    assert {s["total_net"] for s in grid.wait_island([n3], timeout=3)} == {-3.0}
    for node in (n1, n3):
        counters = node.status()["counters"]
        assert (counters["connections_lost"], counters["link_flaps"]) == (1, 0), node.id
        assert "n2 closed its connection; link down" in node.log_text()
    n2.start()
    assert {s["total_net"] for s in grid.wait_island([n1, n2, n3])} == {11.0}


def test_a_frozen_node_leaves_every_island_and_comes_back_after_sigcont(
        grid: Grid, line3: tuple[NodeProc, NodeProc, NodeProc]) -> None:
    n1, n2, n3 = line3
    n2.send(signal.SIGSTOP)
    try:
        grid.wait_island([n1], timeout=5)
        grid.wait_island([n3], timeout=5)
    finally:
        n2.send(signal.SIGCONT)
    statuses = grid.wait_island([n1, n2, n3])
    assert {s["total_net"] for s in statuses} == {11.0}


def test_a_set_acknowledged_just_before_kill_9_survives_the_restart(grid: Grid) -> None:
    node = grid.add("n1", "--production", "1")
    node.ctl("set", "--production", "42.5", "--consumption", "0.25", check=True)
    node.kill()
    node.start()
    wait_until(lambda: node.status()["production"] == 42.5, what="the restarted node")
    assert node.status()["consumption"] == 0.25


def test_a_restart_with_a_wiped_data_dir_bumps_above_what_the_grid_remembers(
        grid: Grid, line3: tuple[NodeProc, NodeProc, NodeProc]) -> None:
    n1, n2, n3 = line3
    for _ in range(3):  # an incarnation the wiped node cannot know of
        assert n3.stop() == 0
        n3.start()
        grid.wait_island([n1, n2, n3])
    with n2.client() as client:
        remembered = client.nodes()[2]
    assert remembered["id"] == "n3" and remembered["incarnation"] == 4
    n3.kill()
    shutil.rmtree(n3.data_dir)
    n3.start("--production", "2", "--sibling", n2.endpoint)
    statuses = grid.wait_island([n1, n2, n3])
    assert {s["total_net"] for s in statuses} == {16.0}
    assert n3.status()["incarnation"] > 4
    assert n3.status()["conflict"] == ""


def test_a_second_node_on_the_same_data_dir_is_refused(grid: Grid) -> None:
    node = grid.add("n1")
    proc = subprocess.run([str(BIN / "zgrid-node"), "--id", "n1", "--bind",
                           f"tcp://127.0.0.1:{free_port()}", "--data-dir", str(node.data_dir)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "in use" in proc.stderr and "Traceback" not in proc.stderr


def test_anti_entropy_converges_even_when_most_adverts_are_lost(grid: Grid) -> None:
    lossy = (*FAST, "--drop-rate", "0.7")
    n1, n2, n3, n4 = grid.line(("n1", 1, 0), ("n2", 1, 0), ("n3", 1, 0), ("n4", 1, 0),
                               extra=lossy)
    grid.wait_island([n1, n2, n3, n4], timeout=20)
    for i, node in enumerate((n1, n2, n3, n4)):
        node.ctl("set", "--production", str(10 * (i + 1)), check=True)
    statuses = grid.wait_island([n1, n2, n3, n4], timeout=20)
    assert {s["total_net"] for s in statuses} == {100.0}
    dropped = sum(s["counters"]["sends_dropped"] for s in statuses)
    repaired = sum(s["counters"]["digests_sent"] for s in statuses)
    assert dropped > 0 and repaired > 0


def test_unreachable_nodes_are_forgotten_and_not_resurrected(grid: Grid) -> None:
    forgetful = (*FAST, "--forget-after", "1")
    n1, n2, n3 = grid.line(("n1", 1, 0), ("n2", 1, 0), ("n3", 1, 0), extra=forgetful)
    grid.wait_island([n1, n2, n3])
    n3.kill()
    wait_until(lambda: n1.status()["known_nodes"] == 2 and n2.status()["known_nodes"] == 2,
               what="n3 to be forgotten")
    # That pings and digests between n1 and n2 never bring n3 back is checked over virtual
    # time: test_core.py::test_a_forgotten_node_stays_forgotten_while_pings_and_digests_flow.


def test_a_change_flooded_before_its_save_is_outbid_when_the_node_comes_back(
        grid: Grid) -> None:
    n1, n2 = grid.line(("n1", 10, 0), ("n2", 0, 4))
    grid.wait_island([n1, n2])
    assert n1.stop() == 0
    n1.start("--crash-before-save")  # testing hook: dies like kill -9 between flood and fsync
    first = grid.wait_island([n1, n2])[0]
    proc = n1.ctl("set", "--production", "999", timeout=1.0)
    assert proc.returncode == 3, "the change must not be acknowledged: it was never durable"
    wait_until(lambda: not n1.alive, what="n1 to crash before its save")
    assert n1.proc is not None and n1.proc.returncode == 137

    def n2_saw_the_unsaved_change() -> bool:
        return any(row["id"] == "n1" and row["production"] == 999 for row in n2.ctl_json("nodes"))

    wait_until(n2_saw_the_unsaved_change, what="the flood of the unsaved change to reach n2")
    n1.start()
    statuses = grid.wait_island([n1, n2])
    assert {s["total_net"] for s in statuses} == {6.0}, "the durable value wins everywhere"
    assert statuses[0]["incarnation"] == first["incarnation"] + 1
    assert [row["production"] for row in n2.ctl_json("nodes") if row["id"] == "n1"] == [10.0]
