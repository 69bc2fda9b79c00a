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


ESTIMATORS = {"hessian": hessian, "fisher": fisher, "imatrix": imatrix, "hutchinson": hutchinson}
