"""Writes notebooks/compare_allocators.ipynb from the cells below (the notebook is reviewed as this code).

    python notebooks/build_compare_allocators.py             # write the notebook, no outputs
    python notebooks/build_compare_allocators.py --execute   # write it, run it top to bottom, keep outputs

The committed notebook keeps the outputs of a full run (`--execute` with `BITPLAN_DB` set to a database
with an evaluated demo run); tests/notebooks/test_compare_allocators.py checks that its cells are these and runs it small.
Environment read by the notebook: BITPLAN_PROFILE_FILE, BITPLAN_DB, BITPLAN_PROFILE_ID,
BITPLAN_NOTEBOOK_SMALL (see its first cell), BITPLAN_BENCH_RESULTS (its last section).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "compare_allocators.ipynb"


def _code(src: str):
    return nbformat.v4.new_code_cell(textwrap.dedent(src).strip("\n"))


def _md(src: str):
    return nbformat.v4.new_markdown_cell(textwrap.dedent(src).strip("\n"))


INTRO = """
# Comparing allocators: predicted error, measured perplexity, bits per module, solve time

The same profile planned by `ilp`, `closed_form`, `greedy` and `uniform` over a sweep of budgets
(`bitplan compare`), then what was measured on the plans that were applied and evaluated, and (last)
the measured KL of the additive allocators' plans beside the `evolutionary` search's.

Where the data come from, first that applies:

1. `BITPLAN_PROFILE_FILE`: a `bitplan.profile/1` JSON file;
2. a stored profile in the database (`BITPLAN_DB`, else the default one): `BITPLAN_PROFILE_ID`
   (an id or a unique prefix), else the newest;
3. a synthetic SmolLM2-135M-shaped profile (`bitplan.planner.synthetic`, seeded).

Plans go to the database when one was chosen (`BITPLAN_DB` set, or the profile came from it), else to
a temporary one. `BITPLAN_NOTEBOOK_SMALL=1` shrinks the sweep (3 budgets, smaller solve-time problems):
that is how CI runs this notebook.
"""

SETUP = '''
import io
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are shown as PNGs (below), the same in Jupyter and in CI
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

from bitplan.db.session import database_url
from bitplan.db.store import Store
from bitplan.db.types import InvalidInput
from bitplan.db.files import read_profile_file
from bitplan.planner.app.usecases import run_compare
from bitplan.planner.app.workspace import Workspace
from bitplan.planner.plan import allocate, summarize
from bitplan.planner.request import PlanRequest

from bitplan.planner.synthetic import profile_with_modules, synthetic_profile

SMALL = os.environ.get("BITPLAN_NOTEBOOK_SMALL", "") not in ("", "0")
BUDGETS = "3bpw,3.5bpw,4bpw" if SMALL else "2.5:4.5:0.25"
ALLOCATORS = ["ilp", "closed_form", "greedy", "uniform"]
HEAT_BUDGET = "3.5bpw"
TIMED = ["greedy", "closed_form", "ilp"]
SIZES = [210, 1_000] if SMALL else [210, 2_000, 10_000, 45_000]


def show(fig):
    """Display a figure as a PNG and close it (no interactive backend needed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    display(Image(buf.getvalue()))


def open_database():
    """$BITPLAN_DB, or the default database if it exists (None if neither)."""
    url = database_url()
    if not os.environ.get("BITPLAN_DB") and url.startswith("sqlite:///") \\
            and not Path(url.removeprefix("sqlite:///")).is_file():
        return None
    return Store(url)


db = open_database()
if os.environ.get("BITPLAN_PROFILE_FILE"):
    profile = read_profile_file(os.environ["BITPLAN_PROFILE_FILE"])
    source = f"profile file {os.environ['BITPLAN_PROFILE_FILE']}"
elif db is not None and (os.environ.get("BITPLAN_PROFILE_ID") or db.list_profiles()):
    if os.environ.get("BITPLAN_PROFILE_ID"):
        kind, profile = db.find(os.environ["BITPLAN_PROFILE_ID"])
        if kind != "profile":
            raise InvalidInput(f"BITPLAN_PROFILE_ID={os.environ['BITPLAN_PROFILE_ID']} is a {kind}, not a profile")
    else:
        profile = db.list_profiles()[0]  # newest first
    source = "stored profile"
else:
    profile, source = synthetic_profile(), "synthetic SmolLM2-135M-shaped profile (bitplan.planner.synthetic)"

chosen = os.environ.get("BITPLAN_DB") or source == "stored profile"
store = db if chosen else Store(str(Path(tempfile.mkdtemp(prefix="bitplan-nb-")) / "notebook.db"))
profile = store.save_profile(profile)  # a file without an id gets its content id; stored ones come back

print(f"kernel python  {sys.executable}")
print(f"mode           {'small (CI)' if SMALL else 'full'}")
print(f"data           {source}")
print(f"database       {store.url}{'' if chosen else ' (temporary)'}")
print(f"profile        {profile.id}: {profile.model.name}, estimator {profile.estimator}, "
      f"{len(profile.modules)} modules, {profile.n_params / 1e6:.1f}M planned weights")
print(f"options        {', '.join(o.label for o in profile.options)}")
'''

SWEEP_MD = "## 1. Predicted error vs bits per weight, per allocator (every budget × allocator solved and stored)"

SWEEP = '''
t0 = time.perf_counter()
rows = [r.model_dump() for r in run_compare(Workspace(store, progress=False), profile, BUDGETS, ALLOCATORS)]
print(f"{len(rows)} (budget, allocator) pairs solved and stored in {time.perf_counter() - t0:.1f} s "
      "(a plan already stored keeps the solve time it was stored with)\\n")

uniform_err = {r["budget"]: r["predicted_error"] for r in rows if r["allocator"] == "uniform"}
print(f"{'budget':>8} {'allocator':>12} {'bits/w':>7} {'MiB':>8} {'pred.err':>10} {'vs uniform':>10} "
      f"{'solve ms':>9}  {'status':<28} plan")
for r in rows:
    if r["plan_id"] is None:
        print(f"{r['budget']:>8} {r['allocator']:>12}  infeasible: {r['error']}")
        continue
    base = uniform_err.get(r["budget"])
    rel = f"{r['predicted_error'] / base:10.3f}" if base else f"{'-':>10}"
    print(f"{r['budget']:>8} {r['allocator']:>12} {r['bits_per_weight']:7.3f} {r['size_mib']:8.2f} "
          f"{r['predicted_error']:10.4f} {rel} {r['solve_seconds'] * 1e3:9.1f}  {r['status']:<28} {r['plan_id']}")

fig, ax = plt.subplots(figsize=(7.5, 4.5))
styles = {"ilp": ("o", "-"), "closed_form": ("s", "--"), "greedy": ("^", ":"), "uniform": ("x", "-")}
for alloc in ALLOCATORS:
    pts = sorted((r["bits_per_weight"], r["predicted_error"]) for r in rows
                 if r["allocator"] == alloc and r["plan_id"] is not None)
    if pts:
        marker, line = styles.get(alloc, (".", "-"))
        ax.plot(*zip(*pts), marker=marker, linestyle=line, label=alloc, alpha=0.85)
ax.set_yscale("log")
ax.set_xlabel("bits per weight (planned matrices, scales and zeros included)")
ax.set_ylabel("predicted error (nats/token)")
ax.set_title(f"{profile.model.name}: predicted error vs size ({profile.estimator})")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
show(fig)
'''

MEASURED_MD = "## 2. Measured perplexity vs bits per weight of the applied plans (stored evaluations joined to their plans)"

MEASURED = '''
plans = {p.id: p for p in store.list_plans(profile.id)}
evals = [e for e in store.list_evaluations() if e.plan_id in plans]  # newest first
measured, baseline = [], None
if evals:
    # compare like with like: the most common evaluation setting, the newest evaluation of each plan
    setting = Counter((e.corpus, e.n_tokens, e.window) for e in evals).most_common(1)[0][0]
    seen = set()
    for e in evals:
        if (e.corpus, e.n_tokens, e.window) == setting and e.plan_id not in seen:
            seen.add(e.plan_id)
            measured.append((plans[e.plan_id], e))
    baseline = next((e for e in store.list_evaluations() if e.plan_id is None
                     and (e.corpus, e.n_tokens, e.window) == setting
                     and e.checkpoint in (profile.model.source, profile.model.name)), None)
    measured.sort(key=lambda pe: (pe[0].allocator, pe[0].bits_per_weight, pe[0].budget_bits))


def label(plan):
    extra = [f"{k}={v}" for k, v in sorted(plan.params.items())] + (["pinned"] if plan.pins else [])
    return plan.allocator + (f" ({', '.join(extra)})" if extra else "")


if not measured:
    print(f"No evaluations of this profile's plans are stored in {store.url}.")
    print("Make some with `bitplan demo` (profile, plan, apply and evaluate the embedded SmolLM2-135M),")
    print("or `bitplan apply PLAN --out DIR` then `bitplan eval DIR`; then set BITPLAN_DB to that database.")
else:
    print(f"{len(measured)} evaluated plans; perplexity on {setting[1]} tokens of {setting[0]} "
          f"(window {setting[2]})")
    if baseline is not None:
        print(f"unquantized: perplexity {baseline.perplexity:.2f} ({baseline.id})")
    print(f"\\n{'budget':>8} {'allocator':>22} {'bits/w':>7} {'pred.err':>9} {'perplexity':>11}  plan / evaluation")
    for plan, e in measured:
        print(f"{plan.budget:>8} {label(plan):>22} {plan.bits_per_weight:7.3f} {plan.predicted_error:9.4f} "
              f"{e.perplexity:11.2f}  {plan.id} / {e.id}")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in dict.fromkeys(label(p) for p, _ in measured):
        pts = sorted((p.bits_per_weight, e.perplexity) for p, e in measured if label(p) == name)
        ax.plot(*zip(*pts), marker="o", label=name, alpha=0.85)
    if baseline is not None:
        ax.axhline(baseline.perplexity, color="grey", linestyle="--",
                   label=f"unquantized ({baseline.perplexity:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel(f"perplexity ({setting[0]})")
    ax.set_title(f"{profile.model.name}: measured perplexity of applied plans")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    show(fig)
'''

HEAT_MD = "## 3. Bits by layer × role (and by layer × expert for MoE) of the `ilp` plan at 3.5 bpw"

HEAT = '''
row = next((r for r in rows if r["allocator"] == "ilp" and r["budget"] == HEAT_BUDGET and r["plan_id"]), None)
heat_plan = store.get_plan(row["plan_id"]) if row else allocate(profile, PlanRequest(budget=HEAT_BUDGET))
print(f"{heat_plan.id}: {heat_plan.allocator}, {heat_plan.budget}, {heat_plan.bits_per_weight:.3f} bits/w, "
      f"predicted error {heat_plan.predicted_error:.4f}, {heat_plan.status}")
hist = summarize(heat_plan, profile)
widths = sorted({o.bits for o in profile.options})
print(f"\\n  {'role':<12}" + "".join(f"{b:>5}b" for b in widths))
for role, counts in hist.items():
    print(f"  {role:<12}" + "".join(f"{counts.get(b, 0):>6}" for b in widths))

bits = {m.name: heat_plan.assignment[m.name].bits for m in profile.modules}
layered = [m for m in profile.modules if m.layer is not None]
outside = [m for m in profile.modules if m.layer is None]
if outside:
    print("\\noutside the decoder layers: " + ", ".join(f"{m.name} {bits[m.name]}b" for m in outside))


def heat(ax, grid, xlabels, ylabel, title, annotate):
    """One colour per option where every cell is one option; a continuous scale for means (MoE)."""
    if np.isin(grid[~np.isnan(grid)], widths).all():
        edges = [widths[0] - 0.5] + [(a + b) / 2 for a, b in zip(widths, widths[1:])] + [widths[-1] + 0.5]
        cmap = matplotlib.colors.ListedColormap(plt.get_cmap("viridis")(np.linspace(0, 1, len(widths))))
        kw = {"cmap": cmap, "norm": matplotlib.colors.BoundaryNorm(edges, len(widths))}
    else:
        kw = {"cmap": "viridis", "vmin": min(widths), "vmax": max(widths)}
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", **kw)
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=45 if len(xlabels) <= 16 else 90, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if annotate:
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7,
                        color="white" if np.dot(im.cmap(im.norm(v))[:3], (0.3, 0.6, 0.1)) < 0.5 else "black")
    return im


if layered:
    layers = sorted({m.layer for m in layered})
    roles = list(dict.fromkeys(m.role or "other" for m in layered))
    total = np.zeros((len(layers), len(roles)))
    count = np.zeros_like(total)
    li, ri = {x: i for i, x in enumerate(layers)}, {r: j for j, r in enumerate(roles)}
    for m in layered:  # with experts, a cell is the mean over the layer's experts
        total[li[m.layer], ri[m.role or "other"]] += bits[m.name]
        count[li[m.layer], ri[m.role or "other"]] += 1
    grid = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(roles), 1.5 + 0.22 * min(len(layers), 80)))
    mean = " (mean over experts)" if count.max() > 1 else ""
    im = heat(ax, grid, roles, "decoder layer", f"bits by layer × role{mean}, {heat_plan.budget} ilp",
              annotate=len(layers) <= 64 and len(roles) <= 16)
    step = max(1, len(layers) // 30)
    ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
    fig.colorbar(im, ax=ax, label="bits", ticks=widths)
    show(fig)

    experts = [m for m in layered if m.expert is not None]
    if experts:  # MoE: mean bits over each expert's matrices, layer x expert
        ids = sorted({m.expert for m in experts})
        ei = {e: j for j, e in enumerate(ids)}
        total = np.zeros((len(layers), len(ids)))
        count = np.zeros_like(total)
        for m in experts:
            total[li[m.layer], ei[m.expert]] += bits[m.name]
            count[li[m.layer], ei[m.expert]] += 1
        grid = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        fig, ax = plt.subplots(figsize=(min(14, 2 + 0.35 * len(ids)), 1.5 + 0.22 * min(len(layers), 80)))
        im = heat(ax, grid, [str(e) for e in ids], "decoder layer",
                  f"mean bits per expert, {heat_plan.budget} ilp", annotate=len(layers) * len(ids) <= 400)
        ax.set_xlabel("expert")
        ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
        fig.colorbar(im, ax=ax, label="mean bits", ticks=widths)
        show(fig)
'''

PRED_MD = "## 4. Predicted error vs measured perplexity, per evaluated plan"

PRED = '''
if not measured:
    print("No evaluated plans of this profile, so nothing to compare (see section 2 for how to make some).")
else:
    from scipy.stats import spearmanr

    x = np.array([p.predicted_error for p, _ in measured])
    y = np.array([e.perplexity for _, e in measured])
    if baseline is not None:
        print("If the prediction were exact, ln(perplexity / unquantized) would equal the predicted error "
              "(nats/token).\\n")
        print(f"{'budget':>8} {'allocator':>22} {'predicted':>10} {'measured':>10}  plan")
        for p, e in measured:
            print(f"{p.budget:>8} {label(p):>22} {p.predicted_error:10.4f} "
                  f"{math.log(e.perplexity / baseline.perplexity):10.4f}  {p.id}")
    if len(measured) >= 3:
        rho = spearmanr(x, y).statistic
        print(f"\\nrank correlation (Spearman) of predicted error and perplexity over {len(measured)} plans: {rho:.3f}")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(label(p) for p, _ in measured):
        sel = [i for i, (p, _) in enumerate(measured) if label(p) == name]
        ax.scatter(x[sel], y[sel], label=name, s=40, alpha=0.85)
        at = {}  # one label per point: identical plans at several budgets share it
        for i in sel:
            at.setdefault((x[i], y[i]), []).append(measured[i][0].budget)
        for xy, budgets in at.items():
            ax.annotate(", ".join(budgets), xy, textcoords="offset points", xytext=(4, 4), fontsize=7)
    if baseline is not None:
        xs = np.linspace(0, x.max() * 1.05, 100)
        ax.plot(xs, baseline.perplexity * np.exp(xs), color="grey", linestyle="--",
                label="unquantized × e^(predicted)")
    ax.set_yscale("log")
    ax.set_xlabel("predicted error (nats/token)")
    ax.set_ylabel("measured perplexity")
    ax.set_title(f"{profile.model.name}: predicted vs measured ({profile.estimator})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    show(fig)
'''

TIME_MD = "## 5. Solve time vs problem size (synthetic dense profiles at 3.5 bpw; best of 3 runs, 1 in small mode)"

TIME = '''
timing = []
for n in SIZES:
    prof = profile_with_modules(n, seed=1)
    for alloc in TIMED:
        runs = []
        for _ in range(1 if SMALL else 3):
            t0 = time.perf_counter()
            plan = allocate(prof, PlanRequest(budget="3.5bpw", allocator=alloc))
            runs.append((plan.solve_seconds, time.perf_counter() - t0, plan))
        solve_s, wall_s, plan = min(runs, key=lambda r: r[0])
        timing.append({"modules": len(prof.modules), "allocator": alloc, "solve_s": solve_s, "wall_s": wall_s,
                       "predicted_error": plan.predicted_error, "status": plan.status})

best = {t["modules"]: min(u["predicted_error"] for u in timing if u["modules"] == t["modules"]) for t in timing}
print(f"{'modules':>8} {'allocator':>12} {'solve s':>9} {'allocate s':>11} {'error/best-1':>13}  status")
for t in timing:
    print(f"{t['modules']:>8} {t['allocator']:>12} {t['solve_s']:9.4f} {t['wall_s']:11.4f} "
          f"{t['predicted_error'] / best[t['modules']] - 1:13.2e}  {t['status']}")

fig, ax = plt.subplots(figsize=(7, 4.5))
for alloc in TIMED:
    pts = [(t["modules"], t["solve_s"]) for t in timing if t["allocator"] == alloc]
    ax.plot(*zip(*pts), marker="o", label=alloc)
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("modules (units) in the problem")
ax.set_ylabel("solve time (s)")
ax.set_title("solve time vs problem size (4 options per module)")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
show(fig)
'''


EVO_MD = """## 6. Measured KL: the additive allocators beside the evolutionary search

The database stores perplexity of applied checkpoints, not KL, and the evolutionary searches of the
benchmarks are not stored plans; so this section reads the benchmark results (`bench/results/`, or
`BITPLAN_BENCH_RESULTS`): `compare_*.json` (`bitplan compare --evaluate --output`: held-out perplexity and
KL(base ‖ plan) of each allocator's plan, rows kept when their plan is one of this profile's) and
`evolutionary_*.json` (`bench/evolutionary.py`: the `ilp` start and the search's result, each measured on
the same tokens). An evolutionary file is shown only if it belongs to this profile: its recorded
`profile_id` if it has one, and in any case the `ilp` plan re-solved here at its budget and granularity
must have its start's size and predicted error."""

EVO = '''
import json

RESULTS = Path(os.environ.get("BITPLAN_BENCH_RESULTS") or Path.cwd().parent / "bench" / "results")


def read_results(pattern):
    out = []
    for path in sorted(RESULTS.glob(pattern)) if RESULTS.is_dir() else []:
        try:
            out.append((path.name, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError) as e:
            print(f"skipped {path.name}: {e}")
    return out


ours = {p.id: p for p in store.list_plans(profile.id)}
additive = [dict(r, file=name) for name, doc in read_results("compare_*.json") for r in doc.get("rows", [])
            if r.get("plan_id") in ours and r.get("kl") is not None]
evolved = []
for name, doc in read_results("evolutionary_*.json"):
    if "start_predicted_error" not in doc or doc.get("profile_id", profile.id) != profile.id:
        continue
    try:  # the start must be this profile's ilp plan at the file's budget and granularity
        start = allocate(profile, PlanRequest(budget=doc["budget"], granularity=doc.get("granularity", "module")))
    except Exception:  # another model's budget or granularity: not this profile's file
        continue
    if start.total_bits == doc["start_bits"] and math.isclose(start.predicted_error, doc["start_predicted_error"],
                                                              rel_tol=1e-6, abs_tol=1e-9):
        evolved.append((name, doc, start))

if not additive and not evolved:
    print(f"No measured KL of this profile's plans in {RESULTS}: run `bitplan compare {profile.id} --evaluate "
          f"--output {RESULTS}/compare_NAME.json` and `python bench/evolutionary.py --profile {profile.id} ...`.")
if additive:
    print(f"additive allocators, measured by `bitplan compare --evaluate` ({len(additive)} plans):\\n")
    print(f"{'budget':>8} {'allocator':>12} {'bits/w':>7} {'pred.err':>9} {'KL':>8} {'perplexity':>11}  plan (file)")
    for r in sorted(additive, key=lambda r: (r["bits_per_weight"], r["allocator"])):
        print(f"{r['budget']:>8} {r['allocator']:>12} {r['bits_per_weight']:7.3f} {r['predicted_error']:9.4f} "
              f"{r['kl']:8.4f} {r['perplexity']:11.2f}  {r['plan_id']} ({r['file']})")
if evolved:
    print(f"\\nevolutionary search from the ilp optimum ({len(evolved)} runs); fitness and held-out KL on "
          "calibration text after the profile's tokens, eval KL and perplexity on the evaluation text:\\n")
    print(f"{'budget':>7} {'granularity':>13} {'plan':>12} {'bits/w':>7} {'pred.err':>9} {'fitness KL':>10} "
          f"{'held-out KL':>11} {'eval KL':>8} {'perplexity':>11} {'eval tok':>8} {'fwd tokens':>10} {'search s':>8}  file")
    for name, d, start in evolved:
        for who, bits, pred, fit, held, ev, ppl in (
                ("ilp start", d["start_bits"], d["start_predicted_error"], d["start_fitness_kl"],
                 d["start_heldout_kl"], d.get("eval_kl_start"), d["ppl_start"]),
                ("evolutionary", d["bits"], d["predicted_error"], d["fitness_kl"], d["heldout_kl"],
                 d.get("eval_kl"), d["ppl"])):
            evkl = f"{ev:8.4f}" if ev is not None else f"{'-':>8}"
            extra = (f"{d['tokens_used']:>10} {d['search_seconds']:8.0f}" if who == "evolutionary"
                     else f"{'':>10} {'':>8}")
            print(f"{d['budget']:>7} {d.get('granularity', 'module'):>13} {who:>12} {bits / profile.n_params:7.3f} "
                  f"{pred:9.4f} {fit:10.4f} {held:11.4f} {evkl} {ppl:11.2f} {d['eval_tokens']:>8} {extra}  {name}")

if additive or evolved:
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for alloc in dict.fromkeys(r["allocator"] for r in additive):
        pts = sorted((r["bits_per_weight"], r["kl"]) for r in additive if r["allocator"] == alloc)
        marker, line = styles.get(alloc, (".", "-"))
        ax.plot(*zip(*pts), marker=marker, linestyle=line, label=f"{alloc} (compare, evaluation text)", alpha=0.85)
    labelled = set()
    for i, (name, d, start) in enumerate(evolved):
        on_eval = d.get("eval_kl") is not None  # newer runs measure KL on the evaluation text too
        y0, y1 = (d["eval_kl_start"], d["eval_kl"]) if on_eval else (d["start_heldout_kl"], d["heldout_kl"])
        x0, x1 = d["start_bits"] / profile.n_params, d["bits"] / profile.n_params
        kind = "eval-text KL" if on_eval else "held-out calibration KL"
        ax.plot([x0, x1], [y0, y1], color="black", linewidth=0.8, alpha=0.6)
        ax.scatter([x0], [y0], facecolors="none", edgecolors="black", s=50,
                   label="ilp start of a search (its star's tokens)" if i == 0 else None)
        ax.scatter([x1], [y1], marker="*", s=140, color="crimson" if on_eval else "darkorange", zorder=3,
                   label=None if kind in labelled else f"evolutionary ({kind})")
        labelled.add(kind)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("measured KL(base ‖ plan), nats/token")
    ax.set_title(f"{profile.model.name}: measured KL of applied plans")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    show(fig)
'''


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [_md(INTRO), _md("## Setup: data source, database, profile"), _code(SETUP),
                _md(SWEEP_MD), _code(SWEEP), _md(MEASURED_MD), _code(MEASURED), _md(HEAT_MD), _code(HEAT),
                _md(PRED_MD), _code(PRED), _md(TIME_MD), _code(TIME), _md(EVO_MD), _code(EVO)]
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating changes nothing but what changed
        cell["id"] = f"cell-{i:02d}"
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path = HERE, timeout: int = 900) -> nbformat.NotebookNode:
    """Run `nb` top to bottom in a kernel of this interpreter (whatever kernelspecs are installed).

    Raises nbclient's CellExecutionError on the first cell that fails.
    """
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    class ThisPython(AsyncKernelManager):
        @property
        def kernel_spec(self):
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                              display_name="Python 3", language="python", resource_dir=str(cwd))

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", kernel_manager_class=ThisPython,
                            resources={"metadata": {"path": str(cwd)}}, record_timing=False)
    client.execute()
    return nb


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--execute", action="store_true", help="run the notebook and keep its outputs")
    ap.add_argument("--out", type=Path, default=NOTEBOOK, help=f"where to write it (default {NOTEBOOK})")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per cell when executing")
    args = ap.parse_args(argv)
    nb = build()
    if args.execute:
        t0 = time.perf_counter()
        execute(nb, HERE, args.timeout)
        print(f"executed in {time.perf_counter() - t0:.0f} s")
    nbformat.validate(nb)
    nbformat.write(nb, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
