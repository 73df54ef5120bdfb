"""`python -m jaxllm.serve` start-up: clear one-line errors and exit code 2 before serving; bind addresses."""

import os
import subprocess
import sys

import pytest

from jaxllm.serve import bind_address


@pytest.mark.parametrize("flags, message", [
    (["--model_dir", "/nonexistent/model"], "jaxllm: no config.json in /nonexistent/model"),
    (["--model_dir", "/nonexistent/model", "--metric_gateway", "127.0.0.1:9", "--enable_monitor_auth"],
     "jaxllm: --enable_monitor_auth needs the push gateway's user and password"),
])
def test_start_up_errors_exit_2_with_the_reason(flags, message):
    env = {k: v for k, v in os.environ.items() if k not in ("USERNAME", "PASSWORD", "XLA_FLAGS")}
    done = subprocess.run([sys.executable, "-m", "jaxllm.serve", *flags, "--port", "1"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr


def test_bind_address():
    assert bind_address("127.0.0.1", 8000) == "127.0.0.1:8000"
    assert bind_address("::1", 8000) == "[::1]:8000"
    assert bind_address("0.0.0.0", 80) == "0.0.0.0:80"
