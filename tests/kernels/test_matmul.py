"""The Triton kernels against the torch reference: on CPU through Triton's interpreter (CI has no GPU),
on the GPU when run there with `TRITON_INTERPRET=0`."""

import os
import re

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run in numpy on CPU
triton = pytest.importorskip("triton")

from bitplan.kernels import reference  # noqa: E402
from bitplan.kernels.matmul import matmul  # noqa: E402

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"
CASES = [  # (M, K, N, group): K = 576 is SmolLM2's hidden size, not a multiple of 128
    (1, 576, 40, 64), (3, 576, 24, 128), (17, 96, 33, 32), (1, 200, 16, 64),
]


@pytest.fixture(autouse=True)
def _two_weight_copies(monkeypatch):
    """On the GPU the tuner times each candidate over copies of the weights that exceed 4x L2: for these
    weights of a few KB, tens of thousands of launches a candidate.  Correctness needs only some choice."""
    if DEVICE == "cuda":
        from bitplan.kernels import timing

        monkeypatch.setattr(timing, "copies_for", lambda nbytes, l2=None: 2)


def packed_weight(K, N, bits, group, symmetric, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = -(-K // group)
    q = torch.randint(0, 2**bits, (K, N), generator=g)
    scales = (torch.rand(G, N, generator=g) * 0.05 + 0.01).half()
    zeros = None if symmetric else torch.randint(0, 2**bits, (G, N), generator=g)
    return reference.pack(q, bits), scales, zeros


def run(x, packed, scales, zeros, bits, group, K, **kw):
    """The kernel on DEVICE, result back on the CPU."""
    pz = None if zeros is None else [t.to(DEVICE) for t in reference.pack(zeros, bits)]
    got = matmul(x.to(DEVICE), [t.to(DEVICE) for t in packed], scales.to(DEVICE), pz, bits, group, K, **kw)
    return got.cpu()


def check(got, want):
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}K{}N{}g{}".format(*c))
@pytest.mark.parametrize("regime", ["gemv", "tiled"])
def test_matches_reference(case, bits, symmetric, dtype, regime):
    M, K, N, group = case
    packed, scales, zeros = packed_weight(K, N, bits, group, symmetric)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = reference.matmul(x.float(), packed, scales, zeros, bits, group, K)
    got = run(x, packed, scales, zeros, bits, group, K, regime=regime)
    assert got.dtype == dtype and got.shape == (M, N)
    check(got, want)


@pytest.mark.parametrize("regime", ["gemv", "tiled"])
@pytest.mark.parametrize("bits", [3, 4])
def test_split_k_sums_every_slice(regime, bits):
    K, N, group = 576, 24, 64
    packed, scales, zeros = packed_weight(K, N, bits, group, False)
    x = torch.randn(2, K).half()
    want = reference.matmul(x.float(), packed, scales, zeros, bits, group, K)
    for split in (1, 2, 3, 3):  # twice 3: split-K leaves its workspace and counters at zero for the next call
        check(run(x, packed, scales, zeros, bits, group, K, regime=regime, config={"SPLIT_K": split}), want)


@pytest.mark.parametrize("variant", [{"GATHER": True}, {"SCALE_W": True}, {"SCALE_W": True, "BLOCK_K": 32},
                                     {"SCALE_W": True, "BLOCK_K": 64}], ids=["gather", "scale_w", "scale_w-k32",
                                                                         "scale_w-k64"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("group", [32, 64])
def test_tiled_variants(bits, group, variant):
    """The tiled kernel's other ways give the same product: one word load per K row (`GATHER`), scale and zero
    applied to the weight tile before an accumulating dot (`SCALE_W`; with tiles smaller than the group too)."""
    M, K, N = 5, 200, 24
    packed, scales, zeros = packed_weight(K, N, bits, group, False, seed=3)
    x = torch.randn(M, K).half()
    want = reference.matmul(x.float(), packed, scales, zeros, bits, group, K)
    check(run(x, packed, scales, zeros, bits, group, K, regime="tiled", config=variant), want)


@pytest.mark.parametrize("K", [256, 200])
@pytest.mark.parametrize("M", [1, 16, 33])
def test_dispatcher_and_per_channel_group(M, K):
    """Default path (no regime, no config): per-channel scales (group = K, also a K of no whole tiles) and a
    batch on each side of 16."""
    N, bits = 48, 4
    packed, scales, zeros = packed_weight(K, N, bits, K, False)
    x = torch.randn(M, 2, K).half()[:, 0]  # a non-contiguous view, as a sliced activation would be
    want = reference.matmul(x.float(), packed, scales, zeros, bits, K, K)
    check(run(x, packed, scales, zeros, bits, K, K), want)


def test_three_dim_input_keeps_leading_dims():
    K, N, bits, group = 96, 16, 2, 32
    packed, scales, zeros = packed_weight(K, N, bits, group, True)
    x = torch.randn(2, 3, K).half()
    got = run(x, packed, scales, zeros, bits, group, K)
    assert got.shape == (2, 3, N)
    check(got, reference.matmul(x.float(), packed, scales, zeros, bits, group, K))


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_operator_for_torch_compile(symmetric):
    """`quant_matmul`, the operator `QuantLinear` calls, passes torch's operator checks (its schema, and a
    fake implementation whose output matches the real one's shape, dtype and strides), and a compiled
    function around it traces whole (no graph break) and gives what the eager dispatcher gives."""
    from bitplan.kernels.matmul import quant_matmul

    K, N, bits, group = 96, 24, 3, 32
    packed, scales, zeros = packed_weight(K, N, bits, group, symmetric)
    pz = [] if zeros is None else [t.to(DEVICE) for t in reference.pack(zeros, bits)]
    args = (torch.randn(2, 1, K).half().to(DEVICE), [t.to(DEVICE) for t in packed], scales.to(DEVICE), pz, bits,
            group, K)
    torch.library.opcheck(quant_matmul, args, test_utils=("test_schema", "test_faketensor"))

    def block(x, *rest):
        return torch.nn.functional.silu(quant_matmul(x, *rest)) * 2

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), block(*args))
    check(compiled(*args).cpu(), 2 * torch.nn.functional.silu(reference.matmul(args[0].cpu().float(), packed, scales,
                                                                              zeros, bits, group, K)))


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"{b}bit")
def test_dequantize_then_matmul(bits, symmetric):
    """The large-batch candidate: the weight dequantized in one launch (equal to the reference's, to the
    rounding of the output dtype), then a dense matmul."""
    from bitplan.kernels.matmul import dequantize

    M, K, N, group = 3, 200, 40, 64
    packed, scales, zeros = packed_weight(K, N, bits, group, symmetric, seed=4)
    pz = None if zeros is None else [t.to(DEVICE) for t in reference.pack(zeros, bits)]
    q = [t.to(DEVICE) for t in packed]
    z = pz or [scales.to(DEVICE)]
    got = dequantize(q[0], q[-1], scales.to(DEVICE), z[0], z[-1], K, bits, group, symmetric, torch.float32)
    want = reference.dequantize(packed, scales, zeros, bits, group, K)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
    x = torch.randn(M, K).half()
    check(run(x, packed, scales, zeros, bits, group, K, regime="tiled", config={"DEQUANT": True}),
          reference.matmul(x.float(), packed, scales, zeros, bits, group, K))


@pytest.mark.parametrize("half2", [True, False], ids=["half2", "fp32"])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("K,block_k", [(256, 64), (200, 32), (224, 64)], ids=["K256", "K200", "K224-tail"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"{b}bit")
def test_gemv_exact_on_integers(bits, K, block_k, M, half2, exact_problem):
    """Both gemv bodies give the reference to the last bit where every step is exact: activations in
    {-1, 0, 1}, power-of-two scales.  So every code position of every word is read from the right bits (the
    HALF2 body pairs K rows i and P/2 + i of a word, and permutes the bytes of 3 bits' 1-bit word to match),
    its fp16 partial sums included; K tails of part of a word (200) and of part of a tile (224) too.  The
    exact sum is rounded once, to the output's fp16, on both sides."""
    N, group = 24, 64
    x, packed, scales, zeros = exact_problem(M, K, N, bits, group)
    want = reference.matmul(x.float(), packed, scales, zeros, bits, group, K)
    got = run(x, packed, scales, zeros, bits, group, K, regime="gemv",
              config={"HALF2": half2, "BLOCK_K": block_k, "SPLIT_K": 2})
    torch.testing.assert_close(got.float(), want.half().float(), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gemv_half2_large_activations(bits):
    """fp16 partial sums: activations of a few hundred (outlier features) stay inside fp16's range, because
    the HALF2 body sums x·(c - center)/16 and takes the zero off in fp32."""
    K, N, group = 256, 16, 128
    packed, scales, zeros = packed_weight(K, N, bits, group, False, seed=5)
    x = (torch.randn(1, K, generator=torch.Generator().manual_seed(6)) * 300).half()
    want = reference.matmul(x.float(), packed, scales, zeros, bits, group, K)
    check(run(x, packed, scales, zeros, bits, group, K, regime="gemv", config={"HALF2": True}), want)


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"{b}bit")
def test_every_gemv_candidate_is_exact(bits, exact_problem, monkeypatch):
    """Every configuration the tuner may choose at batch 1 gives the reference to the last bit: the tuner keeps
    the fastest it times and never looks at the answer.  On the GPU each binary the candidates compile to runs
    (how many programs an SM only sets a runtime split); under the interpreter, where tile widths and warps mean
    little, the narrowest tile of each kind: K block, body, split-K or not."""
    from bitplan.kernels import matmul as mm

    monkeypatch.setattr(mm, "HALF2_ENABLED", True)  # its candidates too, under the interpreter
    M, K, N, group = 1, 256, 80, 128
    x, packed, scales, zeros = exact_problem(M, K, N, bits, group)
    want = reference.matmul(x.float(), packed, scales, zeros, bits, group, K).half().float()
    sms = mm._sm_count(torch.device(DEVICE)) if DEVICE == "cuda" else 1  # one SM: split-K 1 among the candidates
    candidates, kinds = [], set()
    for cfg in sorted(mm.gemv_configs(M, N, K, bits, group, sms), key=lambda c: c["BLOCK_N"]):
        kind = (cfg["BLOCK_K"], cfg["HALF2"], cfg["SPLIT_K"] > 1)
        if DEVICE == "cuda":
            kind += (cfg["BLOCK_N"], cfg["num_warps"])
        if kind not in kinds:
            kinds.add(kind)
            candidates.append(cfg)
    assert DEVICE == "cuda" or {k[2] for k in kinds} == {True, False}  # split-K and whole-K programs both run
    for cfg in candidates:
        got = run(x, packed, scales, zeros, bits, group, K, regime="gemv", config=cfg)
        torch.testing.assert_close(got.float(), want, rtol=0, atol=0, msg=lambda m, cfg=cfg: f"{cfg}: {m}")


@pytest.mark.parametrize("bits,half2,tile,pdl", [(4, True, (1024, 4), 0), (4, True, (256, 2), 0),
                                                 (3, True, (1024, 4), 0), (3, False, (512, 4), 0),
                                                 (8, False, (512, 4), 0), (4, False, (1024, 8), 1),
                                                 (4, True, (1024, 8), 2), (3, True, (1024, 8), 2)],
                         ids=["4bit-half2", "4bit-half2-narrow", "3bit-half2", "3bit", "8bit", "4bit-dependent",
                              "4bit-dependent-prefetch", "3bit-dependent-prefetch"])
def test_gemv_compiles_for_hopper(bits, half2, tile, pdl, compile_for_hopper):
    """The gemv kernel as a GPU launches it, split-K included, compiled to sm_90 machine code without a GPU: its
    bodies' inline PTX (the HALF2 one's packed fp16 instructions) is checked by the assembler here.  Launched as a
    programmatic dependent (`mm.pdl`), a program may start while the kernel ahead drains: before its
    `griddepcontrol.wait` it may only prefetch weights, and only in the "prefetch" mode."""
    from bitplan.kernels import matmul as mm

    widths = reference.shards(bits)
    const = dict(GROUP=128, W0=widths[0], W1=widths[1] if len(widths) > 1 else 0, SYMMETRIC=False, BLOCK_M=1,
                 BLOCK_N=tile[0], BLOCK_K=64, ATOMIC=True, EVEN_K=True, HALF2=half2, PDL=pdl)
    ptrs = dict(x_ptr="*bf16", q0_ptr="*i32", q1_ptr="*i32", s_ptr="*fp16", z0_ptr="*i32", z1_ptr="*i32",
                y_ptr="*bf16", ws_ptr="*fp32", count_ptr="*i32")
    ints = ("M", "N", "K", "SPLIT_K", "stride_xm", "stride_q0", "stride_q1", "stride_s", "stride_z0", "stride_z1",
            "stride_ym")
    sig = {**ptrs, **{n: "i32" for n in ints}, **{k: "constexpr" for k in const}}
    asm = compile_for_hopper(mm._gemv_kernel, sig, const, num_warps=tile[1], num_stages=1, launch_pdl=pdl)
    assert ("fma.rn.f16x2" in asm["ptx"]) == half2
    body = asm["ptx"][asm["ptx"].index(".entry"):]
    assert ("griddepcontrol.wait" in body) == bool(pdl)
    if pdl:
        before = body[:body.index("griddepcontrol.wait")]
        assert "griddepcontrol.launch_dependents" in before
        prefetches = len(widths) + 1 if mm.PDL_MODES[pdl] == "prefetch" else 0  # each shard's words, the scales
        assert len(re.findall(r"prefetch\.global\.L2", before)) == prefetches
        # no load, store or atomic before the wait: x, y and the split-K workspace may be the kernel ahead's
        assert not re.search(r"\b(ld|st|atom|red)\.global", before)
