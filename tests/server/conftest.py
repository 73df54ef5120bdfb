"""Fixtures of the HTTP-layer unit tests: SmolLM2's real tokenizer, flags, and the app over a ScriptedEngine."""

import pytest
from transformers import AutoTokenizer

from jaxllm.args import parse_args
from jaxllm.metrics import Metrics
from jaxllm.server.app import create_app
from jaxllm.server.state import ServerState
from scripted_engine import ScriptedEngine

SMALL_LIMITS = ["--max_req_input_len", "64", "--max_req_total_len", "96", "--max_total_token_num", "200"]


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)


@pytest.fixture
def make_state(smollm2_dir, tokenizer):
    """ServerState over a ScriptedEngine, for the given extra flags."""

    def make(*flags: str, delay_s: float = 0.0) -> ServerState:
        args = parse_args(["--model_dir", str(smollm2_dir), *SMALL_LIMITS, *flags])
        return ServerState(ScriptedEngine(tokenizer, args, delay_s=delay_s), args, Metrics.from_args(args))

    return make


@pytest.fixture
def make_client(make_state):
    """(Quart test client, state) for the given extra flags."""

    def make(*flags: str, delay_s: float = 0.0):
        state = make_state(*flags, delay_s=delay_s)
        return create_app(state).test_client(), state

    return make
