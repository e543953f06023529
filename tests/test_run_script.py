"""scripts/run.sh, run as a user would: four nodes that agree, and a clean stop."""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import BIN, HOST, ctl, wait_until

ROOT = Path(__file__).resolve().parent.parent


def _free_base_port() -> int:
    """A base port whose next four ports are free (the script uses base+1 .. base+4)."""
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(20000, 60000)
        try:
            for port in range(base + 1, base + 5):
                with socket.socket() as s:
                    s.bind((HOST, port))
        except OSError:
            continue
        return base
    raise RuntimeError("no four consecutive free ports")


def _read_until(fd: int, marker: bytes, timeout_s: float) -> bytes:
    """What the script printed, up to and including `marker` (fail at the deadline)."""
    deadline = time.monotonic() + timeout_s
    seen = b""
    while marker not in seen:
        remaining = deadline - time.monotonic()
        ready = select.select([fd], [], [], remaining)[0] if remaining > 0 else []
        if not ready:
            raise AssertionError(f"run.sh did not print {marker!r} within {timeout_s}s: {seen!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError(f"run.sh ended before printing {marker!r}: {seen!r}")
        seen += chunk
    return seen


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_run_script_starts_four_agreeing_nodes_and_stops_cleanly(tmp_path: Path) -> None:
    base = _free_base_port()
    env = {**os.environ, "ZGRID_BASE_PORT": str(base), "ZGRID_DATA": str(tmp_path),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    script = subprocess.Popen([str(ROOT / "scripts" / "run.sh")], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    endpoints = [f"tcp://{HOST}:{base + i}" for i in range(1, 5)]
    try:
        def agreed() -> bool:
            totals = []
            for endpoint in endpoints:
                proc = ctl("status", node=endpoint, timeout=1.0)
                if proc.returncode != 0 or "island of 4" not in proc.stdout:
                    return False
                totals.append(proc.stdout.split("total_net ")[1].split()[0])
            return len(set(totals)) == 1 and totals[0] == "+12.300"

        assert script.stdout is not None
        # The banner comes once every node answers; a SIGTERM before it would cut it short.
        banner = _read_until(script.stdout.fileno(), b"Ctrl-C stops the grid.", timeout_s=30)
        wait_until(agreed, timeout=20, what="the four nodes of run.sh to agree")
        script.send_signal(signal.SIGTERM)
        rest, _ = script.communicate(timeout=20)
        out = (banner + rest).decode(errors="replace")
        assert script.returncode == 0, out
        assert "zgrid-ctl" in out and "grid stopped" in out
        wait_until(lambda: not _group_alive(script.pid), timeout=10,
                   what="every process of run.sh to exit")
        for endpoint in endpoints:
            assert ctl("status", node=endpoint, timeout=0.3).returncode == 3
    finally:
        if _group_alive(script.pid):
            os.killpg(script.pid, signal.SIGKILL)
        script.wait(timeout=10)
