"""Benchmark of Phase II balancing with real zgrid-node processes on loopback (issue 9).

What it is for: measuring, on this machine, how long an island of real `zgrid-node` processes
takes to balance itself after a change (`make bench` runs it after bench_converge.py):

  balance  N = 4 and 16 nodes on bench_converge's random connected topologies (same average
           degree per size); 25 % of the nodes (at least 1) offer flexibility with distinct
           prices, enough in total to cover any imbalance; 50 changes one at a time, each a
           `set` of a random other node's consumption. Timed (time.perf_counter) from sending
           the `set` until every node's `watch` stream shows (a) the new exact `imbalance_kw`
           (the plain flood) and (b) balanced: that imbalance, `|balanced_net_kw| <= 1e-9`
           and one `clearing_hash` on every node (the extra step: each activated node applies
           its new activation and re-advertises it). Also the messages per change, whether
           every node's clearing and every activation equal `zgrid.clearing.clear` computed
           here from the same offers, and the transient imbalance energy (below).

It prints one table per measure and writes bench-results/balancing.json. Nodes, topologies,
machine load and table printing are bench_converge.py's.

What it must never do: bind or dial anything but 127.0.0.1; leave a process behind (every node
is killed in a `finally` and dies with this process via PR_SET_PDEATHSIG); wait without a
bound; put numbers in the output that were not measured in this run.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import bench_converge as bc
import zmq

from zgrid.clearing import Clearing, Offer, clear
from zgrid.harness import ControlFleet, summary
from zgrid.views import stderr_progress
from zgrid.wire import SetRequest

REPO = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO / "bench-results" / "balancing.json"

BALANCE_SIZES = (4, 16)
FLEX_NODE_FRACTION = 0.25  # of the nodes offer flexibility ...
MIN_FLEX_NODES = 1  # ... and at least this many
# Offers: flex node j (0..k-1) offers 2**j shares up and 2**(k-1-j) shares down of the worst
# imbalance N * VALUE_MAX_KW (every net is within +-VALUE_MAX_KW), so flexibility always
# suffices; the cheapest offer is the smallest in both directions, so a typical change moves
# the marginal offer and merit order matters. Prices are distinct in integer milli-units.
FLEX_MARGIN_KW = 1.0  # on top of the worst imbalance, against rounding the shares
PRICE_UP_BASE_PER_KWH, PRICE_UP_STEP_PER_KWH = 0.10, 0.05  # j = 0 cheapest up
PRICE_DOWN_BASE_PER_KWH, PRICE_DOWN_STEP_PER_KWH = -0.05, 0.03  # j = k-1 cheapest down
BALANCED_TOLERANCE_KW = 1e-9  # |balanced_net_kw|: activations travel as rounded doubles

CHANGES_FULL, CHANGES_QUICK = 50, 10
CHANGE_TIMEOUT_S = 5.0  # a change not balanced by then is recorded as a timeout
INITIAL_BALANCE_TIMEOUT_S = 10.0
ATTEMPTS = 2  # per grid: a second start if the first grid could not start
TARGET_BALANCED_P50_MS = {16: 20.0}  # issue 9
CLEAR_TIMING_CALLS = 2000  # clear() timed alone over each grid's last offers

MS_PER_S, NS_PER_MS, US_PER_S = 1e3, 1e6, 1e6


@dataclass(frozen=True)
class FlexOffer:
    flex_up_kw: float
    price_up_per_kwh: float
    flex_down_kw: float
    price_down_per_kwh: float

    def args(self) -> list[str]:
        return ["--flex-up", repr(self.flex_up_kw), "--price-up", repr(self.price_up_per_kwh),
                "--flex-down", repr(self.flex_down_kw),
                "--price-down", repr(self.price_down_per_kwh)]


def flex_offers(n: int, k: int) -> list[FlexOffer]:
    """The k offers (module constants): in total more than any imbalance of n nodes."""
    total_kw = n * bc.VALUE_MAX_KW + FLEX_MARGIN_KW
    shares = float((1 << k) - 1)
    scale = float(10 ** bc.VALUE_DECIMALS)  # rounded up to the values' decimals

    def share_kw(j: int) -> float:
        return math.ceil(total_kw * (1 << j) / shares * scale) / scale

    return [FlexOffer(share_kw(j), round(PRICE_UP_BASE_PER_KWH + j * PRICE_UP_STEP_PER_KWH, 3),
                      share_kw(k - 1 - j),
                      round(PRICE_DOWN_BASE_PER_KWH + (k - 1 - j) * PRICE_DOWN_STEP_PER_KWH, 3))
            for j in range(k)]


def local_clearing(grid: bc.BenchGrid, flex: dict[int, FlexOffer]) -> Clearing:
    """What every node must compute: zgrid.clearing.clear over the same base values and offers."""
    offers = []
    for i, (production, consumption) in enumerate(grid.values):
        f = flex.get(i)
        offers.append(Offer(grid.ids[i], production, consumption) if f is None else
                      Offer(grid.ids[i], production, consumption, f.flex_up_kw,
                            f.price_up_per_kwh, f.flex_down_kw, f.price_down_per_kwh))
    return clear(offers)


def is_balanced(view: dict[str, Any], imbalance_kw: float) -> bool:
    balanced = view.get("balanced_net_kw")
    return (view.get("imbalance_kw") == imbalance_kw and isinstance(balanced, float)
            and abs(balanced) <= BALANCED_TOLERANCE_KW)


def all_balanced(ctl: ControlFleet, n: int, imbalance_kw: float) -> bool:
    views = ctl.views
    return (len(views) == n and all(is_balanced(v, imbalance_kw) for v in views.values())
            and len({v.get("clearing_hash") for v in views.values()}) == 1)


def transient_energy(step_kw: float, applied: Sequence[tuple[float, float]]) -> float:
    """kW x ms (= J) of |island net| from the step (t = 0) until the last activation applied.

    `applied`: (ms after the step, activation change kW) per activated node. With fixed
    offers each activation is a non-increasing function of the imbalance, so every change has
    the sign opposite to the step and |net| only shrinks: no overshoot to account for.
    """
    energy, mismatch_kw, t_ms = 0.0, step_kw, 0.0
    for at_ms, delta_kw in sorted(applied):
        energy += abs(mismatch_kw) * (at_ms - t_ms)
        mismatch_kw += delta_kw
        t_ms = at_ms
    return energy


def time_clear(grid: bc.BenchGrid, flex: dict[int, FlexOffer], calls: int) -> dict[str, float]:
    """clear() alone (what every node recomputes per table version), each call timed with
    perf_counter, over this grid's last values and offers: microseconds."""
    samples = []
    for _ in range(calls):
        t = time.perf_counter()
        local_clearing(grid, flex)
        samples.append((time.perf_counter() - t) * US_PER_S)
    return summary(samples)


def one_change(grid: bc.BenchGrid, flex: dict[int, FlexOffer], origin: int,
               rng: random.Random, before_clearing: Clearing,
               before: dict[str, dict[str, Any]]
               ) -> tuple[dict[str, Any], Clearing, dict[str, dict[str, Any]]]:
    """Set a new consumption on `origin` (not a flex node); time it until the new imbalance is
    in every watch view, then until every view is balanced with one clearing hash; check the
    nodes' clearing and activations against local_clearing; count messages and CPU."""
    n, ids, ctl = grid.n, grid.ids, grid.control
    old_total = grid.expected_total()
    production = grid.values[origin][0]
    for _ in range(bc.MAX_VALUE_DRAWS):  # the change must move the imbalance
        consumption = round(rng.uniform(0, bc.VALUE_MAX_KW), bc.VALUE_DECIMALS)
        values = [*grid.values[:origin], (production, consumption), *grid.values[origin + 1:]]
        expected = bc.exact_total(values)
        if expected != old_total:
            break
    grid.values = values
    clearing = local_clearing(grid, flex)
    moved = {ids[i]: clearing.activation_kw(ids[i]) - before_clearing.activation_kw(ids[i])
             for i in flex
             if clearing.activation_kw(ids[i]) != before_clearing.activation_kw(ids[i])}
    visible: dict[str, float] = {}
    balanced_at: list[float] = []

    def on_view(node: str, view: dict[str, Any], at: float) -> None:
        if view.get("imbalance_kw") == expected:
            visible.setdefault(node, at)
        if not balanced_at and all_balanced(ctl, n, expected):
            balanced_at.append(at)

    pids = [node.pid for node in grid.nodes]
    ctl.on_view = on_view
    sched0 = [bc.sched_ns(p) for p in pids]
    t0_wall = time.time()
    t0 = time.perf_counter()
    rid = ctl.send(ids[origin], SetRequest(consumption=consumption))
    ctl.wait(lambda: bool(balanced_at), CHANGE_TIMEOUT_S)
    stamped = [float(v.get("ts", math.nan)) for v in ctl.views.values()]
    ctl.wait(lambda: rid in ctl.replies, bc.REQUEST_TIMEOUT_S)
    ack = ctl.replies.pop(rid, None)
    ctl.on_view = None
    time.sleep(bc.SETTLE_BETWEEN_CHANGES_S)
    sched1 = [bc.sched_ns(p) for p in pids]
    after = grid.statuses()
    cpu_ns = sum(a[0] - b[0] for a, b in zip(sched1, sched0, strict=True))
    deltas = bc.counter_deltas(before, after, ("messages_received", "adverts_received",
                                               "adverts_accepted", "digests_sent",
                                               "sends_dropped"))
    visible_ms = ((max(visible.values()) - t0) * MS_PER_S if len(visible) == n else None)
    balanced_ms = (balanced_at[0] - t0) * MS_PER_S if balanced_at else None
    # A flex node applies its new activation in the same loop turn that publishes its first
    # view with the new imbalance: that view's arrival here bounds when it applied it.
    applied = [((visible[node] - t0) * MS_PER_S, delta) for node, delta in moved.items()
               if node in visible]
    step_kw = expected - old_total
    matches = len(after) == n and all(
        s.get("clearing_hash") == clearing.hash and s.get("imbalance_kw") == expected
        and s.get("shortfall") == "none"
        and s.get("activation_kw") == clearing.activation_kw(node) for node, s in after.items())
    return {
        "origin": ids[origin], "consumption_kw": consumption, "imbalance_kw": expected,
        "step_kw": step_kw, "clearing_price": clearing.clearing_price,
        "activations_kw": dict(clearing.activations),
        "readvertised": sorted(moved), "expected_shortfall_kw": clearing.shortfall_kw,
        "visible_ms": visible_ms, "balanced_ms": balanced_ms,
        "extra_ms": None if visible_ms is None or balanced_ms is None
        else balanced_ms - visible_ms,
        "node_stamped_balanced_ms": None if balanced_ms is None
        else (max(stamped) - t0_wall) * MS_PER_S,
        "per_node_visible_ms": {nd: (t - t0) * MS_PER_S for nd, t in visible.items()},
        "last_activation_applied_ms": max((a for a, _ in applied), default=None)
        if len(applied) == len(moved) else None,
        "transient_energy_j": transient_energy(step_kw, applied)
        if len(applied) == len(moved) else None,
        "ack_ms": None if ack is None else (ack[1] - t0) * MS_PER_S,
        "ack_ok": None if ack is None else ack[0].ok,
        "nodes_match_local_clearing": matches,
        "node_cpu_ms": cpu_ns / NS_PER_MS,  # includes the settle pause (and its pings)
        **deltas,
    }, clearing, after


def bench_balance(run: bc.Run, n: int, changes: int) -> dict[str, Any]:
    k = max(MIN_FLEX_NODES, round(n * FLEX_NODE_FRACTION))
    flex_nodes = sorted(run.rng.sample(range(n), k))
    flex = dict(zip(flex_nodes, flex_offers(n, k), strict=True))
    others = [i for i in range(n) if i not in flex]
    with bc.running_grid(run, f"balance{n}", n, bc.CONVERGE_DEGREE[n], watch=True,
                         node_args=lambda i: flex[i].args() if i in flex else ()) as grid:
        topo = grid.topology()
        clearing = local_clearing(grid, flex)
        initial = grid.control.wait(lambda: all_balanced(grid.control, n, clearing.imbalance_kw),
                                    INITIAL_BALANCE_TIMEOUT_S)
        if initial is None:
            seen = {nd: v.get("balanced_net_kw") for nd, v in grid.control.views.items()}
            raise RuntimeError(f"N={n}: the grid did not balance itself at start: {seen}")
        statuses = grid.statuses()
        records: list[dict[str, Any]] = []
        with stderr_progress(f"balance N={n}: changes", total=changes) as move:
            for c in range(changes):
                rec, clearing, statuses = one_change(grid, flex, run.rng.choice(others),
                                                     run.rng, clearing, statuses)
                records.append({"change": c, **rec})
                move(c + 1)  # between changes: never inside a timed one
        flaps = bc.counters_sum(statuses, "link_flaps")
        offers = {grid.ids[i]: vars(f) for i, f in flex.items()}
    clear_us = time_clear(grid, flex, CLEAR_TIMING_CALLS)  # the nodes are gone: a quiet core

    def ms_of(key: str) -> list[float]:
        return [r[key] / MS_PER_S for r in records if r[key] is not None]

    def values_of(key: str) -> list[float]:
        return [float(r[key]) for r in records if r[key] is not None]

    extra = values_of("extra_ms")
    flood_model = 2 * len(grid.edges) - (n - 1)
    readverts = [len(r["readvertised"]) for r in records]
    return {
        "topology": topo, "changes": changes, "flex_nodes": offers,
        "balanced_tolerance_kw": BALANCED_TOLERANCE_KW,
        "timeouts": sum(1 for r in records if r["balanced_ms"] is None),
        "visible": bc.summary_ms(ms_of("visible_ms")),
        "balanced": bc.summary_ms(ms_of("balanced_ms")),
        "extra": bc.summary_ms([x / MS_PER_S for x in extra]),
        "node_stamped_balanced": bc.summary_ms(ms_of("node_stamped_balanced_ms")),
        "set_ack": bc.summary_ms(ms_of("ack_ms")),
        "last_activation_applied": bc.summary_ms(ms_of("last_activation_applied_ms")),
        "transient_energy_j": summary(values_of("transient_energy_j")),
        "step_abs_kw": summary([abs(r["step_kw"]) for r in records]),
        "readvertised_per_change": statistics.fmean(readverts),
        "readvertised_max": max(readverts),
        "changes_with_marginal_shift": sum(1 for x in readverts if x > 1),
        "messages_received_per_change": statistics.fmean(r["messages_received"]
                                                         for r in records),
        "adverts_received_per_change": statistics.fmean(r["adverts_received"] for r in records),
        "flood_model_adverts_per_change": statistics.fmean((1 + x) * flood_model
                                                           for x in readverts),
        "node_cpu_ms_per_change": statistics.fmean(r["node_cpu_ms"] for r in records),
        "changes_matching_local_clearing": sum(1 for r in records
                                               if r["nodes_match_local_clearing"]),
        "expected_shortfalls": sum(1 for r in records if r["expected_shortfall_kw"]),
        "digests_sent_total": sum(r["digests_sent"] for r in records),
        "sends_dropped_total": sum(r["sends_dropped"] for r in records),
        "link_flaps_total": flaps,
        "clear_us": clear_us,
        "target_balanced_p50_ms": TARGET_BALANCED_P50_MS.get(n),
        "records": records,
    }


def bench_balance_attempts(run: bc.Run, n: int, changes: int) -> dict[str, Any]:
    """bench_balance, started once more from the same RNG state (same topology, offers and
    changes) if the grid could not start (a free port taken by another process meanwhile)."""
    state = run.rng.getstate()
    errors: list[str] = []
    for _ in range(ATTEMPTS):
        run.rng.setstate(state)
        try:
            result = bench_balance(run, n, changes)
        except (RuntimeError, OSError, zmq.ZMQError, subprocess.SubprocessError) as exc:
            errors.append(repr(exc))
            print(f"\nbalance N={n}: attempt {len(errors)} FAILED: {exc!r}"[:400],
                  file=sys.stderr)
            continue
        return {**result, "attempts": len(errors) + 1, "failed_attempts": errors}
    raise RuntimeError(f"balance N={n} failed {ATTEMPTS} times: {errors[-1]}")


# ============================================================================ reporting


def report(results: dict[str, Any]) -> None:
    fmt = bc.fmt
    bc.print_table(
        "Balancing: send `set` -> every node's watch shows the new imbalance_kw (visible), then "
        f"also |balanced_net_kw| <= {BALANCED_TOLERANCE_KW:g} and one clearing_hash (balanced); "
        "extra = balanced - visible per change; nearest-rank percentiles",
        ["grid", "edges", "deg", "diam", "flex", "changes", "visible p50", "p99", "max",
         "balanced p50", "p99", "max", "extra p50", "max", "stamped p50", "target p50", "",
         "timeouts"],
        [[f"N={n}", r["topology"]["edges"], fmt(r["topology"]["avg_degree"], 1),
          r["topology"]["diameter"], len(r["flex_nodes"]), r["balanced"]["n"],
          fmt(r["visible"]["p50_ms"]), fmt(r["visible"]["p99_ms"]), fmt(r["visible"]["max_ms"]),
          fmt(r["balanced"]["p50_ms"]), fmt(r["balanced"]["p99_ms"]),
          fmt(r["balanced"]["max_ms"]), fmt(r["extra"]["p50_ms"]), fmt(r["extra"]["max_ms"]),
          fmt(r["node_stamped_balanced"]["p50_ms"]),
          "-" if r["target_balanced_p50_ms"] is None else f"<= {r['target_balanced_p50_ms']:g}",
          "" if r["target_balanced_p50_ms"] is None
          else bc.met(r["balanced"]["p50_ms"] <= r["target_balanced_p50_ms"]), r["timeouts"]]
         for n, r in results.items()])
    bc.print_table(
        "Balancing, cost per change (all nodes; messages = the messages_received counter, pings "
        "of the 50 ms pause included; flood model = (1 + re-advertising nodes) x (2E - (N-1)))",
        ["grid", "re-adverts/chg", "max", "cpu ms/chg", "msgs/chg", "adverts/chg",
         "flood model", "match clear()", "shortfalls", "digests", "dropped", "flaps"],
        [[f"N={n}", fmt(r["readvertised_per_change"]), r["readvertised_max"],
          fmt(r["node_cpu_ms_per_change"], 1), fmt(r["messages_received_per_change"], 1),
          fmt(r["adverts_received_per_change"], 1), fmt(r["flood_model_adverts_per_change"], 1),
          f"{r['changes_matching_local_clearing']}/{r['changes']}", r["expected_shortfalls"],
          r["digests_sent_total"], r["sends_dropped_total"], r["link_flaps_total"]]
         for n, r in results.items()])
    bc.print_table(
        "Transient: the step taken as happening when the `set` is sent, each activation as "
        "applied when its node's first view with the new imbalance arrived here (an upper "
        "bound); energy = integral of |island net| until the last one, kW x ms = J",
        ["grid", "|step| kW p50", "max", "last applied ms p50", "max", "energy J p50", "p99",
         "max", "mean"],
        [[f"N={n}", fmt(r["step_abs_kw"]["p50"], 1), fmt(r["step_abs_kw"]["max"], 1),
          fmt(r["last_activation_applied"]["p50_ms"]), fmt(r["last_activation_applied"]["max_ms"]),
          fmt(r["transient_energy_j"]["p50"], 0), fmt(r["transient_energy_j"]["p99"], 0),
          fmt(r["transient_energy_j"]["max"], 0), fmt(r["transient_energy_j"]["mean"], 0)]
         for n, r in results.items()])
    for n, r in results.items():
        prices = ", ".join(f"{nd} up {o['flex_up_kw']:g} kW at {o['price_up_per_kwh']:g} / down "
                           f"{o['flex_down_kw']:g} kW at {o['price_down_per_kwh']:g}"
                           for nd, o in r["flex_nodes"].items())
        print(f"  N={n} offers: {prices}")
        print(f"  N={n}: {r['changes_with_marginal_shift']} of {r['changes']} changes moved more "
              "than one activation; one clear() over these offers (local_clearing, timed "
              f"alone): p50 {r['clear_us']['p50']:.0f} us, p99 {r['clear_us']['p99']:.0f} us")


# ============================================================================ main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {CHANGES_QUICK} changes per grid size")
    parser.add_argument("--changes", type=int, help=f"changes per grid size (default "
                        f"{CHANGES_FULL}, {CHANGES_QUICK} with --quick)")
    parser.add_argument("--sizes", type=int, nargs="+", choices=sorted(bc.CONVERGE_DEGREE),
                        default=list(BALANCE_SIZES), metavar="N",
                        help="grid sizes (default: 4 16)")
    bc.add_run_options(parser, RESULTS_PATH, "topologies, offers and values")
    args = parser.parse_args(argv)
    changes = args.changes or (CHANGES_QUICK if args.quick else CHANGES_FULL)

    bc.stop_on_sigterm()
    info = bc.machine_info()
    print(f"machine: {info['nproc']} CPUs, {info['cpu_model']}, Python {info['python']}, "
          f"pyzmq {info['pyzmq']} / libzmq {info['libzmq']}")
    results: dict[str, Any] = {"machine": info, "seed": args.seed, "quick": args.quick,
                               "node_log_level": args.log_level, "started": time.time()}
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    tmp = Path(tempfile.mkdtemp(prefix="zgrid-bench-balancing-"))
    run = bc.Run(tmp, ctx, random.Random(args.seed), args.log_level)
    measured: dict[str, Any] = {}
    failed: list[str] = []
    try:
        for n in sorted(args.sizes):
            label = f"N={n}"
            results[f"{label}_machine_before"] = bc.wait_quiet(args.wait_quiet)
            background = bc.Background()
            background.begin()
            try:
                # Each size from its own generator: `--sizes 16` draws what the full run does.
                result = bench_balance_attempts(replace(run, rng=random.Random(
                    f"{args.seed}-balance-{n}")), n, changes)
                measured[str(n)] = result
            except (RuntimeError, OSError, zmq.ZMQError, subprocess.SubprocessError) as exc:
                failed.append(label)
                result = {"error": repr(exc)}
                print(f"\nbalance {label}: FAILED: {exc!r}", file=sys.stderr)
            bg = background.end()
            results.setdefault("balance", {})[str(n)] = result
            results[f"{label}_machine_load"] = bg
            print(f"balance {label} done")
            bc.report_machine_load(bg)
            bc.write_results(args.output, results)
        if measured:
            report(measured)
    except KeyboardInterrupt:
        print("\ninterrupted: every node was killed", file=sys.stderr)
        return 130
    finally:
        ctx.destroy(linger=0)
        bc.keep_or_remove(tmp, bool(failed) or args.keep_logs)
    return bc.finish(args.output, results, failed)


if __name__ == "__main__":
    sys.exit(main())
