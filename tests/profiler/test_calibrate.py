"""The calibrated estimator: fisher's rows rescaled to measured KL, exact where measured."""

import numpy as np
import pytest

from bitplan.db.types import Quantizer, parse_options
from bitplan.profiler.calibrate import calibration_points, rescale
from bitplan.profiler.calibration import token_batches
from bitplan.profiler.kl import DEFAULT_KL_TOKENS, kl_table
from bitplan.profiler.model import planned_linears
from bitplan.profiler.profile import profile_model


def test_rescale_keeps_measured_points_and_scales_the_rest():
    cheap = np.array([[4.0, 2.0, 1.0, 0.1], [1.0, 0.5, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]])
    measured = np.array([[8.0, 4.0], [3.0, 1.5], [0.2, 0.1]])
    out, alpha = rescale(cheap, measured, [0, 1])
    np.testing.assert_allclose(alpha[:2], [2.0, 3.0])
    np.testing.assert_allclose(out[:, :2], measured)
    np.testing.assert_allclose(out[0, 2:], [2.0, 0.2])
    np.testing.assert_allclose(out[1, 2:], [0.6, 0.0])
    assert alpha[2] == pytest.approx(2.5)  # nothing to fit: the median of the fitted factors


def test_geometric_mean_of_ratios():
    out, alpha = rescale(np.array([[1.0, 1.0, 1.0]]), np.array([[2.0, 8.0]]), [0, 1])
    assert alpha[0] == pytest.approx(4.0) and out[0, 2] == pytest.approx(4.0)


def test_points_are_the_lowest_quantized_widths():
    opts = parse_options("8,2,4,3,16")
    assert [opts[i].bits for i in calibration_points(opts)] == [2, 3]
    assert calibration_points(parse_options("16")) == []
    # two group sizes per width: still two widths, each at its smallest group
    opts = parse_options("2,3,4", "128,32")
    assert [opts[i].label for i in calibration_points(opts)] == ["2b/g32", "3b/g32"]


def test_gguf_points_are_types_every_row_stores_as_themselves():
    from bitplan.db.formats import parse_gguf_options

    opts = parse_gguf_options(None)
    # rows of 1536 only: the K-quants of fewest bits
    assert [opts[i].label for i in calibration_points(opts, widths=[1536])] == ["Q2_K", "Q3_K"]
    # rows of 576 store Q2_K and Q3_K as Q4_0: one 32-block type per code width instead, never the same twice
    assert [opts[i].label for i in calibration_points(opts, widths=[576, 1536])] == ["IQ4_NL", "Q5_0"]


def test_calibrated_profile_equals_kl_at_its_points(loaded, text_file):
    opts = parse_options("2,3,4")
    fisher = profile_model(loaded, opts, estimator="fisher", calib=str(text_file), n_tokens=128,
                           quantizer=Quantizer(), seq_len=64, progress=False)
    cal = profile_model(loaded, opts, estimator="calibrated", calib=str(text_file), n_tokens=128,
                        quantizer=Quantizer(), seq_len=64, progress=False)
    assert cal.estimator == "calibrated" and cal.id != fisher.id
    batches, _ = token_batches(loaded.tokenizer, str(text_file), 128, 64)
    rows = max(1, DEFAULT_KL_TOKENS // 64)
    kl = kl_table(loaded.model, planned_linears(loaded.model), opts[:2], batches[:rows], progress=False)
    np.testing.assert_allclose(cal.error[:, :2], kl, rtol=1e-5, atol=1e-9)
    ratio = cal.error[:, 2] / fisher.error[:, 2]
    alpha = np.exp(np.log(kl / fisher.error[:, :2]).mean(axis=1))
    np.testing.assert_allclose(ratio, alpha, rtol=1e-5)


def test_calibrated_gptq_points_use_h_of_the_whole_calibration_text(loaded, text_file):
    """KL is measured on the first DEFAULT_KL_TOKENS only, but GPTQ's ΔW there must come from H of all the
    calibration tokens (what the fisher rows and `apply` use), not from a GPTQ fitted to the measured ones."""
    opts = parse_options("2,3,4")
    n, seq = 2 * DEFAULT_KL_TOKENS, 64
    GPTQ = Quantizer(method="gptq")
    cal = profile_model(loaded, opts, estimator="calibrated", quantizer=GPTQ, calib=str(text_file), n_tokens=n,
                        seq_len=seq, progress=False)
    batches, _ = token_batches(loaded.tokenizer, str(text_file), n, seq)
    rows = DEFAULT_KL_TOKENS // seq
    assert rows < len(batches)
    planned = planned_linears(loaded.model)
    whole = kl_table(loaded.model, planned, opts[:2], batches[:rows], quantizer=GPTQ, hessian_batches=batches,
                     progress=False)
    own = kl_table(loaded.model, planned, opts[:2], batches[:rows], quantizer=GPTQ, progress=False)
    assert not np.allclose(whole, own, rtol=1e-3)  # the test can tell the two apart
    np.testing.assert_allclose(cal.error[:, :2], whole, rtol=1e-5, atol=1e-9)
