"""The profile player: replay a recorded profile into a running grid (`zgrid-ctl play`).

What it is for: GridLAB-D's player idea for zgrid. A profile is a CSV file of timed values,
one row per change::

    time_s,node,production,consumption
    0,n2,6,2.5
    0,tcp://127.0.0.1:5003,,3.2
    900,n3@tcp://127.0.0.1:5003,,2.9

- `time_s`: seconds from the profile's start, a number >= 0, never going back (rows with the
  same time are sent in file order);
- `node` (optional column): the node's control address, `ENDPOINT` or `ID@ENDPOINT` (then the
  node must report that id), or a node id alone, which zgrid-ctl looks up in the grid as its
  --node knows it (so a profile of ids plays into any grid with those nodes, on any ports);
  a row without one goes to the player's default node (--node);
- `production`, `consumption` (either or both columns): kW, a number >= 0; a blank cell leaves
  that value as it is, and a row must set at least one of them.

Blank lines and lines starting with `#` are skipped (a generated profile says where it came
from). This module reads and checks the *whole* file before anything is sent (`parse_profile`,
`load_profile`: every problem is a `ProfileError` naming the file, line and column, e.g.
``profile.csv line 7: consumption must be a number >= 0, got -3``), turns it into a schedule
(`schedule`: `--start` and `--loop`), and sends each step at its wall time (`Player`).

What it must never do: send anything from a file that did not validate; accumulate sleeps
(every step's deadline is computed from the play's origin on a monotonic clock, so a slow
request makes the next steps late, never the rest of the play); read the real clock or
network in `Player` itself (the clock, the sleep and the send are passed in, so a test can
play a day in no time); print or exit (zgrid-ctl does: this module returns values, calls
`report`, raises `ProfileError`).
"""

from __future__ import annotations

import csv
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zgrid.errors import ProtocolError, ZgridError
from zgrid.wire import MAX_POWER_KW, check_node_id, parse_sibling_address

COLUMNS = ("time_s", "node", "production", "consumption")
POWER_COLUMNS = ("production", "consumption")


class ProfileError(ZgridError):
    """A profile file that cannot be played: unreadable, or a bad header, row or cell."""

    code = "bad_profile"


def power_error(name: str, value: float | str) -> str | None:
    """What is wrong with `value` as a power in kW (`name` is the field), or None if nothing.

    The wording is the user's, shared by the player and `zgrid-ctl set`/`flex`:
    ``consumption must be a number >= 0, got -3``. `value` is a cell as written or a number.
    """
    shown = value.strip() if isinstance(value, str) else f"{value:g}"
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0.0:
        return f"{name} must be a number >= 0, got {shown or 'nothing'}"
    if number > MAX_POWER_KW:
        return f"{name} must be at most {MAX_POWER_KW:g} kW, got {shown}"
    return None


@dataclass(frozen=True)
class Row:
    """One row of a profile: at `time_s`, set `node`'s values (None: leave it as it is)."""

    line: int  # where it is in the file, for messages
    time_s: float
    node: str  # the control address, ENDPOINT or ID@ENDPOINT
    production: float | None
    consumption: float | None

    @property
    def values(self) -> dict[str, float]:
        """The values this row sets, by wire name."""
        return {k: v for k, v in (("production", self.production),
                                  ("consumption", self.consumption)) if v is not None}


@dataclass(frozen=True)
class Profile:
    name: str  # the file, as the user named it
    rows: tuple[Row, ...]

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes the profile drives, in order of first appearance."""
        return tuple(dict.fromkeys(r.node for r in self.rows))

    @property
    def end_s(self) -> float:
        return self.rows[-1].time_s

    @property
    def period_s(self) -> float | None:
        """How long one pass lasts when it loops: the last row's time plus the interval before
        it (a day of 15-minute rows, 0 to 85500, repeats every 86400 s); None if every row has
        the same time, so the profile has no interval to go by."""
        times = sorted({r.time_s for r in self.rows})
        if len(times) < 2:
            return None
        return times[-1] + (times[-1] - times[-2])


def load_profile(path: Path, default_node: str | None = None) -> Profile:
    """Read and check the profile at `path`; see `parse_profile`."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM, as spreadsheets write, is fine
    except OSError as exc:
        raise ProfileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}"
                           ) from None
    return parse_profile(text, str(path), default_node)


def parse_profile(text: str, name: str, default_node: str | None = None) -> Profile:
    """Check every line of a profile's `text` (`name` is for messages); its rows.

    A row without a node goes to `default_node`; without one either, that is an error too.
    The first problem found raises ProfileError: ``NAME line N: what is wrong``.
    """
    header: list[str] | None = None
    rows: list[Row] = []
    last_time = -math.inf
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue

        def fail(why: str, number: int = number) -> ProfileError:
            return ProfileError(f"{name} line {number}: {why}")

        cells = [c.strip() for c in next(csv.reader([line]))]
        if header is None:
            header = _header(cells, fail)
            continue
        if len(cells) != len(header):
            raise fail(f"{len(cells)} cells, but the header has {len(header)} columns")
        cell = dict(zip(header, cells, strict=True))
        time_s = _time(cell["time_s"], fail)
        if time_s < last_time:
            raise fail(f"time_s must not go back: {cell['time_s']} comes after {last_time:g}")
        last_time = time_s
        node = _node(cell.get("node", ""), default_node, fail)
        values: dict[str, float | None] = {}
        for column in POWER_COLUMNS:
            raw = cell.get(column, "")
            if not raw:
                values[column] = None  # blank: unchanged
                continue
            problem = power_error(column, raw)
            if problem is not None:
                raise fail(problem)
            values[column] = float(raw)
        if values["production"] is None and values["consumption"] is None:
            raise fail("nothing to set: give production, consumption or both")
        rows.append(Row(number, time_s, node, values["production"], values["consumption"]))
    if header is None:
        raise ProfileError(f"{name} is empty: it needs a header such as "
                           "time_s,node,production,consumption and at least one row")
    if not rows:
        raise ProfileError(f"{name} has a header but no rows")
    return Profile(name, tuple(rows))


def _header(cells: list[str], fail: Callable[[str], ProfileError]) -> list[str]:
    names = [c.lower() for c in cells]
    for column in names:
        if column not in COLUMNS:
            raise fail(f"unknown column {column!r} (the columns are {', '.join(COLUMNS)}; "
                       "node is optional, and production or consumption may be left out)")
    duplicates = sorted({c for c in names if names.count(c) > 1})
    if duplicates:
        raise fail(f"column {duplicates[0]!r} appears twice")
    if "time_s" not in names:
        raise fail("the header has no time_s column")
    if not any(c in names for c in POWER_COLUMNS):
        raise fail("the header needs a production or a consumption column (or both)")
    return names


def _time(raw: str, fail: Callable[[str], ProfileError]) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0.0:
        raise fail(f"time_s must be a number of seconds >= 0, got {raw or 'nothing'}")
    return value


def _node(raw: str, default: str | None, fail: Callable[[str], ProfileError]) -> str:
    if not raw:
        if default is None:
            raise fail("no node: fill the node column or give --node (or ZGRID_NODE)")
        return default
    try:
        if is_address(raw):
            parse_sibling_address(raw)
        else:
            check_node_id(raw)
    except ProtocolError as exc:
        raise fail(f"node {exc.message}") from None
    return raw


def is_address(node: str) -> bool:
    """Whether a profile's node is a control address (ENDPOINT, ID@ENDPOINT) rather than a
    node id, which the player looks up in the grid (`nodes` of its --node)."""
    return "://" in node


# ------------------------------------------------------------------------ scheduling


@dataclass(frozen=True)
class Step:
    """A row as scheduled: sent `at_s` profile seconds after the play started."""

    row: Row
    at_s: float
    loop: int  # which pass of the profile (0: the first)
    catch_up: bool = False  # the values of the rows before --start, sent at once


def schedule(profile: Profile, start_s: float = 0.0, loop: bool = False) -> Iterator[Step]:
    """The steps of playing `profile` from profile second `start_s`, once or forever (`loop`).

    Starting later than 0 first brings each node to where the profile had it at `start_s`:
    one catch-up step per node, at once, with the last values its earlier rows set. A loop
    repeats the whole profile every `period_s`, from time 0. Raises ProfileError if `start_s`
    is outside the profile, or if a loop has no period.
    """
    period = profile.period_s
    last = period if loop and period is not None else profile.end_s
    if loop and period is None:
        raise ProfileError(f"{profile.name}: --loop needs rows at two different times at "
                           "least (the loop repeats every last time plus the last interval)")
    if not 0.0 <= start_s <= last or (loop and start_s == last):
        raise ProfileError(f"--start {start_s:g} is outside the profile (0..{last:g} s)")
    return _steps(profile, start_s, period if loop else None)


def _steps(profile: Profile, start_s: float, period: float | None) -> Iterator[Step]:
    yield from _catch_up(profile.rows, start_s)
    first = [r for r in profile.rows if r.time_s >= start_s]
    yield from (Step(r, r.time_s - start_s, 0) for r in first)
    if period is None:
        return
    for n in itertools.count(1):
        offset = n * period - start_s
        yield from (Step(r, r.time_s + offset, n) for r in profile.rows)


def _catch_up(rows: Sequence[Row], start_s: float) -> Iterator[Step]:
    state: dict[str, Row] = {}
    for r in rows:
        if r.time_s >= start_s:
            break
        before = state.get(r.node)
        if before is None:
            state[r.node] = r
        else:
            state[r.node] = Row(r.line, r.time_s, r.node,
                                before.production if r.production is None else r.production,
                                before.consumption if r.consumption is None else r.consumption)
    for r in state.values():
        yield Step(r, 0.0, 0, catch_up=True)


# ------------------------------------------------------------------------ playing


@dataclass(frozen=True)
class Outcome:
    """What happened to one step: the node's reply, or the error it gave."""

    step: Step
    late_s: float  # how long after its deadline it was sent
    reply: dict[str, Any] | None = None
    error: ZgridError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Player:
    """Sends each step at its wall time: the play's origin plus `at_s / speed`.

    `send(row)` makes the request (zgrid-ctl sends a `set` through `zgrid.Client`) and
    returns the node's reply; a `ZgridError` it raises is reported and the play goes on (a
    node that is down misses its rows, the others still get theirs). `report` gets every
    `Outcome`. `clock` is monotonic seconds and `sleep(seconds)` waits: each wait is for the
    time left until the step's own deadline, never a fixed interval.
    """

    def __init__(self, send: Callable[[Row], dict[str, Any]],
                 report: Callable[[Outcome], None], speed: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not speed > 0.0:
            raise ProfileError(f"--speed must be a number > 0, got {speed:g}")
        self.send, self.report, self.speed = send, report, speed
        self.clock, self.sleep = clock, sleep
        self.applied = 0
        self.failed: list[Outcome] = []
        self.last: Step | None = None  # the last step sent (or tried)

    def play(self, steps: Iterable[Step]) -> None:
        origin = self.clock()
        for step in steps:
            deadline = origin + step.at_s / self.speed
            while (left := deadline - self.clock()) > 0.0:
                self.sleep(left)
            late = self.clock() - deadline
            self.last = step
            try:
                outcome = Outcome(step, late, reply=self.send(step.row))
            except ZgridError as exc:
                outcome = Outcome(step, late, error=exc)
                self.failed.append(outcome)
            else:
                self.applied += 1
            self.report(outcome)


__all__ = ["COLUMNS", "Outcome", "Player", "Profile", "ProfileError", "Row", "Step",
           "is_address", "load_profile", "parse_profile", "power_error", "schedule"]
