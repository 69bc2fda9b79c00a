from functools import lru_cache

import pytest
import torch

from bitplan.db.types import Option, Quantizer
from bitplan.kernels.quantize import gptq, quantize, rtn


@lru_cache(maxsize=None)
def correlated(n_tokens: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs `X: [n_tokens, K]` with correlated features and uneven scales, and `H = XᵀX` (float64)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_tokens, K, generator=g) @ torch.randn(K, K, generator=g) / K**0.5
    X = X * torch.rand(K, generator=g).mul(3).add(0.2)
    return X, (X.T @ X).double()


def output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    dW = (Wq - W).double()
    return float(((dW @ H) * dW).sum())


OPTIONS = [Option(bits=b, group_size=g, symmetric=s)
           for b in (2, 3, 4) for g in (64, None) for s in (False, True)]


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.label)
def test_gptq_output_error_at_most_rtn(opt):
    """Per seed GPTQ is never worse than RTN on the layer-output error; on average clearly better."""
    ratios = []
    for seed in range(3):
        _, H = correlated(512, 128, seed)
        W = torch.randn(32, 128, generator=torch.Generator().manual_seed(100 + seed))
        e_gptq = output_error(W, gptq(W, H, opt).dequantize(), H)
        e_rtn = output_error(W, rtn(W, opt).dequantize(), H)
        assert e_gptq <= e_rtn
        ratios.append(e_gptq / e_rtn)
    assert sum(ratios) / len(ratios) < 0.9


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
@pytest.mark.parametrize("opt", [Option(bits=3, group_size=128),
                                 Option(bits=2, group_size=64, symmetric=True),
                                 Option(bits=4, group_size=None)],
                         ids=lambda o: o.label)
def test_gptq_codes_in_range_and_dequantize_consistent(opt, act_order):
    """K = 576 with group 128: a short last group of 64; codes, scales and zeros have rtn's shapes."""
    _, H = correlated(2304, 576, 0)  # 4 tokens per input: a well-conditioned H, as in calibration
    W = torch.randn(24, 576, generator=torch.Generator().manual_seed(1))
    qw = gptq(W, H, opt, act_order=act_order, block_size=96)  # blocks that do not align with groups
    ref = rtn(W, opt)
    assert qw.q.shape == W.shape and qw.q.dtype == torch.int32
    assert qw.q.min() >= 0 and qw.q.max() < 2**opt.bits
    assert qw.scales.shape == ref.scales.shape and qw.scales.dtype == torch.float16
    if opt.symmetric:
        assert qw.zeros is None
    else:
        assert qw.zeros.shape == ref.zeros.shape and qw.zeros.min() >= 0 and qw.zeros.max() < 2**opt.bits
    g = torch.arange(576) // (opt.group_size or 576)
    z = 2 ** (opt.bits - 1) if opt.symmetric else qw.zeros[:, g].float()
    torch.testing.assert_close(qw.dequantize(), (qw.q.float() - z) * qw.scales[:, g].float(), rtol=0, atol=0)
    if opt.bits > 2 or act_order:
        # (2-bit symmetric in natural order can lose to RTN here: its grid {-2,-1,0,1}·s clips the
        # positive side, and the fed-back error piles up against the clip; the reference GPTQ does the same)
        assert output_error(W, qw.dequantize(), H) < output_error(W, ref.dequantize(), H)


def test_diagonal_hessian_gives_rtn():
    """Nothing spreads without correlation: GPTQ's codes, scales and zeros are exactly RTN's."""
    W = torch.randn(16, 576, generator=torch.Generator().manual_seed(2))
    H = torch.diag(torch.rand(576, generator=torch.Generator().manual_seed(3)) + 0.1)
    for opt in (Option(bits=3, group_size=128), Option(bits=2, group_size=64, symmetric=True)):
        for act_order in (False, True):
            a, b = gptq(W, H, opt, act_order=act_order), rtn(W, opt)
            assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales)


def test_clip_with_a_diagonal_hessian_gives_clipped_rtn():
    """GPTQ searches each group's range as RTN does, on the values the group has when it is reached: with
    nothing spreading they are the weights, and the result is `rtn(clip=True)`'s exactly."""
    W = torch.randn(16, 576, generator=torch.Generator().manual_seed(2))
    H = torch.diag(torch.rand(576, generator=torch.Generator().manual_seed(3)) + 0.1)
    for opt in (Option(bits=3, group_size=128), Option(bits=2, group_size=64, symmetric=True)):
        a, b = gptq(W, H, opt, clip=True), rtn(W, opt, clip=True)
        assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales)
        assert not torch.equal(b.scales, rtn(W, opt).scales)


@pytest.mark.parametrize("bits", [2, 3])
def test_clip_lowers_gptq_output_error_at_low_bits(bits):
    """On heavy-tailed weights GPTQ with the range search has a lower layer-output error than without."""
    _, H = correlated(512, 128, 8)
    torch.manual_seed(9)
    W = torch.distributions.StudentT(3.0).sample((64, 128))
    opt = Option(bits=bits, group_size=64)
    assert output_error(W, gptq(W, H, opt, clip=True).dequantize(), H) < \
        0.95 * output_error(W, gptq(W, H, opt).dequantize(), H)


def test_embedding_keeps_the_clip_setting():
    from bitplan.db.types import EMBED_ROLE, Module
    from bitplan.kernels.quantize import quantizer_for

    emb = Module(name="model.embed_tokens", shape=(100, 64), role=EMBED_ROLE)
    assert quantizer_for(emb, Quantizer(method="gptq", clip=True)) == Quantizer(clip=True)
    assert quantizer_for(emb, Quantizer(method="gptq")) == Quantizer()


def test_act_order_keeps_original_groups_and_helps_uneven_inputs():
    X, H = correlated(512, 256, 4)
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(5))
    opt = Option(bits=2, group_size=64)
    plain, ordered = gptq(W, H, opt, act_order=False), gptq(W, H, opt, act_order=True)
    assert ordered.scales.shape == plain.scales.shape == (32, 4)
    assert not torch.equal(plain.q, ordered.q)
    assert output_error(W, ordered.dequantize(), H) < output_error(W, rtn(W, opt).dequantize(), H)


def test_dead_inputs_are_zeroed():
    X, _ = correlated(300, 128, 6)
    X[:, [3, 70]] = 0  # inputs never seen in calibration
    H = (X.T @ X).double()
    W = torch.randn(8, 128, generator=torch.Generator().manual_seed(7))
    Wq = gptq(W, H, Option(bits=3, group_size=64)).dequantize()
    assert torch.all(Wq[:, [3, 70]] == 0) and torch.isfinite(Wq).all()


def test_quantize_dispatch():
    W = torch.randn(4, 64)
    assert torch.equal(quantize(W, Option(bits=4)).q, rtn(W, Option(bits=4)).q)
    assert torch.equal(quantize(W, Option(bits=4), Quantizer()).q, rtn(W, Option(bits=4)).q)
    with pytest.raises(ValueError, match="needs"):
        quantize(W, Option(bits=4), Quantizer(method="gptq"))
    H = torch.eye(64) + 0.1
    for text in ("gptq", "gptq:damp=0.05,block_size=16,act_order=false", "gptq:clip=true"):
        q = Quantizer.parse(text)
        assert torch.equal(quantize(W, Option(bits=4), q, H).q, gptq(W, H, Option(bits=4), **q.settings).q)
    assert torch.equal(quantize(W, Option(bits=2), Quantizer(clip=True)).scales,
                       rtn(W, Option(bits=2), clip=True).scales)
    assert not torch.equal(rtn(W, Option(bits=2), clip=True).scales, rtn(W, Option(bits=2)).scales)
    with pytest.raises(TypeError, match=r"quantizer must be a Quantizer \(e\.g\. Quantizer\.parse\('gptq'\)\)"):
        quantize(W, Option(bits=4), "gptq")


def reference_gptq(W: torch.Tensor, H: torch.Tensor, opt: Option, percdamp=0.01,
                   blocksize=128) -> torch.Tensor:
    """IST-DASLab/gptq `fasterquant` transcribed (group params from `W` at each group's first column), on
    rtn's grid; exact when groups align with blocks (the reference reads stale in-block columns otherwise)."""
    from bitplan.kernels.quantize import _codes, _grid

    W, H, K, gs = W.clone().float(), H.clone().double(), W.shape[1], opt.group_size
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Q = torch.zeros_like(W)
    H[range(K), range(K)] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if (i1 + i) % gs == 0:
                s, z = (t[:, 0] for t in _grid(W[:, i1 + i:i1 + i + gs].unsqueeze(1), opt))
            Q[:, i1 + i] = (_codes(w, s, z, opt.bits) - z) * s
            err1 = (w - Q[:, i1 + i]) / d
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


@pytest.mark.parametrize("opt", [Option(bits=3, group_size=128),
                                 Option(bits=2, group_size=64, symmetric=True)], ids=lambda o: o.label)
def test_matches_the_reference_implementation(opt):
    X, H = correlated(512, 128, 8)
    H = H.clone()
    H[5, :], H[:, 5] = 0, 0  # one dead input
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(9))
    want = reference_gptq(W, H, opt, blocksize=opt.group_size)
    got = gptq(W, H, opt, block_size=opt.group_size, act_order=False, damp=0.01).dequantize()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("opt", [Option(bits=3, group_size=64), Option(bits=2, group_size=None, symmetric=True)],
                         ids=lambda o: o.label)
def test_gptq_runs_where_the_weight_is(opt):
    """On a GPU weight GPTQ runs on the GPU (H is brought there) and gives the CPU's result: float rounding
    may move a few codes, never the layer-output error by more than a fraction of a percent."""
    _, H = correlated(512, 256, 7)
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(8))
    cpu, cuda = gptq(W, H, opt), gptq(W.cuda(), H, opt)
    assert cuda.q.device.type == "cuda"
    assert (cuda.q.cpu() == cpu.q).float().mean() > 0.99
    e_cpu, e_cuda = output_error(W, cpu.dequantize(), H), output_error(W, cuda.dequantize().cpu(), H)
    assert e_cuda == pytest.approx(e_cpu, rel=5e-3)


def test_h_counts_as_its_float32_values():
    """The profile streams H in float64, `apply` keeps it in float32: both must give the same codes (a float64
    GPTQ flips a few of them on rounding differences this small)."""
    X, _ = correlated(2048, 512, seed=5)
    H = X.double().T @ X.double()  # float64 sums, as the profile's streamed pass makes them
    assert not torch.equal(H, H.float().double())
    W = torch.randn(256, 512, generator=torch.Generator().manual_seed(6))
    a, b = gptq(W, H, Option(bits=2)), gptq(W, H.float(), Option(bits=2))
    assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
