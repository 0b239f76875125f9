"""The documented ranges of /infer's fields (docs/api.md), checked without a daemon."""

from __future__ import annotations

from typing import Any

import pytest

from modeld.api import validate as v
from modeld.api.infer import parse_infer
from modeld.errors import InvalidRequest


def test_stop_is_a_string_or_a_list_of_strings() -> None:
    assert parse_infer({"prompt": "hi", "stop": "\n"}).params.stop == ("\n",)
    assert parse_infer({"prompt": "hi", "stop": ["a", "b"]}).params.stop == ("a", "b")
    with pytest.raises(InvalidRequest) as info:
        parse_infer({"prompt": "hi", "stop": 5})
    assert info.value.message == "'stop' must be a string or a list of strings"
    assert info.value.param == "stop"


@pytest.mark.parametrize(
    ("field", "ok", "refused"),
    [
        ("temperature", [0, 2, v.MAX_TEMPERATURE], [-0.1, v.MAX_TEMPERATURE + 1]),
        ("max_tokens", [1, v.MAX_TOKENS_CEILING], [0, v.MAX_TOKENS_CEILING + 1]),
    ],
)
def test_the_documented_ranges(field: str, ok: list[Any], refused: list[Any]) -> None:
    for value in ok:
        parse_infer({"prompt": "hi", field: value})
    for value in refused:
        with pytest.raises(InvalidRequest) as info:
            parse_infer({"prompt": "hi", field: value})
        assert info.value.param == field


def test_the_documented_limits_are_the_enforced_ones() -> None:
    assert (v.MAX_TEMPERATURE, v.MAX_TOKENS_CEILING) == (100.0, 1_048_576)  # see docs/api.md
