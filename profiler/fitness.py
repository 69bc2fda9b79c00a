"""The evolutionary allocator's fitness: KL(base ‖ candidate plan) of the real model, cheaply.

`KLFitness` is a `bitplan.planner.allocators.evolutionary.FitnessOracle` over the profile's modules:

- **Variants** (`VariantStore`): every (module, option) is quantized at most once, on first use, and
  kept as packed codes (`kernels/reference.py`'s layout: a 3-bit code costs 3 bits) with its fp16
  scales and zeros; a bounded LRU (`cache_mib`) keeps recently used dequantized weights.  A candidate
  is assembled by pointing each `linear.weight.data` at its variant's tensor; nothing is
  re-quantized, and only modules whose option changed are touched.
- **Tokens**: the base model's log-probs are computed once per token row and cached (full
  vocabulary, `n_tokens x vocab` float32; no top-k), and KL is summed in chunks of `chunk` tokens
  (`profiler/kl.py`'s `Replayer` and `mean_kl`).  Fitness is the mean over the rows' tokens of
  KL(p_base ‖ p_candidate), nats per token.
- **Parent replay**: `prepare(parent, rows)` runs the parent once on a generation's rows, recording
  every block's input; an offspring then runs only from the first block where it differs from the
  parent (bit-identical to a full pass: the earlier blocks are the parent's).
- **Splits** (`token_splits`): the calibration text of the profile is tokenized; the text tokens the
  profile was measured on are skipped, the next `fitness_tokens` form the fitness pool the search
  selects on, and the `heldout_tokens` after them are held out — seen by neither the profile nor the
  search's selection — for the overfitting check.
- **Counting**: `tokens_used` counts every token of every forward pass (a replay from block l counts
  its row's tokens in full).

Variants come from the quantizer the profile measured ΔW with: RTN, or GPTQ with each module's `H`
collected once from the profile's own calibration tokens (one streamed pass, as `apply` does).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from bitplan.db.types import CalibrationRef, InvalidInput, ModelRef, Module, Option, Profile, Quantizer
from bitplan.kernels.quantize import quantize, quantizer_for
from bitplan.kernels import reference
from bitplan.profiler.calibration import text_tokens_used, token_batches
from bitplan.profiler.kl import Replayer
from bitplan.profiler.model import is_embedding, planned_for
from bitplan.profiler.profile import DEFAULT_SEQ_LEN

DEFAULT_FITNESS_TOKENS = 1024
DEFAULT_HELDOUT_TOKENS = 512
DEFAULT_ROW_TOKENS = 128
DEFAULT_CACHE_MIB = 1024


class VariantStore:
    """Every module's weight at every option: packed codes kept, dequantized tensors in a bounded LRU."""

    def __init__(self, weights: Sequence[torch.Tensor], options: Sequence[Option],
                 cache_mib: float = DEFAULT_CACHE_MIB, quantizer: Quantizer | Sequence[Quantizer] = Quantizer(),
                 hessians: Sequence[torch.Tensor | None] | None = None):
        self.weights, self.options = list(weights), list(options)
        self.quantizer, self.hessians = quantizer, hessians  # GPTQ: each module's H, as `apply` has it
        # one per module where they differ (a planned embedding is RTN under a GPTQ profile)
        self.quantizers = [quantizer] * len(self.weights) if isinstance(quantizer, Quantizer) else list(quantizer)
        self.packed: dict[tuple[int, int], tuple] = {}
        self.cache: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self.cache_bytes, self.max_bytes = 0, int(cache_mib * 2**20)
        self.quantized = 0  # quantizer calls so far: each (module, option) at most once

    def _pack(self, m: int, o: int) -> tuple:
        W, opt = self.weights[m], self.options[o]
        self.quantized += 1
        if not opt.quantized or opt.bits not in reference.SHARDS:
            return ("dense", W.detach().to(torch.bfloat16))  # what a 16-bit option stores
        qw = quantize(W.detach(), opt, self.quantizers[m], None if self.hessians is None else self.hessians[m])
        return ("packed", reference.pack(qw.q.T.contiguous(), opt.bits), qw.scales.T.contiguous(),
                None if qw.zeros is None else qw.zeros.T.contiguous(), opt.bits, qw.group_size, W.shape[1])

    def weight(self, m: int, o: int) -> torch.Tensor:
        """The dequantized `[out, in]` weight of module m at option o, in the original weight's dtype."""
        key = (m, o)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        if key not in self.packed:
            self.packed[key] = self._pack(m, o)
        entry, dtype = self.packed[key], self.weights[m].dtype
        if entry[0] == "dense":
            W = entry[1].to(dtype)
        else:
            W = reference.dequantize(*entry[1:], dtype=dtype).T.contiguous()
        self.cache[key] = W
        self.cache_bytes += W.numel() * W.element_size()
        while self.cache_bytes > self.max_bytes and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.cache_bytes -= old.numel() * old.element_size()
        return W

    def packed_bytes(self) -> int:
        total = 0
        for entry in self.packed.values():
            tensors = entry[1:2] if entry[0] == "dense" else [*entry[1], entry[2], entry[3]]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total


class KLFitness:
    """KL(base ‖ candidate) on fitness rows and held-out rows of one model (module docstring).

    `choice[m]` is the option index of `planned[m]` into `options`.  Use as a context manager, or call
    `close()`, to put the original weights back.
    """

    def __init__(self, model: nn.Module, planned: list[tuple[Module, nn.Linear]], options: Sequence[Option],
                 fitness_ids: torch.Tensor, heldout_ids: torch.Tensor, *, device: str = "cpu",
                 chunk: int = 128, cache_mib: float = DEFAULT_CACHE_MIB, describe: dict | None = None,
                 quantizer: Quantizer = Quantizer(), hessians: Sequence[torch.Tensor | None] | None = None):
        if fitness_ids.ndim != 2 or heldout_ids.ndim != 2 or fitness_ids.shape[1] != heldout_ids.shape[1]:
            raise InvalidInput("fitness and held-out tokens must be [rows, tokens] with one row length")
        self.model, self.planned, self.device, self.chunk = model, planned, device, chunk
        self.linears = [lin for _, lin in planned]
        self.original = [lin.weight.data for lin in self.linears]
        self.store = VariantStore(self.original, options, cache_mib,
                                  [quantizer_for(m, quantizer) for m, _ in planned], hessians)
        n_layers = model.config.num_hidden_layers
        # a module outside the blocks (an untied lm_head) changes only what follows the last block
        # ... and the embedding (with a tied head, the pair: one Parameter, so one swap) every block's input
        self.layer = np.array([0 if is_embedding(m) else n_layers if m.layer is None else m.layer
                               for m, _ in planned], dtype=np.int64)
        self.n_rows, self.row_tokens = int(fitness_ids.shape[0]), int(fitness_ids.shape[1])
        self.heldout_rows = list(range(self.n_rows, self.n_rows + int(heldout_ids.shape[0])))
        self.installed = np.full(len(planned), -1, dtype=np.int64)  # -1: the original weight
        self.reference: np.ndarray | None = None
        self.reference_kl: dict[int, float] = {}
        self.forward_blocks = 0  # blocks run per row, summed: replays run fewer than n_layers
        self._describe = dict(describe or {}, fitness_tokens=int(fitness_ids.numel()),
                              heldout_tokens=int(heldout_ids.numel()), row_tokens=self.row_tokens)
        model.to(device)
        with torch.no_grad():
            self.replayer = Replayer(model, torch.cat([fitness_ids, heldout_ids]), device)
        self.tokens_used = 0  # candidates' tokens; the one base pass is counted apart, in `base_tokens`
        self.base_tokens = int(fitness_ids.numel() + heldout_ids.numel())

    def describe(self) -> dict:
        return {"oracle": "kl", **self._describe}

    def install(self, choice: np.ndarray) -> None:
        """Put each module's weight at its option of `choice` into the model (only the ones that change)."""
        choice = np.asarray(choice, dtype=np.int64)
        if choice.shape != self.installed.shape:
            raise ValueError(f"choice of shape {choice.shape}, expected [{len(self.installed)}] modules")
        for m in np.flatnonzero(choice != self.installed).tolist():
            self.linears[m].weight.data = self.store.weight(m, int(choice[m]))
            self.installed[m] = choice[m]

    def _sums(self, first: int, rows: Sequence[int]) -> list[float]:
        self.tokens_used += len(rows) * self.row_tokens
        self.forward_blocks += len(rows) * (len(self.replayer.layers) - first)
        return self.replayer.kl_sums(first, rows, self.chunk)

    @torch.no_grad()
    def prepare(self, choice: np.ndarray, rows: Sequence[int]) -> None:
        """Run `choice` (a generation's parent) on `rows`, recording its block inputs for replays."""
        self.install(choice)
        self.tokens_used += len(rows) * self.row_tokens
        self.forward_blocks += len(rows) * len(self.replayer.layers)
        self.reference = np.array(choice, dtype=np.int64)
        self.reference_kl = dict(zip(rows, self.replayer.capture(rows, self.chunk)))

    @torch.no_grad()
    def fitness(self, choice: np.ndarray, rows: Sequence[int]) -> float:
        """Mean KL(base ‖ choice) per token over fitness `rows`."""
        return sum(self.fitness_rows(choice, rows)) / len(rows)

    @torch.no_grad()
    def fitness_rows(self, choice: np.ndarray, rows: Sequence[int]) -> list[float]:
        """KL(base ‖ choice) per token of each fitness row."""
        rows = [int(r) for r in rows]
        if not rows or min(rows) < 0 or max(rows) >= self.n_rows:
            raise ValueError(f"fitness rows must lie in [0, {self.n_rows})")
        choice = np.asarray(choice, dtype=np.int64)
        first = 0
        if self.reference is not None and all(r in self.reference_kl for r in rows):
            differ = np.flatnonzero(choice != self.reference)
            if differ.size == 0:
                return [self.reference_kl[r] / self.row_tokens for r in rows]
            first = int(self.layer[differ].min())
        self.install(choice)
        return [s / self.row_tokens for s in self._sums(first, rows)]

    @torch.no_grad()
    def heldout(self, choice: np.ndarray) -> float:
        """Mean KL(base ‖ choice) per token over the held-out rows (a full pass: never recorded)."""
        self.install(choice)
        return sum(self._sums(0, self.heldout_rows)) / (len(self.heldout_rows) * self.row_tokens)

    def close(self) -> None:
        """The original weights back in the model."""
        for lin, W in zip(self.linears, self.original):
            lin.weight.data = W
        self.installed[:] = -1
        self.reference = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FitnessWorker(KLFitness):
    """A cluster worker's `KLFitness` (a Ray actor's): its planned modules found by name in its own copy of
    the model."""

    def __init__(self, model: nn.Module, names: list[str], options, fitness_ids, heldout_ids, kw: dict,
                 device: str):
        planned = {m.name: (m, lin) for m, lin in planned_for(model, set(names))}
        super().__init__(model, [planned[n] for n in names], options, fitness_ids, heldout_ids, device=device, **kw)

    def facts(self) -> dict:
        """What `ClusterFitness` reports as its own: the same for every worker."""
        return {"describe": self.describe(), "n_rows": self.n_rows, "row_tokens": self.row_tokens,
                "base_tokens": self.base_tokens}

    def counts(self) -> tuple[int, int]:
        return self.tokens_used, self.forward_blocks


class ClusterFitness:
    """`KLFitness` on a Ray cluster (profiler/cluster.py): one oracle per worker, each holding the model.

    A generation's parent is recorded on every worker (`prepare`), so any of them replays any offspring
    from its first changed block; a stage's candidates (`fitness_rows_many`, `fitness_many`) are handed to
    whichever worker is free.  Each score is the one `KLFitness` gives in one process.  `tokens_used`
    counts every worker's tokens: the parent's recording once per worker.
    """

    def __init__(self, cluster, model: nn.Module, planned: list[tuple[Module, nn.Linear]], options,
                 fitness_ids: torch.Tensor, heldout_ids: torch.Tensor, *, device: str = "cpu", **kw):
        self.cluster = cluster
        self.workers = cluster.actors(FitnessWorker, (model.cpu(), [m.name for m, _ in planned], list(options),
                                                      fitness_ids, heldout_ids, kw), device)
        facts = cluster.call_all(self.workers[:1], "facts")[0]
        self._describe = facts["describe"]
        self.n_rows, self.row_tokens, self.base_tokens = facts["n_rows"], facts["row_tokens"], facts["base_tokens"]

    def describe(self) -> dict:
        return self._describe

    def _counts(self) -> list[tuple[int, int]]:
        return self.cluster.call_all(self.workers, "counts")

    @property
    def tokens_used(self) -> int:
        return sum(t for t, _ in self._counts())

    @property
    def forward_blocks(self) -> int:
        return sum(b for _, b in self._counts())

    def prepare(self, choice: np.ndarray, rows: Sequence[int]) -> None:
        self.cluster.call_all(self.workers, "prepare", np.asarray(choice), list(rows))

    def _each(self, method: str, choices: list[np.ndarray], rows: Sequence[int]) -> list:
        out: list = [None] * len(choices)
        calls = [(np.asarray(c), list(rows)) for c in choices]
        self.cluster.pool(self.workers, calls, method, on_result=out.__setitem__)
        return out

    def fitness_rows_many(self, choices: list[np.ndarray], rows: Sequence[int]) -> list[list[float]]:
        return self._each("fitness_rows", choices, rows)

    def fitness_many(self, choices: list[np.ndarray], rows: Sequence[int]) -> list[float]:
        return self._each("fitness", choices, rows)

    def fitness_rows(self, choice: np.ndarray, rows: Sequence[int]) -> list[float]:
        return self.fitness_rows_many([choice], rows)[0]

    def fitness(self, choice: np.ndarray, rows: Sequence[int]) -> float:
        return self.fitness_many([choice], rows)[0]

    def heldout(self, choice: np.ndarray) -> float:
        return self.cluster.call_all(self.workers[:1], "heldout", np.asarray(choice))[0]

    def close(self) -> None:
        """The workers end; the model in this process was never changed."""
        if self.workers:
            self.cluster.close(self.workers)
            self.workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def token_splits(tokenizer, calib: CalibrationRef, fitness_tokens: int, heldout_tokens: int,
                 row_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(fitness [n, row_tokens], heldout [m, row_tokens])` from the text of `calib` after the text tokens
    its windows used (rounded up to whole rows), fitness first, disjoint."""
    if fitness_tokens < row_tokens or heldout_tokens < row_tokens:
        raise InvalidInput(f"fitness and held-out tokens must each be at least one row of {row_tokens}")
    used = text_tokens_used(tokenizer, calib.n_tokens, calib.seq_len or min(DEFAULT_SEQ_LEN, calib.n_tokens))
    row_text = text_tokens_used(tokenizer, row_tokens, row_tokens)
    n_fit, n_held = fitness_tokens // row_tokens, heldout_tokens // row_tokens
    ids, _ = token_batches(tokenizer, calib.name, (n_fit + n_held) * row_tokens, row_tokens,
                           skip_text=-(-used // row_text) * row_text, what="fitness_tokens + heldout_tokens")
    return ids[:n_fit], ids[n_fit:]


def check_same_model(loaded, measured: ModelRef, what: str) -> None:
    """InvalidInput naming both fingerprints when `loaded` is not the model `what` (a profile, a plan) was
    measured on; a ref without a fingerprint (a hand-made profile file) is taken on trust."""
    if measured.fingerprint and loaded.ref.fingerprint != measured.fingerprint:
        raise InvalidInput(f"the model at {measured.source or measured.name} has fingerprint {loaded.ref.fingerprint}, "
                           f"but {what} was measured on fingerprint {measured.fingerprint}: give the model it measured")


def kl_fitness_for_profile(loaded, profile: Profile, *, fitness_tokens: int = DEFAULT_FITNESS_TOKENS,
                           heldout_tokens: int = DEFAULT_HELDOUT_TOKENS, row_tokens: int = DEFAULT_ROW_TOKENS,
                           device: str = "cpu", cache_mib: float = DEFAULT_CACHE_MIB,
                           cluster=None) -> KLFitness | ClusterFitness:
    """The KL oracle of `profile`'s modules on its loaded model, on text after the profile's calibration;
    with `cluster` (profiler/cluster.py) one on each of its workers (`ClusterFitness`)."""
    from bitplan.profiler.profile import gptq_hessians

    check_same_model(loaded, profile.model, f"profile {profile.id}")
    planned = {m.name: (m, lin) for m, lin in planned_for(loaded.model, {m.name for m in profile.modules})}
    missing = [m.name for m in profile.modules if m.name not in planned]
    if missing:
        raise InvalidInput(f"profile {profile.id} names modules the model lacks: {missing[:3]}")
    spec = profile.calibration.name
    if not spec:
        raise InvalidInput(f"profile {profile.id} records no calibration text to draw fitness tokens from")
    fit, held = token_splits(loaded.tokenizer, profile.calibration, fitness_tokens, heldout_tokens, row_tokens)
    planned = [planned[m.name] for m in profile.modules]
    hessians = None
    # the variants are the ones `apply` writes: GPTQ from H of the profile's tokens
    if profile.quantizer.method == "gptq":
        H = gptq_hessians(loaded, profile, planned, device=device)
        hessians = [H.get(m.name) for m, _ in planned]  # none for the embedding: RTN
    kw = dict(cache_mib=cache_mib, describe={"text": spec, "skip_tokens": profile.calibration.n_tokens},
              quantizer=profile.quantizer, hessians=hessians)
    if cluster is not None:
        return ClusterFitness(cluster, loaded.model, planned, profile.options, fit, held, device=device, **kw)
    return KLFitness(loaded.model, planned, profile.options, fit, held, device=device, **kw)
