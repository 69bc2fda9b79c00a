"""Per-block profiling rates of large models' blocks, and the wall time they predict per GPU count.

For each model shape, one decoder block of it with random weights (float32, as `load_model` loads by
default; a vocabulary of 32,000 and a tied head, which are not timed) is profiled the way `bitplan
profile --estimator hessian` profiles each block of a streamed model, on `--device`:

- **pass**: the block moved to the device and run over `--tokens` calibration tokens, its planned
  matrices' `H` collected (`stream_blocks`): what the driver does, one block after another;
- **table**: every planned matrix's error row at every option with RTN (`error_table`, minus the pass):
  the part a Ray cluster spreads over its workers, one task per matrix;
- **GPTQ**: GPTQ of one matrix of each shape at 4 bits, timed, times the block's matrices of that shape
  and its quantized options: what `--quantizer gptq` adds to the table's part.

An MoE block is built with `--experts` of its routed experts (its shapes unchanged) and its routed part
scaled to the full count: routed matrices are timed apart from the rest, so the routed share of the
table is per matrix.  The expected wall time of a whole profile on `G` GPUs is
`blocks × (pass + (table + GPTQ) / G)`: the pass stays in the driver, the modules spread (ideal
spreading, no transfer cost; a lower bound).  Prints a table and writes `bench/results/block_rates.json`.

    python bench/block_rates.py [--models llama-3-70b,mixtral-8x7b,deepseek-v3] [--device cuda]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

# the config of one block of each model (transformers' names), its block count, routed experts
MODELS = {
    "llama-3-70b": dict(kind="llama", blocks=80, experts=None, config=dict(
        hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)),
    "mixtral-8x7b": dict(kind="mixtral", blocks=32, experts=8, config=dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2)),
    "deepseek-v3": dict(kind="deepseek_v3", blocks=58, experts=256, config=dict(  # its MoE blocks
        hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
        num_experts_per_tok=8, n_shared_experts=1, n_group=8, topk_group=4, first_k_dense_replace=0,
        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)),
}
SCALED = {"llama-3-70b": 8, "mixtral-8x7b": 8, "deepseek-v3": 16}  # --quick divides the widths by these


def build(name: str, experts: int | None, quick: bool):
    """One block of model `name`, float32 random weights, with `experts` routed experts (MoE)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bitplan.profiler.moe import unfuse_experts

    spec = MODELS[name]
    cfg = dict(spec["config"])
    if quick:
        s = SCALED[name]
        for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "q_lora_rank", "kv_lora_rank",
                    "num_attention_heads", "num_key_value_heads"):
            if key in cfg:
                cfg[key] //= s
    if experts is not None:
        cfg["num_local_experts" if spec["kind"] == "mixtral" else "n_routed_experts"] = experts
        if spec["kind"] == "deepseek_v3":
            cfg["n_group"], cfg["topk_group"] = 1, 1  # group-limited routing needs experts a multiple of 8 groups
    config = AutoConfig.for_model(spec["kind"], vocab_size=32000, num_hidden_layers=1, tie_word_embeddings=True,
                                  max_position_embeddings=4096, **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    unfuse_experts(model)
    return model


def rates(name: str, args) -> dict:
    import torch

    from bitplan.db.types import Quantizer, parse_options
    from bitplan.kernels.quantize import gptq
    from bitplan.profiler.model import planned_linears
    from bitplan.profiler.profile import error_table
    from bitplan.profiler.stream import stream_blocks

    spec = MODELS[name]
    experts = None if spec["experts"] is None else min(args.experts, spec["experts"])
    model = build(name, experts, args.quick)
    planned = [(m, lin) for m, lin in planned_linears(model) if m.layer is not None]
    routed = [(m, lin) for m, lin in planned if m.expert is not None]
    dense = [(m, lin) for m, lin in planned if m.expert is None]
    options = parse_options(args.options, args.group_size)
    batches = torch.randint(0, 32000, (args.tokens // args.seq_len, args.seq_len),
                            generator=torch.Generator().manual_seed(0))
    dev = args.device

    def timed(fn) -> float:
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(lambda: stream_blocks(model, batches[:1], planned, lambda *_: None, dev, False))  # warm-up
    t_pass = timed(lambda: stream_blocks(model, batches, planned, lambda *_: None, dev, False))
    rtn = Quantizer.parse("rtn")
    t_dense = timed(lambda: error_table(model, dense, options, batches, "hessian", rtn, dev, False)) - t_pass
    t_routed = (timed(lambda: error_table(model, routed, options, batches, "hessian", rtn, dev, False)) - t_pass
                if routed else 0.0)
    scale = 1.0 if not routed else spec["experts"] / experts
    # GPTQ: one matrix of each shape at 4 bits, times how many of that shape the full block has and its options
    quantized = [o for o in options if o.quantized]
    four = next(o for o in quantized if o.bits == 4)
    t_gptq, counts = 0.0, {}
    for m, lin in planned:
        counts[tuple(lin.weight.shape)] = counts.get(tuple(lin.weight.shape), 0) + (scale if m.expert is not None else 1)
    shapes = {}
    X = torch.randn(args.tokens, 256, device=dev, dtype=torch.float64)
    gptq(torch.randn(256, 256, device=dev), X.T @ X, four)  # warm-up: the kernels' first launches
    for shape, n in counts.items():
        W = torch.randn(*shape, device=dev)
        X = torch.randn(args.tokens, shape[1], device=dev, dtype=torch.float64)
        H = X.T @ X
        shapes[str(shape)] = {"count": n, "seconds": timed(lambda: gptq(W, H, four))}
        t_gptq += shapes[str(shape)]["seconds"] * n * len(quantized)
    table = t_dense + t_routed * scale
    row = {"model": name, "blocks": spec["blocks"], "matrices": len(dense) + round(len(routed) * scale),
           "experts_built": experts, "pass_s": t_pass, "table_s": table, "gptq_s": t_gptq,
           "dense_table_s": t_dense, "routed_table_s_built": t_routed, "gptq_per_shape": shapes}
    for g in args.gpus:
        row[f"rtn_{g}"] = spec["blocks"] * (t_pass + table / g)
        row[f"gptq_{g}"] = spec["blocks"] * (t_pass + (table + t_gptq) / g)
    return row


def main(argv=None) -> int:
    ap = harness.parser("block_rates", __doc__, quick={"device": "cpu", "tokens": 256, "seq_len": 128,
                                                        "experts": 8})
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {','.join(MODELS)}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--options", default="2,3,4,8", help="bit widths (default 2,3,4,8)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--experts", type=int, default=32,
                    help="routed experts built per MoE block (default 32; at least as many as are active)")
    ap.add_argument("--gpus", default="1,2,4,8", help="GPU counts to predict the wall time for")
    args = ap.parse_args(argv)
    args.gpus = [int(g) for g in args.gpus.split(",")]
    import torch

    torch.set_num_threads(min(16, torch.get_num_threads()))
    meta = harness.metadata(args)
    rows = []
    for name in args.models.split(","):
        if name not in MODELS:
            ap.error(f"unknown model {name!r}: one of {', '.join(MODELS)}")
        rows.append(rates(name, args))
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(f"  {name}: pass {rows[-1]['pass_s']:.2f} s, table {rows[-1]['table_s']:.2f} s, "
              f"GPTQ {rows[-1]['gptq_s']:.2f} s a block", file=sys.stderr, flush=True)
        harness.write_result(args.out, {"rows": rows}, meta)
    hours = [(f"{g} GPU{'s' if g > 1 else ''} RTN / GPTQ h", lambda r, g=g: f"{r[f'rtn_{g}'] / 3600:.2f} / "
              f"{r[f'gptq_{g}'] / 3600:.2f}", "") for g in args.gpus]
    print(harness.table(rows, [("model", "model", "<"), ("blocks", "blocks", "d"), ("matrices", "matrices", "d"),
                               ("pass s", "pass_s", ".2f"), ("table s", "table_s", ".2f"),
                               ("GPTQ s", "gptq_s", ".1f"), *hours],
                        title=f"one block, {args.tokens} tokens, options {args.options} g{args.group_size}, "
                              f"{args.device}; wall time = blocks x (pass + (table + GPTQ) / GPUs)"))
    harness.done(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
