"""trainer.typed_config: strict conversion of parsed YAML into dataclasses (property-based)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from trainer.typed_config import ConfigError, auto_or, convert, flatten, from_dict, to_dict


@dataclass(frozen=True)
class Inner:
    rate: float = 1.0
    name: str = "x"


@dataclass(frozen=True)
class Outer:
    steps: int = 1
    on: bool = True
    limit: int | None = None
    sizes: tuple[int, ...] = (1,)
    inner: Inner = Inner()


finite = st.floats(allow_nan=False, allow_infinity=False)


@given(finite)
def test_a_float_written_in_e_notation_reads_back_as_that_float(x):
    # PyYAML leaves "1e-3" as text; convert must still read it as the number it spells.
    text = f"{x:.17e}"
    assert convert(text, float, "a.b") == x
    assert convert(yaml.safe_load(text), float, "a.b") == x


@given(st.integers())
def test_ints_are_numbers_but_bools_are_neither(n):
    assert convert(n, float, "p") == float(n)
    assert convert(n, int, "p") == n
    with pytest.raises(ConfigError, match="p: expected a bool"):
        convert(n, bool, "p")
    for b in (True, False):
        with pytest.raises(ConfigError, match="p: expected an int"):
            convert(b, int, "p")


@given(st.text(alphabet=st.characters(blacklist_categories=("Nd",))))
def test_text_without_digits_is_no_number_and_the_error_names_path_and_value(s):
    with pytest.raises(ConfigError) as e:
        convert(s, float, "loss.pc")
    assert "loss.pc" in str(e.value) and repr(s) in str(e.value)


outer_dicts = st.fixed_dictionaries({}, optional={
    "steps": st.integers(), "on": st.booleans(), "limit": st.none() | st.integers(),
    "sizes": st.lists(st.integers(), max_size=4),
    "inner": st.fixed_dictionaries({}, optional={"rate": finite, "name": st.text()}),
})


@given(outer_dicts)
def test_valid_mappings_round_trip_through_the_dataclass(data):
    obj = from_dict(Outer, data, "")
    back = to_dict(obj)
    for key, value in data.items():
        if key == "inner":
            assert all(back["inner"][k] == v for k, v in value.items())
        else:
            assert back[key] == (list(value) if isinstance(value, list) else value)
    assert from_dict(Outer, back, "") == obj
    flat = flatten(back)
    assert flat["inner.rate"] == obj.inner.rate and flat["steps"] == obj.steps
    assert not any(isinstance(v, dict) for v in flat.values())


@given(outer_dicts, st.text(min_size=1).filter(lambda k: k not in {"steps", "on", "limit", "sizes", "inner"}))
def test_an_unknown_key_is_named_with_its_path(data, key):
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(Outer, {**data, key: 1}, "")
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, {"inner": {key: 1}}, "")
    assert f"inner.{key}" in str(e.value)


@given(st.one_of(st.text(), st.floats(), st.lists(st.integers(), min_size=1), st.booleans()))
def test_a_wrong_type_deep_in_the_tree_names_its_dotted_path(value):
    with pytest.raises(ConfigError, match=r"^steps: expected an int"):
        from_dict(Outer, {"steps": value}, "")
    not_text = 1 if isinstance(value, str) else value  # any text is a valid name
    with pytest.raises(ConfigError, match=r"^inner\.name: expected a string"):
        from_dict(Outer, {"inner": {"name": not_text}}, "")
    with pytest.raises(ConfigError, match=r"sizes\[1\]"):
        from_dict(Outer, {"sizes": [1, "two"]}, "")


@dataclass(frozen=True)
class Slots:
    n: int | str = "auto"


@given(st.one_of(st.text(), st.integers()))
def test_auto_or_takes_the_word_auto_or_a_valid_value_and_names_anything_else(value):
    ok = value == "auto" or (isinstance(value, int) and value > 0)
    if ok:
        auto_or(Slots(value), "memory", "n", "a number > 0", lambda v: v > 0)
    else:
        with pytest.raises(ConfigError) as e:
            auto_or(Slots(value), "memory", "n", "a number > 0", lambda v: v > 0)
        assert str(e.value) == f"memory.n must be a number > 0 or 'auto', got {value!r}"
