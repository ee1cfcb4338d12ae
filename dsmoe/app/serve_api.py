"""The HTTP layer of ``dsmoe serve`` (FastAPI): OpenAI's ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` (streamed as server-sent events in OpenAI's chunk format, ending
``data: [DONE]``), ``/health``, ``/metrics`` (Prometheus) and ``/v1/experts`` (the live expert
report, ``?devices=N`` adds a placement). A thin protocol layer: requests go to the engine
(:mod:`dsmoe.app.engine`), whose thread calls each request's :class:`Sink` back with tokens.

Every error is OpenAI's error object ``{"error": {"message", "type", "param", "code"}}`` with
its status: 400 malformed or out of range, 401 missing/wrong API key, 404 unknown model or path,
413 body too large, 429 queue full, 500 a request that failed in the model (it fails alone).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from dsmoe.app.engine import QueueFull
from dsmoe.app.sampling import SamplingParams
from dsmoe.app.serve_schema import ChatRequest, CompletionRequest, unsupported
from dsmoe.app.serve_sink import Sink, chat_logprobs, completion_logprobs
from dsmoe.errors import DsmoeError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                                   "param": param, "code": code}}, status_code=status)


def create_app(s) -> FastAPI:
    """The app over a :class:`dsmoe.app.serve.Served`."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    def reject(status: int, message: str, param=None, code=None) -> JSONResponse:
        s.metrics.requests.labels(outcome=f"rejected_{status}").inc()
        return error_response(status, message, param, code)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return reject(e.status, e.message, e.param, e.code)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        return reject(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return reject(400, str(e.errors()[0].get("msg", "invalid request")) if e.errors() else "invalid request")

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return error_response(500, f"internal error: {type(e).__name__}")

    def auth(request: Request) -> None:
        if s.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if got != f"Bearer {s.api_key}":
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    async def parse(request: Request, cls):
        auth(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > s.max_body:
            raise ApiError(413, f"the request body is {length} bytes; the limit is {s.max_body} (--max-body)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > s.max_body:
                raise ApiError(413, f"the request body is over the limit of {s.max_body} bytes (--max-body)")
        try:
            data = json.loads(body)
        except ValueError as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            req = cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err.get("loc", ()))
            raise ApiError(400, f"{param}: {err.get('msg')}" if param else err.get("msg"), param=param or None) from None
        if req.model != s.model_name:
            raise ApiError(404, f"the model '{req.model}' does not exist (this server has '{s.model_name}')",
                           param="model", code="model_not_found")
        problem = unsupported(req)
        if problem:
            raise ApiError(400, problem)
        return req

    def params_of(req, prompt_len: int, *, chat: bool) -> SamplingParams:
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if stop and s.text.tokenizer is None:
            raise ApiError(400, "stop strings need a tokenizer (this model serves token ids): use stop_token_ids",
                           param="stop")
        max_tokens = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
        if max_tokens is None:
            max_tokens = max(s.engine.max_model_len - prompt_len, 1) if chat else 16
        if chat:
            lp, top = bool(req.logprobs), req.top_logprobs or 0
        else:
            lp, top = req.logprobs is not None, req.logprobs or 0
        p = SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                           top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0),
                           seed=req.seed, stop=stop, stop_token_ids=tuple(req.stop_token_ids or ()),
                           ignore_eos=req.ignore_eos, presence_penalty=req.presence_penalty or 0.0,
                           frequency_penalty=req.frequency_penalty or 0.0, logprobs=lp, top_logprobs=top)
        return p

    def submit(prompt: list[int], params: SamplingParams) -> Sink:
        sink = Sink(asyncio.get_running_loop(), s.text, params.stop, s.metrics)
        try:
            sink.seq = s.engine.add(prompt, params, sink)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full") from None
        except DsmoeError as e:
            raise ApiError(400, str(e)) from None
        s.metrics.prompt_tokens.inc(len(prompt))
        return sink

    def prompt_ids(prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, str)):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request (a list of prompts is not supported)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if s.text.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
            return s.text.encode(prompt, special=True)
        return list(prompt)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": created,
                                            "owned_by": "dsmoe", "max_model_len": s.engine.max_model_len}]}

    @app.get("/v1/experts")
    async def experts(request: Request, devices: int | None = None, top_pairs: int = 5):
        auth(request)
        if s.expert_load is None:
            raise ApiError(404, "expert load is not recorded by this server (see its start-up notes)")
        if devices is not None and not 1 <= devices <= s.engine.config.n_routed_experts:
            raise ApiError(400, f"devices must be in [1, {s.engine.config.n_routed_experts}]", param="devices")
        try:
            return s.expert_load.report(devices=devices, top_pairs=top_pairs)
        except DsmoeError as e:
            raise ApiError(409, f"no expert report yet: {e}") from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        ids = prompt_ids(req.prompt)
        sink = submit(ids, params_of(req, len(ids), chat=False))
        return await respond(request, req, sink, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        if s.text.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer.json: chat needs one (use /v1/completions with token ids)")
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            text = s.text.chat_prompt(messages, add_generation_prompt=req.add_generation_prompt)
        except DsmoeError as e:
            raise ApiError(400, str(e), param="messages") from None
        ids = s.text.encode(text, special=False)
        sink = submit(ids, params_of(req, len(ids), chat=True))
        return await respond(request, req, sink, chat=True)

    async def respond(request: Request, req, sink: Sink, *, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": s.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(request, sink, head, chat, include_usage), media_type="text/event-stream")
        try:
            pieces, steps = [], []
            async for kind, ev in sink.events(request):
                if kind == "token":
                    pieces.append(ev["text"])
                    steps.append(ev)
                elif kind == "finish":
                    pieces.append(ev["text"])
        finally:
            if not sink.seq.done:
                s.engine.cancel(sink.seq)
        seq = sink.seq
        if seq.finish_reason == "error":
            return error_response(500, f"the request failed: {seq.error}", code="model_error")
        text = "".join(pieces)
        usage = _usage(seq)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": chat_logprobs(steps, s.text) if seq.params.logprobs else None,
                      "finish_reason": seq.finish_reason, "token_ids": list(seq.out)}
        else:
            choice = {"index": 0, "text": text, "finish_reason": seq.finish_reason, "token_ids": list(seq.out),
                      "logprobs": completion_logprobs(steps, s.text) if seq.params.logprobs else None}
        return {**head, "choices": [choice], "usage": usage}

    async def stream(request: Request, sink: Sink, head: dict, chat: bool, include_usage: bool):
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(delta_text: str | None, finish=None, ids=(), first=False, ev=None) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({} if delta_text is None
                                                                            else {"content": delta_text})
                c = {"index": 0, "delta": delta, "finish_reason": finish, "token_ids": list(ids),
                     "logprobs": chat_logprobs([ev], s.text) if ev and sink.seq.params.logprobs else None}
            else:
                c = {"index": 0, "text": delta_text or "", "finish_reason": finish, "token_ids": list(ids),
                     "logprobs": completion_logprobs([ev], s.text) if ev and sink.seq.params.logprobs else None}
            return "data: " + json.dumps({**head, "choices": [c], **({"usage": None} if include_usage else {})}) + "\n\n"

        try:
            if chat:
                yield chunk(None, first=True)
            async for kind, ev in sink.events(request):
                if kind == "token":
                    yield chunk(ev["text"], ids=[ev["id"]], ev=ev)
                    continue
                seq = sink.seq
                if seq.finish_reason == "error":
                    err = {"error": {"message": f"the request failed: {seq.error}", "type": "server_error",
                                     "param": None, "code": "model_error"}}
                    yield "data: " + json.dumps(err) + "\n\n"
                else:
                    extra = seq.out[len(ev["seen"]):]   # tokens the text layer never saw (EOS, stop ids)
                    yield chunk(ev["text"], finish=seq.finish_reason, ids=extra)
                    if include_usage:
                        yield "data: " + json.dumps({**head, "choices": [], "usage": _usage(seq)}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not sink.seq.done:
                s.engine.cancel(sink.seq)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def not_found(path: str):
        raise ApiError(404, f"no such endpoint: /{path}")

    return app


def _usage(seq) -> dict:
    return {"prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.out),
            "total_tokens": len(seq.prompt) + len(seq.out)}
