"""llama.cpp's own tools and quantizers, from the build that `make llamacpp` makes.

The tools (`llama-quantize`, `llama-perplexity`, `llama-imatrix`) and the ggml shared library live in
one directory: `$BITPLAN_LLAMACPP` if set, else `<venv>/llama.cpp/bin`; the llama.cpp source they were
built from (`convert_hf_to_gguf.py`, `gguf-py`) is in `../src` beside it.  The quantizer here calls
ggml's own `ggml_quantize_chunk` and the type's `to_float` on each row, so the ΔW a profile measures for
a GGUF type is the one `llama-quantize` writes for the same F16 weights (and importance matrix).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import numpy as np

from bitplan.db.formats import GGUF_TYPES
from bitplan.db.types import InvalidInput

LLAMACPP_ENV = "BITPLAN_LLAMACPP"
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix")
GGML_LIBRARY = "libggml-base.so"
MAKE_TARGET = "make llamacpp"


class LlamaCppMissing(InvalidInput):
    """llama.cpp's tools are not where bitplan looks for them."""


def llamacpp_dir() -> Path:
    """Where the tools and libggml are: `$BITPLAN_LLAMACPP`, else the venv's `llama.cpp/bin`."""
    env = os.environ.get(LLAMACPP_ENV)
    return Path(env) if env else Path(sys.prefix) / "llama.cpp" / "bin"


def _missing(what: str) -> LlamaCppMissing:
    return LlamaCppMissing(f"llama.cpp's {what} is not in {llamacpp_dir()}: run `{MAKE_TARGET}` (it builds "
                           f"{', '.join(TOOLS)} and ggml from the pinned llama-cpp-python sdist), or set "
                           f"${LLAMACPP_ENV} to a directory holding them")


def tool(name: str) -> Path:
    """The path of a built llama.cpp tool; LlamaCppMissing (naming the make target) if it is not built."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; known: {list(TOOLS)}")
    path = llamacpp_dir() / name
    if not os.access(path, os.X_OK):
        raise _missing(name)
    return path


def source_dir() -> Path:
    """The llama.cpp source the tools were built from (convert_hf_to_gguf.py, gguf-py)."""
    src = llamacpp_dir().parent / "src"
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise _missing("source (convert_hf_to_gguf.py)")
    return src


def check_tools() -> None:
    """LlamaCppMissing before any work if a tool or the ggml library is missing."""
    for name in TOOLS:
        tool(name)
    _ggml()


class _TypeTraits(ctypes.Structure):
    # ggml.h `struct ggml_type_traits`, up to the member read here
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_F32P = ctypes.POINTER(ctypes.c_float)


@functools.cache
def _ggml_at(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, _F32P, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, _F32P]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def _ggml() -> ctypes.CDLL:
    path = llamacpp_dir() / GGML_LIBRARY
    if not path.is_file():
        raise _missing(GGML_LIBRARY)
    return _ggml_at(str(path))


def ggml_type_id(name: str) -> int:
    """ggml's enum value of a GGUF type name (`q4_k` -> 12), as gguf-py numbers them."""
    import gguf

    try:
        return int(gguf.GGMLQuantizationType[name.upper()])
    except KeyError:
        raise InvalidInput(f"unknown GGUF type {name!r}; known: {sorted(GGUF_TYPES)}") from None


def row_bytes(name: str, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` weights in type `name`, by ggml itself."""
    return int(_ggml().ggml_row_size(ggml_type_id(name), n_per_row))


def quantize_rows(W: np.ndarray, name: str, importance: np.ndarray | None = None) -> bytes:
    """`W: [N, K]` (float32; rows of K weights) stored as GGUF type `name` by ggml, as llama-quantize stores
    it; `importance: [K]` is the importance matrix's column weights (llama.cpp's `in_sum2 / counts`)."""
    lib, t = _ggml(), ggml_type_id(name)
    W = np.ascontiguousarray(W, dtype=np.float32)
    N, K = W.shape
    if K % GGUF_TYPES[name].block:
        raise InvalidInput(f"GGUF type {name} stores rows of whole blocks of {GGUF_TYPES[name].block} weights; "
                           f"a row of {K} is not (llama-quantize would fall back to another type)")
    if importance is None and lib.ggml_quantize_requires_imatrix(t):
        raise InvalidInput(f"GGUF type {name} needs an importance matrix (--imatrix)")
    imat = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (K,):
            raise ValueError(f"importance has shape {importance.shape}, expected ({K},)")
        imat = importance.ctypes.data_as(_F32P)
    out = ctypes.create_string_buffer(N * int(lib.ggml_row_size(t, K)))
    written = lib.ggml_quantize_chunk(t, W.ctypes.data_as(_F32P), out, 0, N, K, imat)
    return out.raw[:written]


def dequantize_rows(data: bytes, name: str, shape: tuple[int, int]) -> np.ndarray:
    """GGUF type `name` bytes of a `[N, K]` tensor -> float32, by the type's own `to_float`."""
    lib, t = _ggml(), ggml_type_id(name)
    N, K = shape
    if len(data) != N * int(lib.ggml_row_size(t, K)):
        raise ValueError(f"{len(data)} bytes are not a [{N}, {K}] {name} tensor")
    out = np.empty((N, K), dtype=np.float32)
    to_float = _TO_FLOAT(lib.ggml_get_type_traits(t).contents.to_float)
    to_float(ctypes.c_char_p(data), out.ctypes.data_as(_F32P), N * K)
    return out


def quantize_dequantize(W: np.ndarray, name: str, importance: np.ndarray | None = None) -> np.ndarray:
    """What llama-quantize makes of `W: [N, K]` in type `name`: its F16 value, quantized and read back."""
    W16 = np.asarray(W, dtype=np.float16).astype(np.float32)
    return dequantize_rows(quantize_rows(W16, name, importance), name, W16.shape)
