"""Latency tables: seconds of one call of every planned module at every option and batch size.

A table is `latency [M, O, B]` (module, option, batch) in seconds with its `batches` and a `source`;
two sources fill the same `LatencyTable`, so the planner never cares which:

- `roofline:GPU` (`roofline_latency`, here, numpy only): the time a memory- or compute-bound kernel
  cannot beat on that GPU's datasheet figures (`GPUS`), for a linear y = x·Wᵀ, x [batch, in],
  W [out, in] stored with option o:

      time = max(bytes / bandwidth, 2·batch·out·in / flops) + LAUNCH_OVERHEAD_S
      bytes = ⌈o.size_bits(out, in) / 8⌉ + 2·batch·(in + out)

  i.e. the packed weights with their scales and zeros (`Option.size_bits`, the one place for that
  fact), plus bf16 activations read and written. It depends on the module's shape only, so it is
  computed once per (shape, option) and shared by every module of that shape.
- `measured:<device name>` (`measured_latency`): the project's Triton kernels timed on this machine's GPU.

Where the roofline is optimistic: it assumes peak bandwidth and peak tensor throughput at once, no
dequantization cost, and no fusion across modules (each module is one launch).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bitplan.db.devices import GPU, GPUS, gpu
from bitplan.db.files import per_gpu_cache, write_json
from bitplan.db.types import InvalidInput, Module, Option, Profile, content_id

DEFAULT_BATCHES = (1, 16, 256)  # decode of one sequence, a small serving batch, prefill-sized
ACTIVATION_BYTES = 2  # bf16 activations, in and out
# The fixed cost of one kernel launch, on every GPU: DESIGN.md's H100 measurement of an empty kernel
# timed with L2 flushed (≈ 4.5 µs). Launch cost is set by the driver and host, not the GPU's size.
LAUNCH_OVERHEAD_S = 4.5e-6


class LatencyTable(NamedTuple):
    """What both sources return: `latency [M, O, B]` seconds, the `batches`, and the `source` string."""

    latency: np.ndarray
    batches: list[int]
    source: str


def parse_batches(spec: str | Sequence[int]) -> list[int]:
    """`"1,16,256"` -> [1, 16, 256] (sorted, each once); InvalidInput for anything but positive integers."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        batches = sorted({int(str(b).strip()) for b in items if str(b).strip()})
    except ValueError:
        batches = []
    if not batches or batches[0] <= 0:
        raise InvalidInput(f"bad --latency-batches {spec!r}: give positive batch sizes like 1,16,256")
    return batches


def roofline_latency(modules: Sequence[Module], options: Sequence[Option], batches: Sequence[int],
                     device: GPU | str) -> LatencyTable:
    """The roofline table (module docstring) of `modules` x `options` x `batches` on `device`."""
    device = gpu(device) if isinstance(device, str) else device
    batches = parse_batches(batches)
    b = np.asarray(batches, dtype=np.float64)
    shapes, inverse = np.unique(np.array([m.shape for m in modules], dtype=np.int64).reshape(-1, 2), axis=0,
                                return_inverse=True)
    table = np.empty((len(shapes), len(options), len(b)))
    for s, (out, inp) in enumerate(shapes.tolist()):
        for o, option in enumerate(options):
            moved = math.ceil(option.size_bits(out, inp) / 8) + ACTIVATION_BYTES * b * (inp + out)
            table[s, o] = np.maximum(moved / device.bandwidth, 2 * b * out * inp / device.flops) + LAUNCH_OVERHEAD_S
    return LatencyTable(table[inverse.reshape(-1)], batches, device.source)


MAX_COPIES = 64
KERNEL_VERSION = "9"  # part of the measured cache's key: bump when kernels/matmul.py changes speed


def measured_latency(modules: Sequence[Module], options: Sequence[Option], batches: Sequence[int], *,
                     cache: str | Path | None = None, progress: bool = True) -> LatencyTable:
    """The measured table: every distinct (shape, option, batch) of `modules` timed with the project's
    Triton kernels (`kernels/matmul.py`) on this machine's GPU, weights cold in L2, in a CUDA graph
    (`kernels/timing.py`), median over replays; 16-bit options time torch's bf16 `x @ W.T` the same way.

    Times depend on the GPU, the shape and the option only, so they are cached per GPU name in a JSON
    file (`cache`, default in the user cache dir) and a second profile on the same GPU measures
    nothing it has measured before.
    """
    import torch

    if not torch.cuda.is_available():
        raise InvalidInput("--latency measured times the kernels on a CUDA GPU and this machine has none; "
                           f"use a roofline estimate instead: --latency roofline:GPU ({', '.join(GPUS)})")
    from tqdm.auto import tqdm

    batches = parse_batches(batches)
    name = torch.cuda.get_device_name()
    path = Path(cache) if cache else _cache_path(name)
    known = json.loads(path.read_text()) if path.exists() else {}
    shapes, inverse = np.unique(np.array([m.shape for m in modules], dtype=np.int64).reshape(-1, 2), axis=0,
                                return_inverse=True)
    table = np.empty((len(shapes), len(options), len(batches)))
    work = [(s, o, b) for s in range(len(shapes)) for o in range(len(options)) for b in range(len(batches))]
    for s, o, b in tqdm(work, desc="timing kernels", unit="case", disable=not progress):
        (out, inp), option, batch = shapes[s].tolist(), options[o], batches[b]
        key = f"{KERNEL_VERSION}:{out}x{inp}:{option.label}:b{batch}"
        if key not in known:
            known[key] = _time_linear(out, inp, option, batch) * 1e-6
            write_json(path, known, indent=1)  # a run cut short keeps what it measured
        table[s, o, b] = known[key]
    return LatencyTable(table[inverse.reshape(-1)], batches, f"measured:{name}")


def _cache_path(gpu_name: str) -> Path:
    return per_gpu_cache("latency", gpu_name)


def _time_linear(out: int, inp: int, option: Option, batch: int) -> float:
    """Microseconds of one `x [batch, inp] @ W.T` with W `[out, inp]` stored as `option`, cold in L2."""
    import torch

    from bitplan.kernels.matmul import matmul
    from bitplan.kernels.timing import clone_packed, cold_time_us, copies_for, random_packed

    x = torch.randn(batch, inp, device="cuda", dtype=torch.bfloat16)
    if not option.quantized:
        ws = [torch.randn(out, inp, device="cuda", dtype=torch.bfloat16)
              for _ in range(min(copies_for(out * inp * 2), MAX_COPIES))]
        return cold_time_us([lambda w=w: torch.nn.functional.linear(x, w) for w in ws])
    group = option.group_size or inp
    weight = random_packed(out, inp, option.bits, group, option.symmetric)
    # at most MAX_COPIES: a layer so small that more would be needed to overflow L2 is launch-bound anyway,
    # and thousands of copies cost more to capture than to time (measured: ~30 s a case on tiny-mixtral)
    n = min(copies_for(-(-option.size_bits(out, inp) // 8)), MAX_COPIES)
    copies = [weight] + [clone_packed(weight) for _ in range(n - 1)]
    return cold_time_us([lambda c=c: matmul(x, c[0], c[1], c[2], option.bits, group, inp) for c in copies])


def parse_spec(spec: str) -> GPU | None:
    """`roofline:GPU` -> that GPU; `measured` -> None; anything else InvalidInput saying what to write."""
    kind, _, name = spec.strip().partition(":")
    if kind == "roofline" and name:
        return gpu(name)
    if kind == "measured":
        return None
    raise InvalidInput(f"bad --latency {spec!r}: write roofline:GPU (GPU one of {', '.join(GPUS)}) or measured")


def latency_table(spec: str, modules: Sequence[Module], options: Sequence[Option],
                  batches: Sequence[int] = DEFAULT_BATCHES) -> LatencyTable:
    """The table `spec` names: `roofline:GPU` or `measured` (this machine's GPU); the modules' shapes suffice."""
    device = parse_spec(spec)
    if device is not None:
        return roofline_latency(modules, options, batches, device)
    return measured_latency(modules, options, parse_batches(batches))


def with_latency(profile: Profile, table: LatencyTable) -> Profile:
    """`profile` with `table` attached; a new id (derived from the old one and the table's source and
    batches), since the table is part of what the profile says."""
    fields = {k: getattr(profile, k) for k in Profile.model_fields}
    fields.update(latency=table.latency, latency_batches=list(table.batches), latency_source=table.source,
                  id=latency_profile_id(profile.id, table.source, table.batches) if profile.id else "")
    return Profile(**fields)


def latency_profile_id(base_id: str, source: str, batches: Sequence[int]) -> str:
    """The id of profile `base_id` with the latency table of `source` at `batches`: same inputs, same id."""
    return content_id(base_id, source, list(batches), prefix="prof-")
