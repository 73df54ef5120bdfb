"""End-to-end fixtures: the real server on SmolLM2-135M-Instruct, one per flag set for the whole test session
(start-up compiles: each server costs 20–40 s of CPU), started when a test first asks for it and stopped after
the last test that uses it. Modules whose flags do not change what another module tests share its server."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_server import API_KEYS, SHARED_SERVERS, running_server

# The wider limits of the main server: tool prompts are long (≤ 320 tokens, test_e2e_tools), and the 50 sampled
# structured answers run 16 at a time (more rows: more step shapes to compile, which costs more than it saves).
MAIN_FLAGS = ["--max_req_input_len", "320", "--max_req_total_len", "384", "--batch_max_tokens", "384",
              "--max_total_token_num", "3072", "--running_max_req_size", "16"]
# The keyed server (test_e2e_auth) also serves --beam_mode (test_e2e_groups' beam search): keys decide who is
# served, beam mode only what best_of > 1 means, so neither changes what the other's tests check.
KEYED_BEAM_FLAGS = ["--beam_mode", *(flag for key in API_KEYS for flag in ("--api_key", key))]
_last_user: dict[str, str] = {}  # shared server fixture → node id of the last selected test that uses it


def pytest_collection_finish(session):
    # Under pytest-xdist every worker collects every test, and tests/conftest.py sends all the modules that use
    # a shared server to one worker, which runs them in collection order: the last user is its last.
    for item in session.items:
        for name in SHARED_SERVERS:
            if name in getattr(item, "fixturenames", ()):
                _last_user[name] = item.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    for name, nodeid in _last_user.items():
        if nodeid == item.nodeid and name in getattr(item, "funcargs", {}):
            item.funcargs[name].stop()  # frees its memory now; the fixture's own stop at session end is a no-op


def _serve(model_dir: Path, flags: list[str], tmp_path_factory, name: str):
    yield from running_server(model_dir, flags, tmp_path_factory.mktemp(name) / "server.log")


@pytest.fixture(scope="session")
def lightllm_server(smollm2_dir, tmp_path_factory):
    """The server with LightLLM's format (the default) and the OpenAI routes, at the wider limits."""
    yield from _serve(smollm2_dir, MAIN_FLAGS, tmp_path_factory, "lightllm")


@pytest.fixture(scope="session")
def tgi_server(smollm2_dir, tmp_path_factory):
    """The server with --use_tgi_api, prompt logprobs and head truncation of long prompts."""
    yield from _serve(smollm2_dir, ["--use_tgi_api", "--return_all_prompt_logprobs", "--long_truncation_mode", "head"],
                      tmp_path_factory, "tgi")


@pytest.fixture(scope="session")
def keyed_beam_server(smollm2_dir, tmp_path_factory):
    """The server with two --api_key keys and --beam_mode."""
    yield from _serve(smollm2_dir, KEYED_BEAM_FLAGS, tmp_path_factory, "keyed_beam")


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_dir):
    """The PyTorch oracle (transformers, float32) on the served SmolLM2, loaded once for the modules that compare
    against it."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
