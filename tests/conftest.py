"""Shared fixtures: real zgrid-node processes on 127.0.0.1, driven by the real zgrid-ctl.

Every process a test starts is registered with the `grid` fixture and killed at teardown,
whatever the test's outcome. Waiting is always on a condition with a deadline (`wait_until`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from zgrid.client import Client

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
DEFAULT_WAIT_S = 10.0
# Fast failure detection for tests: a sibling is DOWN after 0.5 s of silence.
FAST = ("--ping-interval", "0.1", "--dead-after", "0.5")

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], T], timeout: float = DEFAULT_WAIT_S,
               interval: float = 0.02, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # e.g. a node still starting: keep polling until the deadline
            last_error = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f" (last error: {last_error!r})" if last_error else ""))
        time.sleep(interval)


def holds_for(predicate: Callable[[], bool], seconds: float, interval: float = 0.02,
              what: str = "condition") -> None:
    """Check that `predicate` stays true for `seconds` (observing that nothing happens)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), f"{what} changed"
        time.sleep(interval)


def ctl(*args: str, node: str | None = None, timeout: float = 2.0,
        check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the real zgrid-ctl."""
    cmd = [str(BIN / "zgrid-ctl"), "--timeout", str(timeout)]
    if node:
        cmd += ["--node", node]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"zgrid-ctl {' '.join(args)} exited {proc.returncode}: "
                             f"{proc.stderr.strip()}")
    return proc


@dataclass
class NodeProc:
    """One real zgrid-node process."""

    id: str
    port: int
    data_dir: Path
    log_path: Path
    extra: tuple[str, ...] = ()
    keys: Path | None = None  # a CurveZMQ keys directory: then everything speaks CURVE
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp://{HOST}:{self.port}"

    @property
    def address(self) -> str:
        """How others must name this node: ID@ENDPOINT with keys, else the endpoint."""
        return f"{self.id}@{self.endpoint}" if self.keys else self.endpoint

    def start(self, *args: str) -> NodeProc:
        keys = ("--keys", str(self.keys)) if self.keys else ()
        cmd = [str(BIN / "zgrid-node"), "--id", self.id, "--bind", self.endpoint,
               "--data-dir", str(self.data_dir), "--log-level", "debug", *keys, *self.extra,
               *args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen process must be able to die
            self.proc.kill()
            self.proc.wait(timeout=10)

    def ctl(self, *args: str, timeout: float = 2.0, check: bool = False
            ) -> subprocess.CompletedProcess[str]:
        keys = ("--keys", str(self.keys)) if self.keys else ()
        return ctl(*keys, *args, node=self.address, timeout=timeout, check=check)

    def ctl_json(self, *args: str, timeout: float = 2.0) -> Any:
        return json.loads(self.ctl("--json", *args, timeout=timeout, check=True).stdout)

    def client(self, timeout: float = 2.0) -> Client:
        return Client(self.address, timeout, keys_dir=self.keys)

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        with self.client(timeout) as client:
            return client.status()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Grid:
    """A set of nodes started by one test; all of them are killed at teardown."""

    tmp: Path
    nodes: list[NodeProc] = field(default_factory=list)

    def add(self, node_id: str, *args: str, extra: tuple[str, ...] = FAST,
            data_dir: Path | None = None, port: int | None = None, keys: Path | None = None
            ) -> NodeProc:
        node = NodeProc(node_id, port or free_port(), data_dir or self.tmp / node_id,
                        self.tmp / f"{node_id}.{len(self.nodes)}.log", extra, keys)
        self.nodes.append(node)
        node.start(*args)
        wait_until(lambda: node.status(timeout=0.5), what=f"{node_id} to answer")
        return node

    def line(self, *specs: tuple[str, float, float], extra: tuple[str, ...] = FAST
             ) -> list[NodeProc]:
        """Nodes (id, production, consumption), each linked to the previous one."""
        started: list[NodeProc] = []
        for node_id, production, consumption in specs:
            args = ["--production", str(production), "--consumption", str(consumption)]
            if started:
                args += ["--sibling", started[-1].endpoint]
            started.append(self.add(node_id, *args, extra=extra))
        return started

    def wait_island(self, members: list[NodeProc], timeout: float = DEFAULT_WAIT_S
                    ) -> list[dict[str, Any]]:
        """Wait until each member sees exactly `members` as its island with one equal total."""
        ids = sorted(m.id for m in members)

        def agreed() -> list[dict[str, Any]] | None:
            statuses = [m.status(timeout=1.0) for m in members]
            if all(s["island"] == ids for s in statuses) and len(
                    {s["total_net"] for s in statuses}) == 1:
                return statuses
            return None

        return wait_until(agreed, timeout, what=f"island {ids} to agree")

    def close(self) -> None:
        for node in self.nodes:
            node.kill()


@pytest.fixture
def grid(tmp_path: Path) -> Iterator[Grid]:
    g = Grid(tmp_path)
    try:
        yield g
    finally:
        g.close()
        if os.environ.get("ZGRID_TEST_SHOW_LOGS"):
            for node in g.nodes:
                sys.stderr.write(f"--- {node.log_path.name}\n{node.log_text()}\n")
