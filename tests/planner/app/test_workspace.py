"""The Workspace the use cases share: one model load, one GPTQ cache per profile, windows tokenized once."""

from transformers import AutoTokenizer

from bitplan.db.store import Store
from bitplan.planner.app.workspace import Workspace
from bitplan.profiler import model as model_module


def test_a_model_loads_once_and_another_source_replaces_it(tiny_checkpoint, tmp_path, monkeypatch):
    loads = []
    real = model_module.load_model
    monkeypatch.setattr(model_module, "load_model", lambda source: loads.append(source) or real(source))
    ws = Workspace(Store(str(tmp_path / "w.db")), progress=False)
    first = ws.model(str(tiny_checkpoint))
    assert ws.model(str(tiny_checkpoint)) is first and loads == [str(tiny_checkpoint)]
    assert ws.has_model(str(tiny_checkpoint)) and not ws.has_model("smollm2-135m")
    copy = tmp_path / "copy"
    first.model.save_pretrained(copy)
    first.tokenizer.save_pretrained(copy)
    assert ws.model(str(copy)) is not first and len(loads) == 2


def test_gptq_results_are_kept_per_profile_only_when_asked(tmp_path):
    assert Workspace(Store(str(tmp_path / "a.db"))).gptq_cache("prof-a") is None
    ws = Workspace(Store(str(tmp_path / "b.db")), keep_gptq=True)
    a = ws.gptq_cache("prof-a")
    assert ws.gptq_cache("prof-a") is a and a.profile_id == "prof-a"
    b = ws.gptq_cache("prof-b")  # another profile: its results never mix with the first one's
    assert b is not a and b.profile_id == "prof-b"


def test_windows_are_tokenized_once_per_vocabulary(tiny_checkpoint, text_file, tmp_path, monkeypatch):
    calls = []
    from bitplan.executor import evaluate
    orig = evaluate.eval_windows
    monkeypatch.setattr(evaluate, "eval_windows", lambda *a, **k: calls.append(1) or orig(*a, **k))
    ws = Workspace(Store(str(tmp_path / "w.db")), progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    first = ws.windows(tok, str(text_file), 256, 64)
    tok.save_pretrained(tmp_path / "tok")  # a quantized checkpoint's copy of the tokenizer
    again = ws.windows(AutoTokenizer.from_pretrained(tmp_path / "tok"), str(text_file), 256, 64)
    assert again is first and len(calls) == 1 and tuple(first.ids.shape) == (4, 64)
    assert ws.windows(tok, str(text_file), 128, 64) is not first and len(calls) == 2
