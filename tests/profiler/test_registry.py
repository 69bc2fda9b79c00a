"""One registry of estimators: every `--estimator` by name, with what its table needs."""

from types import SimpleNamespace

import pytest

from bitplan.db.types import InvalidInput, Quantizer, parse_options
from bitplan.profiler import estimators
from bitplan.profiler.kl import DEFAULT_KL_TOKENS
from bitplan.profiler.profile import (DEFAULT_TOKENS, ESTIMATORS, check_embeddings, error_table, estimator_name,
                                      get_estimator, input_profile_id)


def test_every_estimator_is_registered_with_what_it_needs():
    assert set(ESTIMATORS) == {"calibrated", "fisher", "hessian", "kl", "hutchinson", "imatrix"}
    assert all(name == e.name and callable(e.table) for name, e in ESTIMATORS.items())
    assert {n: e.formula for n, e in ESTIMATORS.items() if e.formula is not None} == {
        "fisher": estimators.fisher, "hessian": estimators.hessian, "hutchinson": estimators.hutchinson,
        "imatrix": estimators.imatrix}
    assert [n for n, e in ESTIMATORS.items() if e.needs_imatrix] == ["imatrix"]
    assert [n for n, e in ESTIMATORS.items() if not e.plans_embedding] == ["imatrix"]
    assert {n: e.default_tokens for n, e in ESTIMATORS.items()} == {
        n: DEFAULT_KL_TOKENS if n == "kl" else DEFAULT_TOKENS for n in ESTIMATORS}


def test_unknown_names_say_which_there_are():
    with pytest.raises(InvalidInput, match=r"unknown estimator 'obs'; choose one of \['calibrated', 'fisher', "):
        get_estimator("obs")
    with pytest.raises(InvalidInput, match="unknown estimator 'obs'"):
        estimator_name("obs")


def test_estimator_name_tags_the_imatrix_it_read(tmp_path):
    assert estimator_name("fisher") == "fisher" and estimator_name("calibrated", imatrix=None) == "calibrated"
    f = tmp_path / "m.gguf"
    f.write_bytes(b"any bytes")
    tag = estimator_name("imatrix", imatrix=f)
    assert tag.startswith("imatrix:") and len(tag) == len("imatrix:") + 16
    with pytest.raises(InvalidInput, match="needs --imatrix PATH"):
        estimator_name("imatrix")


def test_embeddings_follow_the_registry():
    assert check_embeddings(None, "imatrix") == "keep" and check_embeddings(None, "fisher") == "plan"
    assert check_embeddings("plan", "kl") == "plan"
    with pytest.raises(InvalidInput, match="--estimator imatrix holds no statistics for the embedding lookup: "
                                           "profile with --embeddings keep"):
        check_embeddings("plan", "imatrix")


def test_measured_estimators_have_no_formula_for_error_table():
    with pytest.raises(ValueError, match="kl measures its table"):
        error_table(None, [], [], None, "kl")


def test_the_input_id_hashes_quantizer_and_embeddings():
    loaded = SimpleNamespace(ref=SimpleNamespace(fingerprint="fp"))
    opts = parse_options("2,4")

    def pid(quantizer, embeddings="keep", estimator="fisher"):
        return input_profile_id(loaded, "cal", estimator, opts, 64, "cpu", quantizer=quantizer, embeddings=embeddings)

    ids = {pid(Quantizer()), pid(Quantizer(method="gptq")), pid(Quantizer.parse("gptq:damp=0.05")),
           pid(Quantizer(), "plan"), pid(Quantizer(), estimator="hessian")}
    assert len(ids) == 5 and pid(Quantizer.parse("gptq:damp=0.1")) == pid(Quantizer(method="gptq"))


def test_hessian_in_row_chunks_equals_the_whole_product(monkeypatch):
    """`tr(ΔW H ΔWᵀ)` is taken a few rows at a time (bounded temporaries for a large head); the sum of the
    chunks is the whole product's, for a linear and for an embedding with a tied head."""
    import torch

    g = torch.Generator().manual_seed(0)
    dW = torch.randn(37, 16, generator=g) * 1e-2
    X = torch.randn(64, 16, generator=g, dtype=torch.float64)
    H = X.T @ X
    counts = torch.randint(0, 5, (37,), generator=g).double()
    whole = float(((dW.double() @ H) * dW.double()).sum()) / 100
    lookup = float(counts @ (dW.double() ** 2).sum(dim=1)) / 100
    assert estimators.hessian(dW, H, 100) == whole  # fewer rows than a chunk: one chunk, the same sum
    monkeypatch.setattr(estimators, "CHUNK_BYTES", 8 * 16 * 5)  # 5 rows a chunk: 8 chunks, the last of 2
    assert estimators.hessian(dW, H, 100) == pytest.approx(whole, rel=1e-12)
    assert estimators.embedding_hessian(dW, counts, H, 100) == pytest.approx(whole + lookup, rel=1e-12)
