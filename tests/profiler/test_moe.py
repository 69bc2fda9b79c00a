"""MoE: un-fused experts compute what the fused ones did, every expert matrix is planned with its routing
statistics, per-expert H sees only its tokens (weighted by w²), and an expert no token reaches gets a
nonzero fallback error."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bitplan.db.types import InvalidInput, ModelRef, Profile, parse_options
from bitplan.profiler import moe
from bitplan.profiler.model import LoadedModel, fixed_bits, load_model, planned_linears
from bitplan.profiler.profile import profile_model
from bitplan.profiler.stream import RoutedInput, stream_blocks

KINDS = ("mixtral", "qwen2_moe")
OPTIONS = parse_options("2,3,4,8")


def _ids(model, shape=(2, 24), seed=0):
    return torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
def test_unfused_forward_equals_fused(kind, moe_checkpoint):
    from transformers import AutoModelForCausalLM
    fused = AutoModelForCausalLM.from_pretrained(moe_checkpoint(kind), dtype=torch.float32).eval()
    unfused = copy.deepcopy(fused)
    assert moe.unfuse_experts(unfused) == fused.config.num_hidden_layers
    ids = _ids(fused)
    with torch.no_grad():
        torch.testing.assert_close(unfused(ids).logits, fused(ids).logits, rtol=0, atol=1e-6)
        # the experts module alone, on routing that reaches every expert
        block_f, block_u = fused.model.layers[0].mlp, unfused.model.layers[0].mlp
        x = torch.randn(40, fused.config.hidden_size, generator=torch.Generator().manual_seed(1))
        _, w, idx = block_f.gate(x)
        assert set(idx.unique().tolist()) == set(range(len(block_u.experts)))
        want = block_f.experts(x, idx, w)
        torch.testing.assert_close(block_u.experts(x, idx, w), want, rtol=0, atol=1e-6)
        assert want.abs().max() > 1e-3
    assert isinstance(block_u.experts, moe.ExpertLinears)
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in unfused.state_dict()


def test_planned_modules_include_every_expert_matrix(moe_loaded):
    model = moe_loaded.model
    cfg = model.config
    n_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    planned = planned_linears(model)
    experts = {(m.layer, m.expert, m.role): m for m, _ in planned if m.expert is not None}
    assert set(experts) == {(l, e, r) for l in range(cfg.num_hidden_layers) for e in range(n_experts)
                            for r in ("gate_proj", "up_proj", "down_proj")}
    for (l, e, r), m in experts.items():
        assert m.name == f"model.layers.{l}.mlp.experts.{e}.{r}"
    names = {m.name for m, _ in planned}
    assert not any(n.endswith((".gate", "shared_expert_gate")) for n in names)  # routers and gates: 16 bits
    shared = [m for m, _ in planned if "shared_expert." in m.name]
    if cfg.model_type == "qwen2_moe":
        assert {m.role for m in shared} == {"shared_gate_proj", "shared_up_proj", "shared_down_proj"}
        assert all(m.expert is None for m in shared)
        gate = model.model.layers[0].mlp.shared_expert_gate.weight
        assert fixed_bits(model, planned) >= gate.numel() * 16 * cfg.num_hidden_layers
    else:
        assert shared == []


def test_routing_stats_and_per_expert_hessians(moe_loaded, text_file):
    """Routing statistics count tokens x top_k per layer; an expert's H is Σ w² xxᵀ over its own tokens."""
    model = moe_loaded.model
    batches = _ids(model, (3, 16), seed=2)
    planned = planned_linears(model)
    got = {}
    with moe.record_routing(model) as records:
        stream_blocks(model, batches, planned, lambda i, mods, H, n: got.update(H), progress=False)
    top_k = model.config.num_experts_per_tok
    assert len(records) == model.config.num_hidden_layers
    for rec in records.values():
        assert int(rec.tokens.sum()) == batches.numel() * top_k
        assert float(rec.weight.sum()) > 0

    # the reference: route by hand through the fused computation's router, per expert
    want = {}
    layer0 = model.model.layers[0]
    with torch.no_grad():
        for s in range(batches.shape[0]):
            hidden = {}
            hook = layer0.mlp.register_forward_pre_hook(lambda mod, args: hidden.setdefault(s, args[0]))
            model(batches[s:s + 1], use_cache=False)
            hook.remove()
            x = hidden[s].reshape(-1, model.config.hidden_size)
            _, w, idx = layer0.mlp.gate(x)
            for e, mlp in enumerate(layer0.mlp.experts):
                tok, slot = torch.where(idx == e)
                xe = x[tok].double() * w[tok, slot, None].double()
                H = want.setdefault(e, torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64))
                H += xe.T @ xe
    for e, H in want.items():
        torch.testing.assert_close(got[f"model.layers.0.mlp.experts.{e}.gate_proj"], H, rtol=1e-5, atol=1e-6)


def test_routed_input_rows_fold_and_spill(tmp_path):
    """An expert's input is kept as rows below K of them, as a float32 H from K on; spilled parts (H added,
    rows appended) and parts still in memory make the same H as Σ xxᵀ in float64."""
    g = torch.Generator().manual_seed(0)
    K = 24
    chunks = [torch.randn(n, K, generator=g) for n in (5, 7, 20, 3, 11, 2)]
    want = sum(x.double().T @ x.double() for x in chunks)
    acc = RoutedInput(K, "cpu")
    acc.add(chunks[0])
    acc.add(chunks[1])
    assert acc.H is None and acc.n_rows == 12 and acc.nbytes == 4 * K * 12  # rows: fewer values than H
    acc.add(chunks[2])
    assert acc.H is not None and acc.n_rows == 0 and acc.nbytes == 4 * K * K  # folded at K rows
    acc.spill(tmp_path / "e")
    assert acc.nbytes == 0 and (tmp_path / "e" / "H.npy").exists()
    acc.add(chunks[3])
    acc.spill(tmp_path / "e")  # rows appended on disk
    acc.add(chunks[4])
    acc.spill(tmp_path / "e")
    acc.add(chunks[5])  # and some left in memory
    assert acc.disk_rows == 14 and acc.n_rows == 2
    torch.testing.assert_close(acc.hessian(), want, rtol=1e-6, atol=1e-5)
    assert acc.hessian().dtype == torch.float64


def test_routed_hessians_over_budget_go_to_disk(moe_loaded):
    """With no memory budget every routed expert's statistics go to disk after each batch; the H read back
    are those kept in memory, gate and up share theirs, dense H are untouched, and the folder is gone after."""
    model = moe_loaded.model
    batches = _ids(model, (4, 16), seed=3)
    planned = planned_linears(model)
    kept, spilled, folders = {}, {}, []

    def keep(into, spill):
        def on_block(i, mods, H, n):
            if spill:
                assert H.folder is not None and any(H.folder.rglob("*.f32"))
                folders.append(H.folder)
            into.update({k: v.clone() for k, v in H.items()})
        return on_block

    stream_blocks(model, batches, planned, keep(kept, False), progress=False)
    stream_blocks(model, batches, planned, keep(spilled, True), progress=False, statistics_budget=0)
    assert folders and not any(f.exists() for f in folders)
    assert kept.keys() == spilled.keys()
    routed = [m.name for m, _ in planned if m.expert is not None and m.layer is not None]
    assert routed
    for name in kept:
        if name in routed:
            torch.testing.assert_close(spilled[name], kept[name], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(spilled[name], kept[name])
    gates = [name for name in routed if name.endswith("gate_proj")]
    for name in gates:
        assert torch.equal(kept[name], kept[name.replace("gate_proj", "up_proj")])
    assert sum(float(kept[name].abs().sum()) > 0 for name in gates) > len(gates) // 2  # routed tokens reached them


@pytest.mark.parametrize("estimator", ["hessian", "fisher"])
def test_profile_carries_routing_stats(moe_loaded, text_file, estimator, tmp_path):
    p = profile_model(moe_loaded, OPTIONS, estimator=estimator, calib=str(text_file), n_tokens=256, seq_len=64,
                      progress=False)
    assert [m.name for m in p.modules] == [m.name for m, _ in planned_linears(moe_loaded.model)]
    experts = [m for m in p.modules if m.expert is not None]
    top_k = moe_loaded.model.config.num_experts_per_tok
    for layer in range(moe_loaded.model.config.num_hidden_layers):
        downs = [m for m in experts if m.layer == layer and m.role == "down_proj"]
        assert sum(m.tokens_routed for m in downs) == 256 * top_k
        assert sum(m.routing_weight_total for m in downs) > 0
        for m in downs:
            if m.tokens_routed:
                assert m.routing_weight == pytest.approx(m.routing_weight_total / m.tokens_routed)
    assert all(m.tokens_routed is None for m in p.modules if m.expert is None)
    assert np.all(p.error[:, 0] > 0)
    # the statistics survive the profile file and the database
    again = Profile.from_dict(p.to_dict())
    assert again == p and again.modules[-1] == p.modules[-1]
    from bitplan.db.store import Store
    store = Store(str(tmp_path / "bitplan.db"))
    store.save_profile(p)
    assert store.get_profile(p.id).modules == p.modules


def _starve_expert(model: nn.Module, layer: int, starved: int) -> None:
    """Route no token of `layer` to expert `starved` (5 experts, top-2): rows ±v, ±u and a zero row.

    Logits read a, -a, b, -b, 0: the two positive ones (|a|, |b|) always beat the zero row.
    """
    gate = model.model.layers[layer].mlp.gate.weight
    assert gate.shape[0] == 5 and model.config.num_experts_per_tok == 2
    g = torch.Generator().manual_seed(3)
    v, u = torch.randn(gate.shape[1], generator=g), torch.randn(gate.shape[1], generator=g)
    rows = [r for r in range(5) if r != starved]
    with torch.no_grad():
        for r, w in zip(rows, (v, -v, u, -u)):
            gate[r] = w
        gate[starved] = 0


@pytest.mark.parametrize("estimator", ["hessian", "fisher"])
def test_expert_without_tokens_gets_a_fallback_error(moe_checkpoint, text_file, estimator, caplog):
    loaded = load_model(str(moe_checkpoint("mixtral")))
    _starve_expert(loaded.model, layer=1, starved=2)
    loaded = LoadedModel(loaded.model, loaded.tokenizer, ModelRef(name="starved"))
    with caplog.at_level("WARNING"):
        p = profile_model(loaded, OPTIONS, estimator=estimator, calib=str(text_file), n_tokens=256, seq_len=64,
                          progress=False)
    rows = {(m.layer, m.expert, m.role): i for i, m in enumerate(p.modules) if m.expert is not None}
    for role in ("gate_proj", "up_proj", "down_proj"):
        i = rows[(1, 2, role)]
        m = p.modules[i]
        assert m.tokens_routed == 0 and m.fallback and m.routing_weight is None
        assert np.all(p.error[i] > 0) and np.all(np.diff(p.error[i]) < 0)  # more bits, less error
        # the rarest routed expert's token count times the routed experts' mean error per token
        routed = [j for (l, e, r), j in rows.items() if l == 1 and r == role and e != 2]
        tokens = np.array([p.modules[j].tokens_routed for j in routed], float)
        want = (p.error[routed] / tokens[:, None]).mean(axis=0) * tokens.min()
        np.testing.assert_allclose(p.error[i], want)
    assert sum(m.fallback for m in p.modules) == 3
    assert "experts [2] received no calibration tokens" in caplog.text


_SMALL = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2)
_MLA = dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=16)
OTHER = {"qwen3_moe": dict(intermediate_size=96, moe_intermediate_size=64, num_experts=4),
         "olmoe": dict(intermediate_size=64, num_experts=4),
         "deepseek_v3": _MLA}


@pytest.mark.parametrize("kind", sorted(OTHER))
def test_other_architectures_unfuse_exactly(kind):
    """Qwen3-MoE, OLMoE, DeepSeek-V3 (a dense first layer, a shared expert, scaled routing weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    fused = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **_SMALL, **OTHER[kind])).eval()
    for name, p in fused.named_parameters():
        if name.endswith("mlp.gate.weight"):
            nn.init.normal_(p, std=0.5)  # decisive routing
    unfused = copy.deepcopy(fused)
    assert moe.unfuse_experts(unfused) == (1 if kind == "deepseek_v3" else 2)
    ids = _ids(fused)
    with torch.no_grad():
        torch.testing.assert_close(unfused(ids).logits, fused(ids).logits, rtol=0, atol=1e-6)
    roles = {(m.role, m.expert is not None) for m, _ in planned_linears(unfused)}
    assert {("gate_proj", True), ("up_proj", True), ("down_proj", True)} <= roles
    if kind == "deepseek_v3":
        assert {("shared_gate_proj", False), ("shared_up_proj", False), ("shared_down_proj", False),
                ("down_proj", False)} <= roles  # shared expert; dense layer 0


def test_shared_expert_narrower_than_the_expert_count_is_planned():
    """A gate has one output per expert (or one); a shared expert with fewer outputs than there are experts
    (DeepSeek-V3 scaled down: 16 experts of 8) is a matrix to plan, not a gate."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("deepseek_v3", **_SMALL, **{**_MLA, "n_routed_experts": 16, "moe_intermediate_size": 8})
    model = AutoModelForCausalLM.from_config(cfg)
    moe.unfuse_experts(model)
    shared = {m.role: lin.out_features for m, lin in planned_linears(model) if "shared_experts" in m.name}
    assert shared == {"shared_gate_proj": 8, "shared_up_proj": 8, "shared_down_proj": 64}


def test_unsupported_fused_layout_is_a_clear_error():
    """gpt-oss stores its experts transposed, with biases and its own gating: refused, not mis-planned."""
    from transformers import AutoConfig, AutoModelForCausalLM
    gpt_oss = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt_oss", **{**_SMALL, "num_local_experts": 4}, intermediate_size=32, head_dim=16))
    with pytest.raises(InvalidInput, match=r"GptOssExperts\) is an MoE expert layout bitplan cannot un-fuse"):
        moe.unfuse_experts(gpt_oss)

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(4, 8, 16))  # [E, H, 2I]: transposed
            self.down_proj = nn.Parameter(torch.zeros(4, 4, 8))

        def forward(self, hidden_states, top_k_index, top_k_weights):
            return hidden_states

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 4, bias=False)
            self.experts = Experts()

    with pytest.raises(InvalidInput, match="cannot un-fuse.*do not read"):
        moe.unfuse_experts(nn.Sequential(Block()))  # found by its forward and shapes, not a class name
