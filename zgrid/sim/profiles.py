"""Profile sources for the simulated-day scenarios: household and commercial load, PV output.

What this file is for
=====================

The "simulated day" scenarios (issue 9) drive their nodes from real profiles, not hand-typed
numbers. This module turns the data that two well-kept packages ship in their wheels into
plain tuples of floats, one value per simulator step of one calendar day:

- `household_kw`: the BDEW 2025 household standard load profile H25 (dynamised);
- `commercial_kw`: a BDEW commercial or agricultural profile (G25, L25; the 1999 profiles
  G0..G6, L0..L2 where demandlib's older reader still runs);
- `pv_kw_per_kwp`: the AC output of 1 kWp of PV from a typical meteorological year of
  irradiance, through pvlib's models;
- `vary`: the per-node variation (a lognormal scale, a circular time shift) drawn only from
  the `random.Random` it is given;
- `german_public_holidays`: the nine holidays every German state keeps (BDEW profiles treat
  them as Sundays).

The expensive parts (one year of a profile, one year of PV output) are computed once per
argument set and kept (functools.lru_cache), because a thousand households share one base
profile and differ only by `vary`.

What it must never do
=====================

- Touch the network: everything is read from files inside the installed wheels.
- Read the wall clock, or draw from the global `random` module: a profile is a pure function
  of its arguments, and `vary` draws only from the generator it is passed.
- Import demandlib, pvlib, pandas or numpy at module level: they are the optional
  `scenario` extra (`pip install 'zgrid[scenario]'`), imported inside the functions that need
  them, so `import zgrid.sim.profiles` works without them and the simulator core stays
  dependency-light. Return values are tuples of Python floats, never pandas or numpy objects.

Data sources
============

- Load: the demandlib wheel (MIT licence, oemof developer group), files
  `demandlib/bdew/bdew_data/h25.csv`, `g25.csv`, `l25.csv` (BDEW standard load profiles,
  2025 revision, read by `demandlib.bdew.H25`, `G25`, `L25`) and `selp_series.csv` (the
  1999 profiles, read by `demandlib.bdew.ElecSlp`). The values are the profiles published by
  BDEW (Bundesverband der Energie- und Wasserwirtschaft), as redistributed by demandlib.
  H25 is multiplied by BDEW's dynamisation polynomial (demandlib does this); G25 and L25 are
  static. The quarter-hour values are local clock time, 96 per day.
- Irradiance and weather: the pvlib wheel (BSD 3-Clause licence, pvlib python
  contributors, Sandia National Laboratories), file `pvlib/data/723170TYA.CSV`, NREL's TMY3
  typical meteorological year for Greensboro Piedmont Triad International Airport, North
  Carolina (USAF 723170, 36.10 N, 79.95 W, 273 m, local standard time UTC-5), read by
  `pvlib.iotools.read_tmy3`. Hourly GHI, DNI, DHI, air temperature and wind speed.

Units and conventions
=====================

- Every series has 86400 / step_s values; value i is the mean power over
  [i * step_s, (i + 1) * step_s) seconds after local midnight of `day`.
- Load in kW, scaled so the whole calendar year of `day` holds `annual_kwh` kWh. A
  quarter-hour value holds for every step inside that quarter hour; a step of several quarter
  hours is their mean. step_s must divide 900 or be a multiple of 900 that divides 86400.
- PV in kW AC per kWp of modules (DC nameplate), never negative, 0 at night. The hourly
  model values are taken as the mean of their hour, placed at the hour's midpoint and
  interpolated linearly between midpoints (across midnight from the neighbouring days of the
  data year); a step's value is the exact mean of that line over the step. The weather of
  the data year is mapped by month and day (29 February uses 28 February).
- PV model chain (pvlib): solar position (`solarposition.get_solarposition`), plane of array
  (`irradiance.get_total_irradiance`, Hay-Davies sky diffuse, albedo 0.25), the beam's
  incidence-angle loss (`iam.physical`), cell temperature (`temperature.faiman`, default
  coefficients), DC power (`pvsystem.pvwatts_dc`, -0.4 %/K), PVWatts' default system
  losses (`pvsystem.pvwatts_losses()`, about 14 %), and the PVWatts inverter
  (`inverter.pvwatts`, 96 % nominal efficiency, DC/AC ratio 1.2, so AC is capped at
  1/1.2 kW per kWp).
- PV elsewhere than the weather site: given `latitude` and `longitude`, the sun is put where
  it is at that place, and the site's weather is carried over as its hourly clearness index
  (GHI over extraterrestrial horizontal irradiance, `irradiance.clearness_index`, hours
  with the sun lower than about 3.7 degrees at the site filled by linear interpolation),
  hour by hour of local clock time; the new GHI is split into DNI and DHI with the Erbs
  model (`irradiance.erbs`). Temperature and wind stay the site's. The sky is still North
  Carolina's: 1 kWp facing south at 30 degrees yields about 1,380 kWh a year at the site and
  about 1,220 carried to Berlin, more than German weather gives (winter especially).
- Clock: the PV day is in local standard time (no daylight saving), UTC + `utc_offset_h`;
  by default the site's (UTC-5) at the site, else local mean solar time (longitude / 15).
  Pass utc_offset_h=1.0 for Germany's CET (2.0 for summer time).
"""

from __future__ import annotations

import calendar
import datetime
import functools
import importlib
import importlib.resources
import math
import random
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

from zgrid.sim.errors import SimError

MISSING_EXTRA = "simulated-day profiles need the scenario extra: pip install 'zgrid[scenario]'"

DAY_S = 86400
QUARTER_HOUR_S = 900
HOUR_S = 3600
MIN_YEAR = 1900
MAX_YEAR = 2199

HOUSEHOLD_PROFILE = "h25"
# The BDEW 2025 profiles (demandlib.bdew classes) and the 1999 ones (columns of ElecSlp).
PROFILES_2025 = {"h25": "H25", "g25": "G25", "l25": "L25"}
PROFILES_1999 = ("g0", "g1", "g2", "g3", "g4", "g5", "g6", "l0", "l1", "l2")
COMMERCIAL_PROFILES = ("g25", "l25", *PROFILES_1999)

# The PV weather file and the system behind one kWp (see the module docstring).
TMY3_FILE = "723170TYA.CSV"
TMY3_YEAR = 1990  # any non-leap year: the TMY's months come from different real years
TMY3_HOURS = 8760
SKY_MODEL = "haydavies"
ALBEDO = 0.25
GAMMA_PDC_PER_K = -0.004
DC_AC_RATIO = 1.2
INVERTER_EFFICIENCY = 0.96
MIN_COS_ZENITH = 0.065  # pvlib's default: below it, a clearness index means nothing
MAX_CLEARNESS_INDEX = 1.0

_DAY_CACHE = 64  # a day at step_s=1 is 86400 floats (about 2.8 MB)
_YEAR_CACHE = 16


class ProfileError(SimError):
    """A profile that cannot be made: bad arguments, or the scenario extra is missing."""


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _quiet(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run `function` with the libraries' deprecation warnings silenced (demandlib 0.2.2 and
    pvlib 0.16 use pandas API that pandas 3.1 deprecates: noise to a simulator user), and
    the process's warning filters restored afterwards."""
    @functools.wraps(function)
    def quiet(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            return function(*args, **kwargs)
    return quiet


# -- checking arguments -----------------------------------------------------------------

def _need(module: str) -> Any:
    """Import an optional library of the scenario extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ProfileError(MISSING_EXTRA) from exc


def check_step(step_s: object) -> int:
    """`step_s` as an int, or a ProfileError saying which steps are allowed."""
    if (isinstance(step_s, int) and not isinstance(step_s, bool) and step_s > 0
            and (QUARTER_HOUR_S % step_s == 0
                 or (step_s % QUARTER_HOUR_S == 0 and DAY_S % step_s == 0))):
        return step_s
    raise ProfileError(
        f"step_s={step_s!r}: a profile step must be a whole number of seconds that divides "
        f"900 (1, 2, 3, 5, 10, 15, 30, 60, 300, 900 ...) or a multiple of 900 that divides "
        f"86400 (1800, 3600, 7200 ... 86400)")


def _check_day(day: object) -> datetime.date:
    if not isinstance(day, datetime.date):
        raise ProfileError(f"day={day!r}: give a datetime.date, e.g. datetime.date(2025, 7, 1)")
    if not MIN_YEAR <= day.year <= MAX_YEAR:
        raise ProfileError(f"day={day}: the year must be between {MIN_YEAR} and {MAX_YEAR}")
    return datetime.date(day.year, day.month, day.day)  # a datetime's calendar day


def _check_real(name: str, value: object, low: float, high: float) -> float:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or not low <= value <= high):
        raise ProfileError(f"{name}={value!r}: must be a finite number from {low:g} to {high:g}")
    return float(value)


# -- calendar ---------------------------------------------------------------------------

def easter_sunday(year: int) -> datetime.date:
    """Gregorian Easter Sunday (the anonymous algorithm of Meeus, Jones and Butcher)."""
    a, b, c = year % 19, year // 100, year % 100
    d, e = divmod(b, 4)
    g = (8 * b + 13) // 25
    h = (19 * a + b - d - g + 15) % 30
    i, k = divmod(c, 4)
    el = (32 + 2 * e + 2 * i - h - k) % 7
    m = (a + 11 * h + 19 * el) // 433
    month = (h + el - 7 * m + 90) // 25
    return datetime.date(year, month, (h + el - 7 * m + 33 * month + 19) % 32)


def german_public_holidays(year: int) -> tuple[datetime.date, ...]:
    """The nine public holidays every German state keeps today (New Year, Good Friday,
    Easter Monday, 1 May, Ascension, Whit Monday, 3 October, 25 and 26 December), sorted.
    Regional ones (Epiphany, Corpus Christi, Reformation Day ...) are not included, and
    today's set is used for every year."""
    easter = easter_sunday(year)
    return tuple(sorted((
        datetime.date(year, 1, 1),
        easter - datetime.timedelta(days=2),
        easter + datetime.timedelta(days=1),
        datetime.date(year, 5, 1),
        easter + datetime.timedelta(days=39),
        easter + datetime.timedelta(days=50),
        datetime.date(year, 10, 3),
        datetime.date(year, 12, 25),
        datetime.date(year, 12, 26),
    )))


# -- load profiles ----------------------------------------------------------------------

@functools.lru_cache(maxsize=_YEAR_CACHE)
@_quiet
def bdew_year(profile: str, year: int, holidays: bool) -> tuple[float, ...]:
    """A BDEW profile for every quarter hour of `year`, in kW per kWh/a: scaled so the year
    holds exactly 1 kWh. `holidays`: German public holidays count as Sundays."""
    pd = _need("pandas")
    bdew = _need("demandlib.bdew")
    days = 366 if calendar.isleap(year) else 365
    holiday_list = list(german_public_holidays(year)) if holidays else None
    if profile in PROFILES_2025:
        index = pd.date_range(start=f"{year}-01-01", periods=days * 96, freq="15min")
        series = getattr(bdew, PROFILES_2025[profile])(index, holidays=holiday_list)
    else:
        # ElecSlp calls warnings.simplefilter("error"): keep that from leaking into the
        # process, and say what to use instead when a pandas warning then stops it.
        with warnings.catch_warnings():
            try:
                series = bdew.ElecSlp(year, holidays=holiday_list).get_profiles(profile)[profile]
            except Exception as exc:
                raise ProfileError(
                    f"profile {profile!r}: demandlib's reader of the 1999 BDEW profiles "
                    f"(ElecSlp) fails with this pandas {pd.__version__} "
                    f"({type(exc).__name__}: {exc}); use 'g25' (commercial) or 'l25' "
                    f"(agriculture), the 2025 profiles") from exc
    values = [float(v) for v in series.to_numpy()]
    if len(values) != days * 96 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ProfileError(f"profile {profile!r} for {year}: demandlib returned "
                           f"{len(values)} values, expected {days * 96} finite ones >= 0")
    year_kwh = math.fsum(values) * QUARTER_HOUR_S / HOUR_S
    return tuple(v / year_kwh for v in values)


def _quarter_hours_to_steps(values: Sequence[float], step_s: int) -> tuple[float, ...]:
    """96 quarter-hour means -> 86400/step_s step means."""
    if step_s <= QUARTER_HOUR_S:
        repeat = QUARTER_HOUR_S // step_s
        return tuple(v for v in values for _ in range(repeat))
    n = step_s // QUARTER_HOUR_S
    return tuple(math.fsum(values[i:i + n]) / n for i in range(0, len(values), n))


@functools.lru_cache(maxsize=_DAY_CACHE)
def _bdew_day(profile: str, day: datetime.date, annual_kwh: float, step_s: int,
              holidays: bool) -> tuple[float, ...]:
    year = bdew_year(profile, day.year, holidays)
    start = (day.timetuple().tm_yday - 1) * 96
    return _quarter_hours_to_steps([v * annual_kwh for v in year[start:start + 96]], step_s)


def household_kw(day: datetime.date, annual_kwh: float, step_s: int, *,
                 holidays: bool = True) -> tuple[float, ...]:
    """A household's mean kW at each step of `day`: BDEW H25 (dynamised), scaled so the
    calendar year holds `annual_kwh`. `holidays`: German public holidays count as Sundays."""
    step_s = check_step(step_s)
    day = _check_day(day)
    annual_kwh = _check_real("annual_kwh", annual_kwh, 0.0, 1e12)
    return _bdew_day(HOUSEHOLD_PROFILE, day, annual_kwh, step_s, bool(holidays))


def commercial_kw(day: datetime.date, annual_kwh: float, step_s: int, profile: str = "g25",
                  *, holidays: bool = True) -> tuple[float, ...]:
    """A business's mean kW at each step of `day` (a "factory" node), from a BDEW profile:
    'g25' (commercial, 2025, the default), 'l25' (agriculture, 2025) or a 1999 profile
    'g0'..'g6', 'l0'..'l2' (only where demandlib's older reader runs with the installed
    pandas; it does not with pandas 3.1). Scaled as `household_kw`."""
    step_s = check_step(step_s)
    day = _check_day(day)
    annual_kwh = _check_real("annual_kwh", annual_kwh, 0.0, 1e12)
    name = profile.lower() if isinstance(profile, str) else profile
    if name not in COMMERCIAL_PROFILES:
        raise ProfileError(f"profile={profile!r}: choose one of {', '.join(COMMERCIAL_PROFILES)}")
    return _bdew_day(name, day, annual_kwh, step_s, bool(holidays))


# -- PV ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
@_quiet
def _tmy3() -> tuple[Any, dict[str, Any]]:
    """pvlib's bundled TMY3 year (data, metadata), its index set to TMY3_YEAR."""
    iotools = _need("pvlib.iotools")
    resource = importlib.resources.files("pvlib").joinpath("data", TMY3_FILE)
    if not resource.is_file():
        raise ProfileError(f"pvlib's bundled weather file pvlib/data/{TMY3_FILE} is missing: "
                           f"reinstall pvlib (pip install --force-reinstall pvlib)")
    with importlib.resources.as_file(resource) as path:
        data, meta = iotools.read_tmy3(path, coerce_year=TMY3_YEAR, map_variables=True)
    if len(data) != TMY3_HOURS:
        raise ProfileError(f"pvlib/data/{TMY3_FILE}: {len(data)} hours, expected {TMY3_HOURS}")
    return data, meta


def weather_site() -> dict[str, Any]:
    """The PV weather file's site: name, latitude, longitude, altitude (m), TZ (UTC offset)."""
    return dict(_tmy3()[1])


@functools.lru_cache(maxsize=_YEAR_CACHE)
@_quiet
def pv_year(latitude: float, longitude: float, utc_offset_h: float, tilt: float,
            azimuth: float) -> tuple[float, ...]:
    """kW AC per kWp for each hour of the data year (index 24 * (day of year - 1) + hour,
    the hour from hour:00 to hour+1:00 local standard time UTC + utc_offset_h)."""
    pd = _need("pandas")
    np = _need("numpy")
    pvlib = _need("pvlib")
    for sub in ("solarposition", "irradiance", "iam", "temperature", "pvsystem", "inverter"):
        _need(f"pvlib.{sub}")
    data, meta = _tmy3()
    site_mid = data.index - pd.Timedelta(minutes=30)  # TMY3 labels the hour's end
    clock = site_mid.tz_localize(None)  # the hour midpoints as local clock times
    utc = (clock - pd.Timedelta(hours=utc_offset_h)).tz_localize("UTC")
    sun = pvlib.solarposition.get_solarposition(utc, latitude, longitude)
    dni_extra = pvlib.irradiance.get_extra_radiation(utc).to_numpy()
    zenith = sun["zenith"].to_numpy()
    at_site = (latitude, longitude, utc_offset_h) == (
        float(meta["latitude"]), float(meta["longitude"]), float(meta["TZ"]))
    if at_site:
        ghi = data["ghi"].to_numpy(dtype=float)
        dni = data["dni"].to_numpy(dtype=float)
        dhi = data["dhi"].to_numpy(dtype=float)
    else:
        site_sun = pvlib.solarposition.get_solarposition(
            site_mid, float(meta["latitude"]), float(meta["longitude"]))
        site_zenith = site_sun["zenith"].to_numpy()
        kt = pvlib.irradiance.clearness_index(
            data["ghi"].to_numpy(dtype=float), site_zenith,
            pvlib.irradiance.get_extra_radiation(site_mid).to_numpy(),
            min_cos_zenith=MIN_COS_ZENITH, max_clearness_index=MAX_CLEARNESS_INDEX)
        kt = pd.Series(np.where(np.cos(np.radians(site_zenith)) < MIN_COS_ZENITH, np.nan, kt))
        kt = kt.interpolate(limit_direction="both").fillna(0.0).to_numpy()
        ghi = kt * dni_extra * np.clip(np.cos(np.radians(zenith)), 0.0, None)
        split = pvlib.irradiance.erbs(ghi, zenith, utc.day_of_year.to_numpy())
        dni = np.asarray(split["dni"], dtype=float)
        dhi = np.asarray(split["dhi"], dtype=float)
    apparent_zenith = sun["apparent_zenith"].to_numpy()
    sun_azimuth = sun["azimuth"].to_numpy()
    poa = pvlib.irradiance.get_total_irradiance(
        tilt, azimuth, apparent_zenith, sun_azimuth, dni, ghi, dhi, dni_extra=dni_extra,
        albedo=ALBEDO, model=SKY_MODEL)
    aoi = pvlib.irradiance.aoi(tilt, azimuth, apparent_zenith, sun_azimuth)
    effective = (np.asarray(poa["poa_direct"]) * pvlib.iam.physical(aoi)
                 + np.asarray(poa["poa_diffuse"]))
    cell_c = pvlib.temperature.faiman(np.asarray(poa["poa_global"]),
                                      data["temp_air"].to_numpy(dtype=float),
                                      data["wind_speed"].to_numpy(dtype=float))
    dc_kw = pvlib.pvsystem.pvwatts_dc(effective, cell_c, 1.0, GAMMA_PDC_PER_K)
    dc_kw = dc_kw * (1.0 - pvlib.pvsystem.pvwatts_losses() / 100.0)
    ac_kw = pvlib.inverter.pvwatts(dc_kw, 1.0 / DC_AC_RATIO / INVERTER_EFFICIENCY,
                                   eta_inv_nom=INVERTER_EFFICIENCY)
    values = [max(0.0, float(v)) for v in np.nan_to_num(np.asarray(ac_kw, dtype=float))]
    return tuple(values)


def _hours_to_steps(knots: Sequence[float], step_s: int) -> tuple[float, ...]:
    """26 hourly means at the midpoints -00:30, 00:30 ... 23:30, 24:30 -> the mean of their
    linear interpolation over each step of the day."""
    base = min(step_s, QUARTER_HOUR_S)  # every knot lies on this grid: midpoints are exact
    fine = []
    for k in range(DAY_S // base):
        t = (k + 0.5) * base + HOUR_S / 2  # seconds after the first knot
        j = int(t // HOUR_S)
        f = t / HOUR_S - j
        fine.append(knots[j] + (knots[j + 1] - knots[j]) * f)
    if step_s <= QUARTER_HOUR_S:
        return tuple(fine)
    n = step_s // QUARTER_HOUR_S
    return tuple(math.fsum(fine[i:i + n]) / n for i in range(0, len(fine), n))


@functools.lru_cache(maxsize=_DAY_CACHE)
def _pv_day(month: int, day_of_month: int, step_s: int, latitude: float, longitude: float,
            utc_offset_h: float, tilt: float, azimuth: float) -> tuple[float, ...]:
    year = pv_year(latitude, longitude, utc_offset_h, tilt, azimuth)
    if (month, day_of_month) == (2, 29):
        day_of_month = 28
    start = 24 * (datetime.date(TMY3_YEAR, month, day_of_month).timetuple().tm_yday - 1)
    knots = [year[(start + h) % TMY3_HOURS] for h in range(-1, 25)]
    return _hours_to_steps(knots, step_s)


def pv_kw_per_kwp(day: datetime.date, step_s: int, *, latitude: float | None = None,
                  longitude: float | None = None, tilt: float = 30.0, azimuth: float = 180.0,
                  utc_offset_h: float | None = None) -> tuple[float, ...]:
    """Mean kW AC per kWp at each step of `day` (its month and day in the TMY3 year).

    latitude, longitude: degrees north and east, both or neither; neither: the weather
    site's (Greensboro, NC). tilt: degrees from horizontal (0..90); azimuth: the direction
    the modules face, degrees clockwise from north (180 = south). utc_offset_h: the clock of
    the day (local standard time = UTC + offset); default: the site's at the site, else
    longitude / 15 (local mean solar time)."""
    step_s = check_step(step_s)
    day = _check_day(day)
    if (latitude is None) != (longitude is None):
        raise ProfileError("pv_kw_per_kwp: give latitude and longitude together (or neither, "
                           "for the weather file's site)")
    tilt = _check_real("tilt", tilt, 0.0, 90.0)
    azimuth = _check_real("azimuth", azimuth, 0.0, 360.0)
    if latitude is None or longitude is None:
        site = weather_site()
        lat, lon = float(site["latitude"]), float(site["longitude"])
        default_offset = float(site["TZ"])
    else:
        lat = _check_real("latitude", latitude, -90.0, 90.0)
        lon = _check_real("longitude", longitude, -180.0, 180.0)
        site = weather_site()
        default_offset = (float(site["TZ"]) if (lat, lon) == (float(site["latitude"]),
                                                              float(site["longitude"]))
                          else lon / 15.0)
    offset = (default_offset if utc_offset_h is None
              else _check_real("utc_offset_h", utc_offset_h, -12.0, 14.0))
    return _pv_day(day.month, day.day, step_s, lat, lon, offset, tilt, azimuth)


# -- per-node variation -----------------------------------------------------------------

def vary(rng: random.Random, base: Sequence[float], *, scale_sigma: float,
         shift_max_steps: int) -> tuple[float, ...]:
    """`base` times a lognormal factor (median 1, sigma `scale_sigma` of its log), shifted
    circularly by a whole number of steps drawn uniformly from -shift_max_steps to
    +shift_max_steps (positive: later). Draws exactly two values from `rng`, the factor
    first, then the shift (also when sigma or the shift bound is 0), and nothing else."""
    if not isinstance(rng, random.Random):
        raise ProfileError(f"rng={rng!r}: give a random.Random (seeded from the scenario)")
    sigma = _check_real("scale_sigma", scale_sigma, 0.0, 10.0)
    if (isinstance(shift_max_steps, bool) or not isinstance(shift_max_steps, int)
            or shift_max_steps < 0):
        raise ProfileError(f"shift_max_steps={shift_max_steps!r}: must be a whole number >= 0")
    scale = rng.lognormvariate(0.0, sigma)
    shift = rng.randint(-shift_max_steps, shift_max_steps)
    n = len(base)
    return tuple(scale * float(base[(i - shift) % n]) for i in range(n))
