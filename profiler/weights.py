"""Weights left on disk: a model skeleton whose parameters load from safetensors shards one module at a time.

A model larger than host memory is built without weights (its parameters on the `meta` device, its buffers,
such as rotary tables, computed as usual), and `StreamedWeights` reads a module's tensors from the shards
when a streamed pass reaches it (`materialized`), restoring the meta parameters after.  Peak host memory is
then one decoder block (at the model's dtype) plus what the pass keeps, whatever the model's size.

Shards are read with plain file reads into the tensor's own memory, not through `safe_open`'s memory map:
pages of a mapped file count in the process's resident set while mapped, so a 5 GB shard read through its
map would show (and be charged) as 5 GB more, and reading a tensor through it holds it twice.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from bitplan.db.types import InvalidInput

log = logging.getLogger(__name__)

# safetensors' dtype names
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}

_ATTR = "_bitplan_streamed_weights"  # where a skeleton keeps its StreamedWeights


def read_headers(directory: Path) -> dict[str, tuple[Path, int, int, torch.dtype, tuple[int, ...]]]:
    """`{tensor name: (shard, first byte, end byte, dtype, shape)}` of every `*.safetensors` in `directory`.

    The index's weight map (`model.safetensors.index.json`) names the shards when there is one; each shard's
    header (8 bytes of length, then JSON) gives its tensors' places.  InvalidInput for a header that does not
    read or a tensor type this cannot hold."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidInput(f"{index} is not a safetensors index ({e})") from None
    else:
        shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise InvalidInput(f"{directory} has no *.safetensors shards: streamed weights read safetensors only")
    out = {}
    for shard in shards:
        try:
            with open(shard, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise InvalidInput(f"{shard}: cannot read its safetensors header ({e})") from None
        start = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in DTYPES:
                raise InvalidInput(f"{shard}: tensor {name} is {meta['dtype']}, which streamed weights cannot read")
            a, b = meta["data_offsets"]
            out[name] = (shard, start + a, start + b, DTYPES[meta["dtype"]], tuple(meta["shape"]))
    return out


def checkpoint_bytes(directory: Path) -> int:
    """Bytes of every tensor in the checkpoint's safetensors shards, as stored."""
    return sum(end - start for _, start, end, _, _ in read_headers(directory).values())


def read_tensor(place) -> torch.Tensor:
    shard, start, end, dtype, shape = place
    buf = torch.empty(end - start, dtype=torch.uint8)
    with open(shard, "rb") as f:
        f.seek(start)
        if f.readinto(buf.numpy()) != end - start:
            raise InvalidInput(f"{shard} is truncated: copy or download it again")
    return buf.view(dtype).reshape(shape)


class StreamedWeights:
    """The parameters of a skeleton `model`, on disk in `directory`'s safetensors shards.

    Every parameter of the skeleton is on `meta` and found in the shards under its own name (or tied to one
    that is: one tensor read serves every module sharing the parameter).  Tensors are cast to the dtype of
    the skeleton's parameter, as `from_pretrained(dtype=...)` casts them.
    """

    def __init__(self, directory: Path, model: nn.Module):
        self.directory = directory
        self.places = read_headers(directory)
        # id(meta parameter) -> (checkpoint name, [(module, attribute)] holding it): tied weights share one
        self.params: dict[int, tuple[str, list[tuple[nn.Module, str]], nn.Parameter]] = {}
        missing = []
        for mname, mod in model.named_modules(remove_duplicate=False):
            for pname, p in mod._parameters.items():
                if p is None:
                    continue
                key = f"{mname}.{pname}" if mname else pname
                if id(p) in self.params:
                    self.params[id(p)][1].append((mod, pname))
                    if key in self.places and self.params[id(p)][0] not in self.places:
                        self.params[id(p)] = (key, *self.params[id(p)][1:])  # stored under its second name
                    continue
                self.params[id(p)] = (key, [(mod, pname)], p)
        for key, _, p in self.params.values():
            if key not in self.places:
                missing.append(key)
            elif tuple(self.places[key][4]) != tuple(p.shape):
                raise InvalidInput(f"{directory}: tensor {key} has shape {self.places[key][4]} in the checkpoint, "
                                   f"{tuple(p.shape)} in the model")
        if missing:
            raise InvalidInput(f"cannot stream the weights of {directory}: the model's {missing[0]} (and "
                               f"{len(missing) - 1} more) is not in its shards under that name (a checkpoint "
                               f"that transformers converts on loading, e.g. fused MoE experts); load it whole "
                               f"(--stream-weights off)")

    def tensor(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        t = read_tensor(self.places[key])
        return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t

    def nbytes(self, modules: Iterable[nn.Module]) -> int:
        """Host bytes the meta parameters of `modules` take once loaded (at the skeleton's dtypes)."""
        ids = {id(p) for m in modules for p in m.parameters() if p.is_meta}
        return sum(p.numel() * p.element_size() for i, (_, _, p) in self.params.items() if i in ids)

    @contextmanager
    def materialized(self, modules: Iterable[nn.Module]) -> Iterator[None]:
        """Every meta parameter of `modules` (and their submodules) read from disk into host memory; the
        meta parameters are put back afterwards (also on error), so the memory goes when the caller drops
        its references.  A parameter already real is left alone (nested calls load nothing twice)."""
        ids = list(dict.fromkeys(id(p) for m in modules for p in m.parameters() if p.is_meta))
        for i in ids:
            key, holders, meta = self.params[i]
            real = nn.Parameter(self.tensor(key, meta.dtype), requires_grad=meta.requires_grad)
            for mod, name in holders:
                mod._parameters[name] = real
        try:
            yield
        finally:
            for i in ids:
                _, holders, meta = self.params[i]
                for mod, name in holders:
                    mod._parameters[name] = meta


def attach(model: nn.Module, weights: StreamedWeights) -> None:
    object.__setattr__(model, _ATTR, weights)  # not a submodule or parameter: no state_dict entry


def streamed(model: nn.Module) -> StreamedWeights | None:
    """The model's weights on disk, or None for a model in memory."""
    return getattr(model, _ATTR, None)


@contextmanager
def materialized(model: nn.Module, modules: Iterable[nn.Module]) -> Iterator[None]:
    """`modules`' weights in host memory for the duration: read from disk for a skeleton with streamed
    weights, nothing to do for a model in memory."""
    weights = streamed(model)
    if weights is None:
        yield
        return
    with weights.materialized(list(modules)):
        yield


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `config` with its parameters on `meta` (nothing allocated) and its buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_pretrained ties a shared head on loading; from_config leaves two parameters
    return model.eval()
