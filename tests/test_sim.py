"""Tests of the simulator itself: determinism, the network model, faults, topologies and the CLI.

These run many cores in one process under a virtual clock; they must never open a socket or
depend on wall-clock time.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
from click.testing import CliRunner

from zgrid.core import LinkState
from zgrid.sim import (
    NONDETERMINISTIC_KEYS,
    TOPOLOGIES,
    Latency,
    LinkModel,
    Scenario,
    SimError,
    Simulator,
    build_graph,
    cold_start,
    converged_sim,
    parse_fault,
    percentile,
    read_values,
    run_scenario,
    sim_command,
)


def deterministic(result: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in result.items() if k not in NONDETERMINISTIC_KEYS}


FAULTY = Scenario(nodes=24, topology="small-world", degree=4, seed=7, changes=12, loss=0.05,
                  duplicate=0.05, latency=Latency.parse("lognormal:60e-6:0.5"),
                  faults=[("partition", "0.01-0.6:half"), ("crash", "0.02-1.0:n3"),
                          ("freeze", "0.03-1.5:n7")])

# ------------------------------------------------------------------------ determinism


def test_same_seed_and_arguments_give_the_same_trace_and_results() -> None:
    first, second = run_scenario(FAULTY), run_scenario(FAULTY)
    assert first["trace_hash"] == second["trace_hash"]
    assert deterministic(first) == deterministic(second)
    assert first["agreed"], first["problems"]


def test_a_different_seed_gives_a_different_trace() -> None:
    other = Scenario(**{**{f: getattr(FAULTY, f) for f in FAULTY.__slots__}, "seed": 8})
    assert run_scenario(other)["trace_hash"] != run_scenario(FAULTY)["trace_hash"]


def test_runs_are_identical_across_processes_with_different_hash_seeds() -> None:
    args = ["-n", "20", "-t", "random-regular", "--changes", "5", "--loss", "0.05",
            "--latency", "uniform:40e-6:80e-6", "--partition", "0.01-0.5:half", "--json", "-q"]
    code = "import sys; from zgrid.sim import sim_command; sim_command(sys.argv[1:])"
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                              text=True, timeout=120, check=True)
        outputs.append(deterministic(json.loads(done.stdout)))
    assert outputs[0] == outputs[1]


def test_the_fast_wire_mode_makes_the_same_protocol_decisions() -> None:
    full = run_scenario(Scenario(nodes=30, changes=10, seed=3))
    fast = run_scenario(Scenario(nodes=30, changes=10, seed=3, wire_mode="fast"))
    for key in ("delivered", "events", "converge_s_max", "hops_max", "messages_per_change"):
        assert full[key] == fast[key], key
    assert fast["bytes_estimated"] and not full["bytes_estimated"]


# ------------------------------------------------------------------------ measurements


def test_changes_converge_within_eccentricity_hops_and_flooding_bounds() -> None:
    result = run_scenario(Scenario(nodes=60, topology="random-regular", degree=4, changes=20))
    assert result["agreed"]
    assert result["changes_converged"] == 20
    assert result["changes_within_eccentricity_hops"] == 20
    assert result["messages_per_change_max"] <= 2 * result["edges"]
    assert result["hops_max"] <= result["diameter"]
    # Constant latency: convergence time is exactly hops x latency.
    assert math.isclose(result["converge_s_max"], result["hops_max"] * 60e-6, rel_tol=1e-6)
    assert result["bytes_per_change"] > 50 * result["messages_per_change"]


def test_cold_start_reaches_agreement_over_link_requests() -> None:
    sim = Simulator([f"n{i}" for i in range(6)], seed=1)
    edges = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    t = cold_start(sim, edges, [(float(i), 0.5) for i in range(6)], limit_s=5.0)
    assert t is not None and 0 < t < 0.01
    assert sim.check_agreement(strict=True).agreed


def test_percentile_is_nearest_rank() -> None:
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0
    assert percentile(list(map(float, range(1, 101))), 99) == 99.0
    assert percentile([], 50) is None


# ------------------------------------------------------------------------ network model


@pytest.mark.parametrize("text,low,high", [
    ("60e-6", 60e-6, 60e-6), ("constant:1e-3", 1e-3, 1e-3), ("uniform:1e-4:2e-4", 1e-4, 2e-4),
    ("lognormal:1e-4:0.5", 0.0, math.inf)])
def test_latency_models_sample_within_their_range(text: str, low: float, high: float) -> None:
    model = Latency.parse(text)
    rng = random.Random(1)
    samples = [model.sample(rng) for _ in range(500)]
    assert all(low <= s <= high for s in samples)
    if model.kind == "lognormal":
        assert percentile(samples, 50) == pytest.approx(1e-4, rel=0.2)
        assert len(set(samples)) == 500


@pytest.mark.parametrize("text", ["fast", "uniform:2:1", "lognormal:1", "constant:-1",
                                  "uniform:nan:1"])
def test_bad_latency_specs_are_refused(text: str) -> None:
    with pytest.raises(SimError):
        Latency.parse(text)


def test_lost_messages_are_repaired_and_duplicates_are_harmless() -> None:
    sim = converged_sim([(0, 1), (1, 2), (2, 0), (2, 3)], [(1.0, 0.0)] * 4)
    sim.default_link = LinkModel(loss=0.3, duplicate=0.3)
    for k in range(10):
        sim.set_value(k % 4, float(k), 0.25)
        sim.run_until(sim.now + 0.01)
    assert sim.stats.lost > 0 and sim.stats.duplicated > 0
    sim.default_link = LinkModel()
    assert sim.run_until_agreed(10.0).agreed


# ------------------------------------------------------------------------ faults


def test_a_partition_makes_two_islands_that_merge_when_it_heals() -> None:
    values = [(1.0, 0.0), (2.0, 0.0), (4.0, 0.0), (8.0, 0.0)]
    sim = converged_sim([(0, 1), (1, 2), (2, 3)], values)
    sim.cut_links([(1, 2)])
    sim.run_until(sim.now + 2.0)  # past dead_after
    assert sim.check_agreement(strict=True).agreed
    assert sim.check_agreement().islands == 2
    assert {sim.cores[i].totals(sim.now)[0] for i in (0, 1)} == {3.0}  # type: ignore[union-attr]
    sim.restore_links([(1, 2)])
    assert sim.run_until_agreed(5.0).agreed
    assert sim.cores[0].totals(sim.now)[0] == 15.0  # type: ignore[union-attr]


def test_a_crashed_node_restarts_with_what_it_persisted() -> None:
    sim = converged_sim([(0, 1), (1, 2)], [(1.0, 0.0)] * 3)
    sim.set_value(2, 7.5, 1.25)
    sim.run_until(sim.now + 0.01)
    before = sim.cores[2]
    assert before is not None
    incarnation = before.incarnation
    sim.crash(2)
    assert sim.control(2, sim_status()) is None, "a crashed node answers nothing"
    sim.run_until(sim.now + 2.0)
    assert sim.cores[1].totals(sim.now)[0] == 2.0  # type: ignore[union-attr]
    sim.restart(2)
    after = sim.cores[2]
    assert after is not None and after is not before
    assert (after.production, after.consumption) == (7.5, 1.25)
    assert after.incarnation == incarnation + 1
    assert after.config.nonce != before.config.nonce
    assert sim.run_until_agreed(5.0).agreed


def test_a_crash_is_known_as_its_connections_close_and_a_freeze_only_by_silence() -> None:
    sim = converged_sim([(0, 1), (1, 2)], [(1.0, 0.0), (2.0, 0.0), (4.0, 0.0)],
                        dead_after_s=5.0)
    n1 = sim.cores[1]
    assert n1 is not None
    sim.crash(2)
    sim.run_until(sim.now + 0.01)  # far within dead_after: the closure took one latency
    assert n1.island(sim.now) == {"n0", "n1"} and n1.totals(sim.now)[0] == 3.0
    assert (n1.counters["connections_lost"], n1.counters["link_flaps"]) == (1, 0)
    sim.freeze(0)
    sim.run_until(sim.now + 1.0)
    assert "n0" in n1.island(sim.now), "a frozen process closes nothing"
    sim.run_until(sim.now + 5.0)
    assert n1.island(sim.now) == {"n1"}
    assert (n1.counters["connections_lost"], n1.counters["link_flaps"]) == (1, 1)


def test_a_crash_behind_a_cut_link_is_known_only_by_silence() -> None:
    sim = converged_sim([(0, 1)], [(1.0, 0.0), (2.0, 0.0)], dead_after_s=5.0)
    n0 = sim.cores[0]
    assert n0 is not None
    sim.cut_links([(0, 1)])
    sim.crash(1)
    sim.run_until(sim.now + 1.0)
    assert n0.island(sim.now) == {"n0", "n1"}, "a closure crossed a cut link"
    sim.run_until(sim.now + 5.0)
    assert n0.island(sim.now) == {"n0"} and n0.counters["connections_lost"] == 0


def test_a_stopped_node_says_goodbye_before_its_connections_close() -> None:
    sim = converged_sim([(0, 1)], [(1.0, 0.0), (2.0, 0.0)], dead_after_s=5.0)
    n0 = sim.cores[0]
    assert n0 is not None
    sim.stop(1)
    sim.run_until(sim.now + 0.01)
    assert n0.island(sim.now) == {"n0"}
    assert (n0.counters["connections_lost"], n0.counters["link_flaps"]) == (0, 0)


def test_a_frozen_node_holds_its_messages_and_catches_up_when_thawed() -> None:
    sim = converged_sim([(0, 1)], [(1.0, 0.0), (1.0, 0.0)])
    frozen = sim.cores[1]
    assert frozen is not None
    sim.freeze(1)
    sim.set_value(0, 9.0, None)
    sim.run_until(sim.now + 0.5)
    assert frozen.table.by_origin["n0"].production == 1.0, "a frozen node handled a message"
    assert sim.held[1], "messages to a frozen node must be held, not dropped"
    sim.thaw(1)
    assert sim.run_until_agreed(5.0).agreed
    assert frozen.table.by_origin["n0"].production == 9.0


def test_events_due_at_one_instant_run_in_the_order_they_were_scheduled() -> None:
    sim = Simulator(["n0", "n1"], seed=1, measure=False)
    ran: list[str] = []

    def first_at_one() -> None:
        ran.append("a")
        sim.at(1.0, lambda: ran.append("c"))  # due now: after what was due already

    sim.at(1.0, first_at_one)
    sim.at(1.0, lambda: ran.append("b"))
    sim.at(0.5, lambda: ran.append("earlier"))
    sim.at(1.0 + 1e-12, lambda: ran.append("later"))
    sim.run_until(2.0)
    assert ran == ["earlier", "a", "b", "c", "later"]


def test_an_event_that_ran_is_let_go_while_the_rest_of_its_instant_runs() -> None:
    # A cold start's messages arrive in bursts at one instant: what ran must not be held
    # until the burst ends (that took the 10,000-node cold start from 7.8 to 8.5 GB).
    sim = Simulator(["n0", "n1"], seed=1, measure=False)

    class Action:
        def __call__(self) -> None:
            pass

    action = Action()
    gone = weakref.ref(action)
    seen: list[bool] = []
    sim.at(1.0, action)
    sim.at(1.0, lambda: seen.append(gone() is None))
    del action
    sim.run_until(2.0)
    assert seen == [True]


def test_fault_specs_parse_and_bad_ones_are_refused() -> None:
    names, edges = build_graph("line", 4, 0, 0)
    half = parse_fault("partition", "0.5-2:half", names, edges)
    assert half.links == ((1, 2),) and (half.start_s, half.end_s) == (0.5, 2.0)
    assert parse_fault("partition", "1:n0-n1", names, edges).links == ((0, 1),)
    assert parse_fault("partition", "1-3:n0+n1+n2", names, edges).links == ((2, 3),)
    assert parse_fault("crash", "1-2:n1,n3", names, edges).nodes == (1, 3)
    for bad in ("x:n1", "2-1:n1", "1-2:nope", "1-2", "-1:n1"):
        with pytest.raises(SimError):
            parse_fault("crash", bad, names, edges)


# ------------------------------------------------------------------------ topologies and inputs


@pytest.mark.parametrize("topology", [t for t in TOPOLOGIES if t != "edges"])
def test_every_generated_topology_has_the_requested_nodes_and_is_connected(topology: str) -> None:
    import networkx as nx

    names, edges = build_graph(topology, 50, 4, seed=3)
    graph = nx.Graph(edges)
    assert len(names) == 50 and graph.number_of_nodes() == 50
    assert nx.is_connected(graph)


def test_edge_list_and_values_files_are_read(tmp_path: Path) -> None:
    edges_file = tmp_path / "grid.edges"
    edges_file.write_text("# a triangle and a tail\nplant house1\nhouse1 house2\n"
                          "house2 plant\nhouse2 shop\n")
    values_file = tmp_path / "values.csv"
    values_file.write_text("id,production,consumption\nplant,100,0\nshop,0,12.5\n")
    names, edges = build_graph("edges", 0, 0, 0, str(edges_file))
    assert names == ["plant", "house1", "house2", "shop"]
    assert edges == [(0, 1), (0, 2), (1, 2), (2, 3)]
    assert read_values(str(values_file), names) == [(100.0, 0.0), (0.0, 0.0), (0.0, 0.0),
                                                    (0.0, 12.5)]
    bad = tmp_path / "bad.csv"
    bad.write_text("plant,-1,0\n")
    with pytest.raises(SimError, match=r"bad\.csv:1"):
        read_values(str(bad), names)


# ------------------------------------------------------------------------ CLI


def test_cli_prints_a_json_summary_with_every_required_field() -> None:
    result = CliRunner().invoke(sim_command, ["-n", "40", "-t", "grid", "-c", "10", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    for key in ("nodes", "edges", "diameter", "cold_start_converge_s", "converge_s_p50",
                "converge_s_p99", "converge_s_max", "hops_p50", "hops_p99", "hops_max",
                "messages_per_change", "bytes_per_change", "memory_peak_mb", "wall_s",
                "events_per_s", "agreed"):
        assert key in summary, key
    assert summary["agreed"] is True and summary["nodes"] == 40


def test_cli_prints_a_table_by_default() -> None:
    result = CliRunner().invoke(sim_command, ["-n", "10", "-t", "ring", "-c", "3",
                                              "--crash", "0.01-0.5:n2"])
    assert result.exit_code == 0, result.output
    assert "agreed" in result.output and "True" in result.output


@pytest.mark.parametrize("args,message", [
    (["--nodes", "0"], "--nodes"),
    (["--topology", "torus"], "torus"),
    (["-n", "5", "-k", "3"], "degree"),
    (["--loss", "1.5"], "--loss"),
    (["--crash", "1-2:n999"], "n999"),
    (["--latency", "uniform:2:1"], "HIGH"),
    (["-t", "edges"], "--edges"),
    (["-t", "edges", "--edges", "/nonexistent/file"], "cannot read"),
])
def test_cli_bad_arguments_exit_2_with_a_clear_message(args: list[str], message: str) -> None:
    result = CliRunner().invoke(sim_command, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def sim_status() -> object:
    from zgrid.wire import StatusRequest

    return StatusRequest()


def test_a_live_duplicate_is_refused_without_a_bump_war() -> None:
    # n0 - n1 agreed; then a second process starts with n0's id and links to n1.
    sim = Simulator(["n0", "n1", "impostor"], seed=4, measure=False)
    sim.start_node(0, 10.0, 0.0)
    sim.start_node(1, 0.0, 4.0)
    sim.link(0, 1)
    assert sim.run_until_agreed(5.0).agreed
    original = sim.cores[0]
    assert original is not None
    before = original.own_advert.version
    sim.start_node(2, 999.0, 0.0, node_id="n0")
    sim.link(2, 1)
    versions = set()
    for _ in range(120):  # two virtual minutes, sampled every second
        sim.run_until(sim.now + 1.0)
        versions.add(original.own_advert.version)
    assert versions == {before}, "the original's version moved: a bump war"
    impostor, n1 = sim.cores[2], sim.cores[1]
    assert impostor is not None and n1 is not None
    assert "refused us: duplicate node id 'n0'" in impostor.conflict
    assert [s.state for s in impostor.siblings.values()] == [LinkState.REFUSED]
    assert n1.totals(sim.now)[0] == 6.0, "the impostor's 999 kW is never counted"
