#!/usr/bin/env python3
"""Scale benchmark of the protocol under the deterministic simulator (`make bench-sim`).

Runs the scale targets of issue 4 and records what was measured:

1. 1,000 nodes, random-regular degree 4: cold start to agreement, then 100 changes (wire
   "fast", and once more with every message encoded and decoded: wire "full");
2. 10,000 nodes, random-regular degree 4: 100 changes from a preloaded agreed state;
3. simulator speed (delivered messages per wall second, from the runs above);
4. a sweep N = 100 .. 10,000 for two topologies (random-regular and 2-D grid): convergence
   time and messages per change against N, plotted with the diameter bound.

Writes bench-results/sim.json and bench-results/sim_scaling.png. This script only reports: it
must never change the protocol's parameters to make a figure look better, and it never reads
the wall clock except to report wall time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: write PNG files only
import matplotlib.pyplot as plt

import zgrid.core
from zgrid.sim import DEFAULT_LATENCY_S, Scenario, run_scenario
from zgrid.views import stderr_progress

OUT_DIR = Path("bench-results")
SWEEP_NODES = (100, 300, 1000, 3000, 10000)
SWEEP_TOPOLOGIES = ("random-regular", "grid")
SWEEP_CHANGES = 30
TARGET_1K_WALL_S = 60.0
TARGET_10K_WALL_S = 300.0
TARGET_10K_MEMORY_MB = 8 * 1024
TARGET_10K_COLD_WALL_S = 15 * 60.0
TARGET_MESSAGES_PER_S = 200_000
PROGRESS_TICK_S = 1.0  # while a run works in its own process, its line's clock moves this often


def run(label: str, sc: Scenario) -> dict[str, Any]:
    """One scenario in a fresh process, so that memory_peak_mb is that run's own peak."""
    print(f"... {label}", file=sys.stderr, flush=True)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pending = pool.apply_async(run_scenario, (sc,))
        # A run can take minutes: on a terminal, a spinner and the time it has taken so far.
        with stderr_progress(f"{label}: running") as move:
            while not pending.ready():
                pending.wait(PROGRESS_TICK_S)
                move(0)
        result: dict[str, Any] = pending.get()
    result["label"] = label
    print(f"    wall {result['wall_s']} s, agreed {result['agreed']}", file=sys.stderr, flush=True)
    return result


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[k]) for row in cells)) for k, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def plot(sweep: list[dict[str, Any]], path: Path) -> None:
    fig, (ax_time, ax_msgs) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"random-regular": "tab:blue", "grid": "tab:orange"}
    for topology in SWEEP_TOPOLOGIES:
        rows = [r for r in sweep if r["topology"] == topology]
        n = [r["nodes"] for r in rows]
        c = colors[topology]
        ax_time.plot(n, [r["converge_s_max"] * 1e3 for r in rows], "o-", color=c,
                     label=f"{topology}: max convergence")
        ax_time.plot(n, [r["converge_s_p50"] * 1e3 for r in rows], "s:", color=c,
                     label=f"{topology}: p50 convergence")
        ax_time.plot(n, [r["diameter"] * DEFAULT_LATENCY_S * 1e3 for r in rows], "--",
                     color=c, alpha=0.6, label=f"{topology}: diameter x one hop (bound)")
        ax_msgs.plot(n, [r["messages_per_change"] for r in rows], "o-", color=c,
                     label=f"{topology}: messages per change")
        ax_msgs.plot(n, [2 * r["edges"] for r in rows], "--", color=c, alpha=0.6,
                     label=f"{topology}: 2 x edges (flooding bound)")
    for ax in (ax_time, ax_msgs):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("nodes")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax_time.set_ylabel("virtual ms from change to every node holding it")
    ax_msgs.set_ylabel("messages delivered per change")
    fig.suptitle(f"zgrid simulator: one change floods the grid (one hop = "
                 f"{DEFAULT_LATENCY_S * 1e6:.0f} us, degree 4 / grid)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, str]:
    """Where a run ran, and on which zgrid: the sources interpreted, or the tree compiled with
    mypyc (`PYTHONPATH=build/mypyc`, as `make bench-sim-cold` runs it)."""
    return {"python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor(),
            "zgrid_core": "interpreted" if zgrid.core.__file__.endswith(".py") else "compiled"}


def cold_10k(started: float) -> int:
    """The protocol's own cold start at 10,000 nodes: every node starts, every edge is a
    `link` request, and the run ends when every node holds every advert and every link."""
    result = run("10000 rr4 cold start + 10 changes (wire fast)",
                 Scenario(nodes=10_000, degree=4, changes=10, start="cold", wire_mode="fast",
                          cold_start_limit_s=120.0))
    print(table([result], ["label", "nodes", "edges", "diameter", "cold_start_converge_s",
                           "converge_s_p50", "messages_per_change", "memory_peak_mb",
                           "wall_s", "loop_wall_s", "messages_per_s", "agreed"]))
    checks = {"10k_cold_wall_s": result["wall_s"],
              "10k_cold_under_15min": result["wall_s"] < TARGET_10K_COLD_WALL_S,
              "10k_cold_memory_peak_mb": result["memory_peak_mb"],
              "10k_cold_under_8GB": result["memory_peak_mb"] < TARGET_10K_MEMORY_MB,
              "agreed": result["agreed"]}
    for key, value in checks.items():
        print(f"{key:<40} {value}")
    payload = {"machine": machine(), "result": result, "checks": checks,
               "bench_wall_s": round(time.perf_counter() - started, 1)}
    (OUT_DIR / "sim_cold_10k.json").write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {OUT_DIR / 'sim_cold_10k.json'}")
    return 0 if result["agreed"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    parser.add_argument("--skip-full-wire", action="store_true",
                        help="skip the 1,000-node run that encodes+decodes every message")
    parser.add_argument("--cold-10k", action="store_true",
                        help="only the 10,000-node cold start (no preload): about 8 minutes "
                        "compiled (make bench-sim-cold), longer interpreted")
    args = parser.parse_args()
    OUT_DIR.mkdir(exist_ok=True)
    big, mid = (1000, 300) if args.quick else (10000, 1000)
    started = time.perf_counter()
    if args.cold_10k:
        return cold_10k(started)

    targets: list[dict[str, Any]] = []
    targets.append(run(f"{mid} rr4 cold start + 100 changes (wire fast)",
                       Scenario(nodes=mid, degree=4, changes=100, start="cold",
                                wire_mode="fast")))
    if not args.skip_full_wire:
        targets.append(run(f"{mid} rr4 cold start + 100 changes (wire full)",
                           Scenario(nodes=mid, degree=4, changes=100, start="cold",
                                    wire_mode="full")))
    targets.append(run(f"{big} rr4 preload + 100 changes (wire fast)",
                       Scenario(nodes=big, degree=4, changes=100, start="preload",
                                wire_mode="fast")))

    sweep: list[dict[str, Any]] = []
    for topology in SWEEP_TOPOLOGIES:
        for n in SWEEP_NODES:
            if args.quick and n > 1000:
                continue
            sweep.append(run(f"sweep {topology} {n}",
                             Scenario(nodes=n, topology=topology, degree=4,
                                      changes=SWEEP_CHANGES, start="preload",
                                      wire_mode="fast")))

    columns = ["label", "nodes", "edges", "diameter", "cold_start_converge_s",
               "converge_s_p50", "converge_s_p99", "converge_s_max", "hops_p50", "hops_p99",
               "hops_max", "messages_per_change", "bytes_per_change", "memory_peak_mb",
               "wall_s", "messages_per_s", "agreed"]
    print("\n== scale targets ==")
    print(table(targets, columns))
    print("\n== sweep (preloaded agreed state, "
          f"{SWEEP_CHANGES} changes each, wire fast) ==")
    print(table(sweep, ["topology", "nodes", "edges", "diameter", "diameter_exact",
                        "converge_s_p50", "converge_s_max", "hops_max",
                        "messages_per_change", "bytes_per_change", "memory_peak_mb",
                        "wall_s", "messages_per_s", "agreed"]))

    first, last = targets[0], targets[-1]
    fastest = max(r["messages_per_s"] or 0 for r in targets + sweep)
    # The target is set at 1,000 nodes (issue 7): a small grid's rate says nothing about it.
    fastest_1k = max((r["messages_per_s"] or 0 for r in targets + sweep if r["nodes"] == 1000),
                     default=0)
    checks = {
        "1k_cold_start_plus_100_changes_wall_s": first["wall_s"],
        "1k_under_60s": first["wall_s"] < TARGET_1K_WALL_S,
        "1k_changes_within_eccentricity_hops": first["changes_within_eccentricity_hops"],
        "1k_messages_per_change_le_2x_edges":
            first["messages_per_change_max"] <= 2 * first["edges"],
        "10k_wall_s": last["wall_s"],
        "10k_under_5min": last["wall_s"] < TARGET_10K_WALL_S,
        "10k_memory_peak_mb": last["memory_peak_mb"],
        "10k_under_8GB": last["memory_peak_mb"] < TARGET_10K_MEMORY_MB,
        "best_messages_per_s_any_size": fastest,
        "best_messages_per_s_at_1k_nodes": fastest_1k,
        "messages_per_s_at_1k_target_met": fastest_1k >= TARGET_MESSAGES_PER_S,
        "all_agreed": all(r["agreed"] for r in targets + sweep),
    }
    print("\n== targets ==")
    for key, value in checks.items():
        print(f"{key:<40} {value}")
    plot(sweep, OUT_DIR / "sim_scaling.png")
    payload = {"machine": machine(),
               "targets": targets, "sweep": sweep, "checks": checks,
               "bench_wall_s": round(time.perf_counter() - started, 1)}
    (OUT_DIR / "sim.json").write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {OUT_DIR / 'sim.json'} and {OUT_DIR / 'sim_scaling.png'}")
    return 0 if checks["all_agreed"] else 1


if __name__ == "__main__":
    sys.exit(main())
