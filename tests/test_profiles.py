"""The simulated day's profile sources (zgrid/sim/profiles.py): BDEW load, pvlib PV, vary.

Tests that need demandlib or pvlib (the `scenario` extra) skip without them; argument checks
and `vary` run everywhere.
"""

from __future__ import annotations

import datetime
import math
import random
import sys

import pytest

from zgrid.sim.errors import SimError
from zgrid.sim.profiles import (
    MISSING_EXTRA,
    ProfileError,
    commercial_kw,
    easter_sunday,
    german_public_holidays,
    household_kw,
    pv_kw_per_kwp,
    vary,
)

D = datetime.date
BERLIN = {"latitude": 52.52, "longitude": 13.40, "utc_offset_h": 1.0}


@pytest.fixture
def demandlib() -> None:
    pytest.importorskip("demandlib")


@pytest.fixture
def pvlib() -> None:
    pytest.importorskip("pvlib")


def kwh(series: tuple[float, ...], step_s: int) -> float:
    return math.fsum(series) * step_s / 3600


# -- argument checks (no library needed) -------------------------------------------------

@pytest.mark.parametrize("step_s", [0, -60, 7, 1000, 4500, 90000, 1.5, 60.0, True, "60", None])
def test_a_bad_step_is_refused_with_the_allowed_steps(step_s: object) -> None:
    for call in (lambda: household_kw(D(2025, 7, 1), 3500, step_s),  # type: ignore[arg-type]
                 lambda: commercial_kw(D(2025, 7, 1), 3500, step_s),  # type: ignore[arg-type]
                 lambda: pv_kw_per_kwp(D(2025, 7, 1), step_s)):  # type: ignore[arg-type]
        with pytest.raises(ProfileError, match="divides 900"):
            call()


def test_profile_error_is_a_sim_error() -> None:
    assert issubclass(ProfileError, SimError)


@pytest.mark.parametrize("annual_kwh", [math.nan, math.inf, -1.0, "3500", None, True])
def test_a_bad_annual_energy_is_refused(annual_kwh: object) -> None:
    with pytest.raises(ProfileError, match="annual_kwh"):
        household_kw(D(2025, 7, 1), annual_kwh, 900)  # type: ignore[arg-type]


def test_bad_days_and_places_are_refused() -> None:
    with pytest.raises(ProfileError, match=r"datetime\.date"):
        household_kw("2025-07-01", 3500, 900)  # type: ignore[arg-type]
    with pytest.raises(ProfileError, match="year"):
        household_kw(D(1800, 7, 1), 3500, 900)
    with pytest.raises(ProfileError, match="together"):
        pv_kw_per_kwp(D(2025, 7, 1), 900, latitude=52.5)
    with pytest.raises(ProfileError, match="tilt"):
        pv_kw_per_kwp(D(2025, 7, 1), 900, tilt=120.0)
    with pytest.raises(ProfileError, match="choose one of"):
        commercial_kw(D(2025, 7, 1), 3500, 900, profile="x9")


def test_german_holidays() -> None:
    assert [easter_sunday(y) for y in (2024, 2025, 2026)] == [
        D(2024, 3, 31), D(2025, 4, 20), D(2026, 4, 5)]
    assert german_public_holidays(2025) == (
        D(2025, 1, 1), D(2025, 4, 18), D(2025, 4, 21), D(2025, 5, 1), D(2025, 5, 29),
        D(2025, 6, 9), D(2025, 10, 3), D(2025, 12, 25), D(2025, 12, 26))


def test_a_missing_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("demandlib", "demandlib.bdew", "pvlib", "pvlib.iotools"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    with pytest.raises(ProfileError) as error:
        household_kw(D(2197, 3, 3), 3500, 900)  # a year no other test has cached
    assert str(error.value) == MISSING_EXTRA
    assert "pip install 'zgrid[scenario]'" in MISSING_EXTRA


# -- vary ---------------------------------------------------------------------------------

BASE = tuple(float(i % 7) + 0.5 * i for i in range(96))


def test_vary_is_deterministic_per_seed() -> None:
    a = vary(random.Random(7), BASE, scale_sigma=0.3, shift_max_steps=4)
    b = vary(random.Random(7), BASE, scale_sigma=0.3, shift_max_steps=4)
    c = vary(random.Random(8), BASE, scale_sigma=0.3, shift_max_steps=4)
    assert a == b
    assert a != c


def test_vary_draws_only_from_its_generator() -> None:
    rng = random.Random(3)
    vary(rng, BASE, scale_sigma=0.2, shift_max_steps=10)
    twin = random.Random(3)
    twin.lognormvariate(0.0, 0.2)
    twin.randint(-10, 10)
    assert rng.getstate() == twin.getstate()


def test_vary_preserves_the_shape() -> None:
    """The result is the base rotated by at most shift_max_steps and scaled by one factor."""
    for seed in range(50):
        out = vary(random.Random(seed), BASE, scale_sigma=0.25, shift_max_steps=5)
        assert len(out) == len(BASE)
        matches = []
        for shift in range(-5, 6):
            rotated = [BASE[(i - shift) % len(BASE)] for i in range(len(BASE))]
            scale = out[10] / rotated[10]
            if all(math.isclose(o, scale * r, rel_tol=1e-12) for o, r in zip(out, rotated,
                                                                             strict=True)):
                matches.append(scale)
        assert matches and matches[0] > 0


def test_vary_scale_has_median_one_and_nothing_when_turned_off() -> None:
    rng = random.Random(11)
    scales = sorted(vary(rng, (1.0,), scale_sigma=0.3, shift_max_steps=0)[0]
                    for _ in range(2001))
    assert 0.95 < scales[1000] < 1.05
    assert vary(random.Random(1), BASE, scale_sigma=0.0, shift_max_steps=0) == BASE
    with pytest.raises(ProfileError, match="shift_max_steps"):
        vary(random.Random(1), BASE, scale_sigma=0.1, shift_max_steps=-1)
    with pytest.raises(ProfileError, match="scale_sigma"):
        vary(random.Random(1), BASE, scale_sigma=math.nan, shift_max_steps=1)
    with pytest.raises(ProfileError, match=r"random\.Random"):
        vary(None, BASE, scale_sigma=0.1, shift_max_steps=1)  # type: ignore[arg-type]


# -- load profiles -------------------------------------------------------------------------

@pytest.mark.usefixtures("demandlib")
@pytest.mark.parametrize("step_s", [1, 60, 300, 900, 1800, 3600, 86400])
def test_a_series_has_one_value_per_step(step_s: int) -> None:
    assert len(household_kw(D(2025, 7, 1), 3500, step_s)) == 86400 // step_s
    assert len(commercial_kw(D(2025, 7, 1), 3500, step_s)) == 86400 // step_s


@pytest.mark.usefixtures("demandlib")
def test_a_household_day_is_plausible_and_the_year_adds_up() -> None:
    for day in (D(2025, 1, 15), D(2025, 4, 9), D(2025, 7, 1), D(2025, 7, 6), D(2025, 10, 22)):
        day_kwh = kwh(household_kw(day, 3500, 60), 60)
        assert 7.0 <= day_kwh <= 12.0, (day, day_kwh)
    year = [kwh(household_kw(D(2025, 1, 1) + datetime.timedelta(days=d), 3500, 900), 900)
            for d in range(365)]
    assert math.isclose(math.fsum(year), 3500.0, rel_tol=1e-9)
    assert all(6.0 < d < 14.0 for d in year)
    assert max(household_kw(D(2025, 1, 15), 3500, 60)) < 3.0  # kW, an average household
    assert min(household_kw(D(2025, 1, 15), 3500, 60)) > 0.0


@pytest.mark.usefixtures("demandlib")
def test_steps_repeat_or_average_the_quarter_hours() -> None:
    quarter = household_kw(D(2025, 3, 3), 3500, 900)
    minute = household_kw(D(2025, 3, 3), 3500, 60)
    hour = household_kw(D(2025, 3, 3), 3500, 3600)
    assert minute == tuple(v for v in quarter for _ in range(15))
    assert all(math.isclose(hour[h], math.fsum(quarter[4 * h:4 * h + 4]) / 4)
               for h in range(24))
    assert household_kw(D(2025, 3, 3), 7000, 900) == tuple(2 * v for v in quarter)


@pytest.mark.usefixtures("demandlib")
def test_holidays_count_as_sundays() -> None:
    christmas, sunday = D(2025, 12, 25), D(2025, 12, 28)
    assert household_kw(christmas, 3500, 900) != household_kw(christmas, 3500, 900,
                                                               holidays=False)
    # G25 is static per month and day type: a holiday is exactly that month's Sunday.
    assert commercial_kw(christmas, 1e5, 900) == commercial_kw(sunday, 1e5, 900)
    assert kwh(commercial_kw(christmas, 1e5, 900, holidays=False), 900) > kwh(
        commercial_kw(christmas, 1e5, 900), 900)


@pytest.mark.usefixtures("demandlib")
def test_commercial_profiles() -> None:
    weekday, sunday = D(2025, 7, 1), D(2025, 7, 6)
    assert kwh(commercial_kw(weekday, 1e5, 900, "g25"), 900) > 1.5 * kwh(
        commercial_kw(sunday, 1e5, 900, "G25"), 900)
    farm = commercial_kw(weekday, 1e5, 900, "l25")
    assert len(farm) == 96 and all(v > 0 for v in farm)
    year = math.fsum(kwh(commercial_kw(D(2024, 1, 1) + datetime.timedelta(days=d), 1e5, 3600),
                         3600) for d in range(366))
    assert math.isclose(year, 1e5, rel_tol=1e-9)  # a leap year too
    try:  # the 1999 profiles need demandlib's ElecSlp, which fails with pandas >= 3.1
        old = commercial_kw(weekday, 1e5, 900, "g0")
    except ProfileError as error:
        assert "'g25'" in str(error)
    else:
        assert len(old) == 96 and all(v > 0 for v in old)
    import warnings
    assert not any(f[0] == "error" for f in warnings.filters)  # ElecSlp's filter is undone


# -- PV ------------------------------------------------------------------------------------

@pytest.mark.usefixtures("pvlib")
@pytest.mark.parametrize("place", [{}, BERLIN])
def test_pv_is_zero_at_night_and_positive_at_a_summer_noon(place: dict[str, float]) -> None:
    for step_s in (60, 900, 3600):
        pv = pv_kw_per_kwp(D(2025, 6, 21), step_s, **place)
        assert len(pv) == 86400 // step_s
        assert pv[0] == 0.0 and pv[-1] == 0.0
        assert pv[(12 * 3600) // step_s] > 0.1
        assert all(0.0 <= v <= 1.0 for v in pv)
    winter = pv_kw_per_kwp(D(2025, 12, 21), 60, **place)
    assert all(v == 0.0 for v in winter[:5 * 60]) and all(v == 0.0 for v in winter[20 * 60:])


@pytest.mark.usefixtures("pvlib")
@pytest.mark.parametrize(("place", "ratio"), [
    ({}, 1.0),  # 36 N and a 30-degree roof: a clear January week comes close to July
    ({"tilt": 0.0}, 1.5),
    (BERLIN, 1.5),
])
def test_summer_yields_more_pv_than_winter(place: dict[str, float], ratio: float) -> None:
    def week(start: datetime.date) -> float:
        return math.fsum(kwh(pv_kw_per_kwp(start + datetime.timedelta(days=d), 900, **place),
                             900) for d in range(7))
    summer, winter = week(D(2025, 7, 1)), week(D(2025, 1, 8))
    assert summer > ratio * winter > 0
    assert kwh(pv_kw_per_kwp(D(2025, 6, 24), 900, **place), 900) > kwh(
        pv_kw_per_kwp(D(2025, 12, 17), 900, **place), 900)
    assert 2.0 < summer / 7 < 7.0  # kWh per kWp per day


@pytest.mark.usefixtures("pvlib")
def test_pv_steps_are_the_mean_of_the_hourly_line() -> None:
    minute = pv_kw_per_kwp(D(2025, 5, 5), 60)
    hour = pv_kw_per_kwp(D(2025, 5, 5), 3600)
    assert all(math.isclose(hour[h], math.fsum(minute[60 * h:60 * h + 60]) / 60,
                            abs_tol=1e-12) for h in range(24))
    assert math.isclose(kwh(minute, 60), kwh(pv_kw_per_kwp(D(2025, 5, 5), 1), 1))
    assert pv_kw_per_kwp(D(2024, 2, 29), 900) == pv_kw_per_kwp(D(2025, 2, 28), 900)


@pytest.mark.usefixtures("pvlib")
def test_pv_orientation_and_place_matter() -> None:
    south = kwh(pv_kw_per_kwp(D(2025, 1, 10), 900), 900)
    north = kwh(pv_kw_per_kwp(D(2025, 1, 10), 900, azimuth=0.0), 900)
    assert south > north > 0
    east = pv_kw_per_kwp(D(2025, 6, 10), 900, azimuth=90.0, tilt=40.0)
    assert kwh(east[:48], 900) > kwh(east[48:], 900)  # an east roof yields in the morning
    # Carrying the site's weather to the site itself nearly reproduces the measured split.
    direct = math.fsum(kwh(pv_kw_per_kwp(D(2025, 8, d), 900), 900) for d in range(1, 11))
    moved = math.fsum(kwh(pv_kw_per_kwp(D(2025, 8, d), 900, latitude=36.1,
                                        longitude=-79.95, utc_offset_h=-4.999), 900)
                      for d in range(1, 11))
    assert math.isclose(direct, moved, rel_tol=0.1)
