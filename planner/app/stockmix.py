"""`bitplan compare PROFILE --against Q4_K_M,...`: bitplan against llama.cpp's own mixes, by llama.cpp's tools.

For each stock mix: `llama-quantize` makes it from the model's F16 GGUF, its real file size is read, and
bitplan plans the profile (of GGUF types, `bitplan profile --engine llamacpp`) at exactly the mix's
tensor bytes; `llama-quantize` writes the plan, and `llama-perplexity` measures both files on the same
held-out text, perplexity and KL divergence to the F16 base.  The mix's predicted error is the
profile's error of the types llama.cpp gave each tensor, so predictions rank plans and mixes alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel

from bitplan.db.formats import gguf_tensor_name, stored_gguf_type
from bitplan.db.types import InvalidInput, Profile
from bitplan.planner.app.usecases import _eval_llamacpp, run_plan
from bitplan.planner.app.workspace import Workspace
from bitplan.planner.engines import profile_engine
from bitplan.planner.request import PlanRequest

log = logging.getLogger(__name__)


class StockRow(BaseModel):
    """One GGUF file of the comparison, as llama.cpp measured it."""

    name: str  # the stock mix, or `bitplan <allocator>`, or F16 for the base
    at: str  # the mix whose size the row is matched to (its own name for a mix)
    size_bytes: int  # the real GGUF file
    perplexity: float
    kl_divergence: float | None  # to the F16 base, nats per token (None for the base itself)
    predicted_error: float | None  # the profile's, of the file's tensor types (None: a type not profiled)
    predicted_size_bytes: int | None = None  # a plan's: its tensors plus the mix file's header and metadata
    plan_id: str | None = None
    evaluation_id: str | None = None


def parse_mixes(spec: str | Sequence[str]) -> list[str]:
    from bitplan.executor.llamacpp import STOCK_MIXES

    names = [x.strip().upper() for x in (spec.split(",") if isinstance(spec, str) else spec) if x.strip()]
    unknown = [n for n in names if n not in STOCK_MIXES]
    if unknown or not names:
        raise InvalidInput(f"unknown llama.cpp mix {', '.join(unknown) or '(none given)'}; known: "
                           f"{', '.join(STOCK_MIXES)}")
    return names


def mix_error(profile: Profile, tensor_types: dict[str, str]) -> float | None:
    """The profile's predicted error of a GGUF file's tensor types (None where one is not a profiled option)."""
    index = {o.gguf: j for j, o in enumerate(profile.options)}
    total = 0.0
    for i, m in enumerate(profile.modules):
        t = tensor_types.get(gguf_tensor_name(m.name))
        if t in ("f16", "bf16", "f32"):
            continue
        j = index.get(t)
        if j is None or stored_gguf_type(t, m.shape[1]) != t:
            return None
        total += float(profile.error[i, j])
    return total


def run_stock_compare(ws: Workspace, profile: Profile, mixes: Sequence[str], *, allocators: Sequence[str] = ("ilp",),
                      eval_tokens: int | None = None) -> list[StockRow]:
    """The base, every stock mix and a bitplan plan (per allocator) at each mix's size, measured by llama.cpp."""
    from bitplan.executor.llamacpp import gguf_tensor_bytes, quantize_gguf
    from bitplan.kernels.llamacpp import check_tools

    mixes = parse_mixes(mixes)
    if profile_engine(profile) != "llamacpp":
        raise InvalidInput(f"profile {profile.id} measures bitplan's options, not GGUF types: compare against "
                           f"llama.cpp's mixes with a profile made by `bitplan profile MODEL --engine llamacpp`")
    check_tools()
    source = profile.model.source
    folder = ws.llamacpp_dir(source)
    base = ws.base_gguf(source)
    # a profile whose quantizer has an importance matrix is compared with the mixes made with that matrix
    key = profile.quantizer.imatrix
    imatrix = None if key is None else ws.imatrix(key)
    suffix = "" if key is None else f"-imatrix-{key}"
    rows = [_row(ws, "F16", "F16", base, profile, plan_id=None, source=source, eval_tokens=eval_tokens)]
    for mix in mixes:
        path = folder / f"{mix}{suffix}.gguf"
        if not path.exists():
            quantize_gguf(base, path, mix=mix, imatrix=imatrix)
        rows.append(_row(ws, mix, mix, path, profile, plan_id=None, source=source, eval_tokens=eval_tokens))
        tensors = gguf_tensor_bytes(path)
        overhead = path.stat().st_size - tensors
        for allocator in allocators:
            plan = run_plan(ws, profile, PlanRequest(budget=f"{tensors}B", allocator=allocator, engine="llamacpp"))
            out = folder / f"{plan.id}.gguf"
            if not out.exists():
                quantize_gguf(base, out, plan=plan, modules=profile.modules, imatrix=imatrix)
            row = _row(ws, f"bitplan {allocator}", mix, out, profile, plan_id=plan.id, source=source,
                       eval_tokens=eval_tokens)
            predicted = (plan.total_bits + plan.fixed_bits + 7) // 8 + overhead
            rows.append(row.model_copy(update={"predicted_size_bytes": predicted,
                                               "predicted_error": plan.predicted_error}))
            log.info("%s: %s %d B, KLD %.5f | bitplan %s %d B, KLD %.5f", mix, mix, rows[-2].size_bytes,
                     rows[-2].kl_divergence or 0, allocator, row.size_bytes, row.kl_divergence or 0)
    return rows


def _row(ws: Workspace, name: str, at: str, path, profile: Profile, *, plan_id: str | None, source: str,
         eval_tokens: int | None) -> StockRow:
    from bitplan.executor.llamacpp import gguf_tensor_types

    base_row = name == "F16"
    ev = _eval_llamacpp(ws, str(path), text=None, tokens=eval_tokens, window=None, plan_id=plan_id,
                        base=None if base_row else source)
    return StockRow(name=name, at=at, size_bytes=path.stat().st_size, perplexity=ev.perplexity,
                    kl_divergence=None if base_row else ev.kl_divergence,
                    predicted_error=0.0 if base_row else mix_error(profile, gguf_tensor_types(path)),
                    plan_id=plan_id, evaluation_id=ev.id)


def spearman(rows: Sequence[StockRow]) -> float | None:
    """Spearman ρ of the predicted error against llama.cpp's measured KL over the rows that have both."""
    from scipy.stats import spearmanr

    pairs = [(r.predicted_error, r.kl_divergence) for r in rows
             if r.predicted_error is not None and r.kl_divergence is not None]
    if len(pairs) < 3:
        return None
    rho = spearmanr(*np.array(pairs).T).statistic
    return None if np.isnan(rho) else float(rho)
