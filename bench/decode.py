"""Decode speed and memory of a quantized Llama-shaped model beside its bf16 original, in one process, on a GPU.

Random weights serve for speed (the kernels do not look at values).  For each bit width the planned
linears are RTN-quantized and swapped for `QuantLinear` (the fused Triton kernels); the GPU logits are
checked against the same quantized model's CPU reference path on a short input.  Measures greedy decode
of 128 new tokens after a 512-token prompt at batch 1 and 16 (Hugging Face `generate`, eager: at batch 1
the per-token launch overhead of eager PyTorch is part of what is measured) and peak GPU memory.

    python bench/decode.py                      # Llama-3.2-1B-shaped model, 4 and 2 bits
    python bench/decode.py --hidden 4096 --layers 8 --intermediate 14336 --bits 4
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from bitplan.db.types import Option
from bitplan.executor.evaluate import decode_speed
from bitplan.executor.quant_linear import QuantLinear
from bitplan.executor.quantize import quantize
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--output", default="bench/results/decode.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/decode.py measures GPU decoding: run it on a machine with CUDA")
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    probe = torch.randint(0, args.vocab, (1, 64), generator=torch.Generator().manual_seed(1))
    for bits in [16] + [int(b) for b in args.bits.split(",")]:
        model = build(args)
        if bits < 16:
            quantize_all(model, Option(bits=bits, group_size=args.group_size))
            gpu = model(probe.cuda()).logits.float().cpu()
            cpu = model.to("cpu")(probe).logits.float()  # QuantLinear's CPU path: the torch reference
            model.to("cuda")
            rel = float((gpu - cpu).norm() / cpu.norm())
        else:
            rel = 0.0
        weights = sum(b.numel() * b.element_size() for b in model.state_dict().values()) / 2**30
        for batch in batches:
            r = decode_speed(model, batch)
            rows.append(dict(bits=bits, weights_gib=weights, logits_rel_err_vs_cpu=rel, **r))
            print(f"{bits:>2} bits batch {batch:>3}: {r['decode_tokens_per_s']:8.1f} tok/s  prefill "
                  f"{r['prefill_s'] * 1e3:7.1f} ms  peak {r['peak_gib']:.2f} GiB  weights {weights:.2f} GiB  "
                  f"logits vs CPU reference {rel:.1e}", flush=True)
        del model
        torch.cuda.empty_cache()
    base = {r["batch"]: r["decode_tokens_per_s"] for r in rows if r["bits"] == 16}
    for r in rows:
        r["speedup_vs_bf16"] = r["decode_tokens_per_s"] / base[r["batch"]]
    print(f"\n{'bits':>4} {'batch':>5} {'tok/s':>8} {'vs bf16':>7} {'peak GiB':>8}")
    for r in rows:
        print(f"{r['bits']:>4} {r['batch']:>5} {r['decode_tokens_per_s']:>8.1f} {r['speedup_vs_bf16']:>7.2f} "
              f"{r['peak_gib']:>8.2f}")
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version(),
                config={k: v for k, v in vars(args).items() if k != "output"})
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
