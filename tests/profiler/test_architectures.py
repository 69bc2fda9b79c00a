"""The block-by-block pass on every model family bitplan claims (`FAMILIES` in conftest.py).

Streaming must reproduce the model's own forward exactly: each block gets the arguments the model
gives that block (sliding-window or full mask, local or global rotary tables), and the `H` it
accumulates is what hooks see in a whole-model pass.  Sequences are longer than the sliding window,
so a block handed another kind's mask or rotary tables shows.
"""

import pytest
import torch

from bitplan.profiler.model import decoder_layers, planned_linears
from bitplan.profiler.moe import ExpertMLP, unfuse_experts
from bitplan.profiler.stream import BlockCheckpoint, block_inputs, stream_blocks

VOCAB = 300
N_SEQ, SEQ_LEN = 3, 32  # several times conftest's SLIDING_WINDOW


@pytest.fixture(scope="module")
def arch(arch_family, build_arch):
    model = build_arch(arch_family, VOCAB)
    unfuse_experts(model)  # as load_model does
    window = getattr(model.config, "sliding_window", None)
    assert window is None or SEQ_LEN > 2 * window
    batches = torch.randint(0, VOCAB, (N_SEQ, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    return arch_family, model, batches


def _streamed(model, batches, planned=(), **kw):
    """(each block's outputs `[block][seq]`, the `H` of every planned linear) from `stream_blocks`."""
    layers = decoder_layers(model)
    outs = [[] for _ in layers]

    def keep(i):
        def hook(_mod, _args, out):
            outs[i].append((out[0] if isinstance(out, tuple) else out).detach().clone())
        return hook

    H = {}
    hooks = [b.register_forward_hook(keep(i)) for i, b in enumerate(layers)]
    try:
        stream_blocks(model, batches, list(planned), lambda i, mods, Hb, n: H.update(Hb), progress=False,
                      **kw)
    finally:
        for h in hooks:
            h.remove()
    return outs, H


def _relative(got, want):
    return float((got - want).norm() / want.norm())


def test_streamed_hidden_states_equal_the_whole_forward(arch):
    family, model, batches = arch
    n = len(decoder_layers(model))
    outs, _ = _streamed(model, batches)
    errors = []
    with torch.no_grad():
        for s, row in enumerate(batches):
            hs = model(row.unsqueeze(0), use_cache=False, output_hidden_states=True).hidden_states
            assert len(hs) == n + 1
            # hidden_states[i + 1] is block i's output, but the last entry is after the final norm
            got = [outs[i][s] for i in range(n - 1)] + [model.model.norm(outs[n - 1][s])]
            errors.append([_relative(g, w) for g, w in zip(got, hs[1:])])
    worst = [max(e[i] for e in errors) for i in range(n)]
    assert max(worst) < 1e-6, f"{family}: relative error of each block's streamed output {worst}"


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def test_block_arguments_are_held_once(arch):
    """Masks and rotary tables repeat for every batch of equal-length sequences: one copy serves them all."""
    family, model, batches = arch
    args = block_inputs(model, batches, "cpu")
    assert len(args) == len(batches) and all(len(a) == len(decoder_layers(model)) for a in args)
    first = {id(t) for t in _tensors(args[0])}
    assert first and {id(t) for t in _tensors(args)} == first, family


def _whole_model_hessians(model, batches, planned):
    """`Σ xxᵀ` of every planned linear's input over a whole-model pass (a routed expert's rows weighted by
    the routing weight of its token, as the streamed H is: profiler/moe.py says why)."""
    H = {m.name: torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64) for m, lin in planned}

    def hook(name, owner):
        def accumulate(_mod, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            if isinstance(owner, ExpertMLP):
                x = x * owner.routing_weight.reshape(-1, 1).double()
            H[name] += x.T @ x
        return accumulate

    hooks = [lin.register_forward_hook(hook(m.name, model.get_submodule(m.name.rsplit(".", 1)[0])))
             for m, lin in planned]
    try:
        with torch.no_grad():
            for row in batches:
                model(row.unsqueeze(0), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return H


def test_streamed_hessians_equal_a_whole_model_pass(arch):
    family, model, batches = arch
    planned = [(m, lin) for m, lin in planned_linears(model) if m.layer is not None]
    _, got = _streamed(model, batches, planned)
    want = _whole_model_hessians(model, batches, planned)
    assert set(got) == set(want)
    bad = {k: _relative(got[k], want[k]) for k in want if _relative(got[k], want[k]) > 1e-6}
    assert not bad, f"{family}: H differs (relative error) for {bad}"
    if any(m.expert is not None for m, _ in planned):  # the MoE families route tokens to experts
        assert any(float(got[m.name].abs().sum()) > 0 for m, _ in planned if m.expert is not None)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_resumed_stream_gives_later_blocks_their_own_arguments(family, build_arch, tmp_path):
    """A resumed pass gets no hidden states from the model, only the blocks' arguments (`block_inputs` with
    `put=None`): the blocks after the interruption must still get their own kind's mask and rotary tables."""
    model = build_arch(family, VOCAB)
    batches = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    planned = [(m, lin) for m, lin in planned_linears(model) if m.layer is not None]
    want = _whole_model_hessians(model, batches, planned)
    n = len(decoder_layers(model))

    def stop_at_last(i, mods, H, _n):
        if i == n - 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        stream_blocks(model, batches, planned, stop_at_last, progress=False,
                      checkpoint=BlockCheckpoint(tmp_path, {}))
    _, got = _streamed(model, batches, planned, checkpoint=BlockCheckpoint(tmp_path, {}))
    last = [m.name for m, _ in planned if m.layer == n - 1]
    assert last and set(got) == set(last)
    for k in last:
        assert _relative(got[k], want[k]) < 1e-6, k
