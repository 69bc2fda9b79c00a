"""The skinny kernel (`kernels/skinny.py`: batch 2-16 on the tensor cores, codes in the order they lie in the
words) against the torch reference: on CPU through Triton's interpreter, on the GPU with `TRITON_INTERPRET=0`."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run in numpy on CPU
triton = pytest.importorskip("triton")

from bitplan.kernels import reference  # noqa: E402
from bitplan.kernels.matmul import matmul, skinny_fits  # noqa: E402

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"
CASES = [  # (M, K, N, group): per-channel at K = 576 (SmolLM2's hidden size: a K tail of part of a tile)
    (2, 256, 40, 128), (16, 576, 24, 576), (7, 384, 72, 128),
]


@pytest.fixture(autouse=True)
def _two_weight_copies(monkeypatch):
    """The tuner's cold copies (4x L2) are not needed for correctness (as in test_matmul.py)."""
    if DEVICE == "cuda":
        from bitplan.kernels import timing

        monkeypatch.setattr(timing, "copies_for", lambda nbytes, l2=None: 2)


def packed_weight(K, N, bits, group, symmetric, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (K, N), generator=g)
    scales = (torch.rand(-(-K // group), N, generator=g) * 0.05 + 0.01).half()
    zeros = None if symmetric else torch.randint(0, 2**bits, (-(-K // group), N), generator=g)
    return reference.pack(q, bits), scales, zeros


def run(x, packed, scales, zeros, bits, group, K, **kw):
    pz = None if zeros is None else [t.to(DEVICE) for t in reference.pack(zeros, bits)]
    return matmul(x.to(DEVICE), [t.to(DEVICE) for t in packed], scales.to(DEVICE), pz, bits, group, K,
                  regime="skinny", **kw).cpu()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}K{}N{}g{}".format(*c))
def test_skinny_matches_reference(case, bits, symmetric, dtype):
    M, K, N, group = case
    packed, scales, zeros = packed_weight(K, N, bits, group, symmetric)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = reference.matmul(x.float(), packed, scales, zeros, bits, group, K)
    got = run(x, packed, scales, zeros, bits, group, K)
    assert got.dtype == dtype and got.shape == (M, N)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


LARGE = {"BLOCK_M": 64, "BLOCK_N": 64, "SCALE_W": True}  # a large-batch tile (`skinny.large_configs`)


@pytest.mark.parametrize("config", [{"SPLIT_K": 1}, {"SPLIT_K": 3}, {"BLOCK_K": 256, "SPLIT_K": 2},
                                    {"BLOCK_N": 128}, {"XPERM": True, "SPLIT_K": 3}, dict(LARGE, SPLIT_K=1),
                                    dict(LARGE, BLOCK_K=256, SPLIT_K=2, XPERM=True)],
                         ids=["split1", "split3", "k256-split2", "n128", "xperm-split3", "scale_w",
                              "scale_w-k256-split2-xperm"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"{b}bit")
def test_skinny_exact_on_integers(bits, config, exact_problem):
    """To the last bit where every step is exact (activations in {-1, 0, 1}, power-of-two scales): every code
    position of every word meets its own activation (the dot's K order is the words' order, the activations
    gathered to match), split-K slices each counted once and the workspace left at zero (twice each)."""
    M, K, N, group = 5, 768, 40, 256
    x, packed, scales, zeros = exact_problem(M, K, N, bits, group)
    want = reference.matmul(x.float(), packed, scales, zeros, bits, group, K).half().float()
    for _ in range(2):
        got = run(x, packed, scales, zeros, bits, group, K, config=config)
        torch.testing.assert_close(got.float(), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"{b}bit")
def test_skinny_large_batch(bits, dtype):
    """Above 16 rows (SCALE_W tiles): several tiles of x's rows, the last one partly masked, a K tail, split-K."""
    M, K, N, group = 80, 640, 72, 128
    packed, scales, zeros = packed_weight(K, N, bits, group, False)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = reference.matmul(x.float(), packed, scales, zeros, bits, group, K)
    for xperm in (False, True):
        got = run(x, packed, scales, zeros, bits, group, K, config=dict(LARGE, SPLIT_K=2, XPERM=xperm))
        assert got.dtype == dtype and got.shape == (M, N)
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_skinny_fits():
    """Where the dispatcher offers the skinny kernel: 2-16 rows, 16-bit activations, groups of 128 rows or more."""
    assert skinny_fits(2, 4096, 128, torch.bfloat16) and skinny_fits(16, 576, 576, torch.float16)
    assert not skinny_fits(1, 4096, 128, torch.bfloat16) and not skinny_fits(17, 4096, 128, torch.bfloat16)
    assert not skinny_fits(4, 4096, 64, torch.bfloat16) and not skinny_fits(4, 4096, 128, torch.float32)
