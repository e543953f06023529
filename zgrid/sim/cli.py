"""The zgrid-sim command: arguments in, a scenario run, its summary out (a table or JSON).

What this file is for: the click command `sim_command` (installed as zgrid-sim through
zgrid/cli.py), the parsing of its options into a `Scenario`, the progress bar, and the table
the summary is printed as. Exit status: 0 when the grid agreed, 1 when it did not, 2 for bad
arguments (every SimError becomes a usage error, never a traceback).

What it must never do: hold simulation logic (scenario.py runs the scenario), or show the
progress bar anywhere but on a terminal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from zgrid.sim.engine import SAMPLE_EVERY_MESSAGES, WIRE_MODES
from zgrid.sim.errors import SimError
from zgrid.sim.network import Latency
from zgrid.sim.scenario import COLD_START_MAX_NODES, TOPOLOGIES, Scenario, run_scenario


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    keys = [k for k in result if k != "problems"]
    width = max(len(k) for k in keys)
    lines = [f"{k:<{width}}  {_fmt(result[k])}" for k in keys]
    lines += [f"problem: {p}" for p in result.get("problems", [])]
    return "\n".join(lines)


class _LatencyType(click.ParamType):  # type: ignore[type-arg]
    name = "latency"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Latency:
        if isinstance(value, Latency):
            return value
        try:
            return Latency.parse(str(value))
        except SimError as exc:
            self.fail(str(exc), param, ctx)


@contextmanager
def _progress(quiet: bool, **bar_options: Any) -> Iterator[Callable[[float], None]]:
    """A tqdm bar on stderr (only on a terminal, and not with --quiet), as a function that
    moves it to a position; closed however the run ends."""
    bar: Any = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm  # type: ignore[import-untyped]

        bar = tqdm(file=sys.stderr, **bar_options)

    def move(position: float) -> None:
        if bar is not None:
            bar.n = position
            bar.refresh()

    try:
        yield move
    finally:
        if bar is not None:
            bar.close()


@click.command(name="zgrid-sim")
@click.option("--nodes", "-n", type=click.IntRange(1, 200_000), default=100, show_default=True)
@click.option("--topology", "-t", type=click.Choice(TOPOLOGIES), default="random-regular",
              show_default=True)
@click.option("--degree", "-k", type=click.IntRange(1, 64), default=4, show_default=True,
              help="random-regular degree; small-world neighbours; scale-free: 2 x edges/node")
@click.option("--seed", "-s", type=int, default=1, show_default=True)
@click.option("--changes", "-c", type=click.IntRange(0, 1_000_000), default=100,
              show_default=True, help="SetRequests made at random nodes and random times")
@click.option("--loss", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True, help="probability that a message is lost")
@click.option("--duplicate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="probability that a message is delivered twice")
@click.option("--reorder", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="probability that a message ignores per-link FIFO order (may overtake)")
@click.option("--latency", type=_LatencyType(), default="60e-6", show_default=True,
              help="SECONDS | constant:S | uniform:LOW:HIGH | lognormal:MEDIAN:SIGMA")
@click.option("--partition", multiple=True, metavar="START[-END]:LINKS",
              help="cut links: half | n1-n2,n3-n4 | n1+n2+n3 (that set vs the rest)")
@click.option("--crash", multiple=True, metavar="START[-END]:NODES",
              help="crash nodes n1,n2 at START, restart them from disk at END")
@click.option("--freeze", multiple=True, metavar="START[-END]:NODES",
              help="freeze nodes at START (messages and timers held), thaw at END")
@click.option("--edges", "edges_file", type=click.Path(dir_okay=False),
              help="edge list file (use with --topology edges)")
@click.option("--values", "values_file", type=click.Path(dir_okay=False),
              help="CSV id,production,consumption")
@click.option("--start", type=click.Choice(["auto", "cold", "preload"]), default="auto",
              show_default=True, help=f"auto: cold start up to {COLD_START_MAX_NODES} nodes, "
              "else preload an already agreed state")
@click.option("--wire", "wire_mode", type=click.Choice(WIRE_MODES), default="full",
              show_default=True, help="full: encode+decode every message; fast: one in "
              f"{SAMPLE_EVERY_MESSAGES} (bytes estimated)")
@click.option("--strict", is_flag=True, help="also check every island equals its component")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
@click.option("--scenario", "scenario_file", type=click.Path(dir_okay=False),
              help="run a simulated day from a scenario file (TOML: profiles, devices, "
              "topology; see docs/balancing.md) instead of random changes")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="with --scenario: write day.json and day.png here "
              "[default: sim-results/<scenario name>]")
@click.pass_context
def sim_command(ctx: click.Context, nodes: int, topology: str, degree: int, seed: int,
                changes: int, loss: float,
                duplicate: float, reorder: float, latency: Latency, partition: tuple[str, ...],
                crash: tuple[str, ...], freeze: tuple[str, ...], edges_file: str | None,
                values_file: str | None, start: str, wire_mode: str, strict: bool,
                as_json: bool, quiet: bool, scenario_file: str | None, out_dir: str | None
                ) -> None:
    """Simulate a zgrid of NODES nodes under a virtual clock and report convergence, or
    (--scenario) a whole day of Phase II balancing on real profiles."""
    if scenario_file is not None:
        given = [name for name in ctx.params if name not in ("scenario_file", "out_dir",
                                                              "as_json", "quiet", "seed")
                 and ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"--scenario runs the grid its file describes; "
                                   f"--{given[0].replace('_', '-')} does not apply")
        seed_given = ctx.get_parameter_source("seed") is not click.core.ParameterSource.DEFAULT
        _run_day(scenario_file, out_dir, seed if seed_given else None, as_json, quiet)
        return
    if out_dir is not None:
        raise click.UsageError("--out goes with --scenario")
    faults = [(kind, text) for kind, texts in (("partition", partition), ("crash", crash),
                                               ("freeze", freeze)) for text in texts]
    try:
        sc = Scenario(nodes=nodes, topology=topology, degree=degree, seed=seed, changes=changes,
                      loss=loss, duplicate=duplicate, reorder=reorder, latency=latency,
                      faults=faults, edges_file=edges_file, values_file=values_file, start=start,
                      wire_mode=wire_mode, strict=strict)
    except SimError as exc:
        raise click.UsageError(str(exc)) from None
    with _progress(quiet, total=None, unit="vs", desc="virtual s",
                   bar_format="{desc}: {n:.3f} [{elapsed}]") as progress:
        try:
            result = run_scenario(sc, lambda now, _end: progress(now))
        except SimError as exc:
            raise click.UsageError(str(exc)) from None
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))
    if not result["agreed"]:
        sys.exit(1)


def _run_day(path: str, out_dir: str | None, seed: int | None, as_json: bool, quiet: bool
             ) -> None:
    """zgrid-sim --scenario: run the day, print its summary, write day.json and day.png."""
    from dataclasses import replace
    from pathlib import Path

    from zgrid.sim.day import load_day, run_day
    from zgrid.sim.plots import plot_day

    try:
        sc = load_day(path)
        if seed is not None:
            sc = replace(sc, seed=seed)
    except SimError as exc:
        raise click.UsageError(str(exc)) from None
    with _progress(quiet, total=sc.steps, unit="step",
                   desc=f"{sc.name}: {sc.nodes} nodes") as progress:
        try:
            result = run_day(sc, progress)
        except SimError as exc:
            raise click.UsageError(str(exc)) from None
    out = Path(out_dir if out_dir is not None else f"sim-results/{sc.name}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "day.json").write_text(json.dumps(
            {"summary": result.summary, "series": result.series}, indent=1) + "\n")
        plot_day(result.series, result.summary, out / "day.png")
    except OSError as exc:
        raise click.ClickException(f"cannot write the results to {out}: {exc.strerror}"
                                   ) from None
    summary = {**result.summary, "written": [str(out / "day.json"), str(out / "day.png")]}
    click.echo(json.dumps(summary, indent=2) if as_json else format_table(summary))
