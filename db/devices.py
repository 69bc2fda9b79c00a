"""GPUs the planner knows by datasheet: the roofline latency estimate's bandwidth and throughput.

A fact about hardware, not about a model: the planner names these GPUs in its messages without
importing the profiler (which computes roofline tables from them, profiler/latency.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bitplan.db.types import InvalidInput


@dataclass(frozen=True)
class GPU:
    """One GPU's roofline: peak memory bandwidth (bytes/s) and dense bf16 tensor-core throughput (FLOP/s)."""

    name: str
    bandwidth: float
    flops: float
    description: str

    @property
    def source(self) -> str:
        """The `latency_source` of its roofline tables."""
        return f"roofline:{self.name}"


# Vendor datasheet figures. NVIDIA quotes tensor throughput "with sparsity" (2:4 structured); the dense
# figure used here is half of that.
GPUS = {g.name: g for g in (
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: 3.35 TB/s HBM3; BF16 Tensor Core
    # 1,979 TFLOPS with sparsity -> 989.4 dense.
    GPU("H100", 3.35e12, 989.4e12, "H100 SXM 80GB"),
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: 4.8 TB/s HBM3e; BF16 Tensor Core
    # 1,979 TFLOPS with sparsity -> 989.4 dense (the H100's compute, more and faster memory).
    GPU("H200", 4.8e12, 989.4e12, "H200 SXM 141GB"),
    # NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column: 2,039 GB/s HBM2e; BF16 Tensor
    # Core 312 TFLOPS dense (624 with sparsity).
    GPU("A100", 2.039e12, 312e12, "A100 SXM 80GB"),
    # NVIDIA L40S datasheet: 864 GB/s GDDR6; BF16 Tensor Core 362.05 TFLOPS dense (733 with sparsity).
    GPU("L40S", 864e9, 362.05e12, "L40S 48GB"),
    # NVIDIA Ada Lovelace GPU architecture whitepaper, GeForce RTX 4090 column: 1,008 GB/s GDDR6X;
    # peak BF16 Tensor TFLOPS with FP32 accumulate 165.2 dense (330.4 with sparsity).
    GPU("RTX4090", 1.008e12, 165.2e12, "GeForce RTX 4090 24GB"),
)}
_ALIASES = {"H100SXM": "H100", "H100SXM5": "H100", "H200SXM": "H200", "A10080GB": "A100", "A100SXM": "A100",
            "A10080GBSXM": "A100", "A100SXM80GB": "A100", "4090": "RTX4090", "GEFORCERTX4090": "RTX4090"}



def gpu(name: str) -> GPU:
    """A GPU of `GPUS` by name, case and punctuation ignored ('h100', 'H100-SXM', 'rtx 4090')."""
    key = re.sub(r"[^A-Z0-9]", "", name.upper())
    key = _ALIASES.get(key, key)
    if key not in GPUS:
        raise InvalidInput(f"no roofline for GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]
