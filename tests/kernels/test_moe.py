"""The mixed-width MoE launch against the per-expert torch reference (interpreter on CPU, or the GPU)."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from bitplan.kernels import reference  # noqa: E402
from bitplan.kernels.moe import ExpertWeights, moe_matmul, route  # noqa: E402

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"


@pytest.fixture(autouse=True)
def _two_weight_copies(monkeypatch):
    """On the GPU the tuner times each candidate over copies of the weights that exceed 4x L2: for these
    weights of a few KB, tens of thousands of launches a candidate.  Correctness needs only some choice."""
    if DEVICE == "cuda":
        from bitplan.kernels import timing

        monkeypatch.setattr(timing, "copies_for", lambda nbytes, l2=None: 2)


def experts(bits_list, K, N, group, symmetric, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = -(-K // group)
    out, raw = [], []
    for bits in bits_list:
        q = torch.randint(0, 2**bits, (K, N), generator=g)
        scales = (torch.rand(G, N, generator=g) * 0.05 + 0.01).half()
        zeros = None if symmetric else torch.randint(0, 2**bits, (G, N), generator=g)
        packed = reference.pack(q, bits)
        out.append(([t.to(DEVICE) for t in packed], scales.to(DEVICE),
                    None if zeros is None else [t.to(DEVICE) for t in reference.pack(zeros, bits)], bits))
        raw.append((packed, scales, zeros, bits))
    return ExpertWeights.pack(out, K, group), raw


def reference_rows(x, raw, seg_expert, seg_start, K, group):
    y = torch.zeros(x.shape[0], raw[0][1].shape[1])
    for e, a, b in zip(seg_expert.tolist(), seg_start[:-1].tolist(), seg_start[1:].tolist()):
        packed, scales, zeros, bits = raw[e]
        y[a:b] = reference.matmul(x[a:b].float(), packed, scales, zeros, bits, group, K)
    return y


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mixed_widths_in_one_launch(symmetric, dtype):
    K, N, group = 576, 40, 64  # K not a multiple of 128, N not of the tile
    w, raw = experts([2, 3, 4, 8, 4, 2], K, N, group, symmetric)
    top_k = torch.tensor([[0, 3], [1, 5], [3, 2], [0, 1], [3, 4]])  # 5 tokens, top-2; expert 3 gets three rows
    order, seg_expert, seg_start = route(top_k, 6)
    assert seg_expert.tolist() == [0, 1, 2, 3, 4, 5] and seg_start.tolist() == [0, 2, 4, 5, 8, 9, 10]
    tokens = torch.randn(5, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    x = tokens[order // 2]
    want = reference_rows(x, raw, seg_expert, seg_start, K, group)
    got = moe_matmul(x.to(DEVICE), w, seg_expert.to(DEVICE), seg_start.to(DEVICE), config={"BLOCK_M": 2}).cpu()
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("split", [1, 3])
def test_split_k_and_segments_longer_than_a_block(split):
    K, N, group = 256, 24, 32
    w, raw = experts([4, 3], K, N, group, False, seed=2)
    seg_expert, seg_start = torch.tensor([1, 0]), torch.tensor([0, 7, 9])  # 7 rows: two BLOCK_M=4 steps
    x = torch.randn(9, K, generator=torch.Generator().manual_seed(3)).half()
    want = reference_rows(x, raw, seg_expert, seg_start, K, group)
    for _ in range(2):  # split-K leaves its workspace and counters at zero: a second call sums afresh
        got = moe_matmul(x.to(DEVICE), w, seg_expert.to(DEVICE), seg_start.to(DEVICE), config={"SPLIT_K": split}).cpu()
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_many_rows_per_expert_take_the_dense_kernel():
    K, N, group = 128, 16, 32
    w, raw = experts([2, 8], K, N, group, True, seed=4)
    seg_expert, seg_start = torch.tensor([0, 1]), torch.tensor([0, 20, 23])
    x = torch.randn(23, K, generator=torch.Generator().manual_seed(5)).half()
    want = reference_rows(x, raw, seg_expert, seg_start, K, group)
    got = moe_matmul(x.to(DEVICE), w, seg_expert.to(DEVICE), seg_start.to(DEVICE)).cpu()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_pack_rejects_mixed_shapes_and_views_round_trip():
    K, N, group = 64, 8, 32
    w, raw = experts([3, 4], K, N, group, False)
    q, z = w.expert(0)
    assert [t.shape for t in q] == [t.shape for t in raw[0][0]]
    assert all(torch.equal(a.cpu(), b) for a, b in zip(q, raw[0][0]))
    assert torch.equal(reference.unpack([t.cpu() for t in z], 3, 2), raw[0][2].to(torch.int32))
    w2, _ = experts([4], K, 16, group, False)
    with pytest.raises(ValueError, match="share"):
        ExpertWeights.pack([(w.expert(0)[0], w.scales[0], w.expert(0)[1], 3),
                            (w2.expert(0)[0], w2.scales[0], w2.expert(0)[1], 4)], K, group)


def test_decode_step_one_row_per_expert():
    """Batch 1, top-3: each active expert sees one row, so the launch holds one row per program; expert 1,
    chosen by no slot, gets no segment (three slots, three segments)."""
    K, N, group = 192, 24, 64
    w, raw = experts([8, 2, 3, 4], K, N, group, False, seed=6)
    order, seg_expert, seg_start = route(torch.tensor([[3, 0, 2]]), 4)
    assert seg_expert.tolist() == [0, 2, 3] and seg_start.tolist() == [0, 1, 2, 3]
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(7)).half()[order // 3]
    want = reference_rows(x, raw, seg_expert, seg_start, K, group)
    got = moe_matmul(x.to(DEVICE), w, seg_expert.to(DEVICE), seg_start.to(DEVICE), max_rows=1).cpu()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_routing_shapes_are_static_and_masked_slots_fall_outside_every_segment():
    """min(E, slots) segments whatever the routing (so a decode step can be captured in a CUDA graph), the
    busy experts' first; slots whose index is E or more sort after the last segment, and the launch leaves
    their rows alone."""
    K, N, group = 128, 16, 32
    w, raw = experts([3, 2, 4, 8, 4], K, N, group, False, seed=8)
    top_k = torch.tensor([[2, 5], [0, 2], [7, 0]])  # 5 and 7 masked out; experts 1, 3 and 4 idle
    order, seg_expert, seg_start = route(top_k, 5)
    assert seg_expert.tolist() == [0, 2, 1, 3, 4] and seg_start.tolist() == [0, 2, 4, 4, 4, 4]
    assert top_k.reshape(-1)[order].tolist() == [0, 0, 2, 2, 5, 7]
    same_shapes = route(torch.tensor([[1, 1], [1, 1], [1, 1]]), 5)
    assert [t.shape for t in same_shapes] == [t.shape for t in (order, seg_expert, seg_start)]
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(9)).half()[order // 2]
    want = reference_rows(x, raw, seg_expert, seg_start, K, group)
    got = moe_matmul(x.to(DEVICE), w, seg_expert.to(DEVICE), seg_start.to(DEVICE), max_rows=3).cpu()
    torch.testing.assert_close(got[:4].float(), want[:4], rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_split_k_is_sized_for_the_segments_that_can_hold_rows(monkeypatch):
    """A batch-1 top-2 step over 8 experts is routed into 2 segments; given all 8 segments (6 of them
    empty), 2 rows still fill at most 2, so both get the split, and the tuned configuration, of 2 segments:
    sized for 8, the two busy experts would get a quarter of the programs."""
    from bitplan.kernels import moe

    K, N, group = 4096, 1024, 128
    launched = []
    monkeypatch.setattr(moe, "_TUNED", {})
    monkeypatch.setattr(moe, "_sm_count", lambda device: 132)
    monkeypatch.setattr(moe, "_launch", lambda x, w, seg_expert, seg_start, rows, cfg: launched.append(cfg))
    one = torch.zeros(1, dtype=torch.int32)
    w = ExpertWeights(one, one, torch.zeros(8, K // group, N, dtype=torch.float16), None, None,
                      torch.zeros(8, 6, dtype=torch.int64), [], [4, 2] * 4, N, K, group)
    x = torch.zeros(2, K, dtype=torch.float16)
    _, seg_expert, seg_start = route(torch.tensor([[6, 1]]), 8)
    assert seg_expert.tolist() == [1, 6] and seg_start.tolist() == [0, 1, 2]
    moe_matmul(x, w, seg_expert, seg_start, max_rows=1)
    moe_matmul(x, w, torch.arange(8), torch.tensor([0, 0, 1, 1, 1, 1, 1, 2, 2]), max_rows=1)
    two = moe.moe_configs(2, N, K, group, 132, 1)[0]["SPLIT_K"]
    assert [c["SPLIT_K"] for c in launched] == [two, two]
    assert two > moe.moe_configs(8, N, K, group, 132, 1)[0]["SPLIT_K"]
    assert len(moe._TUNED) == 1  # one key for both
