"""Memory of the statistics one MoE block's streamed pass keeps: measured on a scaled-down DeepSeek-V3 block.

Builds a one-block DeepSeek-V3 (transformers' `DeepseekV3ForCausalLM`, random weights) with its widths
divided by `--scale` and its 256 routed experts, 8 active, kept; runs `stream_blocks` over `--tokens`
random tokens with an `on_block` that reads every planned linear's `H` once, as the error table does;
twice: with the default statistics budget (routed experts' inputs in memory) and with budget 0 (all of
them on disk).  Peak RSS (`VmHWM`, reset before each pass) above the RSS before it is set against

    statistics ≈ 8 · Σ_dense K²  +  4 · Σ_routed inputs min(r, K) · K  +  8 · K_routed,max²

dense linears' float64 `H`, each routed expert input (gate and up share one) kept as its `r` routed rows
or, from `K` rows on, as a float32 `H`, and the one routed `H` made at a time when read (float64).  Each
pass runs in a child process of its own, so memory one pass freed cannot hide the next one's.  The pass's activations and the block's forward temporaries come on top.  Beside it: the float64
`H` per planned linear that every routed linear would take (`8 · Σ K²`), and the same formula for a
full-size DeepSeek-V3 MoE block and a Mixtral-8x7B block at `--tokens`, routing spread evenly.  Prints
a table and writes `bench/results/moe_statistics.json`.

    python bench/moe_statistics.py [--scale 4] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

GiB = 2**30
# (hidden, moe intermediate, routed experts, active, dense planned linears' input widths)
FULL = {
    # MLA: q_a and kv_a read the hidden state, q_b the q latent, kv_b the kv latent, o the heads' values;
    # the shared expert's gate, up (hidden) and down (its intermediate)
    "DeepSeek-V3": (7168, 2048, 256, 8, [7168, 7168, 1536, 512, 16384, 7168, 7168, 2048]),
    "Mixtral-8x7B": (4096, 14336, 8, 2, [4096] * 4),  # q, k, v, o
}


def formula(hidden: int, inter: int, routed_rows: list[int], dense: list[int]) -> dict:
    """Bytes of each term; `routed_rows` the rows each expert received (its gate/up input and its down
    input see the same tokens)."""
    dense_H = 8 * sum(k * k for k in dense)
    routed = 4 * sum(min(r, hidden) * hidden + min(r, inter) * inter for r in routed_rows)
    read = 8 * max(hidden, inter) ** 2 if routed_rows else 0
    per_linear = 8 * len(routed_rows) * (2 * hidden ** 2 + inter ** 2)
    return {"dense_H": dense_H, "routed_inputs": routed, "one_read_H": read, "total": dense_H + routed + read,
            "float64_H_per_routed_linear": per_linear}


def build(scale: int, vocab: int):
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from bitplan.profiler.moe import unfuse_experts

    d = 7168 // scale
    cfg = DeepseekV3Config(vocab_size=vocab, hidden_size=d, intermediate_size=18432 // scale,
                           moe_intermediate_size=2048 // scale, n_routed_experts=256, num_experts_per_tok=8,
                           n_shared_experts=1, n_group=8, topk_group=4, num_hidden_layers=1,
                           first_k_dense_replace=0, num_attention_heads=128 // scale,
                           num_key_value_heads=128 // scale, q_lora_rank=1536 // scale, kv_lora_rank=512 // scale,
                           qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).eval()
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)  # decisive routing with uneven loads, as trained
    unfuse_experts(model)
    return model


def one_pass(args) -> dict:
    """Stream the block once with statistics budget `args.budget` (-1: the default); its peak and routing."""
    import torch

    from bitplan.profiler.model import planned_linears
    from bitplan.profiler.moe import record_routing
    from bitplan.profiler.stream import stream_blocks

    torch.set_num_threads(2)
    model = build(args.scale, 32000)
    planned = planned_linears(model)
    n = args.tokens // args.seq_len
    batches = torch.randint(0, 32000, (n, args.seq_len), generator=torch.Generator().manual_seed(0))

    def on_block(_i, mods, H, _n):
        for m, _ in mods:
            H[m.name].sum()  # made, read, dropped: what the error table does with it

    harness.reset_peak()
    before = harness.rss()
    t = time.perf_counter()
    with record_routing(model) as records:
        stream_blocks(model, batches, planned, on_block, progress=False,
                      statistics_budget=None if args.budget < 0 else args.budget)
    return {"seconds": time.perf_counter() - t, "before": before, "peak_above": harness.rss("VmHWM") - before,
            "tokens": int(batches.numel()), "routed_rows": [int(r) for r in next(iter(records.values())).tokens]}


def main(argv=None) -> int:
    ap = harness.parser("moe_statistics", __doc__, quick={"scale": 16, "tokens": 256})
    ap.add_argument("--scale", type=int, default=4, help="divide DeepSeek-V3's widths by this (default 4)")
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens (default 2048)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--budget", type=int, help=argparse.SUPPRESS)  # a child's one pass: -1 the default budget
    args = ap.parse_args(argv)

    if args.budget is not None:  # a child: one pass, its figures as one JSON line
        print(json.dumps(one_pass(args)))
        return 0
    from bitplan.profiler.model import planned_linears

    meta = harness.metadata(args)
    rows = []
    for label, budget in (("in memory", -1), ("on disk (budget 0)", 0)):
        child = subprocess.run([sys.executable, __file__, "--budget", str(budget), "--scale", str(args.scale),
                                "--tokens", str(args.tokens), "--seq-len", str(args.seq_len)],
                               capture_output=True, text=True, check=True)
        rows.append({"pass": label, **json.loads(child.stdout.strip().splitlines()[-1])})
    model = build(args.scale, 32000)
    planned = planned_linears(model)
    routed_rows = rows[0]["routed_rows"]
    cfg = model.config
    mla = [cfg.hidden_size, cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank,
           cfg.num_attention_heads * cfg.v_head_dim, cfg.hidden_size, cfg.hidden_size, cfg.moe_intermediate_size]
    dense_k = [lin.in_features for m, lin in planned if m.expert is None and m.layer is not None]
    assert sorted(dense_k) == sorted(mla), (dense_k, mla)
    scaled = formula(cfg.hidden_size, cfg.moe_intermediate_size, routed_rows, dense_k)
    no_routed = formula(cfg.hidden_size, cfg.moe_intermediate_size, [], dense_k)
    rows[0]["formula"] = scaled["total"]
    rows[1]["formula"] = no_routed["dense_H"] + scaled["one_read_H"]
    for r in rows:
        r["peak_gib"], r["formula_gib"] = r["peak_above"] / GiB, r["formula"] / GiB
    title = (f"one DeepSeek-V3 block / {args.scale}: hidden {cfg.hidden_size}, 256 experts of {cfg.moe_intermediate_size}, "
             f"8 active, {rows[0]['tokens']} tokens (routed rows per expert {min(routed_rows)}-{max(routed_rows)})")
    print(harness.table(rows, [("pass", "pass", "<"), ("time s", "seconds", ".1f"),
                               ("peak above before GiB", "peak_gib", ".3f"), ("formula GiB", "formula_gib", ".3f")],
                        title=title))
    print(f"float64 H for every routed linear instead: {scaled['float64_H_per_routed_linear'] / GiB:.2f} GiB")
    full = {}
    for name, (hidden, inter, experts, active, dense) in FULL.items():
        share = [args.tokens * active // experts] * experts
        full[name] = formula(hidden, inter, share, dense)
    print(harness.table([{"model": k, **{t: v / GiB for t, v in f.items()}} for k, f in full.items()],
                        [("full-size block", "model", "<"), ("dense H GiB", "dense_H", ".2f"),
                         ("routed inputs GiB", "routed_inputs", ".2f"), ("one read H GiB", "one_read_H", ".2f"),
                         ("total GiB", "total", ".2f"),
                         ("float64 H per routed linear GiB", "float64_H_per_routed_linear", ".1f")],
                        title=f"the formula at {args.tokens} tokens, routing spread evenly"))
    path = harness.write_result(args.out, {"scaled": {"scale": args.scale, "hidden": cfg.hidden_size,
                                                      "moe_intermediate": cfg.moe_intermediate_size,
                                                      "tokens": rows[0]["tokens"], "routed_rows": routed_rows,
                                                      "formula": scaled},
                                           "rows": rows, "full_size": full}, meta)
    harness.done(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
