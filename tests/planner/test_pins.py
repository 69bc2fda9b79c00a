"""Pins: parsing, glob matching, and the typed errors for the mistakes a user makes."""

import numpy as np
import pytest

from bitplan.db.types import InvalidInput, Module, UnknownModule, parse_options
from bitplan.planner.pins import apply_pins, parse_pin

MODULES = [Module(name=n, shape=(64, 64)) for n in
           ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
            "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj", "lm_head"]]
OPTIONS = parse_options("2,3,4,8")  # columns: 2, 3, 4, 8 bits


@pytest.mark.parametrize("text, expected", [
    ("lm_head=8", ("lm_head", "=", 8)),
    ("lm_head==8", ("lm_head", "=", 8)),
    ("model.layers.0.*>=4", ("model.layers.0.*", ">=", 4)),
    (" *.down_proj <= 4 ", ("*.down_proj", "<=", 4)),
], ids=["eq", "double-eq", "ge-glob", "le-spaces"])
def test_parse_pin(text, expected):
    assert parse_pin(text) == expected


@pytest.mark.parametrize("text", ["lm_head", "lm_head=", "=8", "lm_head>8", "lm_head=eight", "lm_head=32"],
                         ids=["no-op", "no-bits", "no-pattern", "strict-gt", "words", "too-wide"])
def test_bad_pin_shows_the_syntax(text):
    with pytest.raises(InvalidInput, match="bad pin"):
        parse_pin(text)


def test_pins_narrow_the_allowed_options():
    allowed = apply_pins(MODULES, OPTIONS, ["lm_head=8", "model.layers.0.*>=4", "*.down_proj<=4"])
    np.testing.assert_array_equal(allowed, [
        [False, False, True, False],  # layer 0 down_proj: >=4 and <=4
        [False, False, True, True],  # layer 0 q_proj: >=4
        [True, True, True, False],  # layer 1 down_proj: <=4
        [True, True, True, True],  # untouched
        [False, False, False, True],  # lm_head=8
    ])


def test_no_pins_allow_everything():
    assert apply_pins(MODULES, OPTIONS, []).all()


def test_unknown_pattern_names_itself_and_examples():
    with pytest.raises(UnknownModule) as e:
        apply_pins(MODULES, OPTIONS, ["lm_heads=8"])
    assert "'lm_heads'" in str(e.value) and "lm_head" in str(e.value).split("look like")[1]


def test_pins_that_leave_no_option_name_the_module():
    with pytest.raises(InvalidInput, match="lm_head"):
        apply_pins(MODULES, OPTIONS, ["lm_head=5"])
    with pytest.raises(InvalidInput, match="model.layers.1.mlp.down_proj"):
        apply_pins(MODULES, OPTIONS, ["model.layers.1.*>=8", "*.down_proj<=4"])
