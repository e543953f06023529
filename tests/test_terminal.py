"""zgrid-ctl on a terminal (issue 10): rich tables and colours when stdout is a terminal, the
plain text of today when it is piped; `top`, the live view of the island; progress bars.

The views (zgrid/views.py) are checked on sample dicts, rendered to a recording rich Console;
the commands run as real processes against real zgrid-node processes, with FORCE_COLOR=1 or
under a pseudo-terminal (os.openpty). Every wait is on a condition with a deadline, and every
process a test starts is killed at its end."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.progress import Progress

from zgrid import views

from conftest import BIN, Grid, NodeProc, wait_until

PTY_ROWS, PTY_COLUMNS = 40, 120
WIDTH = 100  # columns of the recorded consoles and of FORCE_COLOR output (COLUMNS)
READ_WAIT_S = 15.0  # one thing a zgrid-ctl process should show: interpreter start included
EXIT_WAIT_S = 10.0
READ_SLICE_S = 0.05
ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78M])")
# The terminal variables rich reads: unset, so that only what a test sets decides.
RICH_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR", "COLUMNS",
            "LINES")


def plain(text: str) -> str:
    """`text` without its ANSI escape sequences (colours, cursor moves, screen switches)."""
    return ANSI.sub("", text)


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in RICH_ENV}
    return {**base, "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1", **extra}


# ================================================================================ views

ROWS: list[dict[str, Any]] = [
    {"id": "n1", "production": 50.0, "consumption": 0.0, "net": 50.0, "reachable": True,
     "activation_kw": -7.3, "links": ["n2", "n3"]},
    {"id": "n2", "production": 6.0, "consumption": 2.5, "net": 3.5, "reachable": True,
     "activation_kw": 0.0, "links": ["n1"]},
    {"id": "n3", "production": 0.0, "consumption": 3.2, "net": -3.2, "reachable": True,
     "activation_kw": 0.0, "links": ["n1"]},
    {"id": "n4", "production": 0.0, "consumption": 45.0, "net": -45.0, "reachable": False,
     "activation_kw": 0.0, "links": []},
    {"id": "n5", "production": 1.0, "consumption": 1.0, "net": 1e-15, "reachable": True,
     "activation_kw": 0.0, "links": []},
]
VIEW: dict[str, Any] = {
    "id": "n1", "ts": 1796174535.3, "total_net": 46.3, "total_production": 57.0,
    "total_consumption": 10.7, "island_size": 4, "island": ["n1", "n2", "n3", "n5"],
    "imbalance_kw": 46.3, "balanced_net_kw": 16.3, "clearing_price": 0.03,
    "shortfall_kw": 16.3, "shortfall": "curtail_generation", "clearing_hash": 1,
    "activation_kw": -30.0}
STATUS: dict[str, Any] = {
    **VIEW, "endpoint": "tcp://127.0.0.1:5001", "incarnation": 3, "production": 50.0,
    "consumption": 0.0, "net": 50.0, "flex_up": 20.0, "price_up": 0.12, "flex_down": 30.0,
    "price_down": 0.03, "device": {"kind": "battery", "soc": 0.5},
    "siblings": [{"id": "n2", "endpoint": "tcp://127.0.0.1:5002", "up": True, "state": "up",
                  "error": ""},
                 {"id": "n4", "endpoint": "tcp://127.0.0.1:5004", "up": False,
                  "state": "down", "error": "no pong"}],
    "conflict": "", "storage": "failing: disk full"}


def row_of(text: str, first: str) -> str:
    """The one table row of `text` whose first cell is `first`."""
    rows = [line for line in text.splitlines() if line.startswith(f"│ {first} ")]
    assert len(rows) == 1, (first, text)
    return rows[0]


def test_the_nodes_table_has_a_row_per_node_and_marks_the_unreachable() -> None:
    text = views.render_text(views.nodes_table(ROWS), WIDTH)
    assert text.splitlines()[0].startswith("╭")  # a box
    for header in ("id", "production", "consumption", "net", "activation", "reachable",
                   "links"):
        assert header in text.splitlines()[1]
    n1 = row_of(text, "n1")
    assert n1.split("│")[1:7] == [" n1 ", "     50.000 ", "       0.000 ", " +50.000 ",
                                  "     -7.300 ", " yes       "]
    assert "n2 n3" in n1
    n4 = row_of(text, "n4")
    assert " NO " in n4 and "+" not in n4.split("│")[4]
    n5 = row_of(text, "n5")
    assert "+0.000" in n5 and "-0.000" not in n5  # a residual is balanced, not negative


def test_the_net_is_green_producing_yellow_consuming_dim_balanced_and_unreachable_red(
        ) -> None:
    assert views.net_style(0.001) == "green"
    assert views.net_style(-0.001) == "yellow"
    assert views.net_style(0.0004) == views.net_style(-0.0004) == "dim"
    coloured = views.render_text(views.nodes_table(ROWS), WIDTH, color=True)
    def styled(code: str, value: str) -> bool:  # a right-aligned cell pads inside its style
        return re.search(rf"\x1b\[{code}m *{re.escape(value)}", coloured) is not None

    assert styled("32", "+50.000") and styled("32", "yes")  # green
    assert styled("33", "-3.200") and styled("33", "-45.000")  # yellow
    assert styled("2", "+0.000")  # dim
    assert styled("1;31", "NO") and styled("1;31", "n4")  # bold red


def test_the_status_view_shows_the_node_its_island_balancing_and_siblings() -> None:
    text = views.render_text(views.status_view(STATUS), WIDTH)
    assert text.splitlines()[0].rstrip() == "n1  tcp://127.0.0.1:5001  (incarnation 3)"
    assert "flex up" in text and "20.000 kW at 0.12" in text and "30.000 kW at 0.03" in text
    assert "device battery: soc 0.5" in text
    assert "island of 4: n1 n2 n3 n5" in text
    for words in (("total net", "+46.300 kW"), ("imbalance", "+46.300 kW"),
                  ("balanced net", "+16.300 kW"), ("clearing price", "0.03"),
                  ("shortfall", "16.300 kW (curtail_generation)")):
        assert re.search(r"\s+".join(map(re.escape, words)), text), words
    n4 = row_of(text, "n4")
    assert "tcp://127.0.0.1:5004" in n4 and "down" in n4 and "no pong" in n4
    assert "STORAGE failing: disk full" in text
    alone = views.render_text(views.status_view(
        {**STATUS, "siblings": [], "storage": "ok", "conflict": "duplicate id"}), WIDTH)
    assert "siblings: none" in alone and "CONFLICT: duplicate id" in alone
    assert "STORAGE" not in alone


def test_a_watch_line_on_a_terminal_says_what_the_plain_line_says() -> None:
    line = views.render_text(views.watch_line(VIEW, "2026-12-02T01:22:13.844", True), 300)
    assert line.strip() == (
        "2026-12-02T01:22:13.844 n1 total_net=+46.300 kW island=4 (n1 n2 n3 n5) "
        "imbalance=+46.300 kW balanced_net=+16.300 kW activation=-30.000 kW "
        "SHORTFALL 16.300 kW (curtail_generation)")
    quiet = {**VIEW, "shortfall_kw": 0.0, "activation_kw": 0.0}
    assert "activation" not in views.render_text(views.watch_line(quiet, "t", False), 300)


def test_the_top_view_shows_totals_balancing_and_every_node() -> None:
    text = views.render_text(views.top_view(VIEW, ROWS, node="tcp://127.0.0.1:5001",
                                            updated="12:00:01", interval_s=0.5), WIDTH)
    assert text.startswith("zgrid top  n1 tcp://127.0.0.1:5001  updated 12:00:01, every "
                           "0.5 s  Ctrl-C quits")
    for words in (("total net", "+46.300 kW"), ("production", "57.000 kW"),
                  ("consumption", "10.700 kW"), ("n1's activation", "-30.000 kW"),
                  ("imbalance", "+46.300 kW"), ("balanced net", "+16.300 kW"),
                  ("clearing price", "0.03"), ("shortfall", "16.300 kW")):
        assert re.search(r"\s+".join(map(re.escape, words)), text), words
    assert "5 known nodes, 1 unreachable" in text
    assert all(row_of(text, f"n{i}") for i in range(1, 6))
    waiting = views.render_text(views.top_view(
        VIEW, None, node="x", updated="never", interval_s=1.0, problem="no reply from x",
        live=False), WIDTH)
    assert "asking for the node table" in waiting and "node table: no reply from x" in waiting
    assert "Ctrl-C" not in waiting  # a snapshot does not say how to quit a screen
    older = {k: v for k, v in VIEW.items() if k not in ("imbalance_kw", "balanced_net_kw")}
    assert "imbalance" not in views.render_text(views.top_view(
        older, ROWS, node="x", updated="now", interval_s=1.0), WIDTH)


def test_the_play_bar_follows_the_profile_clock_and_counts_rows() -> None:
    now = [100.0]
    progress = Progress(console=Console(file=io.StringIO(), force_terminal=True, width=WIDTH))

    def clock_text(t: float) -> str:
        return f"{t:g}s"

    bar = views.PlayBar(progress, "playing p.csv", 600.0, 3600.0, None, 60.0, clock_text,
                        clock=lambda: now[0])
    task = progress.tasks[0]
    assert (task.total, task.completed, task.fields["clock"]) == (3000.0, 0.0,
                                                                  "600s / 3600s")
    now[0] += 10.0  # ten wall seconds at speed 60: ten profile minutes
    bar.row(ok=True)
    bar.row(ok=False)
    assert (task.completed, task.fields["clock"]) == (600.0, "1200s / 3600s")
    assert task.fields["rows"] == "1 row sent, 1 failed"
    now[0] += 3600.0  # far past the end: the bar stops full
    bar.tick()
    assert (task.completed, task.fields["clock"]) == (3000.0, "3600s / 3600s")

    looping = views.PlayBar(progress, "loop", 0.0, 85500.0, 86400.0, 3600.0, clock_text,
                            clock=lambda: now[0])
    now[0] += 30.0  # 30 h of profile: the second pass, 6 h in
    looping.tick()
    assert progress.tasks[1].fields["clock"] == "21600s / 86400s (loop 2)"
    assert progress.tasks[1].completed == 21600.0


def test_progress_shows_nothing_when_stderr_is_not_a_terminal(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in RICH_ENV:
        monkeypatch.delenv(name, raising=False)
    with views.stderr_progress("work", total=3) as move:
        move(1)
    with views.play_progress("playing", 0.0, 10.0, None, 1.0, str) as bar:
        assert bar is None
    assert capsys.readouterr() == ("", "")
    assert views.terminal() is None
    monkeypatch.setenv("FORCE_COLOR", "1")  # what the process tests use to force the views
    assert views.terminal() is not None


# ================================================================================ processes


class Output:
    """What a process writes to one file descriptor (a pty's master end or a pipe), read
    without blocking: `until` waits, to a deadline, for the text to satisfy a condition."""

    def __init__(self, fd: int) -> None:
        self.fd, self.raw, self.closed = fd, b"", False

    @property
    def text(self) -> str:
        return self.raw.decode(errors="replace")

    def pump(self, timeout_s: float) -> None:
        if self.closed or not select.select([self.fd], [], [], timeout_s)[0]:
            return
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the pty's other end is closed (the process ended)
            data = b""
        self.raw += data
        self.closed = not data

    def until(self, condition: Callable[[str], bool], what: str,
              timeout_s: float = READ_WAIT_S, start: int = 0) -> str:
        """The plain text from byte `start` on, once `condition` holds for it."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = plain(self.raw[start:].decode(errors="replace"))
            if condition(seen):
                return seen
            if self.closed or time.monotonic() >= deadline:
                raise AssertionError(f"waiting for {what}: got {seen[-2000:]!r}")
            self.pump(READ_SLICE_S)

    def drain(self, timeout_s: float = EXIT_WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.closed and time.monotonic() < deadline:
            self.pump(READ_SLICE_S)


class Ctl:
    """A long-running zgrid-ctl: stdout (and stderr, unless `stderr_pipe`) on a fresh
    pseudo-terminal of PTY_COLUMNS x PTY_ROWS, or on pipes with `tty=False`."""

    def __init__(self, node: NodeProc, *args: str, tty: bool = True, timeout: float = 2.0,
                 extra_env: dict[str, str] | None = None, stdout_pipe: bool = False) -> None:
        cmd = [str(BIN / "zgrid-ctl"), "--node", node.endpoint, "--timeout", str(timeout),
               *args]
        self.master: int | None = None
        if tty:
            self.master, slave = os.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", PTY_ROWS, PTY_COLUMNS,
                                                               0, 0))
            self.proc = subprocess.Popen(
                cmd, stdin=slave, stdout=subprocess.PIPE if stdout_pipe else slave,
                stderr=slave, env=env(**(extra_env or {})))
            os.close(slave)  # ours: the pty reports EOF once the process has closed it
            self.out = Output(self.master)
            self.stdout = Output(self.proc.stdout.fileno()) if self.proc.stdout else None
        else:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env(**(extra_env or {})))
            assert self.proc.stdout is not None and self.proc.stderr is not None
            self.out = Output(self.proc.stdout.fileno())
            self.stdout = None
            self.err = Output(self.proc.stderr.fileno())

    def wait(self, timeout_s: float = EXIT_WAIT_S) -> int:
        """Its exit status, reading its output meanwhile (a full pty would block it)."""
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.out.pump(READ_SLICE_S)
            if self.stdout is not None:
                self.stdout.pump(0)
        code = self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        self.out.drain()
        if self.stdout is not None:
            self.stdout.drain()
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=EXIT_WAIT_S)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        if self.master is not None:
            os.close(self.master)


@pytest.fixture
def start_ctl() -> Iterator[Callable[..., Ctl]]:
    started: list[Ctl] = []

    def start(node: NodeProc, *args: str, **options: Any) -> Ctl:
        started.append(Ctl(node, *args, **options))
        return started[-1]

    try:
        yield start
    finally:
        for c in started:
            c.close()


def run_ctl(node: NodeProc, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "zgrid-ctl"), "--node", node.endpoint, *args],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                          env=env(**extra_env))


def test_nodes_and_status_are_rich_tables_on_a_terminal_and_unchanged_when_piped(
        grid: Grid, start_ctl: Callable[..., Ctl]) -> None:
    n1, n2 = grid.line(("n1", 50, 0), ("n2", 0, 20))
    grid.wait_island([n1, n2])

    forced = run_ctl(n1, "nodes", FORCE_COLOR="1", COLUMNS=str(WIDTH))
    assert forced.returncode == 0, forced.stderr
    assert "\x1b[" in forced.stdout  # colours
    table = plain(forced.stdout)
    assert table.startswith("╭") and "│" in table and "reachable" in table
    assert re.search(r"│ n1 │\s+50\.000 │\s+0\.000 │ \+50\.000 │", table), table
    assert re.search(r"│ n2 │\s+0\.000 │\s+20\.000 │ -20\.000 │", table), table

    piped = run_ctl(n1, "nodes")
    assert piped.returncode == 0 and "\x1b" not in piped.stdout
    assert piped.stdout == (  # exactly today's text
        f"{'id':<14}{'production':>14}{'consumption':>14}{'net':>14}  reachable  links\n"
        f"{'n1':<14}{50:>14.3f}{0:>14.3f}{50:>+14.3f}  yes        n2\n"
        f"{'n2':<14}{0:>14.3f}{20:>14.3f}{-20:>+14.3f}  yes        n1\n")
    as_json = run_ctl(n1, "--json", "nodes", FORCE_COLOR="1")
    assert [row["id"] for row in json.loads(as_json.stdout)] == ["n1", "n2"]

    status = plain(run_ctl(n1, "status", FORCE_COLOR="1", COLUMNS=str(WIDTH)).stdout)
    assert status.splitlines()[0] == f"n1  {n1.endpoint}  (incarnation 1)"
    assert "╭─ island of 2: n1 n2" in status and re.search(r"total net\s+\+30\.000 kW", status)
    assert re.search(rf"│ n2 │ {re.escape(n2.endpoint)}\s+│ up ", status), status
    piped_status = run_ctl(n1, "status").stdout
    assert piped_status.splitlines()[:2] == [
        f"n1  {n1.endpoint}  (incarnation 1)",
        "  production 50.000 kW   consumption 0.000 kW   net +50.000 kW"]
    assert "\x1b" not in piped_status and "╭" not in piped_status

    watcher = start_ctl(n1, "watch")  # on a pty: coloured lines, the same words
    line = watcher.out.until(lambda t: "\n" in t, "watch's first line")
    assert re.search(r"n1 total_net=\+30\.000 kW island=2 \(n1 n2\) imbalance=\+30\.000 kW",
                     line), line
    assert "\x1b[" in watcher.out.text
    watcher.proc.send_signal(signal.SIGINT)
    assert watcher.wait() == 0


def test_top_on_a_terminal_shows_the_island_follows_a_set_and_exits_0_on_ctrl_c(
        grid: Grid, start_ctl: Callable[..., Ctl]) -> None:
    n1, n2, n3 = grid.line(("n1", 50, 0), ("n2", 0, 20), ("n3", 4, 1.5))
    grid.wait_island([n1, n2, n3])
    top = start_ctl(n1, "top", "--interval", "0.5")
    # A frame reaches the pty in pieces: wait for its last row, not only for its header.
    screen = top.out.until(lambda t: "+32.500 kW" in t and "3 known nodes" in t
                           and "│ n3 │" in t.split("3 known nodes")[-1], "top's screen")
    assert "\x1b[?1049h" in top.out.text  # the alternate screen, as htop's
    for node_id in ("n1", "n2", "n3"):
        assert re.search(rf"│ {node_id} │", screen), screen
    assert re.search(r"total net\s+\+32\.500 kW", screen) and "island of 3: n1 n2 n3" in screen
    assert re.search(r"imbalance\s+\+32\.500 kW", screen) and "shortfall" in screen

    start = len(top.out.raw)
    n2.ctl("set", "--consumption", "25", check=True)
    after = top.out.until(lambda t: re.search(r"total net\s+\+27\.500 kW", t) is not None
                          and re.search(r"│ n2 │\s+0\.000 │\s+25\.000 │", t) is not None,
                          "top to show n2's new consumption", start=start)
    assert "Traceback" not in after

    top.proc.send_signal(signal.SIGINT)
    assert top.wait() == 0
    assert "\x1b[?1049l" in top.out.text  # and the terminal is given back
    assert "Traceback" not in top.out.text and "KeyboardInterrupt" not in top.out.text


def test_top_piped_prints_plain_snapshots_and_has_no_json(
        grid: Grid, start_ctl: Callable[..., Ctl]) -> None:
    n1, n2 = grid.line(("n1", 50, 0), ("n2", 0, 20))
    grid.wait_island([n1, n2])
    top = start_ctl(n1, "top", "--interval", "0.5", tty=False)
    first = top.out.until(lambda t: "2 known nodes" in t and "\n\n" in t, "a snapshot")
    assert "\x1b" not in top.out.text
    assert first.startswith(f"zgrid top  n1 {n1.endpoint}  updated ")
    assert re.search(r"total net\s+\+30\.000 kW", first)
    start = len(top.out.raw)
    n2.ctl("set", "--consumption", "10", check=True)
    top.out.until(lambda t: re.search(r"total net\s+\+40\.000 kW", t) is not None
                  and "│ n2 │" in t, "a snapshot after the set", start=start)
    top.proc.send_signal(signal.SIGINT)
    assert top.wait() == 0
    refused = run_ctl(n1, "--json", "top")
    assert refused.returncode == 2 and json.loads(refused.stderr)["code"] == "usage"
    assert "watch --json" in json.loads(refused.stderr)["error"]


def test_top_leaves_the_screen_and_says_so_when_the_node_stops_answering(
        grid: Grid, start_ctl: Callable[..., Ctl]) -> None:
    n1 = grid.add("n1", "--production", "5")
    top = start_ctl(n1, "top", timeout=0.5)
    top.out.until(lambda t: "1 known node" in t, "top's screen")
    n1.kill()
    assert top.wait() == 3
    text = plain(top.out.text)
    left = top.out.text.rindex("\x1b[?1049l")  # the error comes after the screen is left
    assert f"error: {n1.endpoint} stopped answering while watching" in plain(
        top.out.text[left:])
    assert "Traceback" not in text


def write_profile(tmp: Path) -> Path:
    path = tmp / "profile.csv"
    path.write_text("time_s,production,consumption\n0,5,1\n10,,2\n20,7,\n")
    return path


def test_play_draws_a_progress_bar_on_a_terminal_stderr_and_keeps_stdout_plain(
        grid: Grid, start_ctl: Callable[..., Ctl]) -> None:
    n1 = grid.add("n1", "--production", "1")
    path = write_profile(grid.tmp)
    at = n1.endpoint  # the profile has no node column: every row goes to --node
    expected = [f"00:00:00 line 2 {at}: production 5.000 kW  consumption 1.000 kW -> net "
                "+4.000 kW",
                f"00:00:10 line 3 {at}: consumption 2.000 kW -> net +3.000 kW",
                f"00:00:20 line 4 {at}: production 7.000 kW -> net +5.000 kW"]
    # 40 profile seconds a second: the rows are due 0, 0.25 and 0.5 s into the play.
    piped = start_ctl(n1, "play", "--speed", "40", str(path), stdout_pipe=True)
    assert piped.wait(READ_WAIT_S) == 0
    assert piped.stdout is not None
    assert piped.stdout.text.splitlines() == expected
    shown = plain(piped.out.text)
    assert "━" in shown and "playing" in shown  # the bar, on the terminal's stderr
    assert "done: 3 rows applied, 0 failed" in shown

    both = start_ctl(n1, "play", "--speed", "40", str(path))  # stdout on the terminal too
    assert both.wait(READ_WAIT_S) == 0
    shown = plain(both.out.text)
    for line in expected:
        assert line in shown
    assert "━" in shown and "Traceback" not in shown
    wait_until(lambda: n1.status()["production"] == 7.0, what="the last row")
