"""Decode attention (`kernels/attention.py`) against PyTorch's fused attention and the memory floor, on a GPU.

One query token per sequence against a KV cache of Llama-3-8B's attention shape (32 query heads, 8 key/value
heads, head dimension 128), bf16.  For each batch and cache length: our kernel at each `--splits` (slices of
the cache per key/value head; `auto` is the launcher's choice) and `--blocks` (positions a program takes at a
time), `torch.nn.functional.scaled_dot_product_attention` with grouped-query heads (whichever of its kernels
PyTorch picks), and the floor: a read-only kernel streaming the cache's bytes.  With `--static N`, each case is
also timed as transformers' static cache holds it: `N` positions allocated, the first `cache` filled, the rest
masked out.

Cold L2: each measurement rotates over enough distinct caches (> 4x the L2 size) that no call finds its cache
in L2, inside one CUDA graph (`kernels/timing.py`), as a decode step's layers do.  Times are medians over
replays, per call; our kernel's answer is checked against the float32 reference.

    python bench/attention.py                                  # batch 1 and 8, 645 to 8192 positions
    python bench/attention.py --batches 1 --caches 645 --splits auto,4,8,16,32 --blocks 32,64 --static 4096

Prints a table and writes JSON (`--out`, default bench/results/attention.json) after every case.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import torch
import torch.nn.functional as F

from bitplan.kernels.attention import decode_attention, reference_attention
from bitplan.kernels.timing import cold_time_us, copies_for, floor_us

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
COLUMNS = [("batch", "batch", "d"), ("cache", "cache", "d"), ("allocated", "allocated", "d"), ("kernel", "kernel", "<"),
           ("us", "us", ".2f"), ("floor us", "floor_us", ".2f"), ("of floor", "of_floor", ".2f"),
           ("vs sdpa", "vs_sdpa", ".2f"), ("max err", "max_err", ".1e")]


def counts(option: str, text: str) -> list[int]:
    """A comma list of positive counts, or a one-line ValueError naming `option`."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"{option}: {text!r} is not a comma list of positive counts")
    return [int(p) for p in parts]


def splits_list(text: str) -> list[int | None]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if part != "auto" and not (part.isdigit() and int(part) > 0):
            raise ValueError(f"--splits: {part!r} is neither 'auto' nor a positive count")
        out.append(None if part == "auto" else int(part))
    return out


def case(batch: int, cache: int, allocated: int, splits: Sequence[int | None], blocks: Sequence[int] = (64,),
         attention=decode_attention) -> list[dict]:
    """Rows for one batch and cache: our kernel at each slice count and block length, SDPA, each timed over
    distinct caches.  `attention` is the kernel under test (`decode_attention`'s signature)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, KV_HEADS, allocated, HEAD_DIM)
    nbytes = 2 * batch * KV_HEADS * cache * HEAD_DIM * 2  # the filled keys and values: what a kernel must read
    n = copies_for(2 * batch * KV_HEADS * allocated * HEAD_DIM * 2)
    caches = [tuple(torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
              for _ in range(n)]
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16)
    mask = None
    if allocated > cache:
        mask = (torch.arange(allocated, device="cuda") < cache).expand(batch, 1, 1, allocated)
    scale = HEAD_DIM ** -0.5
    floor = floor_us(nbytes)
    want = reference_attention(q, *caches[0], mask, scale)
    rows = []
    for bl in blocks:
        for s in splits:
            got = attention(q, *caches[0], mask, scale, block_l=bl, splits=s).float()
            us = cold_time_us([lambda k=k, v=v: attention(q, k, v, mask, scale, block_l=bl, splits=s)
                               for k, v in caches])
            rows.append(dict(kernel=f"bitplan, block {bl}, splits {s or 'auto'}", us=us,
                             max_err=float((got - want).abs().max())))
    sdpa_mask = None if mask is None else mask.expand(batch, HEADS, 1, allocated)
    us = cold_time_us([lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, scale=scale,
                                                                        enable_gqa=True) for k, v in caches])
    rows.append(dict(kernel="torch sdpa", us=us))
    for r in rows:
        r.update(batch=batch, cache=cache, allocated=allocated, floor_us=floor, of_floor=floor / r["us"],
                 vs_sdpa=us / r["us"])
    return rows


def main(argv=None):
    ap = harness.parser("attention", __doc__, quick={"batches": "1", "caches": "645", "splits": "auto"})
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--caches", default="645,2048,8192", help="filled cache positions")
    ap.add_argument("--splits", default="auto,4,8,16", help="slices of the cache per key/value head, or auto")
    ap.add_argument("--blocks", default="64", help="cache positions a program takes at a time (16 or more)")
    ap.add_argument("--static", type=int, default=0,
                    help="also time each case in a static cache of this many positions")
    args = ap.parse_args(argv)
    try:
        batches, caches = counts("--batches", args.batches), counts("--caches", args.caches)
        splits = splits_list(args.splits)
        blocks = counts("--blocks", args.blocks)
        if bad := [b for b in blocks if b < 16 or b & (b - 1)]:
            raise ValueError(f"--blocks: {bad} are not powers of two of 16 or more")
    except ValueError as e:
        ap.error(str(e))
    if args.static and args.static < max(caches):
        ap.error(f"--static {args.static} is shorter than the longest cache, {max(caches)}: give at least that")
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention.py times GPU kernels: run it on a machine with CUDA")
    meta, rows = harness.metadata(args), []
    for batch in batches:
        for cache in caches:
            for allocated in [cache] + ([args.static] if args.static > cache else []):
                rows += case(batch, cache, allocated, splits, blocks)
                print(harness.table(rows[-len(splits) * len(blocks) - 1:], COLUMNS), flush=True)
                harness.write_result(args.out, {"rows": rows}, meta)
    print(harness.table(rows, COLUMNS, title="decode attention, cold L2, median per call"))
    harness.done(harness.write_result(args.out, {"rows": rows}, meta))


if __name__ == "__main__":
    main()
