"""--health_monitor: run the server as a child process with the same flags, probe its GET /health, and restart
it (logging why) after 3 failed probes in a row or when it exits, waiting longer after each failed start.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Sequence

from jaxllm.child import wait_or_kill

log = logging.getLogger("jaxllm.monitor")


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    """LightLLM's probe timings (HEALTH_CHECK_INTERVAL_SECONDS, default 88 s; 60 s timeout; 3 failures)."""

    interval_s: float = 88.0  # between probes of a serving child
    timeout_s: float = 60.0  # one probe
    failures: int = 3  # failed probes in a row that restart the child
    startup_poll_s: float = 2.0  # probes while the child loads and compiles
    startup_timeout_s: float = 3600.0  # a child not healthy by then is restarted
    backoff_s: float = 1.0  # wait before the first restart; doubles per failed start
    backoff_max_s: float = 60.0
    max_failed_starts: int = 5  # children in a row that never became healthy: give up
    stop_timeout_s: float = 20.0  # SIGTERM → SIGKILL

    @classmethod
    def from_env(cls, environ=os.environ) -> "MonitorConfig":
        return cls(interval_s=float(environ.get("HEALTH_CHECK_INTERVAL_SECONDS", cls.interval_s)))


def probe(url: str, timeout_s: float) -> str | None:
    """None if GET `url` answers 200, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return None if response.status == 200 else f"status {response.status}"
    except urllib.error.HTTPError as err:
        return f"status {err.code}"
    except (urllib.error.URLError, OSError) as err:
        return f"{type(err).__name__}: {getattr(err, 'reason', err)}"


class Supervisor:
    """Keeps one healthy child running `command`; run() returns when stopped by a signal (0) or when
    `max_failed_starts` children in a row never became healthy (1)."""

    def __init__(self, command: Sequence[str], health_url: str, config: MonitorConfig = MonitorConfig(),
                 secrets: Sequence[str] = ()):
        self.command = list(command)
        self.secrets = frozenset(secrets)  # values of the command never logged (--api_key)
        self.health_url = health_url
        self.config = config
        self.starts = 0  # children started
        self.child: subprocess.Popen | None = None
        self._stop = threading.Event()

    @classmethod
    def for_server(cls, argv: Sequence[str], args) -> "Supervisor":
        """Supervise `python -m jaxllm.serve` with the same flags, less --health_monitor."""
        flags = [a for a in argv if not (len(a) > 2 and "--health_monitor".startswith(a))]  # argparse abbreviates
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        host = f"[{host}]" if ":" in host else host
        return cls([sys.executable, "-m", "jaxllm.serve", *flags], f"http://{host}:{args.port}/health",
                   MonitorConfig.from_env(), secrets=args.api_key)

    def shown_command(self) -> list[str]:
        """The command as logged: each secret, alone (`--api_key KEY`) or after `=` (`--api_key=KEY`), as ***."""
        shown = []
        for arg in self.command:
            flag, eq, value = arg.partition("=")
            if arg in self.secrets:
                arg = "***"
            elif eq and flag.startswith("--") and value in self.secrets:
                arg = f"{flag}=***"
            shown.append(arg)
        return shown

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if threading.current_thread() is threading.main_thread():
                signal.signal(sig, lambda *_: self.stop())
        failed_starts = 0
        try:
            while not self._stop.is_set():
                healthy, why = self._run_child()
                if self._stop.is_set():
                    break
                failed_starts = 0 if healthy else failed_starts + 1
                if failed_starts >= self.config.max_failed_starts:
                    log.error("the server failed to start %d times in a row (%s); giving up", failed_starts, why)
                    return 1
                delay = min(self.config.backoff_s * 2 ** max(failed_starts - 1, 0), self.config.backoff_max_s)
                log.warning("restarting the server in %.1f s: %s", delay, why)
                self._stop.wait(delay)
        finally:
            self._end_child()
        return 0

    def _run_child(self) -> tuple[bool, str]:
        """Start a child and watch it; returns (whether it became healthy, why it is being replaced)."""
        self.starts += 1
        log.info("starting the server (start %d): %s", self.starts, " ".join(self.shown_command()))
        self.child = subprocess.Popen(self.command)
        try:
            why = self._wait_healthy()
            if why is not None:
                return False, why
            log.info("the server is healthy")
            return True, self._watch()
        finally:
            self._end_child()

    def _exited(self) -> str | None:
        code = self.child.poll()
        return None if code is None else f"the server exited with code {code}"

    def _wait_healthy(self) -> str | None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while not self._stop.is_set():
            if (why := self._exited()) is not None:
                return why
            if probe(self.health_url, self.config.timeout_s) is None:
                return None
            if time.monotonic() > deadline:
                return f"not healthy {self.config.startup_timeout_s:.0f} s after start"
            self._stop.wait(self.config.startup_poll_s)
        return "stopping"

    def _watch(self) -> str:
        failures: list[str] = []
        while not self._stop.wait(self.config.interval_s):
            if (why := self._exited()) is not None:
                return why
            reason = probe(self.health_url, self.config.timeout_s)
            if reason is None:
                failures.clear()
                continue
            failures.append(reason)
            log.warning("health probe %d/%d failed: %s", len(failures), self.config.failures, reason)
            if len(failures) >= self.config.failures:
                return f"{len(failures)} health probes failed in a row ({'; '.join(failures)})"
        return "stopping"

    def _end_child(self) -> None:
        child, self.child = self.child, None
        if child is None or child.poll() is not None:
            return
        child.terminate()
        if wait_or_kill(child, self.config.stop_timeout_s):
            log.warning("the server did not stop within %.0f s; it was killed", self.config.stop_timeout_s)
