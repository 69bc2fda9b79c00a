"""Streaming at scale: activations carried on disk, and resuming an interrupted profile block by block."""

import numpy as np
import pytest
import torch

from bitplan.db.store import Store
from bitplan.db.types import Quantizer, parse_options
from bitplan.planner.app.cli import parser
from bitplan.planner.app.usecases import ProfileRequest, run_profile
from bitplan.planner.app.workspace import Workspace
from bitplan.profiler import fisher, profile, stream
from bitplan.profiler.model import decoder_layers, load_model, planned_linears
from bitplan.profiler.profile import error_table, profile_model
from bitplan.profiler.stream import stream_blocks

OPTIONS = parse_options("2,3,4,8")
N_LAYERS = 4


@pytest.fixture(scope="module")
def llama4(tmp_path_factory, tiny_checkpoint):
    """A 4-layer random Llama (an untied head, so the outside pass runs too), saved and loaded as a checkpoint
    (not conftest's 2-layer `loaded`: resuming needs finished blocks on both sides of an interruption)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("llama4")
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return load_model(str(d))


@pytest.fixture
def batches(llama4):
    return torch.randint(0, llama4.model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))


def _hessians(model, batches, **kw):
    got = {}
    stream_blocks(model, batches, planned_linears(model), lambda i, mods, H, n: got.update(H), progress=False, **kw)
    return got


def test_activations_on_disk_are_bit_identical(llama4, batches, tmp_path, monkeypatch):
    model = llama4.model
    monkeypatch.setattr(stream.tempfile, "tempdir", str(tmp_path))  # where the spill folder goes
    in_memory = _hessians(model, batches, activation_budget=1 << 40)
    on_disk = _hessians(model, batches, activation_budget=0)
    assert set(on_disk) == set(in_memory)
    assert all(torch.equal(on_disk[k], in_memory[k]) for k in in_memory)
    planned = planned_linears(model)
    want = error_table(model, planned, OPTIONS, batches, "hessian", progress=False)
    monkeypatch.setattr(stream, "default_activation_budget", lambda device: 0)
    written = []
    save = stream.atomic_write
    monkeypatch.setattr(stream, "atomic_write", lambda path, data: (written.append(path), save(path, data)))
    got = error_table(model, planned, OPTIONS, batches, "hessian", progress=False)
    assert np.array_equal(got, want)
    # two streamed passes (the blocks' H, then the untied head's inputs), each handing every block its
    # inputs through disk (the last block's outputs go nowhere); nothing is left behind
    assert len(written) == 2 * len(batches) * N_LAYERS and not list(tmp_path.iterdir())


class Interrupted(Exception):
    pass


def _interrupt_on_block(monkeypatch, at: int, seen: list[int]):
    """Make profile.py's stream_blocks raise inside `on_block` of block `at`; record the blocks it reports."""
    real = profile.stream_blocks

    def wrapped(model, batches, planned, on_block, *args, **kw):
        def hooked(i, *a):
            if i == at:
                raise Interrupted
            seen.append(i)
            on_block(i, *a)
        return real(model, batches, planned, hooked, *args, **kw)
    monkeypatch.setattr(profile, "stream_blocks", wrapped)


def _count_block_calls(model):
    calls = [0] * N_LAYERS
    hooks = [b.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(decoder_layers(model))]
    return calls, hooks


@pytest.mark.parametrize("estimator,quantizer", [
    ("hessian", "rtn"),
    # GPTQ's ΔW of every module at every option, three profiles: ~20-40 s on 2 cores
    pytest.param("hessian", "gptq", marks=pytest.mark.slow),
    pytest.param("fisher", "gptq", marks=pytest.mark.slow),
])
def test_resume_continues_after_the_last_finished_block(llama4, text_file, tmp_path, monkeypatch, estimator,
                                                        quantizer):
    kw = dict(estimator=estimator, quantizer=Quantizer.parse(quantizer), calib=str(text_file), n_tokens=128,
              seq_len=32, progress=False)
    want = profile_model(llama4, OPTIONS, **kw)
    work = tmp_path / "work"
    with monkeypatch.context() as m:
        seen = []
        _interrupt_on_block(m, 2, seen)
        with pytest.raises(Interrupted):
            profile_model(llama4, OPTIONS, work_dir=work, **kw)
        assert seen == [0, 1]
    assert (work / "blocks" / "state.npz").exists()
    with monkeypatch.context() as m:
        seen = []
        _interrupt_on_block(m, -1, seen)
        calls, hooks = _count_block_calls(llama4.model)
        try:
            got = profile_model(llama4, OPTIONS, work_dir=work, **kw)
        finally:
            for h in hooks:
                h.remove()
    assert seen == [2, 3]  # on_block of the finished blocks is not called again...
    n_seq = 128 // 32
    # ...nor do they run; whole-model passes run every block: the untied head's H, and fisher's
    whole = n_seq * (2 if estimator == "fisher" else 1)
    assert calls == [whole, whole, whole + n_seq, whole + n_seq]
    assert got.id == want.id
    assert np.array_equal(got.error, want.error)
    assert not (work / "blocks" / "activations").exists()


def test_fisher_resumes_from_saved_accumulators(llama4, batches, tmp_path):
    model = llama4.model
    planned = planned_linears(model)
    want = fisher.fisher_diagonal(model, batches, planned, progress=False)
    ckpt = tmp_path / "fisher.pt"
    done = []

    def stop_at_third(*_):
        done.append(1)
        if len(done) == 3:
            raise Interrupted
    h = model.register_forward_hook(stop_at_third)
    with pytest.raises(Interrupted):
        fisher.fisher_diagonal(model, batches, planned, progress=False, checkpoint=ckpt, every_s=0)
    h.remove()
    assert torch.load(ckpt, weights_only=True)["done"] == 2
    done.clear()
    h = model.register_forward_hook(lambda *_: done.append(1))
    got = fisher.fisher_diagonal(model, batches, planned, progress=False, checkpoint=ckpt, every_s=0)
    h.remove()
    assert len(done) == len(batches) - 2
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_cli_resume(llama4, text_file, tmp_path, monkeypatch):
    """`bitplan profile --resume`: the interrupted run leaves its work beside the database, the resumed one
    stores the same profile as an uninterrupted run and removes it."""
    assert parser().parse_args(["profile", "--resume"]).resume
    store = Store(str(tmp_path / "a.db"))
    request = ProfileRequest(estimator="hessian", options="2,4", calib=str(text_file), tokens=128, seq_len=32,
                             device="cpu")
    ws = Workspace(store, progress=False).adopt("x", llama4)
    with monkeypatch.context() as m:
        _interrupt_on_block(m, 3, [])
        with pytest.raises(Interrupted):
            run_profile(ws, "x", request)
    work = next(p for p in (tmp_path / "a.db.work").iterdir() if p.is_dir())  # not the lock beside it
    assert work == store.work_dir(work.name)
    with np.load(work / "blocks" / "state.npz") as z:
        assert int(z["next_block"]) == 3
    seen = []
    with monkeypatch.context() as m:
        _interrupt_on_block(m, -1, seen)
        got = run_profile(ws, "x", request, resume=True)
    assert seen == [3] and got.id == work.name and not work.exists()
    want = run_profile(Workspace(Store(str(tmp_path / "b.db")), progress=False).adopt("x", llama4), "x", request)
    assert np.array_equal(got.error, want.error)


def test_head_hessian_is_streamed_and_equals_a_whole_model_pass(llama4, batches):
    """An untied head's H comes from replaying the streamed last block's outputs, not a whole-model pass."""
    model = llama4.model
    head = [(m, lin) for m, lin in planned_linears(model) if m.layer is None]
    assert [m.role for m, _ in head] == ["lm_head"]
    want = torch.zeros(head[0][1].in_features, head[0][1].in_features, dtype=torch.float64)

    def accumulate(mod, args, out):  # returns None: a hook's return value would replace the output
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        want.addmm_(x.T, x)
    h = head[0][1].register_forward_hook(accumulate)
    with torch.no_grad():
        for row in batches:
            model(row.unsqueeze(0), use_cache=False)
    h.remove()
    got = stream.outside_hessians(model, batches, head)
    torch.testing.assert_close(got[head[0][0].name], want, rtol=1e-5, atol=1e-6)
    assert all(isinstance(b, torch.nn.Module) and not isinstance(b, (stream._Skip, stream._Replay))
               for b in decoder_layers(model))  # the blocks are back


class _ToyBlock(torch.nn.Module):
    def __init__(self, d: int, as_tuple: bool):
        super().__init__()
        self.lin, self.as_tuple = torch.nn.Linear(d, d), as_tuple

    def forward(self, h, scale, *, shift):
        out = h + torch.tanh(self.lin(h)) * scale + shift
        return (out, None) if self.as_tuple else out


class _Toy(torch.nn.Module):
    """A causal LM in miniature whose blocks each get their own arguments, positional and keyword."""

    def __init__(self, as_tuple: bool = False, between: bool = False, n: int = 3, d: int = 8):
        super().__init__()
        from types import SimpleNamespace
        self.config = SimpleNamespace(num_hidden_layers=n)
        self.embed = torch.nn.Embedding(16, d)
        self.layers = torch.nn.ModuleList(_ToyBlock(d, as_tuple) for _ in range(n))
        self.as_tuple, self.between = as_tuple, between

    def get_input_embeddings(self):
        return self.embed

    def forward(self, ids, use_cache=False):
        h = self.embed(ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, torch.tensor(float(i + 1)), shift=torch.full((ids.shape[1], 1), 0.1 * i))
            h = h[0] if self.as_tuple else h
            if self.between:
                h = h * 2
        return h


@pytest.mark.parametrize("as_tuple", [False, True])
def test_each_block_gets_its_own_arguments_tensor_or_tuple_outputs(as_tuple):
    torch.manual_seed(0)
    model = _Toy(as_tuple)
    blocks = list(model.layers)
    ids = torch.randint(0, 16, (2, 5))
    args = stream.block_inputs(model, ids, "cpu")
    assert list(model.layers) == blocks
    assert [[float(a[0]) for a, _ in per_batch] for per_batch in args] == [[1.0, 2.0, 3.0]] * 2
    outs = []
    h = model.layers[-1].register_forward_hook(lambda _m, _a, out: outs.append(out[0] if as_tuple else out))
    try:
        stream_blocks(model, ids, [], lambda *_: None, progress=False, activation_budget=1 << 30)
        with torch.no_grad():
            want = [model(row.unsqueeze(0)) for row in ids]
    finally:
        h.remove()
    for got, w in zip(outs[:2], want):
        torch.testing.assert_close(got, w, rtol=0, atol=0)


def test_a_model_that_changes_hidden_states_between_blocks_is_refused():
    from bitplan.db.types import InvalidInput

    model = _Toy(between=True)
    blocks = list(model.layers)
    with pytest.raises(InvalidInput, match="block by block"):
        stream.block_inputs(model, torch.randint(0, 16, (1, 5)), "cpu")
    assert list(model.layers) == blocks
