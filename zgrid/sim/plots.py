"""Plots of a simulated day (zgrid/sim/day.py), drawn with matplotlib into PNG files.

What it is for: one figure a researcher can read at a glance: the grid's net before and after
balancing, the batteries' state of charge, the flexibility activated by kind, the clearing
price and the shortfall, over the hours of the day.

What it must never do: compute a figure (it draws the series `run_day` recorded), or need a
screen (the Agg backend is used, so it runs in CI and over ssh).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zgrid.sim.errors import SimError


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SimError("plots need matplotlib: pip install 'zgrid[sim]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _numbers(values: Sequence[Any]) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


def plot_day(series: dict[str, list[Any]], summary: dict[str, Any], path: Path) -> Path:
    """Draw the day into `path` (PNG) and return it."""
    plt = _pyplot()
    hours = series["hour"]
    fig, axes = plt.subplots(5, 1, figsize=(11, 13), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1.4, 2, 1.2, 1.2]})
    net, soc, kinds, price, short = axes
    fig.suptitle(f"zgrid simulated day: {summary['scenario']}, {summary['nodes']} nodes, "
                 f"{summary['date']}, {summary['step_s']} s steps\n"
                 f"imbalance energy {summary['imbalance_kwh_without_balancing']:.1f} kWh "
                 f"without balancing, {summary['imbalance_kwh_with_balancing']:.3f} kWh with "
                 f"(reduced by {100 * (summary['imbalance_reduction'] or 0):.3f} %)")
    net.plot(hours, series["imbalance_kw"], color="tab:red", lw=1.2,
             label="net without balancing (base values)")
    net.plot(hours, series["net_kw"], color="tab:green", lw=1.4,
             label="net after balancing (what devices did)")
    net.plot(hours, series["load_kw"], color="tab:gray", lw=0.8, ls=":", label="load")
    net.axhline(0.0, color="black", lw=0.5)
    net.set_ylabel("kW")
    net.legend(loc="upper left", fontsize=8)
    soc.plot(hours, [100 * x for x in _numbers(series["soc_fraction"])], color="tab:purple")
    soc.set_ylabel("batteries\nSOC %")
    soc.set_ylim(0, 100)
    kinds.stackplot(hours, series["battery_kw"], series["plant_kw"], series["pv_kw"],
                    labels=["battery", "plant", "PV curtailment"],
                    colors=["tab:purple", "tab:brown", "gold"], alpha=0.8)
    kinds.axhline(0.0, color="black", lw=0.5)
    kinds.set_ylabel("activated kW\n(+ raises net)")
    kinds.legend(loc="upper left", fontsize=8)
    price.step(hours, _numbers(series["clearing_price"]), where="post", color="tab:blue")
    price.set_ylabel("clearing price\nper kWh")
    short.step(hours, series["shortfall_kw"], where="post", color="tab:orange")
    short.set_ylabel("shortfall kW")
    short.set_xlabel("hour of the day")
    short.set_xlim(hours[0] if hours else 0, (hours[-1] if hours else 24) + summary["step_s"]
                   / 3600)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
