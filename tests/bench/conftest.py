"""What the bench scripts' end-to-end tests share: a store holding a tiny GPTQ profile."""

from __future__ import annotations

import pytest


@pytest.fixture
def gptq_store(tiny_checkpoint, text_file, tmp_path):
    """`(db, profile)`: a SQLite store in `tmp_path` holding the tiny Llama's GPTQ profile (options 2/4/8
    bits, fisher estimator, 128 calibration tokens of `text_file`)."""
    from bitplan.db.store import Store
    from bitplan.db.types import Quantizer, parse_options
    from bitplan.profiler.model import load_model
    from bitplan.profiler.profile import profile_model

    db = str(tmp_path / "bitplan.db")
    loaded = load_model(str(tiny_checkpoint))
    profile = Store(db).save_profile(profile_model(loaded, parse_options("2,4,8"), calib=str(text_file), n_tokens=128,
                                                   seq_len=64, quantizer=Quantizer(method="gptq"),
                                                   estimator="fisher", progress=False))
    return db, profile
