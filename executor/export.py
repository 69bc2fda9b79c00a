"""Exports of a plan to what other engines read: GPTQModel/vLLM, compressed-tensors, llama.cpp.

`bitplan apply PLAN --out DIR --format bitplan|gptqmodel|compressed-tensors|llamacpp`.  Every format is
written atomically (a temporary folder, then a rename: `db.files.atomic_dir`), quantizes with the same
quantizer as our own format (`kernels/quantize.py`), and carries the plan as `bitplan_plan.json`.
`bitplan.executor.foreign.load_foreign` reads the first two back into `QuantLinear`s.

**gptqmodel** — GPTQ's packed layout, read by GPTQModel, transformers and vLLM:
`qweight` int32 `[in·b/32, out]` (code k of a column at bits `[k·b, (k+1)·b)` of the column's
little-endian bit stream, so 3-bit codes straddle words), `qzeros` int32 `[groups, out·b/32]` packed the
same way along the outputs, fp16 `scales [groups, out]`, `g_idx` int32 `[in]` = `k // group_size`
(`desc_act: false`).  Symmetric plans are GPTQ v1 (`checkpoint_format: "gptq"`, zeros stored as
zero−1, `sym: true`); a plan with any asymmetric option is written as `gptq_v2` (zeros stored as they
are, `sym` per rule), because v1 cannot store a zero of 0 (its loaders add 1 back after masking) —
transformers calls v1 symmetric-only for the same reason.  `bits`, `group_size`, `sym` at the top are
the most common option; every group of modules at another option gets one anchored `dynamic` rule
(`+:^...$`, or `-:^...$` for 16 bits) whose pattern matches both the Hugging Face names and vLLM's
fused name of the group (`qkv_proj`, `gate_up_proj`, the layer's `experts`).  GPTQModel
(`dynamic_get`) and vLLM (`get_dynamic_override`) both walk the rules in order, `re.match` each pattern
(without its `+:`/`-:`) and take the first match, a `-:` one meaning "not quantized"; the rules here
never overlap, so order cannot matter.  `group_size` -1 is per-channel.

**compressed-tensors** — `pack-quantized`, one config group per distinct (bits, group size, symmetry)
whose `targets` are the exact module names; `weight_packed` int32 `[out, ⌈in·b/32⌉]` (compressed-tensors'
dense `pack_to_int32`, as of its 0.20: code j of a row at bits `[j·b, (j+1)·b)` of the row's little-endian bit
stream, so 3-, 5- and 6-bit codes straddle words), `weight_scale [out, groups]` (fp16),
`weight_zero_point` int32 `[⌈out·b/32⌉, groups]` packed the same way along the outputs (asymmetric
only), `weight_shape` int32 `[2]`.  compressed-tensors stores signed values offset by 2^(b−1) before packing,
which is exactly our unsigned code and zero.

**llamacpp** — `tensor_types.txt` for `llama-quantize --tensor-type-file`: one line
`^blk\\.7\\.attn_q\\.weight$=q4_k` per planned GGUF tensor (lower case, fully anchored, so no two lines
match one tensor: llama.cpp `regex_search`es every line and takes the first match), the types of
`db/formats.py` (K-quant where `in_features % 256 == 0`, else Q4_0/Q5_0/Q8_0), and
`llama-quantize.sh` with the command line: from a GGUF source, requantize that file, keeping its own
types for the tensors the plan leaves out; from a Hugging Face checkpoint, convert it to an F16 GGUF
first (`convert_hf_to_gguf.py`, the user's step).  Nothing here runs llama.cpp.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections import Counter
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch
from torch import nn

from bitplan.db.files import WRITTEN_MARK, atomic_dir, write_json
from bitplan.db.types import EMBED_ROLE, InvalidInput, Module, Option, Plan, Quantizer
from bitplan.executor.apply import (_write_shards, apply_plan, check_plan_matches, check_quantizer,
                                    config_dict, quantized_weights)
from bitplan.kernels.quantize import GPTQCache, QuantizedWeight
from bitplan.db.formats import (EXPERT_ROLES, EXPORT_FORMATS, GGUF_TYPES, LLAMA_FTYPE, VLLM_FUSED, gguf_tensor_name,
                                gguf_type, stored_gguf_type, vllm_group)

log = logging.getLogger(__name__)

FORMATS = EXPORT_FORMATS
WORD = 32

# Families whose Hugging Face checkpoints (and vLLM, GPTQModel) name MoE experts otherwise than transformers 5
# does in memory (our un-fused names): Mixtral's checkpoints keep `block_sparse_moe.experts.E.w1|w3|w2`, which
# transformers' conversion mapping fuses on load; a file with `mlp.experts.E.gate_proj` is not read by it (its
# experts stay randomly initialised), nor by vLLM's or GPTQModel's Mixtral.
CHECKPOINT_NAMES = {"mixtral": ("block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"})}


def _rename(name: str, block_from: str, block_to: str, roles: dict[str, str]) -> str:
    """`model.layers.L.<block_from>.experts.E.<role>` (or its `experts`, `gate`) under `block_to`, roles mapped."""
    m = re.match(rf"^(model\.layers\.\d+)\.{block_from}\.(experts\.\d+\.(?:{'|'.join(roles)})|experts|gate)(?=\.|$)",
                 name)
    if m is None:
        return name
    leaf = m.group(2)
    if leaf.startswith("experts."):
        _, e, role = leaf.split(".")
        leaf = f"experts.{e}.{roles[role]}"
    return f"{m.group(1)}.{block_to}.{leaf}{name[m.end():]}"


def checkpoint_name(model_type: str | None, name: str) -> str:
    """The name a module or tensor has in a Hugging Face checkpoint of `model_type`, from ours."""
    if model_type not in CHECKPOINT_NAMES:
        return name
    block, roles = CHECKPOINT_NAMES[model_type]
    return _rename(name, "mlp", block, roles)


def our_name(model_type: str | None, name: str) -> str:
    """Inverse of `checkpoint_name`."""
    if model_type not in CHECKPOINT_NAMES:
        return name
    block, roles = CHECKPOINT_NAMES[model_type]
    return _rename(name, block, "mlp", {v: k for k, v in roles.items()})


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown --format {fmt!r}; choose one of {list(FORMATS)}")
    return fmt


# ------------------------------------------------------------------------------------- packing


def pack_bitstream(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes `[K, N]` -> int32 `[K·bits/32, N]`: code k of a column at bits `[k·bits, (k+1)·bits)` of the
    column's little-endian stream (GPTQ's layout; a 3-bit code may straddle two words)."""
    K, N = q.shape
    if K * bits % WORD:
        raise ValueError(f"{K} rows of {bits}-bit codes do not fill whole 32-bit words")
    q = q.to(torch.int64)
    offset = torch.arange(K, device=q.device) * bits
    word, shift = offset // WORD, offset % WORD
    out = torch.zeros(K * bits // WORD, N, dtype=torch.int64, device=q.device)
    out.index_add_(0, word, (q << shift[:, None]) & 0xFFFFFFFF)  # disjoint bit fields: add == or
    spill = shift + bits > WORD
    if spill.any():
        out.index_add_(0, word[spill] + 1, q[spill] >> (WORD - shift[spill])[:, None])
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_bitstream(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_bitstream`: int32 `[k, N]` codes."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    offset = torch.arange(k, device=packed.device) * bits
    word, shift = offset // WORD, offset % WORD
    v = words[word] >> shift[:, None]
    spill = shift + bits > WORD
    if spill.any():
        v[spill] |= words[word[spill] + 1] << (WORD - shift[spill])[:, None]
    return (v & ((1 << bits) - 1)).to(torch.int32)


def pack_words(q: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """compressed-tensors' packing (`pack_to_int32`, 0.20): along `dim`, code i at bits `[i·bits, (i+1)·bits)`
    of the row's little-endian bit stream (a 3-bit code may straddle two words), `⌈n·bits/32⌉` words."""
    q = q.to(torch.int32).movedim(dim, 0)
    n = q.shape[0]
    padded = torch.nn.functional.pad(q, (*[0, 0] * (q.dim() - 1), 0, -n % WORD))  # whole words to pack
    words = pack_bitstream(padded.reshape(padded.shape[0], -1), bits)[:-(-n * bits // WORD)]
    return words.reshape(-1, *q.shape[1:]).movedim(0, dim).contiguous()


def unpack_words(packed: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """Inverse of `pack_words`: int32 codes with `n` entries along `dim`."""
    w = packed.movedim(dim, 0)
    codes = unpack_bitstream(w.reshape(w.shape[0], -1), bits, n)
    return codes.reshape(n, *w.shape[1:]).movedim(0, dim).contiguous()


# ------------------------------------------------------------------------------------- writing


def export_plan(plan: Plan, model: nn.Module, tokenizer, planned: list[tuple[Module, nn.Linear]],
                out_dir: str | Path, fmt: str = "bitplan", *, overwrite: bool = False, progress: bool = True,
                quantizer: Quantizer = Quantizer(), hessians: Mapping[str, torch.Tensor] | None = None,
                cache: GPTQCache | None = None,
                storage_dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `plan` applied to `model` in format `fmt` to `out_dir`, atomically; returns the folder."""
    check_format(fmt)
    if fmt == "gguf":
        raise ValueError("a gguf file is written by executor.llamacpp.quantize_gguf, from the F16 GGUF")
    if fmt == "bitplan":
        return apply_plan(plan, model, tokenizer, planned, out_dir, storage_dtype=storage_dtype,
                          overwrite=overwrite, progress=progress, quantizer=quantizer, hessians=hessians,
                          cache=cache)
    check_plan_matches(planned, plan)
    modules = [m for m, _ in planned]
    if fmt == "llamacpp":
        return export_llamacpp(plan, modules, out_dir, overwrite=overwrite)
    check_embedding(plan, modules, fmt)
    modules = [m for m in modules if m.role != EMBED_ROLE]  # at 16 bits: no rule or target for it
    check_quantizer(planned, plan, quantizer, hessians, cache)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        writer = partial(_gptq_tensors, v2=gptq_v2(plan)) if fmt == "gptqmodel" else _ct_tensors
        state = _base_state(model, planned, storage_dtype)
        for module, linear, qw in quantized_weights(planned, plan, progress, quantizer, hessians, cache):
            prefix = module.name
            if qw is None:  # 16 bits: stored as in our own format
                continue
            state.pop(f"{prefix}.weight")
            state.update({f"{prefix}.{k}": v.contiguous() for k, v in writer(module, qw).items()})
        config = config_dict(model)
        model_type = config.get("model_type")
        state = {checkpoint_name(model_type, k): v for k, v in state.items()}
        _write_shards(state, tmp, {"format": "pt"})
        qc = gptq_config(plan, modules, model_type) if fmt == "gptqmodel" else \
            compressed_tensors_config(plan, modules, model_type)
        config["quantization_config"] = qc
        config["dtype"] = str(storage_dtype).removeprefix("torch.")
        write_json(tmp / "config.json", config)
        if fmt == "gptqmodel":  # GPTQModel and AutoGPTQ also read the config from here
            write_json(tmp / "quantize_config.json", qc)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / WRITTEN_MARK, plan.to_dict())
    return Path(out_dir).expanduser().resolve()


def check_embedding(plan: Plan, modules: list[Module], fmt: str) -> None:
    """GPTQ and compressed-tensors checkpoints carry no quantized embedding (GPTQModel and vLLM quantize
    linears only, a head tied to the embedding included): a plan that quantizes it is refused, never
    written as something other than the plan."""
    for m in modules:
        option = plan.assignment[m.name]
        if m.role == EMBED_ROLE and option.quantized:
            raise InvalidInput(f"--format {fmt} cannot carry a quantized embedding ({m.name} at {option.label} in "
                               f"plan {plan.id}): plan with --engine vllm, which leaves it at 16 bits, or profile with "
                               f"--embeddings keep; --format bitplan and llamacpp carry it")


def export_llamacpp(plan: Plan, modules: list[Module], out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """The llama.cpp files of `plan`: they need the planned modules' names and shapes, not their weights."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _write_llamacpp(plan, modules, tmp)
        write_json(tmp / WRITTEN_MARK, plan.to_dict())
    return Path(out_dir).expanduser().resolve()


def _base_state(model: nn.Module, planned, storage_dtype: torch.dtype) -> dict:
    """Every tensor of the model at `storage_dtype` (tied ones once), as our own format stores them."""
    state, seen = {}, set()
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            state[key] = (t.detach().to(storage_dtype) if t.is_floating_point() else t.detach()).contiguous()
    return state


def _zeros(qw: QuantizedWeight) -> torch.Tensor:
    """`[N, G]` integer zeros, symmetric ones included (2^(b−1))."""
    if qw.zeros is not None:
        return qw.zeros
    return torch.full(qw.scales.shape, 2 ** (qw.option.bits - 1), dtype=torch.int32)


# ------------------------------------------------------------------------------------ gptqmodel


def gptq_v2(plan: Plan) -> bool:
    """Any asymmetric quantized option makes the checkpoint `gptq_v2` (module docstring says why)."""
    return any(o.quantized and not o.symmetric for o in plan.assignment.values())


def _gptq_tensors(module: Module, qw: QuantizedWeight, *, v2: bool) -> dict[str, torch.Tensor]:
    N, K = qw.q.shape
    b = qw.option.bits
    if K * b % WORD or N * b % WORD:
        raise InvalidInput(f"GPTQ packs {b}-bit codes of the inputs and zeros of the outputs into whole 32-bit "
                           f"words: {module.name} is {N}x{K}; "
                           f"keep it at 16 bits (a pin '{module.name}=16') or plan with --engine vllm")
    zeros = _zeros(qw)
    stored = zeros if v2 else (zeros - 1) & ((1 << b) - 1)
    return {"qweight": pack_bitstream(qw.q.T, b), "qzeros": pack_bitstream(stored, b).T.contiguous(),
            "scales": qw.scales.T.contiguous(), "g_idx": (torch.arange(K) // qw.group_size).to(torch.int32)}


def _group_pattern(key: tuple, names: list[str], model_type: str | None = None) -> str:
    """One anchored pattern matching exactly `names` and, for a whole vLLM group, vLLM's fused name (in the
    checkpoint's names, `checkpoint_name`)."""
    if key[0] == "fused":
        _, parent, fused = key
        leaves = [n.rsplit(".", 1)[1] for n in names]
        alts = [s for s in VLLM_FUSED[fused] if s in leaves] + [fused]
        return rf"^{re.escape(checkpoint_name(model_type, parent))}\.(?:{'|'.join(alts)})$"
    if key[0] == "experts":
        roles = [_role(model_type, r) for r in EXPERT_ROLES if any(n.endswith("." + r) for n in names)]
        return rf"^{re.escape(checkpoint_name(model_type, key[1]))}(?:\.\d+\.(?:{'|'.join(roles)}))?$"
    return rf"^{re.escape(checkpoint_name(model_type, names[0]))}$"


def _role(model_type: str | None, role: str) -> str:
    """An expert projection's leaf name in the checkpoint (`gate_proj`, or Mixtral's `w1`)."""
    return CHECKPOINT_NAMES[model_type][1][role] if model_type in CHECKPOINT_NAMES else role


def dynamic_groups(plan: Plan, modules: list[Module],
                   model_type: str | None = None) -> tuple[list[tuple[str, Option]], list[str]]:
    """`[(pattern, option)]` covering every planned module exactly once (patterns in the checkpoint's names),
    and warnings for vLLM groups whose members differ (vLLM would run them at one option: plan with
    --engine vllm)."""
    groups: dict[tuple, list[Module]] = {}
    for m in modules:
        groups.setdefault(vllm_group(m), []).append(m)
    out, warnings = [], []
    for key, members in groups.items():
        options = {plan.assignment[m.name] for m in members}
        if len(options) == 1:
            out.append((_group_pattern(key, [m.name for m in members], model_type), options.pop()))
            continue
        if key[0] != "module":
            warnings.append(f"{key[1]}{'.' + key[2] if key[0] == 'fused' else ''}: vLLM runs these as one "
                            f"fused layer but the plan gives them {len(options)} options; plan with --engine vllm")
        by_role: dict[str, list[Module]] = {}
        for m in members:
            by_role.setdefault(m.name.rsplit(".", 1)[1] if key[0] == "experts" else m.name, []).append(m)
        for role, ms in by_role.items():
            opts = {plan.assignment[m.name] for m in ms}
            if key[0] == "experts" and len(opts) == 1:
                experts = re.escape(checkpoint_name(model_type, key[1]))
                out.append((rf"^{experts}\.\d+\.{_role(model_type, role)}$", opts.pop()))
            else:
                out += [(rf"^{re.escape(checkpoint_name(model_type, m.name))}$", plan.assignment[m.name]) for m in ms]
    return out, warnings


def base_option(plan: Plan) -> Option:
    """The most common quantized option (by modules; the first seen on a tie)."""
    counts = Counter(o for o in plan.assignment.values() if o.quantized)
    if not counts:
        raise InvalidInput("the plan quantizes no module; there is nothing to export as GPTQ or compressed-tensors")
    return counts.most_common(1)[0][0]


def _gptq_fields(o: Option) -> dict:
    return {"bits": o.bits, "group_size": o.group_size or -1, "sym": o.symmetric, "desc_act": False}


def gptq_config(plan: Plan, modules: list[Module], model_type: str | None = None) -> dict:
    """GPTQModel's `quantization_config`: the most common option at the top, one `dynamic` rule per other group."""
    base = base_option(plan)
    rules, warnings = dynamic_groups(plan, modules, model_type)
    dynamic = {}
    for pattern, option in rules:
        if not option.quantized:
            dynamic[f"-:{pattern}"] = {}
        elif option != base:
            dynamic[f"+:{pattern}"] = _gptq_fields(option)
    off_gptq = sorted({o.label for o in plan.assignment.values() if o.quantized and (
        o.bits not in (4, 8) or not o.symmetric or o.group_size not in (None, 32, 64, 128))})
    if off_gptq:
        # vLLM's one GPTQ loader (gptq, gptq_marlin and auto_gptq alike) checks the base config and every rule
        warnings.append(f"options {off_gptq}: vLLM loads GPTQ weights at 4/8-bit symmetric only and refuses these "
                        f"at startup; serve this plan from --format compressed-tensors (2-8 bits, either symmetry)")
    for w in warnings:
        log.warning("gptqmodel export: %s", w)
    lm_head = plan.assignment.get("lm_head")
    return {"quant_method": "gptq", "checkpoint_format": "gptq_v2" if gptq_v2(plan) else "gptq",
            **_gptq_fields(base), "static_groups": False, "true_sequential": True,
            "lm_head": bool(lm_head and lm_head.quantized), "pack_dtype": "int32", "dynamic": dynamic,
            "meta": {"quantizer": ["bitplan"], "bitplan_plan_id": plan.id}}


# ---------------------------------------------------------------------------- compressed-tensors

CT_FORMAT = "pack-quantized"


def _ct_tensors(module: Module, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    b = qw.option.bits
    N, K = qw.q.shape
    if qw.group_size and K % qw.group_size:  # compressed-tensors' dequantization raises on a partial group
        raise InvalidInput(f"compressed-tensors needs groups that divide the inputs: {module.name} has {K} inputs "
                           f"and group size {qw.group_size}; plan with --engine vllm, or pin it to another group size")
    out = {"weight_packed": pack_words(qw.q, b, dim=1), "weight_scale": qw.scales.contiguous(),
           "weight_shape": torch.tensor(qw.q.shape, dtype=torch.int32)}
    if not qw.option.symmetric:
        out["weight_zero_point"] = pack_words(qw.zeros, b, dim=0)
    return out


def ct_weights(o: Option) -> dict:
    """compressed-tensors' QuantizationArgs of an option."""
    return {"num_bits": o.bits, "type": "int", "symmetric": o.symmetric,
            "strategy": "channel" if o.group_size is None else "group", "group_size": o.group_size,
            "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
            "block_structure": None}


def compressed_tensors_config(plan: Plan, modules: list[Module], model_type: str | None = None) -> dict:
    """One config group per distinct quantized option, exact module names (the checkpoint's) as targets;
    16-bit ones ignored."""
    by_option: dict[Option, list[str]] = {}
    for m in modules:
        by_option.setdefault(plan.assignment[m.name], []).append(checkpoint_name(model_type, m.name))
    quantized = sorted((o for o in by_option if o.quantized), key=lambda o: (o.bits, o.group_size or 0, o.symmetric))
    groups = {f"group_{i}": {"targets": sorted(by_option[o]), "weights": ct_weights(o), "input_activations": None,
                             "output_activations": None, "format": CT_FORMAT}
              for i, o in enumerate(quantized)}
    _, warnings = dynamic_groups(plan, modules, model_type)
    expert_options = {plan.assignment[m.name] for m in modules if m.expert is not None}
    # no vLLM MoE kernel takes asymmetric 8-bit experts, and only Marlin MoE takes per-channel ones (4 bits or
    # 8-bit symmetric); dense linears run at 2-8 bits either way (Marlin, else Humming)
    unserved = sorted({o.label for o in expert_options if o.quantized and (
        (o.bits == 8 and not o.symmetric) or (o.group_size is None and o.bits != 4 and not (
            o.bits == 8 and o.symmetric)))})
    if unserved:
        warnings.append(f"expert options {unserved}: no vLLM MoE kernel runs them; plan with --engine vllm")
    if len(expert_options) > 1:
        warnings.append(f"experts at {len(expert_options)} options: transformers (5.25) dequantizes every expert "
                        f"of the model with one config group's scheme, so it would load them wrong; vLLM reads them")
    if any(not o.symmetric for o in quantized):
        warnings.append("asymmetric options: transformers (5.25) with compressed-tensors (0.20) loads them only with "
                        "CompressedTensorsConfig(dequantize=True), and then only when every quantized module has one "
                        "option (it dequantizes all with the first config group's scheme); vLLM reads them")
    if any(m.expert is not None for m in modules) and any(not o.symmetric for o in expert_options):
        warnings.append("asymmetric experts: transformers (5.25) does not pass their zero points to "
                        "compressed-tensors and fails to load them (transformers PR #47430)")
    for w in warnings:
        log.warning("compressed-tensors export: %s", w)
    return {"quant_method": "compressed-tensors", "format": CT_FORMAT, "quantization_status": "compressed",
            "config_groups": groups, "ignore": sorted(n for o, ns in by_option.items() if not o.quantized for n in ns),
            "kv_cache_scheme": None, "sparsity_config": {}, "global_compression_ratio": None,
            "bitplan_plan_id": plan.id}


# ------------------------------------------------------------------------------------- llama.cpp


def llamacpp_types(plan: Plan, modules: list[Module]) -> dict[str, str]:
    """GGUF tensor name -> lower-case type for every planned module; InvalidInput for a plan llama.cpp
    cannot run (experts of one tensor at different options, or a width with no GGUF type for the shape)."""
    types: dict[str, str] = {}
    for m in modules:
        option = plan.assignment[m.name]
        t = gguf_type(m.shape, option)
        if t is None and option.gguf is not None:
            raise InvalidInput(f"llama.cpp cannot store {m.name} as {option.label}: its rows of {m.shape[1]} weights "
                               f"are not whole blocks of {GGUF_TYPES[option.gguf].block} (llama-quantize would "
                               f"write {stored_gguf_type(option.gguf, m.shape[1]).upper()}); plan with --engine llamacpp")
        if t is None:
            raise InvalidInput(f"llama.cpp has no type of {option.bits} bits for {m.name} (in_features "
                               f"{m.shape[1]}: K-quants need a multiple of 256); plan with --engine llamacpp")
        tensor = gguf_tensor_name(m.name)
        if types.setdefault(tensor, t.name) != t.name:
            raise InvalidInput(f"{tensor} holds every expert of its layer, but the plan gives them {types[tensor]} "
                               f"and {t.name}; plan with --engine llamacpp")
    return types


def llamacpp_lines(types: Mapping[str, str]) -> list[str]:
    return [f"^{re.escape(tensor)}$={t}" for tensor, t in types.items()]


def source_gguf_types(source: str) -> dict[str, str] | None:
    """GGUF tensor name -> lower-case type of a GGUF source (read from its header), or None when the source
    is a Hugging Face directory or is not on this machine."""
    import gguf

    from bitplan.profiler.model import resolve

    try:
        directory, name = resolve(source)
    except InvalidInput:
        return None
    if name is None:
        return None
    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(directory / name).tensors}


def llamacpp_command(plan: Plan, types: Mapping[str, str], source: Mapping[str, str] | None = None) -> str:
    """The `llama-quantize` line for `types`.  Tensors the plan leaves out keep what the plan's size
    counted: from a GGUF `source`, the source's own types (`--allow-requantize`); from a 16-bit
    checkpoint converted to an F16 GGUF, f16."""
    quantized = [t for t in types.values() if t != "f16"]
    base = LLAMA_FTYPE[Counter(quantized).most_common(1)[0][0] if quantized else "f16"]
    keep = []
    for tensor, flag in (("token_embd.weight", "--token-embedding-type"), ("output.weight", "--output-tensor-type")):
        if tensor not in types and (source is None or tensor in source):
            keep += [flag, source[tensor] if source is not None else "f16"]
    requantize, model_in = (["--allow-requantize"], f"{plan.model.name}.gguf") if source is not None else \
        ([], "MODEL-F16.gguf")
    return shlex.join(["llama-quantize", *requantize, "--tensor-type-file", "tensor_types.txt", *keep,
                       model_in, f"{plan.model.name}-{plan.id}.gguf", base])


def _write_llamacpp(plan: Plan, modules: list[Module], tmp: Path) -> None:
    types = llamacpp_types(plan, modules)
    source = source_gguf_types(plan.model.source) if plan.model.source else None
    (tmp / "tensor_types.txt").write_text("\n".join(llamacpp_lines(types)) + "\n")
    cmd = llamacpp_command(plan, types, source)
    if source is not None:
        how = (f"# {plan.model.name} is a GGUF: quantize it again from that file (copied or linked here as\n"
               f"# {plan.model.name}.gguf).  Requantizing a quantized GGUF adds its error to the plan's; start\n"
               f"# from an F16 or BF16 GGUF of the same model if you have one.")
    else:
        how = ("# Convert the checkpoint to an F16 GGUF first (llama.cpp's convert_hf_to_gguf.py --outtype f16\n"
               "# --outfile MODEL-F16.gguf).")
    (tmp / "llama-quantize.sh").write_text(f"#!/bin/sh\n{how}\n# Then, from this folder, plan {plan.id}:\n{cmd}\n")
    (tmp / "llama-quantize.sh").chmod(0o755)
