"""Engine test fixtures: a tiny random Llama config on disk and engines built from it (float32, CPU)."""

import json

import pytest

from engine_helpers import TINY_CONFIG, make_engine


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    """A started engine with room for every test's requests (no preemption)."""
    engine = make_engine(tiny_model_dir, max_total_token_num=512)
    with engine:
        yield engine
