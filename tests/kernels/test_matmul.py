"""The Triton kernel against the torch reference, on CPU through Triton's interpreter (no GPU in CI)."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run in numpy on CPU
triton = pytest.importorskip("triton")

from bitplan.kernels import reference  # noqa: E402
from bitplan.kernels.matmul import matmul  # noqa: E402

CASES = [  # (M, K, N, group): K = 576 is SmolLM2's hidden size, not a multiple of 128
    (1, 576, 40, 64), (3, 576, 24, 128), (17, 96, 33, 32), (1, 200, 16, 64),
]


def packed_weight(K, N, bits, group, symmetric, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = -(-K // group)
    q = torch.randint(0, 2**bits, (K, N), generator=g)
    scales = (torch.rand(G, N, generator=g) * 0.05 + 0.01).half()
    zeros = None if symmetric else torch.randint(0, 2**bits, (G, N), generator=g)
    return reference.pack(q, bits), scales, zeros


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}K{}N{}g{}".format(*c))
def test_matches_reference(case, bits, symmetric, dtype):
    M, K, N, group = case
    packed, scales, zeros = packed_weight(K, N, bits, group, symmetric)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    pz = None if zeros is None else reference.pack(zeros, bits)
    want = reference.matmul(x.float(), packed, scales, zeros, bits, group, K)
    got = matmul(x, packed, scales, pz, bits, group, K)
    assert got.dtype == dtype and got.shape == (M, N)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_split_k_sums_every_slice():
    K, N, bits, group = 576, 24, 4, 64
    packed, scales, zeros = packed_weight(K, N, bits, group, False)
    x = torch.randn(2, K).half()
    want = reference.matmul(x.float(), packed, scales, zeros, bits, group, K)
    for split in (1, 3, 9):
        got = matmul(x, packed, scales, reference.pack(zeros, bits), bits, group, K, config={"SPLIT_K": split})
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
