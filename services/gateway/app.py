"""The OpenAI-compatible HTTP API: routes, API keys, body limits, disconnects.

`create_app(gateway)` builds the FastAPI app around a `Gateway` (the tokenizer, the router,
the served model's name and limits). Handlers parse the body (protocol.py), tokenise, hand
the choices to the router (generation.py) and shape the answer (responses.py, streamed by
streams.py); every refusal is an `APIError` in OpenAI's error shape. The published OpenAPI
schema is openapi.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException

from services.common.completion import Completion
from services.common.metrics import GatewayMetrics, service_registry
from services.common.tokenizer import Tokenizer, TokenizerError
from services.common.wire.attention_aio import health_serving
from services.gateway import errors
from services.gateway.chat_output import OutputOptions
from services.gateway.discovery import MembershipWatch
from services.gateway.errors import APIError
from services.gateway.generation import Choices, Job
from services.gateway.http_metrics import CountResponses
from services.gateway.openapi import api_operation, publish_schema
from services.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    parse,
    sampling_params,
)
from services.gateway.reasoning import THINK_END, opens_thinking
from services.gateway.responses import (
    CHAT_SCHEMA,
    COMPLETION_SCHEMA,
    MODEL_LIST,
    MODEL_LIST_SCHEMA,
    Echo,
    Formatter,
    Header,
)
from services.gateway.router import Instance, Router
from services.gateway.streams import chat_stream, completion_stream
from services.gateway.structured import grammar_for
from services.gateway.tool_grammar import tool_grammar

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class GatewayConfig:
    served_model_name: str
    max_context_tokens: int  # config.json's max_position_embedding
    api_keys: frozenset[str] = frozenset()
    max_body_bytes: int = 1 << 20
    controller: str | None = None  # HOST:PORT whose gRPC health /ready checks
    reasoning_parser: bool = True  # split the thinking section out as reasoning_content


@dataclass
class Gateway:
    config: GatewayConfig
    tokenizer: Tokenizer
    router: Router
    # for /metrics
    registry: CollectorRegistry = field(default_factory=lambda: service_registry("gateway"))
    discovery: MembershipWatch | None = None  # finds the attention instances, if asked to


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def create_app(gateway: Gateway) -> FastAPI:
    config, tokenizer, router = gateway.config, gateway.tokenizer, gateway.router
    formatter = Formatter(tokenizer)
    think_end = tokenizer.encode(THINK_END)
    think_end_id = think_end[0] if len(think_end) == 1 else None  # one token, or text
    controller: list[grpc.aio.Channel] = []
    metrics = GatewayMetrics(gateway.registry)
    metrics.tpot_sla.set(router.tpot_sla_s)
    metrics.running.set_function(lambda: router.num_running)
    metrics.waiting.set_function(lambda: router.num_waiting)

    def watch_limit(instance: Instance, added: bool) -> None:
        if added:
            limit = metrics.concurrency_limit.labels(instance.address)
            limit.set_function(lambda i=instance: i.limit.limit)
        else:
            metrics.concurrency_limit.remove(instance.address)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        router.on_instance = watch_limit
        await router.start()
        if gateway.discovery is not None:
            await gateway.discovery.start()
        if config.controller:
            controller.append(grpc.aio.insecure_channel(config.controller))
        try:
            yield
        finally:
            if gateway.discovery is not None:
                await gateway.discovery.close()
            await router.close()
            for channel in controller:
                await channel.close()

    app = FastAPI(title="AFD", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(CountResponses, counter=metrics.http_requests, skip=frozenset({"/metrics"}))
    app.openapi = lambda: app.openapi_schema or publish_schema(app, bool(config.api_keys))
    v1 = api_operation(bool(config.api_keys))

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        body = APIError(err.status_code, str(err.detail), code=None).body()
        return JSONResponse(body, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, err: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        body = APIError(500, f"internal error: {type(err).__name__}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    def authorize(request: Request) -> None:
        if not config.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise errors.unauthorized(
                "no API key: send it as the header 'Authorization: Bearer YOUR_KEY'"
            )
        # As bytes: compare_digest refuses non-ASCII str (a TypeError, a 500), and the
        # header's str is its bytes read as latin-1.
        sent = key.strip().encode("latin-1")
        if not any(hmac.compare_digest(sent, k.encode()) for k in config.api_keys):
            raise errors.unauthorized("the API key is not valid: check it and send it again")

    async def read_body(request: Request) -> bytes:
        limit = config.max_body_bytes
        too_large = APIError(
            413,
            f"the request body exceeds {limit} bytes: send a shorter prompt",
            code="request_too_large",
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_large
        return bytes(body)

    def check_model(model: str | None) -> None:
        if model is not None and model != config.served_model_name:
            raise errors.model_not_found(model, config.served_model_name)

    def max_tokens_for(
        num_prompt: int, requested: int | None, default: int | None, param: str
    ) -> int:
        limit = config.max_context_tokens
        wanted = requested if requested is not None else default
        if wanted is None:
            wanted = limit - num_prompt
        if num_prompt + max(wanted, 1) > limit:
            raise errors.context_length_exceeded(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {num_prompt + wanted} tokens ({num_prompt} in the prompt, {wanted} "
                f"in the completion). Please reduce the length of the prompt or the completion.",
                param,
            )
        return wanted

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        # Unauthenticated, as Prometheus scrapes it; it holds no request content.
        return Response(generate_latest(gateway.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"description": "not ready: 'not_ready' names what"}})
    async def ready() -> JSONResponse:
        # Ready while some attention instance can serve (its health says so: it is NOT_SERVING
        # while it drains or its cluster re-forms). Whatever else is down is named, but one
        # instance down must not take every gateway out of its Service.
        checks: list[tuple[str, Awaitable[bool]]] = []
        for instance in router.instances:
            checks.append((f"attention {instance.address}", instance.client.serving(timeout_s=1.0)))
        for channel in controller:
            stub = health_pb2_grpc.HealthStub(channel)
            checks.append((f"controller {config.controller}", health_serving(stub, "", 1.0)))
        results = await asyncio.gather(*(check for _, check in checks))
        down = [name for (name, _), ok in zip(checks, results, strict=True) if not ok]
        if not any(results[: len(router.instances)]):
            return JSONResponse({"status": "not ready", "not_ready": down}, status_code=503)
        return JSONResponse({"status": "ready", **({"degraded": down} if down else {})})

    @app.get("/v1/models", **v1(None, MODEL_LIST_SCHEMA))
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {
            "object": MODEL_LIST,
            "data": [
                {
                    "id": config.served_model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "afd",
                    "max_model_len": config.max_context_tokens,
                }
            ],
        }

    @app.post("/v1/chat/completions", **v1(ChatCompletionRequest, CHAT_SCHEMA))
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        authorize(request)
        body: ChatCompletionRequest = parse(ChatCompletionRequest, await read_body(request))
        check_model(body.model)
        tools = body.template_tools()
        try:
            text = await asyncio.to_thread(
                tokenizer.apply_chat_template,
                body.template_messages(),
                True,
                tools,
                body.chat_template_kwargs,
            )
        except TokenizerError as err:
            raise errors.invalid(str(err), param="messages") from None
        prompt = await asyncio.to_thread(tokenizer.encode, text)
        options = OutputOptions(
            thinking=opens_thinking(text),
            reasoning=config.reasoning_parser,
            include_reasoning=body.include_reasoning,
            tools=tools,
            parallel_tool_calls=body.parallel_tool_calls,
        )
        max_tokens = max_tokens_for(len(prompt), body.requested_max_tokens(), None, "messages")
        vocab = tokenizer.vocab_size
        if body.forces_calls:
            grammar = tool_grammar(
                tools, body.named_function, body.parallel_tool_calls, options.thinking,
                think_end_id,
            )  # fmt: skip
        else:
            grammar = grammar_for(body.response_format, options.thinking, think_end_id)
        jobs = [
            Job(prompt, sampling_params(body, max_tokens, i, vocab, grammar)) for i in range(body.n)
        ]
        header = Header(f"chatcmpl-{uuid.uuid4().hex}", config.served_model_name)
        with_logprobs = body.logprobs
        choices = Choices(router, header.id, jobs, tokenizer, metrics, arrival)
        if body.stream:
            first = await first_delta(request, choices)
            stream = chat_stream(
                formatter, header, choices, first, body.n, with_logprobs, body.include_usage,
                len(prompt), options,
            )  # fmt: skip
            return StreamingResponse(stream, media_type="text/event-stream")
        states = await collect(request, choices, len(jobs))
        cached = states[0].num_cached_tokens  # the n choices share one prompt
        answer = formatter.chat_completion(
            header, states, with_logprobs, len(prompt), options, cached
        )
        return JSONResponse(answer)

    @app.post("/v1/completions", **v1(CompletionRequest, COMPLETION_SCHEMA))
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        authorize(request)
        body: CompletionRequest = parse(CompletionRequest, await read_body(request))
        check_model(body.model)
        prompts = await asyncio.to_thread(prompt_ids, tokenizer, body.prompt)
        requested = body.requested_max_tokens()
        # max_tokens 0 (echo only): the instance computes one token, which is dropped.
        scores_only = requested == 0
        grammar = grammar_for(body.response_format, False, None)
        scored = body.logprobs if body.echo else None  # the prompt's logprobs, for echo
        jobs = []
        for prompt in prompts:
            max_tokens = max_tokens_for(
                len(prompt), 1 if scores_only else requested, DEFAULT_COMPLETION_MAX_TOKENS,
                "prompt",
            )  # fmt: skip
            jobs += [
                Job(
                    prompt,
                    sampling_params(
                        body, max_tokens, j, tokenizer.vocab_size, grammar, prompt_logprobs=scored
                    ),
                )
                for j in range(body.n)
            ]
        header = Header(f"cmpl-{uuid.uuid4().hex}", config.served_model_name)
        with_logprobs = body.logprobs is not None
        num_prompt = sum(len(p) for p in prompts)
        echoes = None
        if body.echo:
            texts = await asyncio.to_thread(prompt_texts, tokenizer, body.prompt, prompts)
            echoes = [Echo(texts[i // body.n], prompts[i // body.n]) for i in range(len(jobs))]
        choices = Choices(router, header.id, jobs, tokenizer, metrics, arrival)
        if body.stream:
            first = await first_delta(request, choices)
            stream = completion_stream(
                formatter, header, choices, first, len(jobs), with_logprobs, body.include_usage,
                num_prompt, body.n, echoes, scores_only,
            )  # fmt: skip
            return StreamingResponse(stream, media_type="text/event-stream")
        states = await collect(request, choices, len(jobs))
        cached = sum(s.num_cached_tokens for s in states[:: body.n])  # once per prompt
        if scores_only:
            for state in states:
                state.text, state.token_ids, state.logprobs = "", [], []
                state.finish_reason = "length"
        answer = formatter.completion(header, states, with_logprobs, num_prompt, cached, echoes)
        return JSONResponse(answer)

    async def first_delta(request: Request, choices: Choices):
        """The first delta before any byte is sent, so a refusal is still an HTTP status."""
        try:
            return await until_disconnected(request, choices.next())
        except BaseException:
            await choices.close()
            raise

    async def collect(request: Request, choices: Choices, num: int) -> list[Completion]:
        async def run() -> list[Completion]:
            states = [Completion() for _ in range(num)]
            while (item := await choices.next()) is not None:
                states[item.index].add(item.delta)
            return states

        try:
            return await until_disconnected(request, run())
        finally:
            await choices.close()

    return app


def prompt_texts(tokenizer: Tokenizer, prompt: Any, ids: list[list[int]]) -> list[str]:
    """Each prompt as echo returns it: as the client wrote it, or its ids' text."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return [tokenizer.decode(p) for p in ids]


def prompt_ids(tokenizer: Tokenizer, prompt: str | list[Any]) -> list[list[int]]:
    """The token ids of each prompt of a completions request (BOS added to text prompts)."""
    if isinstance(prompt, str):
        prompts: Sequence[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = prompt
    if not prompts:
        raise errors.invalid("prompt must not be empty", param="prompt")
    result = []
    for p in prompts:
        ids = tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
        if not ids:
            raise errors.invalid("prompt must not be empty", param="prompt")
        bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise errors.invalid(
                f"prompt token id {bad[0]} is outside the vocabulary "
                f"(0..{tokenizer.vocab_size - 1})",
                param="prompt",
            )
        result.append(ids)
    return result


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or `ClientGone` (and `work` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone()
    finally:
        for pending in (task, watcher):
            pending.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
