"""Device models: what a node can offer the clearing, and what an activation does to it.

What it is for: a node's flexibility comes from real things (a battery, a plant, PV panels, a
load that can be switched off). Each model here is a small class a researcher can read in a
minute and copy to make another: `offer()` turns its state into a `Flex` (how far it can move
its net up and down, at what price), and `apply(activation_kw, dt_s)` carries out an activation
for `dt_s` seconds, updating its state (a battery empties and fills). `load_devices` builds them
from a parsed TOML table (the node reads the file with `tomllib`; this module never does).

What it must never do: do I/O, read a clock (time is `dt_s`, passed in), draw random numbers,
or trust an activation blindly: `apply` clamps it to what the device can physically do right
now (its last offer may be a control interval old) and records what it did in `applied_kw`.

State that survives a restart: each model names its dynamic fields in `state_fields` (a
battery's state of charge and its ledger; a plant's, PV's or load's output and counters). The
node saves `device_record` (kind, parameters, state) with its own state and, on a restart,
`restore_state` puts the saved state back if the device file still describes the same device
(same kind and parameters): the file's values of state fields are then only initial values.
A new model gets this by listing its fields in `state_fields`; `worth_saving` says when the
state moved enough (SAVE_FRACTION of `state_scale`) to be saved again.

Base values: a model that defines `production_kw` or `consumption_kw` gives its node that
value (`base_values`: PV and plant production, a load's consumption; a battery gives neither),
and `follow` moves the model's base output when the node's value is changed (`zgrid-ctl set`).

Sign convention, as in `zgrid.clearing`: an activation > 0 raises the node's net (generate
more, discharge, shed load), < 0 lowers it (generate less, charge, curtail). Prices are per
kWh, in whatever currency the grid uses; `price_down` is what the device asks for lowering its
net, so a negative one means it would pay to do it (a battery that wants to charge).

The TOML device file
--------------------
One array of tables per kind, the keys being the constructor's parameters::

    [[battery]]
    capacity_kwh = 10
    power_kw = 5
    soc_kwh = 5
    efficiency = 0.9        # optional, round trip
    [[plant]]
    min_kw = 0
    max_kw = 50
    price = 0.12
    output_kw = 20
    [[pv]]
    output_kw = 6
    [[load]]
    kw = 3
    price = 0.5

Every bad value (not a number, NaN, infinite, negative, out of range, min above max, a state of
charge above capacity, an unknown key or kind, a missing key) raises `ValueError` naming the
place, e.g. ``battery[0].soc_kwh: must be at most capacity_kwh (10), got 12``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from zgrid.clearing import price_milli
from zgrid.wire import MAX_ABS_PRICE, MAX_POWER_KW, Flex

CONTROL_INTERVAL_S = 60.0  # a battery offers only what it can sustain for this long
SECONDS_PER_HOUR = 3600.0
MAX_CAPACITY_KWH = MAX_POWER_KW * 24.0  # a day at the largest power an advert may carry
MAX_ABS_PRICE_PER_KWH = MAX_ABS_PRICE  # the wire's limit: an offer must be advertisable
RE_ADVERTISE_FRACTION = 0.01  # a flex change below 1% of the rating is not worth a flood
# A price move below a hundredth of the currency unit per kWh is not worth a flood either: a
# battery's price follows its charge, and re-advertising every milli-unit made every active
# battery flood the grid once a minute (measured in the simulated day, docs/balancing.md).
RE_ADVERTISE_PRICE_MILLI = 10
SAVE_FRACTION = 0.01  # a state move below 1% of `state_scale` is not worth a save




def meaningful_change(old: Flex, new: Flex, rating_kw: float) -> bool:
    """Whether `new` is worth advertising in place of `old`, the offer last advertised.

    True if a flex moved by at least RE_ADVERTISE_FRACTION of `rating_kw`, or became zero, or
    stopped being zero (else a battery that drains in sub-1% steps would keep offering its last
    crumb forever), or a price moved by at least RE_ADVERTISE_PRICE_MILLI milli-units as the
    clearing sees prices (`price_milli`). Compare with the last *advertised* offer, not the
    last computed one, or slow drift would never be advertised.
    """
    threshold_kw = RE_ADVERTISE_FRACTION * rating_kw
    for before, after in ((old.flex_up_kw, new.flex_up_kw),
                          (old.flex_down_kw, new.flex_down_kw)):
        if before != after and (abs(after - before) >= threshold_kw
                                or before == 0.0 or after == 0.0):
            return True
    return (abs(price_milli(old.price_up) - price_milli(new.price_up))
            >= RE_ADVERTISE_PRICE_MILLI
            or abs(price_milli(old.price_down) - price_milli(new.price_down))
            >= RE_ADVERTISE_PRICE_MILLI)


def _number(name: str, value: Any, low: float, high: float) -> float:
    """`value` as a float in [low, high], or a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise ValueError(f"{name}: must be a finite number in {low:g}..{high:g}, got {value!r}")
    return number


def _price(name: str, value: Any) -> float:
    return _number(name, value, -MAX_ABS_PRICE_PER_KWH, MAX_ABS_PRICE_PER_KWH)


def _power(name: str, value: Any) -> float:
    return _number(name, value, 0.0, MAX_POWER_KW)


def _step(activation_kw: float, dt_s: float) -> tuple[float, float]:
    return (_number("activation_kw", activation_kw, -MAX_POWER_KW, MAX_POWER_KW),
            _number("dt_s", dt_s, 0.0, math.inf))


class Device(ABC):
    """A source of flexibility. Subclasses are dataclasses whose fields are the TOML keys.

    `production_kw` and `consumption_kw` are the device's base contribution to its node's
    advert (what it does with no activation); `applied_kw` is the activation in force since the
    last `apply`, clamped to what the device could do; `rating_kw` scales `meaningful_change`.
    `state_fields` are the fields that change as the device runs (saved, restored after a
    restart); every other constructor field is a parameter, which identifies the device.
    """

    kind: ClassVar[str]  # its name in the TOML device file: [[kind]]
    state_fields: ClassVar[tuple[str, ...]] = ()  # its dynamic fields: see the module docstring
    applied_kw: float

    @abstractmethod
    def offer(self) -> Flex:
        """What the device can do now, and at what price."""

    @abstractmethod
    def apply(self, activation_kw: float, dt_s: float) -> None:
        """Carry out `activation_kw` (clamped to what is possible) for `dt_s` seconds."""

    @property
    @abstractmethod
    def rating_kw(self) -> float:
        """The device's size in kW: what `meaningful_change` measures a change against."""

    @property
    def production_kw(self) -> float:
        return 0.0

    @property
    def consumption_kw(self) -> float:
        return 0.0

    @property
    def net_kw(self) -> float:
        """What the device actually feeds in now: its base net plus the applied activation."""
        return self.production_kw - self.consumption_kw + self.applied_kw

    @property
    def state_scale(self) -> float:
        """What a move of a state field is measured against in `worth_saving`: by default the
        rating (kW, or kWh: an hour at the rating); a battery uses its capacity."""
        return self.rating_kw

    def follow(self, production_kw: float, consumption_kw: float) -> None:
        """The node's base values are now these (`zgrid-ctl set`, a profile player): move the
        device's base output to the values it gives (`base_values`), within what it can do.
        A model that gives neither (a battery) has nothing to move."""
        return None

    def parameters(self) -> dict[str, Any]:
        """The constructor fields that are not state: what identifies the device."""
        return {f.name: getattr(self, f.name) for f in _fields(self)
                if f.init and f.name not in self.state_fields}

    def state(self) -> dict[str, float]:
        """The values of `state_fields`: what a restart must not lose."""
        return {name: getattr(self, name) for name in self.state_fields}


@dataclass
class Battery(Device):
    """A battery: discharging raises its node's net, charging lowers it.

    Flex: up = min(power, what the stored energy can deliver for CONTROL_INTERVAL_S), down =
    min(power, what the free capacity can absorb for CONTROL_INTERVAL_S), so an activation the
    clearing grants can be held for a whole control interval.

    Prices follow the state of charge f = soc / capacity. The energy stored is worth
    v = price_empty + (price_full - price_empty) * f per kWh: dear when empty, cheap when full.
    It asks price_up = v / eta_d to discharge (a kWh delivered costs 1/eta_d kWh stored) and
    price_down = -v * eta_c to charge (it pays up to what a kWh stored is worth, of which eta_c
    arrives). So an empty battery is dear to discharge and eager to charge, a full one the
    reverse. eta_c = eta_d = sqrt(efficiency), the round-trip efficiency split evenly.

    Ledger (kWh at the grid side): charged_kwh drawn, discharged_kwh delivered, losses_kwh lost
    either way. soc_end - soc_start == charged * eta_c - discharged / eta_d at every step (up
    to float rounding: the state is a float; tests/test_devices.py bounds the drift).
    """

    kind: ClassVar[str] = "battery"
    state_fields: ClassVar[tuple[str, ...]] = ("soc_kwh", "charged_kwh", "discharged_kwh",
                                               "losses_kwh")

    capacity_kwh: float
    power_kw: float
    soc_kwh: float
    efficiency: float = 0.9
    price_empty: float = 0.40
    price_full: float = 0.05
    applied_kw: float = field(default=0.0, init=False)
    charged_kwh: float = field(default=0.0, init=False)
    discharged_kwh: float = field(default=0.0, init=False)
    losses_kwh: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.capacity_kwh = _number("capacity_kwh", self.capacity_kwh, 0.0, MAX_CAPACITY_KWH)
        if self.capacity_kwh == 0.0:
            raise ValueError("capacity_kwh: must be above 0, got 0")
        self.power_kw = _power("power_kw", self.power_kw)
        self.soc_kwh = _number("soc_kwh", self.soc_kwh, 0.0, MAX_CAPACITY_KWH)
        if self.soc_kwh > self.capacity_kwh:
            raise ValueError(f"soc_kwh: must be at most capacity_kwh ({self.capacity_kwh:g}), "
                             f"got {self.soc_kwh:g}")
        self.efficiency = _number("efficiency", self.efficiency, 0.0, 1.0)
        if self.efficiency == 0.0:
            raise ValueError("efficiency: must be above 0 (1 is lossless), got 0")
        self.price_empty = _price("price_empty", self.price_empty)
        self.price_full = _price("price_full", self.price_full)
        if self.price_full > self.price_empty:
            raise ValueError(f"price_full: must be at most price_empty ({self.price_empty:g}): "
                             f"a full battery values energy less, got {self.price_full:g}")

    @property
    def eta_charge(self) -> float:
        return math.sqrt(self.efficiency)

    @property
    def eta_discharge(self) -> float:
        return math.sqrt(self.efficiency)

    @property
    def rating_kw(self) -> float:
        return self.power_kw

    @property
    def state_scale(self) -> float:
        return self.capacity_kwh  # saved again once the charge moved by 1% of the capacity

    def offer(self) -> Flex:
        hours = CONTROL_INTERVAL_S / SECONDS_PER_HOUR
        up = min(self.power_kw, self.soc_kwh * self.eta_discharge / hours)
        down = min(self.power_kw, (self.capacity_kwh - self.soc_kwh) / self.eta_charge / hours)
        fill = self.soc_kwh / self.capacity_kwh
        value = self.price_empty + (self.price_full - self.price_empty) * fill
        return Flex(up, value / self.eta_discharge, down, -value * self.eta_charge)

    def apply(self, activation_kw: float, dt_s: float) -> None:
        activation_kw, dt_s = _step(activation_kw, dt_s)
        hours = dt_s / SECONDS_PER_HOUR
        power = min(abs(activation_kw), self.power_kw)
        if activation_kw > 0:
            drawn = power * hours / self.eta_discharge  # from storage
            if drawn >= self.soc_kwh:  # empties within the step: deliver what is there
                drawn = self.soc_kwh
                power = drawn * self.eta_discharge / hours if hours else 0.0
                self.soc_kwh = 0.0
            else:
                self.soc_kwh -= drawn
            delivered = drawn * self.eta_discharge
            self.discharged_kwh += delivered
            self.losses_kwh += drawn - delivered
            self.applied_kw = power
        elif activation_kw < 0:
            stored = power * hours * self.eta_charge  # into storage
            room = self.capacity_kwh - self.soc_kwh
            if stored >= room:  # fills within the step: take only what fits
                stored = room
                power = stored / self.eta_charge / hours if hours else 0.0
                self.soc_kwh = self.capacity_kwh
            else:
                self.soc_kwh += stored
            taken = stored / self.eta_charge
            self.charged_kwh += taken
            self.losses_kwh += taken - stored
            self.applied_kw = -power
        else:
            self.applied_kw = 0.0


@dataclass
class DispatchablePlant(Device):
    """A generator running at `output_kw` that can move anywhere in [min_kw, max_kw].

    Flex: up = max - output at `price` (it asks what the fuel costs), down = output - min at
    `-price`: going down saves the fuel that `price` pays for, so the plant would pay up to
    `price` per kWh to be let off. In a surplus the clearing takes the cheapest `price_down`
    first, so the *dearest* plant backs off first, as merit order wants (it saves the most
    fuel), and before PV is curtailed (price_down >= 0: its energy is free). The activation
    is an offset from the scheduled `output_kw`, which stays the base value: the clearing must
    not see its own result (no feedback). `activated_kwh` integrates the signed activation.
    """

    kind: ClassVar[str] = "plant"
    state_fields: ClassVar[tuple[str, ...]] = ("output_kw", "activated_kwh")

    min_kw: float
    max_kw: float
    price: float
    output_kw: float
    applied_kw: float = field(default=0.0, init=False)
    activated_kwh: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.min_kw = _power("min_kw", self.min_kw)
        self.max_kw = _power("max_kw", self.max_kw)
        if self.min_kw > self.max_kw:
            raise ValueError(f"min_kw: must be at most max_kw ({self.max_kw:g}), "
                             f"got {self.min_kw:g}")
        self.price = _price("price", self.price)
        self.output_kw = _number("output_kw", self.output_kw, self.min_kw, self.max_kw)

    @property
    def rating_kw(self) -> float:
        return self.max_kw

    @property
    def production_kw(self) -> float:
        return self.output_kw

    def offer(self) -> Flex:
        return Flex(self.max_kw - self.output_kw, self.price,
                    self.output_kw - self.min_kw, -self.price)

    def follow(self, production_kw: float, consumption_kw: float) -> None:
        self.output_kw = min(max(production_kw, self.min_kw), self.max_kw)

    def apply(self, activation_kw: float, dt_s: float) -> None:
        activation_kw, dt_s = _step(activation_kw, dt_s)
        self.applied_kw = min(max(activation_kw, self.min_kw - self.output_kw),
                              self.max_kw - self.output_kw)
        self.activated_kwh += self.applied_kw * dt_s / SECONDS_PER_HOUR


@dataclass
class CurtailablePV(Device):
    """PV panels producing `output_kw` (the simulator sets it from a profile), which can only be
    curtailed, down to 0: flex down = output at `price_down`, no flex up.

    `peak_kw` (nameplate) is what `meaningful_change` measures against; the larger of it and the
    current output is used, so leaving it 0 means "the output".
    """

    kind: ClassVar[str] = "pv"
    state_fields: ClassVar[tuple[str, ...]] = ("output_kw", "curtailed_kwh")

    output_kw: float
    price_down: float = 0.0
    peak_kw: float = 0.0
    applied_kw: float = field(default=0.0, init=False)
    curtailed_kwh: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.output_kw = _power("output_kw", self.output_kw)
        self.price_down = _price("price_down", self.price_down)
        self.peak_kw = _power("peak_kw", self.peak_kw)

    @property
    def rating_kw(self) -> float:
        return max(self.peak_kw, self.output_kw)

    @property
    def production_kw(self) -> float:
        return self.output_kw

    def offer(self) -> Flex:
        return Flex(flex_down_kw=self.output_kw, price_down=self.price_down)

    def follow(self, production_kw: float, consumption_kw: float) -> None:
        self.output_kw = min(max(production_kw, 0.0), MAX_POWER_KW)

    def apply(self, activation_kw: float, dt_s: float) -> None:
        activation_kw, dt_s = _step(activation_kw, dt_s)
        curtailed = min(max(-activation_kw, 0.0), self.output_kw)
        self.applied_kw = -curtailed
        self.curtailed_kwh += curtailed * dt_s / SECONDS_PER_HOUR


@dataclass
class SheddableLoad(Device):
    """A load drawing `kw` that can be switched off: shedding raises the net, so flex up = kw
    at `price` (what an interruption costs its owner per kWh), no flex down."""

    kind: ClassVar[str] = "load"
    state_fields: ClassVar[tuple[str, ...]] = ("kw", "shed_kwh")

    kw: float
    price: float
    applied_kw: float = field(default=0.0, init=False)
    shed_kwh: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.kw = _power("kw", self.kw)
        self.price = _price("price", self.price)

    @property
    def rating_kw(self) -> float:
        return self.kw

    @property
    def consumption_kw(self) -> float:
        return self.kw

    def offer(self) -> Flex:
        return Flex(flex_up_kw=self.kw, price_up=self.price)

    def follow(self, production_kw: float, consumption_kw: float) -> None:
        self.kw = min(max(consumption_kw, 0.0), MAX_POWER_KW)

    def apply(self, activation_kw: float, dt_s: float) -> None:
        activation_kw, dt_s = _step(activation_kw, dt_s)
        shed = min(max(activation_kw, 0.0), self.kw)
        self.applied_kw = shed
        self.shed_kwh += shed * dt_s / SECONDS_PER_HOUR


DEVICE_KINDS: Mapping[str, type[Device]] = {
    cls.kind: cls for cls in (Battery, DispatchablePlant, CurtailablePV, SheddableLoad)}


def _fields(device: Device) -> tuple[Any, ...]:
    return fields(device)  # type: ignore[arg-type]  # every Device is a dataclass


def base_values(device: Device) -> dict[str, float]:
    """The node base values `device` gives, by name ("production", "consumption"): those
    whose property its model defines. A battery defines neither (its node's flags give them);
    PV and a plant give production, a load its consumption."""
    given: dict[str, float] = {}
    if type(device).production_kw is not Device.production_kw:
        given["production"] = device.production_kw
    if type(device).consumption_kw is not Device.consumption_kw:
        given["consumption"] = device.consumption_kw
    return given


def worth_saving(device: Device, saved: Mapping[str, float] | None) -> bool:
    """Whether the device's state moved far enough from `saved` (the state saved last, None if
    none was) to be saved again: some state field moved by at least SAVE_FRACTION of
    `state_scale`, or became zero (a battery that just emptied)."""
    if saved is None:
        return True
    threshold = SAVE_FRACTION * device.state_scale
    for name, value in device.state().items():
        before = saved.get(name)
        if before is None:
            return True
        if value != before and (abs(value - before) >= threshold or value == 0.0):
            return True
    return False


def device_record(device: Device) -> dict[str, Any]:
    """What the node saves of its device (JSON-able): its kind, parameters and state."""
    return {"kind": device.kind, "parameters": device.parameters(), "state": device.state()}


def restore_state(device: Device, record: Mapping[str, Any]) -> None:
    """Put the state of `record` (a `device_record` of an earlier run) into `device`.

    Raises ValueError saying why, and changes nothing, unless `record` describes the same
    device (the same kind and parameters) with a state that is valid for it.
    """
    kind, parameters, state = (record.get(k) for k in ("kind", "parameters", "state"))
    if kind != device.kind:
        raise ValueError(f"the saved device is a {kind}, the file describes a {device.kind}")
    if not isinstance(parameters, Mapping) or not isinstance(state, Mapping):
        raise ValueError("the saved device record has no parameters or no state")
    current = device.parameters()
    changed = sorted(set(parameters) | set(current))
    changed = [k for k in changed if parameters.get(k, MISSING) != current.get(k, MISSING)]
    if changed:
        raise ValueError("the file changed the device's " + ", ".join(
            f"{k} ({_show(parameters.get(k, MISSING))} -> {_show(current.get(k, MISSING))})"
            for k in changed))
    if set(state) != set(device.state_fields):
        raise ValueError(f"the saved state has the fields {', '.join(sorted(state))}, this "
                         f"{device.kind} has {', '.join(sorted(device.state_fields))}")
    init = {f.name for f in _fields(device) if f.init}
    try:  # the constructor checks what it takes (a charge above capacity ...)
        restored = _replace(device, {k: v for k, v in state.items() if k in init})
        for name, value in state.items():
            if name not in init:
                setattr(restored, name, _number(name, value, -math.inf, math.inf))
    except ValueError as exc:
        raise ValueError(f"the saved state is not valid for this {device.kind}: {exc}"
                         ) from None
    for f in _fields(device):
        setattr(device, f.name, getattr(restored, f.name))


def _replace(device: Device, changes: Mapping[str, Any]) -> Device:
    params = {f.name: getattr(device, f.name) for f in _fields(device) if f.init}
    return type(device)(**{**params, **changes})


def _show(value: Any) -> str:
    return "none" if value is MISSING else f"{value!r}"


def load_devices(data: Mapping[str, Any]) -> list[Device]:
    """The devices a parsed TOML device file describes, in file order within each kind.

    Raises ValueError naming the offending kind, entry and key (module docstring).
    """
    devices: list[Device] = []
    for kind, entries in data.items():
        cls = DEVICE_KINDS.get(kind)
        if cls is None:
            raise ValueError(f"{kind}: unknown device kind (known: "
                             f"{', '.join(sorted(DEVICE_KINDS))})")
        if not isinstance(entries, list):
            raise ValueError(f"{kind}: must be an array of tables, written [[{kind}]]")
        params = [f for f in fields(cls) if f.init]  # type: ignore[arg-type]
        known = {f.name for f in params}
        required = [f.name for f in params
                    if f.default is MISSING and f.default_factory is MISSING]
        for index, entry in enumerate(entries):
            where = f"{kind}[{index}]"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where}: must be a table of keys, got {entry!r}")
            for key in entry:
                if key not in known:
                    raise ValueError(f"{where}.{key}: unknown key (known: "
                                     f"{', '.join(sorted(known))})")
            for key in required:
                if key not in entry:
                    raise ValueError(f"{where}.{key}: missing")
            try:
                devices.append(cls(**entry))
            except ValueError as exc:  # the constructor names the key; we add which entry
                raise ValueError(f"{where}.{exc}") from None
    return devices
