"""`python -m jaxllm.serve`: flags → the engine core in its own process (weights loaded, steps compiled; see
jaxllm.engine.client) → the HTTP app served by hypercorn on --host/--port from this process, with the metrics
pusher and the stats logger beside it. With --health_monitor it runs the server under the supervisor of
jaxllm.monitor instead.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
import threading
from typing import Sequence

from jaxllm.args import ServerArgs

log = logging.getLogger("jaxllm.serve")


def bind_address(host: str, port: int) -> str:
    """hypercorn's bind string (IPv6 addresses in brackets)."""
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
    EngineClient: its core's process)."""
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    app = build_app(args, engine, metrics)
    config = Config()
    config.bind = [bind_address(args.host, args.port)]
    config.errorlog = logging.getLogger("hypercorn.error")  # through our logging set-up, once
    # Idle keep-alive connections outlive the clients' own pool expiry (httpx, and so the openai client: 5 s;
    # aiohttp: 15 s), so the client closes first. With hypercorn's default of 5 s a request sent just as the server
    # closed its connection was reset, and clients do not retry a POST (seen in tests/e2e under load).
    config.keep_alive_timeout = 75
    engine.start()
    for task in background:
        task.start()
    log.info("serving on http://%s", config.bind[0])
    try:
        asyncio.run(hypercorn_serve(app, config))
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
