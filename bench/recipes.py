"""Quantization recipes side by side on one stored profile: allocators × budgets × GPTQ inputs, each plan
measured on held-out text of the calibration's domain and of another one, with paired intervals.

For every budget and allocator the plan is solved (and stored), then evaluated in memory as `apply` would
write it (`executor.evaluate.evaluate_plans`), once per `--gptq-inputs`: `original` (GPTQ's `H` from the
unquantized model, shared by all plans) and `quantized` (from the plan's own model quantized up to each
block: `apply --gptq-inputs quantized`).  Each row gives perplexity and mean KL to the unquantized model
on every text; where two rows are compared (quantized against original inputs for one plan, each
allocator against `uniform` at one budget), the perplexity ratio comes with a 95 % paired bootstrap
interval over windows (the same windows resampled for both, so text difficulty cancels).

Texts: `shakespeare:eval` (the held-out plays: same domain as the default calibration, disjoint from it)
and `code` (Python source of this interpreter's standard library, a fixed list of modules: another
domain; its files' hash is recorded), or any file or glob `bitplan eval --text` takes.

    python bench/recipes.py --db /tmp/m18/bitplan.db --profile prof-... \\
        --budgets 2.5bpw,3.0bpw,3.5bpw,4.0bpw --allocators uniform,ilp --gptq-inputs original,quantized

Needs the profile stored in `--db` (`bitplan profile` first) and its model; time on 2 cores: about a
minute per plan and text at 8,192 tokens, plus one GPTQ pass per plan with `quantized` inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import hashlib
import math
import sysconfig
import tempfile
import time

import numpy as np

# a fixed list, so that every run on one Python version reads the same code
CODE_MODULES = ("argparse", "textwrap", "difflib", "json/decoder", "json/encoder", "csv", "shlex", "fractions",
                "calendar", "heapq", "bisect", "string", "enum", "dataclasses", "functools", "statistics")


def code_text() -> tuple[str, str]:
    """A file holding the standard library modules of CODE_MODULES, and the sha256 of its content."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((lib / f"{m}.py").read_text(encoding="utf-8") for m in CODE_MODULES)
    path = Path(tempfile.gettempdir()) / "bitplan-bench-code.txt"
    path.write_text(text, encoding="utf-8")
    return str(path), hashlib.sha256(text.encode()).hexdigest()[:16]


def paired_ratio(a: list[float], b: list[float], tokens: int, draws: int = 2000, seed: int = 0) -> tuple:
    """Perplexity of `a` over that of `b` (per-window summed NLLs over the same windows, `tokens` scored
    each) and its 95 % paired bootstrap interval."""
    a, b = np.asarray(a), np.asarray(b)
    idx = np.random.default_rng(seed).integers(0, len(a), (draws, len(a)))
    ratios = np.exp((a[idx].sum(1) - b[idx].sum(1)) / (len(a) * tokens))
    return (math.exp((a.sum() - b.sum()) / (len(a) * tokens)), *np.percentile(ratios, [2.5, 97.5]))


def on_texts(loaded, planned, assignment: dict, texts: dict, *, quantizer, hessians, cache) -> tuple[dict, dict]:
    """One plan measured as `apply` writes it on each text: `({text: perplexity and KL}, {text: per-window
    NLL})` (`executor.evaluate.evaluate_plans`), the NLLs for paired intervals."""
    from bitplan.executor.evaluate import evaluate_plans

    measured, nll = {}, {}
    for name, windows in texts.items():
        r = evaluate_plans(loaded.model, planned, [assignment], windows.ids, quantizer=quantizer, hessians=hessians,
                           cache=cache, per_window=True, progress=False)[0]
        nll[name] = r.pop("window_nll")
        r.pop("window_kl")
        measured[name] = r
    return measured, nll


def paired_sum_ratio(a: list[float], b: list[float], draws: int = 2000, seed: int = 0) -> tuple:
    """Σa / Σb of per-window sums over the same windows (mean KL of plan `a` over plan `b`'s) and its 95 %
    paired bootstrap interval."""
    a, b = np.asarray(a), np.asarray(b)
    idx = np.random.default_rng(seed).integers(0, len(a), (draws, len(a)))
    return (float(a.sum() / b.sum()), *np.percentile(a[idx].sum(1) / b[idx].sum(1), [2.5, 97.5]))


def main(argv=None):
    ap = harness.parser("recipes", __doc__, quick={"budgets": "3.5bpw", "allocators": "ilp", "tokens": 1024})
    ap.add_argument("--db", help="the store holding the profile (default: $BITPLAN_DB or the user data dir)")
    ap.add_argument("--profile", required=True, help="stored profile id")
    ap.add_argument("--budgets", default="2.5bpw,3.0bpw,3.5bpw,4.0bpw")
    ap.add_argument("--allocators", default="uniform,ilp")
    ap.add_argument("--plans", help="ALLOCATOR@BUDGET,...: these plans instead of every allocator at every budget")
    ap.add_argument("--pairs", default="", help="A@BUDGET:B@BUDGET,...: also give the perplexity of plan A over "
                                                "plan B's, per GPTQ inputs (each allocator is paired with uniform at "
                                                "its own budget where both are run)")
    ap.add_argument("--gptq-inputs", default="original,quantized")
    ap.add_argument("--texts", default="shakespeare:eval,code", help="comma-separated: shakespeare:eval, code, "
                                                                     "or a file or glob")
    ap.add_argument("--tokens", type=int, default=8192, help="evaluation tokens per text")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--search-params", default="{}",
                    help="the evolutionary allocator's parameters, JSON, e.g. '{\"fitness_tokens\": 8192}' "
                         "(time_limit: seconds of search; seed)")
    args = ap.parse_args(argv)
    harness.search_request(args.search_params)  # a malformed one fails before the model loads

    import torch

    from bitplan.db.store import Store
    from bitplan.db.types import Option
    from bitplan.executor.evaluate import evaluate_plans
    from bitplan.kernels.quantize import GPTQCache
    from bitplan.planner.app.usecases import run_plan
    from bitplan.planner.app.workspace import Workspace
    from bitplan.planner.request import PlanRequest
    from bitplan.profiler import profile as prof
    from bitplan.profiler.model import planned_for

    torch.manual_seed(0)
    ws = Workspace(Store(args.db), progress=True, keep_gptq=True)
    profile = ws.store.get_profile(args.profile)
    loaded = ws.model_of(profile, "bench/recipes.py")
    planned = planned_for(loaded.model, {m.name for m in profile.modules})
    quantizer = profile.quantizer
    texts, meta_texts = {}, {}
    for name in args.texts.split(","):
        path, digest = code_text() if name == "code" else (name, None)
        texts[name] = ws.windows(loaded.tokenizer, text=path, tokens=args.tokens, window=args.window)
        meta_texts[name] = dict(corpus=texts[name].corpus, sha256=digest, modules=CODE_MODULES if digest else None)
    t0 = time.perf_counter()
    hessians = prof.gptq_hessians(loaded, profile, planned, progress=True)
    shared = ws.gptq_cache(profile.id) or GPTQCache().claim(profile.id)
    meta = harness.metadata(args, profile=profile.id, estimator=profile.estimator, quantizer=quantizer.label,
                            texts=meta_texts, hessians_seconds=time.perf_counter() - t0)
    base = {m.name: Option(bits=16) for m, _ in planned}
    rows = [dict(budget="-", allocator="unquantized", gptq_inputs="-", bits_per_weight=16.0, **{
        name: evaluate_plans(loaded.model, planned, [base], w.ids, progress=False)[0] for name, w in texts.items()})]
    nll = {}
    plans = ([tuple(p.split("@")[::-1]) for p in args.plans.split(",")] if args.plans else
             [(b, a) for b in args.budgets.split(",") for a in args.allocators.split(",")])
    for budget, allocator in plans:
        t0 = time.perf_counter()
        search_params = harness.search_request(args.search_params) if allocator == "evolutionary" else {}
        plan = run_plan(ws, profile, PlanRequest(budget=budget, allocator=allocator, **search_params))
        plan_seconds = time.perf_counter() - t0  # the search's own time and forward tokens are in its plan
        search = plan.params.get("search") or {}
        for inputs in args.gptq_inputs.split(","):
            t0 = time.perf_counter()
            cache = shared if inputs == "original" else prof.gptq_propagated(
                loaded, profile, planned, plan.assignment, progress=True)
            row = dict(budget=budget, allocator=allocator, gptq_inputs=inputs, plan_id=plan.id,
                       bits_per_weight=plan.bits_per_weight, size_mib=plan.size_mib,
                       predicted_error=plan.predicted_error, plan_seconds=plan_seconds,
                       search_tokens=search.get("tokens_used", 0), gptq_seconds=time.perf_counter() - t0)
            measured, window_nll = on_texts(loaded, planned, plan.assignment, texts, quantizer=quantizer,
                                            hessians=hessians, cache=cache)
            row.update(measured)
            nll.update({(budget, allocator, inputs, name): v for name, v in window_nll.items()})
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            print(f"{budget:>8} {allocator:>10} {inputs:>9}  {plan.bits_per_weight:.3f} bpw  " + "  ".join(
                f"{n}: ppl {row[n]['perplexity']:8.2f} kl {row[n]['kl']:.4f}" for n in texts), flush=True)
            harness.write_result(args.out, {"rows": rows}, meta)
    scored = args.window - 1
    chosen = [tuple(tuple(side.split("@")[::-1]) for side in pair.split(":")) for pair in args.pairs.split(",") if pair]
    for row in rows:  # the paired comparisons, each over the same windows
        key = row["budget"], row["allocator"], row["gptq_inputs"]
        for name in texts:
            pairs = {"vs_original_inputs": (row["budget"], row["allocator"], "original"),
                     "vs_uniform": (row["budget"], "uniform", row["gptq_inputs"])}
            pairs.update({f"vs_{b[1]}@{b[0]}": (*b, row["gptq_inputs"]) for a, b in chosen if a == key[:2]})
            for label, other in pairs.items():
                if other != key and (*other, name) in nll:
                    r, lo, hi = paired_ratio(nll[(*key, name)], nll[(*other, name)], scored)
                    row[name][label] = dict(ratio=r, ci95=[lo, hi])
    columns = [("budget", "budget", "<"), ("allocator", "allocator", "<"), ("gptq inputs", "gptq_inputs", "<"),
               ("bpw", "bits_per_weight", ".3f")]
    for name in texts:
        columns += [(f"{name} ppl", lambda r, n=name: r[n]["perplexity"], ".2f"),
                    ("÷ original inputs", lambda r, n=name: r[n].get("vs_original_inputs", {}).get("ratio"), ".3f"),
                    ("÷ uniform", lambda r, n=name: r[n].get("vs_uniform", {}).get("ratio"), ".3f")]
    print(harness.table(rows, columns, title=""))
    harness.done(harness.write_result(args.out, {"rows": rows}, meta))


if __name__ == "__main__":
    main()
