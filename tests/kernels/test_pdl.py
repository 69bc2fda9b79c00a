"""Programmatic dependent launch (`kernels/matmul.py`'s `pdl`): a gemv or attention program that starts while
the kernel ahead of it drains must read nothing that kernel writes before its `griddepcontrol.wait`.  The
ordering is checked in the sm_90 assembly on the CPU (`test_matmul.py`, `test_attention.py`), and here on a
Hopper GPU by a graph of kernels each reading the one before."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from bitplan.kernels import matmul as mm  # noqa: E402
from bitplan.kernels import reference  # noqa: E402
from bitplan.kernels.attention import decode_attention, reference_attention  # noqa: E402

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"
HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9


def test_no_dependent_launch_unless_asked_and_on_hopper(monkeypatch):
    monkeypatch.setattr(mm, "PDL_MODE", "off")
    assert mm.pdl(torch.device(DEVICE)) == 0
    for mode in ("wait", "prefetch"):
        monkeypatch.setattr(mm, "PDL_MODE", mode)
        # never under the interpreter, which runs no PTX
        assert mm.pdl(torch.device(DEVICE)) == (mm.PDL_MODES.index(mode) if HOPPER else 0)
    monkeypatch.setattr(mm, "PDL_MODE", "on")
    with pytest.raises(ValueError, match="BITPLAN_PDL='on': choose one of off, wait, prefetch"):
        mm.pdl(torch.device(DEVICE))


@pytest.mark.skipif(not HOPPER, reason="programmatic dependent launch needs a Hopper GPU")
@pytest.mark.parametrize("mode", ["wait", "prefetch"])
def test_a_graph_of_dependent_launches_reads_each_result_after_it_is_written(monkeypatch, mode):
    monkeypatch.setattr(mm, "PDL_MODE", mode)
    H, KVH, D, L, bits, group = 32, 8, 128, 700, 4, 128
    K = H * D
    g = torch.Generator().manual_seed(0)
    weights = []
    for i in range(4):
        q = torch.randint(0, 2**bits, (K, K), generator=g)
        scales = (torch.rand(K // group, K, generator=g) * 0.02 + 0.002).half()
        weights.append(([t.cuda() for t in reference.pack(q, bits)], scales.cuda()))
    key = torch.randn(1, KVH, L, D, generator=g).to(torch.bfloat16).cuda()
    value = torch.randn(1, KVH, L, D, generator=g).to(torch.bfloat16).cuda()
    x = torch.randn(1, K, generator=g).to(torch.bfloat16).cuda()

    def chain():
        outs, h = [], x
        for packed, scales in weights:  # attention then a gemv of its output, as the o projection reads it
            a = decode_attention(h.view(1, H, 1, D), key, value, None, D ** -0.5).view(1, K)
            h = mm.matmul(a, packed, scales, None, bits, group, K)
            outs += [a, h]
        return outs

    chain()  # tuned and compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain()
    graph.replay()
    torch.cuda.synchronize()
    h = x
    for i, (packed, scales) in enumerate(weights):
        a, y = outs[2 * i], outs[2 * i + 1]
        want_a = reference_attention(h.view(1, H, 1, D), key, value, None, D ** -0.5).reshape(1, K)
        torch.testing.assert_close(a.float(), want_a, rtol=2e-2, atol=2e-2)
        want_y = reference.matmul(a.float().cpu(), [t.cpu() for t in packed], scales.cpu(), None, bits, group, K)
        torch.testing.assert_close(y.float().cpu(), want_y, rtol=2e-2, atol=2e-2 * want_y.abs().max().item())
        h = y
