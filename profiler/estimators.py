"""Error estimators: predicted loss increase of storing one module with one option.

Each has the same signature, `(dW, stats) -> float`, where `dW = Ŵ - W: [N, K]` comes from the
quantizer `apply` uses and `stats` is what the estimator collected on calibration text:

- `hessian`: layer-output error `tr(ΔW H ΔWᵀ) / n_tokens`, `H = Σ xxᵀ: [K, K]` of the module's inputs.
  Blind to what happens after the layer: a module whose output the network amplifies looks harmless.
- `fisher`: second-order loss increase `½ Σ F ⊙ ΔW²` with the empirical Fisher diagonal
  `F = E[(∂ℓ/∂W)²]: [N, K]` (per calibration sequence, loss in nats per token): it sees the whole
  network downstream, at the price of one backward pass.
"""

from __future__ import annotations

import torch


def hessian(dW: torch.Tensor, H: torch.Tensor, n_tokens: int) -> float:
    dW = dW.to(H.dtype)
    return max(float(((dW @ H) * dW).sum()) / n_tokens, 0.0)


def fisher(dW: torch.Tensor, F: torch.Tensor, n_tokens: int) -> float:
    return 0.5 * float((F * dW.to(F.dtype) ** 2).sum())


ESTIMATORS = {"hessian": hessian, "fisher": fisher}
