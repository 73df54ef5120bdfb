"""The --health_monitor supervisor against a small stand-in server process (an HTTP server whose /health
fails on cue): restart after failed probes, restart after an exit, back-off and giving up, flags passed on."""

import dataclasses
import sys
import threading
import time

import portpicker

from jaxllm.args import parse_args
from jaxllm.monitor import MonitorConfig, Supervisor, probe

CHILD = '''
import http.server, pathlib, sys
port, healthy_for, log = int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3])
log.write_text(log.read_text() + "start\\n" if log.exists() else "start\\n")
served = 0
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global served
        served += 1
        ok = healthy_for < 0 or served <= healthy_for
        self.send_response(200 if ok else 503)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''

FAST = MonitorConfig(interval_s=0.05, timeout_s=2.0, failures=3, startup_poll_s=0.05, startup_timeout_s=20.0,
                     backoff_s=0.01, backoff_max_s=0.05, max_failed_starts=3, stop_timeout_s=5.0)


def supervise_until(tmp_path, healthy_for: int, done, *, script: str = CHILD, config: MonitorConfig = FAST,
                    seconds: float = 60.0):
    port = portpicker.pick_unused_port()
    child = tmp_path / "child.py"
    child.write_text(script)
    log = tmp_path / "starts.log"
    sup = Supervisor([sys.executable, str(child), str(port), str(healthy_for), str(log)],
                     f"http://127.0.0.1:{port}/health", config)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", sup.run()))
    thread.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and thread.is_alive() and not done(sup):
        time.sleep(0.05)
    sup.stop()
    thread.join(30)
    return sup, result.get("code"), port


def test_restarts_after_three_failed_probes(tmp_path):
    # Healthy for 2 probes (start-up + 1), then 503 forever: every child is replaced after 3 failures.
    log = tmp_path / "starts.log"
    sup, code, port = supervise_until(tmp_path, 2, lambda s: log.exists() and log.read_text().count("start") >= 3)
    assert code == 0 and sup.starts >= 3 and log.read_text().count("start") >= 3
    assert probe(f"http://127.0.0.1:{port}/health", 1.0) is not None  # the last child was stopped with it


def test_a_healthy_child_is_left_alone(tmp_path):
    # ~40 probes at 0.05 s intervals, all healthy
    sup, code, port = supervise_until(tmp_path, -1, lambda s: False, seconds=2.0)
    assert code == 0 and sup.starts == 1


def test_gives_up_when_the_server_never_starts(tmp_path):
    sup, code, _ = supervise_until(tmp_path, 0, lambda s: False, script="import sys; sys.exit(3)")
    assert code == 1 and sup.starts == FAST.max_failed_starts


def test_for_server_passes_the_same_flags_without_the_monitor():
    argv = ["--model_dir", "m", "--port", "8123", "--health_monitor", "--tp", "1"]
    sup = Supervisor.for_server(argv, parse_args(argv))
    assert sup.command[1:] == ["-m", "jaxllm.serve", "--model_dir", "m", "--port", "8123", "--tp", "1"]
    assert sup.health_url == "http://127.0.0.1:8123/health"
    assert sup.config.interval_s == 88.0 and sup.config.failures == 3


def test_api_keys_reach_the_child_but_not_the_log(caplog):
    argv = ["--model_dir", "m", "--api_key", "s3cret-1", "--health_monitor", "--api_key=s3cret-2"]
    sup = Supervisor.for_server(argv, parse_args(argv))
    assert sup.command[3:] == ["--model_dir", "m", "--api_key", "s3cret-1", "--api_key=s3cret-2"]
    assert sup.shown_command()[3:] == ["--model_dir", "m", "--api_key", "***", "--api_key=***"]
    sup.command = [sys.executable, "-c", "import sys; sys.exit(3)", *sup.command[3:]]
    sup.config = dataclasses.replace(FAST, max_failed_starts=1)
    codes = []
    with caplog.at_level("INFO", logger="jaxllm.monitor"):
        thread = threading.Thread(target=lambda: codes.append(sup.run()))  # not the main thread: no signal handlers
        thread.start()
        thread.join(30)
    assert codes == [1]
    assert "--api_key ***" in caplog.text and "s3cret" not in caplog.text
