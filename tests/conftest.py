"""Shared fixtures: a tiny random Llama saved as a real Hugging Face checkpoint, with its own tokenizer (and
an untied copy), loaded; synthetic profiles; small random allocation problems; tiny MoE checkpoints and the
architecture matrix; a store; the whole-model KL that cached replays must reproduce.  And the `gpu` marker:
tests marked `gpu` are skipped here, in one place, where there is no CUDA device.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on generated text.

conftest.py is not importable under `--import-mode=importlib`: a helper that tests share is handed to them
by a fixture that returns it (`build_arch`, `direct_kl`, ...).
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


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """The tiny Llama, loaded (`bitplan.profiler.model.load_model`): one per test module, shared by its tests,
    which must leave it as they found it (a test that changes weights works on a `copy.deepcopy`)."""
    from bitplan.profiler.model import load_model

    return load_model(str(tiny_checkpoint))


@pytest.fixture(scope="session")
def untied_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny Llama's checkpoint with its own, untied, head (random as the rest, same tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("untied")
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def untied_loaded(untied_checkpoint):
    """`untied_checkpoint`, loaded: one per test module, as `loaded`."""
    from bitplan.profiler.model import load_model

    return load_model(str(untied_checkpoint))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(make_text(4000, seed=1))
    return p


@pytest.fixture(scope="session")
def make_profile():
    """The builder of a synthetic SmolLM2-shaped profile (no model needed)."""
    return synthetic.synthetic_profile


@pytest.fixture(scope="session")
def exact_problem():
    """`exact_problem(M, K, N, bits, group)`: `(x, packed, scales, zeros)` of a quantized matmul in which every
    step of a kernel is exact (activations in {-1, 0, 1}, power-of-two scales), seeded: a kernel must give
    the reference to the last bit."""
    import torch

    from bitplan.kernels import reference

    def build(M: int, K: int, N: int, bits: int, group: int):
        g = torch.Generator().manual_seed(7)
        q = torch.randint(0, 2**bits, (K, N), generator=g)
        zeros = torch.randint(0, 2**bits, (-(-K // group), N), generator=g)
        scales = torch.full(zeros.shape, 2.0**-4).half()
        x = torch.randint(-1, 2, (M, K), generator=g).half()
        return x, reference.pack(q, bits), scales, zeros
    return build


@pytest.fixture
def store(tmp_path):
    """A fresh file database (`bitplan.db` in the test's temporary directory), closed after the test."""
    from bitplan.db.store import Store

    s = Store(str(tmp_path / "bitplan.db"))
    yield s
    s.close()


@pytest.fixture
def db(tmp_path, monkeypatch):
    """A fresh database file made `BITPLAN_DB` (the CLI's default `--db`) for the test's duration; its path."""
    url = str(tmp_path / "bitplan.db")
    monkeypatch.setenv("BITPLAN_DB", url)
    return url


def direct_kl(model, quantized, rows) -> float:
    """Mean per-token KL(model ‖ quantized) over `rows: [n, T]` by whole-model passes, no caching: the
    definition every cached replay (`kl_table`, the evolutionary oracle) must reproduce."""
    import torch

    total = 0.0
    with torch.no_grad():
        for row in rows:
            p = torch.log_softmax(model(row.unsqueeze(0)).logits[0].float(), -1)
            q = torch.log_softmax(quantized(row.unsqueeze(0)).logits[0].float(), -1)
            total += float((p.exp() * (p - q)).sum())
    return total / rows.numel()


@pytest.fixture(scope="session", name="direct_kl")
def direct_kl_fixture():
    """`direct_kl(model, quantized, rows)`: the whole-model KL (see `direct_kl` above)."""
    return direct_kl


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


MOE_KINDS = ("mixtral", "qwen2_moe")
"""The kinds `make_moe` builds."""


@pytest.fixture(scope="module", params=MOE_KINDS)
def moe_loaded(request, moe_checkpoint):
    """Each tiny MoE of `MOE_KINDS` in turn, loaded (experts un-fused): one per test module and kind, shared
    by its tests, which must leave it as they found it (a test that changes weights loads its own)."""
    from bitplan.profiler.model import load_model

    return load_model(str(moe_checkpoint(request.param)))


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


# ------------------------------------------------------------------------------------- llama.cpp

REQUIRE_LLAMACPP = "BITPLAN_REQUIRE_LLAMACPP"


@pytest.fixture(scope="session")
def llamacpp():
    """The directory of llama.cpp's built tools (`make llamacpp`).  Where they are missing the test is
    skipped, except under $BITPLAN_REQUIRE_LLAMACPP (`make test` sets it, so CI cannot skip): it fails."""
    import os

    from bitplan.kernels.llamacpp import LlamaCppMissing, check_tools, llamacpp_dir

    try:
        check_tools()
    except LlamaCppMissing as e:
        if os.environ.get(REQUIRE_LLAMACPP):
            pytest.fail(f"{REQUIRE_LLAMACPP} is set and {e}")
        pytest.skip(str(e))
    return llamacpp_dir()


@pytest.fixture(scope="session")
def gguf_checkpoint(tmp_path_factory, llamacpp):
    """A tiny random Llama that llama.cpp's converter takes: SmolLM2's tokenizer (a pre-tokenizer
    convert_hf_to_gguf.py knows, read from the embedded model's GGUF), hidden 256 so that rows of 256
    take K-quants, and MLP width 576 so that down_proj's rows of 576 fall back to 32-blocks, as
    SmolLM2's do.  The directory, and its F16 GGUF beside it (`base.gguf`)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bitplan.executor.llamacpp import base_gguf
    from bitplan.profiler.model import resolve

    directory, name = resolve("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=576, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    base_gguf(str(path), path.parent / "base.gguf")
    return path


# ------------------------------------------------------------------------------------- live server


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """`free_port()`: a loopback port nothing listens on (closed again; free until someone binds it)."""
    return _free_port


@pytest.fixture(scope="session")
def live_server():
    """`with live_server(app) as base_url:` the ASGI `app` served by uvicorn on a free loopback port, in a
    thread of this process, until the block ends."""
    import contextlib
    import threading
    import time

    @contextlib.contextmanager
    def serve(app):
        import uvicorn

        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=10)

    return serve


# ------------------------------------------------------------------------------------- gpu marker


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: where there is none (or no torch), they are skipped."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    try:
        import torch
        available = torch.cuda.is_available()
    except ImportError:
        available = False
    if not available:
        skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
        for item in gpu:
            item.add_marker(skip)
