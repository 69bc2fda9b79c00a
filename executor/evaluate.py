"""Measurements on a model: perplexity over fixed windows of held-out text, KL to the base model of plans
(`evaluate_plans`) and of module choices swapped in by a fitness oracle (`evaluate_choices`), decode speed."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bitplan.db.types import Quantizer
from bitplan.profiler.calibration import EVAL, token_batches
from bitplan.profiler.stream import run_streamed
from bitplan.profiler.weights import streamed

log = logging.getLogger(__name__)

EVAL_TOKENS = 8192  # held-out tokens a perplexity is measured on
EVAL_WINDOW = 512  # tokens per scored window


@dataclass
class Windows:
    """Held-out evaluation text, tokenized once and reused for every model compared."""

    ids: torch.Tensor  # [n, window]
    corpus: str


def eval_windows(tokenizer, text: str | None = None, tokens: int = EVAL_TOKENS, window: int = EVAL_WINDOW) -> Windows:
    """`tokens` of `text` (default: the held-out plays, `profiler.calibration.EVAL`) as `window`-token rows."""
    ids, ref = token_batches(tokenizer, text or EVAL, tokens, window)
    return Windows(ids, ref.name)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: str = "cpu", progress: bool = True) -> float:
    """exp(mean next-token NLL) over `windows: [n, window]`, each scored on its own (stride = window).  A
    model whose weights stay on disk runs one block at a time over all windows (`run_streamed`)."""
    nll, count = 0.0, 0

    def score(_s, ids, out) -> None:
        nonlocal nll, count
        logits = out.logits[0, :-1].float()
        nll += float(nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1

    if streamed(model) is not None:
        run_streamed(model, windows, score, device, progress, desc="perplexity (streamed blocks)")
        return math.exp(nll / count)
    model.to(device)
    for s, row in enumerate(tqdm(windows, desc="perplexity", unit="window", disable=not progress)):
        ids = row.unsqueeze(0).to(device)
        score(s, ids, model(ids, use_cache=False))
    return math.exp(nll / count)


@torch.no_grad()
def decode_speed(model: nn.Module, batch: int, prompt: int = 512, new_tokens: int = 128, vocab: int | None = None,
                 device: str = "cuda", seed: int = 0, graph: bool = True, compile: bool = False,
                 kernels: bool = False) -> dict:
    """Greedy decoding of `new_tokens` after a `prompt`-token random prompt, `batch` sequences at once.

    One token step is captured in a CUDA graph (a static KV cache, the step's input ids and position
    updated in place), so what is timed is the GPU's work, not the Python and launch overhead of eager
    PyTorch, which at batch 1 on a small model exceeds the kernels' time (`graph=False` times eager
    steps).  With `compile`, the step is `torch.compile`d first (the prefill stays eager): the graph
    then replays Inductor's fused kernels for the norms, rotary embedding and residual adds in place of
    eager PyTorch's many small ones, and each quantized linear as its one opaque operator
    (`kernels.matmul.quant_matmul`).  Returns decode tokens/s, prefill seconds, peak GPU memory, and
    whether the graph was used (a model whose step cannot be captured falls back to eager and says so).
    With `kernels`, also the GPU time of each kernel one step launches (`step_kernels`), profiled outside
    the graph on the same compiled step that is then captured, so a step is compiled once.
    """
    import time

    warm = 3
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    # room for the warm-up steps, a profiled one and the timed ones, and a spare
    cache, step_ids, pos = prefilled(model, batch, prompt, warm + 1 + new_tokens + 1, vocab, device, seed)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t0

    # one fixed shape per step, so no recompilation; the module is shared, not copied
    forward = torch.compile(model, dynamic=False) if compile else model

    def step():
        out = forward(step_ids, past_key_values=cache, use_cache=True, cache_position=pos).logits
        step_ids.copy_(out[:, -1:].argmax(-1))
        pos.add_(1)

    for _ in range(warm):  # kernels compiled and tuned, allocator primed, before any capture
        step()
    torch.cuda.synchronize()
    log.info("decode at batch %d: prefilled, %s and warm in %.0f s", batch, "compiled" if compile else "eager",
             time.perf_counter() - t0)
    profiled = step_kernels(step) if kernels else None
    used_graph = False
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            run, used_graph = g.replay, True
        except Exception:  # noqa: BLE001 - a model whose step syncs with the host: timed eagerly instead
            run = step
    else:
        run = step
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        run()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = dict(batch=batch, prompt=prompt, new_tokens=new_tokens, prefill_s=prefill, cuda_graph=used_graph,
               compiled=compile, decode_tokens_per_s=batch * new_tokens / seconds,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    if kernels:
        out["kernels"] = profiled
    return out


def step_kernels(step) -> list[dict]:
    """GPU microseconds and launches of each kernel (or copy) that one call of `step` runs, by name, costliest
    first (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    totals: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = totals.setdefault(e.name, [0.0, 0])
            t[0] += e.time_range.elapsed_us()
            t[1] += 1
    return [dict(kernel=k, us=us, calls=n) for k, (us, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])]


@torch.no_grad()
def prefilled(model: nn.Module, batch: int, prompt: int, spare: int, vocab: int | None = None, device: str = "cuda",
              seed: int = 0) -> tuple:
    """`model` run over a `batch` x `prompt` random prompt into a static KV cache with room for `spare` more
    tokens: returns the cache, the next token ids (`[batch, 1]`, greedy) and the next position (`[1]`), the
    inputs of a decode step that updates them in place (`decode_speed`)."""
    from transformers import StaticCache

    vocab = vocab or model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(seed)).to(device)
    cache = StaticCache(config=model.config, max_cache_len=prompt + spare)
    logits = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(prompt, device=device)).logits
    return cache, logits[:, -1:].argmax(-1), torch.tensor([prompt], device=device)


def dense_twin(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A copy of `model` with every `QuantLinear` replaced by an `nn.Linear` holding its dequantized
    weights in `dtype`, and the routed experts fused again as transformers holds them
    (`_fused_experts_twin`): the unquantized model of the same architecture, the baseline of a speed test."""
    import copy

    from bitplan.executor.quant_linear import QuantEmbedding, QuantLinear, QuantTiedHead
    from bitplan.profiler.moe import expert_sets

    experts = dict(expert_sets(model))
    # the experts are built anew, not copied (a copy would hold their packed weights once more meanwhile):
    # an empty module stands in their place until then
    twin = copy.deepcopy(model, memo={id(mod): nn.Module() for mod in experts.values()})
    _fused_experts_twin(twin, experts, dtype)
    heads = []
    for name, mod in list(twin.named_modules()):
        if isinstance(mod, QuantEmbedding):
            emb = nn.Embedding(mod.num_embeddings, mod.embedding_dim, mod.padding_idx, dtype=dtype,
                               device=mod.scales.device)
            emb.weight.data.copy_(mod.dequantized_weight(torch.float32))
            twin.set_submodule(name, emb)
        elif isinstance(mod, QuantTiedHead):
            heads.append(name)
        elif isinstance(mod, QuantLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=dtype,
                            device=mod.scales.device)
            lin.weight.data.copy_(mod.dequantized_weight(torch.float32))
            if mod.bias is not None:
                lin.bias.data.copy_(mod.bias)
            twin.set_submodule(name, lin)
    for name in heads:  # a tied pair's head: tied again, to the twin's embedding, as the model had it
        head = nn.Linear(*twin.get_input_embeddings().weight.shape[::-1], bias=False, device="meta")
        head.weight = twin.get_input_embeddings().weight
        twin.set_submodule(name, head)
    return twin.to(dtype)


def speed_report(model: nn.Module, batches=(1, 16), prompt: int = 512, new_tokens: int = 128,
                 device: str = "cuda", compile: bool = False, merge: bool = True, twin: nn.Module | None = None,
                 kernels: bool = False) -> dict:
    """Decode speed and peak memory of `model` (in the dtype it runs in) and of its bf16 `dense_twin`,
    measured in the same process, one model on the GPU at a time, both `torch.compile`d or neither
    (`decode_speed`).  With `merge`, sibling projections (q, k and v; gate and up) are merged in both first,
    in place, as serving engines hold them (`executor.fused`): their counts are under `"fused"`.  `twin`: the
    twin if the caller has built it already (it is then merged or not as `merge` says, like the model).
    `kernels`: each model's step profiled kernel by kernel too (`decode_speed`).

    Returns `{"batches": {"1": {"model": {...}, "bf16": {...}, "speedup": x}, ...}, "weights_gib": {...}}`.
    """
    from bitplan.executor.fused import fuse_projections

    model = model.to(device).eval()
    twin = (dense_twin(model) if twin is None else twin).cpu()
    out = {"prompt": prompt, "new_tokens": new_tokens, "batches": {},
           "weights_gib": {"model": _weight_gib(model), "bf16": _weight_gib(twin)}, "fused": {}}
    probe = torch.zeros(1, 4, dtype=torch.long, device=device)
    for who, m in (("model", model), ("bf16", twin)):
        if merge:  # on the GPU, where the probe runs fast
            out["fused"][who] = fuse_projections(m.to(device), probe)
        m.cpu()
    for b in batches:
        model.to(device)  # only the model being timed on the GPU, so that peak memory is its own
        mine = decode_speed(model, b, prompt, new_tokens, device=device, compile=compile, kernels=kernels)
        model.cpu()
        twin.to(device)
        base = decode_speed(twin, b, prompt, new_tokens, device=device, compile=compile, kernels=kernels)
        twin.cpu()
        out["batches"][str(b)] = {"model": mine, "bf16": base,
                                  "speedup": mine["decode_tokens_per_s"] / base["decode_tokens_per_s"]}
    model.to(device)
    torch.cuda.empty_cache()
    return out


def _weight_gib(model: nn.Module) -> float:
    # each tensor once: a tied head, and a merged linear that each of its siblings holds (`executor.fused`)
    unique = {(t.data_ptr(), t.numel()): t for t in model.state_dict().values() if t.numel()}
    return sum(t.numel() * t.element_size() for t in unique.values()) / 2**30


@torch.no_grad()
def evaluate_plans(model: nn.Module, planned, assignments: list[dict], windows: torch.Tensor, *,
                   quantizer: Quantizer = Quantizer(), hessians=None, device: str = "cpu", progress: bool = True,
                   cache=None, importance: dict | None = None, per_window: bool = False) -> list[dict]:
    """Perplexity and mean per-token KL(base ‖ plan) of each assignment (module name -> Option) on `windows`;
    with `per_window`, also each window's summed NLL and KL (`window_nll`, `window_kl`), for paired
    intervals between plans.

    In memory, one plan after another: each planned weight is replaced by its quantized-dequantized
    value (the values `apply` stores), everything else stays as loaded, and the original weights are
    restored at the end.  The base model's log-probabilities are computed once (`windows.numel() x
    vocab` float32: keep the windows few).  `cache` (an `kernels.quantize.GPTQCache`) runs GPTQ once
    per (module, option) over all the plans; `importance`, the llamacpp quantizer's column weights per
    module (`profiler.imatrix.importance_rows`).
    """
    from bitplan.kernels.quantize import quantize_dequantize, quantizer_for
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
                H = hessians.get(m.name) if hessians is not None and opt.quantized else None
                # a tied embedding's Parameter is the head's too: both read the quantized values
                lin.weight.data = quantize_dequantize(W, opt, quantizer_for(m, quantizer), H, cache=cache,
                                                      name=m.name, importance=(importance or {}).get(m.name))
            nlls, kls, count = [], [], 0
            for row, logp in zip(windows, base):
                ids = row.unsqueeze(0).to(device)
                logits = model(ids, use_cache=False).logits[0].float()
                nlls.append(float(nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")))
                kls.append(mean_kl(logp, logits)[0])
                count += ids.shape[1]
            out.append(dict(perplexity=math.exp(sum(nlls) / (count - len(windows))), kl=sum(kls) / count,
                            **({"window_nll": nlls, "window_kl": kls} if per_window else {})))
    finally:
        for m, lin in planned:
            lin.weight.data = originals[m.name]
    return out



@torch.no_grad()
def evaluate_choices(oracle, model: nn.Module, windows: torch.Tensor, choices: dict) -> dict:
    """Per evaluation window, for each named module choice: the NLL sum over its next-token predictions
    and the KL(base ‖ plan) sum over its tokens (as `evaluate_plans` measures them).

    `oracle` is the `profiler.fitness.KLFitness` of `model`: a choice (one option index per planned module
    of the oracle) is swapped in as the oracle's quantized weights, the values `apply` writes.  The base
    model's log-probs are computed once per window, with the oracle's weights off; the original weights
    are back at the end.  Returns `{name: {"nll": [per window], "kl": [per window]}}`, for
    `summarize_windows` (and paired noise estimates: the same windows for every choice).
    """
    from bitplan.profiler.kl import mean_kl

    out = {name: {"nll": [], "kl": []} for name in choices}
    try:
        for row in windows:
            ids = row.unsqueeze(0).to(oracle.device)
            oracle.close()  # the original weights
            base = torch.log_softmax(model(ids, use_cache=False).logits[0].float(), -1)
            for name, choice in choices.items():
                oracle.install(np.asarray(choice))
                logits = model(ids, use_cache=False).logits[0].float()
                nll = nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
                out[name]["nll"].append(float(nll))
                out[name]["kl"].append(mean_kl(base, logits)[0])
    finally:
        oracle.close()
    return out


def summarize_windows(per_window: dict, window: int, n_windows: int | None = None) -> dict:
    """Perplexity and mean per-token KL of each choice of `evaluate_choices` over its first `n_windows`
    windows of `window` tokens (all of them: None), and the tokens that makes."""
    res = {}
    for name, v in per_window.items():
        nll, kl = np.asarray(v["nll"][:n_windows]), np.asarray(v["kl"][:n_windows])
        res[name] = {"perplexity": float(np.exp(nll.sum() / (len(nll) * (window - 1)))),
                     "kl": float(kl.sum() / (len(kl) * window)), "tokens": int(len(nll) * window)}
    return res


def _fused_experts_twin(twin: nn.Module, experts: dict, dtype: torch.dtype) -> None:
    """At each name of `experts` (the model's `ExpertLinears`), `twin` gets its architecture's own fused experts
    module, as transformers builds it, holding the experts' (dequantized) weights in `dtype` and run by
    transformers' grouped-mm experts implementation.

    Why this baseline: it is the bf16 model as transformers runs it by default.  One `grouped_mm` per
    projection takes all the experts' weights with per-expert row offsets computed on the device (sort,
    histc, cumsum: no host read, so its decode step is captured in a CUDA graph as the quantized model's
    is), and reads only the experts that got rows.  The un-fused loop of `ExpertLinears` would read the
    routing back to the host in every layer, and gathering the chosen experts' weights per token would
    copy them; a grouped bf16 module of our own would measure our code rather than the model's own.
    """
    if not experts:
        return
    from bitplan.executor.quant_linear import QuantLinear

    def weight(lin: nn.Module) -> torch.Tensor:
        return lin.dequantized_weight(torch.float32) if isinstance(lin, QuantLinear) else lin.weight

    with torch.device("meta"):  # the architecture's modules, nothing allocated
        fresh = type(twin)(twin.config)
    for name, mod in experts.items():
        device = weight(mod[0].down_proj).device
        fused = fresh.get_submodule(name).to(dtype).to_empty(device=device)
        E, two_i, H = fused.gate_up_proj.shape
        I = two_i // 2  # noqa: E741
        if (E, H, I) != (len(mod), mod[0].down_proj.out_features, mod[0].down_proj.in_features):
            raise ValueError(f"{name}: the architecture's fused experts are {E} x [{two_i}, {H}], not the model's "
                             f"{len(mod)} experts of {mod[0].down_proj.in_features} x "
                             f"{mod[0].down_proj.out_features}")
        with torch.no_grad():
            for e, mlp in enumerate(mod):  # gate rows first: `profiler.moe.unfuse_experts` reversed
                fused.gate_up_proj[e, :I] = weight(mlp.gate_proj)
                fused.gate_up_proj[e, I:] = weight(mlp.up_proj)
                fused.down_proj[e] = weight(mlp.down_proj)
        twin.set_submodule(name, fused)
    twin.set_experts_implementation("grouped_mm")
