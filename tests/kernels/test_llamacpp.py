"""llama.cpp's quantizers through the built ggml library (kernels/llamacpp.py), against ggml's own sizes and
gguf-py's dequantizers; the tools' detection."""

from __future__ import annotations

import numpy as np
import pytest

from bitplan.db.formats import GGUF_OPTIONS, GGUF_TYPES
from bitplan.kernels import llamacpp as ggml


def test_missing_tools_are_named_with_the_make_target(tmp_path, monkeypatch):
    monkeypatch.setenv(ggml.LLAMACPP_ENV, str(tmp_path))
    with pytest.raises(ggml.LlamaCppMissing, match="llama-quantize is not in .*run `make llamacpp`"):
        ggml.check_tools()
    for name in ggml.TOOLS:
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    with pytest.raises(ggml.LlamaCppMissing, match="libggml-base.so is not in"):
        ggml.check_tools()
    with pytest.raises(ValueError, match="unknown llama.cpp tool"):
        ggml.tool("llama-server")


def test_the_build_has_every_tool(llamacpp):
    import subprocess

    for name in ("llama-quantize", "llama-perplexity", "llama-imatrix"):
        assert (llamacpp / name).is_file()
    # the tools run (their shared libraries are found from where they were moved)
    done = subprocess.run([str(llamacpp / "llama-quantize"), "--help"], capture_output=True, text=True)
    assert "--tensor-type-file" in done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(set(GGUF_TYPES) - {"f16"}))
def test_block_sizes_are_ggmls(llamacpp, name):
    t = GGUF_TYPES[name]
    for width in (256, 576, 1536, 2048):
        if t.fits(width):
            assert 8 * ggml.row_bytes(name, width) == t.size_bits(1, width), (name, width)


@pytest.mark.parametrize("name", GGUF_OPTIONS)
def test_roundtrip_is_what_gguf_py_reads_back(llamacpp, name):
    import gguf

    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 512)).astype(np.float32)
    data = ggml.quantize_rows(W, name)
    ours = ggml.dequantize_rows(data, name, W.shape)
    theirs = gguf.quants.dequantize(np.frombuffer(data, dtype=np.uint8).reshape(8, -1),
                                    gguf.GGMLQuantizationType[name.upper()])
    np.testing.assert_array_equal(ours, theirs)
    assert 0 < np.mean((ours - W) ** 2) < 0.2  # quantized, and close


def test_error_falls_with_the_type_and_the_importance_matrix_is_honoured(llamacpp):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((64, 512)).astype(np.float32)
    mse = {t: float(np.mean((ggml.quantize_dequantize(W, t) - W) ** 2))
           for t in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")}
    assert list(mse.values()) == sorted(mse.values(), reverse=True), mse
    # an importance matrix weighting the first 32 columns moves Q4_K's error away from them
    imp = np.ones(512, dtype=np.float32)
    imp[:32] = 1000.0
    plain = ggml.quantize_dequantize(W, "q4_k") - W
    weighted = ggml.quantize_dequantize(W, "q4_k", imp) - W
    assert np.mean(weighted[:, :32] ** 2) < np.mean(plain[:, :32] ** 2)


def test_rows_not_whole_blocks_are_refused(llamacpp):
    from bitplan.db.types import InvalidInput

    with pytest.raises(InvalidInput, match="rows of whole blocks of 256 .* row of 576"):
        ggml.quantize_rows(np.zeros((2, 576), np.float32), "q4_k")


def test_gguf_options_quantize_through_llamacpp_only(llamacpp):
    import torch

    from bitplan.db.formats import gguf_option
    from bitplan.db.types import Quantizer
    from bitplan.kernels.quantize import quantize, quantize_dequantize

    W = torch.randn(16, 256)
    q4k = gguf_option("q4_k")
    got = quantize_dequantize(W, q4k, Quantizer(method="llamacpp"))
    want = ggml.quantize_dequantize(W.numpy(), "q4_k")
    assert torch.equal(got, torch.from_numpy(want))
    with pytest.raises(ValueError, match="quantized by llama.cpp: its quantizer is llamacpp, not gptq"):
        quantize_dequantize(W, q4k, Quantizer(method="gptq"), torch.eye(256))
    with pytest.raises(ValueError, match="llama.cpp's to store"):
        quantize(W, q4k, Quantizer(method="llamacpp"))
