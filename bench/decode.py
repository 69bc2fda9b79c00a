"""Decode speed and memory of a quantized Llama-shaped model beside its bf16 twin, in one process, on a GPU.

Random weights serve for speed (the kernels do not look at values).  For each bit width the planned
linears are RTN-quantized and swapped for `QuantLinear` (the fused Triton kernels); the quantized
model's logits are checked against its bf16 twin (`executor.evaluate.dense_twin`: the same weights
dequantized, torch matmuls).  Measures greedy decode of 128 new tokens after a 512-token prompt at
batch 1 and 16, one token step captured in a CUDA graph (`executor.evaluate.decode_speed`), and peak
GPU memory, for the quantized model and the twin alternately (`executor.evaluate.speed_report`); with
`--compile on` the step of both models is `torch.compile`d before it is captured.  `--merge`, `--attention` and
`--pdl` take several values, each timed in the same process: sibling projections merged or not, the attention
kernel, and our kernels launched as programmatic dependents or not.

    python bench/decode.py                      # 16 layers of Llama-3-8B's shape, 4 and 2 bits
    python bench/decode.py --layers 32 --bits 4 --batches 1 --compile on
    python bench/decode.py --layers 8 --bits 4 --batches 1 --compile on --merge off,on --attention bitplan,sdpa
    python bench/decode.py --layers 32 --bits 4 --batches 1 --compile on --vocab 128256 --tie off  # its own head

Prints tables and writes JSON (`--out`, default bench/results/decode.json).  Where the step's time goes:
each kind of linear (`q_proj`, ..., the head) timed alone at batch 1 with cold weights beside the bf16
twin's and the floor for its bytes, and at each batch one eager step's GPU time (torch.profiler, on the
compiled step that is then captured) split between the linears (our kernels; cuBLAS in the twin), attention
and everything else, with its costliest kernels.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import itertools
import logging
import time

import torch

from bitplan.db.types import Option
from bitplan.executor.attention import use_decode_attention
from bitplan.executor.evaluate import dense_twin, speed_report
from bitplan.executor.fused import FusedProjection, fuse_projections
from bitplan.executor.quant_linear import QuantLinear, fuse_quantized_experts
from bitplan.kernels import matmul
from bitplan.kernels.moe import GEMV_MAX_ROWS
from bitplan.kernels.quantize import quantize
from bitplan.profiler.model import planned_linears
from bitplan.profiler.moe import unfuse_experts


EXPERT_WIDTHS = (2, 3, 4)  # --moe: expert e at EXPERT_WIDTHS[e % 3] bits, a mixed-width plan


def build(args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                 num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                 max_position_embeddings=4096, tie_word_embeddings=args.tie == "on")
    if args.moe:
        config, cls = MixtralConfig(num_local_experts=args.experts, num_experts_per_tok=2, **shape), MixtralForCausalLM
    else:
        config, cls = LlamaConfig(**shape), LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = cls(config).to(torch.bfloat16)
    if args.moe:
        unfuse_experts(model)  # one linear per expert projection, each with its own width
    return model.eval()


def set_attention(model: torch.nn.Module, name: str) -> None:
    """`bitplan`: kernels/attention.py for decode steps (`executor.attention`); else one of transformers'."""
    if name == "bitplan":
        use_decode_attention(model)
    else:
        model.set_attn_implementation(name)


def quantize_all(model: torch.nn.Module, option: Option) -> None:
    """Every planned linear at `option`, routed experts at `EXPERT_WIDTHS` by their index; experts fused for
    one launch per projection (`QuantExpertLinears`)."""
    for module, linear in planned_linears(model):
        opt = option if module.expert is None else \
            option.model_copy(update={"bits": EXPERT_WIDTHS[module.expert % len(EXPERT_WIDTHS)]})
        qw = quantize(linear.weight.float(), opt)
        ql = QuantLinear.from_quantized(qw, None if linear.bias is None else linear.bias.float())
        model.set_submodule(module.name, ql.to("cuda"))
    fuse_quantized_experts(model)


LINEAR_KERNELS = ("_gemv_kernel", "_tiled_kernel", "_skinny", "_moe", "_dequant_kernel", "gemm", "nvjet", "cutlass",
                  "xmma", "splitKreduce")
ATTENTION_KERNELS = ("attention", "flash", "fmha", "sdpa", "softmax", "_decode_kernel", "_combine_kernel")


def kernel_kind(name: str) -> str:
    if any(k in name for k in LINEAR_KERNELS):
        return "linear"
    return "attention" if any(k in name.lower() for k in ATTENTION_KERNELS) else "other"


def step_split(kernels: list[dict]) -> dict:
    """One eager step's GPU microseconds (`decode_speed`'s profile) split between the linears, attention
    and everything else, with its ten costliest kernels."""
    split = {"linear_us": 0.0, "attention_us": 0.0, "other_us": 0.0, "kernels": sum(k["calls"] for k in kernels)}
    for k in kernels:
        split[kernel_kind(k["kernel"]) + "_us"] += k["us"]
    split["top"] = [dict(k, kernel=k["kernel"][:120]) for k in kernels[:10]]
    return split


def linear_kinds(model: torch.nn.Module) -> dict[str, list[str]]:
    """The names of the linears a step calls, by kind: the last part of the name (`q_proj`), or the
    siblings' names joined for a merged linear (`k_proj+v_proj`, `executor.fused`)."""
    kinds: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        parent, _, child = name.rpartition(".")
        if isinstance(mod, FusedProjection):
            if mod.index == 0:
                siblings = [c for c, m in model.get_submodule(parent).named_children()
                            if isinstance(m, FusedProjection) and m.group is mod.group]
                kinds.setdefault("+".join(siblings), []).append(f"{name}.merged")
        elif isinstance(mod, (QuantLinear, torch.nn.Linear)) and child != "merged":
            kinds.setdefault(child, []).append(name)
    return kinds


@torch.no_grad()
def linear_breakdown(model: torch.nn.Module, twin: torch.nn.Module) -> list[dict]:
    """Batch-1 time of each kind of linear in the step (layer 0's `q_proj`, ..., the head), weights cold
    in L2 and in a CUDA graph (`kernels.timing.cold_time_us`), beside the bf16 twin's and the floor for
    its bytes: where the linears' share of the step goes, per shape."""
    import copy

    from bitplan.kernels.timing import cold_time_us, copies_for, floor_us

    rows = []
    layers = dict(model.named_modules())
    twins = dict(twin.named_modules())
    for kind, names in linear_kinds(model).items():
        rows_of_kind = {}
        for label, mods in (("ours", layers), ("bf16", twins)):
            mod = mods[names[0]].cuda()
            nbytes = sum(t.numel() * t.element_size() for t in list(mod.buffers()) + list(mod.parameters()))
            copies = [mod] + [copy.deepcopy(mod) for _ in range(copies_for(nbytes) - 1)]
            x = torch.randn(1, mod.in_features, device="cuda", dtype=torch.bfloat16)
            rows_of_kind[label] = (cold_time_us([lambda m=m: m(x) for m in copies]), nbytes)
            del copies
            mod.cpu()
            torch.cuda.empty_cache()
        rows.append(dict(kind=kind, count=len(names), n=layers[names[0]].out_features, k=layers[names[0]].in_features,
                         us=rows_of_kind["ours"][0], bf16_us=rows_of_kind["bf16"][0],
                         floor_us=floor_us(rows_of_kind["ours"][1]), bytes=rows_of_kind["ours"][1]))
    return rows


COLUMNS = [("bits", "bits", "d"), ("merged", "merged", "<"), ("attention", "attention", "<"),
           ("compile", "compile", "<"), ("pdl", "pdl", "<"), ("batch", "batch", "d"), ("tok/s", "tokens_per_s", ".1f"),
           ("bf16 tok/s", "bf16_tokens_per_s", ".1f"), ("vs bf16", "speedup_vs_bf16", ".2f"),
           ("peak GiB", "peak_gib", ".2f"), ("bf16 GiB", "bf16_peak_gib", ".2f")]

LINEAR_COLUMNS = [("merged", "merged", "<"), ("kind", "kind", "<"), ("count", "count", "d"), ("out", "n", "d"),
                  ("in", "k", "d"), ("us", "us", ".1f"), ("floor us", "floor_us", ".1f"), ("bf16 us", "bf16_us", ".1f")]


def main(argv=None):
    ap = harness.parser("decode", __doc__, quick={"layers": 2, "bits": "4", "batches": "1"})
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tie", choices=("on", "off"), default="on",
                    help="on: the head shares the embedding and stays bf16 in both models; off: an untied head, "
                         "quantized like the other linears (Llama-3-8B's own: --vocab 128256 --tie off)")
    ap.add_argument("--moe", action="store_true",
                    help="Mixtral's shape: --experts routed experts a layer, 2 a token, at 2, 3 and 4 bits by index "
                         "(--bits: the attention's)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--attention", default="sdpa",
                    help="bitplan (kernels/attention.py at decode time) or one of transformers' attention "
                         "implementations (sdpa, flex_attention, ...), both models; several, comma-separated, "
                         "each timed")
    ap.add_argument("--compile", default="off,on",
                    help="off, on or off,on: the step as eager PyTorch, torch.compiled, or each (both models alike)")
    ap.add_argument("--merge", default="on",
                    help="off, on or off,on: sibling projections (q, k, v; gate, up) merged into one linear "
                         "(executor/fused.py), both models alike")
    ap.add_argument("--pdl", default="off",
                    help="off, wait, prefetch, or several comma-separated: our kernels launched as programmatic "
                         "dependents (BITPLAN_PDL, kernels/matmul.py's `pdl`; Hopper and later), each timed in the "
                         "same process")
    args = ap.parse_args(argv)
    modes, merges = (switches(ap, name, getattr(args, name)) for name in ("compile", "merge"))
    pdls = [p.strip() for p in args.pdl.split(",")]
    if unknown := [p for p in pdls if p not in matmul.PDL_MODES]:
        ap.error(f"--pdl: unknown {', '.join(unknown)}; choose among {', '.join(matmul.PDL_MODES)}")
    attentions = [a.strip() for a in args.attention.split(",")]
    from transformers import AttentionInterface

    known = {"bitplan", "eager", *AttentionInterface().valid_keys()}
    if unknown := [a for a in attentions if a not in known]:
        ap.error(f"--attention: unknown {', '.join(unknown)}; choose among {', '.join(sorted(known))}")
    if not torch.cuda.is_available():
        raise SystemExit("bench/decode.py measures GPU decoding: run it on a machine with CUDA")
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # decode_speed's progress, model by model
    torch._dynamo.config.recompile_limit = 64  # one compiled step per model, merging and attention: each a guard
    meta = harness.metadata(args)
    batches = [int(b) for b in args.batches.split(",")]
    rows, linears = [], {}
    # MoE: as many tokens as one mixed-width launch takes rows an expert (a token's two experts differ), so each
    # projection is one launch, tuned once; with more, each expert's row count would be tuned on its own
    tokens = GEMV_MAX_ROWS if args.moe else 64
    probe = torch.randint(0, args.vocab, (1, tokens), generator=torch.Generator().manual_seed(1)).cuda()
    for bits in [int(b) for b in args.bits.split(",")]:
        model = build(args)
        quantize_all(model, Option(bits=bits, group_size=args.group_size))
        twin = dense_twin(model)
        with torch.no_grad():
            got, want = model(probe).logits.float(), twin(probe).logits.float()
        rel = float((got - want).norm() / want.norm())
        print(f"[{elapsed()}] {bits} bits: built, quantized and twinned", flush=True)
        model.cpu()
        twin.cpu()
        linears[bits] = []
        for merge in merges:  # unmerged first: merging is done in place
            if merge == "on":
                for m in (model, twin):
                    fuse_projections(m.cuda(), probe[:, :4])
                    m.cpu()
            if not args.moe:  # a MoE twin's experts are one fused module, no linear to time beside each of ours
                linears[bits] += [dict(r, merged=merge) for r in linear_breakdown(model, twin)]
            for attention, mode, launch in itertools.product(attentions, modes, pdls):
                for m in (model, twin):
                    set_attention(m, attention)
                matmul.PDL_MODE = launch  # read at each launch, so at each capture
                report = speed_report(model, batches, compile=mode == "on", merge=False, twin=twin, kernels=True)
                case = dict(bits=bits, merged=merge, attention=attention, compile=mode, pdl=launch)
                for b, r in report["batches"].items():
                    step = {who: step_split(r[who]["kernels"]) for who in ("model", "bf16")}
                    rows.append(dict(case, batch=int(b), logits_rel_err_vs_bf16_twin=rel,
                                     weights_gib=report["weights_gib"]["model"],
                                     bf16_weights_gib=report["weights_gib"]["bf16"],
                                     tokens_per_s=r["model"]["decode_tokens_per_s"],
                                     bf16_tokens_per_s=r["bf16"]["decode_tokens_per_s"], speedup_vs_bf16=r["speedup"],
                                     peak_gib=r["model"]["peak_gib"], bf16_peak_gib=r["bf16"]["peak_gib"],
                                     cuda_graph=r["model"]["cuda_graph"] and r["bf16"]["cuda_graph"],
                                     step_us=step))
                    for who, x in step.items():
                        print(f"[{elapsed()}] {case} batch {b}, {who}: one eager step, GPU us: linears "
                              f"{x['linear_us']:.0f} + attention {x['attention_us']:.0f} + other {x['other_us']:.0f} "
                              f"in {x['kernels']} kernels", flush=True)
                    x = rows[-1]
                    print(f"[{elapsed()}] {case} batch {b:>3}: {x['tokens_per_s']:8.1f} tok/s "
                          f"vs bf16 {x['bf16_tokens_per_s']:8.1f} "
                          f"(x{x['speedup_vs_bf16']:.2f})  peak {x['peak_gib']:.2f} vs {x['bf16_peak_gib']:.2f} GiB  "
                          f"graph {x['cuda_graph']}  logits vs bf16 twin {rel:.1e}", flush=True)
                model.cpu()
                harness.write_result(args.out, {"rows": rows, "linears": linears}, meta)  # a cut-short run keeps these
        if linears[bits]:
            print(harness.table(linears[bits], LINEAR_COLUMNS,
                                title=f"{bits} bits: one linear of each kind, batch 1, cold weights"))
        del model, twin
        torch.cuda.empty_cache()
    print(harness.table(rows, COLUMNS, title=""))
    harness.done(harness.write_result(args.out, {"rows": rows, "linears": linears, "tuned": tuned_configs()}, meta))


def elapsed(start=time.perf_counter()) -> str:
    """Minutes and seconds since the bench started, for its progress lines."""
    m, s = divmod(int(time.perf_counter() - start), 60)
    return f"{m}:{s:02d}"


def tuned_configs() -> list[dict]:
    """The configuration the dispatcher's tuner chose for each product the steps ran (`matmul._TUNED`)."""
    from bitplan.kernels.matmul import _TUNED

    names = ("regime", "rows", "n", "k", "bits", "group", "symmetric")
    return [dict(zip(names, key), config=cfg) for key, cfg in _TUNED.items()]


def switches(ap, name: str, value: str) -> list[str]:
    """`--NAME off`, `on` or `off,on` as a list, or the parser's one-line error."""
    out = [v.strip() for v in value.split(",")]
    if not out or any(v not in ("off", "on") for v in out) or len(set(out)) < len(out):
        ap.error(f"--{name} takes off, on or off,on; got {value!r}")
    return sorted(out)  # "off" first


if __name__ == "__main__":
    main()
