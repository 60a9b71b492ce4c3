"""The one size grammar (agents/core/sizes.py), shared by the agent's config and rbdfleet.toml."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.core.sizes import SIZE_UNITS, format_size, parse_size
from agents.errors import ConfigError

pytestmark = pytest.mark.unit


@given(st.integers(min_value=1, max_value=1 << 44))
def test_size_format_round_trip(size: int) -> None:
    assert parse_size(format_size(size), "k") == size


@given(st.integers(min_value=1, max_value=1 << 20), st.sampled_from(list(SIZE_UNITS)))
def test_parse_size_units(number: int, unit: str) -> None:
    assert parse_size(f"{number}{unit}", "k") == number * SIZE_UNITS[unit]
    assert parse_size(f" {number} {unit} ", "k") == number * SIZE_UNITS[unit]


def test_plain_numbers_are_bytes() -> None:
    assert parse_size(4096, "k") == 4096
    assert parse_size("1024", "k") == 1024


@pytest.mark.parametrize("value", [0, "0", "0MiB", -1, True, 1.5, "1.5GiB", "64GB", "64mib",
                                   "MiB", "", None, "1 2"])
def test_what_is_not_a_size_names_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(value, "fleet.size")
    assert info.value.key == "fleet.size"
