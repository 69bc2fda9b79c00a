"""Plans carried out and measured by llama.cpp itself.

- `base_gguf`: the F16 GGUF every plan and stock mix is quantized from.  A GGUF source is dequantized
  tensor by tensor (vectors stay F32, as llama.cpp's converter writes them) with its metadata copied;
  a Hugging Face checkpoint goes through the `convert_hf_to_gguf.py` of the built llama.cpp.
- `quantize_gguf`: `llama-quantize --tensor-type-file` with the plan's types (or a stock mix, e.g.
  `Q4_K_M`), then the written file's tensor types are read back and checked against the plan.
- `perplexity`: `llama-perplexity` on a text file: perplexity, and the mean KL divergence to the base
  model's distribution when the base's logits were saved (`save_logits`).  llama-perplexity scores the
  second half of each window of `ctx` tokens, with the first half as context.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitplan.db.files import atomic_write
from bitplan.db.types import InvalidInput, Module, Plan
from bitplan.executor.export import llamacpp_lines, llamacpp_types
from bitplan.kernels.llamacpp import source_dir, tool
from bitplan.profiler.model import resolve

log = logging.getLogger(__name__)

# llama-quantize's mixes (its positional ftype) that `compare --against` accepts
STOCK_MIXES = ("Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
               "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS")
EVAL_CTX = 512
PLAN_KEY = "bitplan.plan_id"  # the GGUF metadata key that names the plan a file was written from


class LlamaCppFailed(RuntimeError):
    """A llama.cpp tool exited with an error; the message ends with its last lines."""


def run_tool(name: str, args: Sequence[str | Path], *, what: str) -> str:
    """Run a llama.cpp tool; its combined output, or LlamaCppFailed with the tail of it."""
    cmd = [str(tool(name)), *map(str, args)]
    log.info("%s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    out = done.stdout + done.stderr
    if done.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-8:])
        code = done.returncode
        how = f"exit {code}" if code >= 0 else f"killed by signal {-code} ({signal.strsignal(-code) or '?'})"
        raise LlamaCppFailed(f"{name} failed ({what}), {how}:\n{tail}")
    return out


# ----------------------------------------------------------------------------------- the F16 base


def base_gguf(source: str, out: str | Path) -> Path:
    """Write the F16 GGUF of `source` (a .gguf file, a Hugging Face directory, or the embedded name) to `out`."""
    directory, name = resolve(source)
    out = Path(out)
    if name is not None:
        return atomic_write(out, lambda tmp: _gguf_to_f16(directory / name, tmp))
    check_convertible(directory)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        src = source_dir()
        # the converter imports its own `conversion` package and the gguf-py it was written with
        env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
        env["PYTHONPATH"] = os.pathsep.join([str(src / "gguf-py"), str(src), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(directory), "--outtype", "f16",
               "--outfile", str(staged)]
        log.info("%s", " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
            raise LlamaCppFailed(f"convert_hf_to_gguf.py failed on {directory}:\n{tail}")
        os.replace(staged, out)
    return out


def check_convertible(directory: Path) -> None:
    """InvalidInput, before any work, when llama.cpp's converter knows none of the checkpoint's architectures."""
    try:
        archs = json.loads((directory / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as e:
        raise InvalidInput(f"cannot read {directory / 'config.json'}: {e}") from None
    src = source_dir()
    text = "\n".join(p.read_text(errors="replace") for p in [src / "convert_hf_to_gguf.py",
                                                             *sorted((src / "conversion").glob("*.py"))])
    if not archs:
        raise InvalidInput(f"{directory / 'config.json'} names no architectures, which llama.cpp's converter needs")
    if not any(f'"{a}"' in text for a in archs):
        raise InvalidInput(f"llama.cpp's convert_hf_to_gguf.py does not know the architecture {', '.join(archs)} of "
                           f"{directory}; give a GGUF of it, or apply with another --format")


def _gguf_to_f16(src: Path, out: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        # vectors (norms, biases) stay F32, as convert_hf_to_gguf writes them
        keep32 = t.tensor_type == gguf.GGMLQuantizationType.F32 or len(t.shape) == 1
        writer.add_tensor(t.name, np.ascontiguousarray(data, dtype=np.float32 if keep32 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# -------------------------------------------------------------------------------------- quantize


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """GGUF tensor name -> lower-case type, read from the file's header."""
    import gguf

    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors}


def gguf_tensor_bytes(path: str | Path) -> int:
    """Bytes of tensor data in a GGUF file (the file less its header, metadata and padding)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def quantize_gguf(base: str | Path, out: str | Path, *, plan: Plan | None = None, modules: list[Module] | None = None,
                  mix: str | None = None, imatrix: str | Path | None = None) -> Path:
    """`llama-quantize` of the F16 `base` into `out`: with the plan's types (`plan`, `modules`), or a stock
    `mix` (`Q4_K_M`); the plan's types are checked against the written file."""
    if (plan is None) == (mix is None):
        raise ValueError("give a plan or a stock mix")
    out = Path(out)
    extra: list[str | Path] = ["--imatrix", imatrix] if imatrix else []
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        if plan is not None:
            types = llamacpp_types(plan, modules)
            type_file = Path(tmp) / "tensor_types.txt"
            type_file.write_text("\n".join(llamacpp_lines(types)) + "\n")
            extra += ["--tensor-type-file", type_file]
            base_types = gguf_tensor_types(base)
            # tensors the plan leaves out keep the 16 bits its size counted
            for tensor, flag in (("token_embd.weight", "--token-embedding-type"),
                                 ("output.weight", "--output-tensor-type")):
                if tensor in base_types and tensor not in types:
                    extra += [flag, "f16"]
            ftype = "Q8_0"  # every planned tensor is named in the type file; this types none of them
            # the file names its plan, so that `bitplan eval FILE.gguf` finds the plan and its base
            extra += ["--override-kv", f"{PLAN_KEY}=str:{plan.id}"]
        else:
            if mix not in STOCK_MIXES:
                raise InvalidInput(f"unknown llama.cpp mix {mix!r}; known: {', '.join(STOCK_MIXES)}")
            ftype = mix
        run_tool("llama-quantize", [*extra, base, staged, ftype], what=f"quantizing {base} as {plan.id if plan else mix}")
        if plan is not None:
            check_types(staged, types)
        os.replace(staged, out)
    return out


def make_imatrix(base: str | Path, text: str | Path, out: str | Path, *, ctx: int = EVAL_CTX,
                 chunks: int | None = None) -> Path:
    """`llama-imatrix` of the F16 `base` on a text file, in windows of `ctx` tokens (at most `chunks`): the
    importance matrix (GGUF format) that `llama-quantize --imatrix` and a llamacpp profile weigh rows by.
    Every matmul input is recorded, the output head's too (`--process-output`), so that a planned head is
    weighted as its siblings are."""
    out = Path(out)
    args: list[str | Path] = ["-m", base, "-f", text, "-c", ctx, "-b", ctx, "--process-output", "--no-ppl",
                              "--output-format", "gguf"]
    if chunks:
        args += ["--chunks", chunks]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / "imatrix.gguf"
        run_tool("llama-imatrix", [*args, "-o", staged], what=f"collecting the importance matrix of {base}")
        os.replace(staged, out)
    return out


def gguf_plan_id(path: str | Path) -> str | None:
    """The plan a GGUF file was written from (`PLAN_KEY`, set by `quantize_gguf`), or None."""
    import gguf

    field = gguf.GGUFReader(path).fields.get(PLAN_KEY)
    return None if field is None else str(field.contents())


def check_types(path: str | Path, types: Mapping[str, str]) -> None:
    """LlamaCppFailed unless every tensor of `types` has that type in the GGUF file at `path`."""
    got = gguf_tensor_types(path)
    wrong = [f"{t}: {got.get(t)} (planned {want})" for t, want in types.items() if got.get(t) != want]
    if wrong:
        raise LlamaCppFailed(f"llama-quantize wrote {len(wrong)} tensor(s) at another type than planned: "
                             + "; ".join(wrong[:5]))


# ------------------------------------------------------------------------------------ perplexity


@dataclass(frozen=True)
class Measured:
    """What llama-perplexity reported."""

    perplexity: float
    kl_divergence: float | None
    n_tokens: int  # tokens scored


_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")
_PPL_Q = re.compile(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)")
_KLD = re.compile(r"Mean\s+KLD:\s*([0-9.eE+-]+)")
_CHUNKS = re.compile(r"(?:calculating perplexity|kl_divergence: computing) over (\d+) chunks, n_ctx=(\d+)")


def perplexity(model: str | Path, text: str | Path, *, ctx: int = EVAL_CTX, chunks: int | None = None,
               save_logits: str | Path | None = None, kl_base: str | Path | None = None) -> Measured:
    """`llama-perplexity` of a GGUF on a text file, in windows of `ctx` tokens (at most `chunks` of them).

    `save_logits`: also keep the model's logits there (the base of later KL divergences).  `kl_base`: a
    file `save_logits` wrote for the same text; the KL divergence to it is measured too.
    """
    args: list[str | Path] = ["-m", model, "-f", text, "-c", ctx, "-b", ctx]
    if chunks:
        args += ["--chunks", chunks]
    if save_logits and kl_base:
        raise ValueError("save the base's logits or measure against them, not both")
    if save_logits:
        args += ["--kl-divergence-base", save_logits]
    if kl_base:
        # the text and windows come from the logits file
        args = ["-m", model, "-c", ctx, "-b", ctx, "--kl-divergence-base", kl_base, "--kl-divergence"]
        if chunks:
            args += ["--chunks", chunks]
    out = run_tool("llama-perplexity", args, what=f"measuring {model}")
    ppl = _PPL_Q.search(out) if kl_base else _PPL.search(out)
    kld = _KLD.search(out)
    if ppl is None or (kl_base and kld is None):
        raise LlamaCppFailed(f"llama-perplexity gave no {'KL divergence' if ppl else 'perplexity'} for {model}:\n"
                             + "\n".join(out.strip().splitlines()[-8:]))
    n = _CHUNKS.search(out)
    scored = int(n.group(1)) * (int(n.group(2)) - int(n.group(2)) // 2) if n else 0
    return Measured(perplexity=float(ppl.group(1)), kl_divergence=float(kld.group(1)) if kld else None,
                    n_tokens=scored)

