"""End-to-end fixtures: the real server on SmolLM2-135M-Instruct, started once per test session per flag set
(start-up compiles), stopped at the end of the session."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_server import running_server


def _serve(model_dir: Path, flags: list[str], tmp_path_factory, name: str):
    yield from running_server(model_dir, flags, tmp_path_factory.mktemp(name) / "server.log")


@pytest.fixture(scope="session")
def lightllm_server(smollm2_dir, tmp_path_factory):
    """The server with LightLLM's format (the default) and the OpenAI routes."""
    yield from _serve(smollm2_dir, [], tmp_path_factory, "lightllm")


@pytest.fixture(scope="session")
def tgi_server(smollm2_dir, tmp_path_factory):
    """The server with --use_tgi_api, prompt logprobs and head truncation of long prompts."""
    yield from _serve(smollm2_dir, ["--use_tgi_api", "--return_all_prompt_logprobs", "--long_truncation_mode", "head"],
                      tmp_path_factory, "tgi")


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
