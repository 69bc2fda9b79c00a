"""The `calibrated` estimator: a cheap estimator's table, rescaled per module to measured end-to-end KL.

HIGGS's "linearity theorem" says the loss increase of a quantized model is close to a weighted sum
of per-layer terms, `Δloss ≈ Σ_l α_l · t_l²` with `t_l` the relative weight error of layer `l` and
`α_l` a per-layer constant.  A cheap estimator (`fisher`, `hessian`) gets the *shape* of each row
right (how a module's error grows as bits drop: `t²` up to the grid) but not its *scale*: `hessian`
stops at the layer output, and even `fisher`'s second-order term misjudges how much the network
amplifies or absorbs a module's error.  So each module's row is rescaled by one factor fitted to the
truth at a few points:

    α_m = geometric mean over the measured options o of  KL_m(o) / cheap_m(o)
    calibrated[m, o] = KL_m(o)              where measured
                       α_m · cheap[m, o]    elsewhere

`KL_m(o)` is the mean per-token KL(base ‖ model with only module m quantized at o) (profiler/kl.py),
one forward pass of the blocks from m's layer on per module and measured option: by default the two
lowest bit widths, where the error is far above the measurement's noise.  That is 2 passes per module
instead of `kl`'s one per option, and the additive model now sums end-to-end loss terms, not
layer-output ones.

**Thinly measured modules.**  An MoE expert's measured KL comes only from the tokens routed to it in
the KL sample (`DEFAULT_KL_TOKENS`, a prefix of the calibration text), and a rarely routed expert gets
few or none there even when the cheap estimator's longer sample reaches it.  A KL of 0 over tokens
that never reached the expert is an absence of evidence, not a free module: trusted as it stands, it
sends the expert to the lowest width.  So where fewer than `MIN_KL_TOKENS` routed tokens stand
behind a module's measurement, none of its measured points are kept: its whole row is `α · cheap`
with `α` borrowed from its siblings (the median `α` of the well-measured experts of its layer and
role; failing those, of the well-measured modules of its role; failing those, of all), so its own
cheap row still sets its shape and size relative to the siblings.  And a measured 0 at a quantized
option whose cheap error is > 0 (however many tokens) becomes `α · cheap` there.  Both are listed in
the result's `estimated` (the Profile's `estimated`, with the reason).  The token rule never touches a
dense module (it sees every token of the sample); the zero rule can.

**A sample of the experts.**  Measuring every routed expert makes the estimator's cost grow with the
experts: two passes each, about 90,000 for DeepSeek-V3.  With `experts=K` only K experts of each layer
and role are measured, picked at evenly spaced ranks of their routed tokens in the KL sample (the
busiest first, none below `MIN_KL_TOKENS`); the others take the median α of the measured ones, as a
thinly measured expert does, and their own cheap rows keep their shapes and their differences.  The
passes are then bounded per layer: `points × (dense modules + K × expert roles)`, whatever the number
of experts.  The profile's `estimated` names every expert so estimated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bitplan.db.formats import GGUF_TYPES
from bitplan.db.types import Module, Option, Quantizer
from bitplan.kernels.quantize import GPTQCache
from bitplan.profiler.cluster import Cluster
from bitplan.profiler.kl import kl_table
from bitplan.profiler.moe import expert_set_name

log = logging.getLogger(__name__)

DEFAULT_POINTS = 2  # measured options per module: the lowest bit widths
# Routed tokens below which an expert's own measured KL is not trusted (module docstring).  That KL is
# a mean over the tokens routed to the expert, and per-token KL is heavy-tailed (tiny-mixtral, 2-bit
# down_proj: cv 2.2 over an expert's routed tokens, median of 40 experts).  Resampling n of the routed
# tokens of its well-routed experts, the log of the mean is off by 1.08 (RMS) at n = 4 and 0.82 at 8,
# and it is usually low (median -0.49 at 4, -0.30 at 8: it errs towards "cheap", the failure at hand);
# the siblings' α, the alternative, is off by about their spread, std of log α 1.07 within a layer and
# role (median over layers and roles, 512-token KL sample, GPTQ).  From 8 tokens on an expert's own
# measurement is clearly the better of the two.
MIN_KL_TOKENS = 8


def calibration_points(options: list[Option], points: int = DEFAULT_POINTS, widths: Sequence[int] = ()) -> list[int]:
    """Indices of `points` quantized options, one per code width, fewest bits first: two widths say more
    about how a module's KL grows than two group sizes of one width.  Within a width, the first listed
    (`parse_options` lists groups smallest first).

    GGUF types (`Option.gguf`): only those that store rows of every width in `widths` as themselves, the
    smallest of a width first.  A K-quant on a row that is not whole super-blocks is stored as another type
    (SmolLM2's rows of 576 turn Q2_K and Q3_K into Q4_0), so measuring it there measures that type twice.
    """
    quantized = [i for i, o in enumerate(options) if o.quantized]
    gguf = any(options[i].gguf for i in quantized)
    if gguf:
        quantized = [i for i in quantized if all(GGUF_TYPES[options[i].gguf].fits(w) for w in widths)]

    def key(i: int) -> tuple:
        return (options[i].bits, GGUF_TYPES[options[i].gguf].bits_per_weight if gguf else 0, i)

    first: dict[int, int] = {}
    for i in sorted(quantized, key=key):
        first.setdefault(options[i].bits, i)
    return sorted(sorted(first.values(), key=key)[:points])


@dataclass(frozen=True)
class Rescaled:
    """The rescaled `error [M, O]`, each row's `alpha [M]`, and `estimated`: row -> why that row is an
    estimate rather than a measurement where measured (module docstring).  Unpacks as `(error, alpha)`."""

    error: np.ndarray
    alpha: np.ndarray
    estimated: dict[int, str]

    def __iter__(self):
        return iter((self.error, self.alpha))


def _prior_alphas(alpha: np.ndarray, trusted: np.ndarray,
                  modules: Sequence[Module] | None) -> tuple[np.ndarray, list[str]]:
    """Per module, the median α of its nearest well-measured relatives, and where it came from.

    Siblings first (the routed experts of the same layer and role: one router, one position in the
    network, the same kind of matrix), then the same role anywhere (experts with experts, dense with
    dense), then every trusted module; with none at all, 1 (the cheap table as it is).
    """
    M = len(alpha)
    everyone = np.median(alpha[trusted]) if trusted.any() else 1.0
    every_why = f"the median of all {int(trusted.sum())} well-measured modules" if trusted.any() else \
        "no well-measured module: the cheap estimate unscaled"
    if modules is None:
        return np.full(M, everyone), [every_why] * M
    by: dict[tuple, list[int]] = {}
    for i, m in enumerate(modules):
        if trusted[i]:
            routed = m.expert is not None
            by.setdefault(("role", m.role, routed), []).append(i)
            if routed:
                by.setdefault(("siblings", m.layer, m.role), []).append(i)
    prior, why = np.full(M, everyone), [every_why] * M
    for i, m in enumerate(modules):
        keys = [("role", m.role, m.expert is not None)]
        if m.expert is not None:
            keys.insert(0, ("siblings", m.layer, m.role))
        for key in keys:
            if idx := [j for j in by.get(key, []) if j != i]:
                prior[i] = np.median(alpha[idx])
                what = (f"experts of layer {m.layer}'s {m.role}" if key[0] == "siblings"
                        else f"{'expert ' if key[2] else ''}{m.role} modules")
                why[i] = f"the median of {len(idx)} well-measured {what}"
                break
    return prior, why


def rescale(cheap: np.ndarray, measured: np.ndarray, points: list[int], *,
            modules: Sequence[Module] | None = None, routed: Sequence[int] | np.ndarray | None = None,
            min_tokens: int = MIN_KL_TOKENS, labels: Sequence[str] | None = None,
            unmeasured: Sequence[bool] | np.ndarray | None = None) -> Rescaled:
    """`(calibrated [M, O], alpha [M])` from a cheap table and KL measured at option columns `points`.

    `routed[m]`: the routed tokens behind module m's measurement (None: every row is well measured);
    below `min_tokens` the row is the siblings' α times its cheap row, measured points included
    (module docstring; `modules` say who the siblings are); so is a row of `unmeasured` (an expert left
    out of the sample: its row of `measured` is ignored).  A module whose cheap error is zero at
    every measured point (nothing to scale), or whose KL is not > 0 at any, takes its siblings' α the
    same way, so its unmeasured options are neither zeroed nor inflated.  A measured point that is 0
    where the cheap error is > 0 is `α · cheap` instead.  `estimated` names every row changed so
    (`labels`: the options' names, for those reasons).
    """
    cheap = np.asarray(cheap, float)
    measured = np.asarray(measured, float)
    c = cheap[:, points]
    ok = (c > 0) & (measured > 0)
    logs = np.where(ok, np.log(np.where(ok, measured, 1.0) / np.where(ok, c, 1.0)), 0.0)
    n = ok.sum(axis=1)
    alpha = np.exp(np.divide(logs.sum(axis=1), n, out=np.zeros(len(n)), where=n > 0))
    skipped = np.zeros(len(n), bool) if unmeasured is None else np.asarray(unmeasured, bool)
    thin = (np.zeros(len(n), bool) if routed is None else np.asarray(routed) < min_tokens) & ~skipped
    trusted = (n > 0) & ~thin & ~skipped
    estimated: dict[int, str] = {}
    if not trusted.all():
        prior, source = _prior_alphas(alpha, trusted, modules)
        alpha = np.where(trusted, alpha, prior)
        for i in np.flatnonzero(thin):
            estimated[int(i)] = (f"{int(routed[i])} routed tokens behind its measured KL (< {min_tokens}): "
                                 f"α {alpha[i]:.3g} times its cheap error, α {source[i]}")
        for i in np.flatnonzero(skipped):
            estimated[int(i)] = (f"not in the sample of experts measured: α {alpha[i]:.3g} times its cheap "
                                 f"error, α {source[i]}")
        thin = thin | skipped
        for i in np.flatnonzero(~thin & (n == 0) & (cheap > 0).any(axis=1) & (c <= 0).all(axis=1)):
            estimated[int(i)] = (f"cheap error 0 at every measured point, nothing to fit: α {alpha[i]:.3g} times "
                                 f"its cheap error elsewhere, α {source[i]}")
    out = alpha[:, None] * cheap
    rows = ~thin
    out[np.ix_(rows, points)] = np.maximum(measured[rows], 0.0)
    # a quantized option costs something wherever the cheap estimator saw it cost something
    zero = np.zeros_like(out, bool)
    zero[:, points] = (out[:, points] <= 0) & (c > 0)
    out[zero] = (alpha[:, None] * cheap)[zero]
    for i in np.flatnonzero(zero.any(axis=1)):
        fit = "its own from its other points" if trusted[i] else source[i]
        at = [labels[j] if labels else f"option {j}" for j in np.flatnonzero(zero[i])]
        estimated[int(i)] = (f"measured KL 0 at {', '.join(at)} where its cheap error is > 0: "
                             f"α {alpha[i]:.3g} times its cheap error there, α {fit}")
    return Rescaled(out, alpha, estimated)


def expert_sample(modules: Sequence[Module], routed_tokens: dict[str, np.ndarray], experts: int,
                  min_tokens: int = MIN_KL_TOKENS) -> list[int]:
    """Indices of the modules `calibrate` measures with `experts=K`: every dense module, and of each layer's
    routed experts per role the K at evenly spaced ranks of routed tokens (the busiest first), among those
    with at least `min_tokens` (fewer would not be trusted anyway: `rescale`)."""
    if experts < 1:
        raise ValueError(f"experts must be >= 1, not {experts}")
    groups: dict[tuple, list[int]] = {}
    keep = []
    for i, m in enumerate(modules):
        if m.expert is None:
            keep.append(i)
        else:
            groups.setdefault((expert_set_name(m), m.role), []).append(i)
    for (name, _), idx in groups.items():
        tokens = np.asarray(routed_tokens[name])
        ranked = sorted(idx, key=lambda i: (-tokens[modules[i].expert], modules[i].expert))
        ranked = [i for i in ranked if tokens[modules[i].expert] >= min_tokens] or ranked
        picks = np.unique(np.round(np.linspace(0, len(ranked) - 1, min(experts, len(ranked)))).astype(int))
        keep += [ranked[j] for j in picks]
    return sorted(keep)


@torch.no_grad()
def calibrate(model: nn.Module, planned: list[tuple[Module, nn.Linear]], options: list[Option],
              cheap: np.ndarray, batches: torch.Tensor, *, points: int = DEFAULT_POINTS,
              quantizer: Quantizer = Quantizer(),
              device: str = "cpu", progress: bool = True,
              hessian_batches: torch.Tensor | None = None,
              cache: GPTQCache | None = None, min_tokens: int = MIN_KL_TOKENS,
              importance: dict[str, np.ndarray] | None = None, experts: int | None = None,
              routed_tokens: dict[str, np.ndarray] | None = None, cluster: Cluster | None = None) -> Rescaled:
    """Measure KL at the calibration points of every planned module and rescale `cheap` (module docstring).

    `experts`: measure only that many routed experts per layer and role, chosen by `routed_tokens` (expert
    set name -> tokens per expert over `batches`, `profile.routing_stats`: needed with `experts`); None
    measures every module.

    `hessian_batches`: the calibration text GPTQ's `H` comes from (default `batches`); pass the text the
    cheap table was made on, so that the measured points use the same ΔW as the rest of the row; for the
    same reason `importance` is the llamacpp quantizer's, as the cheap table's.
    `cluster`: the KL points are measured on its workers (profiler/cluster.py).
    The result's `estimated` maps row indices of `planned` to why the row is an estimate.
    """
    cols = calibration_points(options, points, widths=sorted({m.shape[1] for m, _ in planned}))
    if not cols:
        return Rescaled(np.asarray(cheap, float), np.ones(len(planned)), {})
    routing: dict = {}
    total = batches.numel()
    sample = expert_sample([m for m, _ in planned], routed_tokens, experts, min(min_tokens, total)) \
        if experts is not None else list(range(len(planned)))
    measured = np.zeros((len(planned), len(cols)))
    measured[sample] = kl_table(model, [planned[i] for i in sample], [options[i] for i in cols], batches,
                                quantizer=quantizer, device=device, progress=progress,
                                hessian_batches=hessian_batches, cache=cache, routing=routing, importance=importance,
                                cluster=cluster)
    routed = [total if m.expert is None else int(routing[expert_set_name(m)].tokens[m.expert])
              for m, _ in planned]
    unmeasured = np.ones(len(planned), bool)
    unmeasured[sample] = False
    # a dense module is never thin, even in a sample smaller than the threshold
    result = rescale(cheap, measured, cols, modules=[m for m, _ in planned], routed=routed,
                     min_tokens=min(min_tokens, total), labels=[o.label for o in options], unmeasured=unmeasured)
    alpha = result.alpha
    log.info("calibrated %d modules at %s: alpha median %.3g, range %.3g..%.3g", len(planned),
             [options[i].label for i in cols], np.median(alpha), alpha.min(), alpha.max())
    if result.estimated:
        names = [planned[i][0].name for i in sorted(result.estimated)]
        log.warning("%d modules' calibrated rows are estimated, not measured (few routed tokens in the %d-token "
                    "KL sample, or a measured KL of 0): %s%s", len(names), total, ", ".join(names[:8]),
                    ", ..." if len(names) > 8 else "")
    return result
