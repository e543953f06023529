"""scripts/run.sh (`make run`, `make reset`), run as a user would: five nodes that agree and
balance with the battery, a monitor that follows a node through a freeze and a restart, a
second run that resumes the grid as it was left, a fresh start, and a clean stop."""

from __future__ import annotations

import os
import random
import re
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import BIN, HOST, ctl, wait_until

ROOT = Path(__file__).resolve().parent.parent
NODES = 5
BANNER_END = "Ctrl-C stops the grid."


def _free_base_port() -> int:
    """A base port whose next five ports are free (the script uses base+1 .. base+5)."""
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(20000, 60000)
        try:
            for port in range(base + 1, base + NODES + 1):
                with socket.socket() as s:
                    s.bind((HOST, port))
        except OSError:
            continue
        return base
    raise RuntimeError("no five consecutive free ports")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class RunScript:
    """scripts/run.sh in a session of its own, its output read as it comes."""

    def __init__(self, base: int, data: Path, *args: str) -> None:
        self.base, self.data = base, data
        self.env = {**os.environ, "ZGRID_BASE_PORT": str(base), "ZGRID_DATA": str(data),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.proc = subprocess.Popen([str(ROOT / "scripts" / "run.sh"), *args], env=self.env,
                                     cwd=data, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        self.out = b""  # everything printed so far
        self.read = 0  # how much of it `until` has consumed

    def endpoint(self, i: int) -> str:
        return f"tcp://{HOST}:{self.base + i}"

    def until(self, pattern: str, timeout_s: float = 20) -> re.Match[str]:
        """The first match of the regex `pattern` in what is printed after the last match."""
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.out[self.read:].decode(errors="replace")
            found = re.search(pattern, text)
            if found:
                self.read += len(text[:found.end()].encode())
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                raise AssertionError(f"run.sh did not print {pattern!r} within {timeout_s}s: "
                                     f"{text!r}")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError(f"run.sh ended before printing {pattern!r}: {text!r}")
            self.out += chunk

    def banner(self) -> dict[str, int]:
        """Wait for the banner (it comes once every node answers); the nodes' pids."""
        self.until(re.escape(BANNER_END), 40)
        text = self.out.decode(errors="replace")
        return {m[1]: int(m[2]) for m in re.finditer(r"^  (n\d) .* pid (\d+)$", text, re.M)}

    def stop(self) -> str:
        """SIGTERM, as Ctrl-C would; everything it printed. Every process must be gone."""
        self.proc.send_signal(signal.SIGTERM)
        rest, _ = self.proc.communicate(timeout=30)
        self.out += rest
        out = self.out.decode(errors="replace")
        assert self.proc.returncode == 0, out
        assert out.rstrip().endswith("grid stopped"), out
        wait_until(lambda: not _group_alive(self.proc.pid), timeout=10,
                   what="every process of run.sh to exit")
        return out

    def kill(self) -> None:
        if _group_alive(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGCONT)  # a frozen node must be able to die
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def _statuses(run: RunScript) -> list[str] | None:
    out = []
    for i in range(1, NODES + 1):
        proc = ctl("status", node=run.endpoint(i), timeout=1.0)
        if proc.returncode != 0:
            return None
        out.append(proc.stdout)
    return out


def _agreed(run: RunScript) -> bool:
    """Every node sees the island of five, the demo's total, balanced."""
    statuses = _statuses(run)
    return statuses is not None and all(
        "island of 5" in s and "total_net +12.300 kW" in s and "balanced net +0.000 kW" in s
        for s in statuses)


def _siblings(run: RunScript, i: int) -> list[str]:
    proc = ctl("status", node=run.endpoint(i), timeout=1.0, check=True)
    rows = proc.stdout.split("siblings:", 1)[1].splitlines()
    return sorted(line.split()[0] for line in rows if line.strip())


def test_run_script_balances_with_the_battery_follows_a_node_and_stops_cleanly(
        tmp_path: Path) -> None:
    run = RunScript(_free_base_port(), tmp_path)
    restarted: subprocess.Popen[bytes] | None = None
    try:
        pids = run.banner()
        assert sorted(pids) == ["n1", "n2", "n3", "n4", "n5"]
        assert "zgrid-ctl play --speed 60" in run.out.decode()
        wait_until(lambda: _agreed(run), timeout=20, what="the five nodes of run.sh to agree")
        # The monitor shows the imbalance, the balanced net and the battery charging at its
        # full 5 kW (cheaper than the plant, which turns down by the other 7.3).
        run.until(r"n5 total_net=\+12\.300 kW island=5 \(n1 n2 n3 n4 n5\) "
                  r"imbalance=\+12\.300 kW balanced_net=\+0\.000 kW activation=-5\.000 kW")
        # A second run while this one is going is refused: the ports are taken.
        second = subprocess.run([str(ROOT / "scripts" / "run.sh")], env=run.env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=30,
                                stdin=subprocess.DEVNULL)
        assert second.returncode == 2 and "is the grid running already" in second.stderr

        os.kill(pids["n3"], signal.SIGSTOP)  # frozen: its watcher says so, then follows it
        run.until(rf"n3 \({re.escape(run.endpoint(3))}\) stopped answering")
        os.kill(pids["n3"], signal.SIGCONT)
        run.until(rf"n3 \({re.escape(run.endpoint(3))}\) answering again")

        os.kill(pids["n3"], signal.SIGKILL)  # exits: reported, with how to start it again
        found = run.until(rf"n3 \(pid {pids['n3']}\) was killed by signal 9; to start it "
                          r"again:\n  (zgrid-node [^\n]*)\n")
        restarted = subprocess.Popen(["bash", "-c", f"exec {found[1]}"], env=run.env,
                                     cwd=tmp_path, stdin=subprocess.DEVNULL)
        wait_until(lambda: _agreed(run), timeout=20, what="n3 back in the island, balanced")
        # Its watcher follows the new process (whether or not it noticed the gap).
        ctl("set", "--consumption", "4.2", node=run.endpoint(3), check=True)
        run.until(r"n3 total_net=\+11\.300 kW island=5 ")
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=20) == 0

        out = run.stop()
        assert "zgrid-ctl" in out and "Traceback" not in out
        for i in range(1, NODES + 1):
            assert ctl("status", node=run.endpoint(i), timeout=0.3).returncode == 3
    finally:
        if restarted is not None and restarted.poll() is None:
            restarted.kill()
            restarted.wait(timeout=10)
        run.kill()


def test_a_second_run_resumes_the_grid_as_left_and_fresh_starts_anew(tmp_path: Path) -> None:
    base = _free_base_port()
    run = RunScript(base, tmp_path)
    try:
        run.banner()
        assert "a new grid" in run.out.decode()
        wait_until(lambda: _agreed(run), timeout=20, what="the first run to agree")
        ctl("unlink", "n2", node=run.endpoint(1), check=True)  # as in the walkthrough
        run.stop()

        run = RunScript(base, tmp_path)
        run.banner()
        assert "resumed the grid saved in" in run.out.decode()
        wait_until(lambda: _agreed(run), timeout=20, what="the resumed grid to agree")
        assert _siblings(run, 1) == ["n3", "n4", "n5"], "the unlink stays"
        run.stop()

        run = RunScript(base, tmp_path, "--fresh")  # make reset
        run.banner()
        assert "forgot the saved grid" in run.out.decode()
        wait_until(lambda: _agreed(run) and _siblings(run, 1) == ["n2", "n3", "n4", "n5"],
                   timeout=20, what="the demo's own siblings again")
        run.stop()
    finally:
        run.kill()
