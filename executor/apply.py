"""Apply a plan to a model: quantize every planned module with its option, write a checkpoint atomically.

The checkpoint is a Hugging Face directory: `config.json` whose `quantization_config` records the plan
id and every module's option, safetensors shards holding `QuantLinear` buffers for quantized modules
and 16-bit tensors for everything else, the tokenizer, and the plan itself (`bitplan_plan.json`).
Same plan, same model -> byte-identical files (no timestamps, sorted keys).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from bitplan.db.files import WRITTEN_MARK, atomic_dir, write_json
from bitplan.db.types import InvalidInput, Module, Plan, Quantizer, UnknownModule
from bitplan.executor.quant_linear import QuantEmbedding, QuantLinear, QuantTiedHead
from bitplan.kernels.quantize import GPTQCache, QuantizedWeight, quantize, quantizer_for
from bitplan.profiler.model import tied_head

log = logging.getLogger(__name__)

QUANT_METHOD = "bitplan"
CHECKPOINT_FORMAT = "bitplan.packed/1"
MAX_SHARD_BYTES = 2 * 2**30


def quantized_weights(
    planned: list[tuple[Module, nn.Linear]], plan: Plan, progress: bool = False, quantizer: Quantizer = Quantizer(),
    hessians: Mapping[str, torch.Tensor] | None = None, cache: GPTQCache | None = None,
) -> Iterator[tuple[Module, nn.Linear, QuantizedWeight | None]]:
    """Quantize one planned linear at a time, in model order (so one block is in flight at a time).

    Yields `(module, linear, QuantizedWeight)`, or `None` in its place for a 16-bit option.
    A GPTQ `quantizer` needs `hessians[name] = Σ xxᵀ` of every quantized module's inputs (the profiler's
    `bitplan.profiler.stream.collect_hessians`), the same statistics the profile's GPTQ ΔW came from,
    except for those whose result `cache` already holds.
    """
    check_plan_matches(planned, plan)
    check_quantizer(planned, plan, quantizer, hessians, cache)
    bar = tqdm(planned, desc=f"quantizing ({quantizer.label})", unit="module", disable=not progress)
    for module, linear in bar:
        option = plan.assignment[module.name]
        if not option.quantized:
            yield module, linear, None
            continue
        q = quantizer_for(module, quantizer)
        H = hessians.get(module.name) if q.method == "gptq" and hessians is not None else None
        yield module, linear, quantize(linear.weight, option, q, H, cache=cache, name=module.name)


def quantized_linears(planned: list[tuple[Module, nn.Linear]], plan: Plan, progress: bool = False,
                      quantizer: Quantizer = Quantizer(), hessians: Mapping[str, torch.Tensor] | None = None,
                      cache: GPTQCache | None = None) -> Iterator[tuple[str, nn.Linear, QuantLinear | None]]:
    """`quantized_weights` as `(name, linear, QuantLinear or None)`; a planned embedding as a `QuantEmbedding`."""
    for module, linear, qw in quantized_weights(planned, plan, progress, quantizer, hessians, cache):
        if qw is None:
            yield module.name, linear, None
        elif isinstance(linear, nn.Embedding):
            yield module.name, linear, QuantEmbedding.from_quantized(qw, linear.weight.dtype, linear.padding_idx)
        else:
            bias = linear.bias.detach() if linear.bias is not None else None
            yield module.name, linear, QuantLinear.from_quantized(qw, bias)


def missing_hessians(planned: list[tuple[Module, nn.Linear]], plan: Plan, quantizer: Quantizer,
                     hessians: Mapping[str, torch.Tensor] | None = None, cache: GPTQCache | None = None) -> list[str]:
    """The quantized modules of `plan` whose GPTQ needs an `H` that neither `hessians` nor `cache` has."""
    return [m.name for m, _ in planned
            if plan.assignment[m.name].quantized and quantizer_for(m, quantizer).method == "gptq"
            and (hessians is None or m.name not in hessians)
            and (cache is None or not cache.has(m.name, plan.assignment[m.name], quantizer))]


def check_quantizer(planned: list[tuple[Module, nn.Linear]], plan: Plan, quantizer: Quantizer,
                    hessians: Mapping[str, torch.Tensor] | None, cache: GPTQCache | None = None) -> None:
    """GPTQ without every quantized module's `H` (or cached result) fails before any work."""
    if not isinstance(quantizer, Quantizer):
        raise TypeError(f"quantizer must be a Quantizer (e.g. Quantizer.parse({quantizer!r})), "
                        f"not {type(quantizer).__name__}")
    missing = missing_hessians(planned, plan, quantizer, hessians, cache)
    if missing:
        raise InvalidInput(f"the gptq quantizer needs the input statistics H of every quantized module; "
                           f"{len(missing)} are missing, e.g. {missing[:3]}")


def check_plan_matches(planned: list[tuple[Module, nn.Linear]], plan: Plan) -> None:
    """A plan made for another model fails here, before any work."""
    names = {m.name for m, _ in planned}
    missing = sorted(set(plan.assignment) - names)
    if missing:
        raise UnknownModule(f"the plan names {len(missing)} modules this model does not have, "
                            f"e.g. {missing[:3]}; was it made for another model?")
    unplanned = sorted(names - set(plan.assignment))
    if unplanned:
        raise UnknownModule(f"the plan gives no option for {len(unplanned)} modules of this model, "
                            f"e.g. {unplanned[:3]}")


def quantize_model(model: nn.Module, planned: list[tuple[Module, nn.Linear]], plan: Plan,
                   storage_dtype: torch.dtype = torch.bfloat16, quantizer: Quantizer = Quantizer(),
                   hessians: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """In place: swap planned linears for QuantLinear and round the rest through `storage_dtype`.

    The result computes exactly what the written checkpoint computes once reloaded.  A quantized embedding
    with a tied head gets a `QuantTiedHead` on it, as the loader builds.
    """
    head = tied_head(model)
    quantized = list(quantized_linears(planned, plan, quantizer=quantizer, hessians=hessians))
    for name, linear, qlinear in quantized:
        if qlinear is not None:
            model.set_submodule(name, qlinear.to(linear.weight.device))
            if isinstance(qlinear, QuantEmbedding) and head is not None:
                model.set_submodule(next(n for n, m in model.named_modules() if m is head), QuantTiedHead(qlinear))
    for key, t in model.state_dict(keep_vars=True).items():
        if t.is_floating_point() and not key.endswith(".scales"):  # scales are stored as fp16
            t.data = t.data.to(storage_dtype).to(t.dtype)
    return model


def quantized_state_dict(model: nn.Module, planned: list[tuple[Module, nn.Linear]], plan: Plan,
                         storage_dtype: torch.dtype = torch.bfloat16, progress: bool = False,
                         quantizer: Quantizer = Quantizer(), hessians: Mapping[str, torch.Tensor] | None = None,
                         cache: GPTQCache | None = None) -> dict:
    """What the checkpoint stores, without modifying `model`."""
    state, seen = {}, set()
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # tied weights are stored once; the loader ties them again
            continue
        seen.add(id(t))
        state[key] = t.detach().to(storage_dtype) if t.is_floating_point() else t.detach()
    for name, _, qlinear in quantized_linears(planned, plan, progress, quantizer, hessians, cache):
        if qlinear is None:
            continue
        state.pop(f"{name}.weight")
        state.pop(f"{name}.bias", None)
        for key, t in qlinear.state_dict().items():
            state[f"{name}.{key}"] = t.to(storage_dtype) if key == "bias" else t
    return {k: v.contiguous() for k, v in state.items()}


def config_dict(model: nn.Module) -> dict:
    """The model's `config.json` content, naming its class in `architectures` (engines pick the model class
    from it; a config read from a GGUF has none)."""
    config = model.config.to_dict()
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    return config


def quantization_config(plan: Plan, storage_dtype: torch.dtype, quantizer: Quantizer = Quantizer(),
                        gptq_inputs: str = "original") -> dict:
    """What `config.json` records of the quantization; the loaders need `quant_method` and `modules` alone
    (`quantizer`, `quantizer_settings` and, for GPTQ, `gptq_inputs` say where the codes came from, `{}`
    settings for RTN)."""
    return {
        "quant_method": QUANT_METHOD,
        "format": CHECKPOINT_FORMAT,
        "plan_id": plan.id,
        "quantizer": quantizer.method,
        "quantizer_settings": quantizer.settings,
        **({"gptq_inputs": gptq_inputs} if quantizer.method == "gptq" else {}),
        "storage_dtype": str(storage_dtype).removeprefix("torch."),
        "modules": {name: opt.model_dump() for name, opt in sorted(plan.assignment.items())},
    }


def apply_plan(plan: Plan, model: nn.Module, tokenizer, planned: list[tuple[Module, nn.Linear]],
               out_dir: str | Path, *, storage_dtype: torch.dtype = torch.bfloat16,
               overwrite: bool = False, progress: bool = True, quantizer: Quantizer = Quantizer(),
               hessians: Mapping[str, torch.Tensor] | None = None, cache: GPTQCache | None = None) -> Path:
    """Write the quantized checkpoint of `model` under `plan` to `out_dir`, atomically.

    `quantizer`: RTN (default), or GPTQ with `hessians[name] = Σ xxᵀ` for every quantized module
    (`bitplan.profiler.stream.collect_hessians`) whose result `cache` does not hold; the format is the
    same either way.
    """
    check_plan_matches(planned, plan)
    check_quantizer(planned, plan, quantizer, hessians, cache)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        state = quantized_state_dict(model, planned, plan, storage_dtype, progress, quantizer, hessians, cache)
        # one metadata key only: safetensors writes metadata in hash order, which would break byte-identity
        _write_shards(state, tmp, {"format": "pt"})
        config = config_dict(model)
        config["quantization_config"] = quantization_config(plan, storage_dtype, quantizer,
                                                            "original" if cache is None else cache.inputs)
        config["dtype"] = str(storage_dtype).removeprefix("torch.")
        write_json(tmp / "config.json", config)
        write_json(tmp / WRITTEN_MARK, plan.to_dict())
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    out = Path(out_dir).expanduser().resolve()
    log.info("wrote %s", out)
    return out


def _write_shards(state: dict, directory: Path, metadata: dict) -> None:
    """`model.safetensors`, or numbered shards of at most MAX_SHARD_BYTES plus an index."""
    shards, current, size = [], {}, 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if current and size + nbytes > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[key] = state[key]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname, metadata=metadata)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def checkpoint_bytes(source: str | Path) -> int:
    """Bytes of a checkpoint's weights: its safetensors (or PyTorch) files, or the GGUF file (the embedded
    model's included)."""
    from bitplan.profiler.model import resolve

    directory, gguf = resolve(str(source))
    if gguf is not None:
        return (directory / gguf).stat().st_size
    files = list(directory.glob("*.safetensors")) or list(directory.glob("*.bin"))
    return sum(f.stat().st_size for f in files)
