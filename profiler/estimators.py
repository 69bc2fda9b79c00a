"""Error estimators: predicted loss increase of storing one module with one option.

Each has the same signature, `(dW, stats) -> float`, where `dW = Ŵ - W: [N, K]` comes from the
quantizer `apply` uses and `stats` is what the estimator collected on calibration text:

- `hessian`: layer-output error `tr(ΔW H ΔWᵀ) / n_tokens`, `H = Σ xxᵀ: [K, K]` of the module's inputs.
  Blind to what happens after the layer: a module whose output the network amplifies looks harmless.
- `fisher`: second-order loss increase `½ Σ F ⊙ ΔW²` with the empirical Fisher diagonal
  `F = E[(∂ℓ/∂W)²]: [N, K]` (per calibration sequence, loss in nats per token): it sees the whole
  network downstream, at the price of one backward pass.
- `imatrix`: `hessian` with `H` replaced by its diagonal, `Σ ΔW² · d` with `d = diag(H) / n_tokens: [K]`
  already divided by the tokens (read from a llama.cpp importance matrix: profiler/imatrix.py).
- `hutchinson`: HAWQ-V2's `½ · (tr(∇²_W L) / numel) · ||ΔW||²`, the Hessian's mean diagonal from
  Hutchinson's trace estimate (a scalar; profiler/hutchinson.py), loss in nats per token.

The registry of every `--estimator`, these four and the two that measure KL, is `profiler/profile.py` `ESTIMATORS`.
"""

from __future__ import annotations

import torch


# Rows of ΔW taken at a time by `tr(ΔW H ΔWᵀ)` (row-separable): its float64 temporaries (the rows, their
# product with H, and that times the rows) stay under 3 x this many bytes, not 24 bytes a weight (a
# 128,256 x 8,192 head: 23.5 GiB).  A matrix of fewer rows is one chunk.
CHUNK_BYTES = 256 << 20


def _row_chunks(dW: torch.Tensor):
    """Consecutive row blocks of `dW` of at most `CHUNK_BYTES` in float64."""
    rows = max(1, CHUNK_BYTES // (8 * dW.shape[1]))
    return (dW[i:i + rows] for i in range(0, dW.shape[0], rows))


def _quadratic(dW: torch.Tensor, H: torch.Tensor) -> float:
    """`tr(ΔW H ΔWᵀ)` in `H`'s dtype, one row chunk at a time."""
    return sum(float(((d @ H) * d).sum()) for d in (c.to(H.dtype) for c in _row_chunks(dW)))


def hessian(dW: torch.Tensor, H: torch.Tensor, n_tokens: int) -> float:
    return max(_quadratic(dW, H) / n_tokens, 0.0)


def fisher(dW: torch.Tensor, F: torch.Tensor, n_tokens: int) -> float:
    return 0.5 * float((F * dW.to(F.dtype) ** 2).sum())


def imatrix(dW: torch.Tensor, d: torch.Tensor, n_tokens: int) -> float:
    return float((dW.to(d.dtype) ** 2 * d).sum())


def hutchinson(dW: torch.Tensor, t: torch.Tensor, n_tokens: int) -> float:
    return 0.5 * float(t) * float((dW.double() ** 2).sum())


def embedding_hessian(dW: torch.Tensor, counts: torch.Tensor, H: torch.Tensor | None, n_tokens: int) -> float:
    """`hessian` of an input embedding `[V, d]`: the lookup's `H` is `diag(counts)` over the rows (each read
    adds its row's error to the residual stream), so its term is `Σ_v counts_v ||ΔW_v||²`; a tied head adds
    its own `tr(ΔW H ΔWᵀ)` with `H: [d, d]` of the head's inputs."""
    counts = counts.to(torch.float64)
    lookup, row = 0.0, 0
    for d in _row_chunks(dW):
        lookup += float(counts[row:row + len(d)] @ (d.to(torch.float64) ** 2).sum(dim=1))
        row += len(d)
    return max((lookup + (0.0 if H is None else _quadratic(dW, H.to(torch.float64)))) / n_tokens, 0.0)

