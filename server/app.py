"""The OpenAI-compatible HTTP server: FastAPI routes over an AsyncEngine, and the `longserve serve` command.

Request path: authorise -> read the body (size limit) -> parse and validate (strict pydantic) -> check the
model name and unsupported fields -> the grammar (response_format, or a required tool call) -> tokenize (tools
through the chat template) -> build SamplingParams -> engine.validate (token ids, context length, grammar
compiled; the one check, the engine trusts it) -> capacity check -> generate -> tool calls parsed out of the
output when tools are in play. Everything that can be refused is refused before the first engine step, with
its 4xx. A streaming response starts only when the first tokens exist, so an error up to then is still an
HTTP status; a failure after that is an SSE error event, then the stream closes.

A client that disconnects (watched on the ASGI receive channel, for streaming and non-streaming requests
alike) cancels the request's tasks, which aborts it in the engine and frees its KV blocks at once.

Importing this module loads no model and no torch; `run` builds the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import json
import math
import logging
import os
import signal
import threading
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from longserve import __version__

from ..engine.errors import EngineError, RequestError
from ..engine.sampling_params import SamplingParams
from ..engine.sequence import CompletionOutput, RequestOutput
from ..engine.structured_output import StructuredOutput
from .errors import APIError, error_response, from_exception, install_handlers, validation_error
from .metrics import ServerMetrics
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                       SamplingFields, TokenizeRequest, conversation)
from .tool_calls import PARSERS, parser_for_checkpoint

log = logging.getLogger("longserve.server")

DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024  # a 1M-token prompt as text or token ids fits
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left
LONG_TEXT_CHARS = 20_000  # longer prompts are tokenized in a worker thread so the event loop stays responsive
LONG_PROMPT_TOKENS = 100_000  # longer prompts are validated in a worker thread, likewise


class ClientDisconnected(Exception):
    """The client went away; nothing more is sent."""


# ----------------------------------------------------------------------------------------------------------
# Running requests


class Generation:
    """One engine request per prompt, run concurrently; ``next()`` yields (prompt index, snapshot) as they
    come and None when all finished. Raises ClientDisconnected if the client leaves, or the request's error.

    ``close()`` cancels whatever still runs, which aborts those requests in the engine."""

    _FINISHED = object()
    _DISCONNECTED = object()

    def __init__(self, state: "ServerState", request: Request, prompts: list[list[int]], params: SamplingParams,
                 request_id: str):
        self.state = state
        self.queue: asyncio.Queue = asyncio.Queue()
        self.remaining = len(prompts)
        self.tasks = [asyncio.create_task(self._pump(i, ids, params, f"{request_id}-{i}"))
                      for i, ids in enumerate(prompts)]
        self.watcher = asyncio.create_task(self._watch(request))
        state.generations.add(self)

    async def _pump(self, index: int, prompt: list[int], params: SamplingParams, request_id: str) -> None:
        tracker = self.state.metrics.tracker()
        try:
            async for out in self.state.engine.generate(prompt, params, request_id, validated=True):
                tracker.observe(out)
                self.queue.put_nowait((index, out))
            self.queue.put_nowait((index, self._FINISHED))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # delivered to the consumer, which answers with the error
            self.queue.put_nowait((index, e))
        finally:
            tracker.close()

    async def _watch(self, request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.queue.put_nowait((-1, self._DISCONNECTED))
                return

    def fail(self, error: Exception) -> None:
        """Make the consumer stop with this error (server shutdown)."""
        self.queue.put_nowait((-1, error))

    async def next(self) -> tuple[int, RequestOutput] | None:
        while self.remaining:
            index, item = await self.queue.get()
            if item is self._FINISHED:
                self.remaining -= 1
                continue
            if item is self._DISCONNECTED:
                raise ClientDisconnected()
            if isinstance(item, BaseException):
                raise item
            return index, item
        return None

    async def close(self) -> None:
        self.state.generations.discard(self)
        pending = [t for t in (*self.tasks, self.watcher) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its generator (so its finally aborts the requests),
    also when sending fails half-way."""

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def sse(data: dict | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


# ----------------------------------------------------------------------------------------------------------
# Server state and helpers


class ServerState:
    def __init__(self, engine, api_key: str | None, served_model_name: str | None, max_request_bytes: int,
                 tool_call_parser: str | None = None):
        from ..engine.llm import apply_chat_template  # the engine is loaded by now; keeps the import cheap

        self.engine = engine
        self.apply_chat_template = apply_chat_template
        self.tokenizer = engine.tokenizer
        self.grammars = getattr(engine, "grammars", None)  # compiles structured outputs (GrammarCache)
        self.vocab_size: int | None = getattr(engine, "vocab_size", None)
        template = getattr(self.tokenizer, "chat_template", None)
        self.tool_parser = PARSERS[tool_call_parser] if tool_call_parser else parser_for_checkpoint(template)
        self.template_renders_tools = isinstance(template, str) and "tools" in template
        self.model_name = served_model_name or engine.model_name
        self.accepted_names = {self.model_name, engine.model_name}
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.metrics = ServerMetrics(engine, self.model_name)
        self.created = int(time.time())
        self.generations: set[Generation] = set()
        self.draining = False

    def fail_all(self, message: str) -> None:
        for generation in list(self.generations):
            generation.fail(EngineError(message))

    # -- request checks --------------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Missing or incorrect API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        limit = self.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"The request body is {int(declared)} bytes; this server accepts at most {limit} "
                                "(--max-request-bytes).", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"The request body exceeds {limit} bytes (--max-request-bytes).",
                               code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse(self, request: Request, model: type[BaseModel]) -> Any:
        self.authorize(request)
        raw = await self.read_body(request)
        try:
            parsed = model.model_validate_json(raw)
        except ValidationError as e:
            errors = e.errors(include_url=False)
            if errors and errors[0].get("type") == "json_invalid":
                raise APIError(400, f"The request body is not valid JSON: {errors[0].get('msg')}",
                               code="invalid_json") from None
            raise validation_error([_clean(err) for err in errors]) from None
        if getattr(parsed, "model", None) is not None and parsed.model not in self.accepted_names:
            raise APIError(404, f"The model `{parsed.model}` does not exist. This server serves "
                                f"`{self.model_name}`.", param="model", code="model_not_found")
        return parsed

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, "This model has no tokenizer; send the prompt as token ids.", param="prompt")

        def run() -> list[int]:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

        if len(text) > LONG_TEXT_CHARS:
            return await asyncio.to_thread(run)
        return run()

    async def chat_prompt(self, req_messages: list[dict[str, Any]], tools: list[dict] | None = None) -> list[int]:
        """Token ids of the conversation; tools (OpenAI function objects) rendered by the chat template, or
        described in a system message in the tool parser's format when the template does not render tools."""
        if self.tokenizer is None:
            raise APIError(400, "This model has no tokenizer, so chat is unavailable.", param="messages")
        if tools and not self.template_renders_tools:
            req_messages = self._tools_in_messages(req_messages, tools)
            tools = None
        render = functools.partial(self.apply_chat_template, self.tokenizer, req_messages,
                                   tools=[{"type": "function", "function": f} for f in tools] if tools else None)
        if sum(len(m["content"]) for m in req_messages) > LONG_TEXT_CHARS:
            return await asyncio.to_thread(render)
        return render()

    def _tools_in_messages(self, messages: list[dict[str, Any]], tools: list[dict]) -> list[dict[str, Any]]:
        """For templates that know no tools: the tools in the system message, earlier calls as the model writes
        them."""
        prompt = self.tool_parser.tools_system_prompt(tools)
        out = [dict(m) for m in messages]
        if out and out[0]["role"] == "system":
            out[0]["content"] = out[0]["content"] + "\n\n" + prompt
        else:
            out.insert(0, {"role": "system", "content": prompt})
        for m in out:
            for call in m.pop("tool_calls", None) or []:
                written = self.tool_parser.format_call(call["function"]["name"], call["function"]["arguments"])
                m["content"] = (m["content"] + "\n" if m["content"] else "") + written
        return out

    def check_capacity(self, num_requests: int) -> None:
        cfg = self.engine.config
        if num_requests > cfg.max_waiting + cfg.max_num_seqs:  # could never be admitted, even on an idle server
            raise APIError(400, f"{num_requests} prompts in one request; this server takes at most "
                                f"{cfg.max_waiting + cfg.max_num_seqs}", param="prompt")
        if self.draining:
            raise APIError(503, "The server is shutting down.", code="shutting_down")
        if self.engine.num_unfinished + num_requests > cfg.max_waiting + cfg.max_num_seqs:
            raise APIError(503, f"The server is at capacity ({self.engine.num_unfinished} requests in flight); "
                                "retry later.", code="server_overloaded")

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""


def _clean(error: dict) -> dict:
    """Pydantic's 'Value error, ' prefix is noise for API users."""
    msg = error.get("msg", "")
    if msg.startswith("Value error, "):
        error = {**error, "msg": msg[len("Value error, "):]}
    return error


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _check_outputs(out: RequestOutput) -> None:
    for c in out.outputs:
        if c.finish_reason == "abort":  # the engine dropped it (shutdown): not a normal end
            raise EngineError("the request was aborted by the server")


# ----------------------------------------------------------------------------------------------------------
# Logprobs in the two OpenAI formats

# JSON has no -Infinity: a token of probability 0 (suppressed by min_tokens) gets OpenAI's stand-in value.
ZERO_PROBABILITY_LOGPROB = -9999.0


def _logprob(value: float | None) -> float | None:
    if value is None:
        return None
    return value if math.isfinite(value) else ZERO_PROBABILITY_LOGPROB


def completion_logprobs(state: ServerState, c: CompletionOutput, start: int, end: int, offset: int) -> dict:
    """Legacy completions format for tokens [start, end): tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, offsets, tops = [], [], []
    for i in range(start, end):
        text = state.token_text(c.token_ids[i])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        top = c.top_logprobs[i] if c.top_logprobs and i < len(c.top_logprobs) else []
        tops.append({state.token_text(t): _logprob(lp) for t, lp in top})
    lps = [_logprob(c.logprobs[i]) if c.logprobs and i < len(c.logprobs) else None for i in range(start, end)]
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(state: ServerState, c: CompletionOutput, start: int, end: int) -> dict:
    content = []
    for i in range(start, end):
        text = state.token_text(c.token_ids[i])
        top = c.top_logprobs[i] if c.top_logprobs and i < len(c.top_logprobs) else []
        content.append({
            "token": text, "logprob": _logprob(c.logprobs[i]) if c.logprobs and i < len(c.logprobs) else None,
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": (t := state.token_text(tid)), "logprob": _logprob(lp),
                              "bytes": list(t.encode("utf-8"))} for tid, lp in top]})
    return {"content": content}


# ----------------------------------------------------------------------------------------------------------
# Endpoints


def prepare(state: ServerState, req: SamplingFields, prompts: list[list[int]], max_tokens: int | None,
            logprobs: int | None, structured: StructuredOutput | None) -> SamplingParams:
    """SamplingParams of the request, after every check that can refuse it before it is queued: the one
    validation of each prompt (the engine trusts it: generate(..., validated=True)), the grammar compiled."""
    params = req.sampling_params(max_tokens, logprobs, structured)
    for ids in prompts:
        state.engine.validate(ids, params)
    state.check_capacity(len(prompts))
    return params


async def prepare_async(state: ServerState, req: SamplingFields, prompts: list[list[int]], max_tokens: int | None,
                        logprobs: int | None, structured: StructuredOutput | None) -> SamplingParams:
    """prepare, in a worker thread when it may take a while (a grammar to compile, very long prompts)."""
    if structured is not None or sum(len(p) for p in prompts) > LONG_PROMPT_TOKENS:
        return await asyncio.to_thread(prepare, state, req, prompts, max_tokens, logprobs, structured)
    return prepare(state, req, prompts, max_tokens, logprobs, structured)


async def _final_outputs(generation: Generation) -> dict[int, RequestOutput]:
    """Run a non-streaming request to the end: the final snapshot of each prompt."""
    finals: dict[int, RequestOutput] = {}
    try:
        while (item := await generation.next()) is not None:
            i, out = item
            if out.finished:
                _check_outputs(out)
                finals[i] = out
    finally:
        await generation.close()
    return finals


async def _first_item(generation: Generation) -> tuple[int, RequestOutput] | None:
    """Wait for the first snapshot before answering, so errors up to then keep their HTTP status."""
    try:
        return await generation.next()
    except BaseException:
        await generation.close()
        raise


async def stream_response(generation: Generation, *, envelope, prompt_tokens: int, include_usage: bool,
                          choice_index, render) -> SSEResponse:
    """The streaming tail both endpoints share: SSE events of each choice's new text and tokens, the usage
    chunk, [DONE]; a failure after the first event is an error event.

    envelope(choices, usage) is the chunk around a list of choices; choice_index(prompt index, output) the
    choice's number; render(choice, prompt index, output, new text, first new token, end, first call) the
    choice deltas to send for it (it decides whether a snapshot is worth a chunk)."""
    first = await _first_item(generation)

    async def events() -> AsyncIterator[str]:
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        finished: set[int] = set()
        finals: dict[int, RequestOutput] = {}
        try:
            item = first
            while item is not None:
                i, out = item
                if out.finished:
                    _check_outputs(out)
                    finals[i] = out
                for c in out.outputs:
                    k = choice_index(i, c)
                    if k in finished:
                        continue
                    new_choice = k not in sent_text
                    text = c.text[sent_text.get(k, 0):]
                    start = sent_tokens.get(k, 0)
                    sent_text[k], sent_tokens[k] = len(c.text), len(c.token_ids)
                    if c.finished:
                        finished.add(k)
                    for choice in render(k, i, c, text, start, len(c.token_ids), new_choice):
                        yield sse(envelope([choice]))
                item = await generation.next()
            if include_usage:
                tokens = sum(len(c.token_ids) for out in finals.values() for c in out.outputs)
                yield sse(envelope([], _usage(prompt_tokens, tokens)))
            yield sse("[DONE]")
        except ClientDisconnected:
            return
        except Exception as e:
            yield sse(from_exception(e).body())
            yield sse("[DONE]")
        finally:
            await generation.close()

    return SSEResponse(events())


def _envelope(response_id: str, obj: str, created: int, model: str):
    def envelope(choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": response_id, "object": obj, "created": created, "model": model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    return envelope


async def completions(state: ServerState, request: Request):
    req: CompletionRequest = await state.parse(request, CompletionRequest)
    req.check_supported()
    raw_prompts = req.prompts()
    prompts = [await state.encode(p) if isinstance(p, str) else p for p in raw_prompts]
    max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
    params = await prepare_async(state, req, prompts, max_tokens, req.logprobs, req.structured_output())
    echo_texts = [""] * len(prompts)
    if req.echo:
        echo_texts = [p if isinstance(p, str) else state.tokenizer.decode(p) if state.tokenizer else ""
                      for p in raw_prompts]
    response_id = f"cmpl-{uuid.uuid4().hex}"
    envelope = _envelope(response_id, "text_completion", int(time.time()), state.model_name)
    n = params.n
    prompt_tokens = sum(len(p) for p in prompts)
    generation = Generation(state, request, prompts, params, response_id)

    def choice_index(prompt_index: int, c: CompletionOutput) -> int:
        return prompt_index * n + c.index

    if not req.stream:
        finals = await _final_outputs(generation)
        choices, completion_tokens = [], 0
        for i in range(len(prompts)):
            for c in finals[i].outputs:
                completion_tokens += len(c.token_ids)
                lp = None
                if req.logprobs is not None:
                    lp = completion_logprobs(state, c, 0, len(c.token_ids), len(echo_texts[i]))
                choices.append({"index": choice_index(i, c), "text": echo_texts[i] + c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason})
        return JSONResponse({**envelope(choices), "usage": _usage(prompt_tokens, completion_tokens)})

    def render(k: int, i: int, c: CompletionOutput, text: str, start: int, end: int, new_choice: bool) -> list[dict]:
        prefix = echo_texts[i] if new_choice else ""
        if not (prefix or text or c.finished or (req.logprobs is not None and end > start)):
            return []
        lp = None
        if req.logprobs is not None:
            lp = completion_logprobs(state, c, start, end, len(echo_texts[i]) + len(c.text) - len(text))
        return [{"index": k, "text": prefix + text, "logprobs": lp, "finish_reason": c.finish_reason}]

    return await stream_response(generation, envelope=envelope, prompt_tokens=prompt_tokens,
                                 include_usage=req.include_usage, choice_index=choice_index, render=render)


def chat_structured_output(state: ServerState, req: ChatCompletionRequest) -> StructuredOutput | None:
    """The grammar of a chat request: a call for required/named tool_choice, else response_format's.

    Refuses tool_choice without tools, a named function that is not offered, and a function whose parameters
    schema the grammar library cannot compile (each function is compiled: cached after the first time)."""
    if req.tool_choice is not None and req.tool_choice != "none" and not req.tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    mode = req.tool_mode()
    if mode == "none":
        return req.structured_output()
    functions = req.functions_offered()
    for index, function in enumerate(functions):
        try:
            state.grammars.compile(state.tool_parser.call_grammar([function]))
        except RequestError as e:
            raise APIError(400, f"tools[{index}].function.parameters: {e}", param="tools") from None
    if mode == "named" and not req.called_functions():
        raise APIError(400, f"tool_choice names the function {req.tool_choice.function.name!r}, which is not in "
                            f"tools ({', '.join(f['name'] for f in functions)})", param="tool_choice")
    if mode in ("required", "named"):
        return state.tool_parser.call_grammar(req.called_functions())
    return req.structured_output()


def chat_message(state: ServerState, mode: str, c: CompletionOutput) -> tuple[dict, str | None]:
    """(message, finish_reason) of a finished choice; tool calls parsed out when tools are in play."""
    if mode == "none":
        return {"role": "assistant", "content": c.text}, c.finish_reason
    content, calls = state.tool_parser.parse(c.text)
    if not calls:
        return {"role": "assistant", "content": c.text}, c.finish_reason
    return ({"role": "assistant", "content": content, "tool_calls": [call.openai() for call in calls]},
            "tool_calls")


async def chat_completions(state: ServerState, request: Request):
    req: ChatCompletionRequest = await state.parse(request, ChatCompletionRequest)
    req.check_supported()  # before tokenizing: cheap refusals first
    mode = req.tool_mode()
    if req.tools or req.response_format:  # grammars to compile: off the event loop
        structured = await asyncio.to_thread(chat_structured_output, state, req)
    else:
        structured = chat_structured_output(state, req)
    prompt = await state.chat_prompt(req.conversation(), req.functions_offered() if mode != "none" else None)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = await prepare_async(state, req, [prompt], max_tokens, top, structured)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    envelope = _envelope(response_id, "chat.completion.chunk", int(time.time()), state.model_name)
    generation = Generation(state, request, [prompt], params, response_id)

    if not req.stream:
        final = (await _final_outputs(generation))[0]
        choices = []
        for c in final.outputs:
            message, finish_reason = chat_message(state, mode, c)
            choices.append({"index": c.index, "message": message, "finish_reason": finish_reason,
                            "logprobs": chat_logprobs(state, c, 0, len(c.token_ids)) if req.logprobs else None})
        return JSONResponse({**envelope(choices), "object": "chat.completion",
                             "usage": _usage(len(prompt), sum(len(c.token_ids) for c in final.outputs))})

    shown: dict[int, int] = {}  # characters of each choice's text sent as content (tool mode holds some back)

    def choice(index: int, delta: dict, lp: dict | None = None, finish_reason: str | None = None) -> dict:
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}

    def render(k: int, i: int, c: CompletionOutput, text: str, start: int, end: int, new_choice: bool) -> list[dict]:
        out = [choice(k, {"role": "assistant", "content": ""})] if new_choice else []  # OpenAI's first chunk
        lp = chat_logprobs(state, c, start, end) if req.logprobs and end > start else None
        if mode == "none":
            if text or c.finished or lp:
                out.append(choice(k, {"content": text} if text else {}, lp, c.finish_reason))
            return out
        # Tools in play: content is streamed up to where a call may begin; calls are sent when the output ends.
        done = shown.get(k, 0)
        if not c.finished:
            upto = max(done, state.tool_parser.held_from(c.text))
            shown[k] = upto
            if upto > done or lp:
                out.append(choice(k, {"content": c.text[done:upto]} if upto > done else {}, lp))
            return out
        content, calls = state.tool_parser.parse(c.text)
        if not calls:
            rest = c.text[done:]
            out.append(choice(k, {"content": rest} if rest else {}, lp, c.finish_reason))
            return out
        rest = (content or "")[done:]
        if rest or lp:
            out.append(choice(k, {"content": rest} if rest else {}, lp))
        for index, call in enumerate(calls):  # as OpenAI streams them: id and name first, then the arguments
            out.append(choice(k, {"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                                  "function": {"name": call.name, "arguments": ""}}]}))
            out.append(choice(k, {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}))
        out.append(choice(k, {}, None, "tool_calls"))
        return out

    return await stream_response(generation, envelope=envelope, prompt_tokens=len(prompt),
                                 include_usage=req.include_usage, choice_index=lambda i, c: c.index, render=render)


# ----------------------------------------------------------------------------------------------------------
# The app


def answer_errors(endpoint):
    """Turn every failure of an endpoint into its OpenAI-shaped response here, so none reaches Starlette's
    last-resort handler (which would log a second traceback and re-raise into the server)."""
    @functools.wraps(endpoint)
    async def wrapper(*args, **kwargs):
        try:
            return await endpoint(*args, **kwargs)
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
        except Exception as e:
            return error_response(from_exception(e))

    return wrapper


def create_app(engine, *, api_key: str | None = None, served_model_name: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, tool_call_parser: str | None = None) -> FastAPI:
    """The FastAPI app around a running AsyncEngine (the caller owns the engine and shuts it down).

    tool_call_parser: hermes or llama3_json; None: chosen from the checkpoint's chat template."""
    app = FastAPI(title="longserve", version=__version__,
                  description="OpenAI-compatible API over the longserve engine.")
    state = ServerState(engine, api_key, served_model_name, max_request_bytes, tool_call_parser)
    app.state.longserve = state
    install_handlers(app)

    def body_doc(model: type[BaseModel]) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}

    @app.get("/health", summary="200 while the engine runs")
    @answer_errors
    async def health():
        if engine.dead is not None:
            raise APIError(503, "The engine has stopped.", code="engine_dead")
        if state.draining:
            raise APIError(503, "The server is shutting down.", code="shutting_down")
        return {"status": "ok"}

    @app.get("/version")
    @answer_errors
    async def version():
        return {"version": __version__}

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "longserve",
                "root": engine.model_name, "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    @answer_errors
    async def list_models(request: Request):
        state.authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    @answer_errors
    async def get_model(model_id: str, request: Request):
        state.authorize(request)
        if model_id not in state.accepted_names:
            raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return model_card()

    @app.get("/metrics")
    @answer_errors
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions", openapi_extra=body_doc(CompletionRequest))
    @answer_errors
    async def v1_completions(request: Request):
        return await completions(state, request)

    @app.post("/v1/chat/completions", openapi_extra=body_doc(ChatCompletionRequest))
    @answer_errors
    async def v1_chat_completions(request: Request):
        return await chat_completions(state, request)

    @app.post("/tokenize", openapi_extra=body_doc(TokenizeRequest))
    @answer_errors
    async def tokenize(request: Request):
        req: TokenizeRequest = await state.parse(request, TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "Give exactly one of prompt and messages.", param="prompt")
        if req.prompt is not None:
            tokens = await state.encode(req.prompt, add_special_tokens=bool(req.add_special_tokens))
        else:
            if not req.messages:
                raise APIError(400, "messages must not be empty", param="messages")
            tokens = await state.chat_prompt(conversation(req.messages))
        return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}

    @app.post("/detokenize", openapi_extra=body_doc(DetokenizeRequest))
    @answer_errors
    async def detokenize(request: Request):
        req: DetokenizeRequest = await state.parse(request, DetokenizeRequest)
        if state.tokenizer is None:
            raise APIError(400, "This model has no tokenizer.", param="tokens")
        size = len(state.tokenizer)
        if any(t < 0 or t >= size for t in req.tokens):
            raise APIError(400, f"tokens must be ids in [0, {size})", param="tokens")
        return {"prompt": state.tokenizer.decode(req.tokens)}

    def openapi() -> dict:
        if app.openapi_schema is None:
            from .openapi import build_openapi

            tokenizer_size = len(state.tokenizer) if state.tokenizer is not None else None
            app.openapi_schema = build_openapi(app, state.vocab_size, tokenizer_size)
        return app.openapi_schema

    app.openapi = openapi
    return app


# ----------------------------------------------------------------------------------------------------------
# `longserve serve`


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..engine.config import add_engine_arguments

    p = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server",
        description="Serve a model over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, "
                    "/v1/models, /tokenize, /detokenize, /health, /metrics (Prometheus), /version.")
    g = p.add_argument_group("server")
    g.add_argument("--host", default=None,
                   help="address to listen on; 0.0.0.0: all interfaces (default: $LONGSERVE_HOST, else 127.0.0.1)")
    g.add_argument("--port", type=int, default=None, help="TCP port (default: $LONGSERVE_PORT, else 8000)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize "
                        "(default: the LONGSERVE_API_KEY environment variable; unset: no key)")
    g.add_argument("--served-model-name", default=None,
                   help="model name clients send and responses carry (default: --model, or the default model's "
                        "name)")
    g.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help=f"largest request body accepted; larger ones get 413 (default {DEFAULT_MAX_REQUEST_BYTES})")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish before failing them (default 30)")
    g.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                   help="how tool calls are written in the model's output: hermes (Qwen2.5/Qwen3 <tool_call> "
                        "JSON) or llama3_json (Llama 3.1+ JSON calls) (default: chosen from the chat template)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="log verbosity (default info)")
    add_engine_arguments(p)
    p.set_defaults(func=run)
    return p


def _server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, plus: on shutdown, fail requests still running after the grace period (an SSE
        error event or a 503, rather than a cut connection), and exit normally after SIGTERM."""

        def __init__(self, config, state: ServerState, grace: float):
            super().__init__(config)
            self.state = state
            self.grace = grace

        async def shutdown(self, sockets=None) -> None:
            self.state.draining = True
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self.grace, self.state.fail_all, "the server is shutting down")
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

        @contextlib.contextmanager
        def capture_signals(self):
            # As uvicorn's, but the captured SIGTERM is not re-raised afterwards: a graceful stop exits 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return GracefulServer


def run(args) -> int:
    import uvicorn

    from ..engine.async_engine import AsyncEngine
    from ..engine.config import config_from_args

    level = getattr(logging, args.log_level.upper())
    logging.getLogger().setLevel(level)
    api_key = args.api_key if args.api_key is not None else os.environ.get("LONGSERVE_API_KEY") or None
    if args.max_request_bytes < 1:
        raise EngineError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    host = args.host or os.environ.get("LONGSERVE_HOST") or "127.0.0.1"
    port = args.port
    if port is None:
        env_port = os.environ.get("LONGSERVE_PORT") or "8000"
        if not env_port.isdigit():
            raise EngineError(f"LONGSERVE_PORT must be a port number, got {env_port!r}")
        port = int(env_port)
    if not 0 < port < 65536:
        raise EngineError(f"--port must be in 1..65535, got {port}")
    engine = AsyncEngine(config_from_args(args))
    try:
        app = create_app(engine, api_key=api_key, served_model_name=args.served_model_name,
                         max_request_bytes=args.max_request_bytes, tool_call_parser=args.tool_call_parser)
        state: ServerState = app.state.longserve
        log.info("serving %s on http://%s:%d (max_model_len %d%s)", state.model_name, host, port,
                 engine.max_model_len, ", API key required" if api_key else "")
        config = uvicorn.Config(app, host=host, port=port, log_level=args.log_level,
                                timeout_graceful_shutdown=args.shutdown_timeout + 5, access_log=level <= logging.DEBUG)
        server = _server_class()(config, state, args.shutdown_timeout)
        # A dead engine thread stops the server, which then exits non-zero so that a supervisor restarts it.
        engine.on_death(lambda: setattr(server, "should_exit", True))
        server.run()
        if not server.started:
            raise EngineError(f"could not listen on {host}:{port} (see the log above)")
        if engine.dead is not None:
            raise EngineError(f"the engine stopped ({type(engine.dead).__name__}: {engine.dead}); see the log above")
    finally:
        engine.shutdown()
    return 0
