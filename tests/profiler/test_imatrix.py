"""llama.cpp importance matrices as input: the file round-trips, its diagonal is Σx²/n of the same tokens,
the `imatrix` error is `hessian` with a diagonal H, and bad files are refused with clear messages."""

import struct

import numpy as np
import pytest
import torch

from bitplan.db.types import InvalidInput, Quantizer, parse_options
from bitplan.db.formats import gguf_tensor_name
from bitplan.kernels.quantize import quantize_dequantize
from bitplan.profiler import estimators
from bitplan.profiler.calibration import token_batches
from bitplan.profiler.imatrix import (Entry, collect_imatrix, file_sha256, imatrix_diagonals, read_imatrix,
                                      write_imatrix)
from bitplan.profiler.model import load_model, planned_linears
from bitplan.profiler.profile import profile_model

OPTIONS = parse_options("2,3,4,8")
TOKENS, SEQ = 256, 64


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def case(request, tiny_checkpoint, moe_checkpoint, text_file):
    """(loaded model, calibration batches, Σx² and rows per module from a plain whole-model pass)."""
    loaded = load_model(str(tiny_checkpoint if request.param == "llama" else moe_checkpoint("mixtral")))
    batches, _ = token_batches(loaded.tokenizer, str(text_file), TOKENS, SEQ)
    return loaded, batches, _input_squares(loaded.model, batches)


@pytest.fixture(scope="module")
def llama(loaded, text_file):
    batches, _ = token_batches(loaded.tokenizer, str(text_file), TOKENS, SEQ)
    return loaded, batches


def _input_squares(model, batches) -> dict[str, tuple[torch.Tensor, int]]:
    """Per planned module: Σx² over the inputs it saw (an expert: its routed tokens) and their number."""
    out = {}

    def hook(name):
        def f(_mod, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            s, n = out.get(name, (0, 0))
            out[name] = (s + (x * x).sum(0), n + x.shape[0])
        return f

    hooks = [lin.register_forward_hook(hook(m.name)) for m, lin in planned_linears(model)]
    with torch.no_grad():
        for row in batches:
            model(row.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    return out


def _entries(model, squares) -> dict[str, Entry]:
    """llama.cpp's layout, assembled by hand from `squares`: one row per expert of an `*_exps` tensor."""
    groups: dict[str, list] = {}
    for m, lin in planned_linears(model):
        groups.setdefault(gguf_tensor_name(m.name), []).append((m, lin))
    entries = {}
    for t, mods in groups.items():
        rows = len(mods) if mods[0][0].expert is not None else 1
        e = Entry(np.zeros((rows, mods[0][1].in_features)), np.zeros(rows))
        for m, _ in mods:
            s, n = squares.get(m.name, (0, 0))  # an expert no token reached is never called
            e.in_sum2[m.expert or 0] += np.asarray(s)
            e.counts[m.expert or 0] += n
        entries[t] = e
    return entries


def test_parsed_diagonal_is_mean_input_square(case, tmp_path):
    loaded, batches, squares = case
    model = loaded.model
    want = _entries(model, squares)
    # our streamed collector gathers the same statistics as the plain pass
    got = collect_imatrix(model, batches, planned_linears(model), progress=False)
    assert set(got) == set(want)
    for t in want:
        np.testing.assert_allclose(got[t].in_sum2, want[t].in_sum2, rtol=1e-6)
        np.testing.assert_array_equal(got[t].counts, want[t].counts)
    path = write_imatrix(tmp_path / "imatrix.gguf", want, datasets=["calib.txt"], chunk_count=len(batches),
                         chunk_size=SEQ)
    imat = read_imatrix(path)
    assert imat.datasets == ["calib.txt"] and imat.chunk_count == len(batches) and imat.chunk_size == SEQ
    d, fallback = imatrix_diagonals(imat, [m for m, _ in planned_linears(model)])
    assert fallback == []
    n = batches.numel()
    for m, lin in planned_linears(model):
        s, rows = squares[m.name]
        if m.expert is None:
            assert rows == n
        # dense: the mean over all tokens; an expert: its routed tokens' squares over all tokens
        torch.testing.assert_close(d[m.name], s / n, rtol=1e-6, atol=0)


def test_imatrix_error_is_hessian_with_diagonal_H(case, text_file, tmp_path):
    loaded, batches, squares = case
    model = loaded.model
    path = write_imatrix(tmp_path / "imatrix.gguf", collect_imatrix(model, batches, planned_linears(model),
                                                                    progress=False))
    p = profile_model(loaded, OPTIONS, estimator="imatrix", imatrix=path, calib=str(text_file),
                      quantizer=Quantizer(), n_tokens=TOKENS,
                      seq_len=SEQ, progress=False)
    assert p.estimator == f"imatrix:{file_sha256(path)[:16]}"
    n = batches.numel()
    for i, (m, lin) in enumerate(planned_linears(model)):
        assert p.modules[i].name == m.name
        if p.modules[i].fallback:
            continue
        H = torch.diag(squares[m.name][0])  # the diagonal of Σxxᵀ (an expert: over its routed tokens, unweighted)
        W = lin.weight.detach()
        want = [estimators.hessian(quantize_dequantize(W, o) - W, H, n) for o in OPTIONS]
        np.testing.assert_allclose(p.error[i], want, rtol=1e-5)
    assert np.all(np.diff(p.error, axis=1) < 0) and np.all(p.error > 0)


def test_profile_id_follows_the_imatrix_content(llama, text_file, tmp_path):
    loaded, batches = llama
    entries = collect_imatrix(loaded.model, batches, planned_linears(loaded.model), progress=False)
    a = write_imatrix(tmp_path / "a.gguf", entries)
    entries["blk.0.attn_q.weight"].in_sum2 *= 4
    b = write_imatrix(tmp_path / "b.gguf", entries)
    kw = dict(estimator="imatrix", quantizer=Quantizer(), calib=str(text_file), n_tokens=TOKENS, seq_len=SEQ,
              progress=False)
    pa, pb = profile_model(loaded, OPTIONS, imatrix=a, **kw), profile_model(loaded, OPTIONS, imatrix=b, **kw)
    assert pa.id != pb.id and pa.estimator != pb.estimator
    np.testing.assert_allclose(pb.error[0], 4 * pa.error[0], rtol=1e-6)  # q_proj of layer 0 comes first
    np.testing.assert_allclose(pb.error[1:], pa.error[1:])
    assert profile_model(loaded, OPTIONS, imatrix=a, **kw).id == pa.id


def _legacy(path, entries: dict[str, Entry], chunk_size: int = SEQ):
    """The legacy .dat layout: values are mean x² times the number of chunks."""
    out = [struct.pack("<i", len(entries))]
    for name, e in entries.items():
        ncall = int(np.ceil(e.counts.max() / chunk_size))
        values = (e.in_sum2 / e.counts[:, None]).reshape(-1) * ncall
        out += [struct.pack("<i", len(name)), name.encode(), struct.pack("<ii", ncall, values.size),
                values.astype(np.float32).tobytes()]
    out += [struct.pack("<i", 3), struct.pack("<i", 9), b"calib.txt"]
    path.write_bytes(b"".join(out))
    return path


def test_legacy_dat_reads_like_gguf(case, tmp_path):
    loaded, batches, squares = case
    model = loaded.model
    entries = _entries(model, squares)
    modules = [m for m, _ in planned_linears(model)]
    imat = read_imatrix(_legacy(tmp_path / "imatrix.dat", entries))
    assert imat.legacy and imat.datasets == ["calib.txt"]
    if any(m.expert is not None for m in modules):
        with pytest.raises(InvalidInput, match="legacy .dat imatrix: it keeps no token counts per expert"):
            imatrix_diagonals(imat, modules)
        return
    d, _ = imatrix_diagonals(imat, modules)
    want, _ = imatrix_diagonals(read_imatrix(write_imatrix(tmp_path / "i.gguf", entries)), modules)
    for name in want:
        torch.testing.assert_close(d[name], want[name], rtol=1e-6, atol=0)


def test_expert_without_tokens_gets_the_fallback(moe_checkpoint, text_file, tmp_path, caplog):
    loaded = load_model(str(moe_checkpoint("mixtral")))
    batches, _ = token_batches(loaded.tokenizer, str(text_file), TOKENS, SEQ)
    planned = planned_linears(loaded.model)
    entries = collect_imatrix(loaded.model, batches, planned, progress=False)
    e = entries["blk.1.ffn_down_exps.weight"]
    e.in_sum2[3], e.counts[3] = 0, 0  # llama.cpp writes such "partial data" for an expert it never saw
    path = write_imatrix(tmp_path / "partial.gguf", entries)
    d, fallback = imatrix_diagonals(read_imatrix(path), [m for m, _ in planned])
    assert fallback == ["model.layers.1.mlp.experts.3.down_proj"]
    assert "counted no tokens for 1 expert matrices" in caplog.text
    hot = e.counts > 0
    n = batches.numel()
    want = e.in_sum2[hot].sum(0) / e.counts[hot].sum() * e.counts[hot].min() / n
    np.testing.assert_allclose(d[fallback[0]].numpy(), want, rtol=1e-6)
    p = profile_model(loaded, OPTIONS, estimator="imatrix", imatrix=path, calib=str(text_file),
                      quantizer=Quantizer(), n_tokens=TOKENS,
                      seq_len=SEQ, progress=False)
    flagged = {m.name for m in p.modules if m.fallback}
    assert fallback[0] in flagged and np.all(p.error > 0)


# ----------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def good_entries(llama):
    loaded, batches = llama
    return collect_imatrix(loaded.model, batches, planned_linears(loaded.model), progress=False)


def _modules(llama):
    return [m for m, _ in planned_linears(llama[0].model)]


def _copy(entries):
    return {k: Entry(v.in_sum2.copy(), v.counts.copy()) for k, v in entries.items()}


def test_missing_and_unreadable_files(llama, tmp_path, text_file):
    with pytest.raises(InvalidInput, match="no such imatrix file: .*llama-imatrix"):
        read_imatrix(tmp_path / "nope.gguf")
    with pytest.raises(InvalidInput, match="needs --imatrix PATH"):
        profile_model(llama[0], OPTIONS, estimator="imatrix", calib=str(text_file), n_tokens=TOKENS, seq_len=SEQ,
                      progress=False)
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\xff\xff\xff\xffnot an imatrix at all")
    with pytest.raises(InvalidInput, match="neither a GGUF imatrix nor a legacy .dat imatrix"):
        read_imatrix(junk)
    import gguf
    model_file = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(model_file, arch="llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(InvalidInput, match="is a GGUF model, not an importance matrix"):
        read_imatrix(model_file)


def test_tensors_missing_unknown_or_misshapen(llama, good_entries, tmp_path):
    modules = _modules(llama)

    def diagonals(entries, name="i.gguf"):
        return imatrix_diagonals(read_imatrix(write_imatrix(tmp_path / name, entries)), modules)

    e = _copy(good_entries)
    del e["blk.1.ffn_down.weight"]
    with pytest.raises(InvalidInput, match=r"no statistics for 1 of the 14 tensors this model plans: "
                                           r"blk\.1\.ffn_down\.weight; make one for this model with llama.cpp"):
        diagonals(e)
    e = _copy(good_entries)
    e["blk.7.attn_q.weight"] = e["blk.0.attn_q.weight"]
    with pytest.raises(InvalidInput, match=r"tensors this model does not have: blk\.7\.attn_q\.weight; is it the "
                                           r"imatrix of another model"):
        diagonals(e)
    e = _copy(good_entries)
    e["blk.0.attn_q.weight"] = Entry(np.ones((1, 32)), np.ones(1))
    with pytest.raises(InvalidInput, match=r"blk\.0\.attn_q\.weight has in_sum2 \[1, 32\] .* needs \[1, 96\]"):
        diagonals(e)
    e = _copy(good_entries)
    e["blk.0.attn_k.weight"].counts[:] = 0
    with pytest.raises(InvalidInput, match=r"counted no tokens for blk\.0\.attn_k\.weight"):
        diagonals(e)
    # routers and the output matrix may be recorded though bitplan does not plan them
    e = _copy(good_entries)
    e["blk.0.ffn_gate_inp.weight"] = Entry(np.ones((1, 96)), np.ones(1))
    e["output.weight"] = Entry(np.ones((1, 96)), np.ones(1))
    d, _ = diagonals(e)
    assert len(d) == len(modules)


def test_damaged_gguf_imatrix(llama, good_entries, tmp_path):
    import gguf
    path = tmp_path / "unpaired.gguf"
    w = gguf.GGUFWriter(path, arch="")
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 96), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(InvalidInput, match=r"without both .in_sum2 and .counts: blk\.0\.attn_q\.weight"):
        read_imatrix(path)
    e = _copy(good_entries)
    e["blk.0.attn_q.weight"].in_sum2[0, 0] = np.nan
    with pytest.raises(InvalidInput, match="non-finite"):
        read_imatrix(write_imatrix(tmp_path / "nan.gguf", e))


def test_cli_profile_with_imatrix(db, llama, good_entries, tiny_checkpoint, text_file, tmp_path, capsys):
    import json

    from bitplan.planner.app.cli import main
    path = write_imatrix(tmp_path / "imatrix.gguf", good_entries)
    common = ["profile", str(tiny_checkpoint), "--calib", str(text_file), "--tokens", str(TOKENS), "--seq-len",
              str(SEQ), "--quantizer", "rtn", "-q"]
    assert main([*common, "--imatrix", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["estimator"] == f"imatrix:{file_sha256(path)[:16]}" and len(out["modules"]) == 14
    assert main([*common, "--estimator", "imatrix", "--imatrix", str(tmp_path / "missing.gguf")]) == 2
    assert "no such imatrix file" in capsys.readouterr().err
    assert main([*common, "--estimator", "hessian", "--imatrix", str(path)]) == 2
    assert "--imatrix is read by --estimator imatrix (or the llamacpp quantizer" in capsys.readouterr().err
    assert main([*common, "--imatrix", "calibration"]) == 2  # llama-imatrix makes one for --engine llamacpp
    assert "for --engine llamacpp" in capsys.readouterr().err
