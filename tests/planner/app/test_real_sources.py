"""What a user with a real checkpoint hits (issue 14, point 6): each a one-line error or the right figure."""

import json

import numpy as np


def write_gguf(path, tensors: dict[str, np.ndarray]) -> None:
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_truncated_gguf_says_truncated(tmp_path, run_cli):
    whole = tmp_path / "model.gguf"
    write_gguf(whole, {"token_embd.weight": np.ones((64, 32), np.float32),
                       "output.weight": np.ones((64, 32), np.float32)})
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:-1000])
    code, out, err = run_cli("eval", str(cut))
    assert code == 2 and "truncated" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_damaged_checkpoints_and_profile_files_are_refused_in_one_line(tmp_path, tiny_checkpoint, run_cli, db):
    import shutil

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", no_weights)
    cut = tmp_path / "cut"
    shutil.copytree(tiny_checkpoint, cut)
    shard = cut / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])
    binary = tmp_path / "profile.json"
    binary.write_bytes(bytes(range(256)) * 8)
    for argv, needle in ((["profile", str(no_weights)], "has a config but no weights"),
                         (["profile", str(cut)], "model.safetensors is truncated or damaged"),
                         (["plan", "--profile-file", str(binary), "--budget", "3bpw"], "not a profile file")):
        code, _, err = run_cli(*argv, "-q")
        assert code == 2 and needle in err and "Traceback" not in err and err.count("\n") == 1, argv


def test_gguf_size_on_disk(tmp_path):
    from bitplan.executor.apply import checkpoint_bytes

    path = tmp_path / "model.gguf"
    write_gguf(path, {"output.weight": np.ones((64, 32), np.float32)})
    assert checkpoint_bytes(path) == path.stat().st_size > 64 * 32 * 4


def test_checkpoint_names_its_architecture(tiny_checkpoint):
    """A config read from a GGUF has `architectures: null`; the checkpoint written from it names its class."""
    from transformers import AutoModelForCausalLM

    from bitplan.executor.apply import config_dict

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    model.config.architectures = None
    assert config_dict(model)["architectures"] == ["LlamaForCausalLM"]


def test_validate_layers_the_model_lacks(db, tiny_checkpoint, text_file, run_cli):
    for layers, says in (("0,7", "has layers 0..1"), ("0,x", "layer numbers")):
        code, out, err = run_cli("profile", str(tiny_checkpoint), "--calib", str(text_file), "--tokens",
                                 "128", "--seq-len", "64", "--validate", "--validate-layers", layers, "-q")
        assert code == 2 and says in err and "Traceback" not in err, err


def test_llamacpp_types_without_loading_the_model(db, tiny_checkpoint, text_file, tmp_path, run_cli, monkeypatch):
    code, out, err = run_cli("profile", str(tiny_checkpoint), "--calib", str(text_file), "--tokens", "128",
                             "--seq-len", "64", "--estimator", "fisher", "--quantizer", "rtn", "--json", "-q")
    assert code == 0, err
    code, out, err = run_cli("plan", json.loads(out)["id"], "--budget", "6bpw", "--engine", "llamacpp",
                             "--json", "-q")
    assert code == 0, err

    def no_loading(*a, **k):
        raise AssertionError("the llama.cpp type file needs no weights")

    monkeypatch.setattr("bitplan.profiler.model.load_model", no_loading)
    code, _, err = run_cli("apply", json.loads(out)["id"], "--out", str(tmp_path / "q"), "--format",
                           "llamacpp", "-q")
    assert code == 0, err
    script = (tmp_path / "q" / "llama-quantize.sh").read_text()
    assert "convert_hf_to_gguf.py" in script and "MODEL-F16.gguf" in script


def test_llamacpp_command_from_a_gguf_keeps_its_embedding_type(make_profile):
    """From a GGUF source the script requantizes that file and keeps its token embedding's own type."""
    from bitplan.executor.export import llamacpp_command
    from bitplan.planner.plan import allocate
    from bitplan.planner.request import PlanRequest

    profile = make_profile()
    plan = allocate(profile, PlanRequest(budget="4.5bpw"))
    cmd = llamacpp_command(plan, {"blk.0.attn_q.weight": "q4_0"}, {"token_embd.weight": "q8_0"})
    assert "--allow-requantize" in cmd and "--token-embedding-type q8_0" in cmd and "f16" not in cmd
    assert "--token-embedding-type f16" in llamacpp_command(plan, {"blk.0.attn_q.weight": "q4_0"})
