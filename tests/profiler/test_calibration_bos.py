"""Windows start as the model's tokenizer starts a text: with its BOS where it adds one (issue 14)."""

import math

import pytest
import torch
from torch import nn

from bitplan.db.types import InvalidInput
from bitplan.executor.evaluate import evaluate_plans, perplexity
from bitplan.profiler.calibration import special_prefix, token_batches

N_TOKENS, SEQ = 256, 32


@pytest.fixture(scope="module")
def trained(text_file):
    """A byte-level BPE with `<eos>` (id 0) and `<bos>` (id 1), as JSON so each test gets its own copy."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<bos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text_file.read_text().splitlines(), trainer)
    return tok.to_str()


def tokenizer(trained: str, how: str):
    """`how`: `plain` (adds nothing), `flag` (`add_bos_token`, as GGUF and Llama/Gemma configs say it) or
    `template` (a post-processor adding BOS before and EOS after, as Llama 3's tokenizer.json does)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(trained)
    kw = {}
    if how == "flag":
        kw["add_bos_token"] = True
    elif how == "template":
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                           special_tokens=[("<bos>", 1), ("<eos>", 0)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", **kw)
    assert (t("x")["input_ids"][0] == 1) == (how != "plain")
    return t


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def text_ids(tok, text_file) -> list[int]:
    return tok(text_file.read_text(), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("how", ["flag", "template"])
def test_every_window_starts_with_bos_and_the_text_runs_on(trained, text_file, how):
    tok = tokenizer(trained, how)
    assert special_prefix(tok) == [1]  # the template's trailing EOS is no part of it
    ids, ref = token_batches(tok, str(text_file), N_TOKENS, SEQ)
    n = N_TOKENS // SEQ
    assert ids.shape == (n, SEQ) and ref.n_tokens == ids.numel() and ref.seq_len == SEQ
    assert (ids[:, 0] == 1).all()
    assert (ids[:, 1:] != 1).all() and (ids != 0).all()  # one BOS a window, no EOS
    # the text tokens, window after window, are the text's own tokens: none skipped, none repeated
    assert ids[:, 1:].reshape(-1).tolist() == text_ids(tok, text_file)[: n * (SEQ - 1)]


def test_a_tokenizer_that_adds_nothing_gets_plain_slices_of_the_text(trained, text_file):
    tok = tokenizer(trained, "plain")
    assert special_prefix(tok) == []
    ids, _ = token_batches(tok, str(text_file), N_TOKENS, SEQ)
    assert ids.reshape(-1).tolist() == text_ids(tok, text_file)[:N_TOKENS]


def test_the_fingerprint_tells_bos_windows_apart(trained, text_file):
    _, plain = token_batches(tokenizer(trained, "plain"), str(text_file), N_TOKENS, SEQ)
    _, flag = token_batches(tokenizer(trained, "flag"), str(text_file), N_TOKENS, SEQ)
    _, template = token_batches(tokenizer(trained, "template"), str(text_file), N_TOKENS, SEQ)
    assert plain.fingerprint != flag.fingerprint == template.fingerprint


def test_a_window_with_no_room_for_text_is_refused(trained, text_file):
    with pytest.raises(InvalidInput, match="no room for text"):
        token_batches(tokenizer(trained, "flag"), str(text_file), 4, 1)


def test_perplexity_never_scores_the_bos(trained, text_file):
    tok = tokenizer(trained, "flag")
    windows, _ = token_batches(tok, str(text_file), 128, SEQ)
    assert (windows[:, 0] == 1).all()
    model = tiny_llama(len(tok))
    with torch.no_grad():
        logits = model(windows, use_cache=False).logits.float()
    # the targets are each window's positions 1.. : the text tokens alone
    targets = windows[:, 1:].reshape(-1)
    nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets)
    expected = math.exp(float(nll))
    assert perplexity(model, windows, progress=False) == pytest.approx(expected, rel=1e-4)
    (plan,) = evaluate_plans(model, [], [{}], windows, progress=False)  # no module quantized: the base model
    assert plan["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert plan["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("how", ["plain", "flag"])
def test_fitness_splits_start_after_the_calibration_text(trained, text_file, how):
    """The evolutionary search's fitness and held-out rows follow the text the profile's windows used,
    however many of a window's positions the BOS takes (the rows are of another length than the windows)."""
    from bitplan.profiler.fitness import token_splits

    tok = tokenizer(trained, how)
    calib_ids, calib = token_batches(tok, str(text_file), N_TOKENS, SEQ)
    fit, held = token_splits(tok, calib, 48, 48, 16)
    p = len(special_prefix(tok))
    assert fit.shape == (3, 16) and held.shape == (3, 16)
    assert (fit[:, :p] == 1).all() and (held[:, :p] == 1).all()
    text = text_ids(tok, text_file)
    used = calib_ids[:, p:].reshape(-1).tolist()
    assert used == text[:len(used)]
    rows = torch.cat([fit, held])[:, p:].reshape(-1).tolist()
    start = -(-len(used) // (16 - p)) * (16 - p)  # whole rows after the calibration's last text token
    assert rows == text[start:start + len(rows)]


def test_a_text_glob_reaches_every_depth(tmp_path):
    from bitplan.profiler.calibration import load_text

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "top.txt").write_text("one")
    (tmp_path / "a" / "b" / "deep.txt").write_text("two")
    assert load_text(str(tmp_path / "**" / "*.txt"))[1] == "two\n\none"  # sorted paths: a/b/deep.txt, top.txt
