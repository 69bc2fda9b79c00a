import numpy as np
import pytest

from bitplan.db.types import InvalidInput, parse_options
from bitplan.profiler.model import load_model
from bitplan.profiler.profile import estimator_name, parse_estimator_name, profile_model


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_model(str(tiny_checkpoint))


def test_estimator_names_round_trip():
    assert estimator_name("fisher") == "fisher" and estimator_name("fisher", "gptq") == "fisher/gptq"
    assert parse_estimator_name("fisher/gptq") == ("fisher", "gptq")
    assert parse_estimator_name("hessian") == ("hessian", "rtn")


@pytest.mark.parametrize("estimator", ["hessian", "fisher"])
def test_gptq_profile(loaded, text_file, estimator):
    """GPTQ's ΔW: recorded in the estimator name (so a new id), and below RTN's layer-output error."""
    options = parse_options("2,3,4,8")
    kw = dict(estimator=estimator, calib=str(text_file), n_tokens=256, seq_len=64, progress=False)
    rtn = profile_model(loaded, options, quantizer="rtn", **kw)
    gptq = profile_model(loaded, options, quantizer="gptq", **kw)
    assert rtn.estimator == estimator and gptq.estimator == f"{estimator}/gptq" and gptq.id != rtn.id
    assert gptq.error.shape == rtn.error.shape and np.all(gptq.error[:, 0] > 0)
    assert np.all(np.diff(gptq.error[:, :3], axis=1) < 0)
    if estimator == "hessian":  # what GPTQ minimizes, on the same calibration text
        assert np.all(gptq.error[:, :3] <= rtn.error[:, :3] * (1 + 1e-9))
    # (the diagonal Fisher, blind to how GPTQ's errors cancel across inputs, rates GPTQ's larger ΔW
    # *worse* than RTN's here, although measured KL is lower: tests/profiler/test_kl.py)


def test_unknown_quantizer_or_estimator(loaded, text_file):
    with pytest.raises(InvalidInput, match="unknown quantizer"):
        profile_model(loaded, parse_options("4"), quantizer="awq", calib=str(text_file), progress=False)
    with pytest.raises(InvalidInput, match="unknown estimator"):
        profile_model(loaded, parse_options("4"), estimator="obs", calib=str(text_file),
                      progress=False)


def test_gptq_settings_are_part_of_the_profile_id(loaded, text_file, monkeypatch):
    """A GPTQ profile measured with other settings is not reused silently; RTN ids do not depend on GPTQ's."""
    from bitplan.executor import quantize

    options = parse_options("2,4")
    kw = dict(estimator="hessian", calib=str(text_file), n_tokens=128, seq_len=64, progress=False)
    before = profile_model(loaded, options, quantizer="gptq", **kw)
    rtn = profile_model(loaded, options, quantizer="rtn", **kw)
    monkeypatch.setattr(quantize.gptq, "__kwdefaults__", {**quantize.gptq.__kwdefaults__, "damp": 0.01})
    assert quantize.quantizer_settings("gptq")["damp"] == 0.01
    after = profile_model(loaded, options, quantizer="gptq", **kw)
    assert after.id != before.id and after.estimator == before.estimator
    assert not np.allclose(after.error, before.error)  # the setting really reached the quantizer
    assert profile_model(loaded, options, quantizer="rtn", **kw).id == rtn.id
