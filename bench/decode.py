"""Decode speed and memory of a quantized Llama-shaped model beside its bf16 twin, in one process, on a GPU.

Random weights serve for speed (the kernels do not look at values).  For each bit width the planned
linears are RTN-quantized and swapped for `QuantLinear` (the fused Triton kernels); the quantized
model's logits are checked against its bf16 twin (`executor.evaluate.dense_twin`: the same weights
dequantized, torch matmuls).  Measures greedy decode of 128 new tokens after a 512-token prompt at
batch 1 and 16, one token step captured in a CUDA graph (`executor.evaluate.decode_speed`), and peak
GPU memory, for the quantized model and the twin alternately (`executor.evaluate.speed_report`).

    python bench/decode.py                      # 16 layers of Llama-3-8B's shape, 4 and 2 bits
    python bench/decode.py --layers 32 --bits 4

Prints a table and writes JSON (`--out`, default bench/results/decode.json).  Each row also splits one
eager batch-1 decode step's GPU time (torch.profiler) between the linears (our kernels; cuBLAS in the
twin) and everything else (attention, norms, rotary, sampling): what a faster linear can still win.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import torch

from bitplan.db.types import Option
from bitplan.executor.evaluate import dense_twin, speed_report
from bitplan.executor.quant_linear import QuantLinear
from bitplan.kernels.quantize import quantize
from bitplan.profiler.model import planned_linears


def build(args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, vocab_size=args.vocab, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def quantize_all(model: torch.nn.Module, option: Option) -> None:
    for module, linear in planned_linears(model):
        qw = quantize(linear.weight.float(), option)
        ql = QuantLinear.from_quantized(qw, None if linear.bias is None else linear.bias.float())
        model.set_submodule(module.name, ql.to("cuda"))


LINEAR_KERNELS = ("_gemv_kernel", "_tiled_kernel", "_moe", "_dequant_kernel", "gemm", "nvjet", "cutlass", "xmma")


@torch.no_grad()
def step_breakdown(model: torch.nn.Module, vocab: int, prompt: int = 512) -> dict:
    """GPU microseconds of one eager decode step at batch 1 after `prompt` tokens: linears vs the rest."""
    from torch.profiler import ProfilerActivity, profile

    model.cuda()
    ids = torch.randint(0, vocab, (1, prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    out = model(ids, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(3):  # compile and tune outside the profile
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(token, past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
    split = {"linear_us": 0.0, "other_us": 0.0}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:  # a kernel (or memcpy/memset) on the GPU
            split["linear_us" if any(k in e.name for k in LINEAR_KERNELS) else "other_us"] += e.time_range.elapsed_us()
    model.cpu()
    torch.cuda.empty_cache()
    return split


COLUMNS = [("bits", "bits", "d"), ("batch", "batch", "d"), ("tok/s", "tokens_per_s", ".1f"),
           ("bf16 tok/s", "bf16_tokens_per_s", ".1f"), ("vs bf16", "speedup_vs_bf16", ".2f"),
           ("peak GiB", "peak_gib", ".2f"), ("bf16 GiB", "bf16_peak_gib", ".2f")]


def main(argv=None):
    ap = harness.parser("decode", __doc__, quick={"layers": 2, "bits": "4", "batches": "1"})
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/decode.py measures GPU decoding: run it on a machine with CUDA")
    meta = harness.metadata(args)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    probe = torch.randint(0, args.vocab, (1, 64), generator=torch.Generator().manual_seed(1)).cuda()
    for bits in [int(b) for b in args.bits.split(",")]:
        model = build(args)
        quantize_all(model, Option(bits=bits, group_size=args.group_size))
        twin = dense_twin(model)
        with torch.no_grad():
            got, want = model(probe).logits.float(), twin(probe).logits.float()
        rel = float((got - want).norm() / want.norm())
        step = {"model": step_breakdown(model, args.vocab), "bf16": step_breakdown(twin, args.vocab)}
        print(f"{bits} bits, one eager step at batch 1 (GPU us): linears {step['model']['linear_us']:.0f} + other "
              f"{step['model']['other_us']:.0f}; bf16 twin {step['bf16']['linear_us']:.0f} + "
              f"{step['bf16']['other_us']:.0f}", flush=True)
        del twin
        report = speed_report(model, batches)
        for b, r in report["batches"].items():
            rows.append(dict(bits=bits, batch=int(b), logits_rel_err_vs_bf16_twin=rel,
                             weights_gib=report["weights_gib"]["model"], bf16_weights_gib=report["weights_gib"]["bf16"],
                             tokens_per_s=r["model"]["decode_tokens_per_s"],
                             bf16_tokens_per_s=r["bf16"]["decode_tokens_per_s"], speedup_vs_bf16=r["speedup"],
                             peak_gib=r["model"]["peak_gib"], bf16_peak_gib=r["bf16"]["peak_gib"],
                             cuda_graph=r["model"]["cuda_graph"] and r["bf16"]["cuda_graph"], step_batch1_us=step))
            x = rows[-1]
            print(f"{bits} bits batch {b:>3}: {x['tokens_per_s']:8.1f} tok/s vs bf16 {x['bf16_tokens_per_s']:8.1f} "
                  f"(x{x['speedup_vs_bf16']:.2f})  peak {x['peak_gib']:.2f} vs {x['bf16_peak_gib']:.2f} GiB  "
                  f"graph {x['cuda_graph']}  logits vs bf16 twin {rel:.1e}", flush=True)
        del model
        torch.cuda.empty_cache()
    print(harness.table(rows, COLUMNS, title=""))
    harness.done(harness.write_result(args.out, {"rows": rows}, meta))


if __name__ == "__main__":
    main()
