"""Shared fixtures: real zgrid-node processes on 127.0.0.1, driven by the real zgrid-ctl.

The plumbing (ports, processes, zgrid-ctl, bounded waits) is zgrid.harness, shared with the
benchmarks; this file keeps what is pytest's: the `grid` fixture and its `Grid`. Every process
a test starts is registered with `grid` and killed at teardown, whatever the test's outcome.
Waiting is always on a condition with a deadline (`wait_until`). Test files import the
harness's names from here.

`small_disk` is a real disk that can be filled: a 256 KiB tmpfs mounted in a mount namespace
of its own (nothing outside the test sees it; it goes away with its last process). Mounting
needs root or CAP_SYS_ADMIN; without them the tests that use it are skipped, saying so.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from zgrid.harness import (
    BIN,
    DEFAULT_WAIT_S,
    HOST,
    NodeProc,
    ctl,
    free_port,
    wait_until,
)

__all__ = ["BIN", "DEFAULT_WAIT_S", "FAST", "HOST", "Grid", "NodeProc", "SmallDisk", "ctl",
           "free_port", "wait_until"]

# Fast failure detection for tests: a sibling is DOWN after 0.5 s of silence.
FAST = ("--ping-interval", "0.1", "--dead-after", "0.5")
ANSWER_TIMEOUT_S = 0.5  # one status request while a node is starting
ISLAND_STATUS_TIMEOUT_S = 1.0
SMALL_DISK_KIB = 256  # as in issue 8: room for a node's state, filled in a moment
DISK_COMMAND_TIMEOUT_S = 30.0


@dataclass
class Grid:
    """A set of nodes started by one test; all of them are killed at teardown."""

    tmp: Path
    nodes: list[NodeProc] = field(default_factory=list)

    def add(self, node_id: str, *args: str, extra: tuple[str, ...] = FAST,
            data_dir: Path | None = None, port: int | None = None, keys: Path | None = None,
            wrapper: tuple[str, ...] = ()) -> NodeProc:
        node = NodeProc(node_id, port or free_port(), data_dir or self.tmp / node_id,
                        self.tmp / f"{node_id}.{len(self.nodes)}.log", extra, keys,
                        wrapper=wrapper)
        self.nodes.append(node)
        node.start(*args)
        wait_until(lambda: node.status(timeout=ANSWER_TIMEOUT_S), what=f"{node_id} to answer")
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
            statuses = [m.status(timeout=ISLAND_STATUS_TIMEOUT_S) for m in members]
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


@dataclass
class SmallDisk:
    """A small tmpfs at `path`, visible only in the mount namespace that `holder` keeps alive.

    Run a process on it with `enter` as its wrapper (or `run` for a short command); `fill` it
    to the last byte and `free` it again."""

    path: Path
    holder: subprocess.Popen[str]
    _fillers: Iterator[int] = field(default_factory=itertools.count)

    @property
    def enter(self) -> tuple[str, ...]:
        return ("nsenter", f"--target={self.holder.pid}", "--mount", "--")

    def run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.enter, *cmd], capture_output=True, text=True,
                              timeout=DISK_COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)

    def free_bytes(self) -> int:
        proc = self.run("stat", "--file-system", "--format=%a %S", str(self.path))
        blocks, block_size = proc.stdout.split()
        return int(blocks) * int(block_size)

    def fill(self) -> None:
        # dd writes until the disk is full (ENOSPC), then fails: that failure is the point.
        self.run("dd", "if=/dev/zero", f"of={self.path / f'filler-{next(self._fillers)}'}",
                 "bs=4096")
        assert self.free_bytes() == 0, "the small disk did not fill up"

    def free(self) -> None:
        self.run("sh", "-c", 'rm -f "$0"/filler-*', str(self.path))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    missing = [tool for tool in ("unshare", "nsenter", "dd", "stat") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"a real full disk needs {', '.join(missing)} (util-linux, coreutils)")
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    # `cat` holds the namespace until the test closes its stdin (or dies: then stdin closes).
    script = ('mount -t tmpfs -o "size=$1k,mode=0755" zgrid-small-disk "$0" && echo mounted '
              '&& exec cat')
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
         str(mountpoint), str(SMALL_DISK_KIB)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdin is not None and holder.stderr is not None
    try:
        if holder.stdout.readline().strip() != "mounted":  # sh prints or exits at once
            holder.wait(timeout=DISK_COMMAND_TIMEOUT_S)
            pytest.skip("a real full disk needs a small tmpfs, and mounting one needs root or "
                        f"CAP_SYS_ADMIN here: {holder.stderr.read().strip()}")
        yield SmallDisk(mountpoint, holder)
    finally:
        holder.stdin.close()  # the end of `cat`, the namespace and its disk
        try:
            holder.wait(timeout=DISK_COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        holder.stdout.close()
        holder.stderr.close()
