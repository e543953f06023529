"""The clearing: merit order, pro rata ties, shortfall, exactness and the canonical hash.

Unit tests pin down the documented rule on small islands; the hypothesis properties check
what every island must get: the same result in any input order, a residual of exactly zero
when flexibility suffices (else everything used and the rest reported), merit order, and
activations within each offer's flex with the right sign.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from fractions import Fraction
from random import Random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zgrid.clearing import (
    PRICE_SCALE_MILLI,
    Clearing,
    Direction,
    Offer,
    OfferBook,
    Shortfall,
    canonical_bytes,
    clear,
    price_milli,
)
from zgrid.table import exact_units, from_units

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load(node_id: str, kw: float) -> Offer:
    return Offer(node_id, 0.0, kw)


def gen(node_id: str, kw: float) -> Offer:
    return Offer(node_id, kw, 0.0)


def up(node_id: str, kw: float, price: float) -> Offer:
    return Offer(node_id, 0.0, 0.0, flex_up_kw=kw, price_up=price)


def down(node_id: str, kw: float, price: float) -> Offer:
    return Offer(node_id, 0.0, 0.0, flex_down_kw=kw, price_down=price)


# ----------------------------------------------------------------------------- unit tests


def test_a_deficit_is_covered_by_the_cheapest_up_flexibility_first() -> None:
    c = clear([load("factory", 10.0), up("dear", 6.0, 0.30), up("mid", 6.0, 0.20),
               up("cheap", 6.0, 0.10)])
    assert c.direction is Direction.UP
    assert c.imbalance_kw == -10.0
    assert dict(c.activations) == {"cheap": 6.0, "mid": 4.0}  # "dear" is not activated
    assert c.activation_kw("dear") == 0.0
    assert c.clearing_price == 0.2 and c.price_milli == 200
    assert c.shortfall_units == 0 and c.shortfall is Shortfall.NONE
    assert c.balanced_net_units == 0 and c.balanced_net_kw == 0.0


def test_a_surplus_is_absorbed_first_by_a_battery_that_wants_to_charge() -> None:
    c = clear([gen("pv_park", 5.0), down("battery", 3.0, -0.20), down("pv", 6.0, 0.0),
               down("plant", 10.0, 0.12)])
    assert c.direction is Direction.DOWN
    assert dict(c.activations) == {"battery": -3.0, "pv": -2.0}
    assert c.clearing_price == 0.0
    assert c.balanced_net_kw == 0.0 and c.shortfall_kw == 0.0


def test_a_deficit_never_touches_down_flexibility_nor_a_surplus_up_flexibility() -> None:
    both = Offer("both", 0.0, 0.0, 5.0, 0.1, 5.0, -1.0)
    assert clear([load("l", 1.0), both]).activations == {"both": 1.0}
    assert clear([gen("g", 1.0), both]).activations == {"both": -1.0}


def test_offers_at_the_marginal_price_share_the_remainder_pro_rata_to_their_flex() -> None:
    c = clear([load("l", 3.0), up("a", 2.0, 0.1), up("b", 4.0, 0.1), up("c", 9.0, 0.2)])
    assert dict(c.activations) == {"a": 1.0, "b": 2.0}
    assert c.clearing_price == 0.1


def test_leftover_units_of_a_tie_go_one_each_to_the_members_in_node_id_order() -> None:
    # 1 kW is 2**1074 units, and 2**1074 = 1 (mod 3): one unit is left over, and "a" gets it.
    c = clear([load("l", 1.0), up("c", 1.0, 0.5), up("a", 1.0, 0.5), up("b", 1.0, 0.5)])
    third = exact_units(1.0) // 3
    assert dict(c.activation_units) == {"a": third + 1, "b": third, "c": third}
    assert c.balanced_net_units == 0
    assert all(math.isclose(kw, 1 / 3) for kw in c.activations.values())


def test_prices_equal_in_milli_units_are_one_group() -> None:
    tied = clear([load("l", 2.0), up("a", 2.0, 0.1001), up("b", 2.0, 0.0999)])
    assert dict(tied.activations) == {"a": 1.0, "b": 1.0}
    ordered = clear([load("l", 2.0), up("a", 2.0, 0.1006), up("b", 2.0, 0.1004)])
    assert dict(ordered.activations) == {"b": 2.0}


def test_too_little_flexibility_activates_all_of_it_and_reports_the_load_to_shed() -> None:
    c = clear([load("l", 10.0), up("a", 3.0, 0.1), up("b", 4.0, 0.9), down("x", 50.0, 0.0)])
    assert dict(c.activations) == {"a": 3.0, "b": 4.0}
    assert c.shortfall is Shortfall.SHED_LOAD and c.shortfall_kw == 3.0
    assert c.balanced_net_kw == -3.0
    assert c.clearing_price == 0.9  # the dearest group used


def test_too_little_down_flexibility_reports_the_generation_to_curtail() -> None:
    c = clear([gen("g", 10.0), down("a", 4.0, -1.0)])
    assert c.shortfall is Shortfall.CURTAIL_GENERATION and c.shortfall_kw == 6.0
    assert c.balanced_net_kw == 6.0 and c.activations == {"a": -4.0}


def test_no_flexibility_in_the_needed_direction_leaves_no_price_and_the_whole_shortfall() -> None:
    c = clear([load("l", 2.5), down("d", 9.0, 0.0), up("zero", 0.0, 0.1)])
    assert c.activations == {} and c.clearing_price is None and c.price_milli is None
    assert c.shortfall_kw == 2.5 and c.balanced_net_kw == -2.5


def test_a_balanced_island_activates_nothing() -> None:
    c = clear([gen("g", 4.0), load("l", 4.0), up("u", 9.0, 0.1), down("d", 9.0, -0.1)])
    assert c.direction is Direction.NONE and c.imbalance_units == 0
    assert c.activations == {} and c.clearing_price is None
    assert c.shortfall is Shortfall.NONE and c.balanced_net_kw == 0.0


def test_no_offers_is_a_balanced_island() -> None:
    c = clear([])
    assert c == clear(()) and c.direction is Direction.NONE
    assert c.activations == {} and c.clearing_price is None and c.shortfall_kw == 0.0


def test_a_duplicate_node_id_is_refused() -> None:
    with pytest.raises(ValueError, match="duplicate offer for 'n1'"):
        clear([up("n1", 1.0, 0.1), load("n2", 1.0), load("n1", 2.0)])


@pytest.mark.parametrize("field, value", [("production_kw", math.nan),
                                          ("price_up", math.inf), ("flex_down_kw", -1.0)])
def test_an_offer_with_a_bad_value_is_refused_naming_the_field(field: str, value: float) -> None:
    values = {"production_kw": 0.0, "consumption_kw": 0.0, field: value}
    with pytest.raises(ValueError, match=field):
        Offer("n1", **values)


def test_the_imbalance_is_the_exact_sum_of_the_base_nets() -> None:
    offers = [Offer("a", 0.1, 0.0), Offer("b", 0.2, 0.0), Offer("c", 0.0, 0.3),
              Offer("d", 1e9, 1e-300)]
    c = clear(offers)
    assert c.imbalance_kw == math.fsum(x for o in offers for x in (o.production_kw,
                                                                   -o.consumption_kw))


@pytest.mark.parametrize("price, milli", [(0.1, 100), (0.0625, 62), (-0.0625, -62),
                                          (0.0635, 64), (1.0625, 1062), (0.0015, 2),
                                          (-0.2, -200), (0.0, 0), (1234.5678, 1234568)])
def test_prices_round_half_to_even_into_milli_units(price: float, milli: int) -> None:
    assert price_milli(price) == milli


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12))
@PROPERTY
def test_milli_rounding_is_exactly_round_half_even_of_the_double(price: float) -> None:
    assert price_milli(price) == round(Fraction(price) * PRICE_SCALE_MILLI)


def test_the_hash_is_blake2b_64_of_the_documented_bytes() -> None:
    c = clear([load("l", 3.0), up("price", 2.0, 0.1), up("b", 4.0, 0.1), up("c", 9.0, 0.2)])
    u = exact_units
    expected = (b"zgrid-clearing-v1\n"
                + f"imbalance\0{-u(3.0)}\n".encode()
                + b"activations\x002\n"
                + f"b\0{u(2.0)}\n".encode()
                + f"price\0{u(1.0)}\n".encode()  # a node called "price"
                + b"price\x00100\n"
                + b"shortfall\x000\n")
    assert c.canonical_bytes() == expected
    assert c.hash == int.from_bytes(hashlib.blake2b(expected, digest_size=8).digest(),
                                    "little")


def test_the_hash_of_a_clearing_without_price_writes_none() -> None:
    c = clear([])
    assert c.canonical_bytes() == (b"zgrid-clearing-v1\nimbalance\x000\nactivations\x000\n"
                                   b"price\x00none\nshortfall\x000\n")
    assert canonical_bytes(0, [("x", 0)], None, 0) == c.canonical_bytes()  # zeros left out


def test_different_clearings_have_different_hashes() -> None:
    hashes = {clear(offers).hash for offers in (
        [load("l", 1.0), up("a", 2.0, 0.1)], [load("l", 1.0), up("b", 2.0, 0.1)],
        [load("l", 1.5), up("a", 2.0, 0.1)], [load("l", 1.0), up("a", 2.0, 0.2)],
        [load("l", 3.0), up("a", 2.0, 0.1)], [])}
    assert len(hashes) == 6


# ----------------------------------------------------------------------------- properties

kws = st.one_of(st.sampled_from([0.0, 0.1, 0.2, 0.3, 5e-324, 1e-300, 1.0, 1e9]),
                st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False))
flexes = st.one_of(st.just(0.0), kws)
# Few distinct prices, so that ties (one marginal group of several offers) are common.
prices = st.one_of(st.sampled_from([-0.5, -0.2, 0.0, 0.1, 0.1001, 0.1004, 0.1006, 0.3]),
                   st.floats(min_value=-10.0, max_value=10.0, allow_nan=False))


@st.composite
def islands(draw: st.DrawFn) -> list[Offer]:
    ids = draw(st.lists(st.from_regex(r"[a-z0-9][a-z0-9_.\-]{0,6}", fullmatch=True),
                        max_size=12, unique=True))
    return [Offer(node_id, draw(kws), draw(kws), draw(flexes), draw(prices), draw(flexes),
                  draw(prices)) for node_id in ids]


def direction_flex(c: Clearing, o: Offer) -> tuple[int, int]:
    """(flex units in the clearing's direction, milli price of that flex)."""
    if c.direction is Direction.UP:
        return exact_units(o.flex_up_kw), price_milli(o.price_up)
    if c.direction is Direction.DOWN:
        return exact_units(o.flex_down_kw), price_milli(o.price_down)
    return 0, 0


@given(islands(), st.randoms(use_true_random=False))
@PROPERTY
def test_any_order_of_the_offers_gives_the_bit_identical_clearing(
        offers: list[Offer], rnd: Random) -> None:
    shuffled = list(offers)
    rnd.shuffle(shuffled)
    a, b = clear(offers), clear(shuffled)
    assert a == b and a.hash == b.hash
    assert a.canonical_bytes() == b.canonical_bytes()
    assert list(a.activations) == list(b.activations) == sorted(a.activations)


@given(islands())
@PROPERTY
def test_enough_flexibility_cancels_the_imbalance_exactly_else_all_is_used(
        offers: list[Offer]) -> None:
    c = clear(offers)
    need = abs(c.imbalance_units)
    available = sum(direction_flex(c, o)[0] for o in offers)
    assert c.balanced_net_units == c.imbalance_units + sum(c.activation_units.values())
    if available >= need:
        assert c.balanced_net_units == 0 and c.shortfall_units == 0
        assert c.shortfall is Shortfall.NONE and c.balanced_net_kw == 0.0
    else:
        for o in offers:
            flex, _ = direction_flex(c, o)
            assert abs(c.activation_units.get(o.node_id, 0)) == flex
        assert c.shortfall_units == need - available
        sign = -1 if c.direction is Direction.UP else 1
        assert c.balanced_net_units == sign * c.shortfall_units
        assert c.shortfall is (Shortfall.SHED_LOAD if sign < 0 else Shortfall.CURTAIL_GENERATION)
    assert c.shortfall_kw == from_units(c.shortfall_units) >= 0.0
    assert c.imbalance_kw == from_units(c.imbalance_units)


@given(islands())
@PROPERTY
def test_no_offer_is_activated_while_a_strictly_cheaper_one_has_headroom(
        offers: list[Offer]) -> None:
    c = clear(offers)
    used = {o.node_id: abs(c.activation_units.get(o.node_id, 0)) for o in offers}
    for o in offers:
        if used[o.node_id] == 0:
            continue
        _, price = direction_flex(c, o)
        assert c.price_milli is not None and price <= c.price_milli
        for cheaper in offers:
            flex, cheaper_price = direction_flex(c, cheaper)
            if cheaper_price < price:
                assert used[cheaper.node_id] == flex


@given(islands())
@PROPERTY
def test_activations_stay_within_each_offers_flex_with_the_right_sign(
        offers: list[Offer]) -> None:
    c = clear(offers)
    by_id = {o.node_id: o for o in offers}
    assert set(c.activations) == set(c.activation_units) <= set(by_id)
    for node_id, units in c.activation_units.items():
        o = by_id[node_id]
        assert units != 0
        if c.direction is Direction.UP:
            assert 0 < units <= exact_units(o.flex_up_kw)
            assert 0.0 < c.activations[node_id] <= o.flex_up_kw
        else:
            assert c.direction is Direction.DOWN
            assert -exact_units(o.flex_down_kw) <= units < 0
            assert -o.flex_down_kw <= c.activations[node_id] < 0.0
        assert c.activations[node_id] == from_units(units)


@given(islands())
@PROPERTY
def test_the_marginal_group_is_shared_pro_rata_to_within_one_unit(offers: list[Offer]) -> None:
    c = clear(offers)
    if c.price_milli is None:
        return
    group = [(o.node_id, direction_flex(c, o)[0]) for o in offers
             if direction_flex(c, o)[1] == c.price_milli and direction_flex(c, o)[0] > 0]
    group_flex = sum(flex for _, flex in group)
    granted = sum(abs(c.activation_units.get(node_id, 0)) for node_id, _ in group)
    for node_id, flex in group:
        share = abs(c.activation_units.get(node_id, 0))
        # share differs from granted * flex / group_flex by less than one unit
        assert abs(share * group_flex - granted * flex) < group_flex


# ---------------------------------------------------------------------------- the offer book

def reference_activations(offers: list[Offer]) -> tuple[dict[str, int], int | None, int]:
    """Rule steps 2-7 written straight from the module docstring, one sort of every candidate,
    as an oracle for the incremental OfferBook that `clear` and the core use."""
    imbalance = sum(exact_units(o.production_kw) - exact_units(o.consumption_kw) for o in offers)
    if imbalance == 0:
        return {}, None, 0
    sign = 1 if imbalance < 0 else -1
    candidates = sorted(
        (price_milli(o.price_up if sign > 0 else o.price_down), o.node_id,
         exact_units(o.flex_up_kw if sign > 0 else o.flex_down_kw)) for o in offers
        if (o.flex_up_kw if sign > 0 else o.flex_down_kw) > 0)
    remaining, granted, price = abs(imbalance), {}, None
    for group_price in sorted({p for p, _, _ in candidates}):
        if remaining == 0:
            break
        group = [(node_id, flex) for p, node_id, flex in candidates if p == group_price]
        group_flex, price = sum(flex for _, flex in group), group_price
        if group_flex <= remaining:
            granted.update({node_id: sign * flex for node_id, flex in group})
            remaining -= group_flex
            continue
        shares = [remaining * flex // group_flex for _, flex in group]
        leftover = remaining - sum(shares)
        for index, ((node_id, _), share) in enumerate(zip(group, shares, strict=True)):
            if share + (index < leftover):
                granted[node_id] = sign * (share + (index < leftover))
        remaining = 0
    return granted, price, remaining


@given(islands())
@PROPERTY
def test_clear_follows_the_documented_rule_exactly(offers: list[Offer]) -> None:
    c = clear(offers)
    assert (dict(c.activation_units), c.price_milli, c.shortfall_units) == \
        reference_activations(offers)


@given(islands(), st.lists(st.tuples(st.integers(0, 11), st.booleans()), max_size=30))
@PROPERTY
def test_an_offer_book_updated_offer_by_offer_clears_as_one_built_afresh(
        offers: list[Offer], edits: list[tuple[int, bool]]) -> None:
    if not offers:
        return
    book = OfferBook()
    held: dict[str, Offer] = {}
    for index, keep in edits:  # a history of offers changing and members leaving
        o = offers[index % len(offers)]
        if keep:
            book.set(o.node_id, o.flex_up_kw, o.price_up, o.flex_down_kw, o.price_down)
            held[o.node_id] = o
        else:
            book.remove(o.node_id)
            held.pop(o.node_id, None)
    imbalance = sum(exact_units(o.production_kw) - exact_units(o.consumption_kw) for o in offers)
    members = [replace(o, flex_up_kw=0.0, flex_down_kw=0.0) if o.node_id not in held else o
               for o in offers]
    expected = clear(members)
    got = book.clearing(imbalance)
    assert got == expected and got.hash == expected.hash
    for o in offers:  # one member's share alone, as a node computes its own activation
        assert book.activation_units(o.node_id, imbalance) == \
            expected.activation_units.get(o.node_id, 0)
