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


def hessian(dW: torch.Tensor, H: torch.Tensor, n_tokens: int) -> float:
    dW = dW.to(H.dtype)
    return max(float(((dW @ H) * dW).sum()) / n_tokens, 0.0)


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
    dW = dW.to(torch.float64)
    lookup = float(counts.to(torch.float64) @ (dW ** 2).sum(dim=1))
    return max((lookup + (0.0 if H is None else float(((dW @ H.to(torch.float64)) * dW).sum()))) / n_tokens, 0.0)

