"""Load a checkpoint written by `apply`: build the model skeleton, swap in `QuantLinear`, load the buffers.

Built gpt-fast style: skeleton without weight initialisation, fused MoE experts un-fused into per-expert
linears (the names `apply` wrote), quantized modules swapped in by name from `quantization_config`,
then the state dict loaded; tied weights are tied again afterwards.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import load_file

from bitplan.db.types import InvalidInput, NotACausalLM, Option
from bitplan.executor.apply import QUANT_METHOD
from bitplan.executor.quant_linear import QuantEmbedding, QuantLinear, QuantTiedHead, fuse_quantized_experts
from bitplan.profiler.model import tied_head
from bitplan.profiler.moe import unfuse_experts

log = logging.getLogger(__name__)


def read_quantization_config(path: str | Path) -> dict | None:
    """The checkpoint's `quantization_config` if bitplan wrote it, else None."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    qc = json.loads(cfg.read_text()).get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD else None


def is_quantized(path: str | Path) -> bool:
    """A checkpoint `load_quantized` reads: ours, or a GPTQ / compressed-tensors one."""
    from bitplan.executor.foreign import read_foreign_config
    return read_quantization_config(path) is not None or read_foreign_config(path) is not None


def checkpoint_plan_id(path: str | Path) -> str | None:
    """The plan a checkpoint was written from: our config's `plan_id`, or an export's `bitplan_plan.json`."""
    qc = read_quantization_config(path)
    if qc is not None:
        return qc.get("plan_id")
    from bitplan.db.files import WRITTEN_MARK

    plan_file = Path(path) / WRITTEN_MARK
    return json.loads(plan_file.read_text()).get("id") if plan_file.is_file() else None


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """`(model, tokenizer, quantization_config)` from a bitplan checkpoint directory (or a GPTQ /
    compressed-tensors one: `executor/foreign.py`)."""
    path = Path(path).expanduser()
    qc = read_quantization_config(path)
    if qc is None:
        from bitplan.executor.foreign import load_foreign, read_foreign_config
        if read_foreign_config(path) is not None:  # our gptqmodel / compressed-tensors exports, and theirs
            return load_foreign(path, dtype, device)
        raise NotACausalLM(f"{path} is not a bitplan, GPTQ or compressed-tensors checkpoint (no quantization_config "
                           f"with quant_method {QUANT_METHOD!r}, gptq or compressed-tensors in config.json)")
    model = skeleton(path, dtype)
    swap_quantized(model, qc["modules"], dtype)
    return finish(model, read_weights(path), path, dtype, device), tokenizer_of(path), qc


def swap_quantized(model: nn.Module, modules: dict[str, dict], dtype: torch.dtype, device=None,
                   head: nn.Module | None = None) -> None:
    """In place: every quantized module of `quantization_config["modules"]` becomes the `QuantLinear`
    (`QuantEmbedding`, and its tied head's `QuantTiedHead`) whose buffers `apply` wrote; experts must be
    un-fused first (`skeleton`).  `head`: the tied head, where the weights are not tied yet to tell
    (default: the head that shares the embedding's weight)."""
    head = head or tied_head(model)  # before the swaps: a quantized embedding takes its tied head along
    for name, spec in modules.items():
        option = Option(**spec)
        if not option.quantized:
            continue
        linear = model.get_submodule(name)
        if isinstance(linear, nn.Embedding):
            emb = QuantEmbedding(linear.num_embeddings, linear.embedding_dim, option, linear.padding_idx,
                                 dtype=dtype, device=device)
            model.set_submodule(name, emb)
            if head is not None:
                model.set_submodule(_name_of(model, head), QuantTiedHead(emb))
            continue
        model.set_submodule(name, QuantLinear(linear.in_features, linear.out_features, option,
                                              bias=linear.bias is not None, dtype=dtype, device=device))


def skeleton(path: Path, dtype: torch.dtype) -> nn.Module:
    """The checkpoint's model with uninitialised weights, experts un-fused as `apply` names them."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    config = AutoConfig.from_pretrained(path)
    del config.quantization_config  # read by us, not by transformers' own quantizer integrations
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # `apply` and the exports write MoE experts under their un-fused names (profiler/moe.py)
    unfuse_experts(model)
    model.tie_weights()  # as `from_pretrained` would: a tied head is then seen sharing the embedding's weight
    return model


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    if not state:
        raise InvalidInput(f"{path} has no .safetensors weights")
    return state


def finish(model: nn.Module, state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype, device: str,
           filled: tuple[str, ...] = ()) -> nn.Module:
    """Load `state` into the skeleton; every key must match, except tied ones and modules under `filled`
    (prefixes of modules already built whole)."""
    # float tensors were stored at 16 bits; compute in `dtype` (scales stay fp16)
    state = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(".scales") else v
             for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if not isinstance(model.get_input_embeddings(), QuantEmbedding):  # a quantized pair is tied by QuantTiedHead
        model.tie_weights()
    missing = sorted(k for k in result.missing_keys if not _is_tied(model, k) and not k.startswith(filled))
    if missing or result.unexpected_keys:
        raise InvalidInput(f"{path}: checkpoint does not match its config: missing {missing[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")
    fuse_quantized_experts(model)  # on CUDA, one launch per projection over all active experts
    return model.eval().to(device)


def tokenizer_of(path: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None


def _is_tied(model, key: str) -> bool:
    out = model.get_output_embeddings()
    # a quantized head (QuantLinear, or the tied pair's QuantTiedHead) has no `weight` to compare
    weight = getattr(out, "weight", None)
    return weight is not None and key.startswith(_name_of(model, out)) and \
        weight is getattr(model.get_input_embeddings(), "weight", None)


def _name_of(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)
