"""What zgrid-ctl shows on a terminal: rich tables, colours, the `top` screen, progress bars.

What it is for: zgrid-ctl prints plain text when its output is piped (scripts and tests read
it, so it never changes) and, when it writes to a terminal, these views instead. The render
functions (`nodes_table`, `status_view`, `watch_line`, `top_view`) are pure: they turn the
dicts that `zgrid.client.Client` returns (a `status`, the `nodes` rows, a `watch` view) into
rich renderables, and the caller prints them. Colours say which way the power flows: a
producer (net > 0) is green, a consumer yellow, a balanced node (net 0.000) dim; an island
short of power is red; an unreachable node and a shortfall are bold red.

The progress helpers (`play_progress`, `stderr_progress`) draw a bar on stderr, only when
stderr is a terminal, for `zgrid-ctl play` and the benchmarks in scripts/.

What it must never do: talk to a node (no zmq, no client: everything arrives as a dict), print
to stdout, exit, or show anything when its output is not a terminal (the progress helpers
then do nothing at all, so piped output stays byte for byte what it was).
"""

from __future__ import annotations

import io
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

# A net within half a watt of zero shows as +0.000 kW: that is what "balanced" means here.
BALANCED_TOLERANCE_KW = 0.0005
PRODUCING_STYLE = "green"
CONSUMING_STYLE = "yellow"
DEFICIT_STYLE = "red"  # an island (not a node) that consumes more than it produces
BALANCED_STYLE = "dim"
ALARM_STYLE = "bold red"  # unreachable nodes, shortfalls, conflicts, failing storage
PLAY_REFRESH_HZ = 4.0  # a play's bar moves with the profile clock; 4 redraws a second suffice
BENCH_REDRAW_MIN_S = 0.1  # a benchmark's bar is redrawn at most this often (it has no thread)


# ================================================================================ formatting


def signed_kw(x: float) -> str:
    """A signed kW figure to three decimals; a residual of 1e-15 kW shows as +0.000, never
    -0.000 (the same rule as the plain output)."""
    return f"{round(x, 3) + 0.0:+.3f}"


def net_style(net_kw: float, deficit: str = CONSUMING_STYLE) -> str:
    """The colour of a net: green producing, `deficit` consuming, dim balanced."""
    if net_kw > BALANCED_TOLERANCE_KW:
        return PRODUCING_STYLE
    if net_kw < -BALANCED_TOLERANCE_KW:
        return deficit
    return BALANCED_STYLE


def _net_text(net_kw: float, deficit: str = CONSUMING_STYLE) -> Text:
    return Text(signed_kw(net_kw), style=net_style(net_kw, deficit))


def _island_net_text(net_kw: float) -> Text:
    """An island's net: a deficit is red, since nobody in it can cover it from elsewhere."""
    return _net_text(net_kw, DEFICIT_STYLE)


def _price(price: float | None) -> Text:
    return Text("none", style=BALANCED_STYLE) if price is None else Text(f"{price:g}")


def _shortfall(view: Mapping[str, Any]) -> Text:
    kw = view.get("shortfall_kw") or 0.0
    if not kw:
        return Text("none", style=BALANCED_STYLE)
    kind = view.get("shortfall")
    return Text(f"{kw:.3f} kW" + (f" ({kind})" if kind else ""), style=ALARM_STYLE)


def _activation(kw: float) -> Text:
    """A node's Phase II activation: cyan while it has one, a dim 0 when it has none."""
    return Text(signed_kw(kw), style="cyan") if kw else Text("0", style=BALANCED_STYLE)


# ================================================================================ nodes


def nodes_table(rows: Sequence[Mapping[str, Any]], me: str | None = None) -> Table:
    """`zgrid-ctl nodes` on a terminal: one row per known node; `me` (the node asked) bold.

    Every power is in kW; an unreachable node (outside the asked node's island) is marked
    in bold red, its id and its `reachable` cell."""
    table = Table(box=box.ROUNDED, header_style="bold", caption_justify="left",
                  caption=Text.assemble(("kW  ", ""), ("producing", PRODUCING_STYLE), "  ",
                                        ("consuming", CONSUMING_STYLE), "  ",
                                        ("balanced", BALANCED_STYLE), "  ",
                                        ("unreachable", ALARM_STYLE)))
    table.add_column("id", no_wrap=True)
    for name in ("production", "consumption", "net", "activation"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("reachable", no_wrap=True)
    table.add_column("links")
    for row in rows:
        reachable = bool(row.get("reachable"))
        node_id = Text(str(row["id"]), style="bold" if row["id"] == me else "")
        if not reachable:
            node_id.stylize(ALARM_STYLE)
        table.add_row(
            node_id, f"{row['production']:.3f}", f"{row['consumption']:.3f}",
            _net_text(row["net"]), _activation(row.get("activation_kw") or 0.0),
            Text("yes", style=PRODUCING_STYLE) if reachable else Text("NO", style=ALARM_STYLE),
            " ".join(row.get("links", [])))
    return table


# ================================================================================ status


def status_view(s: Mapping[str, Any]) -> RenderableType:
    """`zgrid-ctl status` on a terminal: the node, its island and balancing, its siblings."""
    parts: list[RenderableType] = [Text.assemble(
        (str(s["id"]), "bold"), f"  {s['endpoint']}  ",
        (f"(incarnation {s['incarnation']})", BALANCED_STYLE))]
    own: RenderableType = _pairs([("production", f"{s['production']:.3f} kW"),
                  ("consumption", f"{s['consumption']:.3f} kW"),
                  ("net", _with_unit(_net_text(s["net"])))],
                 [("flex up", f"{s['flex_up']:.3f} kW at {s['price_up']:g}"),
                  ("flex down", f"{s['flex_down']:.3f} kW at {s['price_down']:g}"),
                  ("activation", _with_unit(_activation(s["activation_kw"])))]
                 if s.get("flex_up") or s.get("flex_down") or s.get("activation_kw") else [])
    device = s.get("device")
    if device:
        values = "  ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in device.items() if k != "kind")
        own = Group(own, Text(f"device {device['kind']}: {values}"))
    parts.append(Panel(own, box=box.ROUNDED, title=f"node {s['id']}", title_align="left",
                       expand=False))
    parts.append(island_panel(s))
    if s["siblings"]:
        siblings = Table(box=box.ROUNDED, header_style="bold", title="siblings",
                         title_justify="left")
        for name in ("id", "endpoint", "state", "error"):
            siblings.add_column(name)
        for sib in s["siblings"]:
            state = str(sib["state"])
            siblings.add_row(sib["id"] or "?", sib["endpoint"], Text(state, style=(
                PRODUCING_STYLE if state == "up" else
                ALARM_STYLE if state in ("down", "refused") else CONSUMING_STYLE)),
                Text(sib["error"] or "", style=ALARM_STYLE))
        parts.append(siblings)
    else:
        parts.append(Text("siblings: none", style=BALANCED_STYLE))
    if s.get("conflict"):
        parts.append(Text(f"CONFLICT: {s['conflict']}", style=ALARM_STYLE))
    if s.get("storage", "ok") != "ok":  # an older node sends no "storage": it was fine
        parts.append(Text(f"STORAGE {s['storage']}", style=ALARM_STYLE))
    return Group(*parts)


def island_panel(view: Mapping[str, Any], activation_of: str | None = None) -> Panel:
    """The island as a node sees it (a status or a watch view): its members, totals and,
    from a node that balances, Phase II's figures; with `activation_of`, that node's own
    activation too (`top` shows the node it watches)."""
    totals: list[tuple[str, RenderableType]] = [
        ("total net", _with_unit(_island_net_text(view["total_net"]))),
        ("production", f"{view['total_production']:.3f} kW"),
        ("consumption", f"{view['total_consumption']:.3f} kW")]
    if activation_of is not None:
        totals.append((f"{activation_of}'s activation",
                       _with_unit(_activation(view.get("activation_kw") or 0.0))))
    balancing: list[tuple[str, RenderableType]] = []
    if "imbalance_kw" in view:  # an older node does not balance
        balancing = [("imbalance", _with_unit(_island_net_text(view["imbalance_kw"]))),
                     ("balanced net", _with_unit(_island_net_text(view["balanced_net_kw"]))),
                     ("clearing price", _price(view["clearing_price"])),
                     ("shortfall", _shortfall(view))]
    return Panel(_pairs(totals, balancing), box=box.ROUNDED, title_align="left", expand=False,
                 title=f"island of {view['island_size']}: {' '.join(view['island'])}")


def _pairs(left: Sequence[tuple[str, RenderableType]],
           right: Sequence[tuple[str, RenderableType]]) -> Table:
    """Two columns of `name value` pairs side by side, names in bold."""
    grid = Table.grid(padding=(0, 2))
    for _ in range(2 if right else 1):
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(justify="right", no_wrap=True)
    for i in range(max(len(left), len(right))):
        cells: list[RenderableType] = [*(left[i] if i < len(left) else ("", ""))]
        if right:
            cells += right[i] if i < len(right) else ("", "")
        grid.add_row(*cells)
    return grid


# ================================================================================ watch


def watch_line(view: Mapping[str, Any], stamp: str, activation: bool) -> Text:
    """One `watch` line on a terminal: the plain line's words, coloured. `stamp` is the
    view's time as the plain line shows it; `activation`: show this node's activation."""
    text = Text.assemble((stamp, BALANCED_STYLE), " ", (str(view["id"]), "bold"),
                         " total_net=", _island_net_text(view["total_net"]), " kW island=",
                         f"{view['island_size']} ({' '.join(view['island'])})")
    if "imbalance_kw" in view:
        text.append(" imbalance=")
        text.append_text(_island_net_text(view["imbalance_kw"]))
        text.append(" kW balanced_net=")
        text.append_text(_island_net_text(view["balanced_net_kw"]))
        text.append(" kW")
    if activation:
        text.append(" activation=")
        text.append_text(_activation(view.get("activation_kw") or 0.0))
        text.append(" kW")
    if view.get("shortfall_kw"):
        text.append(" SHORTFALL ", style=ALARM_STYLE)
        text.append_text(_shortfall(view))
    return text


# ================================================================================ top


def top_view(view: Mapping[str, Any], rows: Sequence[Mapping[str, Any]] | None, *,
             node: str, updated: str, interval_s: float, problem: str | None = None,
             live: bool = True) -> RenderableType:
    """`zgrid-ctl top`: the island as `node` sees it (its latest watch `view`), every node it
    knows (`rows`, None until the first `nodes` answer), when that was (`updated`), and a
    `problem` with the table, if the last request for it failed. `live`: the screen is
    redrawn in place (then it says how to quit), not printed as a snapshot."""
    me = str(view["id"])
    header = Text.assemble(("zgrid top", "bold reverse"), "  ", (me, "bold"), f" {node}  ",
                           (f"updated {updated}, every {interval_s:g} s"
                            + ("  Ctrl-C quits" if live else ""), BALANCED_STYLE))
    island = island_panel(view, activation_of=me)
    parts: list[RenderableType] = [header, island]
    if rows is None:
        parts.append(Text("asking for the node table...", style=BALANCED_STYLE))
    else:
        unreachable = sum(1 for r in rows if not r.get("reachable"))
        table = nodes_table(rows, me)
        table.title = (f"{len(rows)} known node{'' if len(rows) == 1 else 's'}"
                       + (f", {unreachable} unreachable" if unreachable else ""))
        table.title_justify = "left"
        parts.append(table)
    if problem:
        parts.append(Text(f"node table: {problem}", style=ALARM_STYLE))
    return Group(*parts)


def _with_unit(text: Text) -> Text:
    return text.append(" kW")


def render_text(renderable: RenderableType, width: int, color: bool = False) -> str:
    """`renderable` as text at `width` columns (with ANSI colours if `color`): for tests, and
    for `top`'s plain snapshots."""
    console = Console(width=width, record=True, file=io.StringIO(), force_terminal=color,
                      color_system="standard" if color else None, highlight=False)
    console.print(renderable)
    return console.export_text(styles=color)


# ================================================================================ progress


def terminal(stderr: bool = False) -> Console | None:
    """A console on stdout (or stderr) if it is a terminal (rich also honours FORCE_COLOR,
    TTY_COMPATIBLE and NO_COLOR), else None: then the caller prints plain text."""
    console = Console(stderr=stderr, highlight=False)
    return console if console.is_terminal else None


class _ProfileClock(TextColumn):
    """Where the play is in the profile, e.g. `01:15:00 / 23:45:00 (loop 2)`."""

    def __init__(self) -> None:
        super().__init__("")

    def render(self, task: Task) -> Text:
        return Text(task.fields.get("clock", ""))


class PlayBar:
    """A play's bar: its position follows the profile clock (play origin + wall time x speed)
    rather than the rows, so it moves between rows an hour of profile apart; the rows sent
    and failed are counted beside it."""

    def __init__(self, progress: Progress, name: str, start_s: float, end_s: float,
                 period_s: float | None, speed: float, clock_text: Callable[[float], str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.progress, self.start_s, self.end_s, self.period_s = progress, start_s, end_s, period_s
        self.speed, self.clock_text, self.clock = speed, clock_text, clock
        self.origin = clock()
        self.sent = self.failed = 0
        span = (period_s or end_s) - (0.0 if period_s else start_s)
        self.total_s = span if span > 0 else 1.0  # one time only: the bar fills when it is sent
        self.task = progress.add_task(name, total=self.total_s, clock="", rows="")
        self.tick()

    def row(self, ok: bool) -> None:
        """One more row sent (`ok`) or failed."""
        if ok:
            self.sent += 1
        else:
            self.failed += 1
        self.tick()

    def echo(self, line: str, err: bool = False) -> None:
        """Print a line of the play's output (stdout, or stderr if `err`) while the bar is
        shown: above the bar if it goes to the terminal, else as it is, to the pipe."""
        if err or sys.stdout.isatty():
            self.progress.console.print(Text(line), soft_wrap=True)
        else:
            sys.stdout.write(line + "\n")

    def tick(self) -> None:
        """Move the bar to where the profile clock is now."""
        at = self.start_s + (self.clock() - self.origin) * self.speed
        if self.period_s:  # --loop: the bar is the current pass
            loop, within = divmod(at, self.period_s)
            done = within
            clock = (f"{self.clock_text(math.floor(within))} / "
                     f"{self.clock_text(self.period_s)} (loop {int(loop) + 1})")
        else:
            at = min(at, self.end_s)
            done = at - self.start_s if self.end_s > self.start_s else float(self.sent > 0)
            clock = f"{self.clock_text(math.floor(at))} / {self.clock_text(self.end_s)}"
        rows = (f"{self.sent} row{'' if self.sent == 1 else 's'} sent"
                + (f", {self.failed} failed" if self.failed else ""))
        self.progress.update(self.task, completed=min(done, self.total_s), clock=clock,
                             rows=rows)


class _PlayProgress(Progress):
    """A Progress that moves its play bar to the profile clock before each redraw."""

    bar: PlayBar | None = None

    def get_renderables(self) -> Iterable[RenderableType]:
        if self.bar is not None:
            self.bar.tick()
        yield from super().get_renderables()


@contextmanager
def play_progress(name: str, start_s: float, end_s: float, period_s: float | None,
                  speed: float, clock_text: Callable[[float], str]
                  ) -> Iterator[PlayBar | None]:
    """A transient bar of `zgrid-ctl play` on stderr while it plays, if stderr is a terminal
    (else None, and nothing is shown). Meanwhile the play prints through `PlayBar.echo`:
    above the bar on the terminal, unchanged into a pipe."""
    console = terminal(stderr=True)
    if console is None:
        yield None
        return
    progress = _PlayProgress(
        TextColumn("[bold]{task.description}"), BarColumn(), _ProfileClock(),
        TextColumn("{task.fields[rows]}"), TimeElapsedColumn(),
        console=console, transient=True, refresh_per_second=PLAY_REFRESH_HZ,
        # No redirection of sys.stdout: click writes to the file underneath it anyway.
        redirect_stdout=False, redirect_stderr=False)
    progress.bar = PlayBar(progress, name, start_s, end_s, period_s, speed, clock_text)
    with progress:  # the bar exists before the first redraw, which shows its clock
        yield progress.bar


@contextmanager
def stderr_progress(what: str, total: float | None = None
                    ) -> Iterator[Callable[[float], None]]:
    """A transient progress line on stderr for a long stretch of a benchmark, if stderr is a
    terminal. Yields `move(position)`: how far it got, out of `total` (with no total, a
    spinner and the elapsed time; any position just redraws). Nothing is shown, and nothing
    printed, when stderr is piped.

    It starts no thread and redraws only when moved, at most every BENCH_REDRAW_MIN_S (a
    call in between returns at once), so it takes no CPU from what the benchmark measures
    while the benchmark waits or works."""
    console = terminal(stderr=True)
    if console is None:
        yield lambda position: None
        return
    columns = ([SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
               if total is None else
               [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()
                if float(total).is_integer() else TaskProgressColumn(), TimeElapsedColumn()])
    # What the benchmark prints meanwhile goes above the line; stdout only if it is a
    # terminal too (rich would otherwise send a piped stdout's lines to stderr).
    progress = Progress(*columns, console=console, transient=True, auto_refresh=False,
                        redirect_stdout=sys.stdout.isatty(), redirect_stderr=True)
    task = progress.add_task(what, total=total)
    drawn_at = -math.inf

    def move(position: float) -> None:
        nonlocal drawn_at
        now = time.monotonic()
        if now - drawn_at < BENCH_REDRAW_MIN_S:
            return
        drawn_at = now
        progress.update(task, completed=position)
        progress.refresh()

    with progress:
        yield move


__all__ = ["BALANCED_TOLERANCE_KW", "PlayBar", "island_panel", "net_style",
           "nodes_table", "play_progress", "render_text", "signed_kw", "status_view",
           "stderr_progress", "terminal", "top_view", "watch_line"]
