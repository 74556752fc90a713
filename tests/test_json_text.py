"""storage/json_text.py: the JSON the databases store is real JSON, whichever encoder wrote it."""

from __future__ import annotations

import json
import math
from types import MappingProxyType

import pytest

from cuepoint_server.storage.json_text import dumps


def test_the_text_reads_back_as_the_same_value() -> None:
    value = {"conditions": [["trigger", "help_me (seen)"]], "ü": "ç", "n": 1e16, "none": None, "t": (1, 2)}
    text = dumps(value)
    assert json.loads(text) == {**value, "t": [1, 2]}
    assert "ü" in text  # UTF-8, not \u escapes
    assert dumps(MappingProxyType({"a": 1})) == '{"a":1}'


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinities_are_refused_as_the_stdlib_refuses_them(bad: float) -> None:
    with pytest.raises(ValueError):
        dumps({"score": bad})
    with pytest.raises(ValueError):
        dumps([1.0, {"deep": [bad]}])
