#!/usr/bin/env python3
"""Write examples/profiles/demo_day.csv: one day of the `make run` grid's loads, for
`zgrid-ctl play` (see docs/balancing.md, "Playing a profile into a real grid").

The loads come from the BDEW standard load profiles that demandlib ships (no download): the
two houses n2 and n3 follow H25 (households, 2025 revision, with its seasonal dynamisation),
the factory n4 follows G25 (trade and industry). Each node's profile is scaled so that its
mean over the day is its `make run` consumption (scripts/run.sh) times a factor drawn from
the seed, and shifted in time by a whole number of steps drawn from the seed, so the nodes
do not all switch on at the same quarter hour. Only consumption is written: the plant n1,
the solar house's production and the battery n5 are left as `make run` starts them.

The node column holds ids (n2, n3, n4), which `zgrid-ctl play` looks up in the grid, so the
file plays into the `make run` grid on any ZGRID_BASE_PORT.

    .venv/bin/pip install demandlib    # 0.2.2 was used; pandas comes with it
    .venv/bin/python scripts/make_demo_profile.py [--seed 1] [--date 2025-01-15] [--out FILE]

The same seed, date and demandlib version write the same file, byte for byte.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from importlib.metadata import version
from pathlib import Path

import pandas as pd
from demandlib.bdew import G25, H25

OUT = Path("examples/profiles/demo_day.csv")
STEP_MIN = 15  # the BDEW profiles' own resolution
SCALE_SPREAD = 0.15  # each node's mean is its make-run consumption times 1 +- this
MAX_SHIFT_STEPS = 2  # each node's profile moves by up to this many steps, either way
# The nodes the profile drives: id, what it is, its BDEW profile, its consumption (kW) in
# scripts/run.sh, which the day's mean follows.
NODES = (
    ("n2", "solar house", H25, 2.5),
    ("n3", "house", H25, 3.2),
    ("n4", "factory", G25, 38.0),
)


def node_profile(profile: type[pd.Series], day: pd.Timestamp, mean_kw: float,
                 rng: random.Random) -> list[float]:
    """One day of `profile` in kW at STEP_MIN steps, scaled and shifted by `rng`."""
    steps = 24 * 60 // STEP_MIN
    # Three days, so that a shift of the middle one takes real values from its neighbours.
    index = pd.date_range(day - pd.Timedelta(days=1), periods=3 * steps,
                          freq=f"{STEP_MIN}min")
    values = profile(index)
    shift = rng.randint(-MAX_SHIFT_STEPS, MAX_SHIFT_STEPS)
    window = values.iloc[steps - shift:2 * steps - shift]
    scale = mean_kw * rng.uniform(1.0 - SCALE_SPREAD, 1.0 + SCALE_SPREAD) / window.mean()
    return [round(float(v) * scale, 3) for v in window]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--date", default="2025-01-15", help="the day (a Wednesday by default)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    day = pd.Timestamp(args.date)
    rng = random.Random(args.seed)
    series = {node_id: node_profile(profile, day, mean_kw, rng)
              for node_id, _, profile, mean_kw in NODES}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        f.write(f"# {day:%Y-%m-%d} ({day:%A}) for the make-run grid: written by "
                f"scripts/make_demo_profile.py --seed {args.seed} --date {args.date}\n"
                f"# from demandlib {version('demandlib')}: BDEW H25 (houses "
                + ", ".join(n for n, _, p, _ in NODES if p is H25) + "), G25 (factory "
                + ", ".join(n for n, _, p, _ in NODES if p is G25) + "); kW; play it with\n"
                "# zgrid-ctl --node tcp://127.0.0.1:5001 play --speed 60 "
                f"{args.out.as_posix()}\n")
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["time_s", "node", "consumption"])
        for step in range(len(series[NODES[0][0]])):
            for node_id, *_ in NODES:
                writer.writerow([step * STEP_MIN * 60, node_id, f"{series[node_id][step]:g}"])
    rows = sum(len(v) for v in series.values())
    print(f"wrote {args.out}: {rows} rows, {len(NODES)} nodes, {STEP_MIN}-minute steps",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
