"""A healthy grid, end to end: real zgrid-node processes on 127.0.0.1, the real zgrid-ctl."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import time

from conftest import BIN, Grid, NodeProc, ctl, free_port, wait_until


def _fsum_net(values: dict[str, tuple[float, float]]) -> float:
    return math.fsum(x for p, c in values.values() for x in (p, -c))


def test_four_nodes_converge_to_the_bit_identical_total_after_random_sets(grid: Grid) -> None:
    n1, n2, n3, n4 = grid.line(("n1", 50, 0), ("n2", 6, 2.5), ("n3", 0, 3.2), ("n4", 0, 38))
    n4.ctl("link", n1.endpoint, check=True)  # a ring, so floods race around both ways
    nodes = [n1, n2, n3, n4]
    values = {"n1": (50.0, 0.0), "n2": (6.0, 2.5), "n3": (0.0, 3.2), "n4": (0.0, 38.0)}
    rng = random.Random(7)
    for _ in range(12):
        node = rng.choice(nodes)
        p, c = rng.uniform(0, 100) / 3, rng.uniform(0, 100) / 7  # not exactly representable
        node.ctl("set", "--production", repr(p), "--consumption", repr(c), check=True)
        values[node.id] = (p, c)
    expected = _fsum_net(values)

    def converged() -> bool:
        totals = [n.ctl_json("status")["total_net"] for n in nodes]
        return all(t == expected for t in totals)  # == on floats: bit-identical

    wait_until(converged, what=f"every node to report {expected!r}")


def test_status_json_has_the_documented_keys(grid: Grid) -> None:
    n1, n2 = grid.line(("n1", 20, 0), ("n2", 0, 5))
    grid.wait_island([n1, n2])
    s = n1.ctl_json("status")
    for key in ("id", "endpoint", "production", "consumption", "net", "total_net",
                "total_production", "total_consumption", "island", "siblings", "flex_up",
                "price_up", "flex_down", "price_down", "activation_kw", "imbalance_kw",
                "balanced_net_kw", "clearing_price", "shortfall_kw", "clearing_hash"):
        assert key in s, key
    assert (s["id"], s["endpoint"], s["net"], s["total_net"]) == ("n1", n1.endpoint, 20.0, 15.0)
    assert (s["total_production"], s["total_consumption"]) == (20.0, 5.0)
    assert s["island"] == ["n1", "n2"]
    assert s["siblings"] == [{"id": "n2", "endpoint": n2.endpoint, "up": True, "state": "up",
                              "error": ""}]
    rows = n2.ctl_json("nodes")
    assert [row["incarnation"] for row in rows] == [1, 1]
    human = n2.ctl("nodes", check=True).stdout
    assert "links" in human.splitlines()[0] and human.splitlines()[1].rstrip().endswith("n2")
    assert rows == [
        {"id": "n1", "production": 20.0, "consumption": 0.0, "net": 20.0, "reachable": True,
         "activation_kw": 0.0, "links": ["n2"], "endpoint": n1.endpoint,
         "incarnation": rows[0]["incarnation"]},
        {"id": "n2", "production": 0.0, "consumption": 5.0, "net": -5.0, "reachable": True,
         "activation_kw": 0.0, "links": ["n1"], "endpoint": n2.endpoint,
         "incarnation": rows[1]["incarnation"]},
    ]


def test_link_is_undirected_and_unlink_removes_both_ends(grid: Grid) -> None:
    a = grid.add("a", "--production", "1")
    b = grid.add("b", "--production", "2")
    linked = json.loads(a.ctl("--json", "link", b.endpoint, check=True).stdout)
    assert linked["up"] and linked["id"] == "b"

    def sibling_ids(node: NodeProc) -> list[tuple[str, bool]]:
        return [(s["id"], s["up"]) for s in node.status()["siblings"]]

    wait_until(lambda: sibling_ids(b) == [("a", True)], what="b to list a as up")
    assert sibling_ids(a) == [("b", True)]
    grid.wait_island([a, b])

    a.ctl("unlink", "b", check=True)
    wait_until(lambda: sibling_ids(b) == [], what="b to drop a")
    assert sibling_ids(a) == []
    assert a.status()["island"] == ["a"] and b.status()["island"] == ["b"]


def test_unlink_splits_grid_into_two_islands_and_relink_merges_them(grid: Grid) -> None:
    n1, n2, n3, n4 = grid.line(("n1", 10, 0), ("n2", 0, 1), ("n3", 20, 0), ("n4", 0, 2))
    grid.wait_island([n1, n2, n3, n4])

    n2.ctl("unlink", n3.endpoint, check=True)
    left, right = grid.wait_island([n1, n2]), grid.wait_island([n3, n4])
    assert {s["total_net"] for s in left} == {9.0}
    assert {s["total_net"] for s in right} == {18.0}
    n1.ctl("set", "--production", "11", check=True)  # a change stays in its own island
    wait_until(lambda: n2.status()["total_net"] == 10.0, what="n2 to see n1's change")
    assert n3.status()["total_net"] == 18.0

    n3.ctl("link", n2.endpoint, check=True)
    merged = grid.wait_island([n1, n2, n3, n4])
    assert {s["total_net"] for s in merged} == {28.0}


def test_sigterm_node_leaves_every_island_promptly_by_saying_goodbye(grid: Grid) -> None:
    slow = ("--ping-interval", "1", "--dead-after", "30")  # silence cannot explain a quick exit
    n1, n2, n3 = grid.line(("n1", 1, 0), ("n2", 2, 0), ("n3", 4, 0), extra=slow)
    grid.wait_island([n1, n2, n3])
    started = time.monotonic()
    assert n3.stop(signal.SIGTERM) == 0
    grid.wait_island([n1, n2], timeout=3.0)
    assert time.monotonic() - started < 3.0
    assert n1.status()["total_net"] == 3.0
    assert "stopping" in n3.log_text()


def test_a_node_with_no_links_is_an_island_of_one(grid: Grid) -> None:
    alone = grid.add("solo", "--production", "3.5", "--consumption", "1")
    s = alone.status()
    assert (s["island"], s["total_net"], s["siblings"]) == (["solo"], 2.5, [])


def test_control_requests_are_answered_within_milliseconds_while_the_grid_floods(
        grid: Grid) -> None:
    n1, n2, n3 = grid.line(("n1", 1, 0), ("n2", 1, 0), ("n3", 1, 0))
    grid.wait_island([n1, n2, n3])
    with n1.client() as writer, n2.client() as reader:
        latencies = []
        for i in range(300):
            writer.set(production=float(i))  # every set floods to both other nodes
            if i % 3 == 0:
                started = time.perf_counter()
                reader.status()
                latencies.append(time.perf_counter() - started)
    latencies.sort()
    # A responsiveness property, not a benchmark: the mailbox never starves control requests.
    assert latencies[len(latencies) // 2] < 0.05, latencies
    assert latencies[-1] < 0.5, latencies
    wait_until(lambda: n3.status()["total_net"] == 301.0, what="n3 to see the last set")


def test_zgrid_ctl_exit_codes(grid: Grid) -> None:
    n1 = grid.add("n1", "--production", "5")
    assert n1.ctl("status").returncode == 0
    refused = n1.ctl("unlink", "nobody")
    assert refused.returncode == 1 and "not a sibling" in refused.stderr
    assert n1.ctl("link", "not-an-endpoint").returncode == 1
    bad_value = n1.ctl("set", "--production", "-3")
    assert bad_value.returncode == 1 and "production" in bad_value.stderr
    assert n1.ctl("set", "--production", "nan").returncode == 1
    assert n1.ctl("set").returncode == 2  # usage: nothing to set
    assert n1.ctl("no-such-command").returncode == 2
    assert ctl("status").returncode == 2  # no --node and no ZGRID_NODE
    dead = ctl("status", node=f"tcp://127.0.0.1:{free_port()}", timeout=0.3)
    assert dead.returncode == 3 and "no reply" in dead.stderr
    for proc in (refused, bad_value, dead):
        assert "Traceback" not in proc.stderr
    assert n1.status()["production"] == 5.0  # nothing refused changed anything


def test_zgrid_ctl_takes_the_node_from_the_environment(grid: Grid) -> None:
    n1 = grid.add("n1", "--production", "5")
    env = {**os.environ, "ZGRID_NODE": n1.endpoint}
    out = subprocess.run([str(BIN / "zgrid-ctl"), "--json", "status"], env=env,
                         capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(out.stdout)["id"] == "n1"


def test_watch_streams_json_lines_starting_with_the_current_view(grid: Grid) -> None:
    n1, n2 = grid.line(("n1", 10, 0), ("n2", 0, 4))
    grid.wait_island([n1, n2])
    watcher = subprocess.Popen([str(BIN / "zgrid-ctl"), "--node", n1.endpoint, "--json",
                                "watch"], stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout is not None
        first = json.loads(watcher.stdout.readline())
        assert (first["id"], first["total_net"], first["island_size"]) == ("n1", 6.0, 2)
        assert abs(first["ts"] - time.time()) < 60
        n2.ctl("set", "--consumption", "1", check=True)
        second = json.loads(watcher.stdout.readline())
        assert (second["total_net"], second["island_size"]) == (9.0, 2)
        assert second["ts"] >= first["ts"]
    finally:
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=10) == 0


def test_a_bind_that_fails_is_one_line_and_exit_code_2(grid: Grid) -> None:
    n1 = grid.add("n1")
    proc = subprocess.run([str(BIN / "zgrid-node"), "--id", "other", "--bind", n1.endpoint,
                           "--data-dir", str(grid.tmp / "other")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "cannot bind" in proc.stderr and "Traceback" not in proc.stderr
    bad = subprocess.run([str(BIN / "zgrid-node"), "--id", "x", "--bind", "nonsense"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_restarting_a_node_with_its_own_id_is_not_a_conflict(grid: Grid) -> None:
    n1, n2 = grid.line(("n1", 10, 0), ("n2", 0, 4))
    grid.wait_island([n1, n2])
    assert n2.stop() == 0
    n2.start()
    statuses = grid.wait_island([n1, n2])
    assert all(s["conflict"] == "" for s in statuses)
    assert statuses[1]["incarnation"] == 2


def test_a_restart_resumes_the_saved_values_and_says_so_in_its_log(grid: Grid) -> None:
    n1, n2 = grid.line(("n1", 10, 0), ("n2", 0, 4))
    grid.wait_island([n1, n2])
    n2.ctl("set", "--consumption", "7", check=True)
    assert n2.stop() == 0
    n2.start()  # the same command line: --consumption 4
    statuses = grid.wait_island([n1, n2])
    assert statuses[1]["consumption"] == 7.0
    assert "resuming the saved values (production 0 kW, consumption 7 kW)" in n2.log_text()


def test_a_second_live_node_with_a_taken_id_is_refused_without_a_bump_war(grid: Grid) -> None:
    n1, n2 = grid.line(("n1", 10, 0), ("n2", 0, 4))
    grid.wait_island([n1, n2])
    impostor = grid.add("n1", "--production", "999", "--sibling", n2.endpoint,
                        data_dir=grid.tmp / "impostor")

    def refused() -> dict[str, object] | None:
        s = impostor.status()
        return s if s["conflict"] and s["siblings"][0]["state"] == "refused" else None

    s = wait_until(refused, what="the impostor to be refused")
    assert "duplicate" in str(s["conflict"])
    text = impostor.ctl("status").stdout
    assert "CONFLICT" in text
    assert "duplicate node id 'n1'" in n2.log_text()
    # No exchange of ever-newer adverts (the simulator checks this over virtual minutes:
    # test_sim.py::test_a_live_duplicate_is_refused_without_a_bump_war).
    before = n1.status()
    assert {s["total_net"] for s in grid.wait_island([n1, n2])} == {6.0}
    after = n1.status()
    assert (after["incarnation"], after["seq"]) == (before["incarnation"], before["seq"])
