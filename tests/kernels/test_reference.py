import pytest
import torch

from bitplan.kernels import reference

WIDTHS = sorted(reference.SHARDS)


@pytest.mark.parametrize("bits", WIDTHS, ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("K,N", [(576, 24), (33, 7), (1, 1), (64, 3)], ids=lambda s: str(s))
def test_pack_roundtrip(bits, K, N):
    g = torch.Generator().manual_seed(bits * 1000 + K)
    q = torch.randint(0, 2**bits, (K, N), generator=g)
    packed = reference.pack(q, bits)
    assert [t.dtype for t in packed] == [torch.int32] * len(reference.shards(bits))
    assert [t.shape for t in packed] == [(reference.padded(K) * w // 32, N) for w in reference.shards(bits)]
    assert torch.equal(reference.unpack(packed, bits, K), q.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"{b}bit")
def test_pack_is_gptq_layout(bits):
    """2/4/8-bit words hold row k at bit offset (k % (32/b)) * b, as GPTQ's qweight does."""
    per = 32 // bits
    q = torch.randint(0, 2**bits, (64, 5))
    word = reference.pack(q, bits)[0].to(torch.int64) & 0xFFFFFFFF
    for k in range(64):
        assert torch.equal((word[k // per] >> ((k % per) * bits)) & (2**bits - 1), q[k])


def test_three_bit_shards_are_msb_first():
    """3 bits = a 2-bit plane of the high bits and a 1-bit plane of the low bit; no word straddling."""
    q = (torch.arange(32) % 8).view(32, 1)
    hi, lo = (t.to(torch.int64) & 0xFFFFFFFF for t in reference.pack(q, 3))
    assert hi.shape == (2, 1) and lo.shape == (1, 1)
    for k in range(32):
        assert (hi[k // 16, 0] >> (2 * (k % 16))) & 3 == q[k, 0] >> 1
        assert (lo[0, 0] >> k) & 1 == q[k, 0] & 1


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        reference.pack(torch.tensor([[4]]), 2)


@pytest.mark.parametrize("bits", WIDTHS, ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_and_matmul_match_unpacked_float(bits, group_size):
    K, N = 576, 40  # 576 is not a multiple of 128: the last group is short
    G = -(-K // group_size)
    q = torch.randint(0, 2**bits, (K, N))
    scales = (torch.rand(G, N) * 0.1 + 0.01).half()
    zeros = torch.randint(0, 2**bits, (G, N))
    W = torch.empty(K, N)
    for k in range(0, K, group_size):
        g = k // group_size
        W[k:k + group_size] = (q[k:k + group_size] - zeros[g]) * scales[g].float()
    packed, pz = reference.pack(q, bits), reference.unpack(reference.pack(zeros, bits), bits, G)
    assert torch.equal(reference.dequantize(packed, scales, pz, bits, group_size, K), W)
    x = torch.randn(3, K)
    torch.testing.assert_close(reference.matmul(x, packed, scales, pz, bits, group_size, K), x @ W)
