import numpy as np
import pytest

from bitplan.db.types import InvalidInput, Quantizer, parse_options
from bitplan.profiler.profile import DEFAULT_QUANTIZER, profile_model

RTN, GPTQ = Quantizer(), Quantizer(method="gptq")


def test_the_default_quantizer_is_gptq_with_searched_ranges():
    assert DEFAULT_QUANTIZER == Quantizer(method="gptq", clip=True) and DEFAULT_QUANTIZER.label == "gptq:clip=true"


@pytest.mark.parametrize("estimator", ["hessian", "fisher"])
def test_gptq_profile(loaded, text_file, estimator):
    """GPTQ's ΔW: recorded as the profile's quantizer (so a new id), and below RTN's layer-output error."""
    options = parse_options("2,3,4,8")
    kw = dict(estimator=estimator, calib=str(text_file), n_tokens=256, seq_len=64, progress=False)
    rtn = profile_model(loaded, options, quantizer=RTN, **kw)
    gptq = profile_model(loaded, options, quantizer=GPTQ, **kw)
    assert rtn.estimator == gptq.estimator == estimator and gptq.id != rtn.id
    assert (rtn.quantizer, gptq.quantizer) == (RTN, GPTQ)
    assert gptq.error.shape == rtn.error.shape and np.all(gptq.error[:, 0] > 0)
    assert np.all(np.diff(gptq.error[:, :3], axis=1) < 0)
    if estimator == "hessian":  # what GPTQ minimizes, on the same calibration text
        assert np.all(gptq.error[:, :3] <= rtn.error[:, :3] * (1 + 1e-9))
    # (the diagonal Fisher, blind to how GPTQ's errors cancel across inputs, rates GPTQ's larger ΔW
    # *worse* than RTN's here, although measured KL is lower: tests/profiler/test_kl.py)


def test_unknown_quantizer_or_estimator(loaded, text_file):
    with pytest.raises(TypeError, match=r"quantizer must be a Quantizer \(e\.g\. Quantizer\.parse\('gptq'\)\)"):
        profile_model(loaded, parse_options("4"), quantizer="gptq", calib=str(text_file), progress=False)
    with pytest.raises(InvalidInput, match="unknown quantizer 'awq'"):
        Quantizer.parse("awq")
    with pytest.raises(InvalidInput, match="unknown estimator 'obs'; choose one of"):
        profile_model(loaded, parse_options("4"), estimator="obs", calib=str(text_file),
                      progress=False)
    with pytest.raises(InvalidInput, match="unknown estimator 'fisher/gptq'"):
        profile_model(loaded, parse_options("4"), estimator="fisher/gptq", calib=str(text_file), progress=False)


def test_gptq_settings_are_part_of_the_profile(loaded, text_file):
    """A GPTQ profile measured with other settings is another profile, not reused silently; its settings
    reach the quantizer."""
    options = parse_options("2,4")
    kw = dict(estimator="hessian", calib=str(text_file), n_tokens=128, seq_len=64, progress=False)
    default = profile_model(loaded, options, quantizer=GPTQ, **kw)
    damp = profile_model(loaded, options, quantizer=Quantizer.parse("gptq:damp=0.05"), **kw)
    assert damp.id != default.id and damp.estimator == default.estimator
    assert damp.quantizer.label == "gptq:damp=0.05" and damp.quantizer.damp == 0.05
    assert not np.allclose(damp.error, default.error)
    again = profile_model(loaded, options, quantizer=Quantizer.parse("gptq:damp=0.05"), **kw)
    assert again.id == damp.id and np.array_equal(again.error, damp.error)
    assert profile_model(loaded, options, quantizer=Quantizer.parse("gptq:damp=0.1"), **kw).id == default.id
