import pytest
import torch

from bitplan.db.types import Option
from bitplan.executor.quant_linear import QuantLinear
from bitplan.kernels.quantize import quantize_dequantize, rtn

OPTIONS = [Option(bits=b, group_size=g, symmetric=s) for b in (2, 3, 4, 8) for g in (64, 128, None)
           for s in (False, True)]


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.label)
def test_rtn_codes_in_range_and_error_bounded(opt):
    torch.manual_seed(0)
    W = torch.randn(48, 576)
    qw = rtn(W, opt)
    assert qw.q.min() >= 0 and qw.q.max() < 2**opt.bits
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (48, opt.n_groups(576))
    err = (qw.dequantize() - W).abs()
    # asymmetric RTN: the zero is rounded to an integer, so the extremes may sit up to one step off
    g = torch.arange(576) // (opt.group_size or 576)
    if not opt.symmetric:
        assert torch.all(err <= qw.scales.float()[:, g] * 1.0 + 1e-6)
        assert err.mean() < qw.scales.float().mean() * 0.3


def test_more_bits_less_error():
    torch.manual_seed(1)
    W = torch.randn(64, 200)
    errs = [float((quantize_dequantize(W, Option(bits=b)) - W).pow(2).sum()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] * 1e-3


def test_short_last_group_is_quantized_on_its_own():
    """in_features = 576 with group 128: the last group holds 64 real columns, no padding takes part."""
    torch.manual_seed(3)
    W = torch.randn(8, 576)
    opt = Option(bits=3, group_size=128)
    whole = rtn(W, opt).dequantize()[:, 512:]
    alone = rtn(W[:, 512:].contiguous(), Option(bits=3, group_size=64)).dequantize()
    assert torch.equal(whole, alone)


@pytest.mark.parametrize("opt", OPTIONS[:6], ids=lambda o: o.label)
def test_quant_linear_matches_dequantized_matmul(opt):
    torch.manual_seed(2)
    lin = torch.nn.Linear(576, 40, bias=True)
    qw = rtn(lin.weight, opt)
    ql = QuantLinear.from_quantized(qw, lin.bias)
    x = torch.randn(5, 576)
    torch.testing.assert_close(ql(x), x @ qw.dequantize().T + lin.bias)
    # the stored size is what the option promises, to within the word padding of K and G
    stored = sum(t.numel() * t.element_size() * 8 for k, t in ql.state_dict().items() if k != "bias")
    assert opt.size_bits(40, 576) <= stored <= opt.size_bits(40, 576) + 40 * 32 * 8 * 2
