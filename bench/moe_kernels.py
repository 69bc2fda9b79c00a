"""Mixed-width MoE in one launch against a uniform launch of the same bytes, per-expert launches and the floor.

For one projection of one MoE layer at decode (each active expert gets one token row at batch 1, a few
at batch 16): the time of `kernels.moe.moe_matmul` over the active experts at mixed bit widths, beside
the same launch with every expert at one width of the same total bytes (2+4 mixed vs 3 uniform), a
loop of one dense kernel launch per expert (what an engine without the MoE kernel does), and the
read-only floor streaming the same bytes; weights cold in L2, everything inside CUDA graphs
(`kernels/timing.py`), in one process.

    python bench/moe_kernels.py                 # DeepSeek-V3 and Mixtral experts, batch 1 and 16

Prints a table and writes JSON (`--out`, default bench/results/moe_kernels.json), after every layer and batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import torch

from bitplan.kernels.matmul import matmul
from bitplan.kernels.moe import ExpertWeights, moe_matmul, route
from bitplan.kernels.timing import cold_time_us, copies_for, floor_us, random_packed

LAYERS = {  # name: (experts, top-k, N, K) of one projection W [N, K]
    "deepseek-v3.gate": (256, 8, 2048, 7168),
    "deepseek-v3.down": (256, 8, 7168, 2048),
    "mixtral.w1": (8, 2, 14336, 4096),
    "mixtral.w2": (8, 2, 4096, 14336),
}
MIXES = {"2+4 mixed": [2, 4], "3 uniform": [3], "2,3,4,8 mixed": [2, 3, 4, 8], "4 uniform": [4]}


def expert_pack(widths: list[int], N: int, K: int, group: int) -> ExpertWeights:
    return ExpertWeights.pack([(*random_packed(N, K, bits, group), bits) for bits in widths], K, group)


def nbytes(w: ExpertWeights) -> int:
    return sum(t.numel() * t.element_size() for t in (w.q0, w.q1, w.scales, w.z0, w.z1))


def run(layers, batches, group, save) -> list[dict]:
    rows = []
    for name in layers:
        E, top_k, N, K = LAYERS[name]
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            top = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(batch)]).cuda()
            # the active experts only, renumbered 0..active-1: the inactive ones are never read
            seg_start = torch.unique_consecutive(route(top, E)[2])  # route's empty segments dropped
            active = seg_start.numel() - 1
            local = torch.arange(active, device="cuda")
            x = torch.randn(batch * top_k, K, device="cuda", dtype=torch.bfloat16)
            max_rows = int((seg_start[1:] - seg_start[:-1]).max())
            times = {}
            for mix, cycle in MIXES.items():
                widths = [cycle[i % len(cycle)] for i in range(active)]
                one = expert_pack(widths, N, K, group)
                copies = [one] + [ExpertWeights(one.q0.clone(), one.q1.clone(), one.scales.clone(), one.z0.clone(),
                                                one.z1.clone(), one.table, one.rows, one.bits, N, K, group)
                                  for _ in range(copies_for(nbytes(one)) - 1)]
                times[mix] = cold_time_us([lambda w=w: moe_matmul(x, w, local, seg_start, max_rows=max_rows)
                                           for w in copies])
                segs = list(zip(range(active), seg_start[:-1].tolist(), seg_start[1:].tolist()))

                def per_expert(w):
                    for e, a, b in segs:
                        q, z = w.expert(e)
                        matmul(x[a:b], q, w.scales[e], z, w.bits[e], group, K)

                times[mix + ", launch per expert"] = cold_time_us([lambda w=w: per_expert(w) for w in copies])
                times[mix + ", floor"] = floor_us(nbytes(one))
                del copies
            w_bf16 = [[torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(active)]
                      for _ in range(copies_for(active * N * K * 2))]
            segs = list(zip(range(active), seg_start[:-1].tolist(), seg_start[1:].tolist()))
            times["bf16, launch per expert"] = cold_time_us(
                [lambda ws=ws: [torch.nn.functional.linear(x[a:b], ws[e]) for e, a, b in segs] for ws in w_bf16])
            del w_bf16
            torch.cuda.empty_cache()
            row = dict(layer=name, experts=E, top_k=top_k, N=N, K=K, batch=batch, active=active, times_us=times,
                       mixed_vs_uniform=times["2+4 mixed"] / times["3 uniform"],
                       floor_over_mixed=times["2+4 mixed, floor"] / times["2+4 mixed"],
                       per_expert_over_one_launch=times["2+4 mixed, launch per expert"] / times["2+4 mixed"],
                       bf16_over_mixed=times["bf16, launch per expert"] / times["2+4 mixed"])
            rows.append(row)
            print(f"{name:>17} b={batch:<3} {active:>3} experts: 2+4 mixed {times['2+4 mixed']:7.1f} us, 3 uniform "
                  f"{times['3 uniform']:7.1f} (mixed/uniform {row['mixed_vs_uniform']:.2f}), floor "
                  f"{times['2+4 mixed, floor']:6.1f} ({row['floor_over_mixed']:.2f}), per-expert launches "
                  f"{times['2+4 mixed, launch per expert']:7.1f} (x{row['per_expert_over_one_launch']:.2f}), "
                  f"2,3,4,8 mixed {times['2,3,4,8 mixed']:7.1f} vs 4 uniform {times['4 uniform']:7.1f}, "
                  f"bf16 {times['bf16, launch per expert']:7.1f}", flush=True)
            save(rows)
    return rows


COLUMNS = [("layer", "layer", "<"), ("batch", "batch", "d"), ("active", "active", "d"),
           ("mixed us", lambda r: r["times_us"]["2+4 mixed"], ".1f"), ("mixed/uniform", "mixed_vs_uniform", ".2f"),
           ("floor/mixed", "floor_over_mixed", ".2f"), ("per-expert/one", "per_expert_over_one_launch", ".2f"),
           ("bf16/mixed", "bf16_over_mixed", ".2f")]


def main(argv=None):
    ap = harness.parser("moe_kernels", __doc__, quick={"layers": "mixtral.w1", "batches": "1"})
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma-separated names of: " + ", ".join(LAYERS))
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/moe_kernels.py measures GPU kernels: run it on a machine with CUDA")
    meta = harness.metadata(args, group_size=args.group_size)

    def save(rows):
        return harness.write_result(args.out, {"rows": rows}, meta)

    rows = run(args.layers.split(","), [int(b) for b in args.batches.split(",")], args.group_size, save)
    print(harness.table(rows, COLUMNS, title=""))
    harness.done(save(rows))


if __name__ == "__main__":
    main()
