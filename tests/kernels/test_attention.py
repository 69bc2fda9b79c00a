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


@pytest.mark.parametrize("has_mask", [True, False], ids=["mask", "no-mask"])
def test_compiles_for_hopper(has_mask):
    """Both kernels compile to sm_90 machine code, here without a GPU: what the interpreter accepts and the
    compiler does not (a plain global read in a kernel, say) fails here, not first on a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from bitplan.kernels import attention

    def jit(kernel):  # under TRITON_INTERPRET=1 the module holds interpreted functions
        return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)

    target = GPUTarget("cuda", 90, 32)
    ints = ("L", "KVH", "per_split", "sq_b", "sq_h", "sk_b", "sk_h", "sk_l", "sv_b", "sv_h", "sv_l", "sm_b", "sm_l")
    const = dict(G=4, D=128, ROWS=16, BLOCK_L=64, HAS_MASK=has_mask, DOT_FP32=False)
    sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*i1", "acc_ptr": "*fp32",
           "ml_ptr": "*fp32", "scale": "fp32", **{n: "i32" for n in ints}, **{k: "constexpr" for k in const}}
    triton.compile(ASTSource(jit(attention._decode_kernel), sig, const), target=target,
                   options=dict(num_warps=4, num_stages=2))
    const = dict(G=4, D=128, ROWS=16, SPLITS_P2=16)
    sig = {"acc_ptr": "*fp32", "ml_ptr": "*fp32", "out_ptr": "*bf16", "KVH": "i32", "SPLITS": "i32", "so_b": "i32",
           "so_h": "i32", **{k: "constexpr" for k in const}}
    triton.compile(ASTSource(jit(attention._combine_kernel), sig, const), target=target, options=dict(num_warps=4))
