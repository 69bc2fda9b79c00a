"""Measurements on a model: perplexity over fixed windows of held-out text."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: str = "cpu", progress: bool = True) -> float:
    """exp(mean next-token NLL) over `windows: [n, window]`, each scored on its own (stride = window)."""
    model.to(device)
    nll, count = 0.0, 0
    for row in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        ids = row.unsqueeze(0).to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        nll += float(nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / count)


@torch.no_grad()
def decode_speed(model: nn.Module, batch: int, prompt: int = 512, new_tokens: int = 128, vocab: int | None = None,
                 device: str = "cuda", seed: int = 0) -> dict:
    """Greedy generation of `new_tokens` after a `prompt`-token random prompt, `batch` sequences at once.

    Returns decode tokens/s (new tokens of all sequences over the time after the first one, so prefill
    is not counted), prefill seconds and peak GPU memory.  Random prompts: speed does not depend on the text.
    """
    import time

    vocab = vocab or model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(seed)).to(device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(2)  # warm-up: kernels compiled and tuned, allocator primed
    torch.cuda.reset_peak_memory_stats()
    prefill = timed(1)
    total = timed(new_tokens)
    return dict(batch=batch, prompt=prompt, new_tokens=new_tokens, prefill_s=prefill,
                decode_tokens_per_s=batch * (new_tokens - 1) / max(total - prefill, 1e-9),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


@torch.no_grad()
def evaluate_plans(model: nn.Module, planned, assignments: list[dict], windows: torch.Tensor, *,
                   quantizer: str = "rtn", hessians=None, device: str = "cpu", progress: bool = True) -> list[dict]:
    """Perplexity and mean per-token KL(base ‖ plan) of each assignment (module name -> Option) on `windows`.

    In memory, one plan after another: each planned weight is replaced by its quantized-dequantized
    value (the values `apply` stores), everything else stays as loaded, and the original weights are
    restored at the end.  The base model's log-probabilities are computed once (`windows.numel() x
    vocab` float32: keep the windows few).
    """
    from bitplan.executor.quantize import quantize_dequantize
    from bitplan.profiler.kl import mean_kl

    model.to(device)
    originals = {m.name: lin.weight.data for m, lin in planned}
    base = [torch.log_softmax(model(row.unsqueeze(0).to(device), use_cache=False).logits[0].float(), -1)
            for row in windows]
    out = []
    try:
        for assignment in tqdm(assignments, desc="evaluating plans", unit="plan", disable=not progress):
            for m, lin in planned:
                W = originals[m.name]
                opt = assignment[m.name]
                H = hessians[m.name] if hessians is not None and opt.quantized else None
                lin.weight.data = quantize_dequantize(W, opt, quantizer, H)
            nll, kl, count = 0.0, 0.0, 0
            for row, logp in zip(windows, base):
                ids = row.unsqueeze(0).to(device)
                logits = model(ids, use_cache=False).logits[0].float()
                nll += float(nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
                kl += mean_kl(logp, logits)[0]
                count += ids.shape[1]
            out.append(dict(perplexity=math.exp(nll / (count - len(windows))), kl=kl / count))
    finally:
        for m, lin in planned:
            lin.weight.data = originals[m.name]
    return out
