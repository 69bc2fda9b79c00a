"""Tuned configurations kept on disk (`kernels/tuned.py`): a later process takes the choice instead of timing again."""

import json
import logging

import pytest
import torch

pytest.importorskip("triton")

from bitplan.kernels import tuned as tuned_mod  # noqa: E402
from bitplan.kernels.tuned import cache_path, tuned  # noqa: E402

CUDA = torch.device("cuda", 0)  # never touched: only its GPU model's name is asked for, and that is patched
KEY = ("gemv", 1, 4096, 4096, 4, 128, False, torch.bfloat16, 0)
CFG = {"BLOCK_M": 1, "BLOCK_N": 1024, "SPLIT_K": 64, "HALF2": True, "REGIME": "gemv"}


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A cache folder of its own, a patched GPU name, and no file read yet in this process."""
    monkeypatch.setenv("BITPLAN_TUNED_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(tuned_mod, "_STORED", {})
    return tmp_path


def tuner(config):
    calls = []

    def tune():
        calls.append(1)
        return dict(config)

    return tune, calls


def new_process():
    tuned_mod._STORED.clear()


def test_a_later_process_takes_the_choice_instead_of_timing_again(store):
    tune, calls = tuner(CFG)
    assert tuned({}, "matmul", KEY, CUDA, tune) == CFG
    new_process()
    table = {}
    assert tuned(table, "matmul", KEY, CUDA, tune) == CFG
    assert len(calls) == 1
    assert table == {KEY: CFG}  # and within the process, from its own table from now on
    (path,) = store.iterdir()
    assert json.loads(path.read_text()) == {"matmul:" + "|".join(map(str, KEY)): CFG}


def test_the_file_is_per_gpu_model_triton_version_and_kernel_source(store, monkeypatch):
    import triton

    path = cache_path(CUDA)
    assert path.parent == store
    assert path.name.startswith(f"tuned-NVIDIA-H100-80GB-HBM3-triton{triton.__version__}-")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert cache_path(CUDA).name.startswith("tuned-NVIDIA-H200-")
    tuned_mod._source_digest.cache_clear()
    monkeypatch.setattr(tuned_mod, "SOURCES", ("matmul.py",))  # other source: another digest
    try:
        assert cache_path(CUDA).name.rsplit("-", 1)[1] != path.name.rsplit("-", 1)[1]
    finally:
        tuned_mod._source_digest.cache_clear()


def test_nothing_is_kept_off_cuda_or_when_turned_off(store, monkeypatch):
    assert cache_path(torch.device("cpu")) is None
    monkeypatch.setenv("BITPLAN_TUNED_DIR", "")
    assert cache_path(CUDA) is None
    tune, calls = tuner(CFG)
    tuned({}, "matmul", KEY, CUDA, tune)
    tuned({}, "matmul", KEY, CUDA, tune)
    assert len(calls) == 2 and not any(store.iterdir())


def test_two_tuners_share_a_file_not_their_keys(store):
    moe_cfg = dict(CFG, BLOCK_N=256)
    tuned({}, "matmul", KEY, CUDA, tuner(CFG)[0])
    tune, calls = tuner(moe_cfg)
    assert tuned({}, "moe", KEY, CUDA, tune) == moe_cfg
    assert len(calls) == 1


def test_another_processs_choices_written_meanwhile_are_kept(store):
    other = ("gemv", 1, 6144, 4096, 4, 128, False, torch.bfloat16, 0)
    tuned({}, "matmul", KEY, CUDA, tuner(CFG)[0])
    path = cache_path(CUDA)
    on_disk = json.loads(path.read_text())
    on_disk["matmul:" + "|".join(map(str, other))] = dict(CFG, SPLIT_K=32)  # another process, since this one read
    path.write_text(json.dumps(on_disk))
    third = ("gemv", 1, 28672, 4096, 4, 128, False, torch.bfloat16, 0)
    tuned({}, "matmul", third, CUDA, tuner(CFG)[0])
    assert len(json.loads(path.read_text())) == 3


def test_an_unreadable_file_is_timed_again_and_replaced(store, caplog):
    path = cache_path(CUDA)
    path.write_text("{not json")
    tune, calls = tuner(CFG)
    with caplog.at_level(logging.WARNING, logger="bitplan.kernels.tuned"):
        assert tuned({}, "matmul", KEY, CUDA, tune) == CFG
    assert len(calls) == 1
    assert caplog.text.count("ignoring the tuned configurations") == 1  # reported once, not again at the write
    assert json.loads(path.read_text()) == {"matmul:" + "|".join(map(str, KEY)): CFG}


def test_a_cache_folder_it_cannot_write_costs_a_warning_not_the_product(store, monkeypatch, caplog):
    blocker = store / "file"
    blocker.write_text("")
    monkeypatch.setenv("BITPLAN_TUNED_DIR", str(blocker / "below"))  # a folder under a file: never writable
    with caplog.at_level(logging.WARNING, logger="bitplan.kernels.tuned"):
        assert tuned({}, "matmul", KEY, CUDA, tuner(CFG)[0]) == CFG
    assert "could not keep the tuned configuration" in caplog.text
