"""Fault windows: what `--partition`, `--crash` and `--freeze` mean, and putting them on a
simulator's schedule.

What this file is for: `parse_fault` turns `START[-END]:TARGETS` into a `Fault` (times in
virtual seconds after the warm-up; targets resolved to node indexes and links of the true
graph), and `schedule_faults` makes each one a pair of actions on the engine's clock: cut and
restore links, crash and restart, freeze and thaw.

What it must never do: act on a node or link itself (it only schedules the engine's own
`cut_links`, `crash`, `freeze` ... at the right times), or draw random numbers: a fault is
fully given by its text and the topology.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from zgrid.sim.engine import Simulator
from zgrid.sim.errors import SimError


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault window: from `start_s` to `end_s` (virtual seconds after warm-up; end may be
    None: never healed). kind: partition (targets: links), crash, freeze (targets: nodes)."""

    kind: str
    start_s: float
    end_s: float | None
    nodes: tuple[int, ...] = ()
    links: tuple[tuple[int, int], ...] = ()


def parse_fault(kind: str, text: str, names: Sequence[str],
                edges: Sequence[tuple[int, int]]) -> Fault:
    """`START[-END]:TARGETS`. Partition targets: `half`, or links `n1-n2,n3-n4`, or a node set
    `n1+n2+n3` (cut every link between those nodes and the rest). Crash/freeze targets: `n1,n2`.
    """
    index = {name: i for i, name in enumerate(names)}
    when, sep, targets = text.partition(":")
    if not sep or not targets:
        raise SimError(f"--{kind} {text!r}: expected START[-END]:TARGETS, e.g. 0.5-2:n3")
    start_text, dash, end_text = when.partition("-")
    try:
        start = float(start_text)
        end = float(end_text) if dash else None
    except ValueError:
        raise SimError(f"--{kind} {text!r}: START and END are virtual seconds") from None
    if not math.isfinite(start) or start < 0 or (end is not None and not start < end < math.inf):
        raise SimError(f"--{kind} {text!r}: need 0 <= START < END")

    def node(name: str) -> int:
        if name not in index:
            raise SimError(f"--{kind} {text!r}: unknown node {name!r}")
        return index[name]

    if kind in ("crash", "freeze"):
        return Fault(kind, start, end, nodes=tuple(node(x) for x in targets.split(",")))
    if targets == "half" or "+" in targets or "-" not in targets:
        if targets == "half":
            side = set(range(len(names) // 2))
        else:
            side = {node(x) for x in targets.split("+")}
        links = tuple((u, v) for u, v in edges if (u in side) != (v in side))
        return Fault(kind, start, end, links=links)
    links_list = []
    for item in targets.split(","):
        a, _, b = item.partition("-")
        links_list.append((node(a), node(b)))
    return Fault(kind, start, end, links=tuple(links_list))


def schedule_faults(sim: Simulator, faults: Sequence[Fault], t0: float) -> float:
    """Put every fault window on the engine's clock, counted from virtual time t0; returns
    when the last one starts or ends (t0 if there are none)."""
    last_fault = t0
    for fault in faults:
        start, end = t0 + fault.start_s, None if fault.end_s is None else t0 + fault.end_s
        last_fault = max(last_fault, end if end is not None else start)
        if fault.kind == "partition":
            sim.at(start, partial(sim.cut_links, fault.links))
            if end is not None:
                sim.at(end, partial(sim.restore_links, fault.links))
        else:
            for i in fault.nodes:
                down, up = (sim.crash, sim.restart) if fault.kind == "crash" else (
                    sim.freeze, sim.thaw)
                sim.at(start, partial(down, i))
                if end is not None:
                    sim.at(end, partial(up, i))
    return last_fault
