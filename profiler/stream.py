"""Block-by-block forward passes, GPTQ-style: only one decoder block is on the compute device at a time.

The model runs once per calibration batch with every block replaced by a pass-through recorder, which
keeps the arguments the model hands *that* block (attention mask, rotary tables, ...: they differ
between blocks of models that mix attention kinds, such as Gemma 2/3's sliding-window and global
layers, with their own masks and rotary bases) and block 0's hidden states; then each block in turn
is moved to the device, runs on every calibration batch with its own arguments and hooks feeding its
linears' inputs to `H += Xᵀ X`, and its outputs become the next block's inputs.

The hidden states carried from block to block (`Carry`) stay in memory while they fit under an
activation budget, else go to disk, one file per batch.  A `BlockCheckpoint` keeps them, with the
caller's results so far, after every block, so an interrupted pass resumes at its next block.

A model whose weights stay on disk (`load_model(stream_weights=...)`, profiler/weights.py) has each
block's weights read when the pass reaches it and dropped once `on_block` has used them, and the parts
outside the blocks (embeddings, final norm, head) read for the passes that run them: host memory holds
one block's weights at a time.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bitplan.db.files import atomic_write
from bitplan.db.types import InvalidInput, Module
from bitplan.profiler.model import decoder_layers, tied_head
from bitplan.profiler.moe import ExpertMLP
from bitplan.profiler.weights import materialized, streamed

log = logging.getLogger(__name__)


class _Caught(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for block `i`: records the arguments the model hands it and returns its input unchanged
    (as the real block returns its output: a tensor, or a tuple); the last one stops the forward pass."""

    def __init__(self, i: int, last: bool, as_tuple: bool, seen: list):
        super().__init__()
        self.i, self.last, self.as_tuple, self.seen = i, last, as_tuple, seen

    def forward(self, hidden_states, *args, **kwargs):
        self.seen.append((self.i, hidden_states, args, kwargs))
        if self.last:
            raise _Caught
        return (hidden_states,) if self.as_tuple else hidden_states


BlockArgs = tuple[tuple, dict]
"""The positional (after the hidden states) and keyword arguments the model gives one block in one batch."""


def _record(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, as_tuple: bool) -> list | None:
    """`[(i, hidden, args, kwargs)]` of one forward pass with every block a `_Recorder`, or None when the
    blocks did not pass their hidden states on untouched (the model reads their output as a tuple, or
    transforms it between blocks, or does not call each block once in order)."""
    seen: list = []
    for i in range(len(layers)):
        layers[i] = _Recorder(i, i == len(layers) - 1, as_tuple, seen)
    try:
        model(ids, use_cache=False)
    except _Caught:
        pass
    if [i for i, *_ in seen] != list(range(len(layers))):
        return None
    h0 = seen[0][1]
    for _, h, _, _ in seen[1:]:
        if h is not h0 and not (isinstance(h, torch.Tensor) and h.shape == h0.shape and torch.equal(h, h0)):
            return None
    return seen


class _Shared:
    """Hands back one tensor for all equal tensors it is given: every calibration sequence has the same
    length, so masks, rotary tables and position ids repeat batch after batch, and are held once (a
    float mask of 2,048 tokens is 16 MiB per batch)."""

    def __init__(self):
        self.pool: dict[tuple, list[torch.Tensor]] = {}
        self.seen: dict[int, torch.Tensor] = {}  # by id, within one batch: many blocks get the same tensor

    def batch(self, x):
        self.seen.clear()
        return self._share(x)

    def _share(self, x):
        if isinstance(x, torch.Tensor):
            if id(x) not in self.seen:
                same = self.pool.setdefault((x.shape, x.dtype, x.device), [])
                self.seen[id(x)] = next((t for t in same if torch.equal(t, x)), None)
                if self.seen[id(x)] is None:
                    same.append(x)
                    self.seen[id(x)] = x
            return self.seen[id(x)]
        if type(x) in (tuple, list):
            return type(x)(self._share(v) for v in x)
        if type(x) is dict:
            return {k: self._share(v) for k, v in x.items()}
        return x


@torch.no_grad()
def block_inputs(model: nn.Module, batches: torch.Tensor, device: str,
                 put: Callable[[int, torch.Tensor], None] | None = None) -> list[list[BlockArgs]]:
    """`[batch row][block]`: the arguments the model's own forward gives each decoder block; block 0's
    hidden states `[1, T, d]` go to `put(row, h)`.

    Recorded, not copied from block 0: blocks of one model may get different masks and rotary tables.
    Arguments are assumed not to depend on the hidden states (masks, rotary tables, position ids do
    not); a model that changes the hidden states between blocks cannot be streamed and raises
    InvalidInput.  Equal tensors, within a batch or across batches, are held once.  `put=None` drops
    the hidden states: a resumed pass takes them from the checkpoint and needs only the arguments.
    """
    layers = decoder_layers(model)
    outside = outside_blocks(model, layers, head=False) if streamed(model) is not None else []
    with materialized(model, outside):
        return _block_inputs(model, layers, batches, device, put)


def _block_inputs(model, layers, batches, device, put) -> list[list[BlockArgs]]:
    blocks = list(layers)
    # embeddings, rotary tables and the like run on the device; the blocks stay where they are
    _move_outside(model, layers, device)
    out, shared = [], _Shared()
    # whether the model reads a block's output as a tensor or as a tuple shows only by trying (a real
    # block, which would tell, is not on the device); with one block nothing reads its output
    as_tuple = None if len(layers) > 1 else False
    try:
        for s, row in enumerate(batches):
            ids = row.unsqueeze(0).to(device)
            seen = None
            tries = [False, True] if as_tuple is None else [as_tuple]
            for t in tries:
                try:
                    seen = _record(model, layers, ids, t)
                except Exception:
                    if t is tries[-1]:
                        raise
                    continue  # a model that reads a tuple may fail on a tensor
                if seen is not None:
                    as_tuple = t
                    break
            if seen is None:
                raise InvalidInput(
                    f"cannot stream {type(model).__name__} block by block: its forward does not pass each "
                    f"decoder block's output, unchanged, to the next block")
            out.append(shared.batch([(args, kw) for _, _, args, kw in seen]))
            if put is not None:
                put(s, seen[0][1])
    finally:
        for i, b in enumerate(blocks):
            layers[i] = b
        _move_outside(model, layers, "cpu")
    return out


def outside_blocks(model: nn.Module, layers: nn.ModuleList, head: bool = True) -> list[nn.Module]:
    """The modules that hold parameters outside the decoder blocks (with `head=False`, less an untied output
    head: a pass that stops after the last block never runs it, and a large vocabulary's head is as large as
    several blocks)."""
    inside = {id(x) for b in layers for x in b.modules()}
    out = model.get_output_embeddings()
    skip = set() if head or out is None or tied_head(model) is not None else {id(out)}
    return [m for m in model.modules() if id(m) not in inside and id(m) not in skip
            and any(p is not None for p in m._parameters.values())]


def _move_outside(model: nn.Module, layers: nn.ModuleList, device: str) -> None:
    """Move every parameter and buffer that is not inside a decoder block."""
    inside = {id(x) for b in layers for x in b.modules()}
    for m in model.modules():
        if id(m) in inside:
            continue
        for p in m._parameters.values():
            if p is not None and not p.is_meta:  # a streamed weight not read for this pass
                p.data = p.data.to(device)
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = b.to(device)


def available_ram() -> int:
    """Bytes of host memory available now (psutil if installed, else /proc/meminfo, else a guess of 4 GiB)."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def default_activation_budget(device: str) -> int:
    """Half the available RAM; on a GPU also at most a quarter of its free memory (the block, its `H`
    and the forward pass's temporaries need the rest)."""
    budget = available_ram() // 2
    if device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        budget = min(budget, free // 4)
    return budget


class Carry:
    """The hidden states entering the current block, one `[1, T, d]` tensor per calibration batch.

    In memory (`root=None`, on the compute device): a block reads batch `s` once, so its output takes
    the input's place and the activations are held once, not twice.  On disk: the inputs of block `b`
    are `root/in-<b>/<s>.pt`; the next block's are written into `in-<b+1>.partial/` (each file under a
    temporary name, then renamed) and the folder renamed whole once every batch is there, so an
    interrupted pass finds either a complete set of a block's inputs or none.
    """

    def __init__(self, n: int, device: str, root: Path | None = None, block: int = -1):
        self.n, self.device, self.root, self.block = n, device, root, block
        self._mem: list[torch.Tensor | None] | None = [None] * n if root is None else None

    def _dir(self, block: int) -> Path:
        return self.root / f"in-{block:05d}"

    def has(self, block: int) -> bool:
        return self.root is not None and len(list(self._dir(block).glob("*.pt"))) == self.n

    def get(self, s: int) -> torch.Tensor:
        if self._mem is not None:
            return self._mem[s]
        return torch.load(self._dir(self.block) / f"{s:06d}.pt", map_location=self.device, weights_only=True)

    def put(self, s: int, hidden: torch.Tensor) -> None:
        """Batch `s`'s input of the next block (its output of the current one)."""
        if self._mem is not None:
            self._mem[s] = hidden
            return
        # clone: a view would save its whole storage
        part = self._dir(self.block + 1).with_suffix(".partial")
        atomic_write(part / f"{s:06d}.pt", partial(torch.save, hidden.detach().to("cpu").clone()))

    def advance(self) -> None:
        """Every batch has been put: the outputs become the inputs of the next block."""
        self.block += 1
        if self.root is not None:
            final = self._dir(self.block)
            if final.exists():  # left by a run interrupted after this rename but before its checkpoint
                shutil.rmtree(final)
            final.with_suffix(".partial").rename(final)

    def drop_others(self) -> None:
        """Remove every other block's inputs (called once the caller's checkpoint has moved past them)."""
        if self.root is not None and self.root.is_dir():
            for d in self.root.iterdir():
                if d.name != self._dir(self.block).name:
                    shutil.rmtree(d, ignore_errors=True)


class BlockCheckpoint:
    """What a streamed pass has finished, under `path`, so that an interrupted pass resumes at its next block.

    `arrays` are the caller's results, filled block by block by its `on_block` (the rows of an error
    table): they are saved after every block with the number of finished blocks (`state.npz`, written
    to a temporary name and renamed), and restored into the same arrays, in place, on open.  The
    activations entering the next block live in `path/activations` (`Carry` on disk).  The caller
    keys `path` by everything its results depend on (the profile id).
    """

    def __init__(self, path: str | Path, arrays: dict[str, np.ndarray]):
        self.path, self.arrays, self.next_block = Path(path), arrays, 0
        state = self.path / "state.npz"
        if not state.exists():
            return
        with np.load(state) as z:
            if all(k in z and z[k].shape == a.shape for k, a in arrays.items()):
                for k, a in arrays.items():
                    a[...] = z[k]
                self.next_block = int(z["next_block"])
            else:
                log.warning("ignoring the checkpoint in %s: its arrays do not match this pass", self.path)

    @property
    def activations(self) -> Path:
        return self.path / "activations"

    def commit(self, next_block: int) -> None:
        def save(path: Path) -> None:
            with open(path, "wb") as f:  # a file object: np.savez would append .npz to a temporary name
                np.savez(f, next_block=np.int64(next_block), **self.arrays)

        atomic_write(self.path / "state.npz", save)
        self.next_block = next_block


def stream_blocks(
    model: nn.Module,
    batches: torch.Tensor,
    planned: list[tuple[Module, nn.Linear]],
    on_block: Callable[[int, list[tuple[Module, nn.Linear]], dict[str, torch.Tensor], int], None],
    device: str = "cpu",
    progress: bool = True,
    *,
    activation_budget: int | None = None,
    checkpoint: BlockCheckpoint | None = None,
    desc: str = "profiling blocks",
    rewrite: Callable[[int, list[tuple[Module, nn.Linear]], dict[str, torch.Tensor]], None] | None = None,
    statistics_budget: int | None = None,
) -> None:
    """Run the model one block at a time; after each block call `on_block(i, its planned linears, H, n_tokens)`.

    `H[name]: [K, K]` float64 is `Σ xxᵀ` over every calibration token's input to that linear; for a
    routed expert's linear, over the tokens routed to it, each weighted by its routing weight squared,
    accumulated in float32 and made when read (`BlockHessians`: what is kept of the routed experts' inputs
    goes to disk over `statistics_budget` bytes; read each `H` once and drop it, and a block's peak holds
    one routed `H` at a time).

    The carried hidden states (`tokens x hidden` values of the model's dtype) stay on the device while
    they fit in `activation_budget` bytes (default: `default_activation_budget`), else go to a
    temporary folder (under `$TMPDIR`), removed at the end.  With a `checkpoint` they always go to its
    folder, the checkpoint is committed after every block, and blocks it has finished are skipped:
    `on_block` is called only for the blocks run now.

    `rewrite(i, its planned linears, H)`, if given, may change block `i`'s weights once its `H` is known;
    the block then runs again, and what it computes with the new weights is what the next block receives
    (GPTQ on the inputs a quantized model sees: `profile.gptq_propagated`).
    """
    layers = decoder_layers(model)
    start = checkpoint.next_block if checkpoint is not None else 0
    if start >= len(layers):
        return
    n_tokens = batches.numel()
    carry, spill = _carry(model, batches, device, activation_budget, checkpoint)
    if start > 0 and not carry.has(start):
        log.warning("checkpoint %s lacks the inputs of block %d: starting over", checkpoint.path, start)
        start = 0
    by_layer: dict[int, list[tuple[Module, nn.Linear]]] = {}
    for m, lin in planned:
        if m.layer is not None:
            by_layer.setdefault(m.layer, []).append((m, lin))
    try:
        with torch.no_grad():
            if start == 0:
                block_args = block_inputs(model, batches, device, carry.put)
                carry.advance()
            else:
                block_args = block_inputs(model, batches, device)
                carry.block = start
            for i in tqdm(range(start, len(layers)), desc=desc, unit="block", initial=start, total=len(layers),
                          disable=not progress):
                mine = by_layer.get(i, [])
                last = i == len(layers) - 1  # its outputs feed nothing
                # streamed weights: read now, dropped once `on_block` (the error table) has used them
                with materialized(model, [layers[i]]):
                    H = _run_block(model, layers[i], [a[i] for a in block_args], mine, carry, device, last,
                                   None if rewrite is None else partial(rewrite, i), statistics_budget)
                    try:
                        if not last:
                            carry.advance()
                        on_block(i, mine, H, n_tokens)
                    finally:
                        H.close()
                if checkpoint is not None:
                    checkpoint.commit(i + 1)
                carry.drop_others()
    finally:
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
    if checkpoint is not None:
        shutil.rmtree(checkpoint.activations, ignore_errors=True)  # every block is done: nothing reads them


def _carry(model: nn.Module, batches: torch.Tensor, device: str, activation_budget: int | None,
           checkpoint: BlockCheckpoint | None) -> tuple[Carry, Path | None]:
    """Where the hidden states between blocks live: the checkpoint's folder, the device while they fit in
    `activation_budget`, else a temporary folder (returned as the second item, for removal)."""
    if checkpoint is not None:
        return Carry(len(batches), device, checkpoint.activations), None
    if activation_budget is None:
        activation_budget = default_activation_budget(device)
    emb = model.get_input_embeddings().weight
    need = batches.numel() * emb.shape[1] * emb.element_size()
    if need <= activation_budget:
        return Carry(len(batches), device, None), None
    spill = Path(tempfile.mkdtemp(prefix="bitplan-activations-"))
    log.info("carrying %.2f GiB of activations on disk in %s (budget %.2f GiB)", need / 2**30, spill,
             activation_budget / 2**30)
    return Carry(len(batches), device, spill), spill


def _run_block(model: nn.Module, block: nn.Module, block_args: list, mine: list[tuple[Module, nn.Linear]],
               carry: Carry, device: str, last: bool, rewrite: Callable | None = None,
               statistics_budget: int | None = None) -> "BlockHessians":
    """One block over every batch (its outputs carried on unless it is the `last`); `H` of its planned linears.
    With `rewrite`: a first pass for `H`, `rewrite(mine, H)`, then a second pass whose outputs are carried."""
    block.to(device)
    H = BlockHessians(device, statistics_budget)
    hooks = [H.hook(m, lin, _expert_of(model, m)) for m, lin in mine]
    hooks = [h for h in hooks if h is not None]
    carrying = not last and rewrite is None
    try:
        for s, (args, kw) in enumerate(block_args):
            out = block(carry.get(s), *args, **kw)
            if carrying:
                carry.put(s, out[0] if isinstance(out, tuple) else out)
            H.fit()
        for h in hooks:
            h.remove()
        hooks = []
        if rewrite is not None:
            rewrite(mine, H)
            for s, (args, kw) in enumerate(block_args) if not last else ():
                out = block(carry.get(s), *args, **kw)
                carry.put(s, out[0] if isinstance(out, tuple) else out)
    except BaseException:
        H.close()
        raise
    finally:
        for h in hooks:
            h.remove()
        block.to("cpu")
    return H


class RoutedInput:
    """`Σ w²xxᵀ` of one routed expert's input, the linears reading it (gate and up) sharing it.

    A routed expert sees a small share of the tokens (DeepSeek-V3's 256 experts, 8 active: 1/32 each),
    so while it has seen fewer rows than its input width `K` it keeps the rows `w·x` themselves (float32),
    fewer values than `H`'s `K²`; from `K` rows on it folds them into a float32 `H`.  `spill` moves
    what it holds to a folder (`H` added to the one there, rows appended); `hessian()` puts every part
    together as float64.
    """

    def __init__(self, K: int, device: str):
        self.K, self.device = K, device
        self.rows: list[torch.Tensor] = []
        self.n_rows = 0
        self.H: torch.Tensor | None = None
        self.folder: Path | None = None
        self.disk_rows = 0

    def add(self, x: torch.Tensor) -> None:
        self.rows.append(x.to(torch.float32))
        self.n_rows += len(x)
        if self.n_rows >= self.K:
            self._fold()

    def _fold(self) -> None:
        if self.H is None:
            self.H = torch.zeros(self.K, self.K, dtype=torch.float32, device=self.device)
        X = torch.cat(self.rows)
        self.H.addmm_(X.T, X)
        self.rows, self.n_rows = [], 0

    @property
    def nbytes(self) -> int:
        return 4 * self.K * (self.n_rows + (self.K if self.H is not None else 0))

    def spill(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        if self.H is not None:
            path = folder / "H.npy"
            H = self.H.cpu().numpy()
            np.save(path, np.load(path) + H if path.exists() else H)
            self.H = None
        if self.rows:
            with open(folder / "rows.f32", "ab") as f:
                torch.cat(self.rows).cpu().numpy().tofile(f)
            self.disk_rows += self.n_rows
            self.rows, self.n_rows = [], 0

    def hessian(self) -> torch.Tensor:
        """`[K, K]` float64 on the device."""
        H = torch.zeros(self.K, self.K, dtype=torch.float64, device=self.device)
        if self.H is not None:
            H += self.H
        parts = list(self.rows)
        if self.folder is not None and (self.folder / "H.npy").exists():
            H += torch.from_numpy(np.load(self.folder / "H.npy")).to(self.device)
        if self.disk_rows:
            rows = np.memmap(self.folder / "rows.f32", np.float32, "r", shape=(self.disk_rows, self.K))
            step = max(1, (64 << 20) // (4 * self.K))  # rows read back 64 MiB at a time
            parts += [torch.from_numpy(np.array(rows[i:i + step])) for i in range(0, len(rows), step)]
        for X in parts:
            X = X.to(self.device, torch.float64)
            H.addmm_(X.T, X)
        return H


class BlockHessians(Mapping):
    """`H` of each planned linear of one block by name: a float64 tensor accumulated in the pass for a
    dense linear, made on reading from its `RoutedInput` for a routed expert's (the last one read is kept,
    so gate and up make it once).  Routed inputs above `budget` bytes (default: half of
    `default_activation_budget`, looked up once a block has routed inputs) go to a temporary folder,
    largest first, after each batch; `close()` removes it."""

    def __init__(self, device: str, budget: int | None = None):
        self.device = device
        self.budget = budget
        self.dense: dict[str, torch.Tensor] = {}
        self.routed: dict[str, RoutedInput] = {}
        self._inputs: dict[tuple[int, bool], RoutedInput] = {}
        self._last: tuple[RoutedInput, torch.Tensor] | None = None
        self.folder: Path | None = None

    def hook(self, m: Module, lin: nn.Linear, expert: ExpertMLP | None):
        """Accumulate `lin`'s inputs under `m.name`; the forward hook, or None where another linear's
        hook already feeds the same input."""
        if expert is None:
            H = self.dense[m.name] = torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64,
                                                 device=self.device)
            return lin.register_forward_hook(_accumulate(H))
        key = (id(expert), lin is expert.down_proj)
        shared = key in self._inputs
        if not shared:
            self._inputs[key] = RoutedInput(lin.in_features, self.device)
        acc = self.routed[m.name] = self._inputs[key]
        if shared:
            return None

        def hook(_mod, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
            if expert.routing_weight is not None:
                x = x * expert.routing_weight.reshape(-1, 1).to(torch.float32)
            acc.add(x)
        return lin.register_forward_hook(hook)

    @property
    def routed_bytes(self) -> int:
        return sum(acc.nbytes for acc in self._inputs.values())

    def fit(self) -> None:
        """Spill the largest routed inputs until the rest fits in the budget."""
        if not self._inputs:
            return
        if self.budget is None:
            self.budget = default_activation_budget(self.device) // 2
        over = self.routed_bytes - self.budget
        if over <= 0:
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="bitplan-routed-H-"))
            log.info("routed experts' statistics over %.2f GiB: spilling to %s", self.budget / 2**30, self.folder)
        for i, acc in sorted(enumerate(self._inputs.values()), key=lambda t: -t[1].nbytes):
            if over <= 0:
                break
            over -= acc.nbytes
            acc.spill(self.folder / str(i))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.dense:
            return self.dense[name]
        acc = self.routed[name]
        if self._last is None or self._last[0] is not acc:
            self._last = None  # one made H at a time
            self._last = (acc, acc.hessian())
        return self._last[1]

    def __iter__(self):
        yield from self.dense
        yield from self.routed

    def __len__(self) -> int:
        return len(self.dense) + len(self.routed)

    def close(self) -> None:
        self._last = None
        self._inputs.clear()
        self.routed.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def collect_hessians(model: nn.Module, batches: torch.Tensor, planned: list[tuple[Module, nn.Linear]],
                     device: str = "cpu", dtype: torch.dtype = torch.float32,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """`H = Σ xxᵀ` of every planned linear (on the CPU, in `dtype`), for `apply_plan` with a GPTQ quantizer.

    Statistics of the unquantized model, as the profile's GPTQ ΔW uses (a routed expert's weighted by
    `w²`, so GPTQ minimises the error the block output sees).  Holds every `H` at once:
    `Σ K²` values (SmolLM2-135M: 0.5 GiB in float32).
    """
    H: dict[str, torch.Tensor] = {}

    def keep(_i, _mods, Hb, _n):
        H.update({k: v.to("cpu", dtype) for k, v in Hb.items()})

    stream_blocks(model, batches, planned, keep, device, progress)
    outside = [(m, lin) for m, lin in planned if m.layer is None]
    head = outside_hessians(model, batches, outside, device, progress)
    H.update({k: v.to("cpu", dtype) for k, v in head.items()})
    return H


class _Replay(nn.Module):
    """Stands in for a block: returns a recorded output (its input is ignored)."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


class _Skip(nn.Module):
    """Stands in for a block: passes its input through."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


@torch.no_grad()
def outside_hessians(model: nn.Module, batches: torch.Tensor, mods: list[tuple[Module, nn.Linear]],
                     device: str = "cpu", progress: bool = False) -> dict[str, torch.Tensor]:
    """`H = Σ xxᵀ` of planned linears outside the blocks (an untied `lm_head`), streamed too
    (`run_streamed`: only the parts outside the blocks are ever on the device with them)."""
    H = {m.name: torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64, device=device)
         for m, lin in mods}
    if not mods:
        return H
    hooks = [lin.register_forward_hook(_accumulate(H[m.name])) for m, lin in mods]
    try:
        run_streamed(model, batches, lambda *_: None, device, progress, desc="head inputs")
    finally:
        for h in hooks:
            h.remove()
    return H


@torch.no_grad()
def run_streamed(model: nn.Module, batches: torch.Tensor, on_row: Callable[[int, torch.Tensor, object], None],
                 device: str = "cpu", progress: bool = False, desc: str = "blocks") -> None:
    """The whole model over each row of `batches`, one block on the device at a time; `on_row(s, ids,
    output)` with the model's output (its logits) for row `s`.

    What comes after the last block (the final norm, the head) is not reached by `stream_blocks`: the
    blocks are streamed once, keeping the last block's outputs (on the CPU), then the model runs with
    every block replaced by a stand-in, the last one replaying its recorded output.  So the blocks and
    the parts outside them (embeddings, final norm, head) are never on the device together.
    """
    layers = decoder_layers(model)
    last: list[torch.Tensor] = []
    as_tuple = [False]

    def keep(_mod, _args, out):
        as_tuple[0] = isinstance(out, tuple)
        last.append((out[0] if as_tuple[0] else out).to("cpu"))

    h = layers[-1].register_forward_hook(keep)
    try:
        stream_blocks(model, batches, [], lambda *_: None, device, progress, desc=desc)
    finally:
        h.remove()
    blocks = list(layers)
    try:
        with materialized(model, outside_blocks(model, layers) if streamed(model) is not None else []):
            for j in range(len(layers) - 1):
                layers[j] = _Skip(as_tuple[0])
            _move_outside(model, layers, device)
            try:
                for s, row in enumerate(batches):
                    layers[-1] = _Replay(last[s].to(device), as_tuple[0])
                    ids = row.unsqueeze(0).to(device)
                    on_row(s, ids, model(ids, use_cache=False))
            finally:
                _move_outside(model, layers, "cpu")
    finally:
        for j, b in enumerate(blocks):
            layers[j] = b


def _expert_of(model: nn.Module, m: Module) -> ExpertMLP | None:
    """The routed expert that owns module `m`'s linear, or None for a dense module."""
    if m.expert is None:
        return None
    owner = model.get_submodule(m.name.rsplit(".", 1)[0])
    return owner if isinstance(owner, ExpertMLP) else None


def _accumulate(H: torch.Tensor):
    """`H += Σ xxᵀ` of a linear's inputs."""
    def hook(_mod, args, _out):
        x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)  # [tokens, K]
        H.addmm_(x.T, x)
    return hook
