"""The quantizer as a typed setting: its text form, its validation, and its place in the profile format."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from bitplan.db.types import PROFILE_FORMAT, InvalidInput, Profile, Quantizer


@pytest.mark.parametrize("text,label", [
    ("rtn", "rtn"),
    ("gptq", "gptq"),
    ("gptq:damp=0.1", "gptq"),  # a default is not a setting of its own
    ("gptq:damp=0.05", "gptq:damp=0.05"),
    ("gptq:act_order=false,damp=0.05", "gptq:damp=0.05,act_order=false"),
    ("gptq:damp=0.05,block_size=64,act_order=false", "gptq:damp=0.05,block_size=64,act_order=false"),
    (" gptq : block_size = 32 , act_order = FALSE ", "gptq:block_size=32,act_order=false"),
    ("gptq:damp=1e-05", "gptq:damp=1e-05"),
    ("gptq:clip=true", "gptq:clip=true"),
    ("gptq:clip=false", "gptq"),
    ("rtn:clip=true", "rtn:clip=true"),
    ("rtn:clip=0", "rtn"),
])
def test_parse_and_label_round_trip(text, label):
    q = Quantizer.parse(text)
    assert q.label == str(q) == label
    assert Quantizer.parse(q.label) == q and hash(Quantizer.parse(q.label)) == hash(q)
    assert Quantizer.model_validate(q.model_dump()) == q
    assert Quantizer.model_validate_json(q.model_dump_json()) == q


def test_settings_and_dump():
    q = Quantizer.parse("gptq:damp=0.05,block_size=64,act_order=false")
    assert (q.method, q.damp, q.block_size, q.act_order) == ("gptq", 0.05, 64, False)
    assert q.settings == {"damp": 0.05, "block_size": 64, "act_order": False, "clip": False}
    # clip at its default is left out of the dump: the ids of profiles from before it existed are kept
    assert q.model_dump() == {"method": "gptq", "damp": 0.05, "block_size": 64, "act_order": False}
    assert Quantizer(method="gptq").model_dump() == {"method": "gptq", "damp": 0.1, "block_size": 128,
                                                     "act_order": True}
    clipped = Quantizer(method="gptq", clip=True)
    assert clipped.model_dump() == {"method": "gptq", "damp": 0.1, "block_size": 128, "act_order": True, "clip": True}
    assert Quantizer.model_validate(clipped.model_dump()) == clipped != Quantizer(method="gptq")


def test_rtn_takes_clip_alone():
    rtn = Quantizer()
    assert rtn == Quantizer.parse("rtn") == Quantizer(method="rtn")
    assert rtn.settings == {"clip": False} and rtn.model_dump() == {"method": "rtn"} and rtn.label == "rtn"
    assert Quantizer.model_validate({"method": "rtn"}) == rtn
    clipped = Quantizer.parse("rtn:clip=true")
    assert clipped.settings == {"clip": True} and clipped.model_dump() == {"method": "rtn", "clip": True}
    with pytest.raises(ValueError, match="rtn takes the setting clip \\(damp given\\): they are GPTQ's"):
        Quantizer(method="rtn", damp=0.05)
    with pytest.raises(ValueError, match="rtn takes the setting clip"):
        Quantizer.model_validate({"method": "rtn", "act_order": False})
    with pytest.raises(ValueError, match="llamacpp takes no settings \\(clip given\\)"):
        Quantizer(method="llamacpp", clip=True)


def test_the_defaults_are_gptq_s():
    from bitplan.kernels.quantize import gptq

    assert Quantizer(method="gptq").settings == gptq.__kwdefaults__


@pytest.mark.parametrize("text,match", [
    ("awq", r"unknown quantizer 'awq': write 'rtn', 'llamacpp', 'gptq', or GPTQ with settings, e\.g\. 'gptq:damp="),
    ("", r"unknown quantizer ''"),
    ("rtn:damp=0.05", r"unknown rtn setting 'damp' in 'rtn:damp=0.05': rtn takes the setting clip"),
    ("rtn:clip=maybe", r"clip='maybe' must be true or false"),
    ("gptq:alpha=1", r"unknown gptq setting 'alpha' in 'gptq:alpha=1': gptq takes the settings damp, block_size, "
                     r"act_order and clip"),
    ("gptq:", r"unknown gptq setting ''"),
    ("gptq:method=rtn", r"unknown gptq setting 'method'"),
    ("gptq:damp", r"give each setting once as key=value"),
    ("gptq:damp=0.1,damp=0.2", r"give each setting once as key=value"),
    ("gptq:damp=lots", r"damp='lots' must be a number"),
    ("gptq:block_size=6.5", r"block_size='6.5' must be an integer"),
    ("gptq:act_order=maybe", r"act_order='maybe' must be true or false"),
    ("gptq:damp=0", r"damp must be a finite number > 0"),
    ("gptq:damp=-1", r"damp must be a finite number > 0"),
    ("gptq:damp=nan", r"damp must be a finite number > 0"),
    ("gptq:block_size=0", r"block_size must be an integer >= 1"),
])
def test_bad_text_says_what_to_write(text, match):
    with pytest.raises(InvalidInput, match=match) as e:
        Quantizer.parse(text)
    assert "\n" not in str(e.value) and "e.g. 'gptq:damp=0.05,block_size=64,act_order=false'" in str(e.value)


def test_no_unknown_fields():
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        Quantizer.model_validate({"method": "gptq", "percdamp": 0.01})
    with pytest.raises(ValueError):
        Quantizer(method="awq")


# -------------------------------------------------------------------------------- the profile format


def test_profile_file_round_trip_with_its_quantizer(make_profile):
    q = Quantizer.parse("gptq:damp=0.05")
    p = make_profile(quantizer=q)
    d = p.to_dict()
    assert d["format"] == PROFILE_FORMAT == "bitplan.profile/2"
    assert d["estimator"] == "hessian" and d["quantizer"] == {"method": "gptq", "damp": 0.05, "block_size": 128,
                                                               "act_order": True}
    back = Profile.from_json(json.dumps(d))
    assert back == p and back.quantizer == q
    assert Profile.from_dict(make_profile().to_dict()).quantizer == Quantizer()
    assert make_profile().to_dict()["quantizer"] == {"method": "rtn"}


@pytest.mark.parametrize("estimator,want,quantizer", [
    ("fisher/gptq", "fisher", {"method": "gptq", "damp": 0.1, "block_size": 128, "act_order": True}),
    ("imatrix:0123456789abcdef/gptq", "imatrix:0123456789abcdef", {"method": "gptq", "damp": 0.1,
                                                                  "block_size": 128, "act_order": True}),
    ("calibrated", "calibrated", {"method": "rtn"}),
])
def test_reads_a_version_1_file(make_profile, estimator, want, quantizer):
    d = make_profile().to_dict()
    del d["quantizer"]
    d.update(format="bitplan.profile/1", estimator=estimator)
    p = Profile.from_json(json.dumps(d))
    assert p.estimator == want and p.quantizer.model_dump() == quantizer
    assert p.id == d["id"]  # a file's id is kept as written
    assert p.to_dict()["format"] == "bitplan.profile/2"


def test_a_version_1_file_with_an_unknown_suffix_is_malformed(make_profile):
    d = {**make_profile().to_dict(), "format": "bitplan.profile/1", "estimator": "fisher/awq"}
    del d["quantizer"]
    with pytest.raises(InvalidInput, match="malformed profile: .*quantizer"):
        Profile.from_dict(d)


def test_other_formats_are_refused(make_profile):
    d = {**make_profile().to_dict(), "format": "bitplan.profile/3"}
    with pytest.raises(InvalidInput, match=r"profile format must be 'bitplan.profile/2' \(or 'bitplan.profile/1'\)"):
        Profile.from_dict(d)


def test_the_estimator_is_the_estimator_alone(make_profile):
    with pytest.raises(ValueError, match="estimator 'fisher/gptq' carries a quantizer"):
        make_profile(estimator="fisher/gptq")
    d = {**make_profile().to_dict(), "estimator": "fisher/gptq"}  # a /2 file
    with pytest.raises(InvalidInput, match="malformed profile: .*carries a quantizer"):
        Profile.from_dict(d)


def test_llamacpp_is_a_quantizer_without_gptq_settings():
    q = Quantizer.parse("llamacpp")
    assert (q.method, q.label, q.model_dump(), q.settings) == ("llamacpp", "llamacpp", {"method": "llamacpp"}, {})
    assert Quantizer.parse(q.label) == q
    with pytest.raises(InvalidInput, match="write 'llamacpp', or 'llamacpp:imatrix="):
        Quantizer.parse("llamacpp:damp=0.05")


def test_llamacpp_quantizer_names_its_importance_matrix():
    q = Quantizer.parse("llamacpp:imatrix=0123456789abcdef")
    assert q.imatrix == "0123456789abcdef" and q.label == "llamacpp:imatrix=0123456789abcdef"
    assert q.model_dump() == {"method": "llamacpp", "imatrix": "0123456789abcdef"}
    assert Quantizer(method="llamacpp").model_dump() == {"method": "llamacpp"}  # ids of earlier profiles kept
    assert "imatrix" not in Quantizer(method="gptq").model_dump()
    for bad in ("llamacpp:imatrix=xyz", "llamacpp:damp=0.1", "rtn:imatrix=0123456789abcdef"):
        with pytest.raises(InvalidInput):
            Quantizer.parse(bad)
    with pytest.raises(ValidationError):
        Quantizer(method="gptq", imatrix="0123456789abcdef")


def test_options_on_two_axes_with_exact_sizes():
    from bitplan.db.types import parse_group_sizes, parse_options

    assert parse_group_sizes("128,32,ch,32") == [128, 32, None]
    opts = parse_options("4,3,16", "128,32,ch")
    assert [o.label for o in opts] == ["3b/g32", "3b/g128", "3b/gch", "4b/g32", "4b/g128", "4b/gch", "16b"]
    # a 576-wide row: 18 groups of 32, 5 of 128 (the last one partial), one per channel; each a 16-bit
    # scale and a code-width zero per output
    sizes = {o.label: o.size_bits(10, 576) for o in opts}
    assert sizes["3b/g32"] == 10 * (576 * 3 + 18 * (16 + 3))
    assert sizes["3b/g128"] == 10 * (576 * 3 + 5 * (16 + 3))
    assert sizes["3b/gch"] == 10 * (576 * 3 + 16 + 3)
    for bad in ("48", "0", "x", ","):
        with pytest.raises(InvalidInput, match="--group-sizes"):
            parse_group_sizes(bad)
