"""One streamed request to an OpenAI-compatible server, timed token by token.

Every content chunk's arrival time is recorded on the client's clock (`time.perf_counter`).
The server's `usage` (asked for with `stream_options.include_usage`) gives the token counts;
a server that sends no usage is counted one token per content chunk, which is what servers
that stream each token as it is sampled (vLLM, SGLang, TGI, this one) send.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from services.bench.workload import BenchRequest

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class RequestResult:
    start: float  # perf_counter seconds: when the request was sent
    end: float = 0.0  # when the stream ended (or failed)
    chunk_times: list[float] = field(default_factory=list)  # each content chunk's arrival
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""  # empty when the request succeeded
    target_output_len: int = 0

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.chunk_times)


@dataclass(frozen=True)
class Target:
    """Where and how to send: the server, the model name and the request body's extras."""

    base_url: str  # http://host:port, without /v1
    model: str
    endpoint: str = "completions"
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0

    def url(self) -> str:
        return self.base_url.rstrip("/") + ENDPOINTS[self.endpoint]

    def body(self, request: BenchRequest) -> dict:
        body = {
            "model": self.model,
            "max_tokens": request.output_len,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True  # vLLM, SGLang and AFD honour it; others ignore it
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt
        return body

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


async def send(client: httpx.AsyncClient, target: Target, request: BenchRequest) -> RequestResult:
    result = RequestResult(time.perf_counter(), target_output_len=request.output_len)
    try:
        async with client.stream(
            "POST", target.url(), json=target.body(request), headers=target.headers()
        ) as response:
            if response.status_code != 200:
                result.error = _http_error(response.status_code, await response.aread())
            else:
                await _read_stream(response, result)
    except httpx.HTTPError as err:
        result.error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    result.end = time.perf_counter()
    if not result.error and not result.chunk_times:
        result.error = "the stream ended without any content"
    if result.output_tokens == 0:
        result.output_tokens = len(result.chunk_times)
    result.prompt_tokens = result.prompt_tokens or request.input_len
    return result


async def _read_stream(response: httpx.Response, result: RequestResult) -> None:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        now = time.perf_counter()
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            result.error = f"the server sent an event that is not JSON: {data[:80]!r}"
            return
        if "error" in chunk:
            error = chunk["error"]
            result.error = error.get("message", str(error)) if isinstance(error, dict) else error
            return
        if _has_content(chunk):
            result.chunk_times.append(now)
        usage = chunk.get("usage")
        if usage:
            result.prompt_tokens = usage.get("prompt_tokens") or 0
            result.output_tokens = usage.get("completion_tokens") or 0


def _has_content(chunk: dict) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("reasoning_content"):
            return True
    return False


def _http_error(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")[:200]
    return f"HTTP {status}: {message}"
