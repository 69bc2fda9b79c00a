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


def _group_sq_err(W: torch.Tensor, qw) -> torch.Tensor:
    """Squared rounding error of each group, `[N, G]`."""
    gs = qw.group_size
    d = torch.nn.functional.pad((qw.dequantize() - W) ** 2, (0, qw.scales.shape[1] * gs - W.shape[1]))
    return d.view(W.shape[0], -1, gs).sum(2)


@pytest.mark.parametrize("opt", [Option(bits=2, group_size=64), Option(bits=3, group_size=128),
                                 Option(bits=4, group_size=None), Option(bits=2, group_size=64, symmetric=True)],
                         ids=lambda o: o.label)
def test_clip_never_rounds_a_group_worse_and_helps_heavy_tails(opt):
    """The search includes the min-max range, so no group's squared error grows; on heavy-tailed weights
    (a few outliers stretch min-max over many small weights) the total falls clearly; K = 576 keeps a
    short last group at g128, whose padding takes no part."""
    torch.manual_seed(4)
    W = torch.distributions.StudentT(3.0).sample((40, 576)) * 0.02
    plain, clipped = rtn(W, opt), rtn(W, opt, clip=True)
    assert clipped.scales.shape == plain.scales.shape and clipped.q.max() < 2**opt.bits
    e_plain, e_clip = _group_sq_err(W, plain), _group_sq_err(W, clipped)
    assert torch.all(e_clip <= e_plain * (1 + 1e-6))
    assert e_clip.sum() < 0.9 * e_plain.sum()
    assert torch.all(clipped.scales <= plain.scales)  # only ever narrower


def test_clip_chunks_rows_without_changing_the_result(monkeypatch):
    """The search runs rows in chunks (bounded temporaries): any chunk size gives the same codes."""
    from bitplan.kernels import quantize as Q

    W = torch.randn(37, 200, generator=torch.Generator().manual_seed(5))
    opt = Option(bits=3, group_size=64)
    whole = rtn(W, opt, clip=True)
    monkeypatch.setattr(Q, "_CLIP_CHUNK", 7 * 256)  # 7 rows of 4 groups of 64 at a time
    chunked = rtn(W, opt, clip=True)
    assert torch.equal(whole.q, chunked.q) and torch.equal(whole.scales, chunked.scales)
    assert torch.equal(whole.zeros, chunked.zeros)
