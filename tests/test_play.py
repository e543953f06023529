"""`zgrid-ctl play` against real zgrid-node processes: a profile's rows reach their nodes in
order and on time, a bad file sends nothing, a node that fails is reported, a signal stops."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from zgrid.harness import ControlFleet

from conftest import BIN, Grid, NodeProc, ctl, free_port, wait_until

PLAY_TIMEOUT_S = 30.0  # the whole zgrid-ctl play process, interpreter start included


@pytest.fixture
def fleet() -> Iterator[ControlFleet]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    watching = ControlFleet(ctx)
    try:
        yield watching
    finally:
        watching.close()
        ctx.term()


def write(tmp: Path, text: str) -> Path:
    path = tmp / "profile.csv"
    path.write_text(text)
    return path


def play(node: NodeProc, *args: str, timeout: float = 2.0) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "zgrid-ctl"), "--node", node.endpoint, "--timeout", str(timeout), "play",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=PLAY_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)


def test_a_profile_played_fast_reaches_the_node_row_by_row_in_order(
        grid: Grid, fleet: ControlFleet) -> None:
    n1 = grid.add("n1", "--production", "1")
    nets: list[float] = []
    fleet.on_view = lambda node, view, at: nets.append(view["total_net"])
    fleet.connect("n1", n1.endpoint, watch=True)
    assert fleet.wait(lambda: nets[-1:] == [1.0], 10), "the watch's first view"
    # 40 profile seconds per wall second: the rows are due 0, 0.25 and 0.5 s into the play.
    path = write(grid.tmp, "time_s,production,consumption\n0,5,1\n10,,2\n20,7,\n")
    began = time.monotonic()
    proc = play(n1, "--speed", "40", str(path))
    elapsed = time.monotonic() - began
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["00:00:00", "line", "2"], ["00:00:10", "line", "3"], ["00:00:20", "line", "4"]]
    assert [line.split("net ")[-1] for line in lines] == ["+4.000 kW", "+3.000 kW", "+5.000 kW"]
    assert elapsed >= 0.5, "the last row is due half a second after the first"
    assert fleet.wait(lambda: nets[-1:] == [5.0], 10), nets
    assert [n for i, n in enumerate(nets) if i == 0 or n != nets[i - 1]] == [1.0, 4.0, 3.0, 5.0]
    status = json.loads(ctl("--json", "status", node=n1.endpoint, check=True).stdout)
    assert (status["production"], status["consumption"]) == (7.0, 2.0)


def test_rows_name_their_nodes_by_id_or_endpoint_and_json_lines_report_each(
        grid: Grid) -> None:
    n1, n2 = grid.line(("n1", 10, 0), ("n2", 0, 4))
    grid.wait_island([n1, n2])
    path = write(grid.tmp, "time_s,node,consumption\n"
                           f"0,n2,1.5\n0,,2.5\n1,n1@{n1.endpoint},3.5\n")
    cmd = [str(BIN / "zgrid-ctl"), "--node", n1.endpoint, "--json", "play", "--speed", "100",
           str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PLAY_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["ok"], r["line"], r["node"], r["consumption"]) for r in rows] == [
        (True, 2, "n2", 1.5), (True, 3, n1.endpoint, 2.5), (True, 4, f"n1@{n1.endpoint}", 3.5)]
    assert n2.status()["consumption"] == 1.5 and n1.status()["consumption"] == 3.5


def test_a_bad_profile_is_refused_whole_and_nothing_is_sent(grid: Grid) -> None:
    n1 = grid.add("n1", "--production", "1")
    seq = n1.status()["seq"]
    path = write(grid.tmp, "time_s,consumption\n0,1\n1,2\n2,3\n3,4\n4,5\n5,-3\n")
    proc = play(n1, str(path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {path} line 7: consumption must be a number >= 0, "
                                   "got -3")
    unknown = play(n1, str(write(grid.tmp, "time_s,node,production\n0,n9,1\n")))
    assert unknown.returncode == 2 and "node n9 is not in the grid" in unknown.stderr
    assert n1.status()["seq"] == seq, "nothing was sent"


def test_a_node_that_does_not_answer_is_reported_and_the_others_still_play(
        grid: Grid) -> None:
    n1 = grid.add("n1")
    dead = f"tcp://127.0.0.1:{free_port()}"
    path = write(grid.tmp, f"time_s,node,production\n0,{dead},1\n0,,2\n")
    proc = play(n1, "--speed", "100", str(path), timeout=0.3)
    assert proc.returncode == 3, proc.stderr
    assert f"line 2 {dead}: no reply from {dead}" in proc.stderr
    assert "Traceback" not in proc.stderr and "1 rows applied, 1 failed" in proc.stderr
    assert n1.status()["production"] == 2.0


def read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The next line `proc` prints (an AssertionError at the deadline)."""
    assert proc.stdout is not None
    ready = select.select([proc.stdout], [], [], timeout_s)[0]
    assert ready, f"no line within {timeout_s}s"
    return proc.stdout.readline()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_looping_play_stops_cleanly_on_a_signal(grid: Grid, sig: signal.Signals) -> None:
    n1 = grid.add("n1")
    path = write(grid.tmp, "time_s,production\n0,1\n60,2\n")
    player = subprocess.Popen(
        [str(BIN / "zgrid-ctl"), "--node", n1.endpoint, "play", "--loop", "--speed", "60",
         str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert "line 2" in read_line(player, 20)
        player.send_signal(sig)
        _, err = player.communicate(timeout=20)
    finally:
        if player.poll() is None:
            player.kill()
            player.wait(timeout=10)
    assert player.returncode == 0, err
    assert "stopped at" in err and "Traceback" not in err
    wait_until(lambda: n1.status()["production"] in (1.0, 2.0), what="the node to answer")
