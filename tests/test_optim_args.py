"""The one ``key=value,...`` grammar (``gradspace.optim_args``) that ``--optim-args``, the HF Trainer's
``optim_args`` and compare's method options share."""

from __future__ import annotations

import math

import pytest

from gradspace.optim_args import literal, parse
from gradspace.train.compare import method_options
from gradspace.train.config import UsageError, parse_optim_args


def test_values_read_as_what_they_spell():
    assert parse("a=true,b=FALSE,c=None,d=null,e=8,f=-3,g=0.25,h=-1e-3,i=1E4,j=left,k=subtrack++") == {
        "a": True,
        "b": False,
        "c": None,
        "d": None,
        "e": 8,
        "f": -3,
        "g": 0.25,
        "h": -1e-3,
        "i": 1e4,
        "j": "left",
        "k": "subtrack++",
    }
    assert isinstance(parse("rank=8")["rank"], int) and isinstance(parse("scale=2.0")["scale"], float)
    assert math.isinf(literal("inf")) and literal("0x10") == "0x10" and literal("True") is True


def test_whitespace_anywhere_is_dropped_as_the_trainer_does():
    """The Trainer's own parser removes spaces before it splits; tabs and newlines (a YAML block) go too."""
    want = {"rank": 8, "scale": 0.25, "method": "subtrack++"}
    assert parse(" rank = 8 ,\tscale=\n0.25 , method=subtrack ++ ") == want


def test_empty_input_and_empty_items_are_no_options_and_a_mapping_is_taken_as_it_is():
    assert parse(None) == parse("") == parse(" , ,") == {}
    assert parse("rank=8,") == {"rank": 8}
    given = {"betas": [0.9, 0.999]}
    assert parse(given) == given and parse(given) is not given
    assert parse("rank=8,rank=16") == {"rank": 16}  # a later key wins, as in the Trainer


@pytest.mark.parametrize("bad", ["rank8", "=8", "rank=", "rank=8=9", "rank=8,eta"])
def test_an_item_that_is_not_key_value_is_an_error_naming_it(bad):
    with pytest.raises(ValueError, match=r"optim-args: '.*' is not key=value"):
        parse(bad)


def test_a_tuple_is_refused_with_what_to_write_instead():
    with pytest.raises(ValueError, match=r"'0\.999\)' is not key=value .*beta1=0\.9,beta2=0\.999"):
        parse("betas=(0.9,0.999)")


def test_a_value_that_is_neither_text_nor_a_mapping_is_an_error():
    with pytest.raises(ValueError, match="must be key=value pairs"):
        parse(3)


def test_every_entry_point_reads_the_same_grammar():
    text = "rank = 8,\tscale=0.25,accumulate=false"
    want = {"rank": 8, "scale": 0.25, "accumulate": False}
    assert parse_optim_args(text) == want
    assert method_options("galore:" + text.replace(",", ";")) == (
        "galore",
        {"rank": 8, "scale": 0.25},
        {"accumulate": False},
    )
    with pytest.raises(UsageError, match="optim-args: 'eta' is not key=value"):
        parse_optim_args("eta")
    with pytest.raises(UsageError, match="must be key=value"):
        parse_optim_args(3)
    hf = pytest.importorskip("gradspace.integrations.hf")
    assert hf.parse_optim_args(text) == want
    with pytest.raises(ValueError, match="optim_args: 'rank' is not key=value"):
        hf.parse_optim_args("rank")
