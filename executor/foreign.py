"""Read GPTQ (`--format gptqmodel`) and compressed-tensors (`pack-quantized`) checkpoints back into
`QuantLinear`s: each module's codes, scales and zeros are unpacked and repacked into our layout in memory,
so the model computes exactly what the plan's own checkpoint computes.

Tensor names and the config's rules are the checkpoint's (`export.checkpoint_name`: Mixtral's experts
are `block_sparse_moe.experts.E.w1|w3|w2` there), mapped back to the skeleton's un-fused names here.

`load_foreign(path)` is the entry point (`read_foreign_config` says whether a folder is one of these).
Each module's option is resolved as the engines resolve it: GPTQ's top-level config overridden by the
first `dynamic` rule whose pattern `re.match`es the module name (`-:` = not quantized), as GPTQModel's
`dynamic_get` and vLLM's `get_dynamic_override`; compressed-tensors' config group whose targets name the
module (exact name first, then `re:` patterns, then the class name `Linear`).  What is not ours to read
fails with a one-line error: act-order (`g_idx` other than `k // group_size`), widths or group sizes our
kernels do not have, a GPTQ v1 zero that does not fit its bits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from bitplan.db.types import InvalidInput, NotACausalLM, Option
from bitplan.executor.export import checkpoint_name, our_name, unpack_bitstream, unpack_words
from bitplan.executor.quant_linear import QuantLinear
from bitplan.kernels.quantize import QuantizedWeight

FOREIGN_METHODS = ("gptq", "compressed-tensors")


def read_foreign_config(path: str | Path) -> dict | None:
    """The checkpoint's `quantization_config` if it is GPTQ or compressed-tensors, else None."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    qc = json.loads(cfg.read_text()).get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") in FOREIGN_METHODS else None


# ----------------------------------------------------------------------------------- options


def dynamic_match(dynamic: dict, name: str) -> dict | bool | None:
    """The first `dynamic` rule matching `name`: its overrides, False for a `-:` rule, None if none matches."""
    for pattern, overrides in (dynamic or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern.removeprefix("-:"), name):
                return False
        elif re.match(pattern.removeprefix("+:"), name):
            return overrides
    return None


def _option(bits, group_size, sym, where: str) -> Option:
    try:
        return Option(bits=int(bits), group_size=None if group_size in (-1, None) else int(group_size),
                      symmetric=bool(sym))
    except ValueError as e:
        raise InvalidInput(f"{where}: bits {bits}, group size {group_size} is not an option bitplan can run "
                           f"({' '.join(str(e).split())[:120]})") from e


def gptq_option(qc: dict, name: str) -> Option | None:
    """The option GPTQModel/vLLM give module `name` (None: kept in 16 bits by a `-:` rule)."""
    rule = dynamic_match(qc.get("dynamic"), name)
    if rule is False:
        return None
    rule = rule or {}
    get = lambda k, default: rule.get(k, qc.get(k, default))  # noqa: E731
    if get("desc_act", False):
        raise InvalidInput(f"{name}: act-order (desc_act) GPTQ checkpoints are not supported")
    return _option(get("bits", None), get("group_size", -1), get("sym", True), name)


def ct_option(qc: dict, name: str) -> Option:
    """The option of module `name` from the compressed-tensors config group that targets it."""
    groups = qc.get("config_groups") or {}

    def find(test):
        return next((g for g in groups.values() if any(test(t) for t in g.get("targets", []))), None)

    group = (find(lambda t: t == name) or find(lambda t: t.startswith("re:") and re.match(t[3:], name))
             or find(lambda t: t == "Linear"))
    if group is None:
        raise InvalidInput(f"{name} has packed weights but no config group targets it")
    w = group.get("weights") or {}
    if w.get("type", "int") != "int" or w.get("strategy") not in ("group", "channel"):
        raise InvalidInput(f"{name}: only int weights with group or channel strategy are supported, got {w}")
    return _option(w.get("num_bits"), w.get("group_size") if w.get("strategy") == "group" else None,
                   w.get("symmetric", True), name)


# ---------------------------------------------------------------------------------- decoding


def decode_gptq(state: dict, name: str, option: Option, v2: bool) -> QuantizedWeight:
    qweight, qzeros, scales = state.pop(f"{name}.qweight"), state.pop(f"{name}.qzeros"), state.pop(f"{name}.scales")
    g_idx = state.pop(f"{name}.g_idx", None)
    b, N = option.bits, qweight.shape[1]
    K = qweight.shape[0] * 32 // b
    gs = option.group_size or K
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(K) // gs):
        raise InvalidInput(f"{name}: g_idx is not k // group_size (act-order); not supported")
    q = unpack_bitstream(qweight, b, K).T.contiguous()
    zeros = unpack_bitstream(qzeros.T, b, N)  # packed along the outputs: [G, N·b/32] -> [N, G]
    if not v2:
        zeros = zeros + 1  # v1 stores zero - 1 and adds 1 back after unmasking
    if option.symmetric:
        if not torch.all(zeros == 2 ** (b - 1)):
            raise InvalidInput(f"{name}: symmetric GPTQ with zeros other than {2 ** (b - 1)}; not supported")
        zeros = None
    elif zeros.max() >= 2**b:
        raise InvalidInput(f"{name}: a GPTQ v1 zero of 0 cannot be stored (it reads back as {2**b}); "
                           "export asymmetric plans as gptq_v2")
    return QuantizedWeight(q=q, scales=scales.T.to(torch.float16).contiguous(), zeros=zeros, option=option)


def decode_ct(state: dict, name: str, option: Option) -> QuantizedWeight:
    packed, scale = state.pop(f"{name}.weight_packed"), state.pop(f"{name}.weight_scale")
    N, K = (int(x) for x in state.pop(f"{name}.weight_shape").tolist())
    zp = state.pop(f"{name}.weight_zero_point", None)
    state.pop(f"{name}.weight_g_idx", None)
    q = unpack_words(packed, option.bits, K, dim=1)
    zeros = None
    if not option.symmetric:
        if zp is None:
            raise InvalidInput(f"{name}: asymmetric weights without weight_zero_point")
        zeros = unpack_words(zp, option.bits, N, dim=0)
    return QuantizedWeight(q=q, scales=scale.to(torch.float16).reshape(N, -1).contiguous(), zeros=zeros,
                           option=option)


# ----------------------------------------------------------------------------------- loading


def load_foreign(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """`(model, tokenizer, quantization_config)` from a GPTQ or compressed-tensors checkpoint folder."""
    from bitplan.executor.load import finish, read_weights, skeleton, tokenizer_of

    path = Path(path).expanduser()
    qc = read_foreign_config(path)
    if qc is None:
        raise NotACausalLM(f"{path} is not a GPTQ or compressed-tensors checkpoint (quant_method not in "
                           f"{list(FOREIGN_METHODS)} in config.json)")
    model = skeleton(path, dtype)
    model_type = model.config.model_type
    # the checkpoint's names (Mixtral's `block_sparse_moe.experts.E.w1`) back to the skeleton's
    state = {our_name(model_type, k): v for k, v in read_weights(path).items()}
    gptq = qc["quant_method"] == "gptq"
    suffix = ".qweight" if gptq else ".weight_packed"
    v2 = qc.get("checkpoint_format") == "gptq_v2"
    quantized = sorted(k.removesuffix(suffix) for k in list(state) if k.endswith(suffix))
    for name in quantized:
        hf_name = checkpoint_name(model_type, name)  # what the config's rules and targets name
        option = gptq_option(qc, hf_name) if gptq else ct_option(qc, hf_name)
        if option is None or not option.quantized:
            raise InvalidInput(f"{name} has packed weights but the config keeps it in 16 bits")
        qw = decode_gptq(state, name, option, v2) if gptq else decode_ct(state, name, option)
        bias = state.pop(f"{name}.bias", None)
        model.set_submodule(name, QuantLinear.from_quantized(qw, None if bias is None else bias.to(dtype)))
    filled = tuple(f"{name}." for name in quantized)  # QuantLinears were built whole above
    return finish(model, state, path, dtype, device, filled), tokenizer_of(path), qc
