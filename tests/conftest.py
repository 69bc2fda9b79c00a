"""Shared fixtures: a tiny random Llama saved as a real Hugging Face checkpoint, with its own tokenizer;
synthetic profiles; small random allocation problems.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on generated text.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from bitplan.db.types import ModelRef, Module, Profile, parse_options
from bitplan.planner.problem import AllocationProblem

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


ROLES = {  # role -> [out_features, in_features], as in nn.Linear
    "self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}
PROFILE_FIXED_BITS = 8 * 2**20 * 8  # 8 MiB of embeddings and norms, counted only in size budgets


def synthetic_profile(options: str = "2,3,4,8", seed: int = 0) -> Profile:
    """30 layers x 7 roles + lm_head; error = sensitivity x numel x 4^-bits (more bits, less error)."""
    rng = np.random.default_rng(seed)
    modules = [Module(name=f"model.layers.{i}.{role}", shape=shape, layer=i, role=role.split(".")[1])
               for i in range(30) for role, shape in ROLES.items()]
    modules.append(Module(name="lm_head", shape=(4096, 576), role="lm_head"))
    opts = parse_options(options)
    bits = np.array([o.bits for o in opts], dtype=float)
    numel = np.array([m.numel for m in modules], dtype=float)[:, None]
    error = rng.lognormal(0, 1, (len(modules), 1)) * numel * 4.0 ** -bits * 1e-6
    size = [[o.size_bits(*m.shape) for o in opts] for m in modules]
    return Profile(id="prof-synthetic", model=ModelRef(name="synthetic"), estimator="synthetic", options=opts,
                   modules=modules, error=error, size_bits=size, fixed_bits=PROFILE_FIXED_BITS)


@pytest.fixture(scope="session")
def make_profile():
    """The builder of a synthetic SmolLM2-shaped profile (no model needed)."""
    return synthetic_profile


# ------------------------------------------------------------------------ random allocation problems


def make_random_problem(seed: int, budget: int | None = None) -> AllocationProblem:
    """2-8 units, 2-5 options, small integer sizes (ties included), a random mask on most seeds,
    errors decreasing with size on even seeds and arbitrary on odd ones; budget in [smallest, largest]."""
    rng = np.random.default_rng(seed)
    U, O = int(rng.integers(2, 9)), int(rng.integers(2, 6))
    size = np.sort(rng.integers(1, 25, (U, O)), axis=1)
    error = rng.random((U, O))
    if seed % 2 == 0:
        error = -np.sort(-error, axis=1)
    allowed = np.ones((U, O), dtype=bool)
    if seed % 3:
        allowed = rng.random((U, O)) < 0.7
        allowed[np.arange(U), rng.integers(0, O, U)] = True  # every unit keeps an option
    p = AllocationProblem(error, size, allowed, 0)
    if budget is None:
        budget = int(rng.integers(p.smallest(), p.largest() + 1))
    return AllocationProblem(error, size, allowed, budget)


def make_convex_problem(seed: int, U: int = 6, O: int = 5) -> AllocationProblem:
    """Every unit's (size, error) strictly convex and decreasing, all allowed: each option is on the hull."""
    rng = np.random.default_rng(seed)
    d_size = rng.integers(1, 10, (U, O - 1))
    gain = -np.sort(-rng.random((U, O - 1)), axis=1)  # error removed per bit, decreasing: convex
    size = np.concatenate([rng.integers(5, 20, (U, 1)), d_size], axis=1).cumsum(axis=1)
    error = np.concatenate([rng.random((U, 1)) + 10, -gain * d_size], axis=1).cumsum(axis=1)
    return AllocationProblem(error, size, np.ones((U, O), dtype=bool), int(size[:, 0].sum()))


@pytest.fixture(scope="session")
def random_problem():
    """The builder of a small random allocation problem (`make_random_problem`)."""
    return make_random_problem


@pytest.fixture(scope="session")
def convex_problem():
    """The builder of a small strictly convex allocation problem (`make_convex_problem`)."""
    return make_convex_problem
