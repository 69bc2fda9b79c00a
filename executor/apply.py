"""Apply a plan to a model: quantize every planned module with its option, write a checkpoint atomically.

The checkpoint is a Hugging Face directory: `config.json` whose `quantization_config` records the plan
id and every module's option, safetensors shards holding `QuantLinear` buffers for quantized modules
and 16-bit tensors for everything else, the tokenizer, and the plan itself (`bitplan_plan.json`).
Same plan, same model -> byte-identical files (no timestamps, sorted keys).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator, Mapping
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
    hessians: Mapping[str, torch.Tensor] | None = None, cache: GPTQCache | None = None, part: bool = False,
) -> Iterator[tuple[Module, nn.Linear, QuantizedWeight | None]]:
    """Quantize one planned linear at a time, in model order (so one block is in flight at a time).

    Yields `(module, linear, QuantizedWeight)`, or `None` in its place for a 16-bit option.
    A GPTQ `quantizer` needs `hessians[name] = Σ xxᵀ` of every quantized module's inputs (the profiler's
    `bitplan.profiler.stream.collect_hessians`), the same statistics the profile's GPTQ ΔW came from,
    except for those whose result `cache` already holds.  `part`: `planned` is a part of the model (one
    block), checked against the plan as a whole by the caller.
    """
    if not part:
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
                      cache: GPTQCache | None = None, part: bool = False,
                      ) -> Iterator[tuple[str, nn.Linear, QuantLinear | None]]:
    """`quantized_weights` as `(name, linear, QuantLinear or None)`; a planned embedding as a `QuantEmbedding`."""
    for module, linear, qw in quantized_weights(planned, plan, progress, quantizer, hessians, cache, part):
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


def stored_keys(model: nn.Module) -> list[str]:
    """The state keys a checkpoint of `model` stores: tied weights once, under their first name (the loader
    ties them again)."""
    keys, seen = [], set()
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            keys.append(key)
    return keys


def quantized_state_dict(model: nn.Module, planned: list[tuple[Module, nn.Linear]], plan: Plan,
                         storage_dtype: torch.dtype = torch.bfloat16, progress: bool = False,
                         quantizer: Quantizer = Quantizer(), hessians: Mapping[str, torch.Tensor] | None = None,
                         cache: GPTQCache | None = None, keys: set[str] | None = None) -> dict:
    """What the checkpoint stores, without modifying `model`; with `keys`, of those alone (a part of the
    model, which `planned` lies in)."""
    wanted = set(stored_keys(model)) if keys is None else keys
    state = {key: t.detach().to(storage_dtype) if t.is_floating_point() else t.detach()
             for key, t in model.state_dict(keep_vars=True).items() if key in wanted}
    for name, _, qlinear in quantized_linears(planned, plan, progress, quantizer, hessians, cache, part=keys is not None):
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
    (`quantizer`, `quantizer_settings` and, for GPTQ, `gptq_inputs` say where the codes came from; RTN's
    one setting is `clip`)."""
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
        _write_rest(tmp, plan, model, tokenizer, storage_dtype, quantizer, "original" if cache is None else cache.inputs)
    out = Path(out_dir).expanduser().resolve()
    log.info("wrote %s", out)
    return out


def _write_rest(tmp: Path, plan: Plan, model: nn.Module, tokenizer, storage_dtype: torch.dtype,
                quantizer: Quantizer, gptq_inputs: str) -> None:
    """What a checkpoint holds beside its shards: `config.json` with the quantization, the plan, the tokenizer."""
    config = config_dict(model)
    config["quantization_config"] = quantization_config(plan, storage_dtype, quantizer, gptq_inputs)
    config["dtype"] = str(storage_dtype).removeprefix("torch.")
    write_json(tmp / "config.json", config)
    write_json(tmp / WRITTEN_MARK, plan.to_dict())
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def apply_plan_streamed(plan: Plan, model: nn.Module, tokenizer, planned: list[tuple[Module, nn.Linear]],
                        out_dir: str | Path, *, batches: torch.Tensor | None = None,
                        storage_dtype: torch.dtype = torch.bfloat16, overwrite: bool = False, progress: bool = True,
                        quantizer: Quantizer = Quantizer(), device: str = "cpu") -> Path:
    """`apply_plan` for a model whose weights stay on disk (`load_model(stream_weights="on")`): the same
    files, byte for byte, with host memory holding one decoder block (and its `H`) at a time.

    The parts outside the blocks (embedding, norms, head) are read and written first, then each block in
    turn: read, its `H` collected on `batches` (the profile's calibration windows; GPTQ only), its modules
    quantized, its tensors written to a part file, dropped.  The shards are then put together from the
    parts, one shard in memory at a time.  GPTQ's statistics are the unquantized model's (`--gptq-inputs
    original`).
    """
    from bitplan.profiler.model import decoder_layers
    from bitplan.profiler.stream import outside_hessians, stream_blocks
    from bitplan.profiler.weights import materialized, read_headers, read_tensor, streamed

    if streamed(model) is None:
        raise ValueError("apply_plan_streamed writes a model whose weights stay on disk; use apply_plan")
    check_plan_matches(planned, plan)
    gptq = [(m, lin) for m, lin in planned if plan.assignment[m.name].quantized
            and quantizer_for(m, quantizer).method == "gptq"]
    if gptq and batches is None:
        raise InvalidInput("the gptq quantizer needs the calibration windows its H comes from")
    layers = decoder_layers(model)
    prefix = next(name for name, mod in model.named_modules() if mod is layers)
    keys = stored_keys(model)

    def block_of(key: str) -> int | None:
        head, _, rest = key.partition(f"{prefix}.")
        return int(rest.split(".", 1)[0]) if not head and rest else None

    by_block: dict[int | None, set[str]] = {}
    for key in keys:
        by_block.setdefault(block_of(key), set()).add(key)
    mods_of: dict[int | None, list] = {}
    for m, lin in planned:
        mods_of.setdefault(block_of(m.name), []).append((m, lin))
    in_blocks = {id(mod) for mod in layers.modules()}
    gptq_names = {m.name for m, _ in gptq}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        parts = tmp / ".parts"  # removed before the folder becomes `out_dir`
        parts.mkdir()

        def write_part(block: int | None, modules: list[nn.Module], hessians=None) -> None:
            with materialized(model, modules):
                state = quantized_state_dict(model, mods_of.get(block, []), plan, storage_dtype, False, quantizer,
                                             hessians, keys=by_block.get(block, set()))
            path = parts / f"{'outside' if block is None else block}.safetensors"
            save_file(state, path, metadata={"format": "pt"})

        # the embedding, norms and head: each module holding parameters of its own outside the blocks
        outside = [mod for mod in model.modules() if id(mod) not in in_blocks
                   and next(mod.parameters(recurse=False), None) is not None]
        head = [(m, lin) for m, lin in mods_of.get(None, []) if m.name in gptq_names]
        write_part(None, outside, outside_hessians(model, batches, head, device, progress) if head else None)
        if gptq:
            stream_blocks(model, batches, gptq, lambda i, _mods, H, _n: write_part(i, [layers[i]], H), device,
                          progress, desc="quantizing blocks")
        else:
            for i in tqdm(range(len(layers)), desc="quantizing blocks", unit="block", disable=not progress):
                write_part(i, [layers[i]])

        places = read_headers(parts)  # every part's tensors: where they lie, so each is read alone
        _write_sharded({k: end - start for k, (_, start, end, _, _) in places.items()},
                       lambda k: read_tensor(places[k]), tmp, {"format": "pt"})
        shutil.rmtree(parts)
        _write_rest(tmp, plan, model, tokenizer, storage_dtype, quantizer, "original")
    out = Path(out_dir).expanduser().resolve()
    log.info("wrote %s", out)
    return out


def _write_shards(state: dict, directory: Path, metadata: dict) -> None:
    """`model.safetensors`, or numbered shards of at most MAX_SHARD_BYTES plus an index."""
    _write_sharded({k: t.numel() * t.element_size() for k, t in state.items()}, state.__getitem__, directory,
                   metadata)


def _write_sharded(sizes: dict[str, int], read: Callable[[str], torch.Tensor], directory: Path,
                   metadata: dict) -> None:
    """`_write_shards` of the tensors `read(key)` gives, whose bytes `sizes` holds: keys in sorted order, one
    shard in memory at a time."""
    shards, current, size = [], [], 0
    for key in sorted(sizes):
        if current and size + sizes[key] > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += sizes[key]
    shards.append(current)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for fname, keys in zip(names, shards):
        save_file({k: read(k) for k in keys}, directory / fname, metadata=metadata)
    if len(shards) == 1:
        return
    index = {"metadata": {"total_size": sum(sizes.values())},
             "weight_map": {k: fname for fname, keys in zip(names, shards) for k in keys}}
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
