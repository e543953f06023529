"""The profile player without processes: reading and checking a profile, its schedule, and
the send loop under a fake clock (zgrid/player.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from zgrid.errors import NoReply
from zgrid.player import (
    Outcome,
    Player,
    Profile,
    ProfileError,
    Row,
    load_profile,
    parse_profile,
    power_error,
    schedule,
)

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "profiles" / "demo_day.csv"
NODE = "tcp://127.0.0.1:5001"


def parse(text: str, default: str | None = NODE) -> Profile:
    return parse_profile(text, "profile.csv", default)


def test_a_profile_reads_times_nodes_and_blank_cells_as_unchanged() -> None:
    profile = parse("# made by hand\n"
                    "time_s,node,production,consumption\n"
                    "0,,6,2.5\n"
                    "\n"
                    "0,n3@tcp://127.0.0.1:5003,,3.2\n"
                    "900.5,n4,1e1,\n")
    assert profile.rows == (
        Row(3, 0.0, NODE, 6.0, 2.5),
        Row(5, 0.0, "n3@tcp://127.0.0.1:5003", None, 3.2),
        Row(6, 900.5, "n4", 10.0, None))
    assert profile.nodes == (NODE, "n3@tcp://127.0.0.1:5003", "n4")
    assert profile.rows[1].values == {"consumption": 3.2}


def test_columns_may_come_in_any_order_and_node_and_one_power_may_be_left_out() -> None:
    profile = parse("Consumption, time_s\n4, 0\n5, 1\n")
    assert [(r.time_s, r.node, r.production, r.consumption) for r in profile.rows] == [
        (0.0, NODE, None, 4.0), (1.0, NODE, None, 5.0)]


@pytest.mark.parametrize(("text", "message"), [
    ("time_s,consumption\n0,1\n0,2\n0,3\n0,4\n# x\n1,-3\n",
     "profile.csv line 7: consumption must be a number >= 0, got -3"),
    ("time_s,production\n0,abc\n", "profile.csv line 2: production must be a number >= 0, "
     "got abc"),
    ("time_s,production\n0,nan\n", "line 2: production must be a number >= 0, got nan"),
    ("time_s,production\n0,inf\n", "line 2: production must be a number >= 0, got inf"),
    ("time_s,production\n0,2e9\n", "line 2: production must be at most 1e+09 kW, got 2e9"),
    ("time_s,production\n5,1\n4,1\n", "line 3: time_s must not go back: 4 comes after 5"),
    ("time_s,production\n-1,1\n", "line 2: time_s must be a number of seconds >= 0, got -1"),
    ("time_s,production\n,1\n", "line 2: time_s must be a number of seconds >= 0, got nothing"),
    ("time_s,production,consumption\n0,,\n", "line 2: nothing to set"),
    ("time_s,production\n0,1,2\n", "line 2: 3 cells, but the header has 2 columns"),
    ("time_s,production,power\n", "line 1: unknown column 'power'"),
    ("time_s,production,production\n", "line 1: column 'production' appears twice"),
    ("production\n1\n", "line 1: the header has no time_s column"),
    ("time_s,node\n0,n1\n", "line 1: the header needs a production or a consumption column"),
    ("time_s,node,production\n0,tcp://nowhere,1\n", "line 2: node must be an endpoint"),
    ("time_s,node,production\n0,bad id!,1\n", "line 2: node must be a node id"),
    ("time_s,production\n", "profile.csv has a header but no rows"),
    ("# nothing\n\n", "profile.csv is empty"),
])
def test_a_bad_profile_names_the_line_and_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ProfileError) as caught:
        parse(text)
    assert message in caught.value.message
    assert caught.value.message.startswith("profile.csv")


def test_a_row_without_a_node_needs_a_default_node() -> None:
    with pytest.raises(ProfileError, match="line 3: no node: fill the node column or give "
                                           "--node"):
        parse("time_s,node,production\n0,n1,1\n1,,2\n", default=None)


def test_load_profile_reads_a_file_with_a_bom_and_says_why_it_cannot(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(b"\xef\xbb\xbftime_s,production\n0,1\n")
    assert load_profile(path, NODE).rows == (Row(2, 0.0, NODE, 1.0, None),)
    with pytest.raises(ProfileError, match=r"cannot read .*missing\.csv: No such file"):
        load_profile(tmp_path / "missing.csv", NODE)
    path.write_bytes(b"time_s,production\n0,\xff\n")
    with pytest.raises(ProfileError, match="is not UTF-8 text"):
        load_profile(path, NODE)


def test_power_error_speaks_the_users_language() -> None:
    assert power_error("production", -3.0) == "production must be a number >= 0, got -3"
    assert power_error("consumption", "-3") == "consumption must be a number >= 0, got -3"
    assert power_error("flex_up", float("nan")) == "flex_up must be a number >= 0, got nan"
    assert power_error("production", 0.0) is None
    assert power_error("production", "12.5") is None


# ------------------------------------------------------------------------ schedule

DAY = parse("time_s,node,production,consumption\n"
            "0,a,1,2\n"
            "0,b,,3\n"
            "600,a,,4\n"
            "900,b,5,\n")


def steps_of(profile: Profile, start: float = 0.0, loop: bool = False, n: int = 100
             ) -> list[tuple[float, int, str, float | None, float | None, bool]]:
    out = []
    for step in schedule(profile, start, loop):
        r = step.row
        out.append((step.at_s, step.loop, r.node, r.production, r.consumption, step.catch_up))
        if len(out) == n:
            break
    return out


def test_a_schedule_plays_each_row_at_its_time() -> None:
    assert steps_of(DAY) == [(0.0, 0, "a", 1.0, 2.0, False), (0.0, 0, "b", None, 3.0, False),
                             (600.0, 0, "a", None, 4.0, False),
                             (900.0, 0, "b", 5.0, None, False)]


def test_start_first_brings_each_node_to_where_the_profile_had_it() -> None:
    assert steps_of(DAY, start=700) == [
        (0.0, 0, "a", 1.0, 4.0, True), (0.0, 0, "b", None, 3.0, True),
        (200.0, 0, "b", 5.0, None, False)]


def test_a_loop_repeats_every_last_time_plus_the_last_interval() -> None:
    assert DAY.period_s == 1200.0  # 900 + (900 - 600)
    got = steps_of(DAY, loop=True, n=10)
    assert [s[:2] for s in got] == [(0.0, 0), (0.0, 0), (600.0, 0), (900.0, 0),
                                    (1200.0, 1), (1200.0, 1), (1800.0, 1), (2100.0, 1),
                                    (2400.0, 2), (2400.0, 2)]
    # From --start, the first pass starts there and the next ones at the profile's start.
    assert [s[:2] for s in steps_of(DAY, start=600, loop=True, n=5)] == [
        (0.0, 0), (0.0, 0), (0.0, 0), (300.0, 0), (600.0, 1)]


def test_a_schedule_refuses_a_start_outside_the_profile_and_a_loop_without_a_period() -> None:
    with pytest.raises(ProfileError, match="--start 901 is outside the profile"):
        schedule(DAY, 901)
    with pytest.raises(ProfileError, match="--start 1200 is outside the profile"):
        schedule(DAY, 1200, loop=True)
    with pytest.raises(ProfileError, match="--loop needs rows at two different times"):
        schedule(parse("time_s,production\n5,1\n5,2\n"), loop=True)


# ------------------------------------------------------------------------ the send loop


class FakeClock:
    """Monotonic time that only moves when slept on (or by a slow send)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_the_player_sends_each_row_at_its_deadline_from_one_origin() -> None:
    clock = FakeClock()
    sent: list[tuple[float, str, dict[str, float]]] = []
    outcomes: list[Outcome] = []

    def send(row: Row) -> dict[str, Any]:
        sent.append((clock.now, row.node, row.values))
        clock.now += 7.0 if row.time_s == 0 and row.node == "b" else 0.5  # a slow reply
        return {"net": 0.0}

    player = Player(send, outcomes.append, speed=60.0, clock=clock, sleep=clock.sleep)
    player.play(schedule(DAY))
    # At origin + at_s / speed: 0, 0, 10 and 15 wall seconds. The slow reply (7 s) makes the
    # third row late, never the fourth: deadlines do not accumulate.
    assert [(t - 100.0, node) for t, node, _ in sent] == [
        (0.0, "a"), (0.5, "b"), (10.0, "a"), (15.0, "b")]
    assert [round(o.late_s, 9) for o in outcomes] == [0.0, 0.5, 0.0, 0.0]
    assert player.applied == 4 and not player.failed
    assert player.last is not None and player.last.row.line == 5


def test_a_node_that_fails_is_reported_and_the_play_goes_on() -> None:
    clock = FakeClock()
    outcomes: list[Outcome] = []

    def send(row: Row) -> dict[str, Any]:
        if row.node == "b":
            raise NoReply("no reply from b within 2s")
        return {"net": 1.0}

    player = Player(send, outcomes.append, speed=1e9, clock=clock, sleep=clock.sleep)
    player.play(schedule(DAY))
    assert [o.ok for o in outcomes] == [True, False, True, False]
    assert [o.error.code for o in player.failed if o.error] == ["no_reply", "no_reply"]
    assert player.applied == 2


def test_a_player_needs_a_positive_speed() -> None:
    with pytest.raises(ProfileError, match="--speed must be a number > 0"):
        Player(lambda row: {}, lambda o: None, speed=0.0)


# ------------------------------------------------------------------------ the demo profile


def test_the_demo_profile_is_valid_and_drives_the_make_run_loads_for_a_day() -> None:
    profile = load_profile(DEMO)
    assert profile.nodes == ("n2", "n3", "n4")
    assert len(profile.rows) == 96 * 3 and profile.period_s == 86400.0
    assert all(r.production is None and r.consumption is not None for r in profile.rows)


@pytest.mark.skipif(importlib.util.find_spec("demandlib") is None,
                    reason="regenerating the demo profile needs demandlib")
def test_the_demo_profile_is_what_its_script_writes(tmp_path: Path) -> None:
    out = tmp_path / "demo_day.csv"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_profile.py"), "--out",
                    str(out)], check=True, capture_output=True, timeout=120)
    written = out.read_text().splitlines()
    committed = DEMO.read_text().splitlines()
    # The comment names the output path; everything else is the same, byte for byte.
    assert [w for w in written if not w.startswith("# zgrid-ctl")] == [
        c for c in committed if not c.startswith("# zgrid-ctl")]
