"""Importing jaxllm picks PJRT's TFRT GPU client for the process, unless the user chose a client beforehand."""

import os
import subprocess
import sys

PROBE = "import os, jaxllm; print(os.environ['XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT'])"


def _client_choice(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_importing_jaxllm_picks_the_tfrt_gpu_client():
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT"}
    assert _client_choice(env) == "1"


def test_a_users_choice_of_client_is_kept():
    assert _client_choice({**os.environ, "XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT": "0"}) == "0"
