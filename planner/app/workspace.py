"""`Workspace`: what the use cases of one process share, in one object.

The store; the model loaded last (profiling, searching, applying and evaluating one model load it
once); the GPTQ results of the profile in use (`kernels.quantize.GPTQCache`: a profile's GPTQ runs
once for the profile and every plan applied after it); the evaluation windows, tokenized once.
Model-side imports happen inside the methods, so planning a stored profile needs no torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from bitplan.db.store import Store
from bitplan.db.types import InvalidInput, Profile, content_id

log = logging.getLogger(__name__)


class Workspace:
    """The store and the loaded state the use cases share (`progress`: show progress bars).

    `keep_gptq`: keep every GPTQ result of the current profile for the applies after it (memory:
    a byte per weight and option, up to `GPTQCache.max_bytes`); worth it when one process applies
    several plans of one profile (`bitplan demo`, `compare --evaluate`).
    `cluster`: the Ray cluster profiles fan out over (`profiler.cluster.Cluster`), None for this process.
    """

    def __init__(self, store: Store, *, progress: bool = True, keep_gptq: bool = False, cluster=None):
        self.store, self.progress, self.keep_gptq, self.cluster = store, progress, keep_gptq, cluster
        self._source: str | None = None
        self._loaded = None  # profiler.model.LoadedModel of `_source`
        self._gptq = None  # kernels.quantize.GPTQCache of one profile
        self._windows: dict[tuple, object] = {}

    # ------------------------------------------------------------------------------------ models

    def model(self, source: str):
        """The model at `source` (a local checkpoint, a GGUF file or the embedded name), loaded once: a
        later call for another source replaces it."""
        if self._loaded is None or source != self._source:
            from bitplan.profiler.model import check_causal_lm, load_model

            check_causal_lm(source)
            self._loaded = None  # the old model's memory goes before the new one loads
            t0 = time.perf_counter()
            self._loaded, self._source = load_model(source), source
            log.info("loaded %s in %.0f s", source, time.perf_counter() - t0)
        return self._loaded

    def has_model(self, source: str) -> bool:
        """Whether the model at `source` is loaded already (a use case that can do without it then skips it)."""
        return self._loaded is not None and source == self._source

    def adopt(self, source: str, loaded) -> Workspace:
        """Use `loaded` (a `LoadedModel`) as the model at `source`: a caller that has it loaded already."""
        self._source, self._loaded = source, loaded
        return self

    def model_of(self, profile: Profile, purpose: str):
        """The model `profile` was measured on, from the source it records, for `purpose`."""
        if not profile.model.source:
            raise InvalidInput(f"profile {profile.id} records no model source; {purpose} needs the model: use a "
                               f"profile made by `bitplan profile`")
        return self.model(profile.model.source)

    # ------------------------------------------------------------------------------------- GPTQ

    def gptq_cache(self, profile_id: str):
        """The GPTQ cache of `profile_id` when results are kept (`keep_gptq`), else None.  A workspace
        keeps one profile's results: the first use of another profile starts an empty cache."""
        if not self.keep_gptq:
            return None
        from bitplan.kernels.quantize import GPTQCache

        if self._gptq is None or self._gptq.profile_id not in (None, profile_id):
            self._gptq = GPTQCache()
        return self._gptq.claim(profile_id)

    # ---------------------------------------------------------------------------------- llama.cpp

    def llamacpp_dir(self, source: str) -> Path:
        """Where the llama.cpp artefacts of the model at `source` are kept (its F16 GGUF, its logits on the
        evaluation text), keyed by the source's files as they are now: rebuilt on demand, so deleting the
        folder loses nothing."""
        from bitplan.profiler.model import resolve

        directory, name = resolve(source)
        files = [directory / name] if name else sorted(p for p in directory.iterdir() if p.is_file())
        key = content_id(str(directory.resolve()), [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])
        path = self.store.work_dir(f"llamacpp-{key}")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def base_gguf(self, source: str) -> Path:
        """The F16 GGUF of the model at `source` (`executor.llamacpp.base_gguf`), written once."""
        from bitplan.executor.llamacpp import base_gguf

        path = self.llamacpp_dir(source) / "base-f16.gguf"
        if not path.exists():
            log.info("writing the F16 GGUF of %s", source)
            base_gguf(source, path)
        return path

    def base_logits(self, source: str, text: str, ctx: int, chunks: int):
        """`(logits file, Measured)` of the F16 GGUF of `source` on `text`: llama-perplexity's saved logits,
        what a quantized file's KL divergence is measured against, and the base's own perplexity."""
        from bitplan.db.files import write_json
        from bitplan.executor.llamacpp import Measured, perplexity

        stem = self.llamacpp_dir(source) / f"logits-{content_id(text, ctx, chunks)}"
        logits, summary = stem.with_suffix(".bin"), stem.with_suffix(".json")
        if not (logits.exists() and summary.exists()):
            staged = stem.with_suffix(".bin.part")
            measured = perplexity(self.base_gguf(source), self.text_file(text), ctx=ctx, chunks=chunks,
                                  save_logits=staged)
            os.replace(staged, logits)
            write_json(summary, measured.__dict__)
        return logits, Measured(**json.loads(summary.read_text()))

    def keep_imatrix(self, path: str | Path) -> str:
        """Keep a copy of the importance matrix at `path` under its hash (`Quantizer.imatrix`, returned), so
        that the plans of a profile made with it are written with the same file."""
        from bitplan.db.files import atomic_write
        from bitplan.profiler.imatrix import file_sha256

        key = file_sha256(path)[:16]
        kept = self._imatrix_dir() / f"{key}.gguf"
        if not kept.exists():
            atomic_write(kept, lambda tmp: shutil.copyfile(Path(path).expanduser(), tmp))
        return key

    def imatrix(self, key: str) -> Path:
        """The importance matrix kept under `key`; InvalidInput when this workspace has none."""
        path = self._imatrix_dir() / f"{key}.gguf"
        if not path.exists():
            raise InvalidInput(f"the importance matrix {key} is not in {self.store.url}'s workspace: profile again "
                               f"with --imatrix FILE (that file), which keeps a copy")
        return path

    def make_imatrix(self, source: str, text: str, *, ctx: int, chunks: int) -> Path:
        """llama-imatrix of the F16 GGUF of `source` on `text` (at most `chunks` windows of `ctx` tokens),
        written once and kept: the path of the kept copy."""
        from bitplan.executor.llamacpp import make_imatrix

        made = self.llamacpp_dir(source) / f"imatrix-{content_id(text, ctx, chunks)}.gguf"
        if not made.exists():
            log.info("collecting the importance matrix of %s on %s (%d x %d tokens)", source, text, chunks, ctx)
            make_imatrix(self.base_gguf(source), self.text_file(text), made, ctx=ctx, chunks=chunks)
        return self.imatrix(self.keep_imatrix(made))

    def _imatrix_dir(self) -> Path:
        path = self.store.work_dir("imatrix")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def text_file(self, text: str) -> Path:
        """`text` (`shakespeare:eval`, a file or a glob) as one file, for llama.cpp's tools to read."""
        from bitplan.db.files import atomic_write
        from bitplan.profiler.calibration import load_text

        name, body = load_text(text)
        path = self.store.work_dir("llamacpp-text") / f"{content_id(name, body)}.txt"
        if not path.exists():
            atomic_write(path, body)
        return path

    # --------------------------------------------------------------------------- evaluation text

    def windows(self, tokenizer, text: str | None = None, tokens: int | None = None, window: int | None = None):
        """`executor.evaluate.eval_windows`, tokenized once per tokenizer vocabulary, text and shape."""
        from bitplan.executor.evaluate import EVAL_TOKENS, EVAL_WINDOW, eval_windows

        tokens = tokens or EVAL_TOKENS
        window = min(window or EVAL_WINDOW, tokens)
        # a saved copy of a tokenizer (a quantized checkpoint's) tokenizes as the original: key by vocabulary
        key = (text, tokens, window, type(tokenizer).__name__, content_id(sorted(tokenizer.get_vocab().items())))
        if key not in self._windows:
            self._windows[key] = eval_windows(tokenizer, text, tokens, window)
        return self._windows[key]
