"""The OpenAI-compatible HTTP API over an Engine (Starlette; uvicorn serves it).

POST /v1/chat/completions and /v1/completions (server-sent events with `stream`), GET /v1/models
and /health. A bad request gets a 400 with a one-line message in OpenAI's error shape; a full
queue a 503; a client that goes away cancels its generation. With `moderation`, a request the
model judges unacceptable, or its reply, is answered with the refusal text and finish_reason
"content_filter"; a judged reply is held back until it is judged, streamed or not, so no byte of
a refused reply reaches the client.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import EdgeError, first_line
from ..runtime.sampling import SamplingParams
from .engine import Busy, Engine, Job
from .inbox import Inbox
from .moderation import Moderation

MAX_BODY = 8 << 20
"""Request bodies larger than this are refused before they are parsed."""


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: bool | None = False
    n: StrictInt | None = None
    response_format: dict | None = None  # OpenAI's: text, json_object or json_schema (the guard extra)


class _Part(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: StrictStr


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[_Part]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)


class CompletionBody(_Body):
    prompt: Union[StrictStr, list[StrictStr]]


class BadRequest(Exception):
    pass


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _validation_line(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"


def create_app(engine: Engine, model_id: str, chat_format, defaults: dict | None = None,
               moderation: Moderation | None = None, stream_interval: float = 0.0) -> Starlette:
    """The ASGI app serving `engine` under the name `model_id`; `chat_format` encodes messages;
    `moderation` (serve --moderate) refuses what the model judges unacceptable; a streamed reply
    sends its text at most once per `stream_interval` seconds (each event costs the event loop and
    the client CPU time that, on a small machine, decoding would otherwise have)."""
    defaults = defaults or {}
    limits = engine.config
    tokenizer = engine.tokenizer

    async def _read(request: Request, kind: type[_Body]) -> _Body:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            raise BadRequest(f"request body over {MAX_BODY} bytes")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > MAX_BODY:
                raise BadRequest(f"request body over {MAX_BODY} bytes")
        try:
            return kind.model_validate_json(bytes(body))
        except ValidationError as e:
            if e.errors()[0]["type"] == "json_invalid":
                raise BadRequest(f"malformed JSON: {e.errors()[0]['msg']}") from None
            raise BadRequest(_validation_line(e)) from None

    def _processor(body: _Body):
        """The grammar a response_format asks for, or None (built off the event loop: it compiles)."""
        if body.response_format is None:
            return None
        from ..runtime.constrain import Constraint

        try:
            constraint = Constraint.response_format(body.response_format)
            return None if constraint is None else constraint.processor(tokenizer, engine.single.vocab_size)
        except EdgeError as e:
            raise BadRequest(f"response_format: {e}") from None

    def _prepare(body: _Body, chat: bool):
        return (_encode_chat if chat else _encode_prompt)(body), _processor(body)

    def _job(body: _Body, ids: list[int], emit, reuse: bool, processor=None) -> Job:
        if body.model is not None and body.model != model_id:
            raise BadRequest(f"unknown model {body.model!r}; this server has {model_id!r}")
        if body.n not in (None, 1):
            raise BadRequest("n: only n=1 is supported")
        max_tokens = next((m for m in (body.max_completion_tokens, body.max_tokens) if m is not None),
                          min(defaults.get("max_new_tokens", 256), limits.max_tokens))
        if not 0 < max_tokens <= limits.max_tokens:
            raise BadRequest(f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}")
        if not ids:
            raise BadRequest("the prompt is empty")
        if len(ids) > limits.max_prompt:
            raise BadRequest(f"prompt of {len(ids)} tokens is over this server's limit of {limits.max_prompt}")
        temperature = defaults.get("temperature", 0.0) if body.temperature is None else body.temperature
        top_p = defaults.get("top_p", 1.0) if body.top_p is None else body.top_p
        try:
            sampling = SamplingParams(temperature, defaults.get("top_k", 0), top_p,
                                      defaults.get("repetition_penalty", 1.0), body.seed)
        except EdgeError as e:
            raise BadRequest(str(e)) from None
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4 or any(not s or len(s) > 256 for s in stop):
            raise BadRequest("stop: up to 4 non-empty strings of at most 256 characters")
        return Job(ids, max_tokens, sampling, emit, stop, reuse, processor)

    def _encode_chat(body: ChatBody) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            return chat_format.encode(messages, tokenizer)
        except EdgeError as e:
            raise BadRequest(str(e)) from None

    def _encode_prompt(body: CompletionBody) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise BadRequest("prompt: give one string (batches of prompts are not supported)")
            prompt = prompt[0]
        return tokenizer.encode(prompt)

    def _asked(body: _Body, chat: bool) -> str:
        """What --moderate judges as the request: the last user turn of a chat, a completion's prompt."""
        if not chat:
            return body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        users = [m.text() for m in body.messages if m.role == "user"]
        return users[-1] if users else "\n".join(m.text() for m in body.messages)

    async def _moderated(events, asked: str):
        """The reply's events, held back until the reply is judged, or the refusal in their place."""
        held = []
        async for event in events:
            if event[0] == "text":
                held.append(event)
                continue
            reply = "".join(e[1] for e in held)
            if event[0] != "done":  # an error or a client gone: nothing unjudged goes out
                reply = ""
            elif await moderation.refuses_reply(asked, reply):
                reply, event = moderation.refusal, ("done", "content_filter", event[2])
            if reply:
                yield "text", reply
            yield event
            return

    async def _serve(request: Request, chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        inbox = Inbox(loop)

        async def from_engine(interval: float):
            """The engine's events, the text that came meanwhile joined into one piece, sent at most
            once per `interval` seconds: a piece that comes sooner after the last send waits out the
            rest of the interval and goes with whatever came meanwhile (streaming: fewer, larger
            events); one that comes later goes at once, with no timer."""
            sent = -math.inf
            while True:
                events = await inbox.take()
                wait = sent + interval - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    events += inbox.drain()
                text = "".join(e[1] for e in events if e[0] == "text")
                end = next((e for e in events if e[0] != "text"), None)
                if text:
                    yield "text", text
                if end:
                    yield end
                    return
                sent = loop.time()

        job = None
        try:
            body = await _read(request, ChatBody if chat else CompletionBody)
            ids, processor = await asyncio.to_thread(_prepare, body, chat)  # off the event loop
            job = _job(body, ids, inbox.put, reuse=chat, processor=processor)
            asked = _asked(body, chat) if moderation else ""
            if moderation and await moderation.refuses_request(asked):
                usage = {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids),
                         "prompt_tokens_details": {"cached_tokens": 0}}
                job = None
                inbox.put("text", moderation.refusal)
                inbox.put("done", "content_filter", usage)
            else:
                engine.submit(job)
        except BadRequest as e:
            return _error(400, str(e))
        except ClientDisconnect:
            return Response(status_code=499)
        except Busy as e:
            return _error(503, str(e), "server_busy")
        except EdgeError as e:
            return _error(500, first_line(e), "server_error")
        events = from_engine(stream_interval if body.stream else 0.0)
        if job and moderation and moderation.checks_output:
            events = _moderated(events, asked)

        def stop() -> None:
            if job is not None:
                job.cancelled.set()

        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str | None, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            content = {} if text is None else {"content": text}
            if delta:
                return {"index": 0, "delta": content, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", **content}, "finish_reason": finish}

        if body.stream:
            async def sse():
                try:
                    first = {"role": "assistant", "content": ""} if chat else None
                    head = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                            "model": model_id}
                    if first:
                        yield _sse({**head, "choices": [{"index": 0, "delta": first, "finish_reason": None}]})
                    async for event in events:
                        if event[0] == "text":
                            yield _sse({**head, "choices": [choice(event[1], None, True)]})
                        elif event[0] == "done":
                            yield _sse({**head, "choices": [choice(None, event[1], True)], "usage": event[2]})
                        else:
                            yield _sse({"error": {"message": event[1], "type": "server_error"}})
                    yield "data: [DONE]\n\n"
                finally:  # also when the client went away and the response was cancelled
                    stop()

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        async def watch() -> None:  # a busy stream of events must not hide a client that left
            while not await request.is_disconnected():
                await asyncio.sleep(0.5)
            inbox.put("gone")

        watcher = asyncio.create_task(watch())
        pieces = []
        try:
            async for event in events:
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "done":
                    return JSONResponse({"id": rid, "object": kind, "created": created, "model": model_id,
                                         "choices": [choice("".join(pieces), event[1], False)], "usage": event[2]})
                elif event[0] == "gone":
                    return Response(status_code=499)
                else:
                    return _error(500, event[1], "server_error")
        finally:
            stop()
            watcher.cancel()

    async def chat_completions(request: Request) -> Response:
        return await _serve(request, chat=True)

    async def completions(request: Request) -> Response:
        return await _serve(request, chat=False)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "mistral-edge"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", **engine.stats()})

    async def not_found(request: Request, exc) -> Response:
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    return Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ], exception_handlers={404: not_found, 405: not_found})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
