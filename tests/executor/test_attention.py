"""A model's decode steps with the decode attention kernel (`executor/attention.py`) give the logits
transformers' own SDPA attention gives, over a static cache as decoding fills it; prefill still runs SDPA."""

import copy

import pytest
import torch

from bitplan.executor.attention import NAME, use_decode_attention


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)])
def test_decode_steps_match_sdpa(heads, kv_heads, kernel_device, monkeypatch):
    """On a GPU in bf16 (the kernel's tl.dot rounds fp32 to TF32 there), on the CPU in fp32 under the interpreter."""
    device = kernel_device
    if device == "cuda":
        # bf16 moves this model's logits by about 4e-3 from fp32's; one cached position left out, by about 0.2
        dtype, tol = torch.bfloat16, dict(rtol=2e-2, atol=2e-2)
    else:
        dtype, tol = torch.float32, dict(rtol=1e-4, atol=1e-4)
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    from bitplan.kernels import attention as kernel
    calls = []
    run = kernel.decode_attention
    monkeypatch.setattr(kernel, "decode_attention", lambda *a, **k: calls.append(a[0].shape) or run(*a, **k))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16)
    sdpa = LlamaForCausalLM(config).eval().to(device, dtype)
    ours = copy.deepcopy(sdpa)
    use_decode_attention(ours)
    assert ours.config._attn_implementation == NAME
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1)).to(device)
    caches = [StaticCache(config=config, max_cache_len=20) for _ in range(2)]
    with torch.no_grad():
        outs = [m(ids, past_key_values=c, cache_position=torch.arange(9, device=device)).logits
                for m, c in zip((sdpa, ours), caches)]
        torch.testing.assert_close(outs[1], outs[0])
        token = outs[0][:, -1:].argmax(-1)
        for pos in range(9, 13):  # one token a step, the cache's unfilled end masked out
            got, want = (m(token, past_key_values=c, cache_position=torch.tensor([pos], device=device)).logits
                         for m, c in zip((ours, sdpa), caches))
            torch.testing.assert_close(got, want, **tol)
            token = want[:, -1:].argmax(-1)
    assert calls == [(2, heads, 1, 16)] * 4 * 2  # the kernel ran each decode step in each layer, not the prefill


def test_decode_step_compiles_whole():
    """The decode step traces as one graph with the kernel as an opaque operator (what decoding with
    `compile` captures), and gives the eager step's logits."""
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(config).eval()
    use_decode_attention(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    caches = [StaticCache(config=config, max_cache_len=12) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model(ids, past_key_values=c, cache_position=torch.arange(6))
        for pos in (6, 7):
            token = torch.tensor([[pos + 3]])
            want = model(token, past_key_values=caches[0], cache_position=torch.tensor([pos])).logits
            got = compiled(token, past_key_values=caches[1], cache_position=torch.tensor([pos])).logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
