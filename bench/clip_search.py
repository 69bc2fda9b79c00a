"""What the range search of the storage grid (`clip`) buys per matrix, before any model is assembled.

For every planned matrix of the model (the tied embedding included) and each code width at one group
size, RTN with min-max ranges and with `clip` (`kernels/quantize.py`): the summed squared rounding error
of each, and the range each group chose as a fraction of its min-max range (the ratio of the stored fp16
scales, so to within their rounding).  Asks for a wider search than `CLIP_SHRINK` (`--down-to`) to show
how many groups would go further than the search does.  Prints a table per width and writes
`bench/results/clip_search.json`.

    python bench/clip_search.py [--model smollm2-135m] [--bits 2,3,4] [--group-size 64]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()


def main(argv=None):
    ap = harness.parser("clip_search", __doc__, quick={"bits": "3", "layers": "3"})
    ap.add_argument("--model", default="smollm2-135m", help="checkpoint directory, .gguf, or smollm2-135m")
    ap.add_argument("--bits", default="2,3,4", help="code widths (default 2,3,4)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--layers", help="only the matrices of these decoder layers (default all, and the embedding)")
    ap.add_argument("--down-to", type=float, default=0.2, help="narrowest range tried, as a fraction (default 0.2)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from bitplan.db.types import Option
    from bitplan.kernels import quantize as Q
    from bitplan.profiler.model import load_model, planned_linears

    meta = harness.metadata(args)
    searched = min(Q.CLIP_SHRINK)
    steps = round((1 - args.down_to) / 0.025)
    Q.CLIP_SHRINK = tuple(1 - 0.025 * i for i in range(steps + 1))  # the wider search, same step
    model = load_model(args.model).model
    layers = None if args.layers is None else {int(x) for x in args.layers.split(",")}
    mats = [(m.name, lin.weight.detach().float()) for m, lin in planned_linears(model, embeddings=layers is None)
            if layers is None or m.layer in layers]
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        opt = Option(bits=bits, group_size=args.group_size)
        e_plain = e_clip = 0.0
        fractions = []
        for _, W in mats:
            plain, clipped = Q.rtn(W, opt), Q.rtn(W, opt, clip=True)
            e_plain += float(((plain.dequantize() - W) ** 2).sum())
            e_clip += float(((clipped.dequantize() - W) ** 2).sum())
            fractions.append((clipped.scales.float() / plain.scales.float()).flatten())
        f = torch.cat(fractions).numpy()
        rows.append(dict(bits=bits, matrices=len(mats), groups=int(f.size), error_ratio=e_clip / e_plain,
                         median_fraction=float(np.median(f)), p10_fraction=float(np.percentile(f, 10)),
                         share_min_max=float(np.mean(f > 0.9999)),
                         share_beyond_search=float(np.mean(f < searched - 0.0125))))
        print(f"{bits} bits: done", flush=True)
    print(harness.table(rows, [("bits", "bits", "d"), ("groups", "groups", "d"),
                               ("error clip/min-max", "error_ratio", ".3f"),
                               ("median range", "median_fraction", ".3f"), ("10th pct", "p10_fraction", ".3f"),
                               ("kept min-max", "share_min_max", ".3f"),
                               (f"best below {searched:.2f}", "share_beyond_search", ".4f")],
                        title=f"{args.model}: RTN at group {args.group_size}, {len(mats)} matrices"))
    harness.done(harness.write_result(args.out, {"model": args.model, "searched_down_to": searched,
                                                 "rows": rows}, meta))


if __name__ == "__main__":
    main()
