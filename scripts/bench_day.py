#!/usr/bin/env python3
"""The Phase II day benchmark under the simulator (`make bench-sim`, after bench_sim.py).

Runs examples/scenarios/village.toml (1,000 nodes: households on the BDEW profile, 30 % with
PV, 10 % batteries, plants, a factory; one day at 1-minute steps) and checks issue 9's
targets: |net after balancing| <= 1 % of the load in >= 99.9 % of the steps where flexibility
sufficed, the imbalance energy reduced by >= 95 % against the same day without balancing,
and a wall time under 5 minutes on this 2-core machine. With --big it also runs the same
village scaled to 10,000 nodes for a short window (--big-hours) and reports what that took.

Writes bench-results/day.json (summaries) and bench-results/day.png (the village's day).
This script only reports: it never changes the scenario to make a figure look better, and it
reads the wall clock only to report wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mypyc_build import source_hash  # scripts/, run by path: sys.path[0]

from zgrid.sim.day import DayResult, DayScenario, Group, load_day, run_day
from zgrid.sim.plots import plot_day
from zgrid.views import stderr_progress

ROOT = Path(__file__).resolve().parent.parent
VILLAGE = ROOT / "examples" / "scenarios" / "village.toml"
OUT_DIR = Path("bench-results")
TARGET_BALANCED_FRACTION = 0.999
TARGET_REDUCTION = 0.95
TARGET_WALL_S = 300.0
PROGRESS_TICK_S = 1.0  # while a run works in its own process, its line's clock moves this often


def scaled(sc: DayScenario, factor: int, hours: float) -> DayScenario:
    """The same village with every group `factor` times larger (plants' sizes too)."""
    groups = []
    for g in sc.groups:
        params = dict(g.params)
        if g.kind == "plant":
            params["max_kw"] = params["max_kw"] * factor
        if g.kind == "factory":
            params["annual_kwh"] = params["annual_kwh"] * factor
        groups.append(Group(g.kind, g.count * factor if g.kind not in ("plant", "factory")
                            else g.count, params))
    return dataclasses.replace(sc, groups=tuple(groups), duration_h=hours,
                               name=f"{sc.name}-x{factor}")


def run(sc: DayScenario, compiled: Path | None = None) -> DayResult:
    """In a fresh process, so that one run's caches and memory do not flatter the next; with
    `compiled`, that process imports zgrid from the mypyc-compiled tree there."""
    how = "compiled with mypyc" if compiled else "interpreted"
    print(f"... {sc.name}: {sc.nodes} nodes, {sc.duration_h:g} h at {sc.step_s} s steps, {how}",
          file=sys.stderr, flush=True)
    env = dict(os.environ)
    if compiled is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(compiled.resolve()),
                                                        env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        job, answer = Path(tmp) / "scenario.pickle", Path(tmp) / "result.json"
        job.write_bytes(pickle.dumps(sc))
        # The script by its path: sys.path[0] is scripts/, so the checkout's own zgrid/ does
        # not come before the compiled tree on PYTHONPATH.
        worker = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                                   str(job), str(answer), *(["--expect-compiled"] if compiled
                                                            else [])], env=env)
        # A day takes minutes: on a terminal, a spinner and the time it has taken so far.
        with stderr_progress(f"{sc.name} ({how}): running") as move:
            while worker.poll() is None:
                time.sleep(PROGRESS_TICK_S)
                move(0)
        if worker.returncode != 0:
            raise SystemExit(f"error: the {how} run failed (exit {worker.returncode})")
        done = json.loads(answer.read_text())
    result = DayResult(sc, done["summary"], done["series"])
    print(f"    wall {result.summary['wall_s']} s", file=sys.stderr, flush=True)
    return result


def work(job: Path, answer: Path, expect_compiled: bool) -> int:
    """The worker process: run one day and write its summary and series as JSON."""
    import zgrid.core

    compiled = not zgrid.core.__file__.endswith(".py")
    if compiled != expect_compiled:
        print(f"error: zgrid.core comes from {zgrid.core.__file__}", file=sys.stderr)
        return 2
    if compiled:
        tree = Path(zgrid.core.__file__).resolve().parent.parent
        if (tree / "SOURCE_HASH").read_text().strip() != source_hash():
            print(f"error: {tree} was compiled from other sources than the checkout's: "
                  "rebuild it (make bench-sim does)", file=sys.stderr)
            return 2
    result = run_day(pickle.loads(job.read_bytes()))
    summary = dict(result.summary, core_module="compiled" if compiled else "interpreted")
    answer.write_text(json.dumps({"summary": summary, "series": result.series}))
    return 0


def same_day(a: DayResult, b: DayResult) -> list[str]:
    """The figures in which two runs of one scenario differ (wall times aside)."""
    timing = {"wall_s", "loop_wall_s", "core_module"}
    keys = (set(a.summary) | set(b.summary)) - timing
    differ = [k for k in sorted(keys) if a.summary.get(k) != b.summary.get(k)]
    differ += [f"series {k}" for k in sorted(set(a.series) | set(b.series))
               if a.series.get(k) != b.series.get(k)]
    return differ


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(village: dict[str, Any], compiled: dict[str, Any] | None,
           big: dict[str, Any] | None) -> None:
    s = village
    rows = [
        ("nodes, steps", f"{s['nodes']}, {s['steps']} x {s['step_s']} s", ""),
        ("steps balanced within 1 % of load (where flex sufficed)",
         f"{s['steps_balanced_within_1pct']} / {s['steps_flex_sufficed']} "
         f"({100 * (s['balanced_fraction'] or 0):.3f} %)",
         f">= 99.9 %: {met((s['balanced_fraction'] or 0) >= TARGET_BALANCED_FRACTION)}"),
        ("imbalance energy without / with balancing",
         f"{s['imbalance_kwh_without_balancing']:.1f} / {s['imbalance_kwh_with_balancing']:.3f}"
         f" kWh ({100 * (s['imbalance_reduction'] or 0):.2f} % less)",
         f">= 95 %: {met((s['imbalance_reduction'] or 0) >= TARGET_REDUCTION)}"),
        ("|net| after balancing p50 / p99 / max",
         f"{s['net_kw_p50']:.3f} / {s['net_kw_p99']:.3f} / {s['net_kw_max']:.3f} kW", ""),
        ("steps not agreed at their end", str(s["steps_not_agreed_at_end"]), ""),
        ("messages per simulated minute", f"{s['messages_per_simulated_minute']:.0f}", ""),
        ("wall time, interpreted (CPython)", f"{s['wall_s']:.1f} s",
         f"< 300 s: {met(s['wall_s'] < TARGET_WALL_S)}"),
    ]
    if compiled is not None:
        rows.append(("wall time, compiled with mypyc (same day, identical figures)",
                     f"{compiled['wall_s']:.1f} s",
                     f"< 300 s: {met(compiled['wall_s'] < TARGET_WALL_S)}"))
    if big is not None:
        rows.append((f"{big['nodes']} nodes, {big['steps']} steps: wall time",
                     f"{big['wall_s']:.1f} s ({big['messages_per_simulated_minute']:.0f} "
                     f"messages per simulated minute)", ""))
    width = max(len(r[0]) for r in rows)
    print("\nPhase II: a simulated day (2-core machine)")
    for name, value, target in rows:
        print(f"  {name:<{width}}  {value:<44} {target}")


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        return work(Path(sys.argv[2]), Path(sys.argv[3]), "--expect-compiled" in sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--hours", type=float, default=24.0, help="village day length")
    parser.add_argument("--compiled", type=Path, metavar="DIR",
                        help="also run the day on the mypyc-compiled tree in DIR (built by "
                        "scripts/mypyc_build.py; make bench-sim does both) and check that both "
                        "days are identical")
    parser.add_argument("--big", action="store_true", help="also 10,000 nodes for a window "
                        "(on the compiled tree if there is one)")
    parser.add_argument("--big-hours", type=float, default=0.1)
    parser.add_argument("--big-start-h", type=float, default=11.0,
                        help="the hour the 10,000-node window starts at (a busy daytime one)")
    args = parser.parse_args()
    sc = dataclasses.replace(load_day(str(VILLAGE)), duration_h=args.hours)
    village = run(sc)
    fast = run(sc, args.compiled) if args.compiled else None
    differ = same_day(village, fast) if fast else []
    big = run(dataclasses.replace(scaled(sc, 10, args.big_hours), start_h=args.big_start_h),
              args.compiled).summary if args.big else None
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "day.json").write_text(json.dumps(
        {"village": village.summary, "village_series": village.series,
         "village_compiled": fast.summary if fast else None,
         "compiled_differs_in": differ, "big": big}, indent=1) + "\n")
    plot_day(village.series, village.summary, OUT_DIR / "day.png")
    report(village.summary, fast.summary if fast else None, big)
    print(f"\nwrote {OUT_DIR / 'day.json'} and {OUT_DIR / 'day.png'}")
    if differ:
        print(f"error: the compiled day differs from the interpreted one in: {', '.join(differ)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
