"""The streamed answers (server-sent events) of both generation endpoints: each choice's
pieces as chunks, in the order the instances produce them, then usage and `[DONE]`. A choice
refused mid-stream ends the stream with its error; the stream always closes its choices.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from services.gateway.chat_output import ChatOutput, OutputOptions
from services.gateway.errors import APIError
from services.gateway.generation import Choices
from services.gateway.responses import (
    CHAT_CHUNK,
    COMPLETION,
    Echo,
    Formatter,
    Header,
    joined,
    sse,
    text_end,
)


async def chat_stream(
    formatter: Formatter,
    header: Header,
    choices: Choices,
    first,
    num: int,
    with_logprobs: bool,
    include_usage: bool,
    num_prompt: int,
    options: OutputOptions,
) -> AsyncIterator[bytes]:
    try:
        outputs = [ChatOutput(options) for _ in range(num)]
        cached = 0  # the n choices share one prompt: choice 0's count
        for index in range(num):
            role = {"role": "assistant", "content": ""}
            yield sse(formatter.chat_chunk(header, index, role))
        num_completion, item = 0, first
        while item is not None:
            delta, output = item.delta, outputs[item.index]
            tokens = delta.output
            num_completion += len(tokens.new_token_ids)
            if item.index == 0:
                cached = tokens.num_cached_tokens or cached
            logprobs = list(tokens.new_logprobs) if with_logprobs else None
            said = output.feed(delta.text)
            if said or logprobs:
                yield sse(formatter.chat_chunk(header, item.index, said, logprobs))
            if delta.finished:
                if said := output.finish():
                    yield sse(formatter.chat_chunk(header, item.index, said))
                reason = output.finish_reason(delta.finish_reason)
                yield sse(formatter.chat_chunk(header, item.index, {}, None, reason))
            try:
                item = await choices.next()
            except APIError as err:
                yield sse(err.body())
                break
        if include_usage:
            yield sse(formatter.usage_chunk(header, CHAT_CHUNK, num_prompt, num_completion, cached))
        yield sse("[DONE]")
    finally:
        await choices.close()


async def completion_stream(
    formatter: Formatter,
    header: Header,
    choices: Choices,
    first,
    num: int,
    with_logprobs: bool,
    include_usage: bool,
    num_prompt: int,
    n: int,
    echoes: list[Echo] | None = None,
    scores_only: bool = False,
) -> AsyncIterator[bytes]:
    """`echoes`: each choice's prompt, sent before its first piece; `scores_only`:
    max_tokens 0, the generated token dropped."""
    try:
        offsets, cached = [0] * num, [0] * num
        echoed = [echoes is None] * num
        num_completion, item = 0, first
        while item is not None:
            delta, index = item.delta, item.index
            tokens = delta.output
            cached[index] = tokens.num_cached_tokens or cached[index]
            text, scored = delta.text, list(tokens.new_logprobs)
            reason = delta.finish_reason if delta.finished else None
            if scores_only:
                text, scored, reason = "", [], "length" if delta.finished else None
            num_completion += 0 if scores_only else len(tokens.new_token_ids)
            head, before = "", None
            if not echoed[index]:  # the prompt first, once (it comes with the first token)
                echoed[index] = True
                head = echoes[index].text
                if with_logprobs:
                    before = formatter.prompt_logprobs(echoes[index].ids, tokens.prompt_logprobs)
                    offsets[index] = text_end(before)
            logprobs = None
            if with_logprobs:
                logprobs = formatter.completion_logprobs(scored, offsets[index])
                if before is not None:
                    logprobs = joined(before, logprobs)
            offsets[index] += len(text)
            if head or text or reason or (with_logprobs and scored):
                chunk = formatter.completion_chunk(header, index, head + text, logprobs, reason)
                yield sse(chunk)
            try:
                item = await choices.next()
            except APIError as err:
                yield sse(err.body())
                break
        if include_usage:
            prompt_cached = sum(cached[::n])  # once per prompt
            yield sse(
                formatter.usage_chunk(header, COMPLETION, num_prompt, num_completion, prompt_cached)
            )
        yield sse("[DONE]")
    finally:
        await choices.close()
