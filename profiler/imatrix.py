"""A llama.cpp importance matrix (`imatrix.gguf`) as sensitivity input: the diagonal of each module's `H`.

**The file.**  `llama-imatrix` writes a GGUF file (`general.type = "imatrix"`, no architecture) holding,
for every weight matrix `T` it saw multiplied (`T` a GGUF tensor name such as `blk.3.attn_q.weight`):

- `T.in_sum2`: f32 `[n_mat, K]`, `Σ x²` per input column over the tokens counted; `n_mat` is 1 for a
  dense matrix and the number of experts for a routed-expert tensor (`blk.3.ffn_down_exps.weight`),
  one row per expert over the tokens routed to it;
- `T.counts`: f32 `[n_mat, 1]`, the tokens counted per row;
- optionally `T.in_sum` (`Σ x`, unused here), and the keys `imatrix.datasets` (array of strings),
  `imatrix.chunk_count` and `imatrix.chunk_size` (u32).

The legacy binary `.dat` format (int32 entry count; per entry an int32-prefixed name, int32 `ncall`,
int32 `nval`, `nval` f32 values `= mean x² · ncall`; then the chunk count and the dataset name) is read
for dense tensors only: it keeps no token counts per expert, so a routed expert's share of the tokens
is lost; such a file is refused for an MoE model (regenerate it as GGUF).

**Scaling.**  `bitplan`'s `hessian` estimator is `tr(ΔW H ΔWᵀ) / n` with `H = Σ xxᵀ` over the `n`
calibration tokens: the mean per-token squared error of the layer output.  With `H` replaced by its
diagonal this is `Σ ΔW² · d` with `d = diag(H) / n`; `imatrix_diagonals` gives that `d` per module:

- dense: `d = in_sum2 / counts` (mean `x²` per token; the file's own token count);
- routed expert `e`: `d = in_sum2[e] / n`, `n` the tokens every block saw (the largest count of the
  file's dense tensors): the expert's share of the mean per-token error, so a rarely routed expert is
  cheap, as in `hessian`.  llama.cpp counts each routed token once, unweighted: the diagonal is that of
  `Σ xxᵀ` over the routed tokens, not of `hessian`'s `Σ w² xxᵀ` (profiler/moe.py), so on experts the
  imatrix error is larger by about `1/E[w²]`;
- an expert with zero count (llama.cpp writes such "partial data"): the same fallback as
  `moe.fill_unrouted`, at the diagonal: the tensor's mean `x²` per routed token times the token count
  of its rarest routed expert, over `n`; the module is returned as a fallback (`fallback=True` in the
  profile) and a warning names it.

**Matching.**  Module names map to GGUF tensor names by `bitplan.db.formats.gguf_tensor_name`
(the names llama.cpp's converter writes, which the llamacpp export uses).  A planned module the imatrix
lacks is an error (no guessed sensitivity); so is a tensor of the imatrix that this model lacks,
except routers (`ffn_gate_inp`, `ffn_gate_inp_shexp`, which bitplan leaves unquantized) and
`output.weight` (llama.cpp records it with `--process-output`, whether or not the head is planned).
Shapes are checked against the model's.

`collect_imatrix` and `write_imatrix` make such a file from `bitplan`'s own calibration text (llama.cpp's
semantics: `Σ x²` and token counts per row, experts unweighted): for tests and to compare with `hessian`.
`python -m bitplan.profiler.imatrix MODEL OUT.gguf` writes one.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bitplan.db.types import EMBED_ROLE, InvalidInput, Module
from bitplan.db.formats import gguf_tensor_name

log = logging.getLogger(__name__)

_UNPLANNED = re.compile(r"^(blk\.\d+\.ffn_gate_inp(_shexp)?\.weight|output\.weight)$")
_MAKE_ONE = "make one for this model with llama.cpp's llama-imatrix (-m MODEL.gguf -f TEXT -o imatrix.gguf)"


@dataclass
class Entry:
    """One tensor's statistics: `Σ x²` per input column and tokens counted, one row per expert."""

    in_sum2: np.ndarray  # [n_mat, K] float64
    counts: np.ndarray  # [n_mat] float64


@dataclass
class IMatrix:
    path: str
    fingerprint: str  # sha256 of the file's bytes: goes into the profile's estimator name and id
    entries: dict[str, Entry]  # GGUF tensor name ("blk.0.attn_q.weight") -> statistics
    datasets: list[str] = field(default_factory=list)
    chunk_count: int | None = None
    chunk_size: int | None = None
    legacy: bool = False


def file_sha256(path: str | Path | None) -> str:
    """sha256 of the imatrix file; InvalidInput if there is no such file."""
    if path is None:
        raise InvalidInput("--estimator imatrix needs --imatrix PATH, a llama.cpp imatrix.gguf of this model")
    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidInput(f"no such imatrix file: {path}; {_MAKE_ONE}")
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def estimator_tag(path: str | Path) -> str:
    """`imatrix:<first 16 hex of the file's sha256>`: the profile's estimator names the file it read."""
    return f"imatrix:{file_sha256(path)[:16]}"


def read_imatrix(path: str | Path) -> IMatrix:
    """An imatrix file, GGUF (by its magic) or legacy `.dat`; InvalidInput for anything else."""
    fp = file_sha256(path)
    p = Path(path).expanduser()
    with p.open("rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf(p, fp)
    return _read_legacy(p, fp)


def _read_gguf(p: Path, fp: str) -> IMatrix:
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(p)
    except Exception as e:  # the reader raises ValueError, struct errors, ... on a damaged file
        raise InvalidInput(f"{p}: not a readable GGUF file ({e})") from e

    def value(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    kind = value("general.type")
    if kind is not None and kind != "imatrix":
        raise InvalidInput(f"{p} is a GGUF {kind}, not an importance matrix; {_MAKE_ONE}")
    sums, counts = {}, {}
    for t in reader.tensors:
        name = t.name
        for suffix, into in ((".in_sum2", sums), (".counts", counts)):
            if name.endswith(suffix):
                if t.tensor_type != GGMLQuantizationType.F32:
                    raise InvalidInput(f"{p}: tensor {name} is {t.tensor_type.name}, an imatrix stores F32")
                into[name.removesuffix(suffix)] = np.asarray(t.data, dtype=np.float64).reshape(
                    [int(n) for n in reversed(t.shape)])  # ggml lists dimensions innermost first
    if not sums and not counts:
        raise InvalidInput(f"{p} holds no .in_sum2/.counts tensors: not an importance matrix; {_MAKE_ONE}")
    unpaired = sorted(set(sums) ^ set(counts))
    if unpaired:
        raise InvalidInput(f"{p}: tensors without both .in_sum2 and .counts: {_some(unpaired)}; the file is damaged")
    entries = {}
    for name, s in sums.items():
        s = s.reshape(-1, s.shape[-1])
        c = counts[name].reshape(-1)
        if c.shape[0] != s.shape[0]:
            raise InvalidInput(f"{p}: {name} has {s.shape[0]} rows of in_sum2 but {c.shape[0]} counts")
        entries[name] = _checked(p, name, s, c)
    chunk_count, chunk_size = value("imatrix.chunk_count"), value("imatrix.chunk_size")
    datasets = value("imatrix.datasets")
    return IMatrix(path=str(p), fingerprint=fp, entries=entries,
                   datasets=[datasets] if isinstance(datasets, str) else list(datasets or []),
                   chunk_count=None if chunk_count is None else int(chunk_count),
                   chunk_size=None if chunk_size is None else int(chunk_size))


def _read_legacy(p: Path, fp: str) -> IMatrix:
    data = p.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise InvalidInput(f"{p}: neither a GGUF imatrix nor a legacy .dat imatrix (truncated at byte {pos}); "
                               f"{_MAKE_ONE}")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if not 0 < n_entries < 1_000_000:
        raise InvalidInput(f"{p}: neither a GGUF imatrix nor a legacy .dat imatrix; {_MAKE_ONE}")
    entries = {}
    for _ in range(n_entries):
        (n,) = take("<i")
        if not 0 < n < 4096:
            raise InvalidInput(f"{p}: not a legacy .dat imatrix (a tensor name of {n} bytes); {_MAKE_ONE}")
        name = bytes(take(f"<{n}s")[0]).decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1 or ncall < 1:
            raise InvalidInput(f"{p}: legacy imatrix entry {name} has {nval} values over {ncall} chunks")
        values = np.array(take(f"<{nval}f"), dtype=np.float64)
        # the values are mean x² · ncall: with ncall as the count, in_sum2 / counts is the mean x² again
        entries[name] = _checked(p, name, values[None, :], np.array([float(ncall)]))
    datasets, chunk_count = [], None
    if pos + 4 <= len(data):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (n,) = take("<i")
            if 0 < n <= len(data) - pos:
                datasets = [bytes(take(f"<{n}s")[0]).decode("utf-8", "replace")]
    return IMatrix(path=str(p), fingerprint=fp, entries=entries, datasets=datasets, chunk_count=chunk_count,
                   legacy=True)


def _checked(p: Path, name: str, in_sum2: np.ndarray, counts: np.ndarray) -> Entry:
    if not (np.all(np.isfinite(in_sum2)) and np.all(np.isfinite(counts))):
        raise InvalidInput(f"{p}: {name} holds non-finite values")
    if np.any(in_sum2 < 0) or np.any(counts < 0):
        raise InvalidInput(f"{p}: {name} holds negative sums of squares or counts")
    return Entry(in_sum2=in_sum2, counts=counts)


def _some(names, k: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


# ------------------------------------------------------------------------------- imatrix -> diag(H)/n


def _tensor(m: Module) -> str:
    try:
        return gguf_tensor_name(m.name)
    except InvalidInput:
        raise InvalidInput(f"no GGUF tensor name is known for module {m.name}, so no imatrix entry can be "
                           f"matched to it; profile this model with another --estimator") from None


def imatrix_diagonals(imat: IMatrix, modules: list[Module]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`d[name]: [K]` float64, `diag(H)/n` of every module (module docstring: scaling), and the names of
    the expert modules whose `d` is the fallback for an expert with no tokens in the imatrix."""
    by_tensor: dict[str, list[Module]] = {}
    for m in modules:
        by_tensor.setdefault(_tensor(m), []).append(m)
    missing = [t for t in by_tensor if t not in imat.entries]
    if missing:
        raise InvalidInput(f"imatrix {imat.path} has no statistics for {len(missing)} of the {len(by_tensor)} tensors "
                           f"this model plans: {_some(missing)}; {_MAKE_ONE} (with --process-output if output.weight "
                           f"is missing), or profile with another --estimator")
    unknown = sorted(t for t in imat.entries if t not in by_tensor and not _UNPLANNED.match(t))
    if unknown:
        raise InvalidInput(f"imatrix {imat.path} holds {len(unknown)} tensors this model does not have: "
                           f"{_some(unknown)}; is it the imatrix of another model? {_MAKE_ONE}")
    dense = [e.counts[0] for e in imat.entries.values() if e.counts.shape[0] == 1 and e.counts[0] > 0]
    n = max(dense, default=0.0)
    d: dict[str, torch.Tensor] = {}
    fallback: list[str] = []
    for tensor, mods in by_tensor.items():
        e = imat.entries[tensor]
        K = mods[0].shape[1]
        experts = mods[0].expert is not None
        if experts and imat.legacy:
            raise InvalidInput(f"{imat.path} is a legacy .dat imatrix: it keeps no token counts per expert, which "
                               f"{tensor} needs; regenerate it in GGUF format with llama-imatrix")
        want = (len(mods) if experts else 1, K)
        if e.in_sum2.shape != want or e.counts.shape[0] != want[0]:
            raise InvalidInput(f"imatrix {imat.path}: {tensor} has in_sum2 {list(e.in_sum2.shape)} and "
                               f"{e.counts.shape[0]} counts, the model's {mods[0].name} needs {list(want)}; "
                               f"is it the imatrix of another model?")
        if not experts:
            if e.counts[0] <= 0:
                raise InvalidInput(f"imatrix {imat.path} counted no tokens for {tensor}; {_MAKE_ONE}")
            d[mods[0].name] = torch.from_numpy(e.in_sum2[0] / e.counts[0])
            continue
        if n <= 0:
            raise InvalidInput(f"imatrix {imat.path} has no dense tensor to count the tokens every block saw, "
                               f"which {tensor}'s experts are normalised by; {_MAKE_ONE}")
        hot = e.counts > 0
        if not hot.any():
            raise InvalidInput(f"imatrix {imat.path} counted no tokens for any expert of {tensor}; {_MAKE_ONE} "
                               f"on more text")
        per_token = e.in_sum2[hot].sum(axis=0) / e.counts[hot].sum()
        for m in mods:
            if e.counts[m.expert] > 0:
                d[m.name] = torch.from_numpy(e.in_sum2[m.expert] / n)
            else:
                d[m.name] = torch.from_numpy(per_token * e.counts[hot].min() / n)
                fallback.append(m.name)
    if fallback:
        log.warning("imatrix %s counted no tokens for %d expert matrices (%s): their diagonal is the tensor's mean "
                    "x² per routed token times the rarest routed expert's count (fallback=True)",
                    imat.path, len(fallback), _some(fallback))
    return d, fallback


# ---------------------------------------------------------------------- our own statistics -> a file


def collect_imatrix(model: nn.Module, batches: torch.Tensor, planned: list[tuple[Module, nn.Linear]],
                    device: str = "cpu", progress: bool = True) -> dict[str, Entry]:
    """llama.cpp's statistics from `batches`: per GGUF tensor, `Σ x²` per input column and tokens per row
    (per expert over its routed tokens, unweighted), streamed one block at a time."""
    from bitplan.profiler.stream import outside_hessians, stream_blocks

    by_tensor: dict[str, list[tuple[Module, nn.Linear]]] = {}
    for m, lin in planned:
        by_tensor.setdefault(_tensor(m), []).append((m, lin))
    entries = {t: Entry(np.zeros((len(mods) if mods[0][0].expert is not None else 1, mods[0][1].in_features)),
                        np.zeros(len(mods) if mods[0][0].expert is not None else 1))
               for t, mods in by_tensor.items()}

    def hook(entry: Entry, row: int):
        def accumulate(_mod, args, _out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            entry.in_sum2[row] += (x * x).sum(0).cpu().numpy()
            entry.counts[row] += x.shape[0]
        return accumulate

    inside = [(t, m, lin) for t, mods in by_tensor.items() for m, lin in mods if m.layer is not None]
    hooks = [lin.register_forward_hook(hook(entries[t], m.expert or 0)) for t, m, lin in inside]
    try:
        stream_blocks(model, batches, [], lambda *_: None, device, progress)
    finally:
        for h in hooks:
            h.remove()
    outside = [(m, lin) for m, lin in planned if m.layer is None]  # an untied lm_head
    H = outside_hessians(model, batches, outside, device)
    for m, _ in outside:
        e = entries[_tensor(m)]
        e.in_sum2[0] += torch.diagonal(H[m.name]).cpu().numpy()
        e.counts[0] += batches.numel()
    return entries


def write_imatrix(path: str | Path, entries: dict[str, Entry], *, datasets: list[str] = (), chunk_count: int = 0,
                  chunk_size: int = 0) -> Path:
    """Write `entries` as an `imatrix.gguf` in llama.cpp's layout (module docstring)."""
    import gguf

    class _Writer(gguf.GGUFWriter):
        def add_architecture(self) -> None:
            pass  # an imatrix names no architecture

    path = Path(path)
    w = _Writer(path, arch="")
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_array(gguf.Keys.IMatrix.DATASETS, list(datasets))
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(chunk_count))
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(chunk_size))
    for name in sorted(entries):
        e = entries[name]
        w.add_tensor(f"{name}.in_sum2", np.asarray(e.in_sum2, dtype=np.float32))
        w.add_tensor(f"{name}.counts", np.asarray(e.counts, dtype=np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m bitplan.profiler.imatrix MODEL OUT.gguf`: an imatrix from bitplan's calibration text."""
    import argparse

    from bitplan.profiler.calibration import CALIB, token_batches
    from bitplan.profiler.model import load_model, planned_linears
    from bitplan.profiler.profile import DEFAULT_SEQ_LEN, DEFAULT_TOKENS, default_device

    a = argparse.ArgumentParser(prog="python -m bitplan.profiler.imatrix", description=main.__doc__)
    a.add_argument("model", help="checkpoint directory, .gguf, or smollm2-135m")
    a.add_argument("out", help="the imatrix.gguf to write")
    a.add_argument("--calib", default=CALIB)
    a.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    a.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    a.add_argument("--device", default=None)
    args = a.parse_args(argv)
    loaded = load_model(args.model)
    batches, ref = token_batches(loaded.tokenizer, args.calib, args.tokens, args.seq_len)
    entries = collect_imatrix(loaded.model, batches, planned_linears(loaded.model), args.device or default_device())
    write_imatrix(args.out, entries, datasets=[args.calib], chunk_count=len(batches), chunk_size=batches.shape[1])
    print(f"wrote {args.out}: {len(entries)} tensors, {batches.numel()} tokens of {ref.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def importance_rows(imat: IMatrix, modules: list[Module]) -> dict[str, np.ndarray]:
    """`[K]` float32 column weights of each module, as llama-quantize takes them from the file: the row of
    its tensor (its expert's, for a routed expert), `in_sum2 / counts`, 1 where nothing was counted.  A
    module whose tensor the file lacks (the embedding: a lookup records no input) is left out: llama-quantize
    quantizes it without, and so does the profile."""
    out: dict[str, np.ndarray] = {}
    for m in modules:
        e = None if m.role == EMBED_ROLE else imat.entries.get(gguf_tensor_name(m.name))
        if e is None:
            continue
        row = m.expert if m.expert is not None and e.counts.shape[0] > 1 else 0
        if e.in_sum2.shape[1] != m.shape[1] or row >= e.in_sum2.shape[0]:
            raise InvalidInput(f"imatrix {imat.path}: {gguf_tensor_name(m.name)} has in_sum2 "
                               f"{list(e.in_sum2.shape)}, the model's {m.name} [{m.shape[0]}, {m.shape[1]}] does "
                               f"not fit it; is it the imatrix of another model?")
        count = e.counts[row]
        out[m.name] = (e.in_sum2[row] / count if count > 0 else np.ones(m.shape[1])).astype(np.float32)
    return out
