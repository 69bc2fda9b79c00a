"""Engines a plan is made for: what each can run, as unit ties, allowed options and exact sizes.

`bitplan plan --engine bitplan|vllm|llamacpp`.  An engine turns the profile's problem into the one its
runtime can serve, so the plan is exactly what the engine will run:

- `bitplan` (our own kernels): every option, every module on its own (per expert included).
- `vllm`: what vLLM serves of our `--format compressed-tensors` export, read from vLLM's source
  (v0.34.0, commit 62d4bc3c7; docs/engines.md links each rule to its lines).  Ties: vLLM loads q/k/v
  of a layer as one fused `qkv_proj` and gate/up as one `gate_up_proj` (also in a shared expert), and
  runs all routed experts of a layer as one `FusedMoE` whose quantization method is chosen once, from
  expert 0's gate/up/down, which must agree: one option for every expert *and* every matrix kind.
  Options: WNA16 takes 2 to 8 bits, symmetric or asymmetric (4/8-bit symmetric and 4-bit asymmetric
  on Marlin, the other widths on the Humming kernels vLLM ships with), group size per-channel, 32, 64
  or 128 dividing `in_features`, `in_features·bits` and `out_features·bits` multiples of 32 (codes
  packed along the inputs, zeros along the outputs, in whole int32 words).  Routed experts: no
  asymmetric 8-bit (no WNA16 MoE kernel takes it); a per-channel option only at 4 bits or 8-bit
  symmetric with `hidden % 128 == 0` (only Marlin MoE takes per-channel experts); the other widths
  with a group size (Humming).  `--format gptqmodel` is served by vLLM only when every option is
  4- or 8-bit symmetric (`AutoGPTQConfig.TYPE_MAP`; `--quantization gptq` is the same loader now):
  `vllm_allows(m, o, "gptqmodel")` is that rule, and `constrain` notes the options a plan may take
  that only the compressed-tensors export carries to vLLM.
  Sizes are the profile's (`Option.size_bits`: codes, fp16 scales, packed zeros), as the compressed-tensors
  export stores them; a GPTQ file adds `g_idx` (32 bits per input) and, for symmetric options, constant zeros.
- `llamacpp` (`--format llamacpp`, a `--tensor-type-file` for `llama-quantize`): the routed experts of a
  layer are one 3-D tensor per matrix kind (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`): ties.  The
  options are GGUF types with their exact sizes (`GGUF_TYPES`).  A K-quant (super-blocks of 256) needs
  `in_features % 256 == 0`; other modules get the legacy types (blocks of 32), which have no 2- or
  3-bit type, so they take Q4_0 at least.

**Errors of engine options.**  The profile measured our RTN options, not GGUF types: a GGUF type takes
the error of the profile's option with the same number of code bits (Q4_K and Q4_0 that of `4b/g64`,
Q2_K that of `2b/g64`, Q8_0 that of `8b/g64`), and is not offered where the profile has no option with
its bits (no 5/6-bit option profiled: no Q5_K, Q6_K); `constrain` returns notes saying so.  The
executor applies such a plan with our quantizer at those bits (`bitplan apply`), which is how its
perplexity is measured here; llama.cpp's own K-quants differ (sub-block scales, and mins for Q2_K/Q4_K).

Ties compose with `--granularity` ties and with pins: a unit is a connected component of both
partitions (`planner/plan.py:unit_of`), and may take only an option every member may.

**The embedding** (a profile made with `--embeddings plan`; with a tied head, the pair) takes 4 bits or
more (`_embedding_allows` says why), as an allowed mask like a pin's; `llamacpp` gives it a GGUF type
like any module (`token_embd.weight`); `vllm` plans leave it out, at 16 bits in the fixed bits
(`without_embedding`), as a profile made with `--embeddings keep` has it: vLLM's GPTQ loader quantizes
no embedding, and its compressed-tensors one could (a WNA16 `VocabParallelEmbedding`, in 0.33 and 0.34) but
our export writes none.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from bitplan.db.types import EMBED_MIN_BITS, EMBED_ROLE, InvalidInput, Module, Option, Profile
from bitplan.db.formats import GGUF_TYPES, gguf_type, llamacpp_group, vllm_group

log = logging.getLogger(__name__)

ENGINES = ("bitplan", "vllm", "llamacpp")

# vLLM's rules, as its v0.34.0 source has them (docs/engines.md: "vLLM's constraints, from its source")
VLLM_VERSION = "0.34.0 (62d4bc3c7)"
VLLM_ROUTES = ("compressed-tensors", "gptqmodel")
VLLM_BITS = (2, 3, 4, 5, 6, 7, 8)  # compressed-tensors WNA16_SUPPORTED_TYPES_MAP / _ZP_: sym and asym
VLLM_GPTQ_BITS = (4, 8)  # AutoGPTQConfig.TYPE_MAP: (4, sym), (8, sym) and nothing else
VLLM_GROUP_SIZES = (None, 32, 64, 128)  # MARLIN_SUPPORTED_GROUP_SIZES (-1 is per-channel)
VLLM_MOE_HIDDEN_MULTIPLE = 128  # check_moe_marlin_supports_config: hidden_size % 128 == 0


def profile_engine(profile: Profile) -> str:
    """The engine a profile's plans are for unless told: llamacpp for GGUF options, else bitplan."""
    return "llamacpp" if any(o.gguf is not None for o in profile.options) else "bitplan"


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise InvalidInput(f"unknown engine {engine!r}; known: {list(ENGINES)}")
    return engine


def tie_keys(modules: Sequence[Module], engine: str) -> list[tuple]:
    """One key per module; modules with equal keys must share one option under `engine`."""
    check_engine(engine)
    if engine == "vllm":
        return [vllm_group(m) for m in modules]
    if engine == "llamacpp":
        return [llamacpp_group(m) for m in modules]
    return [("module", m.name) for m in modules]


def _embedding_allows(m: Module, o: Option) -> bool:
    """The embedding (a tied pair too) takes no option under EMBED_MIN_BITS, on every engine.

    Why not 2 or 3 bits (docs/embeddings.md): the estimators see the lookup only through the calibration
    text's tokens (4,096 tokens of the embedded model's text read 1,155 of its 49,152 rows), so the error
    of every other row is invisible to the profile and would be the planner's to take for free; and on
    the embedded model the embedding alone at 2 bits took perplexity from 34.6 to 3,047, at 3 bits cost
    four times the KL of 4 bits.
    """
    return m.role != EMBED_ROLE or not o.quantized or o.bits >= EMBED_MIN_BITS


def vllm_allows(m: Module, o: Option, route: str = "compressed-tensors") -> bool:
    """Whether vLLM (VLLM_VERSION) runs module `m` at option `o` from our `route` export.

    `compressed-tensors` (the `vllm` engine's rule): WNA16 at 2-8 bits, symmetric or not.  Routed experts:
    never asymmetric 8-bit (Marlin MoE and Triton take int8 symmetric only, and the key vLLM gives 8-bit
    MoE scales, a group of -1, is not one Humming's integer check accepts: no backend is left); a
    per-channel option only where Marlin MoE runs it (4 bits, or 8 symmetric; hidden % 128 == 0), since
    every other MoE backend asserts `strategy == "group"`; 2/3/5/6/7 bits grouped, on Humming.
    `gptqmodel`: vLLM's AutoGPTQ loader, 4/8-bit symmetric only, experts included.
    Both: group per-channel/32/64/128 dividing `in_features`, codes and zeros in whole int32 words.
    """
    if route not in VLLM_ROUTES:
        raise InvalidInput(f"unknown vLLM route {route!r}; known: {list(VLLM_ROUTES)}")
    if not o.quantized:
        return True
    out_f, in_f = m.shape
    # codes packed along the inputs and zeros along the outputs into whole int32 words
    if in_f * o.bits % 32 or out_f * o.bits % 32:
        return False
    if o.group_size not in VLLM_GROUP_SIZES or (o.group_size is not None and in_f % o.group_size):
        return False
    if route == "gptqmodel":
        return o.bits in VLLM_GPTQ_BITS and o.symmetric
    if o.bits not in VLLM_BITS:
        return False
    if m.expert is None:
        return True
    if o.bits == 8 and not o.symmetric:
        return False
    if o.group_size is None:
        hidden = out_f if m.role == "down_proj" else in_f
        return (o.bits == 4 or (o.bits == 8 and o.symmetric)) and hidden % VLLM_MOE_HIDDEN_MULTIPLE == 0
    return True


def _vllm_allows(m: Module, o: Option) -> bool:
    return vllm_allows(m, o, "compressed-tensors")


def constrain(profile: Profile, engine: str) -> tuple[Profile, np.ndarray, list[str]]:
    """`(profile with the engine's exact sizes, allowed [M, O], notes)`; InvalidInput for a module the
    engine can run at none of the profile's options."""
    check_engine(engine)
    if profile_engine(profile) == "llamacpp" and engine != "llamacpp":
        raise InvalidInput(f"this profile's options are GGUF types ({', '.join(o.label for o in profile.options)}), "
                           f"which llama.cpp runs, not {engine}: plan it with --engine llamacpp")
    if engine == "vllm":
        profile = without_embedding(profile)
    M, O = profile.error.shape
    allowed = np.ones((M, O), dtype=bool)
    notes: list[str] = []
    for i, m in enumerate(profile.modules):
        if m.role == EMBED_ROLE:
            allowed[i] = [_embedding_allows(m, o) for o in profile.options]
    if engine == "bitplan":
        _check_some(profile, allowed, engine, f"the embedding takes {EMBED_MIN_BITS} bits or more")
        return profile, allowed, notes
    if engine == "vllm":
        for i, m in enumerate(profile.modules):
            allowed[i] &= [_vllm_allows(m, o) for o in profile.options]
        _check_some(profile, allowed, engine, "2-8 bits (routed experts: not asymmetric 8-bit), group size "
                                              "32/64/128/per-channel dividing in_features, dimensions x bits multiples of 32")
        ct_only = sorted({o.label for i, m in enumerate(profile.modules) for j, o in enumerate(profile.options)
                          if allowed[i, j] and o.quantized and not vllm_allows(m, o, "gptqmodel")})
        if ct_only:
            notes.append(f"options {', '.join(ct_only)} reach vLLM {VLLM_VERSION} only through --format "
                         f"compressed-tensors: its GPTQ loader (--format gptqmodel) takes 4/8-bit symmetric only")
        for n in notes:
            log.info("vllm engine: %s", n)
        return profile, allowed, notes
    size = profile.size_bits.copy()
    for i, m in enumerate(profile.modules):
        for j, o in enumerate(profile.options):
            t = gguf_type(m.shape, o)
            allowed[i, j] &= t is not None
            if t is not None:
                size[i, j] = t.size_bits(*m.shape)
    _check_some(profile, allowed, engine, "GGUF types Q2_K..Q6_K, Q8_0 (in_features % 256 == 0) or Q4_0/Q5_0/Q8_0 "
                                          "(in_features % 32 == 0)")
    profiled = {o.bits for o in profile.options}
    missing = sorted(name for name, t in GGUF_TYPES.items() if t.code_bits not in profiled and t.code_bits != 16)
    if missing and profile_engine(profile) == "bitplan":
        notes.append(f"the profile measures no option with the bits of {', '.join(missing)}: the plan cannot use "
                     f"them (profile with --options including {sorted({GGUF_TYPES[n].code_bits for n in missing})})")
    for n in notes:
        log.info("llamacpp engine: %s", n)
    return profile.model_copy(update={"size_bits": size}), allowed, notes


def without_embedding(profile: Profile) -> Profile:
    """`profile` with the embedding moved out of the modules into `fixed_bits` at 16 bits, as `--embeddings
    keep` profiles it: for vLLM, whose GPTQ loader quantizes no embedding (nor a head tied to one), and
    whose compressed-tensors one could but is given none by our export, so a plan for it leaves the
    embedding as it is."""
    keep = [i for i, m in enumerate(profile.modules) if m.role != EMBED_ROLE]
    if len(keep) == len(profile.modules):
        return profile
    out = [m for m in profile.modules if m.role == EMBED_ROLE]
    update = {"modules": [profile.modules[i] for i in keep], "error": profile.error[keep],
              "size_bits": profile.size_bits[keep], "fixed_bits": profile.fixed_bits + sum(16 * m.numel for m in out)}
    if profile.latency is not None:
        update["latency"] = profile.latency[keep]
    if getattr(profile, "estimated", None):
        update["estimated"] = {k: v for k, v in profile.estimated.items() if k not in {m.name for m in out}}
    return profile.model_copy(update=update)


def _check_some(profile: Profile, allowed: np.ndarray, engine: str, rule: str) -> None:
    none = np.flatnonzero(~allowed.any(axis=1))
    if none.size:
        m = profile.modules[int(none[0])]
        if m.role == EMBED_ROLE:
            raise InvalidInput(f"the embedding {m.name} takes {EMBED_MIN_BITS} bits or more, and the profile's options "
                               f"{[o.label for o in profile.options]} have none that the {engine} engine runs; "
                               f"profile with --options including 4, 8 or 16, or with --embeddings keep")
        raise InvalidInput(f"the {engine} engine can run module {m.name} {list(m.shape)} at none of the profile's "
                           f"options {[o.label for o in profile.options]} ({rule}); profile with --options "
                           f"including 8 or 16, or plan with --engine bitplan")
