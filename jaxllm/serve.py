"""`python -m jaxllm.serve`: flags → the engine core in its own process (weights loaded, steps compiled; see
jaxllm.engine.client) → the HTTP app served by uvicorn on --host/--port from this process, with the metrics
pusher and the stats logger beside it. With --health_monitor it runs the server under the supervisor of
jaxllm.monitor instead.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from typing import Sequence

from jaxllm import heap
from jaxllm.args import ServerArgs

log = logging.getLogger("jaxllm.serve")


def bind_address(host: str, port: int) -> str:
    """host:port as a URL writes it (IPv6 addresses in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def build_app(args: ServerArgs, engine, metrics):
    from jaxllm.server.app import create_app
    from jaxllm.server.state import ServerState

    return create_app(ServerState(engine, args, metrics))


def start_up(args: ServerArgs):
    """Metrics, the push gateway's pusher (its auth variables checked before the long load), the engine core's
    process (weights loaded, steps compiled) and the stats logger. Raises ValueError/FileNotFoundError with a
    clear reason."""
    from jaxllm.engine.client import EngineClient
    from jaxllm.metrics import Metrics, MetricsPusher, StatsLogger

    metrics = Metrics.from_args(args)
    pusher = MetricsPusher.from_args(args, metrics.registry)
    log.info("loading %s", args.model_dir)
    engine = EngineClient(args)
    # The HTTP app's modules (a second or more) import while the core loads: they serve only once it is ready.
    threading.Thread(target=importlib.import_module, args=("jaxllm.server.app",), name="jaxllm-import-app",
                     daemon=True).start()
    engine.start()
    stats = StatsLogger.from_args(args, engine.stats, metrics)
    return engine, metrics, [t for t in (pusher, stats) if t is not None]


def serve(args: ServerArgs, engine, metrics, background: list) -> None:
    """Serve until SIGINT/SIGTERM, then stop the background threads and the engine (an Engine, or an
    EngineClient: its core's process). uvicorn on uvloop with httptools, as LightLLM serves: at 512 streams
    its HTTP path costs ~20 % less of the frontend's one core per token than hypercorn's (docs/perf.md, session
    16), and the frontend's core is what a busy server's streams wait for."""
    import uvicorn

    app = build_app(args, engine, metrics)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, loop="uvloop", http="httptools", lifespan="on",
        log_config=None,  # through our logging set-up
        access_log=False,
        # Idle keep-alive connections outlive the clients' own pool expiry (httpx, and so the openai client: 5 s;
        # aiohttp: 15 s), so the client closes first: a request sent just as the server closed its connection is
        # reset, and clients do not retry a POST (seen in tests/e2e under load with a 5 s server timeout).
        timeout_keep_alive=75,
        timeout_graceful_shutdown=3,  # then open streams are cut (their requests aborted) and the engine stops
    )
    engine.start()
    for task in background:
        task.start()
    heap.freeze_startup_heap()  # this process's start-up objects out of the collector's scans (jaxllm/heap.py)
    log.info("serving on http://%s", bind_address(args.host, args.port))
    try:
        uvicorn.Server(config).run()
    finally:
        for task in background:
            task.stop()
        engine.stop()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ServerArgs.from_argv(argv)  # exits with code 2 and a one-line reason on bad flags
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.health_monitor:
        from jaxllm.monitor import Supervisor

        return Supervisor.for_server(argv, args).run()
    try:
        engine, metrics, background = start_up(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"jaxllm: {err}", file=sys.stderr)
        return 2
    serve(args, engine, metrics, background)
    return 0


if __name__ == "__main__":
    from jaxllm.without_torch import hide_torch

    hide_torch()
    sys.exit(main())
