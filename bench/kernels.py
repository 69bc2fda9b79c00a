"""Fused dequantize+matmul against the memory floor and torch bf16, side by side in one process, on a GPU.

For every shape, bit width (group 128, asymmetric) and batch: our kernel's time with weights cold in
L2, its effective bandwidth (packed weights + scales + zeros + activations in and out, over time), the
ratio to a read-only Triton kernel streaming the same weight bytes (the floor: no kernel that must read
the weights can beat it), and the ratio to torch bf16 `x @ W.T` with cold weights.

Cold L2: each measurement rotates over enough copies of the weights (> 4x the L2 size) that no call
finds its weights cached, and the rotation is captured in a CUDA graph so that launch overhead is not
timed (what a serving engine's decode graph sees).  Times are medians over replays, per call.

    python bench/kernels.py                       # all shapes, 2/3/4/8 bits, batch 1,2,16,64,256
    python bench/kernels.py --shapes smollm2 --bits 4 --batches 1
    python bench/kernels.py --shapes llama3-8b.gate_up --bits 4 --batches 256 --all-configs
    python bench/kernels.py --shapes llama3-8b,square --bits 2,3,4,8 --batches 1,2,4,16 --no-compare --before
    python bench/kernels.py --shapes square --bits 2,3,4,8 --batches 1,2,4,8,16 --no-compare --skinny

Prints a table and writes JSON (`--out`, default bench/results/kernels.json), after every shape and width
so that a run cut short keeps its rows.  `--all-configs` times every configuration the tuner chooses among
instead (and bf16 beside them): what its space offers.  `--before` also times, at batches up to 4, the gemv's
fp32 body (`HALF2` off: the kernel before packed fp16 pairs), tuned over its own candidates as the tuner
does, so that before and after come from one process on one card.  `--skinny` also times the skinny kernel
(`kernels/skinny.py`; above 16 rows its large-batch tiles, which the dispatcher does not offer) and the gemv (up to
4 rows) or tiled kernel, each tuned over its own candidates.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import torch

from bitplan.kernels import reference
from bitplan.kernels.matmul import (_TUNED, CONFIGS, GEMV_MAX_M, _fastest, _launch, _sm_count, gemv_configs, matmul,
                                    skinny_fits, tuning_bucket)
from bitplan.kernels.skinny import SKINNY_MAX_M
from bitplan.kernels.timing import clone_packed, cold_time_us, copies_for, copy_bandwidth, floor_us, random_packed

SHAPES = {  # name: (N, K) of W [N, K], y = x @ W.T
    "llama3-8b.qkv": (6144, 4096),
    "llama3-8b.o": (4096, 4096),
    "llama3-8b.gate_up": (28672, 4096),
    "llama3-8b.down": (4096, 14336),
    "square-8192": (8192, 8192),
    "mixtral.w1": (14336, 4096),
    "mixtral.w2": (4096, 14336),
    "deepseek-v3.w1": (2048, 7168),
    "deepseek-v3.w2": (7168, 2048),
    "smollm2.gate": (1536, 576),
}


def tuned(N: int, K: int, bits: int, M: int) -> dict:
    """The configuration the tuner chose per regime for this product (tuning is noisy on small layers:
    recorded so that runs can be compared config by config)."""
    return {key[0]: cfg for key, cfg in _TUNED.items() if key[1] == tuning_bucket(M) and key[2:5] == (N, K, bits)}


def _operands(weight):
    """`matmul`'s five weight operands from `random_packed`'s triple (q1 and z1 alias shard 0 for one shard)."""
    packed, scales, zeros = weight
    return packed[0], packed[-1], scales, zeros[0], zeros[-1]


def before(x, copies, N: int, K: int, bits: int, group: int) -> tuple[float, float, dict]:
    """The fp32 gemv body (HALF2 off), tuned over its own candidates as the tuner does, then timed cold:
    (µs, its output on the first copy, the configuration)."""
    M = x.shape[0]
    shape = (M, N, K, bits, group, False)
    found = gemv_configs(M, N, K, bits, group, _sm_count(x.device), half2=False)
    cfg = _fastest(found, lambda c, *w: _launch("gemv", x, *w, *shape, c), _operands(copies[0]))
    t = cold_time_us([lambda c=c: _launch("gemv", x, *_operands(c), *shape, cfg) for c in copies])
    return t, _launch("gemv", x, *_operands(copies[0]), *shape, cfg), cfg


def run(shapes, bits_list, batches, group, regime, save, compare=True, with_before=False,
        with_skinny=False) -> list[dict]:
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    rows, bf16 = [], {}
    for name in shapes:
        N, K = SHAPES[name]
        n_bf16 = copies_for(N * K * 2, l2)
        w_bf16 = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(n_bf16)]
        for bits in bits_list:
            weight_bytes = (sum(reference.padded(K) * w // 32 for w in reference.shards(bits)) * N * 4
                            + -(-K // group) * N * 2
                            + sum(reference.padded(-(-K // group)) * w // 32 for w in reference.shards(bits)) * N * 4)
            n = copies_for(weight_bytes, l2)
            weight = random_packed(N, K, bits, group)
            copies = [weight] + [clone_packed(weight) for _ in range(n - 1)]
            t_floor = floor_us(weight_bytes)
            p0, s0, z0 = weight
            zq = reference.unpack([z.cpu() for z in z0], bits, -(-K // group))
            w_ref = reference.dequantize([p.cpu() for p in p0], s0.cpu(), zq, bits, group, K).cuda()  # [K, N]
            for M in batches:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ w_ref
                rel = float((matmul(x, p0, s0, z0, bits, group, K, regime=regime).float() - ref).norm() / ref.norm())
                timed = (("gemv", "tiled") if compare else ()) + (regime,)
                # the previous dispatcher's kernel beside it; above 16 rows the large-batch tiles, which it never offers
                if with_skinny and skinny_fits(min(M, SKINNY_MAX_M), K, group, x.dtype):
                    timed = tuple(dict.fromkeys(timed + ("gemv" if M <= GEMV_MAX_M else "tiled", "skinny")))
                t = {r: cold_time_us([lambda c=c, r=r: matmul(x, c[0], c[1], c[2], bits, group, K, regime=r)
                                      for c in copies]) for r in timed}
                for r in ("gemv", "tiled", "skinny"):
                    t.setdefault(r, float("nan"))
                t_ours = t[regime]  # None: the dispatcher's choice (tuned among the kernels `_regimes` offers)
                if (name, M) not in bf16:
                    bf16[name, M] = cold_time_us([lambda w=w: torch.nn.functional.linear(x, w) for w in w_bf16])
                t_bf16 = bf16[name, M]
                moved = weight_bytes + M * K * 2 + M * N * 2
                rows.append(dict(shape=name, N=N, K=K, bits=bits, batch=M, ours_us=t_ours, gemv_us=t["gemv"],
                                 tiled_us=t["tiled"], skinny_us=t["skinny"], floor_us=t_floor, bf16_us=t_bf16,
                                 ours_GBps=moved / t_ours / 1e3, of_floor=t_floor / t_ours,
                                 vs_bf16=t_bf16 / t_ours, rel_err=rel, configs=tuned(N, K, bits, M)))
                r = rows[-1]
                if with_skinny:
                    r["old_us"] = t["gemv" if M <= GEMV_MAX_M else "tiled"]
                if with_before and M <= GEMV_MAX_M:
                    t_before, y_before, cfg_before = before(x, copies, N, K, bits, group)
                    r.update(before_us=t_before, before_of_floor=t_floor / t_before, speedup=t_before / t_ours,
                             before_rel_err=float((y_before.float() - ref).norm() / ref.norm()),
                             before_config=cfg_before)
                    print(f"{'':>18} before (fp32 gemv body) {t_before:8.1f} us ({r['before_of_floor']:4.2f} of floor)"
                          f"  after/before x{r['speedup']:4.2f}  err {r['before_rel_err']:.1e}", flush=True)
                print(f"{name:>18} {bits}b M={M:<4} ours {t_ours:8.1f} us (gemv {t['gemv']:7.1f}, tiled "
                      f"{t['tiled']:7.1f}, skinny {t['skinny']:7.1f})  floor {t_floor:7.1f} us ({r['of_floor']:4.2f})  bf16 {t_bf16:8.1f} us "
                      f"(x{r['vs_bf16']:5.2f})  {r['ours_GBps']:6.0f} GB/s  err {rel:.1e}", flush=True)
            del copies
            save(rows)  # after every shape and width: a run cut short still leaves its rows
        del w_bf16
        torch.cuda.empty_cache()
    return rows


def all_configs(shapes, bits_list, batches, group, regime, save) -> list[dict]:
    """Every candidate of the tuner for each product, cold, beside torch bf16."""
    rows = []
    for name in shapes:
        N, K = SHAPES[name]
        dense = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(2 * N * K))]
        for bits in bits_list:
            weight = random_packed(N, K, bits, group)
            nbytes = sum(t.numel() * t.element_size() for t in [*weight[0], weight[1], *weight[2]])
            copies = [weight] + [clone_packed(weight) for _ in range(copies_for(nbytes) - 1)]
            for M in batches:
                kind = regime or ("gemv" if M <= GEMV_MAX_M else "tiled")
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                t_bf16 = cold_time_us([lambda w=w: torch.nn.functional.linear(x, w) for w in dense])
                print(f"{name} {bits}b M={M} {kind}: torch bf16 {t_bf16:.1f} us", flush=True)
                for cfg in CONFIGS[kind](M, N, K, bits, group, _sm_count(x.device)):
                    try:
                        t = cold_time_us([lambda c=c, cfg=cfg: matmul(x, *c, bits, group, K, config=cfg, regime=kind)
                                          for c in copies])
                    except Exception as e:  # noqa: BLE001 - a configuration the compiler rejects is reported
                        t, cfg = float("nan"), dict(cfg, error=type(e).__name__)
                    rows.append(dict(shape=name, N=N, K=K, bits=bits, batch=M, regime=kind, config=cfg, ours_us=t,
                                     bf16_us=t_bf16, vs_bf16=t_bf16 / t))
                    print(f"  {t:8.1f} us  x{t_bf16 / t:5.2f} bf16  {cfg}", flush=True)
            del copies
            save(rows)
        del dense
        torch.cuda.empty_cache()
    return rows


COLUMNS = [("shape", "shape", "<"), ("bits", "bits", "d"), ("batch", "batch", "d"), ("ours us", "ours_us", ".1f"),
           ("GB/s", "ours_GBps", ".0f"), ("floor/ours", "of_floor", ".2f"), ("bf16/ours", "vs_bf16", ".2f")]


def main(argv=None):
    ap = harness.parser("kernels", __doc__, quick={"shapes": "smollm2", "bits": "4", "batches": "1"})
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated prefixes of: " + ", ".join(SHAPES))
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--batches", default="1,2,16,64,256")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--regime", choices=["gemv", "tiled", "skinny"], default=None, help="force one kernel (default: dispatch)")
    ap.add_argument("--no-compare", action="store_true", help="time only the dispatcher's kernel, not both")
    ap.add_argument("--all-configs", action="store_true", help="time every configuration of the tuner's space")
    ap.add_argument("--before", action="store_true", help="also time the fp32 gemv body (HALF2 off) at batches <= 4")
    ap.add_argument("--skinny", action="store_true",
                    help="also time, at batches 2-16, the skinny kernel and the kernel the dispatcher used before it")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py measures GPU kernels: run it on a machine with CUDA")
    shapes = [s for s in SHAPES if any(s.startswith(p) for p in args.shapes.split(","))]
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_bw / 1e9:.0f} GB/s (read + write)")
    meta = harness.metadata(args, group_size=args.group_size, regime=args.regime or "dispatch",
                            copy_GBps=copy_bw / 1e9, l2_bytes=torch.cuda.get_device_properties(0).L2_cache_size)

    def save(rows):
        return harness.write_result(args.out, {"rows": rows}, meta)

    bits, batches = [int(b) for b in args.bits.split(",")], [int(b) for b in args.batches.split(",")]
    if args.all_configs:
        harness.done(save(all_configs(shapes, bits, batches, args.group_size, args.regime, save)))
        return
    rows = run(shapes, bits, batches, args.group_size, args.regime, save, not args.no_compare, args.before,
               args.skinny)
    columns = COLUMNS + ([("before us", "before_us", ".1f"), ("floor/before", "before_of_floor", ".2f"),
                          ("before/ours", "speedup", ".2f")] if args.before else []) \
        + ([("old us", "old_us", ".1f"), ("skinny us", "skinny_us", ".1f")] if args.skinny else [])
    print(harness.table(rows, columns, title=""))
    harness.done(save(rows))


if __name__ == "__main__":
    main()
