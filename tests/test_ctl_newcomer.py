"""zgrid-ctl for a newcomer (issue 12): a link to the wrong node is refused, a link that does
not come up says so and how to stop it, errors speak the user's language (JSON with --json),
every command has --version, and `watch --follow` follows a node through a freeze and a
restart. Real zgrid-node processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time

import pytest

import zgrid

from conftest import BIN, Grid, ctl, free_port


def sibling_ids(status: dict[str, object]) -> list[object]:
    siblings = status["siblings"]
    assert isinstance(siblings, list)
    return [s["id"] for s in siblings]


def test_linking_id_at_an_endpoint_where_another_node_answers_is_refused(grid: Grid) -> None:
    n1 = grid.add("n1")
    n2 = grid.add("n2")
    refused = n1.ctl("link", f"n3@{n2.endpoint}")
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"error: not linked: {n2.endpoint} is node n2, not n3"
    assert n1.status()["siblings"] == [], "nothing changed"
    n1.ctl("link", f"n2@{n2.endpoint}", check=True)  # the right id links
    again = n1.ctl("--json", "link", f"n3@{n2.endpoint}")
    assert again.returncode == 1
    assert json.loads(again.stderr) == {
        "error": f"not linked: {n2.endpoint} is node n2, not n3", "code": "wrong_node",
        "exit": 1}
    assert sibling_ids(n1.status()) == ["n2"]


def test_a_link_that_does_not_come_up_says_so_and_how_to_stop_the_retries(
        grid: Grid) -> None:
    n1 = grid.add("n1")
    nowhere = f"tcp://127.0.0.1:{free_port()}"
    proc = n1.ctl("link", nowhere, timeout=0.5)  # waits 2 x --timeout for the link
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip() == (
        f"error: the link to {nowhere} is not up after 1s (it is connecting). The node keeps "
        f"trying; to stop: zgrid-ctl --node {n1.endpoint} unlink {nowhere}")
    as_json = json.loads(n1.ctl("--json", "link", nowhere, timeout=0.5).stderr)
    assert (as_json["code"], as_json["exit"], as_json["sibling"]["state"]) == (
        "link_not_up", 3, "connecting")
    n1.ctl("unlink", nowhere, check=True)  # the advice works
    assert n1.status()["siblings"] == []


def test_bad_values_are_refused_in_the_users_words_and_as_json_with_json(grid: Grid) -> None:
    n1 = grid.add("n1", "--production", "5")
    cases = [
        (("set", "--production", "-3"), "production must be a number >= 0, got -3"),
        (("set", "--consumption", "nan"), "consumption must be a number >= 0, got nan"),
        (("flex", "--up", "-1"), "flex_up must be a number >= 0, got -1"),
        (("flex", "--price-down", "2e6"),
         "price_down must be a price between -1000000 and 1000000 per kWh, got 2e+06"),
    ]
    for args, message in cases:
        human = n1.ctl(*args)
        assert (human.returncode, human.stderr.strip()) == (1, f"error: {message}"), args
        machine = n1.ctl("--json", *args)
        assert machine.returncode == 1 and machine.stdout == ""
        assert json.loads(machine.stderr) == {"error": message, "code": "bad_value", "exit": 1}
    usage = n1.ctl("--json", "set", "--production", "lots")
    assert usage.returncode == 2
    assert json.loads(usage.stderr)["code"] == "usage" and "'lots'" in usage.stderr
    refused = n1.ctl("--json", "unlink", "nobody")
    assert json.loads(refused.stderr)["code"] == "unknown_sibling"
    dead = ctl("--json", "status", node=f"tcp://127.0.0.1:{free_port()}", timeout=0.3)
    assert dead.returncode == 3 and json.loads(dead.stderr)["code"] == "no_reply"
    assert n1.status()["production"] == 5.0


@pytest.mark.parametrize("command", ["zgrid-node", "zgrid-ctl", "zgrid-sim"])
def test_every_command_has_version(command: str) -> None:
    proc = subprocess.run([str(BIN / command), "--version"], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert (proc.returncode, proc.stdout.strip()) == (0, f"{command}, version "
                                                         f"{zgrid.__version__}")


class Output:
    """What a process prints, read as it comes (unbuffered, so a wait never misses a line)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.pending = ""

    def until(self, marker: str, timeout_s: float) -> str:
        """Everything printed up to the end of the first line containing `marker`."""
        deadline = time.monotonic() + timeout_s
        while True:
            at = self.pending.find(marker)
            end = self.pending.find("\n", at) if at >= 0 else -1
            if end >= 0:
                seen, self.pending = self.pending[:end + 1], self.pending[end + 1:]
                return seen
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                raise AssertionError(f"no {marker!r} within {timeout_s}s: {self.pending!r}")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError(f"ended before {marker!r}: {self.pending!r}")
            self.pending += chunk.decode(errors="replace")


def test_watch_follow_follows_a_node_through_a_freeze_and_a_restart(grid: Grid) -> None:
    n1 = grid.add("n1", "--production", "3")
    watcher = subprocess.Popen(
        [str(BIN / "zgrid-ctl"), "--node", n1.endpoint, "--timeout", "0.5", "watch",
         "--follow"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = Output(watcher)
    try:
        out.until("n1 total_net=+3.000 kW", 20)
        n1.send(signal.SIGSTOP)
        out.until(f"n1 ({n1.endpoint}) stopped answering", 20)
        n1.send(signal.SIGCONT)
        assert "total_net=+3.000 kW" in out.until(f"n1 ({n1.endpoint}) answering again", 20) + (
            out.until("n1 total_net", 20))
        n1.stop()
        out.until("stopped answering", 20)
        n1.start("--production", "3")
        n1.ctl("set", "--production", "4", check=True)  # the restarted node is followed
        out.until("n1 total_net=+4.000 kW", 20)
        assert watcher.poll() is None
        watcher.send_signal(signal.SIGINT)
        rest, _ = watcher.communicate(timeout=20)
        assert watcher.returncode == 0 and b"Traceback" not in rest
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(timeout=10)
