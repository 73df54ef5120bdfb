"""Helpers of the HTTP-layer unit tests: run a coroutine, POST JSON to the Quart test client."""

import asyncio
import json


def run(coro):
    return asyncio.run(coro)


async def post_json(client, path, body, *, raw=False):
    """POST `body` as JSON; returns (status, decoded JSON, or the raw bytes with `raw`)."""
    response = await client.post(path, json=body)
    data = await response.get_data()
    return response.status_code, data if raw else json.loads(data)
