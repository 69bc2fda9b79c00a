"""Shared fixtures: a tiny random Llama saved as a real Hugging Face checkpoint, with its own tokenizer;
synthetic profiles; small random allocation problems.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on generated text.
"""

from __future__ import annotations

import random

import pytest

from bitplan.planner import synthetic

WORDS = ("the king queen lord lady speak love death night day sword crown heart grief honour fair foul "
         "thou thee thy art doth hath shall will come go now here there what why when where how").split()


def make_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    while n_words > 0:
        k = rng.randint(5, 12)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + rng.choice(".,;!?"))
        n_words -= k
    return "\n".join(lines)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(make_text(3000).splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_llama(vocab_size: int, seed: int = 0, tie: bool = True, hidden: int = 96):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A directory with config.json, model.safetensors and tokenizer of a 2-layer Llama (hidden 96:
    not a multiple of the group size 64)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    model = make_llama(len(tok))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(make_text(4000, seed=1))
    return p


@pytest.fixture(scope="session")
def make_profile():
    """The builder of a synthetic SmolLM2-shaped profile (no model needed)."""
    return synthetic.synthetic_profile


# ------------------------------------------------------------------------ random allocation problems


@pytest.fixture(scope="session")
def random_problem():
    """The builder of a small random allocation problem (`bitplan.planner.synthetic.random_problem`)."""
    return synthetic.random_problem


@pytest.fixture(scope="session")
def convex_problem():
    """The builder of a small strictly convex allocation problem (`bitplan.planner.synthetic.convex_problem`)."""
    return synthetic.convex_problem


# ------------------------------------------------------------------------------- tiny MoE models


def make_moe(kind: str, vocab_size: int, seed: int = 0):
    """A tiny random MoE causal LM (fused experts, as transformers 5 builds them): `mixtral` (5 experts,
    top-2) or `qwen2_moe` (4 experts, top-2, a shared expert and its sigmoid gate)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=2)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(intermediate_size=64, num_local_experts=5, **common)).eval()
    if kind == "qwen2_moe":
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=64,
                                                   shared_expert_intermediate_size=96, num_experts=4,
                                                   tie_word_embeddings=False, **common)).eval()
        # a wider router than init's std 0.02: decisive routing, uneven loads, distinct routing weights
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)
        return model
    raise ValueError(kind)


@pytest.fixture(scope="session")
def moe_checkpoint(tmp_path_factory):
    """`moe_checkpoint(kind)`: a saved tiny MoE checkpoint directory with tokenizer (built once per kind)."""
    made = {}

    def build(kind: str):
        if kind not in made:
            d = tmp_path_factory.mktemp(f"tiny-{kind}")
            tok = make_tokenizer()
            make_moe(kind, len(tok)).save_pretrained(d)
            tok.save_pretrained(d)
            made[kind] = d
        return made[kind]
    return build


# ------------------------------------------------------------------- the architecture test matrix

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3", "mixtral", "qwen2_moe",
            "deepseek_v2", "deepseek_v3")
"""Every model family bitplan claims, each as `make_arch` builds it."""

SLIDING_WINDOW = 8
"""The sliding window of the families that have one: sequences longer than it tell the masks apart."""


def make_arch(family: str, vocab_size: int, seed: int = 0):
    """A tiny random causal LM of `family` (one of `FAMILIES`): hidden size 64, 2-4 layers, fp32, eval mode,
    as transformers builds it (MoE experts still fused: `bitplan.profiler.moe.unfuse_experts` is the
    caller's).

    Each keeps what makes its family differ from Llama where that is cheap: Qwen2/Qwen3 and Gemma 2/3 mix
    full-attention and sliding-window layers (window `SLIDING_WINDOW`; Qwen's first layer is full, Gemma's
    sliding), Gemma 3's sliding layers have their own rotary base, Mistral and Phi-3 slide everywhere, Phi-3
    fuses qkv and gate/up; the MoE families: Mixtral (routed experts only), Qwen2-MoE (a shared expert and
    its gate), DeepSeek-V2/V3 (MLA attention, a dense first layer, grouped routing, shared experts).
    """
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    window = dict(sliding_window=SLIDING_WINDOW)
    if family in ("mixtral", "qwen2_moe"):
        return make_moe(family, vocab_size, seed)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=2, **common))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(num_hidden_layers=3, use_sliding_window=True,
                                                   max_window_layers=1, **window, **common))
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(num_hidden_layers=3, head_dim=16, use_sliding_window=True,
                                                   max_window_layers=1, **window, **common))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(num_hidden_layers=2, **window, **common))
    elif family == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(num_hidden_layers=2, pad_token_id=0, eos_token_id=1,
                                                 **window, **common))
    elif family == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(
            num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16, **window, **common,
            layer_types=["sliding_attention", "full_attention"] * 2))
    elif family == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16, **window, **common,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}))
    elif family in ("deepseek_v2", "deepseek_v3"):
        mla = dict(num_hidden_layers=2, first_k_dense_replace=1, moe_intermediate_size=32, n_shared_experts=1,
                   n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=16,
                   q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **common)
        mla["num_key_value_heads"] = mla["num_attention_heads"]
        if family == "deepseek_v2":
            model = tf.DeepseekV2ForCausalLM(tf.DeepseekV2Config(topk_method="group_limited_greedy", **mla))
        else:
            model = tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(**mla))
        # a wider router than init's (decisive routing, uneven loads), as in make_moe
        for layer in model.model.layers[1:]:
            torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    return model.eval()


@pytest.fixture(scope="session", params=FAMILIES)
def arch_family(request):
    """Each of `FAMILIES` in turn: a test (or fixture) that takes it runs once per family."""
    return request.param


@pytest.fixture(scope="session")
def build_arch():
    """`make_arch`, for test modules (conftest.py is not importable under `--import-mode=importlib`)."""
    return make_arch
