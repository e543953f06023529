"""Shared fixtures: real zgrid-node processes on 127.0.0.1, driven by the real zgrid-ctl.

The plumbing (ports, processes, zgrid-ctl, bounded waits) is zgrid.harness, shared with the
benchmarks; this file keeps what is pytest's: the `grid` fixture and its `Grid`. Every process
a test starts is registered with `grid` and killed at teardown, whatever the test's outcome.
Waiting is always on a condition with a deadline (`wait_until`). Test files import the
harness's names from here.
"""

from __future__ import annotations

import os
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

__all__ = ["BIN", "DEFAULT_WAIT_S", "FAST", "HOST", "Grid", "NodeProc", "ctl", "free_port",
           "wait_until"]

# Fast failure detection for tests: a sibling is DOWN after 0.5 s of silence.
FAST = ("--ping-interval", "0.1", "--dead-after", "0.5")
ANSWER_TIMEOUT_S = 0.5  # one status request while a node is starting
ISLAND_STATUS_TIMEOUT_S = 1.0


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
