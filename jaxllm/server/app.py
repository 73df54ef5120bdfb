"""The Quart app: routes of every wire format (LightLLM or TGI on /generate, OpenAI on /v1), the common
routes (health, load, tokens, metrics), the --api_key check before each request and the error handlers that
turn every failure into a JSON reply.
"""

from __future__ import annotations

import asyncio
import logging
import time

from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from jaxllm.engine.client import EngineUnavailable
from jaxllm.engine.request import SamplingParams
from jaxllm.server import lightllm, openai, reward, tgi
from jaxllm.server.auth import ApiKeys
from jaxllm.server.errors import ApiError, lightllm_error_body, openai_error_body, tgi_error_body
from jaxllm.server.generation import Generation
from jaxllm.server.jsonio import json_response, parse_json
from jaxllm.server.state import ServerState
from jaxllm.server.validation import boolean, nullable, obj, require, string

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024  # a larger body is a 413
HEALTH_TIMEOUT_S = 50.0  # a slower health generation is a failure (answered before a 60 s probe gives up)
HEALTH_PROMPT = "Hello"
# The routes that generate text, refused by a reward model's server.
GENERATION_ROUTES = ("/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions")
LOAD_REFRESH_S = 1.0  # how often the load gauges are copied from the engine


async def read_json() -> object:
    """The request body as JSON (400 for bad bytes or syntax, 413 when over MAX_BODY_BYTES)."""
    return parse_json(await request.get_data(cache=False))


async def health_check(state: ServerState) -> bool:
    """A one-token greedy generation (a reward model: a score) through the engine, within HEALTH_TIMEOUT_S."""
    try:
        ids = state.tokenizer.encode(HEALTH_PROMPT)
        generation = Generation(state.engine, [ids], SamplingParams(max_new_tokens=1).normalized(),
                                scoring=state.args.use_reward_model)
        await asyncio.wait_for(generation.collect(), HEALTH_TIMEOUT_S)
        return True
    except Exception:
        log.exception("health check failed")
        return False


def create_app(state: ServerState) -> Quart:
    """The app serving `state.engine` with the routes LightLLM's api_server has, plus /v1."""
    app = Quart("jaxllm")
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES, RESPONSE_TIMEOUT=None, BODY_TIMEOUT=60)
    fmt = tgi if state.args.use_tgi_api else lightllm
    started = int(time.time())
    api_keys = ApiKeys(state.args.api_key)

    @app.before_request
    async def require_api_key() -> Response | None:
        refusal = api_keys.refusal(request.path, request.headers.get("Authorization"))
        if refusal is None:
            return None
        response = json_response(error_body(refusal), refusal.status)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.post("/generate")
    async def generate() -> Response:
        return await fmt.generate(state, await read_json())

    @app.post("/generate_stream")
    async def generate_stream() -> Response:
        return await fmt.generate_stream(state, await read_json())

    @app.post("/")
    async def compat_generate() -> Response:
        body = await read_json()
        stream = nullable(boolean)("stream", body.pop("stream", None)) if isinstance(body, dict) else None
        return await (fmt.generate_stream if stream else fmt.generate)(state, body)

    @app.before_request
    async def refuse_generation_on_a_reward_model() -> Response | None:
        if state.args.use_reward_model and request.method == "POST" and request.path in GENERATION_ROUTES:
            raise ApiError(400, f"{request.path}: this server runs a reward model (--use_reward_model), which "
                                "scores chats on /get_score and generates no text")
        return None

    @app.post("/get_score")
    async def get_score() -> Response:
        return await reward.get_score(state, await read_json())

    @app.route("/tokens", methods=["GET", "POST"])
    async def tokens() -> Response:
        body = obj("body", await read_json())
        text = require(body, "text", string)
        return json_response({"ntokens": len(state.tokenizer.encode(text))})

    @app.route("/health", methods=["GET", "HEAD"])
    @app.get("/healthz")
    async def health() -> Response:
        ok = await health_check(state)
        if request.method == "HEAD":
            return Response(b"", status=200 if ok else 503)
        return json_response({"message": "Ok"} if ok else {"message": "Error"}, 200 if ok else 503)

    @app.route("/liveness", methods=["GET", "POST"])
    @app.route("/readiness", methods=["GET", "POST"])
    async def alive() -> Response:
        return json_response({"status": "ok"})

    @app.get("/token_load")
    async def token_load() -> Response:
        return json_response({k: float(v) for k, v in state.engine.token_load().items()})

    @app.get("/metrics")
    async def metrics() -> Response:
        state.refresh_load()
        body, content_type = state.metrics.render(request.headers.get("Accept"))
        return Response(body, content_type=content_type)

    @app.before_serving
    async def start_load_gauges() -> None:
        # The load gauges follow the engine for the push gateway too, not only when /metrics is read.
        async def refresh() -> None:
            while True:
                try:
                    state.refresh_load()
                except Exception:
                    log.exception("could not read the engine's load")
                await asyncio.sleep(LOAD_REFRESH_S)

        app.extensions["jaxllm_load_task"] = asyncio.get_running_loop().create_task(refresh())

    @app.after_serving
    async def stop_load_gauges() -> None:
        app.extensions["jaxllm_load_task"].cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        return await openai.chat_completions(state, await read_json())

    @app.post("/v1/completions")
    async def completions() -> Response:
        return await openai.completions(state, await read_json())

    @app.get("/v1/models")
    async def models() -> Response:
        return json_response(openai.models(state, started))

    def error_body(err: ApiError) -> dict:
        if request.path.startswith("/v1/"):
            return openai_error_body(err)
        if state.args.use_tgi_api and request.path in ("/", "/generate", "/generate_stream"):
            return tgi_error_body(err)
        return lightllm_error_body(err)

    @app.errorhandler(ApiError)
    async def api_error(err: ApiError) -> Response:
        return json_response(error_body(err), err.status)

    @app.errorhandler(EngineUnavailable)
    async def engine_unavailable(err: EngineUnavailable) -> Response:
        return json_response(error_body(ApiError(503, f"the engine is not running: {err}")), 503)

    @app.errorhandler(HTTPException)
    async def http_error(err: HTTPException) -> Response:
        message = {413: f"body: larger than {MAX_BODY_BYTES} bytes"}.get(err.code, err.description)
        return json_response(error_body(ApiError(err.code or 500, message)), err.code or 500)

    @app.errorhandler(Exception)
    async def internal_error(err: Exception) -> Response:
        log.exception("unhandled error on %s", request.path)
        return json_response(error_body(ApiError(500, f"internal error: {type(err).__name__}")), 500)

    return app
