"""The `kl` estimator, the ground truth: quantize one module alone, measure KL(base ‖ quantized) for real.

For every module and option the module's weight is swapped in place for its quantized-dequantized
value, the model runs on the calibration tokens, and the mean over tokens of the full-vocabulary
KL(p_base ‖ p_quantized) (nats per token) is recorded; then the weight is restored.  That is
`modules x options` forward passes, so it is meant for few tokens (`DEFAULT_KL_TOKENS`).

Two things keep it affordable:

- The base model's log-probabilities are computed once and cached: `n_tokens x vocab` float32
  (512 tokens of a 49,152-token vocabulary: 96 MiB).  KL is computed in chunks of `chunk` tokens, so
  the temporaries stay at `chunk x vocab`.
- Quantizing a module of block `l` leaves blocks `0..l-1` unchanged, so their outputs are cached once
  (`n_layers x n_tokens x hidden` float32) and each measurement runs only blocks `l..` and the head:
  the blocks before `l` are swapped for stand-ins that replay the cached hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bitplan.db.types import Module, Option, Quantizer
from bitplan.kernels.quantize import GPTQCache, quantize_dequantize, quantizer_for
from bitplan.profiler.cluster import Cluster
from bitplan.profiler.model import decoder_layers, is_embedding
from bitplan.profiler.moe import record_routing
from bitplan.profiler.stream import _Replay, _Skip, outside_hessians, stream_blocks

DEFAULT_KL_TOKENS = 512


def mean_kl(base_logprobs: torch.Tensor, logits: torch.Tensor, chunk: int = 128) -> tuple[float, int]:
    """`(Σ_tokens KL(p_base ‖ softmax(logits)), n_tokens)` for `[T, V]` inputs, `chunk` rows at a time."""
    total = 0.0
    for t in range(0, logits.shape[0], chunk):
        logp = base_logprobs[t:t + chunk].float()
        logq = torch.log_softmax(logits[t:t + chunk].float(), dim=-1)
        total += float((logp.exp() * (logp - logq)).sum())
    return total, logits.shape[0]


class Replayer:
    """Caches the base model's log-probs and block inputs per sequence; runs the model from block `l` on them.

    The base log-probs never change.  The block inputs start as the base model's and can be re-recorded
    for the model's current weights (`capture`): the evolutionary search records its parent once, then
    runs each offspring only from the first block where it differs from the parent.
    """

    def __init__(self, model: nn.Module, batches: torch.Tensor, device: str):
        self.model, self.batches, self.device = model, batches, device
        self.layers = decoder_layers(model)
        n = len(self.layers)
        # [l][seq]: input of block l, [1, T, d]; entry n: the last block's output
        self.hidden: list[list[torch.Tensor | None]] = [[None] * len(batches) for _ in range(n + 1)]
        self.base: list[torch.Tensor] = []  # [seq]: [T, V] float32 log-probs
        self.as_tuple = False
        with self._recording() as record:
            for s, row in enumerate(batches):
                record(s)
                self.base.append(torch.log_softmax(self._logits(row), dim=-1))

    @contextmanager
    def _recording(self):
        """Hooks that store every block's input (and the last block's output) of sequence `record(s)`."""
        n, current = len(self.layers), [0]

        def catch(l):
            def hook(_mod, args, kwargs):
                self.hidden[l][current[0]] = (args[0] if args else kwargs["hidden_states"]).detach()
            return hook

        def last(_mod, _args, out):
            self.as_tuple = isinstance(out, tuple)
            self.hidden[n][current[0]] = (out[0] if self.as_tuple else out).detach()

        hooks = [b.register_forward_pre_hook(catch(l), with_kwargs=True) for l, b in enumerate(self.layers)]
        hooks.append(self.layers[-1].register_forward_hook(last))
        try:
            yield lambda s: current.__setitem__(0, s)
        finally:
            for h in hooks:
                h.remove()

    def _logits(self, row: torch.Tensor) -> torch.Tensor:
        return self.model(row.unsqueeze(0).to(self.device), use_cache=False).logits[0].float()

    def capture(self, rows: Sequence[int], chunk: int = 128) -> list[float]:
        """Re-record the block inputs of sequences `rows` for the current weights; their summed KL each."""
        out = []
        with self._recording() as record:
            for s in rows:
                record(s)
                out.append(mean_kl(self.base[s], self._logits(self.batches[s]), chunk)[0])
        return out

    def kl_sums(self, l: int, rows: Sequence[int], chunk: int = 128) -> list[float]:
        """Summed KL(base ‖ current model) of each sequence in `rows`, running only blocks `l..` on the
        recorded inputs of block `l` (exact only if blocks `..l-1` are as they were when recorded)."""
        originals = [self.layers[j] for j in range(l)]
        out = []
        try:
            for j in range(l - 1):
                self.layers[j] = _Skip(self.as_tuple)
            for s in rows:
                if l > 0:
                    self.layers[l - 1] = _Replay(self.hidden[l][s], self.as_tuple)
                out.append(mean_kl(self.base[s], self._logits(self.batches[s]), chunk)[0])
        finally:
            for j, block in enumerate(originals):
                self.layers[j] = block
        return out

    def kl_from(self, l: int, chunk: int = 128) -> float:
        """Mean KL(base ‖ current model) per token over every sequence, running only blocks `l..`."""
        total = sum(self.kl_sums(l, range(len(self.batches)), chunk))
        return max(total / self.batches.numel(), 0.0)


def measure_module(replayer: Replayer, m: Module, lin: nn.Module, options: Sequence[Option], quantizer: Quantizer,
                   H: torch.Tensor | None = None, *, cache: GPTQCache | None = None,
                   importance: np.ndarray | None = None, chunk: int = 128) -> list[float]:
    """KL(base ‖ only `m` quantized) at each option: `lin`'s weight swapped in place, run, restored."""
    W, out = lin.weight.data, []
    # a module outside the blocks (an untied lm_head) changes only the head: replay all blocks; the embedding
    # changes every block's input: run them all
    first = 0 if is_embedding(m) else len(replayer.layers) if m.layer is None else m.layer
    for opt in options:
        # a tied pair's head holds this same Parameter: the swap reaches the lookup and the head
        lin.weight.data = quantize_dequantize(W, opt, quantizer_for(m, quantizer), H, cache=cache, name=m.name,
                                              importance=importance)
        try:
            out.append(replayer.kl_from(first, chunk))
        finally:
            lin.weight.data = W
    return out


@torch.no_grad()
def kl_table(model: nn.Module, planned: list[tuple[Module, nn.Linear]], options: list[Option],
             batches: torch.Tensor, *, quantizer: Quantizer = Quantizer(), device: str = "cpu", chunk: int = 128,
             progress: bool = True, hessian_batches: torch.Tensor | None = None,
             cache: GPTQCache | None = None, routing: dict | None = None,
             importance: dict[str, np.ndarray] | None = None, cluster: Cluster | None = None) -> np.ndarray:
    """`[modules, options]` measured KL(base ‖ only this module quantized with this option), nats per token.

    With a GPTQ `quantizer` the blocks are streamed once more to collect each module's `H`, on
    `hessian_batches` (default `batches`): KL measured on a few tokens must use the ΔW that GPTQ makes
    from the whole calibration text, the one the other estimators and `apply` use, not a GPTQ fitted
    to the few tokens it is then measured on.  Where `cache` holds every module's result (`calibrated`
    after the Fisher table's GPTQ) nothing is streamed or quantized again.

    `routing`, if given, receives the base model's routing records over `batches` (`moe.record_routing`):
    how many of the measured tokens each expert's KL rests on (`calibrated` distrusts too few).
    `importance`: the llamacpp quantizer's column weights per module (`imatrix.importance_rows`).
    `cluster`: the modules are measured on its workers (profiler/cluster.py), the same numbers.
    """
    if cluster is not None:
        return _kl_table_on(cluster, model, planned, options, batches, quantizer, device, chunk, progress,
                            hessian_batches, cache, routing, importance)
    index = {m.name: i for i, (m, _) in enumerate(planned)}
    error = np.zeros((len(planned), len(options)))
    model.to(device)
    # the base pass, once: no extra forward for the routing counts
    with record_routing(model) if routing is not None else nullcontext({}) as records:
        replayer = Replayer(model, batches, device)
    if routing is not None:
        routing.update(records)
    bar = tqdm(total=len(planned) * len(options), desc="kl (module x option)", unit="fwd",
               disable=not progress)

    def measure(mods, H=None):
        model.to(device)
        for m, lin in mods:
            Hm = None if H is None or m.name not in H else H[m.name]
            error[index[m.name]] = measure_module(replayer, m, lin, options, quantizer, Hm, cache=cache,
                                                  importance=(importance or {}).get(m.name), chunk=chunk)
            bar.update(len(options))

    try:
        if quantizer.method == "gptq" and not _cached(cache, planned, options, quantizer):
            hb = batches if hessian_batches is None else hessian_batches
            stream_blocks(model, hb, planned, lambda i, mods, H, n: measure(mods, H), device,
                          progress=False)
            # an untied lm_head
            outside = [(m, lin) for m, lin in planned if m.layer is None and not is_embedding(m)]
            if outside:
                measure(outside, outside_hessians(model, hb, outside, device))
            measure([(m, emb) for m, emb in planned if is_embedding(m)])  # RTN: no H
        else:
            measure(planned)
    finally:
        bar.close()
        model.to("cpu")
    return error


def _cached(cache: GPTQCache | None, planned, options, quantizer: Quantizer) -> bool:
    """Whether `cache` holds GPTQ's result for every planned module GPTQ quantizes, at every option."""
    return cache is not None and all(cache.has(m.name, o, quantizer) for m, _ in planned
                                     if quantizer_for(m, quantizer).method == "gptq"
                                     for o in options if o.quantized)


class KLWorker:
    """A cluster worker's share of `kl_table` (a Ray actor): the model held once, its own base pass,
    and modules measured as they are handed to it, with the GPTQ results they need."""

    def __init__(self, model: nn.Module, batches: torch.Tensor, options: list[Option], quantizer: Quantizer,
                 chunk: int, device: str):
        self.model, self.options, self.quantizer, self.chunk = model.to(device), options, quantizer, chunk
        with torch.no_grad(), record_routing(model) as records:
            self.replayer = Replayer(model, batches, device)
        self.routing = records

    def routing_records(self) -> dict:
        return self.routing

    @torch.no_grad()
    def measure(self, m: Module, cache: GPTQCache | None, importance: np.ndarray | None) -> list[float]:
        return measure_module(self.replayer, m, self.model.get_submodule(m.name), self.options, self.quantizer,
                              cache=cache, importance=importance, chunk=self.chunk)


def _kl_table_on(cluster: Cluster, model, planned, options, batches, quantizer, device, chunk, progress,
                 hessian_batches, cache, routing, importance) -> np.ndarray:
    """`kl_table` with its modules measured by the cluster's workers, GPTQ's results first (on the cluster)
    where `cache` lacks them."""
    from bitplan.profiler.profile import gptq_results

    if quantizer.method == "gptq" and not _cached(cache, planned, options, quantizer):
        # every result the workers need, whatever the caller's cache could keep
        cache = gptq_results(model, planned, options, batches if hessian_batches is None else hessian_batches,
                             quantizer, device, progress, cluster=cluster)
    error = np.zeros((len(planned), len(options)))
    workers = cluster.actors(KLWorker, (model.cpu(), batches, options, quantizer, chunk), device)
    if routing is not None:
        routing.update(cluster.call_all(workers[:1], "routing_records")[0])
    calls = [(m, None if cache is None else cache.entries([m.name]), (importance or {}).get(m.name))
             for m, _ in planned]

    def got(i: int, row: list[float]) -> None:
        error[i] = row

    try:
        cluster.pool(workers, calls, "measure", on_result=got, progress=progress, desc="kl (module x option)")
    finally:
        cluster.close(workers)
    return error
