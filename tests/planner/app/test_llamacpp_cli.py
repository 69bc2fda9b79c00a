"""The llama.cpp route from the command line: what is refused before any work, and the comparison with
llama.cpp's stock mixes (llama-quantize, llama-perplexity) on a tiny model."""

from __future__ import annotations

import json

import pytest


def test_missing_tools_stop_profile_apply_and_eval_first(run_cli, db, tmp_path, monkeypatch):
    monkeypatch.setenv("BITPLAN_LLAMACPP", str(tmp_path / "nowhere"))
    code, _, err = run_cli("profile", "--engine", "llamacpp", "-q")
    assert code == 2 and "make llamacpp" in err and "Traceback" not in err
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    code, _, err = run_cli("eval", str(tmp_path / "x.gguf"), "-q")
    assert code == 2 and "make llamacpp" in err


def test_engine_llamacpp_refuses_another_quantizer_and_unknown_types(run_cli, db):
    code, _, err = run_cli("profile", "--engine", "llamacpp", "--quantizer", "gptq", "-q")
    assert code == 2 and "drop --quantizer gptq" in err
    code, _, err = run_cli("profile", "--engine", "llamacpp", "--options", "q4_k,q9_k", "-q")
    assert code == 2 and "unknown GGUF type 'q9_k'" in err


def test_against_needs_evaluate_and_known_mixes(run_cli, db):
    code, _, err = run_cli("compare", "prof-x", "--against", "Q4_K_M")
    assert code == 2 and "add --evaluate" in err
    code, _, err = run_cli("compare", "prof-x", "--against", "Q4_K_Z", "--evaluate")
    assert code == 2 and "unknown llama.cpp mix Q4_K_Z" in err


@pytest.mark.slow
def test_compare_against_stock_mixes(run_cli, db, gguf_checkpoint, tmp_path):
    """profile --engine llamacpp -> compare --against: every mix and the plan at its size through llama.cpp."""
    text = tmp_path / "calib.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 300)
    code, out, err = run_cli("profile", str(gguf_checkpoint), "--engine", "llamacpp", "--estimator", "fisher",
                             "--calib", str(text), "--tokens", "512", "--seq-len", "128", "--json", "-q")
    assert code == 0, err
    pid = json.loads(out)["id"]
    code, out, err = run_cli("compare", pid, "--against", "Q4_K_M,Q5_K_M", "--allocators", "ilp", "--evaluate",
                             "--eval-tokens", "1024", "--json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    rows = {(r["name"], r["at"]): r for r in doc["rows"]}
    assert set(rows) == {("F16", "F16"), ("Q4_K_M", "Q4_K_M"), ("bitplan ilp", "Q4_K_M"), ("Q5_K_M", "Q5_K_M"),
                         ("bitplan ilp", "Q5_K_M")}
    for mix in ("Q4_K_M", "Q5_K_M"):
        ours, theirs = rows[("bitplan ilp", mix)], rows[(mix, mix)]
        assert ours["size_bytes"] <= theirs["size_bytes"] + 64  # at the mix's tensor bytes (header aside)
        assert abs(ours["predicted_size_bytes"] - ours["size_bytes"]) <= 64
        assert ours["kl_divergence"] > 0 and theirs["kl_divergence"] > 0
        assert theirs["predicted_error"] is not None  # the mix's types are all options of the profile


def test_a_file_llama_cpp_cannot_run_is_an_error_not_a_traceback(run_cli, db, tmp_path, llamacpp):
    import gguf
    import numpy as np

    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + bytes(60))
    code, _, err = run_cli("eval", str(damaged), "--tokens", "256", "-q")
    assert code == 2 and "truncated or damaged" in err and "Traceback" not in err  # refused before llama.cpp
    # a whole GGUF of an architecture llama.cpp does not know: its own error, in one message
    unknown = tmp_path / "unknown.gguf"
    w = gguf.GGUFWriter(unknown, arch="nonesuch")
    w.add_tensor("token_embd.weight", np.ones((8, 32), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    code, _, err = run_cli("eval", str(unknown), "--tokens", "256", "-q")
    assert code == 1 and "error: llama-perplexity failed" in err and "Traceback" not in err
