"""`balcony serve`: an OpenAI-compatible HTTP server where every request carries its own budget.

    balcony serve [--model DIR] [--exits-file FILE] [--host 127.0.0.1] [--port 8000] [--slo-ms-per-token X]

POST /v1/completions and /v1/chat/completions (OpenAI's request and response shapes, streaming as
server-sent events), GET /v1/models, /health and /metrics (Prometheus). Beyond OpenAI's fields a
request may give `budget` (in (0, 1]), `exit_layer` or `max_ms_per_token`, `min_budget` (the floor
under load), `shortlist` (as generate's: whether the budget may buy a shortlisted LM head), `confidence`
(as generate's: a token its exit is less sure of is taken again at the full depth), `full_start` (as
generate's: the first answer tokens at the full depth, the request's route after them; "auto": the
budget spends an opening over max_tokens where it fits), `top_k` and
`repetition_penalty`, and `dry_multiplier`, `dry_base`, `dry_allowed_length` (llama.cpp's DRY
against loops, penalties.py); the OpenAI client passes them with `extra_body`.
OpenAI fields the server does not implement (logit_bias, tools, response_format other than text, ...)
get a 400 instead of being ignored. Responses add `exit_layers`
(the exit of every generated token), `heads` (the LM head of each: 0 the full one, n a shortlisted head
of n tokens, which a budget below 1 may buy) and `exits` (tokens per exit). All requests run on one
continuous-batching Batcher in a background thread.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict

from .batcher import Batcher, Request
from .generate import encode_prompt


# the chat roles a message may have (tool messages need tools, which this server does not implement)
ROLES = ("system", "developer", "user", "assistant")

# OpenAI request fields that would change the answer and that this server does not implement
UNSUPPORTED = ("logit_bias", "tools", "tool_choice", "functions", "function_call", "response_format", "top_logprobs",
               "suffix", "prediction", "audio", "modalities")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool | None = None


class _Common(BaseModel):
    # strict: a boolean is not a number, "yes" not a boolean, 2.0 not a token count (an int is still a float)
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = 0
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    # beyond OpenAI
    repetition_penalty: float | None = 1.0
    dry_multiplier: float | None = 0.0
    dry_base: float | None = 1.75
    dry_allowed_length: int | None = 2
    budget: float | None = None
    exit_layer: int | None = None
    max_ms_per_token: float | None = None
    min_budget: float | None = None
    shortlist: bool | int | None = None
    confidence: float | None = 0.0
    full_start: object = "auto" # 'auto' or an int >= 0: checked by the batcher (one message for every bad value)


class CompletionBody(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[ContentPart] | None = None


class ChatBody(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error(status, message, param=None, code=None, kind="invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def message_text(i: int, m: ChatMessage) -> str:
    """A message's text: its content string, or its text parts joined (OpenAI's content-parts form);
    a part of another type (an image, audio, a file) is refused by name."""
    if m.content is None:
        raise APIError(400, f"messages[{i}] has no content", param=f"messages.{i}.content")
    if isinstance(m.content, str):
        return m.content
    texts = []
    for j, part in enumerate(m.content):
        if part.type != "text":
            raise APIError(400, f"messages[{i}].content[{j}] is of type {part.type!r}: this server reads text "
                                f"parts only", param=f"messages.{i}.content.{j}.type")
        if part.text is None:
            raise APIError(400, f"messages[{i}].content[{j}] is a text part without text",
                           param=f"messages.{i}.content.{j}.text")
        texts.append(part.text)
    if not texts:
        raise APIError(400, f"messages[{i}] has no content (an empty list of parts)", param=f"messages.{i}.content")
    return "\n".join(texts)


class Metrics:
    """Prometheus metrics: the batcher's state read at scrape time, latencies observed per token."""

    def __init__(self, batcher: Batcher):
        self.batcher = batcher
        self.registry = CollectorRegistry()
        self.registry.register(self)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram("balcony_time_to_first_token_seconds", "From request arrival to its first token",
                              buckets=buckets, registry=self.registry)
        self.itl = Histogram("balcony_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             buckets=buckets, registry=self.registry)
        self.window = []  # (time, generated tokens) samples for tokens/s

    def collect(self):
        b = self.batcher
        now = time.monotonic()
        self.window = [(t, n) for t, n in self.window if now - t < 10.0] + [(now, b.generated_tokens)]
        t0, n0 = self.window[0]
        rate = (b.generated_tokens - n0) / (now - t0) if now > t0 else 0.0
        yield GaugeMetricFamily("balcony_queue_depth", "Requests waiting for a cache row", value=len(b.waiting))
        yield GaugeMetricFamily("balcony_running_sequences", "Sequences in the running batch", value=b.running)
        yield GaugeMetricFamily("balcony_tokens_per_second", "Generated tokens per second over the last 10 s",
                                value=rate)
        yield GaugeMetricFamily("balcony_step_seconds", "Decode step time (exponential average)",
                                value=b.step_ema_s or 0.0)
        per_exit = CounterMetricFamily("balcony_generated_tokens", "Generated tokens by exit depth", labels=["exit"])
        for k, n in b.tokens_by_exit.items():
            per_exit.add_metric([str(k)], n)
        yield per_exit
        moves = CounterMetricFamily("balcony_controller_moves", "Load-controller exit moves", labels=["direction"])
        for d, n in b.moves.items():
            moves.add_metric([d], n)
        yield moves
        finished = CounterMetricFamily("balcony_requests_finished", "Finished requests by how they ended",
                                       labels=["reason"])
        for reason, n in b.finished.items():
            finished.add_metric([reason], n)
        yield finished


def create_app(model, batcher: Batcher, model_id: str | None = None) -> FastAPI:
    """The FastAPI app serving `model` through `batcher` (started and drained with the app)."""
    model_id = model_id or model.name
    metrics = Metrics(batcher)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await asyncio.to_thread(batcher.drain)  # shutdown: admit nothing new, finish what runs
        batcher.stop()

    app = FastAPI(title="balcony_ext", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        errs = exc.errors()
        first = errs[0] if errs else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
        return _error(400, f"invalid request: {param or 'body'}: {first.get('msg', 'invalid')}", param=param)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.code, exc.kind)

    @app.get("/health")
    async def health():
        if batcher.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "running": batcher.running, "waiting": len(batcher.waiting)}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "balcony_ext", "exits": list(model.exits),
                                            "num_layers": model.num_layers}]}

    def request_from(body: _Common, ids: list, max_tokens: int | None) -> Request:
        for name in UNSUPPORTED:  # OpenAI parameters this server cannot honour: refused, not ignored
            value = (body.model_extra or {}).get(name)
            if value not in (None, False, {}, []) and not (name == "response_format" and value == {"type": "text"}):
                raise APIError(400, f"{name} is not supported by this server", param=name)
        if body.model is not None and body.model != model_id:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found")
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n} is not supported: one choice per request", param="n")
        if max_tokens is not None and max_tokens <= 0:
            raise APIError(400, f"max_tokens must be positive, got {max_tokens}", param="max_tokens")
        if max_tokens is None:
            max_tokens = max(1, batcher.max_len - len(ids))
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Request(ids, max_new_tokens=max_tokens, budget=body.budget, exit_layer=body.exit_layer,
                       ms_per_token=body.max_ms_per_token, min_budget=body.min_budget, shortlist=body.shortlist,
                       confidence=body.confidence or 0.0,
                       full_start="auto" if body.full_start is None else body.full_start,
                       temperature=1.0 if body.temperature is None else body.temperature,
                       top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed,
                       stop=stop, presence_penalty=body.presence_penalty or 0.0,
                       frequency_penalty=body.frequency_penalty or 0.0,
                       repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                       dry_multiplier=body.dry_multiplier or 0.0,
                       dry_base=1.75 if body.dry_base is None else body.dry_base,
                       dry_allowed_length=2 if body.dry_allowed_length is None else body.dry_allowed_length)

    async def run(http: HTTPRequest, req: Request, stream: bool, shape):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        last = [None]

        def on_piece(r, piece, token):
            now = time.perf_counter()
            if last[0] is None:
                metrics.ttft.observe(now - r.t_submit)
            else:
                metrics.itl.observe(now - last[0])
            last[0] = now
            loop.call_soon_threadsafe(events.put_nowait, ("piece", piece, r.exit_layers[-1]))

        req.on_piece = on_piece
        req.on_done = lambda r: loop.call_soon_threadsafe(events.put_nowait, ("done", None, None))
        try:
            batcher.submit(req)
        except (ValueError, TypeError) as exc:
            raise APIError(400, str(exc)) from None
        except RuntimeError as exc:
            raise APIError(503, str(exc), kind="server_error", code="shutting_down") from None
        if stream:
            return StreamingResponse(shape.stream(req, events, batcher), media_type="text/event-stream")
        while True:  # the answer in one piece; a client that goes away cancels its request
            try:
                kind, _, _ = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    batcher.cancel(req)
                    return JSONResponse({}, status_code=499)
                continue
            if kind == "done":
                break
        if req.error:
            raise APIError(500, f"generation failed: {req.error}", kind="server_error")
        return shape.full(req)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        if body.echo or body.logprobs or (body.best_of or 1) > 1:
            raise APIError(400, "echo, logprobs and best_of > 1 are not supported", param="echo")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"{len(prompt)} prompts in one request: send one prompt per request",
                               param="prompt")
            prompt = prompt[0]
        try:
            ids = encode_prompt(model.tokenizer, prompt, chat=False)
        except (TypeError, ValueError) as exc:
            raise APIError(400, str(exc), param="prompt") from None
        req = request_from(body, ids, 16 if body.max_tokens is None else body.max_tokens)
        return await run(http, req, bool(body.stream), _Shape("text_completion", model_id, body, len(ids)))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest):
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        tok = model.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        if not body.messages:
            raise APIError(400, "messages is empty", param="messages")
        for i, m in enumerate(body.messages):
            if m.role not in ROLES:
                raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}",
                               param=f"messages.{i}.role")
        msgs = [{"role": m.role, "content": message_text(i, m)} for i, m in enumerate(body.messages)]
        try:
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # the template's own complaint (e.g. roles out of order)
            raise APIError(400, f"the chat template refused the messages: {exc}", param="messages") from None
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        req = request_from(body, list(ids), max_tokens)
        return await run(http, req, bool(body.stream), _Shape("chat.completion", model_id, body, len(ids)))

    return app


class _Shape:
    """OpenAI's response and stream-chunk shapes for completions and chat completions."""

    def __init__(self, kind, model_id, body, prompt_tokens):
        self.kind, self.model_id, self.body, self.prompt_tokens = kind, model_id, body, prompt_tokens
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def usage(self, req):
        n = len(req.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    @staticmethod
    def exits(req):
        counts = {}
        for k in req.exit_layers:
            counts[str(k)] = counts.get(str(k), 0) + 1
        return counts

    def full(self, req):
        if self.kind == "chat.completion":
            choice = {"index": 0, "message": {"role": "assistant", "content": req.text},
                      "finish_reason": req.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": req.text, "finish_reason": req.finish_reason, "logprobs": None}
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model_id,
                "choices": [choice], "usage": self.usage(req), "exit_layers": list(req.exit_layers),
                "heads": list(req.heads), "exits": self.exits(req), "notes": list(req.notes)}

    def chunk(self, text=None, finish=None, exit_layer=None, first=False):
        if self.kind == "chat.completion":
            delta = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model_id, "choices": [choice]}
        if exit_layer is not None:
            out["exit_layer"] = exit_layer
        return out

    async def stream(self, req, events, batcher):
        def sse(obj):
            return f"data: {json.dumps(obj)}\n\n"

        first, finished = True, False
        try:
            while True:
                kind, piece, exit_layer = await events.get()
                if kind == "done":
                    finished = True
                    break
                if piece or first:
                    yield sse(self.chunk(piece, exit_layer=exit_layer, first=first))
                    first = False
            if req.error:
                yield sse({"error": {"message": f"generation failed: {req.error}", "type": "server_error",
                                     "param": None, "code": None}})
                return
            last = self.chunk(finish=req.finish_reason)
            last["exit_layers"], last["heads"], last["exits"] = list(req.exit_layers), list(req.heads), self.exits(req)
            yield sse(last)
            if self.body.stream_options is not None and self.body.stream_options.include_usage:
                tail = self.chunk()
                tail["choices"], tail["usage"] = [], self.usage(req)
                yield sse(tail)
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away mid-stream: free its row now
                batcher.cancel(req)


def serve(model, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_len: int | None = None,
          prefill_chunk: int = 256, slo_ms_per_token: float | None = None, admission_control: bool = False,
          log_level: str = "info"):
    """Serves `model` until SIGINT/SIGTERM (then: no new requests, the running ones finish)."""
    import uvicorn

    from .weights import engine_weights

    max_len = max_len or min(2048, engine_weights(model).max_positions)
    batcher = Batcher(model, max_batch=max_batch, max_len=max_len, prefill_chunk=prefill_chunk,
                      slo_ms_per_token=slo_ms_per_token, admission_control=admission_control)
    app = create_app(model, batcher)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
