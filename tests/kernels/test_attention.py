"""The decode attention kernel against its torch reference: on the CPU through Triton's interpreter, on
the GPU when run there with `TRITON_INTERPRET=0`."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from bitplan.kernels.attention import decode_attention, reference_attention  # noqa: E402

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"


def case(B, H, KVH, L, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    # the cache as transformers' static cache holds it, its head dimension contiguous
    k = torch.randn(B, KVH, L, D, generator=g).to(dtype)
    v = torch.randn(B, KVH, L, D, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("B,H,KVH,L,D,splits", [
    (1, 8, 2, 200, 64, 3),    # 4 query heads a key/value head, a cache of no whole blocks, three slices
    (2, 4, 4, 64, 32, 1),     # no grouping, one slice
    (3, 6, 2, 130, 16, 5),    # 3 heads a group (padded rows), more slices than filled blocks
    (2, 16, 2, 400, 128, 7),  # 8 heads a group: the slices combined in two chunks of 4, the last part-filled
])
def test_matches_reference_with_a_static_cache_mask(B, H, KVH, L, D, splits, dtype):
    """Each sequence has filled a different prefix of the cache (the rest masked out, as a static cache's
    unfilled end is); slices past the filled part, whole blocks of them, contribute nothing."""
    q, k, v = case(B, H, KVH, L, D, dtype)
    filled = torch.tensor([L // 3, L - 1, 17][:B])
    mask = (torch.arange(L)[None, :] < filled[:, None])[:, None, None, :]
    scale = D ** -0.5
    got = decode_attention(*(t.to(DEVICE) for t in (q, k, v, mask)), scale, splits=splits).cpu()
    want = reference_attention(q, k, v, mask, scale)
    assert got.shape == (B, 1, H, D) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_the_last_case_combines_its_slices_in_several_chunks():
    from bitplan.kernels.attention import combine_chunk

    assert combine_chunk(7, 8, 128) == 4


def test_additive_mask_and_none():
    """transformers' additive masks (0 where attended, the dtype's least value elsewhere) mean the same as
    boolean ones; no mask attends to every position."""
    q, k, v = case(1, 4, 2, 96, 32, torch.float16, seed=1)
    keep = (torch.arange(96) < 70)[None, None, None, :]
    additive = torch.zeros(1, 1, 1, 96, dtype=torch.float16).masked_fill(~keep, torch.finfo(torch.float16).min)
    scale = 0.2
    on = [t.to(DEVICE) for t in (q, k, v)]
    torch.testing.assert_close(decode_attention(*on, additive.to(DEVICE), scale, splits=2).cpu().float(),
                               reference_attention(q, k, v, keep, scale), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(decode_attention(*on, None, scale, splits=2).cpu().float(),
                               reference_attention(q, k, v, None, scale), rtol=2e-2, atol=2e-2)


def test_key_and_value_in_different_layouts():
    """The kernel loads a key block and its value block as one, one offset apart: a value cache laid out
    otherwise than the key cache (here held position-major) gives the same answer; and a cache whose key
    and value dtypes differ is refused."""
    q, k, v = case(1, 8, 2, 150, 32, torch.bfloat16, seed=2)
    v_other = v.transpose(1, 2).contiguous().transpose(1, 2)  # [B, KVH, L, D], held as [B, L, KVH, D]
    assert v_other.stride() != k.stride() and torch.equal(v_other, v)
    on = [t.to(DEVICE) for t in (q, k, v_other)]
    torch.testing.assert_close(decode_attention(*on, None, 0.25, splits=3).cpu().float(),
                               reference_attention(q, k, v, None, 0.25), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="one dtype"):
        decode_attention(on[0], on[1], on[2].half(), None, 0.25)


def test_back_to_back_calls_leave_the_counters_at_zero():
    """The slices of a head meet through a counter the last one resets: calls one after another, of other shapes,
    each get their own answer, and leave the shared counters (`matmul.workspace`) at zero."""
    from bitplan.kernels.matmul import workspace

    for seed, (B, H, KVH, L, D, splits) in enumerate([(2, 8, 2, 256, 32, 4), (1, 4, 4, 130, 16, 3),
                                                       (2, 8, 2, 256, 32, 4)]):
        q, k, v = case(B, H, KVH, L, D, torch.bfloat16, seed=seed)
        on = [t.to(DEVICE) for t in (q, k, v)]
        got = decode_attention(*on, None, 0.3, splits=splits).cpu().float()
        torch.testing.assert_close(got, reference_attention(q, k, v, None, 0.3), rtol=2e-2, atol=2e-2)
        assert not workspace(on[0].device, 0, B * KVH)[1].any()


@pytest.mark.parametrize("has_mask,splits,pdl", [(True, 16, False), (False, 16, False), (True, 1, False), (True, 16, True)],
                         ids=["mask", "no-mask", "one-split", "dependent-launch"])
def test_compiles_for_hopper(has_mask, splits, pdl, compile_for_hopper):
    """The kernel compiles to sm_90 machine code, here without a GPU (`conftest.compile_for_hopper`); with the
    pointers and strides aligned as a cache's are, a block's key and value loads are all issued before either
    is written to shared memory (one round trip to memory, not two)."""
    from bitplan.kernels import attention

    ints = ("L", "KVH", "per_split", "sq_b", "sq_h", "s_b", "s_h", "s_l", "sm_b", "sm_l", "so_b", "so_h")
    const = dict(G=4, D=128, ROWS=16, BLOCK_L=64, HAS_MASK=has_mask, DOT_FP32=False, SPLITS_P2=splits, GP2=4,
                 CHUNK=attention.combine_chunk(splits, 4, 128), PDL=pdl)
    sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_off": "i64", "mask_ptr": "*i1", "acc_ptr": "*fp32",
           "ml_ptr": "*fp32", "count_ptr": "*i32", "out_ptr": "*bf16", "scale": "fp32",
           **{n: "i32" for n in ints}, **{k: "constexpr" for k in const}}
    aligned = [n for n in sig if n.endswith("_ptr") or n in ("v_off", "sq_b", "sq_h", "s_b", "s_h", "s_l", "so_b")]
    ptx = compile_for_hopper(attention._decode_kernel, sig, const, aligned=aligned, num_warps=4, num_stages=2,
                             launch_pdl=pdl)["ptx"]
    body = ptx[ptx.index(".entry"):]
    lines = body.splitlines()
    query_stored = next(i for i, line in enumerate(lines) if "st.shared" in line)
    # after the query's loads and store, the block's 64 x 128 keys and values: 16 loads of 16 bytes a thread
    kv = [i for i, line in enumerate(lines) if "ld.global" in line and ".v4." in line and i > query_stored][:16]
    assert len(kv) == 16
    between = lines[kv[0]:kv[-1]]
    assert not [line for line in between if "st.shared" in line], "a shared-memory store waits between the loads"
    if pdl:  # the query and the cache are the kernel ahead's results: nothing is read before the wait
        assert "ld.global" not in body[:body.index("griddepcontrol.wait")]
