"""The real server (`python -m jaxllm.serve`) as a subprocess on a free loopback port, and small HTTP helpers
for its routes (the standard library only, so the tests see the bytes the server sends)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path
from typing import Iterator

from jaxllm.child import die_with_parent, wait_or_kill

# Small limits: few step shapes to compile, quick answers on CPU.
SERVER_FLAGS = [
    "--data_type", "float32",
    "--max_total_token_num", "1024",
    "--batch_max_tokens", "128",
    "--max_req_input_len", "96",
    "--max_req_total_len", "128",
    "--running_max_req_size", "7",
    "--log_stats_interval", "5",
]
START_TIMEOUT_S = 600
API_KEYS = ["e2e-key-one", "e2e-key-two"]  # the keyed server's (tests/e2e/conftest.py)
# Fixtures (tests/e2e/conftest.py) of servers shared by several modules: each is stopped once the last test using
# it is done, and a parallel run (tests/conftest.py) keeps their modules on one worker.
SHARED_SERVERS = ("lightllm_server", "tgi_server", "keyed_beam_server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `python -m jaxllm.serve`, with small helpers for its routes."""

    def __init__(self, model_dir: Path, flags: list[str], log_path: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)  # the test session's 8 fake devices are not the server's business
        env["JAX_PLATFORMS"] = "cpu"
        # Step shapes compile when a test first meets them, not all at start-up: a test module meets few of them
        # (test_e2e_token_healing on one core: 108 s with the start-up set, 59 s without).
        env.setdefault("JAXLLM_WARMUP_SHAPES", "0")
        command = [sys.executable, "-m", "jaxllm.serve", "--model_dir", str(model_dir), "--port", str(self.port),
                   *SERVER_FLAGS, *flags]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=die_with_parent)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.get("/liveness")[0] == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the server did not start within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server (a no-op once stopped)."""
        if self._log.closed:
            return
        self.proc.terminate()
        wait_or_kill(self.proc, 30)
        self._log.close()

    def request(self, method: str, path: str, body=None, *, raw: bytes | None = None, headers=None,
                timeout: float = 120) -> tuple[int, bytes, Message]:
        """(status, body bytes, headers) of one request; `body` is sent as JSON, `raw` as is."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), r.headers
        except urllib.error.HTTPError as err:
            return err.code, err.read(), err.headers

    def get(self, path: str) -> tuple[int, object]:
        status, data, _ = self.request("GET", path)
        return status, json.loads(data)

    def post(self, path: str, body=None, **kw) -> tuple[int, object]:
        status, data, _ = self.request("POST", path, body, **kw)
        return status, json.loads(data)

    def stream(self, path: str, body) -> tuple[int, list[dict]]:
        """A streamed POST: (status, the JSON of every `data:` event but [DONE])."""
        status, data, headers = self.request("POST", path, body)
        if status != 200:
            return status, [json.loads(data)]
        assert headers["Content-Type"].startswith("text/event-stream")
        events = []
        for chunk in data.decode().split("\n\n"):
            if chunk and chunk.removeprefix("data:").strip() != "[DONE]":
                assert chunk.startswith("data:"), chunk
                events.append(json.loads(chunk.removeprefix("data:")))
        return status, events


def running_server(model_dir: Path, flags: list[str], log_path: Path) -> Iterator[Server]:
    """For a fixture to `yield from`: the server with these flags, ready, then stopped."""
    server = Server(model_dir, flags, log_path)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def chat_text(tokenizer, user: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)


def core_pid(server) -> int:
    """The server's engine-core process (from its log)."""
    match = re.search(r"engine core ready \(pid (\d+)\)", server.log_path.read_text(errors="replace"))
    assert match, server.log_tail()
    return int(match.group(1))


def child_pids(parent: int, module: str) -> list[int]:
    """The processes `parent` started as `python -m module`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid == parent and module.encode() in command:
            found.append(int(stat.parent.name))
    return found


def kill_mid_stream(server, inputs: str, parameters: dict, pid: int) -> dict:
    """Stream a LightLLM /generate_stream; once under way (its first event read), SIGKILL `pid`; returns the
    stream's last event."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/generate_stream", json.dumps({"inputs": inputs, "parameters": parameters}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data:")  # under way
    os.kill(pid, signal.SIGKILL)
    lines = [line for line in response.read().split(b"\n") if line.startswith(b"data:")]
    conn.close()
    return json.loads(lines[-1][len(b"data:"):])
